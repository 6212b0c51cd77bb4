"""``fastvl.ops.bias_gelu``: ``gelu(x + bias)`` (erf form, as BERT's intermediate layer), the epilogue
of the feed-forward's first projection, in one pass (and a one-pass backward that also reduces the
bias gradient).

Backends (auto order): ``triton`` (CUDA; on the CPU only when asked for explicitly, under
``TRITON_INTERPRET=1``), ``torch`` (``F.gelu(x + bias)``, torch's fused erf GELU), ``reference``
(BERT's formula, op by op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.dispatch import op, triton_available, triton_device
from fastvl.reference.bias_gelu import bias_gelu_ref

BIAS_GELU = op("bias_gelu", probe={})


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU ``h * 0.5 * (1 + erf(h / sqrt(2)))``.

    x ``[..., N]`` (float16 / bfloat16 / float32; float64 on the reference backend), bias ``[N]`` or
    None. Math in float32; the result has x's dtype. Gradients flow to x and bias.
    """
    if not _inputs_ok(x, bias):
        _explain_inputs(x, bias)
    chosen = BIAS_GELU.select(backend, x.device, dtype=x.dtype)
    return chosen.impl(x, bias)


def _inputs_ok(x, bias) -> bool:
    """The common valid call, checked cheaply; anything else goes to :func:`_explain_inputs`."""
    if not (isinstance(x, torch.Tensor) and 1 <= x.dim() <= 7 and x.dtype in _checks.FLOAT_DTYPES):
        return False
    return bias is None or (isinstance(bias, torch.Tensor) and bias.shape == x.shape[-1:] and bias.device == x.device
                            and bias.dtype in _checks.FLOAT_DTYPES)


def _explain_inputs(x, bias) -> None:
    _checks.tensor("x", x, shape="[..., N]", ndim=range(1, 8))
    if bias is not None:
        _checks.tensor("bias", bias, shape=f"[N] = [{x.shape[-1]}]", ndim=1)
        _checks.same_shape("bias", bias, [x.shape[-1]], "[N] with N = x.shape[-1]")
        _checks.same_device("x", x, bias=bias)


# Triton backend: custom ops (visible to torch.compile) + autograd; eager calls run the same launch
# functions under a plain autograd.Function (the custom-op dispatch costs more host time than the launch).

_KERNELS = None


def _kernels():
    """fastvl.kernels.bias_gelu, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from fastvl.kernels import bias_gelu as kernels

        _KERNELS = kernels
    return _KERNELS


def _launch_forward(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not x.is_contiguous():
        x = x.contiguous()
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    # contiguous like x (row stride = cols); empty_like costs the host half what torch.empty does
    y = torch.empty_like(x)
    if rows:
        kernels = _kernels()
        grid = (-(-rows // kernels.BLOCK_M), -(-cols // kernels.BLOCK_N))
        kernels.bias_gelu_fwd_kernel[grid](x, bias if bias is not None else x, y, cols, cols, rows, cols,
                                           HAS_BIAS=bias is not None, BLOCK_M=kernels.BLOCK_M,
                                           BLOCK_N=kernels.BLOCK_N, num_warps=kernels.NUM_WARPS)
    return y


def _launch_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None):
    if not x.is_contiguous():
        x = x.contiguous()
    if not dy.is_contiguous():
        dy = dy.contiguous()
    kernels = _kernels()
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    dx = torch.empty_like(x)
    grid = (-(-rows // kernels.BLOCK_M), -(-cols // kernels.BLOCK_N))
    # Program (i, j) writes column tile j of row i: the grid covers the buffer, no zero-fill needed.
    # One row block: its row is the gradient itself ([cols], not a view: cheaper for autograd).
    shape = (0,) if bias is None else (cols,) if grid[0] == 1 else (grid[0], cols)
    partial = torch.empty(shape, dtype=torch.float32, device=x.device)
    if rows:
        kernels.bias_gelu_bwd_kernel[grid](dy, x, bias if bias is not None else x, dx,
                                           partial if bias is not None else dx, cols, cols, cols, rows, cols,
                                           HAS_BIAS=bias is not None, BLOCK_M=kernels.BLOCK_M,
                                           BLOCK_N=kernels.BLOCK_N, num_warps=kernels.NUM_WARPS)
    if bias is None:
        return dx, x.new_empty(0)
    dbias = partial if grid[0] == 1 else partial.sum(0)
    return dx, dbias if bias.dtype == torch.float32 else dbias.to(bias.dtype)


@torch.library.custom_op("fastvl::bias_gelu_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _launch_forward(x, bias)


@_bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastvl::bias_gelu_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias or empty)."""
    return _launch_backward(dy, x, bias)


@_bias_gelu_bwd.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), torch.empty_like(bias) if bias is not None else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _grads(ctx, dy, launch_backward):
    x, bias = ctx.saved_tensors
    dx, dbias = launch_backward(dy, x, bias)
    return dx, dbias if bias is not None else None


def _backward(ctx, dy):
    return _grads(ctx, dy, _bias_gelu_bwd)


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op dispatch (eager calls only)."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _launch_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _launch_backward)


# Function.apply's C++ entry (see fastvl.ops.layer_norm_op: the same Python work skipped)
_EAGER_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerBiasGelu)


def _triton_impl(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _bias_gelu_fwd(x, bias)
    if torch._C._are_functorch_transforms_active():
        return _EagerBiasGelu.apply(x, bias)
    return _EAGER_APPLY(x, bias)


def _triton_supports(device, dtype, **_features) -> list[str]:
    reasons = triton_device(device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {dtype} (triton takes float16, bfloat16, float32)")
    return reasons


def _torch_impl(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # torch's own erf GELU: one vectorised kernel each way instead of the reference's five element-wise ops
    return F.gelu(x + bias.to(x.dtype) if bias is not None else x)


BIAS_GELU.register("triton", available=triton_available, supports=_triton_supports,
                   auto_devices=("cuda",))(_triton_impl)
BIAS_GELU.register("torch")(_torch_impl)
BIAS_GELU.register("reference")(bias_gelu_ref)
