"""``fastvl.ops.layer_norm``: ``LayerNorm(dropout(x) + residual)``, the epilogue of every BERT
sub-layer (``BertSelfOutput``, ``BertOutput``, ViLBERT's ``biOutput``), in one pass over memory.

Backends (auto order): ``triton`` (CUDA; on the CPU only when asked for explicitly, under
``TRITON_INTERPRET=1``), ``apex`` (apex's ``FusedLayerNorm`` after an eager dropout + add; only when
apex is installed), ``reference`` (eager PyTorch).
"""

from __future__ import annotations

import torch

from fastvl import _checks
from fastvl.dispatch import needs_cuda_device, needs_module, op, triton_available, triton_device
from fastvl.reference.layer_norm import layer_norm_ref

LAYER_NORM = op("layer_norm", probe=dict(hidden=768, dropout=True))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, dropout_p: float = 0.0, eps: float = 1e-12, *,
               backend: str | None = None) -> torch.Tensor:
    """``LayerNorm(dropout(x) + residual) * weight + bias`` over the last dim.

    x ``[..., N]`` (float16 / bfloat16 / float32; float64 on the reference backend); residual
    ``[..., N]`` like x (any float dtype), or None; weight ``[N]``; bias ``[N]`` or None; ``eps``
    defaults to BERT's 1e-12. ``dropout_p`` applies to x only (pass 0 in eval mode). Statistics are
    computed in float32; the result has the promoted dtype of x and residual (under autocast a bf16
    sub-layer output added to a float32 residual stream gives float32, as torch's LayerNorm does).
    Gradients flow to x, residual, weight and bias.
    """
    if not _inputs_ok(x, weight, bias, residual, dropout_p, eps):
        _explain_inputs(x, weight, bias, residual, dropout_p, eps)
    hidden = x.shape[-1]
    dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    chosen = LAYER_NORM.select(backend, x.device, dtype=dtype, hidden=hidden, dropout=dropout_p > 0.0)
    return chosen.impl(x, weight, bias, residual, dropout_p, eps)


def _inputs_ok(x, weight, bias, residual, dropout_p, eps) -> bool:
    """The common valid call, checked cheaply (one pass, no messages built); anything else goes to
    :func:`_explain_inputs`, which raises the error naming the argument."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and 1 <= x.dim() <= 7
            and x.dtype in _checks.FLOAT_DTYPES and weight.dtype in _checks.FLOAT_DTYPES):
        return False
    device, hidden = x.device, x.shape[-1:]
    if weight.shape != hidden or weight.device != device:
        return False
    for extra, shape in ((bias, hidden), (residual, x.shape)):
        if extra is not None and not (isinstance(extra, torch.Tensor) and extra.shape == shape
                                      and extra.device == device and extra.dtype in _checks.FLOAT_DTYPES):
            return False
    return isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0 and eps > 0


def _explain_inputs(x, weight, bias, residual, dropout_p, eps) -> None:
    _checks.tensor("x", x, shape="[..., N]", ndim=range(1, 8))
    hidden = x.shape[-1]
    _checks.tensor("weight", weight, shape=f"[N] = [{hidden}]", ndim=1)
    _checks.same_shape("weight", weight, [hidden], "[N] with N = x.shape[-1]")
    if bias is not None:
        _checks.tensor("bias", bias, shape=f"[N] = [{hidden}]", ndim=1)
        _checks.same_shape("bias", bias, [hidden], "[N] with N = x.shape[-1]")
    if residual is not None:
        _checks.tensor("residual", residual, shape="[..., N] like x")
        _checks.same_shape("residual", residual, list(x.shape), "x's shape")
    _checks.same_device("x", x, weight=weight, bias=bias, residual=residual)
    _checks.probability("dropout_p", dropout_p)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def _reference_impl(x, weight, bias, residual, dropout_p, eps):
    return layer_norm_ref(x, weight, bias, residual, dropout_p, eps)


# Triton backend: custom ops (visible to torch.compile) + autograd ---------------------------------
# Eager calls skip the custom-op layer (its dispatch costs more host time than the kernel's launch):
# they run the same launch functions under a plain autograd.Function; torch.compile sees the custom ops.


def _block_cols(hidden: int) -> int:
    """BLOCK_N: the next power of two >= hidden, at least 128 (plain Python: triton's helpers cost more)."""
    return max(1 << max(hidden - 1, 0).bit_length(), 128)


_SM_COUNTS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _kernels():
    """fastvl.kernels.layer_norm, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from fastvl.kernels import layer_norm as kernels

        _KERNELS = kernels
    return _KERNELS


_KERNELS = None


def _launch_forward(x, residual, weight, bias, seed, dropout_p, eps):
    kernels = _kernels()
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    rows = x2.shape[0]
    residual2 = residual.reshape(-1, hidden).contiguous() if residual is not None else None
    has_dropout = seed is not None
    store_sum = has_dropout or residual is not None
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    # y and the sum are allocated in x's shape, contiguous: row stride = hidden, no views to return
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    hidden_sum = torch.empty(x.shape, dtype=out_dtype, device=x.device) if store_sum else x2.new_empty(0)
    keep = x2.new_empty(x2.shape if has_dropout else (0,), dtype=torch.int8)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        block = _block_cols(hidden)
        block_m = kernels.block_rows(block)
        kernels.layer_norm_fwd_kernel[(-(-rows // block_m),)](
            x2, residual2 if residual2 is not None else x2, weight, bias if bias is not None else weight,
            seed if seed is not None else mean, y, hidden_sum if store_sum else y, keep if has_dropout else y,
            mean, rstd, x2.stride(0), residual2.stride(0) if residual2 is not None else 0, hidden,
            hidden if store_sum else 0, hidden if has_dropout else 0, rows, hidden, dropout_p, eps,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout, HAS_BIAS=bias is not None,
            STORE_SUM=store_sum, BLOCK_M=block_m, BLOCK_N=block, num_warps=kernels.num_warps_for(block))
    return y, hidden_sum, keep, mean, rstd


@torch.library.custom_op("fastvl::layer_norm_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                    seed: torch.Tensor | None, dropout_p: float, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, pre-norm sum or empty, int8 keep-mask or empty, mean [M], rstd [M])."""
    return _launch_forward(x, residual, weight, bias, seed, dropout_p, eps)


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, dropout_p, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    store_sum = seed is not None or residual is not None
    keep_shape = (rows, x.shape[-1]) if seed is not None else (0,)
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    stored = x.new_empty(x.shape, dtype=out_dtype) if store_sum else x.new_empty(0)
    return (x.new_empty(x.shape, dtype=out_dtype), stored,
            x.new_empty(keep_shape, dtype=torch.int8), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


def _launch_backward(dy, hidden_sum, weight, mean, rstd, keep, dropout_p, has_bias):
    kernels = _kernels()
    hidden = dy.shape[-1]
    dy2 = dy.reshape(-1, hidden).contiguous()
    h2 = hidden_sum.reshape(-1, hidden).contiguous()
    rows = dy2.shape[0]
    has_dropout = keep.numel() > 0
    # gradients allocated in dy's shape, contiguous (row stride = hidden)
    dh = torch.empty(dy.shape, dtype=h2.dtype, device=dy.device)
    dx = torch.empty(dy.shape, dtype=h2.dtype, device=dy.device) if has_dropout else dh.new_empty(0)
    block = _block_cols(hidden)
    block_m = kernels.block_rows(block)
    row_blocks = max(-(-rows // block_m), 1)
    # enough programs to fill the GPU, few partial rows to reduce
    programs = min(row_blocks, 4 * _multiprocessors(dy.device) if dy.is_cuda else 4)
    blocks_per_program = -(-row_blocks // programs)
    programs = -(-row_blocks // blocks_per_program)
    # Every program writes its whole row of the partial sums (dweight's, then dbias's): no zero-fill
    # unless nothing runs; one reduction launch sums both.
    alloc = torch.empty if rows else torch.zeros
    partial = alloc(1 + has_bias, programs, hidden, dtype=torch.float32, device=dy.device)
    if rows:
        kernels.layer_norm_bwd_kernel[(programs,)](
            dy2, h2, weight, mean, rstd, keep if has_dropout else dy2, dh, dx if has_dropout else dh,
            partial[0], partial[-1], dy2.stride(0), h2.stride(0), hidden if has_dropout else 0, hidden,
            hidden if has_dropout else 0, rows, hidden, blocks_per_program, dropout_p,
            HAS_DROPOUT=has_dropout, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block,
            num_warps=kernels.num_warps_for(block))
    return dh, dx, partial.sum(1).to(weight.dtype)


@torch.library.custom_op("fastvl::layer_norm_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _layer_norm_bwd(dy: torch.Tensor, hidden_sum: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, keep: torch.Tensor, dropout_p: float, has_bias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d pre-norm sum = d residual, dx or empty when no dropout, [dweight] or [dweight, dbias])."""
    return _launch_backward(dy, hidden_sum, weight, mean, rstd, keep, dropout_p, has_bias)


@_layer_norm_bwd.register_fake
def _(dy, hidden_sum, weight, mean, rstd, keep, dropout_p, has_bias):
    return (dy.new_empty(dy.shape), dy.new_empty(dy.shape) if keep.numel() else dy.new_empty(0),
            weight.new_empty((1 + has_bias, weight.shape[0])))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, dropout_p, eps = inputs
    _, hidden_sum, keep, mean, rstd = output
    stored = hidden_sum if (seed is not None or residual is not None) else x
    ctx.save_for_backward(stored, weight, mean, rstd, keep)
    ctx.set_materialize_grads(False)  # the internal outputs get no gradient: no zero-filled buffers
    ctx.dropout_p, ctx.has_bias, ctx.has_residual = dropout_p, bias is not None, residual is not None


def _grads(ctx, dy, launch_backward):
    stored, weight, mean, rstd, keep = ctx.saved_tensors
    dh, dx, param_grads = launch_backward(dy, stored, weight, mean, rstd, keep, ctx.dropout_p, ctx.has_bias)
    return (dx if keep.numel() else dh, dh if ctx.has_residual else None, param_grads[0],
            param_grads[1] if ctx.has_bias else None, None, None, None)


def _backward(ctx, dy, _dsum, _dkeep, _dmean, _drstd):
    return _grads(ctx, dy, _layer_norm_bwd)


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNorm(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op dispatch (eager calls only)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, seed, dropout_p, eps):
        output = _launch_forward(x, residual, weight, bias, seed, dropout_p, eps)
        _setup_context(ctx, (x, residual, weight, bias, seed, dropout_p, eps), output)
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _launch_backward)


def _triton_impl(x, weight, bias, residual, dropout_p, eps):
    seed = None
    if dropout_p > 0.0:
        from fastvl.ops.dropout_seed import next_seed  # a view of the forward's seed pool, or a draw
        seed = next_seed(x.device, high=2**31 - 1)
    if torch.compiler.is_compiling():
        return _layer_norm_fwd(x, residual, weight, bias, seed, float(dropout_p), float(eps))[0]
    return _EagerLayerNorm.apply(x, residual, weight, bias, seed, float(dropout_p), float(eps))


def _triton_supports(device, dtype, hidden, **_features) -> list[str]:
    reasons = triton_device(device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {dtype} (triton takes float16, bfloat16, float32)")
    if hidden > 8192:
        reasons.append(f"hidden size {hidden} > 8192 (one row per program)")
    return reasons


def _apex_impl(x, weight, bias, residual, dropout_p, eps):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    hidden = torch.nn.functional.dropout(x, dropout_p) if dropout_p > 0.0 else x
    if residual is not None:
        hidden = hidden + residual
    if bias is None:
        bias = torch.zeros_like(weight)
    return fused_layer_norm_affine(hidden, weight, bias, hidden.shape[-1:], eps)


def _apex_supports(device, dtype, **_features) -> list[str]:
    reasons = needs_cuda_device(device)
    if dtype == torch.float64:
        reasons.append("dtype float64")
    return reasons


LAYER_NORM.register("triton", available=triton_available, supports=_triton_supports,
                    auto_devices=("cuda",))(_triton_impl)
LAYER_NORM.register("apex", available=needs_module("apex"), supports=_apex_supports, auto_devices=("cuda",))(_apex_impl)
LAYER_NORM.register("reference")(_reference_impl)
