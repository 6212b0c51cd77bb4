"""``fastvl bench model``: whole-model pretraining throughput, fused backends vs ``backend="reference"``.

For each backend the same model (same seed, so the same weights), the same synthetic batch and the same
precision run AdamW training steps; a step is split into forward, backward and optimizer with CUDA
events on GPU (wall clock on CPU), and the median step gives samples/s and tokens/s (text tokens plus
regions or image patches per sample, padded positions included). Peak memory = parameters, buffers and
optimizer state + the step's own peak (gradients and activations; see :mod:`fastvl.bench.harness` for how it
is measured on each device). The largest batch that fits is searched per backend by doubling and then
bisecting (to within 1/32): a batch fits when a training step runs without running out of memory and its
peak memory is within ``--memory-cap-gb`` (default: the GPU's memory; 4 GiB on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

import fastvl
from fastvl import profiling
from fastvl.bench import harness
from fastvl.bench.workloads import WORKLOADS, Workload

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("fused", "reference", "compiled-reference")
DEFAULT_BACKENDS = ("fused", "reference")


@contextlib.contextmanager
def backend_scope(backend: str):
    """``fused``: fastvl's default dispatch (fastest backend per op); ``reference``: every op eager;
    ``compiled-reference``: every op eager, the model under ``torch.compile`` (a user's alternative)."""
    if backend in ("reference", "compiled-reference"):
        with fastvl.use_backend("reference"):
            yield
    else:
        yield


class Trainer:
    """One model + AdamW + batch under one backend and precision; ``step()`` returns phase times (ms)."""

    def __init__(self, spec: Workload, backend: str, batch_size: int, device: torch.device, precision: str,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.model = spec.build().to(device).train()
        self.forward_model = torch.compile(self.model) if backend == "compiled-reference" else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.spec, self.seed, self.backend, self.device = spec, seed, backend, device
        self.autocast_dtype = PRECISIONS[precision]
        self.set_batch(batch_size)

    def set_batch(self, batch_size: int) -> None:
        """A fresh synthetic batch (the same for a given seed and size)."""
        if not self.spec.batch_ok(batch_size):
            raise ValueError(f"batch size {batch_size} is not one this model accepts")
        self.batch = self.spec.make_batch(batch_size, torch.Generator().manual_seed(self.seed), self.device)

    def release(self) -> None:
        """Drops the batch and gradients (and the allocator's cache on GPU), e.g. after running out of memory."""
        self.batch = None
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.spec.loss(self.forward_model(**self.batch))

    def step(self) -> tuple[float, float, float]:
        with backend_scope(self.backend):
            marks = [_Mark(self.device)]
            loss = self._forward()
            marks.append(_Mark(self.device))
            loss.backward()
            marks.append(_Mark(self.device))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            marks.append(_Mark(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return tuple(a.elapsed_ms(b) for a, b in zip(marks, marks[1:]))

    def persistent_bytes(self) -> int:
        """Parameters, buffers (ALBEF's queues) and optimizer state (gradients count in the step's peak)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def peak_bytes(self) -> int:
        return self.persistent_bytes() + harness.peak_memory(self.step, self.device)


def _free(device: torch.device) -> None:
    """Returns a finished trainer's memory (and, on GPU, the allocator's cached blocks) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Mark:
    """A point in time: a recorded CUDA event on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.event, self.time = None, time.perf_counter()

    def elapsed_ms(self, later: _Mark) -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return (later.time - self.time) * 1e3


# Besides torch.OutOfMemoryError, libraries that allocate their own workspace report running out of
# memory as a RuntimeError with their status name.
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                           "CUDA_ERROR_OUT_OF_MEMORY")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in _OUT_OF_MEMORY_MESSAGES)


def largest_batch(trainer: Trainer, cap: int, limit: int, start: int = 1) -> int:
    """The largest batch size <= ``limit`` whose training step fits in ``cap`` bytes (0 if none does):
    doubling from ``start``, then bisecting (over the sizes the model accepts) until the bracket is within
    1/32 of the answer (so the result may be up to ~3% short of the true largest). One model per backend
    serves every probe."""

    def fits(batch_size: int) -> bool:
        trainer.set_batch(batch_size)
        try:
            return trainer.peak_bytes() <= cap
        except RuntimeError as error:
            if is_out_of_memory(error):
                return False
            raise
        finally:
            trainer.release()

    allowed = trainer.spec.batch_ok

    def next_allowed(size: int) -> int:  # the smallest accepted size >= size (limit + 1 if none)
        return next((n for n in range(size, limit + 1) if allowed(n)), limit + 1)

    low, high = 0, next_allowed(max(1, start))
    while high <= limit and fits(high):
        low, high = high, next_allowed(high * 2)
    while high - low > max(1, low // 32):  # low fits (or is 0), high does not (or is past the limit)
        inside = [n for n in range(low + 1, high) if allowed(n)]
        if not inside:
            break
        middle = inside[len(inside) // 2]
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="vilbert-base")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes to time (default: 64 on GPU, 8 on CPU, 2 with --quick)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(DEFAULT_BACKENDS),
                        help="compiled-reference: the reference under torch.compile (slow to compile)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (default: 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packed", action="store_true", help="also run every backend on the same samples packed "
                        "(cu_seqlens, no padding; variant BACKEND+packed; ViLBERT)")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="memory a batch may use in the search (default: the GPU's memory, 4 on CPU)")
    parser.add_argument("--max-batch-limit", type=int, default=None,
                        help="stop the search here (default: 4096 on GPU, 256 on CPU)")


def run(args: argparse.Namespace, device: torch.device, out_dir: Path) -> int:
    spec = WORKLOADS[args.model]()
    gpu = device.type == "cuda"
    batches = args.batch or [2 if args.quick else 64 if gpu else 8]
    precision = args.precision or ("bf16" if gpu else "fp32")
    steps = args.steps or (10 if gpu else 2 if args.quick else 3)
    results = harness.Results(f"model-{args.model}", device, quick=args.quick, note=args.note)
    results.env.update(model=args.model, precision=precision, seed=args.seed)
    name = f"{args.model} train step"
    tokens = spec.tokens
    layouts = {"": spec, "+packed": spec.packed()} if args.packed else {"": spec}
    points = [(b, k, layout) for b in batches for k in args.backends for layout in layouts]
    interrupted = False
    for batch_size, backend, layout in harness.progress(points, args.model):
        try:
            trainer = Trainer(layouts[layout], backend, batch_size, device, precision, seed=args.seed)
            for _ in range(args.warmup):
                trainer.step()
            phases = [trainer.step() for _ in range(steps)]
            peak_mb = trainer.peak_bytes() / 2**20
        except KeyboardInterrupt:  # a time limit (the GPU suite's timeout sends SIGINT): keep what was measured
            interrupted = True
            results.failures.append(f"interrupted at {backend}{layout}, batch {batch_size}")
            break
        except Exception as error:  # e.g. out of memory: the other points still count
            results.failures.append(f"{backend}{layout} at batch {batch_size}: FAILED {type(error).__name__}: "
                                    f"{str(error).splitlines()[0][:200]}")
            continue
        finally:
            trainer = None
            _free(device)
        timing = harness.Timing.of([sum(p) for p in phases])
        median = timing.median_ms
        results.add(timing, name=name, variant=backend + layout, params={"batch": batch_size, **spec.shape,
                                                        "precision": precision},
                    dtype=PRECISIONS[precision] or torch.float32,
                    forward_ms=statistics.median(p[0] for p in phases),
                    backward_ms=statistics.median(p[1] for p in phases),
                    optimizer_ms=statistics.median(p[2] for p in phases),
                    samples_per_s=batch_size / (median * 1e-3), tokens_per_s=batch_size * tokens / (median * 1e-3),
                    peak_mem_mb=peak_mb, steps=steps)
    document = results.to_json(["reference"])
    path = out_dir / f"model-{args.model}.json"
    harness.write_json(path, document)  # the timings are safe even if the search below is cut short
    if not args.no_max_batch and not interrupted:
        cap = int((args.memory_cap_gb or (torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else 4))
                  * 2**30)
        limit = args.max_batch_limit or (4096 if gpu else 256)
        document["max_batch"] = {}
        for backend in harness.progress(args.backends, "largest batch"):
            try:
                trainer = Trainer(spec, backend, min(batches), device, precision, seed=args.seed)
                document["max_batch"][backend] = largest_batch(trainer, cap, limit, start=min(batches))
            except KeyboardInterrupt:
                results.failures.append(f"largest-batch search interrupted at {backend}")
                break
            except Exception as error:  # reported, the other backend's search still runs
                results.failures.append(f"largest-batch search, {backend}: FAILED {type(error).__name__}: "
                                        f"{str(error).splitlines()[0][:200]}")
            finally:
                trainer = None
                _free(device)
        document["max_batch_search"] = {"cap_bytes": cap, "limit": limit}
    _print_summary(results, document)
    for failure in results.failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"wrote {harness.write_json(path, document)}")
    if not args.no_plots:
        plots = [(results.rows, "samples_per_s", "samples/s"), (results.rows, "peak_mem_mb", "peak memory (MiB)"),
                 (document["ratios"], "speedup", "speed-up over reference")]
        for rows, y, label in plots:
            if not rows:
                continue
            path = harness.plot(rows, out_dir / f"model-{args.model}-{y}.png", x="batch", y=y,
                                title=f"{args.model} training step ({precision}): {label}", env=results.env)
            if path is not None:
                print(f"wrote {path}")
    return 1 if results.failures else 0


def profile_step(args: argparse.Namespace, device: torch.device, out_dir: Path, top: int = 30) -> dict:
    """torch.profiler over one fused training step (after warm-up): the ``top`` kernels by their own
    device time (CPU ops by their own CPU time on CPU) and each layer's forward time (its range from
    :func:`fastvl.profiling.annotate`), as ``profile-<model>.json`` and ``.txt``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    spec = WORKLOADS[args.model]()
    batch_size = (args.batch or [2 if args.quick else 64 if gpu else 8])[0]
    precision = args.precision or ("bf16" if gpu else "fp32")
    trainer = Trainer(spec, "fused", batch_size, device, precision, seed=args.seed)
    for _ in range(max(1, args.warmup)):
        trainer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=False) as prof, profiling.annotate(trainer.model):
        trainer.step()
    averages = prof.key_averages()
    layer_names = set(profiling.layer_modules(trainer.model))

    def is_range(key: str) -> bool:  # annotate()'s ranges: layers and fastvl op calls
        return key in layer_names or key.startswith("op ")

    # forward time per layer: its kernels' device time on GPU, its CPU time on CPU. On GPU a range shows
    # twice (the CPU range, and its span on the GPU timeline as a user annotation): keep the CPU one.
    layers = {e.key: (e.device_time_total if gpu else e.cpu_time_total) for e in averages
              if e.key in layer_names and e.device_type == DeviceType.CPU}
    if gpu:  # kernels only (the CPU ops that launched them, and the ranges, would count their time twice)
        events = [e for e in averages if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
                  and not is_range(e.key)]
        own_time = {e.key: e.self_device_time_total for e in events}
    else:  # ops only (a range's own time is the Python between its ops)
        events = [e for e in averages if not is_range(e.key)]
        own_time = {e.key: e.self_cpu_time_total for e in events}
    total = sum(own_time.values()) or 1.0
    ranked = sorted(events, key=lambda e: own_time[e.key], reverse=True)[:top]
    env = harness.environment(device)
    document = {"schema": harness.SCHEMA_VERSION, "env": {**env, "model": args.model, "precision": precision,
                                                           "batch": batch_size},
                "measure": "self device time of each kernel" if gpu else "self CPU time of each op",
                "total_us": total,
                "top": [{"name": e.key, "calls": e.count, "self_us": own_time[e.key],
                         "percent": 100 * own_time[e.key] / total} for e in ranked],
                "forward_us_per_layer": layers}
    path = harness.write_json(out_dir / f"profile-{args.model}.json", document)
    sort_by = "self_device_time_total" if gpu else "self_cpu_time_total"
    (out_dir / f"profile-{args.model}.txt").write_text(averages.table(sort_by=sort_by, row_limit=top) + "\n")
    print(f"top {min(top, len(ranked))} of one {args.model} training step ({precision}, batch {batch_size}, "
          f"{document['measure']}):")
    for item in document["top"][:15]:
        print(f"  {item['percent']:5.1f}%  {item['self_us'] / 1e3:9.3f} ms  x{item['calls']:<5} {item['name'][:90]}")
    slowest = sorted(layers.items(), key=lambda kv: kv[1], reverse=True)[:5]
    print("slowest layers (forward): " + ", ".join(f"{name} {us / 1e3:.3f} ms" for name, us in slowest))
    print(f"wrote {path}")
    return document


def _print_summary(results: harness.Results, document: dict) -> None:
    header = f"{'backend':<10} {'batch':>5} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'optim':>8} {'samples/s':>10} " \
             f"{'tokens/s':>10} {'peak MiB':>9}"
    print(f"\n== {results.suite} on {results.env['device']} ({results.env['precision']}) ==\n{header}")
    for row in results.rows:
        print(f"{row['variant']:<10} {row['params']['batch']:>5} {row['median_ms']:>9.2f} {row['forward_ms']:>8.2f} "
              f"{row['backward_ms']:>8.2f} {row['optimizer_ms']:>8.2f} {row['samples_per_s']:>10.1f} "
              f"{row['tokens_per_s']:>10.0f} {row['peak_mem_mb']:>9.1f}")
    for ratio in document["ratios"]:
        print(f"{ratio['variant']} vs {ratio['baseline']} at batch {ratio['params']['batch']}: "
              f"{ratio['speedup']:.2f}x samples/s, {ratio.get('memory_ratio', float('nan')):.2f}x peak memory")
    if "max_batch" in document:
        sizes = document["max_batch"]
        cap_gib = document["max_batch_search"]["cap_bytes"] / 2**30
        limit = document["max_batch_search"]["limit"]
        print(f"largest batch that fits in {cap_gib:.3g} GiB: "
              + ", ".join(f"{k} {v}" + (" (the search limit)" if v == limit else "") for k, v in sizes.items()))
