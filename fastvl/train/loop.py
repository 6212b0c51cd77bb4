"""The pretraining loop: DeepSpeed engine, data position, checkpoints, logging, resumption.

DeepSpeed does what it does (ZeRO 0-3, bf16 / fp16 with dynamic loss scaling, gradient
accumulation to the configured global batch, clipping, optimizer and scheduler stepping,
checkpoint files); this module feeds it micro-batches and keeps the run resumable:

* every micro-batch reseeds torch's RNG from ``(seed, global step, chunk)``, so dropout depends on
  which samples a micro-batch holds, never on the rank or on when the process started;
* a checkpoint (``save_checkpoint`` every ``--save-every`` steps, and when SIGTERM arrives) stores
  the model, optimizer, scheduler and loss scaler (DeepSpeed), the data position in ``client_state``,
  every rank's python / numpy / torch RNG states (``rng-rank{R}.pt`` in the tag folder) and a
  manifest; ``latest`` is pointed at it last (:mod:`fastvl.train.checkpoint`, which also loads it
  back without unpickling anything but DeepSpeed's own types); resuming from ``latest`` continues
  with the next global batch, so a run killed at any moment continues exactly;
* one optimizer step is ``grad_accum`` calls of :meth:`Trainer.micro_step` (forward, backward,
  ``engine.step()``; losses summed by name in :class:`StepStatistics`) and one
  :meth:`Trainer.end_of_step` (reduce over ranks, divergence check, log, checkpoint);
* a non-finite loss stops a bf16 / fp32 run before anything is saved (the last good checkpoint
  stays ``latest``); fp16 steps with overflowing gradients are skipped by DeepSpeed's loss scaler
  and counted.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Iterator

import numpy as np
import torch

from fastvl.profiling import nvtx_range
from fastvl.train import checkpoint

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf in a bf16 or fp32 run."""


def micro_batch_seed(seed: int, global_step: int, chunk: int) -> int:
    return int(np.random.default_rng((seed, global_step, chunk, 0x5EED)).integers(2**62))


# RNG state ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """python / numpy / torch (and CUDA) RNG states as tensors and plain types (loadable weights_only)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    numpy_state = state["numpy"]["state"]
    state["numpy"]["state"] = {"key": torch.from_numpy(numpy_state["key"].astype(np.int64)), "pos": numpy_state["pos"]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                            "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Metrics --------------------------------------------------------------------------------------------


def memory_mib() -> dict:
    if torch.cuda.is_available():
        return {"gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def loss_scale(engine) -> float | None:
    optimizer = engine.optimizer
    for attribute in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attribute, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return None


class Logger:
    """Rank 0 writes one JSON object per logged step to OUT/log.jsonl, a line to stdout, and, when
    TensorBoard is installed, the step's numbers as scalars under OUT/tensorboard."""

    def __init__(self, path: str | None, enabled: bool):
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if enabled and path else None
        self.tensorboard = None
        if enabled and path:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                pass
            else:
                self.tensorboard = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))

    def event(self, record: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard is not None and "step" in record and "event" not in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if line:
            print(line, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class _SigtermFlag:
    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class _MicroBatches:
    """DataLoader batch sampler over this rank's micro-batches, in order: each "batch" is the one
    :class:`~fastvl.data.sampler.MicroBatch`, so the sampler is walked once and a collated batch
    arrives with its place in the run (see :class:`_Collate`)."""

    def __init__(self, sampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list]:
        return ([micro] for micro in self.sampler.iterate(self.start, self.stop))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.sampler.grad_accum


class _Identity(torch.utils.data.Dataset):
    def __getitem__(self, key):
        return key


class _Collate:
    """``[MicroBatch] -> (MicroBatch, collated batch of its keys)`` (picklable for worker processes)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list):
        (micro,) = items
        return micro, self.collator(micro.keys)


class StepStatistics:
    """Sums over the micro-batches of one optimizer step, by name: each objective's loss, the total
    ``loss``, ``micro_batches``, ``tokens`` and ``sigterm`` (whether SIGTERM arrived on a rank). One
    float64 vector underneath, so :meth:`finish` reduces them over the ranks in one all-reduce."""

    def __init__(self, objectives: tuple[str, ...]):
        self.objectives = tuple(objectives)
        self.names = (*self.objectives, "loss", "micro_batches", "tokens", "sigterm")
        self._sums = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, loss: torch.Tensor, losses: dict, tokens: int, sigterm: bool) -> None:
        values = {**{name: float(losses[name].detach()) for name in self.objectives}, "loss": float(loss.detach()),
                  "micro_batches": 1.0, "tokens": tokens, "sigterm": sigterm}
        self._sums += torch.tensor([values[name] for name in self.names], dtype=torch.float64)

    def finish(self, world_size: int) -> dict:
        """The step's totals over all ranks (``means``: per objective and ``loss``), then starts over."""
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(self._sums)
        count = self._sums[self.names.index("micro_batches")].item()
        totals = dict(zip(self.names, self._sums.tolist()))
        means = dict(zip((*self.objectives, "loss"), (self._sums[: len(self.objectives) + 1] / count).tolist()))
        self._sums.zero_()
        return {"means": means, "tokens": totals["tokens"], "stop_requested": totals["sigterm"] > 0}


class _LogWindow:
    """What the steps since the last log line add up to: samples, tokens, the sum of each step mean."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        self.losses = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, samples: int, tokens: float, means: dict) -> None:
        self.samples += samples
        self.tokens += tokens
        self.losses += torch.tensor([means[name] for name in self.names], dtype=torch.float64)


# The loop -------------------------------------------------------------------------------------------


class Trainer:
    """Runs ``total_steps`` optimizer steps of ``engine`` over ``sampler`` / ``collator``.

    ``family`` turns a batch into model inputs; ``out_dir`` receives ``log.jsonl`` and ``checkpoints/``.
    """

    def __init__(self, engine, family, sampler, collator, *, out_dir: str, total_steps: int, seed: int,
                 precision: str, log_every: int = 10, save_every: int = 0, keep_checkpoints: int = 2,
                 num_workers: int = 0, progress: bool = True, stop_after: int | None = None,
                 label: str = "pretrain"):
        import torch.distributed as dist

        self.engine = engine
        self.family = family
        self.sampler = sampler
        self.collator = collator
        self.out_dir = out_dir
        self.checkpoint_dir = os.path.join(out_dir, CHECKPOINT_DIR)
        self.total_steps = total_steps
        self.seed = seed
        self.precision = precision
        self.log_every = max(1, log_every)
        self.save_every = save_every
        self.keep_checkpoints = keep_checkpoints
        self.num_workers = num_workers
        self.stop_after = stop_after
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.logger = Logger(os.path.join(out_dir, LOG_FILE), self.rank == 0)
        self.progress = progress and self.rank == 0
        self.label = label  # the progress bar's description
        self.start_step = 0
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    # checkpoints ----------------------------------------------------------------------------------

    def run_settings(self) -> dict:
        """What a checkpoint of this run records and a resumed run must match (see
        :func:`fastvl.train.checkpoint.check_compatible`)."""
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return {"world_size": self.world_size, "zero_stage": int(self.engine.zero_optimization_stage()),
                "precision": self.precision, "family": getattr(self.family, "name", None), "parameters": parameters}

    def resume(self, trust: bool = False) -> bool:
        """Loads the newest whole checkpoint under ``checkpoints/`` if ``latest`` exists; returns whether
        it did. Files are loaded weights_only unless ``trust`` (see :mod:`fastvl.train.checkpoint`);
        raises :class:`~fastvl.train.checkpoint.CheckpointError` with a message for the user."""
        warn = print if self.rank == 0 else (lambda _: None)
        loaded = checkpoint.resume_latest(self.engine, self.checkpoint_dir, self.run_settings(), trust=trust,
                                          warn=warn)
        if loaded is None:
            return False
        tag_dir, client_state = loaded
        data = client_state["data"]
        try:
            self.sampler.check_resumable(data)
        except ValueError as error:
            raise checkpoint.IncompatibleCheckpoint(f"{tag_dir}: {error}") from None
        self.start_step = int(data["global_step"])
        rng_file = os.path.join(tag_dir, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(checkpoint.load_weights_only(rng_file))
        self.logger.event({"event": "resume", "step": self.start_step, "checkpoint": tag_dir},
                          f"resumed from {tag_dir} at step {self.start_step}")
        return True

    def save(self, global_step: int) -> str:
        """Writes checkpoint ``step-N`` (RNG states, DeepSpeed's files, the manifest), then points
        ``latest`` at it. A full disk raises :class:`~fastvl.train.checkpoint.DiskFull` with ``latest``
        still on the previous checkpoint and the partial folder removed."""
        tag = checkpoint.tag_name(global_step)
        tag_dir = os.path.join(self.checkpoint_dir, tag)
        try:
            os.makedirs(tag_dir, exist_ok=True)
            torch.save(rng_state(), os.path.join(tag_dir, f"rng-rank{self.rank}.pt"))
            client_state = {"data": self.sampler.state_dict(global_step), "seed": self.seed}
            self.engine.save_checkpoint(self.checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
            if self.rank == 0:  # DeepSpeed's save ends with a barrier: every rank's files are written
                checkpoint.write_manifest(tag_dir, self.run_settings())
                checkpoint.write_latest(self.checkpoint_dir, tag)
        except (OSError, RuntimeError) as error:
            if not checkpoint.is_disk_full(error, self.checkpoint_dir):
                raise
            checkpoint.remove_partial(tag_dir)
            kept = checkpoint.read_latest(self.checkpoint_dir)
            raise checkpoint.DiskFull(f"no space left on device writing checkpoint {tag_dir}; latest still names "
                                      f"{kept!r}, the last whole checkpoint. Free space, then run the same command "
                                      "again to resume.") from None
        if self.rank == 0:
            self._prune(tag)
        self.logger.event({"event": "checkpoint", "step": global_step, "path": tag_dir})
        return tag_dir

    def _prune(self, newest: str) -> None:
        tags = sorted(t for t in checkpoint.kept_tags(self.checkpoint_dir) if t != newest)
        for tag in tags[: max(0, len(tags) - (self.keep_checkpoints - 1))]:
            shutil.rmtree(os.path.join(self.checkpoint_dir, tag), ignore_errors=True)

    # training -------------------------------------------------------------------------------------

    def _to_device(self, value):
        """Moves a batch tensor to the engine's device; floats in the engine's precision (DeepSpeed
        casts the parameters, not the inputs)."""
        if not isinstance(value, torch.Tensor):
            return value
        dtype = self.input_dtype if value.is_floating_point() else value.dtype
        return value.to(self.engine.device, dtype=dtype, non_blocking=True)

    def _loader(self, stop: int):
        return torch.utils.data.DataLoader(_Identity(), batch_sampler=_MicroBatches(self.sampler, self.start_step, stop),
                                           collate_fn=_Collate(self.collator), num_workers=self.num_workers,
                                           persistent_workers=False, prefetch_factor=4 if self.num_workers else None)

    def micro_step(self, micro, batch: dict) -> None:
        """Forward, backward and ``engine.step()`` (DeepSpeed steps the optimizer at the last micro-batch
        of a global batch) of one micro-batch; its losses go into ``self.statistics``."""
        torch.manual_seed(micro_batch_seed(self.seed, micro.global_step, micro.chunk))
        inputs = {k: self._to_device(v) for k, v in self.family.model_inputs(batch).items()}
        if self.family.step_inputs is not None:  # e.g. ALBEF: distillation ramp, place in the step
            inputs.update(self.family.step_inputs(micro, self.sampler))
        with nvtx_range("forward"):
            loss, losses = self.family.losses(self.engine(**inputs))
        with nvtx_range("backward"):
            self.engine.backward(loss)
        with nvtx_range("step"):
            self.engine.step()
        self.statistics.add(loss, losses, batch["num_tokens"], self._sigterm.raised)

    def end_of_step(self, micro, stop: int) -> bool:
        """After the last micro-batch of optimizer step ``micro.global_step``: reduce the statistics, stop
        on a non-finite loss, log, checkpoint. Returns whether to stop (SIGTERM)."""
        global_step = micro.global_step + 1
        step = self.statistics.finish(self.world_size)
        means, objectives = step["means"], self.family.objectives
        self._window.add(self.sampler.global_batch, step["tokens"], means)
        if not math.isfinite(means["loss"]) and self.precision != "fp16":
            kept = checkpoint.read_latest(self.checkpoint_dir) or "none"
            raise TrainingDiverged(
                f"loss is {means['loss']} at step {global_step} ({self.precision}); stopping without saving. "
                f"The last good checkpoint is {kept!r} in {self.checkpoint_dir}. Lower the learning rate, "
                "raise the warm-up or gradient clipping, or check the data.")
        self.last = {"step": global_step, "loss": means["loss"], **{name: means[name] for name in objectives}}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{means['loss']:.3f}", refresh=False)
        if global_step % self.log_every == 0 or global_step == stop:
            self._log(global_step, micro.epoch)
        if step["stop_requested"] or (self.save_every and global_step % self.save_every == 0) or global_step == stop:
            with nvtx_range("checkpoint"):
                path = self.save(global_step)
            if step["stop_requested"]:
                self.logger.event({"event": "sigterm", "step": global_step, "checkpoint": path},
                                  f"SIGTERM: saved {path}; stopping")
                return True
        return False

    def _log(self, global_step: int, epoch: int) -> None:
        window, objectives = self._window, self.family.objectives
        elapsed = time.perf_counter() - window.start
        window_steps = window.samples // self.sampler.global_batch
        mean = dict(zip(window.names, (window.losses / window_steps).tolist()))
        record = {**self.last, "window_mean": mean, "window_steps": window_steps, "epoch": epoch,
                  "lr": self.engine.get_lr()[0],
                  "loss_scale": loss_scale(self.engine), "skipped_steps": int(self.engine.skipped_steps),
                  "samples_per_s": round(window.samples / elapsed, 2),
                  "tokens_per_s": round(window.tokens / elapsed, 1), **memory_mib()}
        # stdout: each loss averaged over the steps since the last line (the JSONL keeps both)
        text = " ".join(f"{k}={mean[k]:.4f}" for k in ("loss", *objectives))
        self.logger.event(record, f"step {global_step}/{self.total_steps} {text} (mean of {window_steps}) "
                                  f"lr={record['lr']:.3g} {record['samples_per_s']} samples/s "
                                  f"{record['tokens_per_s']} tokens/s")
        window.reset()

    def train(self) -> dict:
        """Trains from ``start_step`` to ``total_steps`` (or ``stop_after``); returns the last step's losses."""
        stop = self.total_steps if self.stop_after is None else min(self.total_steps, self.stop_after)
        objectives = self.family.objectives
        self.statistics = StepStatistics(objectives)
        self._window = _LogWindow((*objectives, "loss"))
        self._sigterm = _SigtermFlag()
        self._bar = None
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.label, unit="step",
                             dynamic_ncols=True)
        self.last = {}
        self.engine.train()
        batches = iter(self._loader(stop))
        try:
            while True:
                with nvtx_range("data"):
                    item = next(batches, None)
                if item is None:
                    break
                micro, batch = item
                self.micro_step(micro, batch)
                if micro.micro_step + 1 == self.sampler.grad_accum and self.end_of_step(micro, stop):
                    break
        finally:
            self._sigterm.restore()
            if self._bar is not None:
                self._bar.close()
            self.logger.close()
        return self.last
