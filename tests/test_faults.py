"""Fault injection: what a careless user, a crash or an attacker does to a run folder, a dataset or a
checkpoint, and what fastvl must do about it (issue 11).

Training faults run the real ``python -m fastvl.train`` on a tiny ViLBERT (3 steps of 8 samples, a few
seconds each): malicious pickles planted in a checkpoint (never executed; the run refuses naming the
file; ``--trust-checkpoint`` loads them), truncated / garbage / missing files and a broken ``latest``
(the run falls back to the previous whole checkpoint and still matches the uninterrupted run
exactly), a changed run setup, two runs on one folder, SIGKILL at random moments from start-up on
(the stale torch build lock it can leave is cleared), and a full filesystem (a small tmpfs, where
this machine lets the tests mount one)."""

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastvl.cli import main as fastvl_main
from fastvl.data.synth import make_synthetic_dataset

RUN = ["--model", "vilbert-tiny", "--global-batch", "8", "--micro-batch", "4", "--max-steps", "3", "--lr", "1e-3",
       "--log-every", "1", "--no-progress", "--seed", "5", "--save-every", "1", "--zero-stage", "2"]
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIMIZER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_synth")
    make_synthetic_dataset(str(out), 48, feature_dim=32, shard_size=24)
    return str(out)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def _command(synth, out, *extra):
    return [sys.executable, "-m", "fastvl.train", *RUN, "--data", synth, "--out", str(out), *extra]


def _train(synth, out, *extra, env=None, timeout=120):
    return subprocess.run(_command(synth, out, *extra), env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(out):
    steps = {}
    path = os.path.join(out, "log.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            record = json.loads(line)
            if "loss" in record:
                steps[record["step"]] = record
    return steps


def _same_as(out, reference):
    resumed = _losses(out)
    assert sorted(resumed) == sorted(reference)
    for step, record in reference.items():
        for name in ("loss", "mlm", "region", "align", "lr"):
            assert resumed[step][name] == record[name], (step, name)


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_reference")
    _ok(_train(synth, out, "--save-every", "0"))
    return _losses(str(out))


@pytest.fixture(scope="module")
def stopped(synth, tmp_path_factory):
    """A run folder stopped after step 2 of 3, with the checkpoints step-1 and step-2 (latest)."""
    out = tmp_path_factory.mktemp("faults_stopped")
    _ok(_train(synth, out, "--stop-after", "2"))
    return str(out)


def _copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def _tag(out, step):
    return out / "checkpoints" / f"step-{step:08d}"


def _fix_manifest(tag_dir):
    """What an attacker who rewrites a file also does: make the manifest match it."""
    manifest = json.loads((tag_dir / "fastvl-checkpoint.json").read_text())
    manifest["files"] = {name: os.path.getsize(tag_dir / name) for name in manifest["files"]}
    (tag_dir / "fastvl-checkpoint.json").write_text(json.dumps(manifest))


class _RunsCommand:
    """Unpickling it runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(path, marker):
    """Rewrites the torch file ``path`` with a command that creates ``marker`` when it is unpickled."""
    state = torch.load(path, weights_only=False)  # a file this test's own run wrote
    payload = _RunsCommand(f"touch {marker}")
    if isinstance(state, dict):
        state["note"] = payload
    else:
        state = {"state": state, "note": payload}
    torch.save(state, path)


# malicious files ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_planted_pickle_never_runs_and_the_resume_refuses_naming_the_file(synth, stopped, tmp_path):
    out = _copy(stopped, tmp_path)
    marker = tmp_path / "code-ran"
    _plant(_tag(out, 2) / MODEL_FILE, marker)
    _fix_manifest(_tag(out, 2))
    done = _train(synth, out)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert not marker.exists()
    assert f"{_tag(out, 2) / MODEL_FILE}: refusing to load it" in done.stderr and "posix.system" in done.stderr
    assert "--trust-checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert max(_losses(str(out))) == 2  # nothing trained, nothing written
    done = _ok(_train(synth, out, "--trust-checkpoint"))  # the user vouches for the folder
    assert marker.exists() and "resumed from" in done.stdout and max(_losses(str(out))) == 3


# one process resumes many damaged copies of the stopped run with one engine (a start-up costs seconds)
RESUME_MANY = """
import argparse, contextlib, io, json, sys
from fastvl.train import cli
from fastvl.train.checkpoint import CheckpointError
from fastvl.train.loop import Trainer

parser = argparse.ArgumentParser()
cli.add_arguments(parser)
folders, args = json.loads(sys.argv[1]), parser.parse_args(sys.argv[2:])
first = cli.build(args).trainer
results = {}
for folder in folders:
    trainer = Trainer(first.engine, first.family, first.sampler, first.collator, out_dir=folder, total_steps=3,
                      seed=args.seed, precision="fp32", progress=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            trainer.resume()
            results[folder] = {"step": trainer.start_step}
        except CheckpointError as error:
            results[folder] = {"error": str(error)}
    results[folder]["printed"] = printed.getvalue()
print("RESULTS " + json.dumps(results))
"""


def _resume_many(synth, folders, scratch):
    done = subprocess.run([sys.executable, "-c", RESUME_MANY, json.dumps([str(f) for f in folders]), *RUN,
                           "--data", synth, "--out", str(scratch)], env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return {os.path.basename(k): v for k, v in json.loads(line[len("RESULTS "):]).items()}


def _plant_in(victim, manifest_fixed=True):
    def damage(out):
        _plant(_tag(out, 2) / victim, out.parent / f"code-ran-{out.name}")
        if manifest_fixed:
            _fix_manifest(_tag(out, 2))
    return damage


def _truncate(out):
    path = _tag(out, 2) / OPTIMIZER_FILE
    path.write_bytes(path.read_bytes()[:1000])


def _garbage_same_size(out):  # passes the manifest's size check; fails to load
    path = _tag(out, 2) / MODEL_FILE
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _remove_model_file(out):
    (_tag(out, 2) / MODEL_FILE).unlink()


def _empty_latest(out):
    (out / "checkpoints" / "latest").write_text("")


def _dangling_latest(out):
    (out / "checkpoints" / "latest").write_text("step-00000099")


def _all_zeros(out):
    for step in (1, 2):
        path = _tag(out, step) / MODEL_FILE
        path.write_bytes(b"\0" * path.stat().st_size)


# damage -> (resumed step, or None for a refusal; what the warning or error says)
DAMAGES = {
    "planted-model": (_plant_in(MODEL_FILE), None, f"{MODEL_FILE}: refusing to load it: unpickling it would call "
                                                   "posix.system"),
    "planted-optimizer": (_plant_in(OPTIMIZER_FILE), None, f"{OPTIMIZER_FILE}: refusing to load it"),
    "planted-rng": (_plant_in("rng-rank0.pt"), None, "rng-rank0.pt: refusing to load it"),
    "planted-unlisted": (_plant_in(MODEL_FILE, manifest_fixed=False), 1, "not a whole checkpoint"),
    "truncated": (_truncate, 1, f"{OPTIMIZER_FILE} has 1000 bytes"),
    "garbage": (_garbage_same_size, 1, f"{MODEL_FILE}: not a readable checkpoint file"),
    "missing": (_remove_model_file, 1, f"{MODEL_FILE} is missing"),
    "empty-latest": (_empty_latest, 2, "names '', which is not a checkpoint folder"),
    "dangling-latest": (_dangling_latest, 2, "names 'step-00000099', which is not a checkpoint folder"),
    "all-zeros": (_all_zeros, None, "no whole checkpoint to resume from"),
}


@pytest.mark.slow
def test_damaged_and_malicious_checkpoints(synth, stopped, tmp_path):
    """Each damage on a copy of a run stopped at step 2 (checkpoints step-1 and step-2 = latest): a planted
    pickle is refused naming the file and never runs; a damaged newest checkpoint falls back to step-1
    with a warning; a broken ``latest`` falls back to the newest whole checkpoint."""
    folders = []
    for name, (damage, _, _) in DAMAGES.items():
        folders.append(tmp_path / name)
        shutil.copytree(stopped, folders[-1])
        damage(folders[-1])
    results = _resume_many(synth, folders, tmp_path / "scratch")
    for name, (_, step, says) in DAMAGES.items():
        result = results[name]
        assert not (tmp_path / f"code-ran-{name}").exists(), name
        if step is None:
            assert "error" in result and says in result["error"], (name, result)
        else:
            assert result.get("step") == step and says in result["printed"], (name, result)
    assert "--trust-checkpoint" in results["planted-optimizer"]["error"]
    zeros = results["all-zeros"]["error"]
    assert str(_tag(tmp_path / "all-zeros", 1) / MODEL_FILE) in zeros and str(_tag(tmp_path / "all-zeros", 2)) in zeros


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_and_matches_the_uninterrupted_run(synth, stopped, reference,
                                                                                  tmp_path):
    out = _copy(stopped, tmp_path)
    _truncate(out)
    done = _ok(_train(synth, out))
    assert "has 1000 bytes" in done.stdout and "at step 1" in done.stdout
    _same_as(str(out), reference)  # the fallback's step 2 is re-run: the log's later records win


@pytest.mark.slow
def test_a_changed_run_setup_says_what_differs(synth, stopped, tmp_path):
    out = _copy(stopped, tmp_path)
    done = _train(synth, out, "--zero-stage", "3", "--precision", "bf16", "--model", "vlbert-tiny")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "zero_stage: checkpoint 2, this run 3" in done.stderr and "family: checkpoint 'vilbert', this run 'vlbert'" \
        in done.stderr
    assert "precision: checkpoint 'fp32', this run 'bf16'" in done.stderr and "--no-resume" in done.stderr


# concurrent runs ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_refuses_naming_the_first(synth, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_command(synth, out, "--max-steps", "100000", "--save-every", "0"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _losses(str(out)) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        first.send_signal(signal.SIGSTOP)  # holds the folder without using a core
        second = _train(synth, out)
        assert second.returncode == 2
        assert f"is in use by a running fastvl run (pid {first.pid} on" in second.stderr
    finally:
        first.kill()
        first.wait()
    events = [json.loads(line).get("event") for line in open(out / "log.jsonl")]
    assert events.count("start") == 1  # the second run wrote nothing
    from fastvl.train.locks import lock_output_dir

    lock_output_dir(str(out)).release()  # the killed holder's lock died with it


def test_out_that_is_a_file_is_a_usage_error(synth, tmp_path, capsys):
    import argparse

    from fastvl.train import cli

    (tmp_path / "file").write_text("x")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([*RUN, "--data", synth, "--out", str(tmp_path / "file")])) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err


# kills at random moments ----------------------------------------------------------------------------------


def _private_extension_dir(tmp_path):
    """A TORCH_EXTENSIONS_DIR of this test's own with DeepSpeed's CPU op already built (copied from the
    shared one, so nothing is rebuilt and the shared folder is never locked by this test)."""
    from torch.utils.cpp_extension import _get_build_directory

    root = tmp_path / "torch_extensions"
    built = _get_build_directory("deepspeed_shm_comm", verbose=False)
    if os.path.isfile(os.path.join(built, "deepspeed_shm_comm.so")):
        shutil.copytree(built, root / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    root.mkdir(exist_ok=True)
    return root


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_run_ends_as_if_uninterrupted(synth, reference, tmp_path):
    """Three SIGKILLs at seeded random moments from 0 to 6 s after the start (start-up, JIT op load,
    training, checkpointing), then a run to the end: no hang, and every step's numbers are those of
    the uninterrupted run. Before that run, the torch build lock a kill inside the JIT load leaves
    behind is planted (before the fix every later start waited on it forever, printing nothing): it is
    reported and removed."""
    root = _private_extension_dir(tmp_path)
    env = _env(TORCH_EXTENSIONS_DIR=str(root))
    out = tmp_path / "run"
    moments = random.Random(11).sample([0.3, 1.0, 1.8, 2.6, 3.5, 4.5, 5.5, 6.0], 3)
    for moment in moments:
        process = subprocess.Popen(_command(synth, out), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(moment)
        process.send_signal(signal.SIGKILL)
        process.wait()
    (root / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (root / "deepspeed_shm_comm" / "lock").touch()
    done = _ok(_train(synth, out, env=env, timeout=300))
    assert "removed the stale lock" in done.stderr and not (root / "deepspeed_shm_comm" / "lock").exists()
    _same_as(str(out), reference)


# a full filesystem ------------------------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1.6 MiB tmpfs (a checkpoint of the tiny run is ~1 MiB), or a skip where mount is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_says_so_and_latest_stays_on_the_last_whole_checkpoint(synth, small_filesystem):
    out = small_filesystem / "run"
    done = _train(synth, out)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no space left on device" in done.stderr and "Traceback" not in done.stderr
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == "step-00000001" and f"latest still names '{latest}'" in done.stderr
    assert not _tag(out, 2).exists()  # the partial folder is removed


# data: converter and inspect ----------------------------------------------------------------------------------

def _b64(array, dtype=np.float32):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def _tsv_line(image_id, features, boxes, cls_prob, size=("640", "480"), num_boxes=None):
    return "\t".join([image_id, *size, str(len(features) if num_boxes is None else num_boxes), _b64(boxes),
                      _b64(features), _b64(cls_prob)]) + "\n"


def _good_image(rng, n=3, dim=8, classes=5):
    return (rng.normal(size=(n, dim)).astype(np.float32), rng.uniform(0, 400, (n, 4)).astype(np.float32),
            rng.dirichlet(np.ones(classes), n).astype(np.float32))


def _bad_tsv(kind, rng):
    features, boxes, cls_prob = _good_image(rng)
    size, num_boxes = ("640", "480"), None
    if kind == "features-beyond-float16":
        features[1, 2] = 1e5
    elif kind == "nan-features":
        features[2, 0] = np.nan
    elif kind == "inf-boxes":
        boxes[0, 3] = np.inf
    elif kind == "cls-prob-logits":
        cls_prob = rng.normal(size=cls_prob.shape).astype(np.float32)
    elif kind == "cls-prob-not-normalised":
        cls_prob = cls_prob * 3
    elif kind == "zero-image-size":
        size = ("0", "480")
    elif kind == "too-many-boxes":
        features, boxes, cls_prob = _good_image(rng, n=101)
    return _tsv_line("7", features, boxes, cls_prob, size, num_boxes)


@pytest.mark.parametrize("kind, says", [
    ("features-beyond-float16", "beyond float16's range"),
    ("nan-features", "features holds NaN or Inf (region 2)"),
    ("inf-boxes", "boxes holds NaN or Inf (region 0)"),
    ("cls-prob-logits", "cls_prob row 0 is not a probability distribution"),
    ("cls-prob-not-normalised", "is not a probability distribution"),
    ("zero-image-size", "image size 480 x 0 is not positive"),
    ("too-many-boxes", "num_boxes 101 outside [0, 100]"),
])
def test_the_converter_refuses_values_it_would_store_wrong(tmp_path, capsys, kind, says):
    rng = np.random.default_rng(3)
    tsv = tmp_path / "features.tsv"
    tsv.write_text(_tsv_line("6", *_good_image(rng)) + _bad_tsv(kind, rng))
    (tmp_path / "captions.jsonl").write_text('{"image_id": "6", "caption": "a dog"}\n'
                                             '{"image_id": "7", "caption": "a cat"}\n')
    out = tmp_path / "out"
    code = fastvl_main(["data", "convert", str(tsv), "--captions", str(tmp_path / "captions.jsonl"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 2 and says in printed, printed
    assert f"{tsv}:2" in printed or "record '7'" in printed  # the file and line, or the record
    assert not (out / "index.json").exists()


@pytest.mark.parametrize("content, says", [
    ('{"image_id": "6", "caption": null}\n', "captions.jsonl:1: caption is null, expected text"),
    ('{"image_id": "6", "caption": 12}\n', "captions.jsonl:1: caption is 12, expected text"),
    (b'6\tna\xefve caf\xe9\n', "captions.jsonl:1: not UTF-8 text"),
    ('{"image_id": "6"}\n', "captions.jsonl:1: expected a JSON object with image_id and caption"),
])
def test_bad_captions_are_named_by_line(tmp_path, capsys, content, says):
    rng = np.random.default_rng(4)
    (tmp_path / "features.tsv").write_text(_tsv_line("6", *_good_image(rng)))
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = fastvl_main(["data", "convert", str(tmp_path / "features.tsv"), "--captions", str(captions), "--out",
                        str(tmp_path / "out")])
    assert code == 2 and says in capsys.readouterr().out


@pytest.mark.parametrize("vocab, says", [(b"", "vocabulary is empty"), (b"[PAD]\n\xff\xfe\n", "not UTF-8"),
                                         (None, "vocabulary file not found")])
def test_a_bad_vocab_is_found_before_anything_is_converted(tmp_path, capsys, vocab, says):
    rng = np.random.default_rng(5)
    (tmp_path / "features.tsv").write_text(_tsv_line("6", *_good_image(rng)))
    (tmp_path / "captions.jsonl").write_text('{"image_id": "6", "caption": "a dog"}\n')
    if vocab is not None:
        (tmp_path / "vocab.txt").write_bytes(vocab)
    code = fastvl_main(["data", "convert", str(tmp_path / "features.tsv"), "--captions",
                        str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "out"), "--vocab",
                        str(tmp_path / "vocab.txt")])
    assert code == 2 and says in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_convert_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code = fastvl_main(["data", "convert", "missing.tsv", "--captions", "c.jsonl", "--out", str(tmp_path / "out")])
    assert code == 2 and "is an existing file, not a folder" in capsys.readouterr().out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_small_set")
    make_synthetic_dataset(str(out), 12, feature_dim=8, num_classes=5, shard_size=6)
    return out


def test_inspect_finds_nan_features_and_boxes_naming_the_record(small_set, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_set, data)
    shard = data / "shard-00001"
    counts = np.load(shard / "num_regions.npy")
    features, boxes = np.load(shard / "features.npy"), np.load(shard / "boxes.npy")
    features[counts[:2].sum() + 1, 3] = np.nan  # record 3 of the shard (line 3), its region 1
    boxes[counts[:4].sum(), 0] = np.inf  # line 5, region 0
    np.save(shard / "features.npy", features)
    np.save(shard / "boxes.npy", boxes)
    image_ids = [json.loads(line)["image_id"] for line in open(shard / "captions.jsonl")]
    assert fastvl_main(["data", "inspect", str(data)]) == 2
    printed = capsys.readouterr().out
    assert f"captions.jsonl:3 (image_id {image_ids[2]!r}): features NaN/Inf (region 1)" in printed
    assert f"captions.jsonl:5 (image_id {image_ids[4]!r}): boxes NaN/Inf (region 0)" in printed
    assert "2 record(s) hold values training cannot use" in printed
    assert fastvl_main(["data", "inspect", str(small_set)]) == 0


@pytest.mark.parametrize("edit, says", [
    (lambda index: index["shards"][0].update(name="../../etc"), "name '../../etc' must be a folder name inside"),
    (lambda index: index["shards"][0].pop("num_images"), "'num_images' must be a non-negative integer, got None"),
    (lambda index: index.update(feature_dim="8"), "'feature_dim' must be a positive integer, got '8'"),
    (lambda index: index.update(shards={"name": "x"}), "'shards' must be a list"),
])
def test_a_malformed_index_is_named(small_set, tmp_path, capsys, edit, says):
    data = tmp_path / "data"
    shutil.copytree(small_set, data)
    index = json.loads((data / "index.json").read_text())
    edit(index)
    (data / "index.json").write_text(json.dumps(index))
    assert fastvl_main(["data", "inspect", str(data)]) == 2
    assert says in capsys.readouterr().out


# converters ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vilbert_original(tmp_path_factory):
    """A tiny ViLBERT in the original layout and its JSON config."""
    import dataclasses

    from fastvl.convert.vilbert import vilbert_to_original
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining

    config = ViLBERTConfig.named("tiny", vocab_size=50, v_feature_size=16, v_target_size=5)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("faults_vilbert")
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return vilbert_to_original(ViLBERTForPretraining(config)), folder / "config.json"


def _convert(*argv):
    return fastvl_main(["convert", "vilbert", *map(str, argv)])


def test_a_pickle_named_safetensors(vilbert_original, tmp_path, capsys):
    state, config = vilbert_original
    torch.save(state, tmp_path / "model.safetensors")
    assert _convert(tmp_path / "model.safetensors", "--config", config, "-o", tmp_path / "out.safetensors") == 1
    assert "is not a readable safetensors file" in capsys.readouterr().err


def test_a_truncated_bin_is_called_truncated_not_pickled(vilbert_original, tmp_path, capsys):
    state, config = vilbert_original
    torch.save(state, tmp_path / "model.bin")
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    assert _convert(tmp_path / "model.bin", "--config", config, "-o", tmp_path / "out.safetensors") == 1
    error = capsys.readouterr().err
    assert "truncated or damaged" in error and "pickled objects" not in error


def test_to_original_on_a_pickled_file_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(2), "note": _RunsCommand(f"touch {marker}")}, tmp_path / "model.bin")
    (tmp_path / "model.bin.json").write_text(json.dumps({"class": "ViLBERTForPretraining", "config": {}}))
    assert _convert(tmp_path / "model.bin", "--to-original", "-o", tmp_path / "back.bin") == 1
    assert "contains pickled objects (posix.system)" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize("config_text, says", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON/YAML object"),
                                               ('{"hidden_size": "big"}', "--config")])
def test_a_bad_config_is_named(vilbert_original, tmp_path, capsys, config_text, says):
    state, config = vilbert_original
    torch.save(state, tmp_path / "model.bin")
    if "hidden_size" in config_text:
        config_text = json.dumps({**json.loads(config.read_text()), "hidden_size": "big"})
    (tmp_path / "config.json").write_text(config_text)
    assert _convert(tmp_path / "model.bin", "--config", tmp_path / "config.json", "-o", tmp_path / "o.safetensors") == 2
    error = capsys.readouterr().err
    assert says in error and str(tmp_path / "config.json") in error


def test_an_unusable_output_is_named_before_converting(vilbert_original, tmp_path, capsys):
    state, config = vilbert_original
    torch.save(state, tmp_path / "model.bin")
    (tmp_path / "file").write_text("x")
    assert _convert(tmp_path / "model.bin", "--config", config, "-o", tmp_path / "file" / "out.safetensors") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("spoil, says", [(lambda t: t.fill_(float("nan")), "NaN/Inf values"),
                                         (lambda t: t.round().long(), "torch.int64 values for a floating-point")])
def test_nan_or_integer_weights_are_not_converted_silently(vilbert_original, tmp_path, capsys, spoil, says):
    state, config = vilbert_original
    state = dict(state)
    key = "bert.encoder.layer.0.attention.output.dense.weight"
    state[key] = spoil(state[key].clone())
    torch.save(state, tmp_path / "model.bin")
    assert _convert(tmp_path / "model.bin", "--config", config, "-o", tmp_path / "out.safetensors") == 1
    error = capsys.readouterr().err
    assert "bad values" in error and says in error


def test_every_changed_setting_is_named():
    from fastvl.train.checkpoint import IncompatibleCheckpoint, check_compatible

    saved = {"world_size": 2, "zero_stage": 2, "precision": "bf16", "family": "vilbert", "parameters": 1000}
    check_compatible(saved, dict(saved), "step-1")
    check_compatible(None, dict(saved), "step-1")  # a checkpoint written before manifests: DeepSpeed checks
    now = {"world_size": 1, "zero_stage": 3, "precision": "bf16", "family": "vilbert", "parameters": 2000}
    with pytest.raises(IncompatibleCheckpoint) as raised:
        check_compatible(saved, now, "step-1")
    message = str(raised.value)
    assert "world_size: checkpoint 2, this run 1 (the number of ranks)" in message
    assert "zero_stage: checkpoint 2, this run 3" in message and "parameters: checkpoint 1000, this run 2000" in message
    assert "precision:" not in message


def _try_lock(path, queue):
    from fastvl.train.locks import OutputDirBusy, lock_output_dir

    try:
        lock_output_dir(path)
        queue.put("locked")
    except OutputDirBusy as error:
        queue.put(str(error))


def test_the_output_lock_is_exclusive_and_released(tmp_path):
    import multiprocessing

    from fastvl.train.locks import OutputDirBusy, lock_output_dir

    def other_process_gets():
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=_try_lock, args=(str(tmp_path / "run"), queue))
        process.start()
        process.join(30)
        return queue.get(timeout=5)

    lock = lock_output_dir(str(tmp_path / "run"))
    assert f"is in use by a running fastvl run (pid {os.getpid()} on" in other_process_gets()
    lock.release()
    assert other_process_gets() == "locked"  # and its lock went with the process
    with lock_output_dir(str(tmp_path / "run")):
        with pytest.raises(OutputDirBusy):  # a second open file description in one process conflicts too
            lock_output_dir(str(tmp_path / "run"))


def test_non_utf8_captions_in_a_shard_are_named(small_set, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_set, data)
    captions = data / "shard-00000" / "captions.jsonl"
    lines = captions.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"caption": "', b'"caption": "\xff')
    captions.write_bytes(b"".join(lines))
    assert fastvl_main(["data", "inspect", str(data)]) == 2
    assert f"{captions}:2: not UTF-8 text" in capsys.readouterr().out
