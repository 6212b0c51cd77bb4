"""Pretraining on one GPU through the DeepSpeed launcher (every test is ``gpu``: skipped without CUDA;
the GPU suite's ``gpu-tests`` step runs them): vilbert-tiny in bf16 and fp16 with the shipped configs and
falling losses, an fp16 step whose loss is NaN skipped by the loss scaler while the run goes on, and
ZeRO-3 in bf16 stopped half-way and resumed. The CPU versions of these runs are in test_train.py."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from test_train import OBJECTIVES, RUN, _losses, _train

from fastvl.data.format import RegionDataset
from fastvl.data.sampler import GlobalBatchSampler
from fastvl.data.tokenizer import load_tokenizer
from fastvl.train.cli import CONFIG_DIR

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="DeepSpeed is not installed (a GPU machine without network gets it from .whl/: "
                                        "see benchmarks/README.md)")]

# 60 steps of 32 pairs (2 micro-batches of 16) at lr 2e-3: on CPU (bf16, seeds 0/3/5) the mean of the
# last 5 steps is 0.62x the first 5 for mlm and 0.68-0.80x for region; align stays near log 2.
LONG_RUN = ["--model", "vilbert-tiny", "--global-batch", "32", "--micro-batch", "16", "--max-steps", "60",
            "--lr", "2e-3", "--log-every", "1", "--no-progress", "--seed", "3"]
FALLS_TO = {"mlm": 0.8, "region": 0.85}


def _steps(out_dir):
    """The step records of log.jsonl, in step order (one per step: the runs here log every step)."""
    log = _losses(out_dir)
    return [log[step] for step in sorted(log)]


def _start(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return next(r for r in map(json.loads, f) if r.get("event") == "start")


def _assert_ran_on_the_gpu(records):
    assert all(r.get("gpu_mem_mib", 0) > 0 for r in records), "log.jsonl has no GPU memory: the run was not on the GPU"


def _assert_losses_fall(records):
    for name, ratio in FALLS_TO.items():
        first = np.mean([r[name] for r in records[:5]])
        last = np.mean([r[name] for r in records[-5:]])
        assert last < ratio * first, f"{name}: mean of the first 5 steps {first:.3f}, of the last 5 {last:.3f}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretraining_on_one_gpu_losses_fall(synth, tmp_path, precision):
    """The shipped ZeRO-2 config of each precision (fp16: dynamic loss scale from 2^16 with hysteresis 2,
    which skips a few overflowing steps at the start) with the batch sizes overridden."""
    out = str(tmp_path)
    config = os.path.join(CONFIG_DIR, f"zero2_{precision}.json")
    _train([*LONG_RUN, "--data", synth, "--out", out, "--deepspeed", config, "--save-every", "0"], ranks=1)
    start = _start(out)
    assert (start["precision"], start["zero_stage"], start["world_size"], start["grad_accum"]) == (precision, 2, 1, 2)
    records = _steps(out)
    assert [r["step"] for r in records] == list(range(1, 61))
    _assert_ran_on_the_gpu(records)
    assert all(np.isfinite([r[name] for name in (*OBJECTIVES, "loss")]).all() for r in records)
    _assert_losses_fall(records)
    if precision == "bf16":
        assert records[-1]["skipped_steps"] == 0
    else:
        # emulated on CPU (Triton interpreter): 2 skipped steps, then the scale stays at 2^15
        assert records[-1]["skipped_steps"] <= 6 and records[-1]["loss_scale"] >= 2**10, records[-1]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-00000060"


def _with_nan_record(source, dest, step):
    """Copies the dataset ``source`` to ``dest`` with NaN region features in the first record of global
    step ``step`` (1-based) of RUN's sampler (global batch 8, seed 3, epoch 0)."""
    shutil.copytree(source, dest)
    dataset = RegionDataset(source, load_tokenizer(os.path.join(source, "vocab.txt")))  # reads source's files only
    record = int(GlobalBatchSampler(len(dataset), 8, 4, seed=3).global_indices(0, step - 1)[0])
    shard_number, row = dataset._where[record]
    shard = dataset.shards[shard_number]
    start, stop = (int(v) for v in shard.arrays()["offsets"][row:row + 2])
    path = os.path.join(dest, os.path.basename(shard.dir), "features.npy")
    features = np.load(path)
    features[start:stop] = np.nan
    np.save(path, features)


def test_fp16_overflowing_step_is_skipped_and_the_run_goes_on(synth, tmp_path):
    """A NaN loss at step 3 in fp16: DeepSpeed's loss scaler skips that step (skipped_steps 0 -> 1, the
    scale halves: hysteresis 1) and the run finishes; bf16 stops instead (test_train.py). The scale starts
    at 2^8 so that no step overflows on its own."""
    data = tmp_path / "data"
    _with_nan_record(synth, data, step=3)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1,
                       "loss_scale_window": 1000, "min_loss_scale": 1},
              "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}
    (tmp_path / "fp16.json").write_text(json.dumps(config))
    out = str(tmp_path / "run")
    _train([*RUN, "--data", str(data), "--out", out, "--deepspeed", str(tmp_path / "fp16.json"), "--save-every", "0"],
           ranks=1)
    records = _steps(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    _assert_ran_on_the_gpu(records)
    skipped = [r["skipped_steps"] for r in records]
    scales = [r["loss_scale"] for r in records]
    assert skipped == [0, 0, 1, 1, 1, 1, 1, 1], skipped
    assert scales[:2] == [256.0, 256.0] and scales[2:] == [128.0] * 6, scales
    assert not np.isfinite(records[2]["loss"])
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-00000008"


def test_zero3_bf16_stopped_and_resumed(synth, tmp_path):
    """The shipped ZeRO-3 bf16 config (parameters partitioned, 16-bit weights gathered on save): stop
    with a checkpoint after step 30, resume from it, finish; the losses fall over the whole run, and
    the resumed steps give the uninterrupted run's losses (same seed; bf16 on a GPU, so within 1%)."""
    out = str(tmp_path / "stopped")
    args = [*LONG_RUN, "--data", synth, "--out", out, "--deepspeed", os.path.join(CONFIG_DIR, "zero3_bf16.json"),
            "--save-every", "0"]
    _train([*args, "--stop-after", "30"], ranks=1)
    assert max(_losses(out)) == 30
    done = _train(args, ranks=1)
    assert "resumed from" in done.stdout
    start = _start(out)
    assert (start["precision"], start["zero_stage"]) == ("bf16", 3)
    records = _steps(out)
    assert [r["step"] for r in records] == list(range(1, 61))
    _assert_ran_on_the_gpu(records)
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["skipped_steps"] == 0
    _assert_losses_fall(records)
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-00000060"
    uninterrupted = str(tmp_path / "uninterrupted")
    _train([uninterrupted if a == out else a for a in args], ranks=1)
    reference = _steps(uninterrupted)
    for resumed, expected in zip(records[30:], reference[30:]):
        for name in (*OBJECTIVES, "loss"):
            assert resumed[name] == pytest.approx(expected[name], rel=1e-2, abs=1e-3), (resumed["step"], name)
