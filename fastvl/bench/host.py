"""``fastvl bench host``: what an op call costs the host, and how many device launches it makes.

VL attention and the row kernels are tiny per call, so eager training is often bound by host time and
launch count rather than by the kernels. This benchmark measures both without a GPU:

* **Host microseconds per call** (the 10th percentile of repeated calls: other processes only add time;
  the median is kept too), forward and forward + backward, of every op at the op benchmark's tiny
  shapes: the Triton backend with its kernel launches stubbed (the host work of validation, dispatch,
  autograd and launch set-up, no kernel), the eager ``reference`` backend it replaces (its tiny CPU
  compute included, which a GPU would overlap), and the other CPU backends.
* **Device launches per call**: Triton kernels launched, plus one per aten op that is not a view or an
  ``empty`` (what each would launch on CUDA; an estimate: cuBLAS and some reductions launch more),
  the ops inside fastvl's custom ops included.
  Counted for one op call, and for one ViLBERT training step (forward + backward; the optimizer
  counted apart, the same for both), fused (``use_backend("triton")``, launches stubbed) against
  ``use_backend("reference")``, both under ``fastvl.testing.forbid_host_syncs`` (the path a GPU takes:
  no value read back, the linear losses projecting every row), with the launches per fastvl source
  file (``by_source``) and per aten op.

Triton runs under ``TRITON_INTERPRET=1`` here only as far as the launch: the stub returns before the
interpreter runs the kernel, so the outputs are garbage and only the counts and host times mean
anything.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvl
from fastvl.bench import harness, ops
from fastvl.bench.workloads import WORKLOADS
from fastvl.dispatch import BackendUnavailableError, registered_ops
from fastvl.testing import forbid_host_syncs

STUBBED = "triton (launches stubbed)"


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that would launch a device kernel: every op but views (outputs aliasing an
    input without writing) and ``empty*`` allocations."""

    def __init__(self, attribute: bool = False):
        super().__init__()
        self.aten = 0
        self.triton = 0
        self.by_op: dict[str, int] = {}
        # with ``attribute``: launches per fastvl source file that issued them (the innermost fastvl frame;
        # "torch (autograd, views)" when none: autograd's gradient sums, backward of torch ops)
        self.attribute = attribute
        self.by_source: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastvl":  # count what a fastvl custom op runs inside (its own ops and launches)
            with self:
                return _custom_op_impl(func)(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if launches(func):
            self.aten += 1
            name = func.overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + 1
            self.count_source()
        return out

    def count_source(self) -> None:
        if not self.attribute:
            return
        frame, source = sys._getframe(1), "torch (autograd, torch ops' backward)"
        while frame is not None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if "/fastvl/" in path and not path.endswith(("/fastvl/cli.py", "/fastvl/__main__.py")) \
                    and "/fastvl/bench/" not in path:
                source = path.rsplit("/fastvl/", 1)[1]
                break
            frame = frame.f_back
        self.by_source[source] = self.by_source.get(source, 0) + 1

    @property
    def total(self) -> int:
        return self.aten + self.triton


def _custom_op_impl(func):
    from torch._library.custom_ops import OPDEFS

    return OPDEFS[func._schema.name]._init_fn


def launches(func) -> bool:
    """Whether an aten op launches a kernel on CUDA: not a view, an ``empty*``, nor an op returning no
    tensor (``promote_types``)."""
    name = func.overloadpacket.__name__
    if name.startswith(("empty", "new_empty", "_local_scalar_dense", "lift_fresh", "_unsafe_view", "_reshape_alias")):
        return False
    returns = func._schema.returns
    if not any("Tensor" in str(r.type) for r in returns):
        return False
    return not all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@contextlib.contextmanager
def stubbed_triton(counter: LaunchCounter | None = None) -> Iterator[None]:
    """Every Triton kernel launch returns at once (counted in ``counter``): the host cost without a kernel."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self, *args, grid=None, warmup=False, **kwargs):
        if counter is not None and not warmup:
            counter.triton += 1
            counter.count_source()

    for cls in saved:
        cls.run = run
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.run = method


def host_us(fn: Callable[[], object], budget_s: float, min_reps: int = 5) -> tuple[float, float]:
    """(10th percentile, median) wall-clock microseconds of ``fn`` over repeated calls (after two warm-up
    calls). The low percentile is the figure to compare: other processes on the machine only add time."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    times.sort()
    return times[len(times) // 10] * 1e6, statistics.median(times) * 1e6


def _variants(op_name: str) -> list[str]:
    names = [b for b in registered_ops()[op_name].backends if b != "triton"]
    available = [b for b in names if not registered_ops()[op_name].backends[b].available()]
    return ([STUBBED] if "triton" in registered_ops()[op_name].backends else []) + available


def op_rows(budget_s: float) -> tuple[list[dict], list[str]]:
    """Host time and launches of each tiny op case, per variant and pass."""
    rows, notes = [], []
    device = torch.device("cpu")
    for case in ops.cases("tiny"):
        for variant in _variants(case.op):
            backend = "triton" if variant == STUBBED else variant
            stub = stubbed_triton if variant == STUBBED else (lambda counter=None: contextlib.nullcontext())
            for kind in ops.PASSES:
                try:
                    with stub():
                        fn, _ = ops.prepare(case, backend, kind, device, torch.float32)
                        micros, median = host_us(fn, budget_s)
                    counter = LaunchCounter()
                    with stub(counter), counter:
                        fn()
                except BackendUnavailableError as error:
                    notes.append(f"{case.name} {variant}: {ops.reason(error, backend)}")
                    break
                rows.append({"name": case.name, "op": case.op, "variant": variant, "params": case.params,
                             "pass": kind, "host_us": micros, "host_us_median": median, "launches": counter.total,
                             "triton_launches": counter.triton, "aten_launches": counter.aten})
    return rows, notes


def step_counts(model_name: str, batch_size: int) -> dict:
    """Launches of one training step of ``model_name`` (forward + backward, optimizer apart), fused vs
    reference."""
    spec = WORKLOADS[model_name]()
    torch.manual_seed(0)
    model = spec.build().train()
    batch = spec.make_batch(batch_size, torch.Generator().manual_seed(0), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    out = {}
    for side, scope in (("fused", fastvl.use_backend("triton")), ("reference", fastvl.use_backend("reference"))):
        counter = LaunchCounter(attribute=True)
        with scope, stubbed_triton(counter), counter, forbid_host_syncs():  # the path a GPU takes
            spec.loss(model(**batch)).backward()
        out[side] = {"launches": counter.total, "triton": counter.triton, "aten": counter.aten,
                     "top_aten": dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:16]),
                     "by_source": dict(sorted(counter.by_source.items(), key=lambda kv: -kv[1]))}
    counter = LaunchCounter()
    with counter:
        optimizer.step()
    out["optimizer_launches"] = counter.total
    out["ratio"] = out["reference"]["launches"] / max(out["fused"]["launches"], 1)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="vilbert-base",
                        help="the model whose training step's launches are counted")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the counted step")
    parser.add_argument("--no-step", action="store_true", help="skip the model step (op rows only)")


def run(args: argparse.Namespace, device: torch.device, out_dir: Path) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: the launches stop at the stub
    budget = 0.05 if args.quick else 0.3
    rows, notes = op_rows(budget)
    document = {"schema": harness.SCHEMA_VERSION, "env": {**harness.environment(torch.device("cpu")),
                                                           "note": args.note},
                "measure": __doc__.split("\n\n")[1].strip() if __doc__ else "", "rows": rows, "notes": notes}
    print(f"{'op case':<26} {'variant':<26} {'pass':<8} {'host us':>9} {'launches':>9}")
    for row in rows:
        print(f"{row['name'][:26]:<26} {row['variant']:<26} {row['pass']:<8} {row['host_us']:>9.1f} "
              f"{row['launches']:>9}")
    if not args.no_step:
        gc.collect()
        document["step"] = {"model": args.model, "batch": args.batch, **step_counts(args.model, args.batch)}
        step = document["step"]
        print(f"\n{args.model} training step (batch {args.batch}, forward + backward): fused "
              f"{step['fused']['launches']} launches ({step['fused']['triton']} Triton), reference "
              f"{step['reference']['launches']}: {step['ratio']:.2f}x fewer; optimizer {step['optimizer_launches']}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {harness.write_json(out_dir / 'host.json', document)}")
    return 0
