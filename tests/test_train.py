"""fastvl.train: presets, packed vs padded batches, and real pretraining runs under DeepSpeed on CPU
(the README's command under the launcher, 2 ranks under ZeRO-2/3 vs 1 rank, SIGKILL + SIGTERM
+ resume vs an uninterrupted run, a NaN loss stopping a run)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastvl.data.format import RegionDataset
from fastvl.data.sampler import GlobalBatchSampler
from fastvl.data.synth import make_synthetic_dataset
from fastvl.data.tokenizer import load_tokenizer, special_ids
from fastvl.train import families, presets

OBJECTIVES = ("mlm", "region", "align")
# one small run that every comparison shares: 8 samples per step = 2 micro-batches of 4
RUN = ["--model", "vilbert-tiny", "--global-batch", "8", "--micro-batch", "4", "--max-steps", "8", "--lr", "1e-3",
       "--log-every", "1", "--no-progress", "--seed", "3"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _command(args, ranks=None):
    if ranks is None:
        return [sys.executable, "-m", "fastvl.train", *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", _free_port(),
            "--module", "fastvl.train", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the CPU backends, not the Triton interpreter
    return env


def _train(args, ranks=None, timeout=300):
    done = subprocess.run(_command(args, ranks), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(out_dir):
    """{step: record} from log.jsonl (a resumed step's later record wins)."""
    steps = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                steps[record["step"]] = record
    return steps


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    """The uninterrupted single-process run (ZeRO-2, fp32) the other runs are compared with."""
    out = str(tmp_path_factory.mktemp("reference"))
    _train([*RUN, "--data", synth, "--out", out, "--zero-stage", "2", "--save-every", "0"])
    return _losses(out)


# presets and batches ---------------------------------------------------------------------------------


def test_schedule_presets():
    vilbert = presets.PRESETS["vilbert"]
    factors = [presets.lr_factor(s, 100, presets.warmup_steps(vilbert, 100), vilbert, 1e-4) for s in range(101)]
    assert presets.warmup_steps(vilbert, 100) == 10
    np.testing.assert_allclose(factors[:11], np.arange(11) / 10)
    np.testing.assert_allclose(factors[10:], 1 - np.arange(91) / 90)
    albef = presets.PRESETS["albef"]
    assert presets.warmup_steps(albef, 1000) == 100 and presets.warmup_steps(albef, 10**6) == 2000
    assert presets.lr_factor(0, 10**6, 2000, albef, 1e-4) == pytest.approx(0.1)
    assert presets.lr_factor(10**6, 10**6, 2000, albef, 1e-4) == pytest.approx(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = presets.param_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["vilbert-tiny", "vlbert-tiny"])
def test_packed_and_padded_batches_give_the_same_losses(synth, name):
    tokenizer = load_tokenizer(os.path.join(synth, "vocab.txt"))
    dataset = RegionDataset(synth, tokenizer)
    family, variant = families.resolve(name)
    torch.manual_seed(0)
    model = family.make_model(variant, families.ModelOptions(tokenizer.get_vocab_size(), dataset.num_classes,
                                                             dataset.feature_dim)).eval()
    keys = [(0, i) for i in (5, 17, 33, 70, 101)]

    def losses(**kwargs):
        collator = family.make_collator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), seed=2,
                                        max_text_len=36, max_regions=36, **kwargs)
        batch = collator(keys)
        with torch.no_grad():
            out = model(**family.model_inputs(batch))
        return batch, {k: v.item() for k, v in out.losses.items()}

    padded_batch, padded = losses(packed=False, pad_to_multiple_of=16)
    packed_batch, packed = losses(packed=True)
    assert "cu_seqlens_text" in packed_batch and padded_batch["input_ids"].shape[1] % 16 == 0
    packed_inputs = family.model_inputs(packed_batch)  # no host re-padding: the model gets the ragged rows
    assert packed_inputs["input_ids"].dim() == 1 and not any(k.endswith("_mask") for k in packed_inputs)
    assert set(padded) == set(family.objectives) and all(v > 0 for v in padded.values())
    for objective in family.objectives:
        assert packed[objective] == pytest.approx(padded[objective], rel=1e-5, abs=1e-6)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="vilbert-tiny"):
        families.resolve("vilbert-huge")


# pretraining runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_demo(tmp_path_factory):
    """The demo's set (8 classes), with 64-d features to keep collation cheap."""
    out = tmp_path_factory.mktemp("synth_demo")
    make_synthetic_dataset(str(out), 1024, feature_dim=64, num_classes=8, shard_size=512)
    return str(out)


@pytest.mark.slow
def test_readme_command_under_the_launcher_all_three_losses_fall(synth_demo, tmp_path):
    """The README's main command (``make demo``) with 64-d features: tiny ViLBERT on the synthetic set
    via the deepspeed launcher, 1,000 steps of 32 pairs (~90 s on one core).

    MLM and region KL fall within the first 200 steps; the alignment loss sits at chance (log 2) for a
    few hundred steps, then falls (to ~0.42-0.54 over the last 100 steps in runs with seeds 0 and 1)."""
    out = str(tmp_path)
    done = _train(["--model", "vilbert-tiny", "--data", synth_demo, "--out", out, "--global-batch", "32",
                   "--micro-batch", "32", "--max-steps", "1000", "--lr", "2e-3", "--log-every", "100", "--save-every",
                   "500", "--no-progress"], ranks=1, timeout=600)
    assert "step 1000/1000" in done.stdout and "(mean of 100)" in done.stdout
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"window_mean"' in line]
    assert [r["step"] for r in records] == list(range(100, 1001, 100))
    first, last = records[0]["window_mean"], records[-1]["window_mean"]
    assert last["mlm"] < 0.5 * first["mlm"] and last["region"] < 0.2 * first["region"], (first, last)
    assert abs(first["align"] - np.log(2)) < 0.02 and last["align"] < 0.62, (first, last)
    for key in ("samples_per_s", "tokens_per_s", "lr", "rss_peak_mib", "skipped_steps", "loss_scale"):
        assert key in records[-1]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip().endswith("1000")


def test_pretrain_command_help(capsys):
    from fastvl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--deepspeed" in help_text and "vilbert-base" in help_text


@pytest.mark.slow
@pytest.mark.distributed
def assert_losses_match(log: dict, reference: dict, objectives) -> None:
    """Every logged step of ``log`` has ``reference``'s losses (within reduction-order rounding)."""
    assert sorted(log) == sorted(reference)
    for step, record in log.items():
        for name in (*objectives, "loss"):
            assert record[name] == pytest.approx(reference[step][name], rel=2e-4, abs=1e-5), (step, name)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank(synth, reference, tmp_path, stage):
    """deepspeed --num_gpus 2 on CPU (gloo): the same global batch of 8 as 2 ranks x 1 micro-step."""
    out = str(tmp_path)
    _train([*RUN, "--data", synth, "--out", out, "--zero-stage", str(stage), "--save-every", "0"], ranks=2)
    assert_losses_match(_losses(out), reference, OBJECTIVES)
    start = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert start["world_size"] == 2 and start["grad_accum"] == 1 and start["zero_stage"] == stage


def _wait_for_step(process, out_dir, step, timeout=240):
    """True once the run has logged ``step``; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(os.path.join(out_dir, "log.jsonl")) and max(_losses(out_dir), default=0) >= step:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_match_the_uninterrupted_run(synth, reference, tmp_path):
    out = str(tmp_path)
    args = [*RUN, "--data", synth, "--out", out, "--zero-stage", "2", "--save-every", "2"]
    # SIGKILL somewhere after step 3: the last checkpoint is step 2 (or later if it got that far)
    process = subprocess.Popen(_command(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for_step(process, out, 3), "the run ended before it was to be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(out)) < 8
    # resume; SIGTERM after it logs another step: it checkpoints that step and stops cleanly
    process = subprocess.Popen(_command(args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if _wait_for_step(process, out, max(_losses(out)) + 1):
        process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stdout[-3000:]
    assert "resumed from" in stdout
    events = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    stopped = [e for e in events if e.get("event") == "sigterm"]
    if stopped:  # SIGTERM came before the run finished
        assert max(_losses(out)) == stopped[0]["step"] < 8
    _train(args)  # resume to the end
    resumed = _losses(out)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        for name in (*OBJECTIVES, "loss", "lr"):
            assert resumed[step][name] == reference[step][name], (step, name)
    assert sum(e.get("event") == "resume" for e in [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]) >= 2


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(synth, data)
    tokenizer = load_tokenizer(os.path.join(synth, "vocab.txt"))
    n = len(RegionDataset(synth, tokenizer))
    bad = GlobalBatchSampler(n, 8, 4, seed=3).global_indices(0, 2)[0]  # a record of step 3
    shard, row = divmod(int(bad), 64)
    counts = np.load(data / f"shard-{shard:05d}" / "num_regions.npy")
    features = np.load(data / f"shard-{shard:05d}" / "features.npy")
    features[counts[:row].sum():counts[: row + 1].sum()] = np.nan
    np.save(data / f"shard-{shard:05d}" / "features.npy", features)
    out = str(tmp_path / "run")
    done = subprocess.run(_command([*RUN, "--data", str(data), "--out", out, "--save-every", "1", "--precision", "bf16"]),
                          env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "loss is nan at step 3 (bf16)" in done.stderr and "step-00000002" in done.stderr
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-00000002"
    assert max(_losses(out)) == 2


def test_text_stream_from_a_bert_checkpoint(tmp_path):
    """--init-text-from: HF BERT names (written here from another model's text stream) fill the text stream."""
    from safetensors.torch import save_file

    from fastvl.convert.hf_bert import _rules
    from fastvl.convert.vilbert import original_names

    family, variant = families.resolve("vilbert-tiny")
    options = families.ModelOptions(vocab_size=50, num_classes=5, feature_dim=16)
    torch.manual_seed(1)
    source = family.make_model(variant, options)
    prefix, table = _rules(source, with_mlm_head=False)
    hf = {}
    for name, tensor in source.state_dict().items():
        try:
            names = original_names(name, table)
        except ValueError:
            continue  # visual stream, co-attention, heads
        for original, part in zip(names, tensor.chunk(len(names))):
            hf["bert." + original] = part.clone()
    save_file(hf, str(tmp_path / "bert.safetensors"))
    torch.manual_seed(2)
    model = family.make_model(variant, options)
    family.init_text(model, str(tmp_path / "bert.safetensors"))
    text = source.bert.layer[1].attention.qkv.weight
    assert torch.equal(model.bert.layer[1].attention.qkv.weight, text)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(model.bert.v_layer[0].attention.qkv.weight, source.bert.v_layer[0].attention.qkv.weight)


def record_nvtx(monkeypatch) -> list:
    """NVTX calls recorded in place of CUDA's (pushed names, None per pop), as on a CUDA machine."""
    import fastvl.profiling

    events = []
    monkeypatch.setattr(fastvl.profiling, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append(None))
    return events


def test_nvtx_ranges_per_layer_and_for_the_losses(monkeypatch):
    """One balanced NVTX range per layer forward, and one around the heads and losses."""
    from fastvl.profiling import nvtx_layer_ranges

    events = record_nvtx(monkeypatch)
    family, variant = families.resolve("vilbert-tiny")
    model = family.make_model(variant, families.ModelOptions(vocab_size=50, num_classes=5, feature_dim=16))
    assert nvtx_layer_ranges(model, enabled=False) == 0
    layers = nvtx_layer_ranges(model, enabled=True)
    assert layers == 4 + 2 + 2  # text, visual, co-attention layers of the tiny config
    ids = torch.randint(5, 50, (2, 7))
    model(ids, torch.zeros_like(ids), torch.ones(2, 7, dtype=torch.bool), torch.randn(2, 4, 16), torch.rand(2, 4, 5),
          torch.ones(2, 4, dtype=torch.bool), mlm_labels=ids)
    pushed = [e for e in events if e is not None]
    assert len(pushed) == layers + 1 and events.count(None) == layers + 1
    assert "forward bert.layer.0" in pushed and "forward bert.c_layer.1" in pushed
    assert pushed[-1] == "heads and losses"


def test_logger_writes_jsonl_and_tensorboard_when_installed(tmp_path, monkeypatch, capsys):
    import types

    from fastvl.train.loop import Logger

    scalars = []

    class SummaryWriter:  # stands in for torch.utils.tensorboard's (the tensorboard package is optional)
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    logger = Logger(str(tmp_path / "log.jsonl"), enabled=True)
    assert logger.tensorboard.log_dir == str(tmp_path / "tensorboard")
    logger.event({"step": 3, "loss": 1.5, "mlm": 0.5, "loss_scale": None}, "step 3 loss=1.5")
    logger.event({"event": "checkpoint", "step": 3})
    logger.close()
    assert scalars == [("train/loss", 1.5, 3), ("train/mlm", 0.5, 3), "closed"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [3, 3]
    assert "step 3 loss=1.5" in capsys.readouterr().out
    silent = Logger(str(tmp_path / "other.jsonl"), enabled=False)  # ranks other than 0
    silent.event({"step": 1, "loss": 1.0}, "never printed")
    assert not os.path.exists(tmp_path / "other.jsonl") and "never" not in capsys.readouterr().out


def test_vlbert_family_adapter(synth):
    """A second model family through the same trainer interface: VL-BERT's collator, inputs and losses."""
    tokenizer = load_tokenizer(os.path.join(synth, "vocab.txt"))
    dataset = RegionDataset(synth, tokenizer)
    family, variant = families.resolve("vlbert-tiny")
    torch.manual_seed(0)
    model = family.make_model(variant, families.ModelOptions(tokenizer.get_vocab_size(), dataset.num_classes,
                                                             dataset.feature_dim))
    collator = family.make_collator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), seed=4,
                                    packed=False, max_text_len=36, max_regions=36)
    batch = collator([(0, i) for i in range(8)])
    loss, losses = family.losses(model(**family.model_inputs(batch)))
    assert set(losses) == set(family.objectives) == {"mlm", "mvrc"}
    assert torch.isfinite(loss) and losses["mvrc"] > 0
    torch.testing.assert_close(loss, losses["mlm"] + losses["mvrc"])
    loss.backward()
    assert model.mvrc_head.classifier.weight.grad.abs().sum() > 0


def test_objective_2_trains_without_the_alignment_loss(synth):
    tokenizer = load_tokenizer(os.path.join(synth, "vocab.txt"))
    dataset = RegionDataset(synth, tokenizer)
    family, variant = families.resolve("vilbert-tiny")
    model = family.make_model(variant, families.ModelOptions(tokenizer.get_vocab_size(), dataset.num_classes,
                                                             dataset.feature_dim)).eval()
    collator = family.make_collator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), seed=2, packed=False,
                                    max_text_len=36, max_regions=36, objective=2)
    inputs = family.model_inputs(collator([(0, i) for i in range(6)]))
    assert "is_next" not in inputs
    loss, losses = family.losses(model(**inputs))
    assert losses["align"].item() == 0.0 and loss.item() == pytest.approx((losses["mlm"] + losses["region"]).item())
    with pytest.raises(ValueError, match="--objective 1 is ViLBERT's"):
        families.resolve("vlbert-tiny")[0].make_collator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(),
                                                        seed=0, packed=False, max_text_len=36, max_regions=36,
                                                        objective=1)


@pytest.mark.slow
def test_packed_pretraining_runs_give_the_padded_runs_losses(synth, tmp_path):
    """`fastvl pretrain --packed` (ragged batches end to end, no padding) logs the padded run's losses."""
    args = ["--data", synth, "--model", "vilbert-tiny", "--global-batch", "8", "--micro-batch", "4", "--max-steps",
            "3", "--lr", "1e-3", "--log-every", "1", "--no-progress", "--seed", "3", "--dropout", "0"]
    _train([*args, "--out", str(tmp_path / "padded")])
    _train([*args, "--out", str(tmp_path / "packed"), "--packed"])
    padded, packed = _losses(str(tmp_path / "padded")), _losses(str(tmp_path / "packed"))
    assert sorted(padded) == sorted(packed) == [1, 2, 3]
    for step in padded:
        for name in ("loss", *OBJECTIVES):
            assert packed[step][name] == pytest.approx(padded[step][name], rel=1e-4, abs=1e-5), (step, name)
