"""Model-level parity for the model tests: the fused run (default backends, float32) against the
eager reference (``use_backend("reference")``, float32), both measured against ``model.double()``
under the reference backend, for every output and every parameter's gradient (fastvl.testing rule)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from fastvl import use_backend
from fastvl.testing import ParityResult, assert_parity


def _double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v) for v in value)
    return value


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for t in value if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_model_parity(model: torch.nn.Module, run: Callable, inputs: Sequence, *, name: str = "model",
                       seed: int = 0, grads: bool = True, fused: dict | None = None) -> list[ParityResult]:
    """``run(model, *inputs)`` returns a tensor, a tuple or a dict of tensors. The model must be
    deterministic (eval mode or zero dropout). ``fused`` picks backends per op for the fused run
    (default: auto). Returns every comparison made (all ok)."""
    eager, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    with use_backend(**(fused or {})):
        fused_out = _outputs(run(model, *inputs))
    with use_backend("reference"):
        eager_out = _outputs(run(eager, *inputs))
        exact_out = _outputs(run(exact, *_double(list(inputs))))
    assert len(fused_out) == len(exact_out) == len(eager_out)
    results = [assert_parity(f"{name} output[{i}]", f, e, x)
               for i, (f, e, x) in enumerate(zip(fused_out, eager_out, exact_out))]
    if not grads:
        return results
    generator = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in exact_out]
    chosen = [i for i, t in enumerate(exact_out) if t.requires_grad]
    assert chosen, f"{name}: no differentiable output"
    for outs, net in ((fused_out, model), (eager_out, eager), (exact_out, exact)):
        net.zero_grad(set_to_none=True)
        with use_backend(**(fused or {})):
            torch.autograd.backward([outs[i] for i in chosen], [upstream[i].to(outs[i].dtype) for i in chosen])
    checked = 0
    for (pname, f), (_, e), (_, x) in zip(model.named_parameters(), eager.named_parameters(),
                                         exact.named_parameters()):
        if x.grad is None:
            assert f.grad is None or not f.grad.any(), f"{name}: {pname} has a gradient only in the fused run"
            continue
        assert f.grad is not None, f"{name}: {pname} has no gradient in the fused run"
        results.append(assert_parity(f"{name} grad {pname}", f.grad, e.grad, x.grad))
        checked += 1
    assert checked, f"{name}: no parameter gradient compared"
    return results
