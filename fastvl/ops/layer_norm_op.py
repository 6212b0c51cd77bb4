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
# The host work per call is kept to what the kernels need: every [M, N] tensor contiguous (row stride =
# hidden, no reshapes), no buffer for what is not stored, the block configuration looked up once per
# hidden size.


_CONFIGS: dict[int, tuple[int, int, int]] = {}


def _config(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) for a hidden size: BLOCK_N the next power of two >= hidden, at
    least 128."""
    config = _CONFIGS.get(hidden)
    if config is None:
        kernels = _kernels()
        block = max(1 << max(hidden - 1, 0).bit_length(), 128)
        config = _CONFIGS[hidden] = (block, kernels.block_rows(block), kernels.num_warps_for(block))
    return config


# Backward: up to this many blocks of rows run in one program (a few microseconds of kernel) rather
# than spread over programs whose partial sums then need a reduction launch.
SINGLE_PROGRAM_BLOCKS = 4
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


def _launch_forward(x, residual, weight, bias, seed, dropout_p, eps, store_sum=True):
    """(y, pre-norm sum or None, int8 keep-mask or None, mean [M], rstd [M]). The sum is kept (for the
    backward) when ``store_sum`` and there is a residual or dropout; else the backward reads x."""
    if not x.is_contiguous():
        x = x.contiguous()
    if residual is not None:
        if not residual.is_contiguous():
            residual = residual.contiguous()
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
    else:
        out_dtype = x.dtype
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    store_sum = store_sum and (seed is not None or residual is not None)
    # outputs in x's shape, contiguous (row stride = hidden): no views to return
    # (empty_like of a contiguous tensor is contiguous, and costs the host half what torch.empty does)
    y = torch.empty_like(x) if out_dtype == x.dtype else torch.empty_like(x, dtype=out_dtype)
    hidden_sum = torch.empty_like(y) if store_sum else None
    keep = torch.empty_like(x, dtype=torch.int8) if seed is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        block, block_m, warps = _config(hidden)
        _kernels().layer_norm_fwd_kernel[(-(-rows // block_m),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            seed if seed is not None else mean, y, hidden_sum if store_sum else y, keep if keep is not None else y,
            mean, rstd, hidden, hidden if residual is not None else 0, hidden, hidden if store_sum else 0,
            hidden if keep is not None else 0, rows, hidden, dropout_p, eps,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=seed is not None, HAS_BIAS=bias is not None,
            STORE_SUM=store_sum, BLOCK_M=block_m, BLOCK_N=block, num_warps=warps)
    return y, hidden_sum, keep, mean, rstd


@torch.library.custom_op("fastvl::layer_norm_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                    seed: torch.Tensor | None, dropout_p: float, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, pre-norm sum or empty, int8 keep-mask or empty, mean [M], rstd [M])."""
    y, hidden_sum, keep, mean, rstd = _launch_forward(x, residual, weight, bias, seed, dropout_p, eps)
    return (y, hidden_sum if hidden_sum is not None else x.new_empty(0),
            keep if keep is not None else x.new_empty(0, dtype=torch.int8), mean, rstd)


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, dropout_p, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    store_sum = seed is not None or residual is not None
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    stored = x.new_empty(x.shape, dtype=out_dtype) if store_sum else x.new_empty(0)
    return (x.new_empty(x.shape, dtype=out_dtype), stored,
            x.new_empty(x.shape if seed is not None else (0,), dtype=torch.int8),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


def _launch_backward(dy, hidden_sum, weight, mean, rstd, keep, dropout_p, has_bias, stacked=True):
    """(d pre-norm sum = d residual, dx or None when no dropout, parameter gradients): with ``stacked``
    (the custom op's one output) [1 + has_bias, N] = dweight (, dbias), else (dweight, dbias or None)."""
    # hidden_sum is x itself when the forward stored no sum: contiguous only if the caller's x was
    if not hidden_sum.is_contiguous():
        hidden_sum = hidden_sum.contiguous()
    if not dy.is_contiguous():
        dy = dy.contiguous()
    hidden = dy.shape[-1]
    rows = mean.shape[0]
    # gradients like the stored sum: dy's shape and the forward's output dtype, contiguous
    dh = torch.empty_like(hidden_sum)
    dx = torch.empty_like(hidden_sum) if keep is not None else None
    if not rows:
        param_grads = torch.zeros(1 + has_bias, hidden, dtype=weight.dtype, device=dy.device)
        return dh, dx, param_grads if stacked else _unstack(param_grads, has_bias)
    block, block_m, warps = _config(hidden)
    row_blocks = -(-rows // block_m)
    # A few row blocks: one program walks them all and writes the gradients themselves (no reduction
    # launch). More: enough programs to fill the GPU, few partial rows to reduce.
    if row_blocks <= SINGLE_PROGRAM_BLOCKS:
        programs = 1
    else:
        programs = min(row_blocks, 4 * _multiprocessors(dy.device) if dy.is_cuda else 4)
    blocks_per_program = -(-row_blocks // programs)
    programs = -(-row_blocks // blocks_per_program)
    # Every program writes its whole row of the partial sums (dweight's, then dbias's): no zero-fill;
    # one reduction sums both. One program writes the gradients themselves: stacked [1 + has_bias, N],
    # or (eager calls) two vectors (gradients that are views cost the autograd engine more).
    vectors = programs == 1 and not stacked
    if vectors:
        dweight = torch.empty(hidden, dtype=torch.float32, device=dy.device)
        dbias = torch.empty_like(dweight) if has_bias else dweight
    else:
        partial = torch.empty((1 + has_bias, programs, hidden) if programs > 1 else (1 + has_bias, hidden),
                              dtype=torch.float32, device=dy.device)
        dweight, dbias = partial[0], partial[-1]
    _kernels().layer_norm_bwd_kernel[(programs,)](
        dy, hidden_sum, weight, mean, rstd, keep if keep is not None else dy, dh, dx if dx is not None else dh,
        dweight, dbias, hidden, hidden, hidden if keep is not None else 0, hidden,
        hidden if dx is not None else 0, rows, hidden, blocks_per_program, dropout_p,
        HAS_DROPOUT=keep is not None, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block, num_warps=warps)
    if vectors:
        dbias = dbias if has_bias else None
        if weight.dtype != torch.float32:
            dweight, dbias = dweight.to(weight.dtype), dbias.to(weight.dtype) if has_bias else None
        return dh, dx, (dweight, dbias)
    param_grads = partial.sum(1) if programs > 1 else partial
    if weight.dtype != torch.float32:
        param_grads = param_grads.to(weight.dtype)
    return dh, dx, param_grads if stacked else _unstack(param_grads, has_bias)


@torch.library.custom_op("fastvl::layer_norm_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _layer_norm_bwd(dy: torch.Tensor, hidden_sum: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, keep: torch.Tensor, dropout_p: float, has_bias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d pre-norm sum = d residual, dx or empty when no dropout, [dweight] or [dweight, dbias])."""
    dh, dx, param_grads = _launch_backward(dy, hidden_sum, weight, mean, rstd, keep if keep.numel() else None,
                                           dropout_p, has_bias)
    return dh, dx if dx is not None else dh.new_empty(0), param_grads


@_layer_norm_bwd.register_fake
def _(dy, hidden_sum, weight, mean, rstd, keep, dropout_p, has_bias):
    return (dy.new_empty(dy.shape), dy.new_empty(dy.shape) if keep.numel() else dy.new_empty(0),
            weight.new_empty((1 + has_bias, weight.shape[0])))


def _unstack(param_grads, has_bias):
    """(dweight, dbias or None) from [1 + has_bias, N]."""
    return param_grads.unbind(0) if has_bias else (param_grads[0], None)


def _grads(dh, dx, param_grads, has_residual):
    """The autograd outputs (x, residual, weight, bias, seed, dropout_p, eps) from the kernel's."""
    return dx if dx is not None else dh, dh if has_residual else None, *param_grads, None, None, None


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, dropout_p, eps = inputs
    _, hidden_sum, keep, mean, rstd = output
    stored = hidden_sum if (seed is not None or residual is not None) else x
    ctx.save_for_backward(stored, weight, mean, rstd, keep)
    ctx.set_materialize_grads(False)  # the internal outputs get no gradient: no zero-filled buffers
    ctx.flags = dropout_p, bias is not None, residual is not None


def _backward(ctx, dy, _dsum, _dkeep, _dmean, _drstd):
    stored, weight, mean, rstd, keep = ctx.saved_tensors
    dropout_p, has_bias, has_residual = ctx.flags
    dh, dx, param_grads = _layer_norm_bwd(dy, stored, weight, mean, rstd, keep, dropout_p, has_bias)
    return _grads(dh, dx if keep.numel() else None, _unstack(param_grads, has_bias), has_residual)


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNorm(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op dispatch (eager calls only)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, seed, dropout_p, eps):
        y, hidden_sum, keep, mean, rstd = _launch_forward(x, residual, weight, bias, seed, dropout_p, eps)
        ctx.save_for_backward(hidden_sum if hidden_sum is not None else x, weight, mean, rstd, keep)
        ctx.flags = dropout_p, bias is not None, residual is not None  # (one output: no grads to materialise)
        return y

    @staticmethod
    def backward(ctx, dy):
        stored, weight, mean, rstd, keep = ctx.saved_tensors
        dropout_p, has_bias, has_residual = ctx.flags
        dh, dx, param_grads = _launch_backward(dy, stored, weight, mean, rstd, keep, dropout_p, has_bias,
                                               stacked=False)
        return _grads(dh, dx, param_grads, has_residual)


# Function.apply's C++ entry: Function.apply adds Python work (default-argument binding, unwrapping
# dead functorch wrappers) that these arguments never need; under a functorch transform the full
# apply runs.
_EAGER_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerLayerNorm)


def _needs_grad(x, residual, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (residual is not None and residual.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def _triton_impl(x, weight, bias, residual, dropout_p, eps):
    seed = None
    if dropout_p > 0.0:
        from fastvl.ops.dropout_seed import next_seed  # a view of the forward's seed pool, or a draw
        seed = next_seed(x.device, high=2**31 - 1)
    if torch.compiler.is_compiling():
        return _layer_norm_fwd(x, residual, weight, bias, seed, float(dropout_p), float(eps))[0]
    if not _needs_grad(x, residual, weight, bias):  # inference: nothing kept for a backward
        return _launch_forward(x, residual, weight, bias, seed, float(dropout_p), float(eps), store_sum=False)[0]
    if torch._C._are_functorch_transforms_active():
        return _EagerLayerNorm.apply(x, residual, weight, bias, seed, float(dropout_p), float(eps))
    return _EAGER_APPLY(x, residual, weight, bias, seed, float(dropout_p), float(eps))


def _triton_supports(device, dtype, hidden, **_features) -> list[str]:
    device_ok = _TRITON_DEVICE_OK.get(device.type)
    if device_ok is None:  # like backend availability, evaluated once (the machine does not change)
        device_ok = _TRITON_DEVICE_OK[device.type] = not triton_device(device)
    if device_ok and dtype in _TRITON_DTYPES and hidden <= 8192:  # the common case, cheaply
        return []
    reasons = triton_device(device)
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} (triton takes float16, bfloat16, float32)")
    if hidden > 8192:
        reasons.append(f"hidden size {hidden} > 8192 (one row per program)")
    return reasons


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DEVICE_OK: dict[str, bool] = {}


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
