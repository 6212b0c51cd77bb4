"""``fastvl.ops.co_attention``: ViLBERT's bidirectional co-attention (image queries over text keys and
values, text queries over image keys and values) as one op.

Backends (auto order): ``triton`` (both directions in one forward launch and a fused backward, see
``fastvl.kernels.attention``; CUDA, or CPU under ``TRITON_INTERPRET=1`` when asked for by name),
``sdpa`` (two torch SDPA calls), ``reference`` (mirrors ``BertBiAttention``). Layers: the custom ops
``fastvl::co_attention_fwd`` / ``co_attention_bwd`` with fake implementations, the autograd glue, and
the public :func:`co_attention`.
"""

from __future__ import annotations

import math

import torch

from fastvl import _checks
from fastvl.dispatch import op, triton_available
from fastvl.ops.attention import (ATTENTION, _DTYPE_NAMES, _kernels, _max_seqlen, _torch_supports,
                                  _triton_cdiv, block_configs, check_cu_seqlens, draw_seed, lse_strides, mask_arg,
                                  new_lse, rows_strides, triton_supports)
from fastvl.reference.co_attention import co_attention_ref, varlen_co_attention_ref

CO_ATTENTION = op("co_attention", probe=dict(head_dim=128, dropout=False, packed=False))


def co_attention(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, mask_v: torch.Tensor | None,
                 q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, mask_t: torch.Tensor | None,
                 dropout_p: float = 0.0, scale: float | None = None, *,
                 cu_seqlens_v: torch.Tensor | None = None, cu_seqlens_t: torch.Tensor | None = None,
                 max_seqlen_v: int | None = None, max_seqlen_t: int | None = None,
                 dropout_seed: int | torch.Tensor | None = None, deterministic: bool = False,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional co-attention (ViLBERT's Co-TRM attention).

    Padded form. Image stream: q_v, k_v, v_v ``[B, Lv, H, D]``, mask_v ``[B, Lv]`` (True = real
    region). Text stream: q_t, k_t, v_t ``[B, Lt, H, D]``, mask_t ``[B, Lt]`` (True = real token).
    Masks may also be the original additive float form (0 / -10000, ``[B, L]`` or ``[B, 1, 1, L]``).
    Any strides (views of fused projections need no copies).

    Packed form: q_v, k_v, v_v ``[total_v, H, D]`` with ``cu_seqlens_v``, q_t, k_t, v_t
    ``[total_t, H, D]`` with ``cu_seqlens_t`` (int32 ``[B + 1]`` each: each stream has its own lengths),
    optional ``max_seqlen_v`` / ``max_seqlen_t`` (pass them to avoid a host sync); masks must be None.

    Returns ``(ctx_v, ctx_t)`` shaped like q_v and q_t: ``ctx_v`` = image queries attending to the
    text keys/values under mask_t; ``ctx_t`` = text queries attending to the image keys/values under
    mask_v. Rows with no real key are zeros with zero gradient. All six projections share H, D and one
    dtype. Dropout and ``dropout_seed`` / ``deterministic`` as in :func:`fastvl.ops.attention`; the
    triton backend's direction 1 (text queries) draws with ``seed + 1``.
    """
    packed = cu_seqlens_v is not None or cu_seqlens_t is not None
    rank = 3 if packed else 4
    form_v, form_t = ("[total_v, H, D]", "[total_t, H, D]") if packed else ("[B, Lv, H, D]", "[B, Lt, H, D]")
    _checks.tensor("q_v", q_v, shape=form_v, ndim=rank)
    heads, head_dim = q_v.shape[-2:]
    lead_v = list(q_v.shape[:-2])
    for name, t in (("k_v", k_v), ("v_v", v_v)):
        _checks.tensor(name, t, shape=form_v, ndim=rank)
        _checks.same_shape(name, t, [*lead_v, heads, head_dim], form_v + " equal to q_v")
    _checks.tensor("q_t", q_t, shape=form_t, ndim=rank)
    lead_t = [q_v.shape[0], q_t.shape[1]] if not packed else [q_t.shape[0]]
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.tensor(name, t, shape=form_t, ndim=rank)
        _checks.same_shape(name, t, [*lead_t, heads, head_dim], form_t + " with " + ("H, D" if packed else "B, H, D")
                           + " of q_v")
    _checks.same_device("q_v", q_v, k_v=k_v, v_v=v_v, q_t=q_t, k_t=k_t, v_t=v_t, mask_v=mask_v, mask_t=mask_t,
                        cu_seqlens_v=cu_seqlens_v, cu_seqlens_t=cu_seqlens_t)
    _checks.same_dtype("q_v", q_v, k_v=k_v, v_v=v_v, q_t=q_t, k_t=k_t, v_t=v_t)
    _checks.probability("dropout_p", dropout_p)
    if packed:
        if mask_v is not None or mask_t is not None:
            raise ValueError("mask_v and mask_t must be None in the packed form (cu_seqlens_* carry the lengths)")
        if cu_seqlens_v is None or cu_seqlens_t is None:
            raise ValueError("the packed form needs both cu_seqlens_v and cu_seqlens_t ([B + 1] int32)")
        check_cu_seqlens("cu_seqlens_v", cu_seqlens_v, q_v.shape[0])
        check_cu_seqlens("cu_seqlens_t", cu_seqlens_t, q_t.shape[0])
        if cu_seqlens_v.shape != cu_seqlens_t.shape:
            raise ValueError(f"cu_seqlens_v and cu_seqlens_t must both be [B + 1], got {list(cu_seqlens_v.shape)} "
                             f"and {list(cu_seqlens_t.shape)}")
    else:
        batch, len_v, len_t = q_v.shape[0], q_v.shape[1], q_t.shape[1]
        mask_v = _checks.key_padding_mask("mask_v", mask_v, batch, len_v, q_v.device)
        mask_t = _checks.key_padding_mask("mask_t", mask_t, batch, len_t, q_v.device)
    chosen = CO_ATTENTION.select(backend, q_v.device, dtype=q_v.dtype, head_dim=head_dim, dropout=dropout_p > 0.0,
                                 packed=packed, seeded=dropout_seed is not None, deterministic=deterministic)
    return chosen.impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale, cu_seqlens_v, cu_seqlens_t,
                       max_seqlen_v, max_seqlen_t, dropout_seed)


# Triton backend: launchers ---------------------------------------------------------------------------


def _co_attention_forward(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_v, cu_t, len_v, len_t, dropout_p, scale,
                          seed):
    kernels = _kernels()
    packed = cu_v is not None
    heads, head_dim = q_v.shape[-2:]
    batch = cu_v.shape[0] - 1 if packed else q_v.shape[0]
    ctx_v = torch.empty(q_v.shape, dtype=q_v.dtype, device=q_v.device)
    ctx_t = torch.empty(q_t.shape, dtype=q_t.dtype, device=q_t.device)
    lse_v, stride_lse_v = new_lse(q_v, batch, packed)
    lse_t, stride_lse_t = new_lse(q_t, batch, packed)
    config, _ = block_configs(q_v.dtype, head_dim, False)
    grid = (_triton_cdiv(len_v, config.block_m) + _triton_cdiv(len_t, config.block_m), batch * heads)
    if grid[0] * grid[1] == 0:
        return ctx_v.zero_(), ctx_t.zero_(), lse_v.fill_(math.inf), lse_t.fill_(math.inf)
    mask_v_ptr, *mask_v_stride = mask_arg(mask_v, seed)
    mask_t_ptr, *mask_t_stride = mask_arg(mask_t, seed)
    kernels.co_attention_fwd_kernel[grid](
        q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v_ptr, mask_t_ptr,
        cu_v if packed else seed, cu_t if packed else seed, seed,
        *rows_strides(q_v, packed), *rows_strides(k_v, packed), *rows_strides(v_v, packed),
        *rows_strides(q_t, packed), *rows_strides(k_t, packed), *rows_strides(v_t, packed),
        *rows_strides(ctx_v, packed), *rows_strides(ctx_t, packed), *stride_lse_v, *stride_lse_t,
        *mask_v_stride, *mask_t_stride, len_v, len_t, heads, head_dim, scale * kernels.LOG2E, dropout_p,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=kernels.head_block(head_dim),
        EVEN_D=head_dim == kernels.head_block(head_dim), HAS_MASK_V=mask_v is not None,
        HAS_MASK_T=mask_t is not None, IS_VARLEN=packed, HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=kernels.PRECISION[_DTYPE_NAMES[q_v.dtype]], num_warps=config.num_warps,
        num_stages=config.num_stages)
    return ctx_v, ctx_t, lse_v, lse_t


def _co_attention_backward(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t,
                           cu_v, cu_t, len_v, len_t, dropout_p, scale, seed):
    kernels = _kernels()
    packed = cu_v is not None
    heads, head_dim = q_v.shape[-2:]
    batch = cu_v.shape[0] - 1 if packed else q_v.shape[0]
    grads = [torch.empty_like(t) for t in (q_v, k_v, v_v, q_t, k_t, v_t)]
    if batch * heads == 0 or len_v + len_t == 0:
        return tuple(g.zero_() for g in grads)
    dq_v, dk_v, dv_v, dq_t, dk_t, dv_t = grads
    if not packed:
        cu_v = cu_t = seed  # unused placeholders
    _, config = block_configs(q_v.dtype, head_dim, False)
    blocks = sum(_triton_cdiv(n, config.block_n) + _triton_cdiv(n, config.block_m) for n in (len_v, len_t))
    mask_v_ptr, *mask_v_stride = mask_arg(mask_v, seed)
    mask_t_ptr, *mask_t_stride = mask_arg(mask_t, seed)
    kernels.co_attention_bwd_kernel[(blocks, batch * heads)](
        q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, grad_v, grad_t, dq_v, dk_v, dv_v, dq_t, dk_t, dv_t,
        lse_v, lse_t, mask_v_ptr, mask_t_ptr, cu_v, cu_t, seed,
        *(s for t in (q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, grad_v, grad_t, dq_v, dk_v, dv_v, dq_t, dk_t, dv_t)
          for s in rows_strides(t, packed)),
        *lse_strides(lse_v, packed), *lse_strides(lse_t, packed), *mask_v_stride, *mask_t_stride,
        len_v, len_t, heads, head_dim, scale * kernels.LOG2E, scale, dropout_p,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=kernels.head_block(head_dim),
        EVEN_D=head_dim == kernels.head_block(head_dim), HAS_MASK_V=mask_v is not None,
        HAS_MASK_T=mask_t is not None, IS_VARLEN=packed, HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=kernels.PRECISION[_DTYPE_NAMES[q_v.dtype]], num_warps=config.num_warps,
        num_stages=config.num_stages)
    return tuple(grads)


# Triton backend: custom ops and autograd --------------------------------------------------------------


@torch.library.custom_op("fastvl::co_attention_fwd", mutates_args=())
def co_attention_fwd_op(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, mask_v: torch.Tensor | None,
                        q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, mask_t: torch.Tensor | None,
                        cu_seqlens_v: torch.Tensor | None, cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int,
                        max_seqlen_t: int, dropout_p: float, scale: float, seed: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ctx_v, ctx_t, lse_v, lse_t, seed used), both directions in one launch."""
    seed = draw_seed(dropout_p, seed, q_v.device)
    outputs = _co_attention_forward(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_seqlens_v, cu_seqlens_t,
                                    max_seqlen_v, max_seqlen_t, dropout_p, scale, seed)
    return (*outputs, seed)


@co_attention_fwd_op.register_fake
def _(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_seqlens_v, cu_seqlens_t, max_seqlen_v, max_seqlen_t,
      dropout_p, scale, seed):
    def lse(q):
        shape = (q.shape[1], q.shape[0]) if cu_seqlens_v is not None else (q.shape[0], q.shape[2], q.shape[1])
        return q.new_empty(shape, dtype=torch.float32)

    seed_out = q_v.new_empty((1,), dtype=torch.int64)
    return q_v.new_empty(q_v.shape), q_t.new_empty(q_t.shape), lse(q_v), lse(q_t), seed_out


@torch.library.custom_op("fastvl::co_attention_bwd", mutates_args=())
def co_attention_bwd_op(grad_v: torch.Tensor, grad_t: torch.Tensor, q_v: torch.Tensor, k_v: torch.Tensor,
                        v_v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, ctx_v: torch.Tensor,
                        ctx_t: torch.Tensor, lse_v: torch.Tensor, lse_t: torch.Tensor, mask_v: torch.Tensor | None,
                        mask_t: torch.Tensor | None, cu_seqlens_v: torch.Tensor | None,
                        cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int, max_seqlen_t: int, dropout_p: float,
                        scale: float, seed: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq_v, dk_v, dv_v, dq_t, dk_t, dv_t), every gradient of both directions in one launch."""
    return _co_attention_backward(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v,
                                  mask_t, cu_seqlens_v, cu_seqlens_t, max_seqlen_v, max_seqlen_t, dropout_p, scale,
                                  seed)


@co_attention_bwd_op.register_fake
def _(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, *_rest):
    return tuple(torch.empty_like(t) for t in (q_v, k_v, v_v, q_t, k_t, v_t))


def _co_attention_setup_context(ctx, inputs, output):
    q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_v, cu_t, max_v, max_t, dropout_p, scale, _ = inputs
    ctx_v, ctx_t, lse_v, lse_t, seed = output
    ctx.save_for_backward(q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t, seed)
    ctx.arguments = (max_v, max_t, dropout_p, scale)


def _co_attention_backward_glue(ctx, grad_v, grad_t, _grad_lse_v, _grad_lse_t, _grad_seed):
    q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t, seed = ctx.saved_tensors
    dq_v, dk_v, dv_v, dq_t, dk_t, dv_t = co_attention_bwd_op(
        grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t,
        *ctx.arguments, seed)
    return dq_v, dk_v, dv_v, None, dq_t, dk_t, dv_t, None, None, None, None, None, None, None, None


co_attention_fwd_op.register_autograd(_co_attention_backward_glue, setup_context=_co_attention_setup_context)


# Backends ----------------------------------------------------------------------------------------------


def _triton_impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale, cu_v, cu_t, max_v, max_t,
                 dropout_seed=None):
    if cu_v is not None:
        max_v, max_t = _max_seqlen(cu_v, max_v), _max_seqlen(cu_t, max_t)
    else:
        max_v, max_t = q_v.shape[1], q_t.shape[1]
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else scale
    seed = None if dropout_seed is None else torch.as_tensor(dropout_seed, dtype=torch.int64).reshape(1).to(q_v.device)
    ctx_v, ctx_t, *_ = co_attention_fwd_op(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_v, cu_t, max_v, max_t,
                                           float(dropout_p), float(scale), seed)
    return ctx_v, ctx_t


def _sdpa_impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale, cu_v, cu_t, max_v, max_t,
               dropout_seed=None):
    sdpa = ATTENTION.backends["sdpa"].impl
    ctx_v = sdpa(q_v, k_t, v_t, mask_t, dropout_p, scale, False, cu_v, cu_t, max_v, max_t)
    ctx_t = sdpa(q_t, k_v, v_v, mask_v, dropout_p, scale, False, cu_t, cu_v, max_t, max_v)
    return ctx_v, ctx_t


def _reference_impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale, cu_v, cu_t, max_v, max_t,
                    dropout_seed=None):
    if cu_v is None:
        return co_attention_ref(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale)
    return varlen_co_attention_ref(q_v, k_v, v_v, cu_v, q_t, k_t, v_t, cu_t, dropout_p, scale)


CO_ATTENTION.register("triton", available=triton_available, supports=triton_supports, auto_devices=("cuda",))(
    _triton_impl)
CO_ATTENTION.register("sdpa", supports=_torch_supports)(_sdpa_impl)
CO_ATTENTION.register("reference", supports=lambda seeded=False, **_: (
    ["dropout_seed is honoured by the triton backend only"] if seeded else []))(_reference_impl)
