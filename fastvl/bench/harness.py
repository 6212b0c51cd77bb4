"""The one benchmark harness: timing, peak memory, device peaks and floors, tagged rows, JSON and plots.

Timing
    GPU: ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before every timed run, warm-up
    and repetition by time budget); we keep its median and 20th/80th percentiles.
    CPU: wall-clock (``time.perf_counter``) over repeated calls after a warm-up, same three statistics.

Comparing variants (:func:`interleaved`, :meth:`Results.compare`)
    Variants of one shape are timed in rounds, each round calling every variant once in an order that
    rotates and reverses from round to round, until a time budget is spent (with a minimum and maximum
    number of rounds). Load from other processes then falls on all variants alike, and the ratio of two
    variants is taken per round (paired): a row's speed-up over a baseline is the median of its per-round
    ratios with a distribution-free 95% confidence interval of that median (order statistics of the
    binomial), not the ratio of two medians timed minutes apart. Where the interval holds 1 (or the
    difference is under ``TIE_MARGIN``) the verdict is "within noise". On a GPU each round's sample is a
    short ``do_bench`` median. The load average before and after each comparison goes into the row.

Peak memory (bytes allocated during one call, on top of what was alive before it)
    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
    allocated before the call.
    CPU: torch has no CPU allocator statistics, so :class:`TensorMemoryTracker` counts tensor storage:
    a ``TorchDispatchMode`` sees every op (forward, backward and optimizer ops alike), adds the storage of
    each output that does not alias an input, and subtracts it when that storage is freed. The peak of
    that running sum is the number reported. Scratch memory an op allocates and frees inside itself (a
    C++ kernel's workspace) is not seen; everything that crosses an op boundary is.

Peaks and floors
    GPU: nominal dense TFLOP/s per dtype and HBM GB/s for A100 / H100 / H200 by device name, plus a
    measured copy bandwidth. CPU: measured copy bandwidth and measured matmul TFLOP/s. A benchmark that
    states its FLOPs and bytes gets "floors": the time the work would take at those peaks.

Rows
    One dict per (benchmark, shape, variant): name, variant, params, median/p20/p80 in ms, peak memory,
    FLOPs, bytes, achieved TFLOP/s and GB/s, % of peak. :class:`Results` collects them with the
    environment (device, versions, git commit, date), computes ratios between variants measured in the
    same run, prints a table, writes JSON, and :func:`plot` draws PNGs from saved rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Timing -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> Timing:
        ordered = sorted(times_ms)
        return cls(statistics.median(ordered), _quantile(ordered, 0.2), _quantile(ordered, 0.8))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            grad_to_none: Sequence[torch.Tensor] | None = None, min_reps: int = 5, max_reps: int = 10_000) -> Timing:
    """Times ``fn()`` on ``device``; ``grad_to_none`` tensors get ``.grad = None`` before each call."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing  # only where there is a GPU

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                   quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)

    def call() -> float:
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    call()  # the first call pays for lazy initialisation
    estimate = max(call(), 1e-3)  # sizes the warm-up and the repetitions
    for _ in range(min(max_reps, int(warmup_ms / estimate))):
        call()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    return Timing.of([call() for _ in range(reps)])


# Interleaved comparisons --------------------------------------------------------------------------

TIE_MARGIN = 0.02  # paired speed-ups within 1 +- 2% count as "within noise" even when the interval excludes 1
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long :func:`interleaved` times one shape: warm-up, then rounds until ``budget_ms`` of wall
    time (all variants together) and at least ``min_rounds``, at most ``max_rounds``. The CPU default
    finishes an attention shape of the CPU suite in ~4 s."""

    budget_ms: float = 4000.0
    warmup_ms: float = 200.0
    min_rounds: int = 10
    max_rounds: int = 200

    @classmethod
    def quick(cls) -> Budget:
        return cls(budget_ms=60.0, warmup_ms=10.0, min_rounds=3, max_rounds=50)

    @classmethod
    def gpu(cls) -> Budget:
        """GPU timings (``do_bench`` per sample, the L2 flushed) are steady: a few short rounds."""
        return cls(budget_ms=300.0, warmup_ms=25.0, min_rounds=5, max_rounds=50)

    @classmethod
    def of(cls, quick: bool = False, budget_ms: float | None = None, device: torch.device | str = "cpu") -> Budget:
        """The default budget of ``device`` (or the quick one), with ``budget_ms`` where given."""
        default = cls.quick() if quick else cls.gpu() if torch.device(device).type == "cuda" else cls()
        return default if budget_ms is None else dataclasses.replace(default, budget_ms=budget_ms)


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: rotated by the round, reversed every other pass, so every
    variant runs first, last and next to every other one equally often."""
    n = len(names)
    rotated = [names[(i + round_index) % n] for i in range(n)]
    return rotated[::-1] if (round_index // n) % 2 else rotated


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, budget: Budget = Budget(), *,
                grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None) -> dict[str, list[float]]:
    """{name: per-round milliseconds} of every callable, timed round-robin (see the module docstring).
    Entry ``i`` of every list comes from the same round."""
    device = torch.device(device)
    names = list(fns)
    grad_to_none = grad_to_none or {}

    def sample(name: str, rep_ms: float) -> float:
        if device.type == "cuda":
            import triton.testing  # only where there is a GPU

            return triton.testing.do_bench(fns[name], warmup=1, rep=rep_ms, grad_to_none=grad_to_none.get(name),
                                           return_mode="median")
        for tensor in grad_to_none.get(name, ()):
            tensor.grad = None
        start = time.perf_counter()
        fns[name]()
        return (time.perf_counter() - start) * 1e3

    rep_ms = max(1.0, budget.budget_ms / max(1, budget.min_rounds * len(names)))  # GPU: one sample's budget
    start = time.perf_counter()
    for name in names:  # lazy initialisation, and an estimate of a round's wall time
        sample(name, rep_ms)
    round_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    warmup_rounds = max(1, min(budget.max_rounds, int(budget.warmup_ms / round_ms)))
    for index in range(warmup_rounds):
        for name in round_order(names, index):
            sample(name, rep_ms)
    times: dict[str, list[float]] = {name: [] for name in names}
    start, index = time.perf_counter(), 0
    while index < budget.max_rounds and (index < budget.min_rounds
                                         or (time.perf_counter() - start) * 1e3 < budget.budget_ms):
        for name in round_order(names, index):
            times[name].append(sample(name, rep_ms))
        index += 1
    return times


def median_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, low, high): the median and a distribution-free confidence interval for it, the order
    statistics ``j`` and ``n-1-j`` with ``P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2``."""
    ordered = sorted(values)
    n = len(ordered)
    tail, j = 0.0, 0
    while j < n // 2:
        tail += math.comb(n, j) / 2**n  # P(Binomial < j + 1)
        if tail > (1 - confidence) / 2:
            break
        j += 1
    return statistics.median(ordered), ordered[j], ordered[n - 1 - j]


def paired_speedup(baseline_ms: Sequence[float], variant_ms: Sequence[float]) -> dict:
    """Speed-up of a variant over a baseline timed in the same rounds: per-round ``baseline / variant``,
    its median, confidence interval and verdict ("faster", "slower" or "within noise")."""
    if len(baseline_ms) != len(variant_ms) or not baseline_ms:
        raise ValueError("paired_speedup wants per-round times of the same rounds")
    median, low, high = median_ci([b / v for b, v in zip(baseline_ms, variant_ms)])
    verdict = ("faster" if low > 1.0 and median > 1.0 + TIE_MARGIN else
               "slower" if high < 1.0 and median < 1.0 - TIE_MARGIN else "within noise")
    return {"speedup": median, "ci95": [low, high], "verdict": verdict, "rounds": len(baseline_ms)}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# Peak memory --------------------------------------------------------------------------------------


class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the ``with`` block and alive at once (CPU
    peak memory; see the module docstring). ``peak`` and ``current`` are in bytes."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated by one call of ``fn()`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


# Device peaks -------------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core TFLOP/s per dtype and HBM GB/s, from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(), most specific first.
_GPU_PEAKS: list[tuple[str, dict[str, float], float]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.5, "float32": 67.0, "float8": 1979.0}, 4800.0),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "tf32": 418.0, "float32": 60.0, "float8": 1670.0}, 3900.0),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0, "float8": 1513.0}, 2000.0),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.5, "float32": 67.0, "float8": 1979.0}, 3350.0),
    ("A100 80GB PCIe", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}, 1935.0),
    ("A100-SXM4-80GB", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}, 2039.0),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}, 1555.0),
]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {_cpu_model()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nominal_peaks(name: str) -> tuple[dict[str, float], float] | None:
    """(TFLOP/s per dtype name, HBM GB/s) from the data sheet of a known GPU, else None."""
    for key, tflops, gbps in _GPU_PEAKS:
        if key in name:
            return tflops, gbps
    return None


@functools.lru_cache(maxsize=None)
def measured_bandwidth_gbps(device: str = "cpu", megabytes: int | None = None) -> float:
    """Copy bandwidth in GB/s (read + write bytes counted), median of repeated ``dst.copy_(src)``.
    Default buffer: 1 GiB on GPU (well past L2), 128 MiB on CPU (past the last-level cache)."""
    torch_device = torch.device(device)
    megabytes = megabytes or (1024 if torch_device.type == "cuda" else 128)
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=torch_device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), torch_device, warmup_ms=20, rep_ms=100, min_reps=3)
    return 2 * src.numel() / (timing.median_ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None) -> float:
    """Achieved TFLOP/s of a square ``size`` matmul in ``dtype`` (default 1024 on CPU, 8192 on GPU)."""
    torch_device = torch.device(device)
    size = size or (8192 if torch_device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=torch_device).to(dtype)
    b = torch.randn(size, size, device=torch_device).to(dtype)
    timing = time_fn(lambda: a @ b, torch_device, warmup_ms=20, rep_ms=100, min_reps=3)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


@dataclasses.dataclass(frozen=True)
class Peak:
    """The roofline a row is measured against."""

    tflops: float
    gbps: float
    source: str  # "nominal" (data sheet) or "measured"


def device_peak(device: torch.device | str, dtype: torch.dtype) -> Peak:
    """Compute and bandwidth peak for ``dtype`` on ``device``: the data sheet for known GPUs (fp32 means
    non-tensor-core fp32, as torch's default disallows TF32 matmuls), else measured here."""
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    known = nominal_peaks(device_name(device)) if device.type == "cuda" else None
    if known is not None and dtype_name in known[0]:
        return Peak(known[0][dtype_name], known[1], "nominal")
    return Peak(measured_matmul_tflops(str(device), dtype), measured_bandwidth_gbps(str(device)), "measured")


def floors_us(flops: float | None, nbytes: float | None, peak: Peak) -> dict[str, float]:
    """Lower bounds on the time in microseconds: FLOPs at the compute peak, bytes at the bandwidth."""
    floors = {}
    if flops:
        floors["flop_floor_us"] = flops / (peak.tflops * 1e12) * 1e6
    if nbytes:
        floors["byte_floor_us"] = nbytes / (peak.gbps * 1e9) * 1e6
    return floors


def describe_floors(flops: float | None, nbytes: float | None, peak: Peak) -> str:
    """One line, e.g. ``floor: 12.3 us at 989 TFLOP/s (compute), 4.1 us at 3350 GB/s (memory)``."""
    floors = floors_us(flops, nbytes, peak)
    parts = []
    if "flop_floor_us" in floors:
        parts.append(f"{floors['flop_floor_us']:.1f} us at {peak.tflops:.4g} TFLOP/s (compute)")
    if "byte_floor_us" in floors:
        parts.append(f"{floors['byte_floor_us']:.1f} us at {peak.gbps:.4g} GB/s (memory)")
    return "floor: " + ", ".join(parts) + f" [{peak.source} peak]" if parts else "floor: no FLOP/byte count given"


# Environment --------------------------------------------------------------------------------------


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for local changes), or None where git or the repo is absent.
    ``FASTVL_GIT_COMMIT`` names it where the tree was copied without its ``.git`` (a lent GPU machine)."""
    if os.environ.get("FASTVL_GIT_COMMIT"):
        return os.environ["FASTVL_GIT_COMMIT"]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str) -> dict:
    """The tags every result carries: device, versions, commit, date (UTC)."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "fastvl": _package_version("fastvl"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": load_average(),
    }


# Rows and results ---------------------------------------------------------------------------------


def progress(iterable: Iterable, description: str, total: int | None = None):
    """A tqdm bar on stderr for sweeps (silent when stderr is not a terminal; none without tqdm, as on a
    GPU box where fastvl was installed with --no-deps)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable

    return tqdm(iterable, desc=description, total=total, file=sys.stderr, leave=False, disable=None)


class Results:
    """Rows of one benchmark run on one device, with the run's environment.

    ``measure`` times a callable and appends a row; ``ratios`` compares variants of the same benchmark and
    params; ``table`` formats them; ``save`` writes ``<stem>.json`` (and plots via :func:`plot`).
    """

    def __init__(self, suite: str, device: torch.device | str, *, quick: bool = False, note: str | None = None):
        self.suite = suite
        self.device = torch.device(device)
        self.quick = quick
        self.env = environment(self.device)
        if note:
            self.env["note"] = note
        self.rows: list[dict] = []
        self.comparisons = 0  # interleaved groups timed so far (rows of one group share its number)
        self.failures: list[str] = []  # variants that raised: named in the JSON, not silently dropped

    def measure(self, fn: Callable[[], object], *, name: str, variant: str, params: dict | None = None,
                dtype: torch.dtype = torch.float32, flops: float | None = None, nbytes: float | None = None,
                grad_to_none: Sequence[torch.Tensor] | None = None, memory: bool = True, **extra) -> dict:
        """Times ``fn`` (and its peak memory unless ``memory=False``) and appends the row.

        ``flops`` / ``nbytes``: the work of one call (state the formula in the benchmark), used for
        achieved TFLOP/s, GB/s, % of peak and the floors. ``extra`` keys are stored in the row as given.
        """
        budget = {"warmup_ms": 5.0, "rep_ms": 20.0, "min_reps": 3} if self.quick else {}
        timing = time_fn(fn, self.device, grad_to_none=grad_to_none, **budget)
        row = self._timed_row(timing, name=name, variant=variant, params=params, dtype=dtype, flops=flops,
                              nbytes=nbytes)
        if memory:
            for tensor in grad_to_none or ():
                tensor.grad = None
            row["peak_mem_mb"] = peak_memory(fn, self.device) / 2**20
        row.update(extra)
        return row

    def compare(self, variants: dict[str, Callable[[], object]], *, name: str, params: dict | None = None,
                baseline: str | None = None, dtype: torch.dtype = torch.float32, flops: float | None = None,
                nbytes: float | None = None, grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None,
                budget: Budget | None = None, memory: bool = True,
                extra: dict[str, dict] | None = None) -> list[dict]:
        """Times ``variants`` ({variant: callable}) of one shape interleaved (:func:`interleaved`) and
        appends one row per variant. Every row keeps its per-round times (``rounds_ms``) and, when
        ``baseline`` is one of the variants, the paired speed-up over it (``vs_baseline``). ``extra``:
        {variant: keys stored in that row}."""
        budget = budget or Budget.of(self.quick, device=self.device)
        load_before = load_average()
        times = interleaved(variants, self.device, budget, grad_to_none=grad_to_none)
        load = {"load_before": load_before, "load_after": load_average()}
        self.comparisons += 1
        rows = []
        for variant, samples in times.items():
            timing = Timing.of(samples)
            row = self._timed_row(timing, name=name, variant=variant, params=params, dtype=dtype, flops=flops,
                                  nbytes=nbytes)
            row.update(comparison=self.comparisons, rounds=len(samples),
                       spread_pct=100 * (timing.p80_ms - timing.p20_ms) / timing.median_ms,
                       rounds_ms=[float(f"{t:.4g}") for t in samples], **load)
            if baseline in times and variant != baseline:
                row["vs_baseline"] = {"baseline": baseline, **paired_speedup(times[baseline], samples)}
            if memory:
                for tensor in (grad_to_none or {}).get(variant, ()):
                    tensor.grad = None
                row["peak_mem_mb"] = peak_memory(variants[variant], self.device) / 2**20
            row.update((extra or {}).get(variant, {}))
            rows.append(row)
        return rows

    def same_as(self, row: dict, variant: str, **extra) -> dict:
        """Appends a row for ``variant`` that runs the very code path ``row`` timed (``auto`` dispatching to
        that backend): its numbers are ``row``'s, marked ``same_as``, its speed-up over ``row`` is 1 by
        identity. (Dispatch's own host cost is not in it: see ``fastvl bench host``.)"""
        shared = {**row, "variant": variant, "same_as": row["variant"], **extra}
        self.rows.append(shared)
        return shared

    def _timed_row(self, timing: Timing, *, name: str, variant: str, params: dict | None, dtype: torch.dtype,
                   flops: float | None, nbytes: float | None) -> dict:
        row = self.add(timing, name=name, variant=variant, params=params, dtype=dtype)
        if flops or nbytes:
            peak = device_peak(self.device, dtype)
            seconds = timing.median_ms * 1e-3
            row.update(peak_source=peak.source, **floors_us(flops, nbytes, peak))
            if flops:
                tflops = flops / seconds / 1e12
                row.update(flops=flops, tflops=tflops, pct_peak_tflops=100 * tflops / peak.tflops)
            if nbytes:
                gbps = nbytes / seconds / 1e9
                row.update(bytes=nbytes, gbps=gbps, pct_peak_gbps=100 * gbps / peak.gbps)
        return row

    def add(self, timing: Timing, *, name: str, variant: str, params: dict | None = None,
            dtype: torch.dtype = torch.float32, **extra) -> dict:
        """Appends a row for a timing taken elsewhere (e.g. a training step's own phase timers)."""
        row = {"suite": self.suite, "name": name, "variant": variant, "params": dict(params or {}),
               "dtype": str(dtype).removeprefix("torch."), "device": self.env["device"],
               **dataclasses.asdict(timing), **extra}
        self.rows.append(row)
        return row

    def ratios(self, baseline: str) -> list[dict]:
        """For every row whose (name, params) also has a ``baseline`` variant in this run:
        ``speedup`` = baseline median time / this time, ``memory_ratio`` = this peak / baseline peak."""
        return ratios(self.rows, baseline)

    def table(self, baselines: Sequence[str] = ()) -> str:
        return format_table(self.rows, baselines)

    def to_json(self, baselines: Sequence[str] = ()) -> dict:
        self.env["load_at_save"] = load_average()
        self.env["noise"] = noise_summary(self.rows)
        return {"schema": SCHEMA_VERSION, "suite": self.suite, "quick": self.quick, "env": self.env,
                "rows": self.rows, "ratios": [r for b in baselines for r in self.ratios(b)],
                "failures": self.failures}

    def save(self, path: str | Path, baselines: Sequence[str] = ()) -> Path:
        """Writes the JSON document to ``path`` (parents created) and returns it."""
        return write_json(path, self.to_json(baselines))


def _group_key(row: dict) -> tuple:
    return row["name"], json.dumps(row["params"], sort_keys=True), row.get("dtype")


def speedup(row: dict, base: dict) -> dict:
    """{"speedup", "method", and where paired "ci95", "verdict"} of ``row`` over ``base`` (same shape):
    1 by identity where both ran one code path (``same_as``), the paired median where both were timed in
    the same interleaved rounds, else the ratio of their medians."""
    if base["variant"] in (row.get("same_as"), row["variant"]) or row["variant"] == base.get("same_as"):
        return {"speedup": 1.0, "method": "same code path", "verdict": "same code path"}
    if row.get("comparison") is not None and row.get("comparison") == base.get("comparison") \
            and len(row.get("rounds_ms", ())) == len(base.get("rounds_ms", ())) > 0:
        stored = row.get("vs_baseline", {})  # computed from the unrounded times
        if stored.get("baseline") == base["variant"]:
            return {k: v for k, v in stored.items() if k != "baseline"} | {"method": "paired rounds"}
        return {**paired_speedup(base["rounds_ms"], row["rounds_ms"]), "method": "paired rounds"}
    return {"speedup": base["median_ms"] / row["median_ms"], "method": "ratio of medians"}


def ratios(rows: Sequence[dict], baseline: str) -> list[dict]:
    by_group = {_group_key(row): row for row in rows if row["variant"] == baseline}
    out = []
    for row in rows:
        base = by_group.get(_group_key(row))
        if base is None or row["variant"] == baseline:
            continue
        entry = {"name": row["name"], "params": row["params"], "dtype": row.get("dtype"), "variant": row["variant"],
                 "baseline": baseline, **speedup(row, base)}
        if row.get("peak_mem_mb") and base.get("peak_mem_mb"):
            entry["memory_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"]
        out.append(entry)
    return out


def format_table(rows: Sequence[dict], baselines: Sequence[str] = ()) -> str:
    """A fixed-width table: one line per row, with its floor (the larger of the FLOP and byte floors, in
    microseconds at the device's peak) and speed-up columns against each named baseline (``~``: within
    noise, see :func:`paired_speedup`; ``(same path)``: the row runs the baseline's code)."""
    speedups = {b: {(_group_key(r), r["variant"]): r for r in ratios(rows, b)} for b in baselines}
    header = ["benchmark", "params", "variant", "median ms", "p20-p80 ms", "peak MB", "TFLOP/s", "GB/s",
              "floor us", *[f"x vs {b}" for b in baselines]]
    lines = []
    for row in rows:
        params = " ".join(f"{k}={v}" for k, v in row["params"].items())
        mem = row.get("peak_mem_mb")
        cells = [row["name"], params, row["variant"], f"{row['median_ms']:.3f}",
                 f"{row['p20_ms']:.3f}-{row['p80_ms']:.3f}", "-" if mem is None else f"{mem:.1f}",
                 f"{row['tflops']:.3g}" if "tflops" in row else "-", f"{row['gbps']:.4g}" if "gbps" in row else "-"]
        floors = [row[k] for k in ("flop_floor_us", "byte_floor_us") if k in row]
        cells.append(f"{max(floors):.3g}" if floors else "-")
        for b in baselines:
            entry = speedups[b].get((_group_key(row), row["variant"]))
            mark = {"same code path": " (same path)", "within noise": " ~"}.get(entry.get("verdict"), "") if entry else ""
            cells.append("-" if entry is None else f"{entry['speedup']:.2f}{mark}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in [header, *lines])


def noise_summary(rows: Sequence[dict]) -> dict | None:
    """The spread of a run's interleaved rows: median and largest p20-p80 spread in % of the median, the
    rounds per shape, and the load averages seen (None when no row was interleaved)."""
    timed = [r for r in rows if "spread_pct" in r and not r.get("same_as")]
    if not timed:
        return None
    spreads = sorted(r["spread_pct"] for r in timed)
    loads = [r[k][0] for r in timed for k in ("load_before", "load_after") if r.get(k)]
    return {"median_spread_pct": statistics.median(spreads), "max_spread_pct": spreads[-1],
            "rounds": [min(r["rounds"] for r in timed), max(r["rounds"] for r in timed)],
            "load_1min": [min(loads), max(loads)] if loads else None, "tie_margin": TIE_MARGIN,
            "confidence": CONFIDENCE}


def write_json(path: str | Path, document: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def load_rows(path: str | Path) -> tuple[dict, list[dict]]:
    """(env, rows) of a saved JSON document."""
    document = json.loads(Path(path).read_text())
    return document["env"], document["rows"]


def results_dir(device: torch.device | str, root: str | Path = DEFAULT_RESULTS_DIR) -> Path:
    """``<root>/<YYYY-MM-DD>-<device slug>`` for this run."""
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return Path(root) / f"{datetime.date.today().isoformat()}-{slug}"


# Plots --------------------------------------------------------------------------------------------


def plot(rows: Sequence[dict], path: str | Path, *, x: str, y: str = "median_ms", series: str = "variant",
         title: str = "", env: dict | None = None, logx: bool = False, logy: bool = False) -> Path | None:
    """Line plot of ``y`` against the param ``x``, one line per value of ``series`` (a row key such as
    ``variant``, or a param name). Rows may be result rows or ratio rows. Uses the Agg backend.
    Without matplotlib: a warning and None (the JSON holds every number)."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {path} not drawn (the JSON has the numbers)", stacklevel=2)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if x not in row["params"] or y not in row:
            continue
        label = str(row.get(series, row["params"].get(series)))
        lines.setdefault(label, []).append((row["params"][x], row[y]))
    if not lines:
        raise ValueError(f"no rows have param {x!r} and value {y!r} to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    if logx:
        axes.set_xscale("log", base=2)
    if logy:
        axes.set_yscale("log")
    subtitle = f"\n{env['device']}, torch {env['torch']}, {env['date'][:10]}" if env else ""
    axes.set_title(title + subtitle, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
