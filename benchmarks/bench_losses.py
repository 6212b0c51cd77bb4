"""Pretraining-loss benchmark: fastvl's fused losses against the eager original formulas (and
Liger-Kernel's fused linear cross-entropy where installed) at the papers' shapes, forward + backward.

    python benchmarks/bench_losses.py                 # GPU: triton backends (and region KL's CUDA kernel), bf16 + fp32
    python benchmarks/bench_losses.py --device cpu    # CPU: cpp backends, fp32
    python benchmarks/bench_losses.py --quick         # shorter timing budget
    python benchmarks/bench_losses.py --device cpu --threads 1   # steadier on a shared, loaded CPU
    python benchmarks/bench_losses.py --size tiny --quick        # toy shapes: checks the code paths only

Shapes (issue 4): region KL over B=64 x 37 regions, 1601 classes (15% masked, plus a masked-fraction
sweep); the region head hidden 1024 -> 1601 over the same rows; the MLM head 768 -> 30522 over B=64 x 36
tokens (15% scored); ALBEF's ITC at batch 64, queue 65,536, embed 256.

Work per call (forward + backward), stated with every number:
    region_kl_loss: bytes = M C (s + s_t) + N C s: read the masked rows' logits and targets, write the
        [N, C] gradient (N rows, M masked, s / s_t the logits' / targets' element size). No FLOP count.
    linear_region_kl_loss / linear_cross_entropy: FLOPs = 6 M K C (logits, grad_hidden, grad_weight of the
        M scored rows only: the useful work; eager projects all N rows, 6 N K C).
    itc_loss: FLOPs = 12 B E (B + Q) (per direction: momentum similarities, similarities, gradient);
        bytes = 2 E (B + Q) s (both feature banks read once).
Peak memory: GPU, torch.cuda.max_memory_allocated above the memory allocated before the call. CPU, the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its resident set before the
call, with glibc told (for that measurement only) to serve every allocation over 64 KiB by mmap so that
freed tensors leave the resident set at once: this counts every byte torch allocates, scratch inside
custom ops included. So every case runs twice: first all memory measurements (that setting from the start), then all timings
with glibc keeping freed buffers (no page faults).
Writes ``losses_<device>.json`` and ``losses_<device>_*.png`` under benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvl import ops
from fastvl.bench import harness
from fastvl.dispatch import BackendUnavailableError

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ["reference"]
MASKED_FRACTION = 0.15
# "paper": the shapes above; "tiny": the same code paths at toy sizes (checks the plumbing, e.g. the GPU
# suite's --cpu-smoke run), numbers that mean nothing.
SHAPES = {
    "paper": {"batch": 64, "regions": 37, "text": 36, "region_hidden": 1024, "classes": 1601, "mlm_hidden": 768,
              "vocab": 30522, "embed": 256, "queue": 65536},
    "tiny": {"batch": 4, "regions": 37, "text": 36, "region_hidden": 64, "classes": 1601, "mlm_hidden": 64,
             "vocab": 1000, "embed": 32, "queue": 256},
}


# Peak memory ----------------------------------------------------------------------------------------


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _mallopt(option: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except (OSError, AttributeError):
        pass


def _measuring_malloc(measuring: bool) -> None:
    """glibc, while measuring: serve allocations over 64 KiB with mmap (returned to the OS on free, so the
    resident set follows the live tensors). Otherwise: keep freed buffers up to 32 MiB in the heap, the
    steady state glibc's dynamic threshold reaches on its own, so timings pay no page faults."""
    _mallopt(M_MMAP_THRESHOLD, 1 << 16 if measuring else 32 << 20)
    _mallopt(M_TRIM_THRESHOLD, 1 << 17 if measuring else 64 << 20)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_peak_bytes(fn) -> int:
    """Needs the measuring malloc setting from the process's start (see ``main``)."""
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    before = _status_bytes("VmRSS:")
    fn()
    return _status_bytes("VmHWM:") - before


def peak_bytes(fn, device: torch.device) -> int:
    return harness.peak_memory(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)


# Cases ----------------------------------------------------------------------------------------------


def _masked(rows, fraction, generator, device):
    mask = torch.rand(rows, generator=generator) < fraction
    return mask.to(device)


def _probs(rows, classes, generator, device, dtype):
    return torch.softmax(torch.randn(rows, classes, generator=generator) * 2, dim=-1).to(device, dtype)


class Bench:
    def __init__(self, device, quick, out, size="paper"):
        self.device, self.out = torch.device(device), Path(out)
        self.results = harness.Results("losses", self.device, quick=quick)
        self.results.env["size"] = size
        self.shape = SHAPES[size]
        self.generator = torch.Generator().manual_seed(0)
        self.fused = "triton" if self.device.type == "cuda" else "cpp"
        # region KL has a second GPU backend: the CUDA row kernel of fastvl._C (when it was built with nvcc)
        self.region_kl_variants = (self.fused, "cuda", "reference") if self.device.type == "cuda" else (self.fused,
                                                                                                      "reference")
        self.notes: list[str] = []
        self.measuring_memory = False
        self.peak_mb: dict[tuple, float] = {}

    def phase(self, measuring_memory: bool):
        """Memory phase (peaks only) or timing phase; both see the same inputs."""
        self.measuring_memory = measuring_memory
        self.generator = torch.Generator().manual_seed(0)
        if self.device.type == "cpu":
            _measuring_malloc(measuring_memory)

    def measure(self, step, leaves, *, name, variant, params, dtype, flops=None, nbytes=None):
        def call():
            for leaf in leaves:
                leaf.grad = None
            step()

        key = (name, variant, str(params), str(dtype))
        try:
            if self.measuring_memory:
                self.peak_mb[key] = peak_bytes(call, self.device) / 2**20
                return
            call()
            row = self.results.measure(call, name=name, variant=variant, params=params, dtype=dtype, flops=flops,
                                       nbytes=nbytes, memory=False)
        except BackendUnavailableError as error:
            if self.measuring_memory:
                self.notes.append(f"{name} {variant}: {str(error).splitlines()[0]}")
            return
        except Exception as error:  # e.g. a kernel that does not compile: the others still run
            message = (f"{name} {variant} {params} {dtype} ({'memory' if self.measuring_memory else 'timing'}): "
                       f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            self.results.failures.append(message)
            print(message, file=sys.stderr)
            return
        row["peak_mem_mb"] = self.peak_mb.get(key)
        memory = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:8.1f}"
        print(f"{name:<24} {variant:<10} {params} {row['median_ms']:9.2f} ms  {memory} MB", file=sys.stderr)

    def region_kl(self, dtype, fraction):
        rows, classes = self.shape["batch"] * self.shape["regions"], self.shape["classes"]
        logits = torch.randn(rows, classes, generator=self.generator).to(self.device, dtype).requires_grad_()
        targets = _probs(rows, classes, self.generator, self.device, dtype)
        mask = _masked(rows, fraction, self.generator, self.device)
        masked = int(mask.sum())
        size = logits.element_size()
        params = {"N": rows, "C": classes, "masked_pct": round(100 * fraction)}
        for variant in self.region_kl_variants:
            self.measure(lambda v=variant: ops.region_kl_loss(logits, targets, mask, backend=v).backward(), [logits],
                         name="region_kl_loss", variant=variant, params=params, dtype=dtype,
                         nbytes=masked * classes * 2 * size + rows * classes * size)

    def linear_region_kl(self, dtype):
        rows, features, classes = (self.shape["batch"] * self.shape["regions"], self.shape["region_hidden"],
                                   self.shape["classes"])
        hidden, weight, bias = self._projection(rows, features, classes, dtype)
        targets = _probs(rows, classes, self.generator, self.device, dtype)
        mask = _masked(rows, MASKED_FRACTION, self.generator, self.device)
        params = {"N": rows, "K": features, "C": classes, "masked_pct": 15}
        for variant in (self.fused, "reference"):
            self.measure(
                lambda v=variant: ops.linear_region_kl_loss(hidden, weight, bias, targets, mask, backend=v).backward(),
                [hidden, weight, bias], name="linear_region_kl_loss", variant=variant, params=params, dtype=dtype,
                flops=6 * int(mask.sum()) * features * classes)

    def linear_cross_entropy(self, dtype):
        rows, features, vocab = self.shape["batch"] * self.shape["text"], self.shape["mlm_hidden"], self.shape["vocab"]
        hidden, weight, bias = self._projection(rows, features, vocab, dtype)
        scored = _masked(rows, MASKED_FRACTION, self.generator, self.device)
        labels = torch.randint(0, vocab, (rows,), generator=self.generator).to(self.device)
        labels = torch.where(scored, labels, torch.full_like(labels, -1))
        params = {"N": rows, "K": features, "V": vocab, "masked_pct": 15}
        flops = 6 * int(scored.sum()) * features * vocab
        for variant in (self.fused, "reference"):
            self.measure(
                lambda v=variant: ops.linear_cross_entropy(hidden, weight, bias, labels, backend=v).backward(),
                [hidden, weight, bias], name="linear_cross_entropy", variant=variant, params=params, dtype=dtype,
                flops=flops)
        liger = _liger_linear_cross_entropy()
        if liger is not None and self.device.type == "cuda":
            self.measure(lambda: liger(hidden, weight, bias, labels).backward(), [hidden, weight, bias],
                         name="linear_cross_entropy", variant="liger", params=params, dtype=dtype, flops=flops)
        elif liger is None and not self.measuring_memory:
            self.notes.append("Liger-Kernel is not installed: no Liger baseline")

    def itc(self, dtype):
        batch, embed, queue = self.shape["batch"], self.shape["embed"], self.shape["queue"]

        def unit(*shape, dim=-1, grad=False):
            x = F.normalize(torch.randn(*shape, generator=self.generator), dim=dim).to(self.device, dtype)
            return x.requires_grad_(grad)

        img, txt = unit(batch, embed, grad=True), unit(batch, embed, grad=True)
        img_m, txt_m = unit(batch, embed), unit(batch, embed)
        img_queue, txt_queue = unit(embed, queue, dim=0), unit(embed, queue, dim=0)
        temp = torch.tensor(0.07, device=self.device, requires_grad=True)
        params = {"B": batch, "E": embed, "Q": queue}
        for variant in (self.fused, "reference"):
            self.measure(
                lambda v=variant: ops.itc_loss(img, txt, img_queue, txt_queue, temp, 0.4, img_m, txt_m,
                                               backend=v).backward(),
                [img, txt, temp], name="itc_loss", variant=variant, params=params, dtype=dtype,
                flops=12 * batch * embed * (batch + queue), nbytes=2 * embed * (batch + queue) * img.element_size())

    def _projection(self, rows, features, classes, dtype):
        hidden = torch.randn(rows, features, generator=self.generator)
        weight = torch.randn(classes, features, generator=self.generator) / features**0.5
        bias = torch.randn(classes, generator=self.generator) * 0.1
        return [t.to(self.device, dtype).requires_grad_() for t in (hidden, weight, bias)]

    def save(self):
        slug = "gpu" if self.device.type == "cuda" else "cpu"
        path = self.results.save(self.out / f"losses_{slug}.json", baselines=BASELINES)
        print(self.results.table(BASELINES))
        for note in self.notes:
            print(f"note: {note}")
        print(f"wrote {path}")
        sweep = [r for r in self.results.rows if r["name"] == "region_kl_loss"]
        for dtype in sorted({r["dtype"] for r in sweep}):
            rows = [r for r in sweep if r["dtype"] == dtype]
            shape = f"[{rows[0]['params']['N']}, {rows[0]['params']['C']}]"
            print("wrote", harness.plot(rows, self.out / f"losses_{slug}_region_kl_{dtype}.png", x="masked_pct",
                                        title=f"region_kl_loss fwd+bwd {shape} {dtype}", env=self.results.env))
        if self.results.ratios("reference"):
            print("wrote", plot_ratios(self.results, self.out / f"losses_{slug}_ratios.png"))
        for failure in self.results.failures:
            print(f"failed: {failure}", file=sys.stderr)


def plot_ratios(results: harness.Results, path: Path) -> Path:
    """Bars: speed-up and peak-memory ratio of each fused loss against the eager reference (15% masked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [r for r in results.ratios("reference") if r["params"].get("masked_pct", 15) == 15]
    labels = [f"{r['name']}\n{r['variant']} {r['dtype']}" for r in entries]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    speed.barh(labels, [r["speedup"] for r in entries])
    speed.axvline(1.0, color="k", lw=0.8)
    speed.set_xlabel("speed-up vs eager (x)")
    memory.barh(labels, [r.get("memory_ratio", float("nan")) for r in entries])
    memory.axvline(0.25, color="r", lw=0.8, ls="--")
    memory.set_xlabel("peak memory / eager peak")
    memory.set_yticks([])
    env = results.env
    figure.suptitle(f"fused losses fwd+bwd vs eager: {env['device']}, torch {env['torch']}, {env['date'][:10]}",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _liger_linear_cross_entropy():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-1)
    return lambda hidden, weight, bias, labels: loss(weight, hidden, labels, bias)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(harness.default_device()))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), action="append",
                        help="default: bfloat16 and float32 on GPU, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="paper",
                        help="paper: the shapes above; tiny: toy shapes that only check the code paths")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtype or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])]
    bench = Bench(device, args.quick, args.out, args.size)
    try:
        for measuring_memory in (True, False):
            bench.phase(measuring_memory)
            for dtype in dtypes:
                for fraction in (MASKED_FRACTION, 0.5, 1.0):
                    bench.region_kl(dtype, fraction)
                bench.linear_region_kl(dtype)
                bench.linear_cross_entropy(dtype)
                bench.itc(dtype)
    except KeyboardInterrupt:  # a time limit (the GPU suite's timeout sends SIGINT): save what was measured
        bench.results.failures.append(f"interrupted after {len(bench.results.rows)} timings")
        print(f"interrupted: saving the {len(bench.results.rows)} timings made", file=sys.stderr)
    bench.save()
    return 1 if bench.results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
