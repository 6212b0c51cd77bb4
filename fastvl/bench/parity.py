"""``fastvl parity``: layer-by-layer (and op-by-op) numerical parity of a model's fused path against
its reference path, both measured against float64, under the project's parity rule.

Three copies of the model hold the same weights: *fused* (dtype d, default backends), *eager* (dtype d,
``use_backend("reference")``) and *exact* (float64, reference). One exact forward+backward of the
pretraining loss records, for every layer and every fastvl op call, its inputs, its outputs and the
gradient arriving at its outputs. Each layer is then re-run **in isolation** on those recorded inputs
(cast to d) in the fused and eager copies, and back-propagated from the recorded gradient; its
output, the gradients of its inputs and of each of its parameters are compared with the exact layer's
by :func:`fastvl.testing.compare`. Isolation is what makes the report point at a layer: an error that
one layer makes does not reach the next layer's inputs. Ops are replayed the same way, each with the
backend auto picks for dtype d against the reference backend. Layers are timed side by side (forward,
and forward+backward) on the same inputs; on CUDA every layer and op replay sits in an NVTX range, and
the end-to-end runs go through :func:`annotate` (an NVTX range and a torch.profiler range per layer and
per op call), so ``nsys`` shows the same breakdown. The whole model's losses and parameter gradients are compared too
("end to end"); those accumulate every layer's error and are reported apart from the layer verdicts.

Layers: the modules inside a ``ModuleList`` and the other blocks beside them (embeddings, poolers, head
transforms); containers and modules holding a ``ModuleList`` somewhere inside are opened.
``--perturb LAYER`` adds noise to that layer's first matrix in the fused copy only: a self-test that the
report flags that layer and no other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import fastvl
from fastvl import dispatch, testing
from fastvl.bench import harness
from fastvl.bench.workloads import WORKLOADS
from fastvl.profiling import annotate, layer_modules, nvtx_range

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# What to compare -----------------------------------------------------------------------------------


def _floats(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _detached(value):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def _cast(value, dtype: torch.dtype, grad_of: set[int] | None = None):
    """Floating tensors to ``dtype`` (fresh leaves; those whose position is in ``grad_of`` require grad)."""
    flat, spec = tree_flatten(value)
    out = []
    for index, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype).requires_grad_(grad_of is not None and index in grad_of)
        out.append(t)
    return spec.unflatten(out)


@dataclasses.dataclass
class Call:
    """One recorded call of a layer or an op in the exact run."""

    name: str
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]
    grad_inputs: set[int]  # positions in tree_flatten((args, kwargs)) that required grad
    upstream: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    op: str | None = None
    features: dict | None = None
    layer: str | None = None

    def watch_gradients(self, outputs: list[torch.Tensor]) -> None:
        self.upstream = [None] * len(outputs)
        for index, t in enumerate(outputs):
            if t.requires_grad:
                t.register_hook(lambda grad, i=index: self.upstream.__setitem__(i, grad.detach().clone()))


def _grad_positions(args, kwargs) -> set[int]:
    return {i for i, t in enumerate(tree_flatten((args, kwargs))[0])
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad}


@contextlib.contextmanager
def record(model: nn.Module) -> Iterator[tuple[dict[str, Call], list[Call]]]:
    """Records every layer call (first call of each) and every fastvl op call made inside the block."""
    layers: dict[str, Call] = {}
    ops: list[Call] = []
    stack: list[str] = []
    handles = []
    for name, module in layer_modules(model).items():
        def pre(module, args, kwargs, name=name):
            stack.append(name)

        def post(module, args, kwargs, output, name=name):
            stack.pop()
            if name not in layers:
                call = Call(name, _detached(args), _detached(kwargs), _detached(_floats(output)),
                            _grad_positions(args, kwargs))
                call.watch_gradients(_floats(output))
                layers[name] = call

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    def recording(event: dispatch.Dispatched, impl: Callable) -> Callable:
        def recorded(*args, **kwargs):
            output = impl(*args, **kwargs)
            call = Call(f"{event.op}#{len(ops)}", _detached(args), _detached(kwargs), _detached(_floats(output)),
                        _grad_positions(args, kwargs), op=event.op, features=event.features,
                        layer=stack[-1] if stack else "(model)")
            call.watch_gradients(_floats(output))
            ops.append(call)
            return output

        return recorded

    try:
        with dispatch.listen(recording):
            yield layers, ops
    finally:
        for handle in handles:
            handle.remove()


# Replaying one call in isolation -------------------------------------------------------------------


@dataclasses.dataclass
class Replay:
    outputs: list[torch.Tensor]
    input_grads: list[torch.Tensor | None]
    param_grads: dict[str, torch.Tensor | None]


def _backend(side: str):
    """The dispatch scope of a side: the fused copy runs auto, the others the reference backend."""
    return contextlib.nullcontext() if side == "fused" else fastvl.use_backend("reference")


def replay(call: Call, fn: Callable, dtype: torch.dtype, params: dict[str, nn.Parameter]) -> Replay:
    """Runs ``fn(*args, **kwargs)`` on the recorded inputs cast to ``dtype``, then back-propagates the
    recorded upstream gradients; returns outputs and the gradients of the inputs and ``params``."""
    args, kwargs = _cast((call.args, call.kwargs), dtype, call.grad_inputs)
    for p in params.values():
        p.grad = None
    with nvtx_range(call.name):
        outputs = _floats(fn(*args, **kwargs))
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, call.upstream) if g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    leaves = [t for i, t in enumerate(tree_flatten((args, kwargs))[0]) if i in call.grad_inputs]
    return Replay([o.detach() for o in outputs], [t.grad for t in leaves], {n: p.grad for n, p in params.items()})


def _worst(results: list[testing.ParityResult]) -> testing.ParityResult | None:
    """The result closest to (or furthest past) its allowance."""
    results = [r for r in results if r is not None]
    if not results:
        return None
    return max(results, key=lambda r: (not r.ok, r.fused_error / max(r.allowed, 1e-300)))


def _compare_lists(labels: list[str], fused: list, eager: list, exact: list) -> list[testing.ParityResult]:
    """``compare`` of each (fused, eager, exact) triple; a tensor absent on every side (no gradient) is
    skipped, one absent on one side only is an error."""
    out = []
    for label, f, e, x in zip(labels, fused, eager, exact):
        if x is None or f is None or e is None:
            if x is not None and (f is None) != (e is None):
                raise AssertionError(f"{label}: gradient missing on one side")
            continue
        out.append(testing.compare(label, f, e, x))
    return out


def _labels(prefix: str, values: list) -> list[str]:
    return [f"{prefix}[{index}]" for index in range(len(values))]


def _summary(result: testing.ParityResult | None) -> dict | None:
    if result is None:
        return None
    return {"where": result.name, "fused_error": result.fused_error, "eager_error": result.eager_error,
            "allowed": result.allowed, "rel_error": result.fused_error / result.scale if result.scale else 0.0,
            "ok": result.ok}


# The report -----------------------------------------------------------------------------------------


def run_parity(model_name: str, dtype: torch.dtype, device: torch.device, *, batch_size: int = 2, seed: int = 0,
               perturb: str | None = None, time_layers: bool = True, quick: bool = False) -> dict:
    """The full report as a JSON-ready dict (see the module docstring)."""
    spec = WORKLOADS[model_name]()
    if not spec.deterministic:
        raise ValueError(f"{model_name}: its forward is not a function of weights and batch alone (momentum "
                         "encoders, queues or random draws), so fused and reference runs cannot be compared")
    torch.manual_seed(seed)
    exact = spec.build().eval()
    state = exact.state_dict()

    def copy(to_dtype: torch.dtype) -> nn.Module:
        model = spec.build().eval()
        model.load_state_dict(state)
        return model.to(device=device, dtype=to_dtype)

    fused, eager = copy(dtype), copy(dtype)
    exact = exact.to(device=device, dtype=torch.float64)
    if perturb is not None:
        _perturb(fused, perturb, seed)
    batch = spec.make_batch(batch_size, torch.Generator().manual_seed(seed), device)

    # the exact run: what every replay starts from
    with fastvl.use_backend("reference"), record(exact) as (layer_calls, op_calls):
        exact_out = exact(**_cast(batch, torch.float64))
        spec.loss(exact_out).backward()
    # before the replays reset the grads
    end_to_end = _end_to_end(fused, eager, exact, exact_out, batch, dtype, spec.losses)

    layers_fused, layers_eager, layers_exact = (layer_modules(m) for m in (fused, eager, exact))
    report_layers, report_ops = [], []
    try:
        _replay_layers(layer_calls, layers_fused, layers_eager, layers_exact, dtype, device, time_layers, quick,
                       report_layers)
        for call in harness.progress(op_calls, "parity: ops"):
            report_ops.append(_op_entry(call, dtype, device))
        interrupted = None
    except KeyboardInterrupt:  # a time limit (the GPU suite's timeout sends SIGINT): report what was compared
        interrupted = f"after {len(report_layers)} of {len(layer_calls)} layers and {len(report_ops)} of " \
                      f"{len(op_calls)} op calls"

    return {"schema": harness.SCHEMA_VERSION, "env": harness.environment(device), "model": model_name,
            "dtype": str(dtype).removeprefix("torch."), "batch": batch_size, "seed": seed, "perturbed": perturb,
            "layers": report_layers, "ops": report_ops,
            "end_to_end": end_to_end, "interrupted": interrupted,
            "flagged_layers": [entry["name"] for entry in report_layers if not entry["ok"]],
            "flagged_ops": [entry["call"] for entry in report_ops if not entry["ok"]]}


def _replay_layers(layer_calls: dict[str, Call], layers_fused: dict, layers_eager: dict, layers_exact: dict,
                   dtype: torch.dtype, device: torch.device, time_layers: bool, quick: bool,
                   report_layers: list[dict]) -> None:
    """Replays every recorded layer call in the three copies; appends one entry per layer to ``report_layers``."""
    for name, call in harness.progress(layer_calls.items(), "parity: layers"):
        modules = {"fused": layers_fused[name], "eager": layers_eager[name], "exact": layers_exact[name]}
        replays = {}
        for side, module in modules.items():
            with _backend(side):
                replays[side] = replay(call, module, torch.float64 if side == "exact" else dtype,
                                       dict(module.named_parameters()))
        f, e, x = replays["fused"], replays["eager"], replays["exact"]
        forward = _worst(_compare_lists(_labels(f"{name} output", x.outputs), f.outputs, e.outputs, x.outputs))
        grad_inputs = _worst(_compare_lists(_labels(f"{name} grad input", x.input_grads), f.input_grads,
                                            e.input_grads, x.input_grads))
        names = list(x.param_grads)
        grad_params = _worst(_compare_lists([f"{name}.{n}.grad" for n in names], [f.param_grads[n] for n in names],
                                            [e.param_grads[n] for n in names], [x.param_grads[n] for n in names]))
        entry = {"name": name, "type": type(modules["fused"]).__name__, "forward": _summary(forward),
                 "grad_input": _summary(grad_inputs), "grad_params": _summary(grad_params)}
        entry["ok"] = all(part is None or part["ok"] for part in (entry["forward"], entry["grad_input"],
                                                                    entry["grad_params"]))
        if time_layers:
            entry.update(_time_layer(call, modules["fused"], modules["eager"], dtype, device, quick))
        report_layers.append(entry)


def _perturb(model: nn.Module, layer: str, seed: int) -> None:
    modules = layer_modules(model)
    if layer not in modules:
        raise ValueError(f"--perturb {layer!r} is not a layer of this model; layers: {', '.join(modules)}")
    weight = next((p for p in modules[layer].parameters() if p.dim() >= 2), None)
    if weight is None:
        raise ValueError(f"layer {layer!r} has no weight matrix to perturb")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        noise = torch.randn(weight.shape, generator=generator).to(weight)
        weight.add_(noise * 0.05 * weight.float().std().to(weight.dtype))


def _time_layer(call: Call, fused: nn.Module, eager: nn.Module, dtype: torch.dtype, device: torch.device,
                quick: bool) -> dict:
    budget = {"warmup_ms": 2.0, "rep_ms": 10.0, "min_reps": 3} if quick else {}
    times = {}
    for side, module in (("fused", fused), ("reference", eager)):
        args, kwargs = _cast((call.args, call.kwargs), dtype, call.grad_inputs)
        params = list(module.parameters())

        def forward(module=module, side=side, args=args, kwargs=kwargs):
            with _backend(side):
                return module(*args, **kwargs)

        def forward_backward():
            pairs = [(o, g.to(o.dtype)) for o, g in zip(_floats(forward()), call.upstream)
                     if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

        with nvtx_range(f"time {call.name} {side}"):
            times[f"{side}_fwd_ms"] = harness.time_fn(forward, device, **budget).median_ms
            times[f"{side}_fwd_bwd_ms"] = harness.time_fn(forward_backward, device, grad_to_none=params,
                                                          **budget).median_ms
    return times


def _op_entry(call: Call, dtype: torch.dtype, device: torch.device) -> dict:
    op = fastvl.dispatch.registered_ops()[call.op]
    chosen = op.select(None, device, **{**call.features, "dtype": dtype})
    reference = op.backends["reference"]
    f = replay(call, chosen.impl, dtype, {})
    e = replay(call, reference.impl, dtype, {})
    x = replay(call, reference.impl, torch.float64, {})
    forward = _worst(_compare_lists(_labels(f"{call.name} output", x.outputs), f.outputs, e.outputs, x.outputs))
    grads = _worst(_compare_lists(_labels(f"{call.name} grad input", x.input_grads), f.input_grads, e.input_grads,
                                  x.input_grads))
    entry = {"call": call.name, "op": call.op, "layer": call.layer, "backend": chosen.name,
             "forward": _summary(forward), "grad_input": _summary(grads)}
    entry["ok"] = all(part is None or part["ok"] for part in (entry["forward"], entry["grad_input"]))
    return entry


def _end_to_end(fused: nn.Module, eager: nn.Module, exact: nn.Module, exact_out, batch: dict,
                dtype: torch.dtype, losses: Callable[[object], tuple[torch.Tensor, dict]]) -> dict:
    """The whole model's losses and parameter gradients (errors of all layers accumulated)."""
    outputs = {}
    for side, model in (("fused", fused), ("eager", eager)):
        with _backend(side), annotate(model, f"{side} "):
            model.zero_grad(set_to_none=True)
            out = model(**_cast(batch, dtype))
            losses(out)[0].backward()
        outputs[side] = out
    entry = {}
    fused_losses, eager_losses = losses(outputs["fused"])[1], losses(outputs["eager"])[1]
    for key, value in losses(exact_out)[1].items():
        entry[f"loss.{key}"] = _summary(testing.compare(f"loss.{key}", fused_losses[key], eager_losses[key], value))
    grads = [(n, p.grad) for n, p in exact.named_parameters() if p.grad is not None]
    fused_params, eager_params = dict(fused.named_parameters()), dict(eager.named_parameters())
    results = [testing.compare(f"{n}.grad", fused_params[n].grad, eager_params[n].grad, g) for n, g in grads
               if fused_params[n].grad is not None and eager_params[n].grad is not None]
    entry["param_grads"] = _summary(_worst(results))
    entry["param_grads_broken"] = [r.name for r in results if not r.ok]
    return entry


# CLI ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="vilbert-tiny",
                        help="a model whose forward is deterministic (not ALBEF: momentum encoders, queues, "
                             "random negatives)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturb", default=None, metavar="LAYER",
                        help="self-test: add noise to this layer's weight in the fused copy only")
    parser.add_argument("--no-timing", action="store_true", help="skip the per-layer timings")
    parser.add_argument("--quick", action="store_true", help="short timing budgets (CI)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/<date>-<device>/parity-<model>-<dtype>.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else harness.default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        report = run_parity(args.model, dtype, device, batch_size=args.batch, seed=args.seed, perturb=args.perturb,
                            time_layers=not args.no_timing, quick=args.quick)
    finally:
        torch.set_num_threads(threads)
    print(format_report(report))
    name = f"parity-{args.model}-{report['dtype']}.json"
    path = harness.write_json(args.out or harness.results_dir(device) / name, report)
    print(f"wrote {path}")
    return 1 if report["flagged_layers"] or report["flagged_ops"] or report["interrupted"] else 0


def format_report(report: dict) -> str:
    def err(part: dict | None) -> str:
        if part is None:
            return "-"
        return f"{part['fused_error']:.2e}/{part['allowed']:.1e}" + ("" if part["ok"] else " !")

    lines = [f"parity of {report['model']} in {report['dtype']} on {report['env']['device']} "
             f"(fused error / allowed = 2 x eager error + floor; ! = breaks the rule)"]
    header = ["layer", "type", "output", "grad input", "grad params", "fused fwd ms", "ref fwd ms",
              "fused fwd+bwd", "ref fwd+bwd", ""]
    rows = [[e["name"], e["type"], err(e["forward"]), err(e["grad_input"]), err(e["grad_params"]),
             *(f"{e[k]:.3f}" if k in e else "-" for k in ("fused_fwd_ms", "reference_fwd_ms", "fused_fwd_bwd_ms",
                                                            "reference_fwd_bwd_ms")),
             "ok" if e["ok"] else "FLAGGED"] for e in report["layers"]]
    rows += [["op " + e["call"], f"{e['backend']} in {e['layer']}", err(e["forward"]), err(e["grad_input"]), "-",
              "-", "-", "-", "-", "ok" if e["ok"] else "FLAGGED"] for e in report["ops"]]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    end = report["end_to_end"]
    lines.append("end to end (all layers' errors accumulated): " + ", ".join(
        f"{k} {err(v)}" for k, v in end.items() if isinstance(v, dict)))
    flagged = report["flagged_layers"] + report["flagged_ops"]
    lines.append("flagged: " + (", ".join(flagged) if flagged else "none"))
    if report.get("interrupted"):
        lines.append(f"INTERRUPTED {report['interrupted']}: the report is partial")
    return "\n".join(lines)
