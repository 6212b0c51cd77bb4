"""Launch counts of the Triton row kernels (region KL in two launches, no zero-fills of buffers a
kernel overwrites), counted on the CPU under the interpreter: every Triton launch and every torch op
that does work (allocations and views excluded)."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastvl
from fastvl.kernels import bias_gelu, layer_norm, region_kl

pytestmark = pytest.mark.interpret
FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "view", "_reshape_alias", "reshape", "as_strided", "alias", "detach",
            "_unsafe_view", "unsqueeze", "t", "expand", "slice", "select", "unbind", "clone"}


class _TorchOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in FREE_OPS and func.namespace != "fastvl":  # the custom op itself is not a launch
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(monkeypatch, module, *names):
    """Counts ``module.<name>[grid](...)`` launches and the torch ops that do work."""
    launches = []
    for name in names:
        kernel = getattr(module, name)

        class Counted:
            def __init__(self, kernel=kernel, name=name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)
                launch = self.kernel[grid]

                def run(*args, **kwargs):
                    # the interpreter's own host copies are no device work: not counted
                    with _disable_current_modes():
                        return launch(*args, **kwargs)

                return run

        monkeypatch.setattr(module, name, Counted())
    mode = _TorchOps()
    with mode:
        yield launches, mode.ops


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_region_kl_forward_is_two_launches(monkeypatch, reduction):
    logits = torch.randn(2, 37, 1601, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 37, 1601), -1)
    mask = torch.rand(2, 37) < 0.15
    with counting(monkeypatch, region_kl, "region_kl_kernel", "region_kl_reduce_kernel") as (launches, ops):
        loss = fastvl.ops.region_kl_loss(logits, targets, mask, reduction, backend="triton")
    assert len(launches) + len(ops) <= 2, (launches, ops)
    assert launches[0] == "region_kl_kernel" and len(launches) == (1 if reduction == "none" else 2)
    upstream = torch.ones_like(loss) if reduction == "none" else None
    loss.backward(upstream)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_layer_norm_and_bias_gelu_backward_do_not_zero_fill(monkeypatch):
    x = torch.randn(7, 96, requires_grad=True)
    weight, bias = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    y = fastvl.ops.layer_norm(x, weight, bias, backend="triton")
    grad = torch.randn_like(y)
    with counting(monkeypatch, layer_norm, "layer_norm_bwd_kernel") as (launches, ops):
        y.backward(grad)
    assert "zero_" not in ops and "zeros" not in ops and "fill_" not in ops, ops
    assert launches == ["layer_norm_bwd_kernel"]
    h = torch.randn(5, 200, requires_grad=True)
    b = torch.randn(200, requires_grad=True)
    out = fastvl.ops.bias_gelu(h, b, backend="triton")
    with counting(monkeypatch, bias_gelu, "bias_gelu_bwd_kernel") as (launches, ops):
        out.backward(torch.randn_like(out))
    assert "zero_" not in ops and "fill_" not in ops, ops
    assert launches == ["bias_gelu_bwd_kernel"]


@pytest.mark.parametrize("rows,reductions", [(7, 0), (46, 0), (300, 1)])
def test_layer_norm_backward_reduces_dweight_dbias_only_over_several_programs(monkeypatch, rows, reductions):
    # up to 4 row blocks one program writes dweight and dbias itself; beyond, one sum over the partial rows
    x = torch.randn(rows, 64, requires_grad=True)
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    grad = torch.randn(rows, 64)
    y = fastvl.ops.layer_norm(x, weight, bias, eps=1e-5, backend="triton")
    with counting(monkeypatch, layer_norm, "layer_norm_bwd_kernel") as (launches, ops):
        y.backward(grad)
    assert launches == ["layer_norm_bwd_kernel"] and ops == ["sum"] * reductions, ops
    expected = torch.autograd.grad(torch.nn.functional.layer_norm(x.double(), (64,), weight.double(), bias.double(),
                                                                  1e-5), (x, weight, bias), grad.double())
    for got, want in zip((x.grad, weight.grad, bias.grad), expected):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
