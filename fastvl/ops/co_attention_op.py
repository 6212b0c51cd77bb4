"""``fastvl.ops.co_attention``: ViLBERT's bidirectional co-attention (image queries over text keys and
values, text queries over image keys and values) as one op, a sibling of :mod:`fastvl.ops.attention_op`.

Backends (auto order): ``triton`` (both directions in one forward launch and a fused backward, see
``fastvl.kernels.attention`` and the launchers of :mod:`fastvl.ops.attention_launch`; CUDA, or CPU
under ``TRITON_INTERPRET=1`` when asked for by name), ``sdpa`` (two torch SDPA calls), ``eager`` (two
step-by-step math calls, for ``return_probs=True`` only), ``reference`` (mirrors ``BertBiAttention``).
The public :func:`co_attention` validates once and hands every backend one frozen
:class:`CoAttentionInputs`. Layers of the triton backend: the custom ops
``fastvl::co_attention_fwd`` / ``co_attention_bwd`` with fake implementations, the autograd glue, and
the backend function; ``fastvl::co_attention_qkv_fwd`` / ``co_attention_qkv_bwd`` when each stream's
q, k, v are the head groups of one fused projection (one gradient buffer per stream, in its layout).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree

from fastvl import _checks
from fastvl.dispatch import backward_expected, length_bucket, op, triton_available
from fastvl.ops import attention_launch as launch
from fastvl.ops import eager_path
from fastvl.ops.attention_common import (
    attention_rule,
    check_cu_seqlens,
    check_return_probs,
    eager_padded,
    eager_supports,
    max_seqlen,
    reference_supports,
    sdpa_packed,
    sdpa_padded,
    seed_tensor,
    softmax_scale,
    torch_supports,
    triton_supports,
)
from fastvl.reference.attention import attention_ref
from fastvl.reference.co_attention import co_attention_ref, varlen_co_attention_ref


def _rule(device, dtype, len_v=None, len_t=None, packed=False, seeded=False, deterministic=False, **_features):
    return attention_rule(device, dtype, (len_v, len_t), packed, seeded, deterministic)


CO_ATTENTION = op("co_attention",
                  probe=dict(head_dim=128, dropout=False, packed=False, len_v=64, len_t=64, grad=True),
                  table_key=("dtype", "head_dim", "len_v", "len_t", "has_mask", "dropout", "packed", "grad"),
                  rule=_rule)


@dataclasses.dataclass(frozen=True)
class CoAttentionInputs:
    """One validated co-attention call, as every backend receives it: the image stream (``*_v``) and
    the text stream (``*_t``); masks normalised to bool ``[B, L]`` or None; packed batches carry
    ``cu_seqlens_v/t`` and the caller's ``max_seqlen_v/t`` (None: read when needed, see :meth:`lengths`);
    ``return_probs``: the backend returns ``(ctx_v, ctx_t, (probs_v, probs_t))``."""

    q_v: torch.Tensor
    k_v: torch.Tensor
    v_v: torch.Tensor
    mask_v: torch.Tensor | None
    q_t: torch.Tensor
    k_t: torch.Tensor
    v_t: torch.Tensor
    mask_t: torch.Tensor | None
    dropout_p: float = 0.0
    scale: float | None = None
    cu_seqlens_v: torch.Tensor | None = None
    cu_seqlens_t: torch.Tensor | None = None
    max_seqlen_v: int | None = None
    max_seqlen_t: int | None = None
    dropout_seed: int | torch.Tensor | None = None
    deterministic: bool = False
    return_probs: bool = False

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_v is not None

    def lengths(self) -> tuple[int, int]:
        """(longest image sequence, longest text sequence)."""
        if not self.packed:
            return self.q_v.shape[1], self.q_t.shape[1]
        return max_seqlen(self.cu_seqlens_v, self.max_seqlen_v), max_seqlen(self.cu_seqlens_t, self.max_seqlen_t)

    def features(self) -> dict:
        """What dispatch decides on (besides the device); lengths as in ``AttentionInputs.features``."""
        len_v, len_t = ((self.q_v.shape[1], self.q_t.shape[1]) if not self.packed
                        else (self.max_seqlen_v, self.max_seqlen_t))
        return dict(dtype=self.q_v.dtype, head_dim=self.q_v.shape[-1], dropout=self.dropout_p > 0.0,
                    packed=self.packed, has_mask=self.mask_v is not None or self.mask_t is not None,
                    seeded=self.dropout_seed is not None, deterministic=self.deterministic,
                    len_v=length_bucket(len_v), len_t=length_bucket(len_t),
                    grad=backward_expected(self.q_v, self.k_v, self.v_v, self.q_t, self.k_t, self.v_t),
                    probs=self.return_probs)


# A pytree node, so recorders (fastvl parity) see and recast the tensors inside.
pytree.register_dataclass(CoAttentionInputs)


def co_attention(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, mask_v: torch.Tensor | None,
                 q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, mask_t: torch.Tensor | None,
                 dropout_p: float = 0.0, scale: float | None = None, *,
                 cu_seqlens_v: torch.Tensor | None = None, cu_seqlens_t: torch.Tensor | None = None,
                 max_seqlen_v: int | None = None, max_seqlen_t: int | None = None,
                 dropout_seed: int | torch.Tensor | None = None, deterministic: bool = False,
                 return_probs: bool = False, backend: str | None = None) -> tuple:
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

    ``return_probs=True`` (padded form only) returns ``(ctx_v, ctx_t, (probs_v [B, H, Lv, Lt], probs_t
    [B, H, Lt, Lv]))``, differentiable, on the ``eager`` or ``reference`` backend, as
    :func:`fastvl.ops.attention` does.
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
    check_return_probs(return_probs, packed, "cu_seqlens_v / cu_seqlens_t")
    if head_dim == 0:
        raise ValueError(f"the projections must have a head dim D >= 1, got q_v of shape {list(q_v.shape)}")
    if packed:
        if mask_v is not None or mask_t is not None:
            raise ValueError("mask_v and mask_t must be None in the packed form (cu_seqlens_* carry the lengths)")
        if cu_seqlens_v is None or cu_seqlens_t is None:
            raise ValueError("the packed form needs both cu_seqlens_v and cu_seqlens_t ([B + 1] int32)")
        max_seqlen_v = check_cu_seqlens("cu_seqlens_v", cu_seqlens_v, q_v.shape[0], "max_seqlen_v", max_seqlen_v)
        max_seqlen_t = check_cu_seqlens("cu_seqlens_t", cu_seqlens_t, q_t.shape[0], "max_seqlen_t", max_seqlen_t)
        if cu_seqlens_v.shape != cu_seqlens_t.shape:
            raise ValueError(f"cu_seqlens_v and cu_seqlens_t must both be [B + 1], got {list(cu_seqlens_v.shape)} "
                             f"and {list(cu_seqlens_t.shape)}")
    else:
        batch, len_v, len_t = q_v.shape[0], q_v.shape[1], q_t.shape[1]
        mask_v = _checks.key_padding_mask("mask_v", mask_v, batch, len_v, q_v.device)
        mask_t = _checks.key_padding_mask("mask_t", mask_t, batch, len_t, q_v.device)
    inputs = CoAttentionInputs(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale, cu_seqlens_v,
                               cu_seqlens_t, max_seqlen_v, max_seqlen_t, dropout_seed, deterministic, return_probs)
    return CO_ATTENTION.select(backend, q_v.device, **inputs.features()).impl(inputs)


# Triton backend: custom ops and autograd --------------------------------------------------------------
# The differentiable inputs (six projections) come first, so the backward returns their gradients and
# None for the rest.


def _co_attention_fwd(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, q_t: torch.Tensor,
                        k_t: torch.Tensor, v_t: torch.Tensor, mask_v: torch.Tensor | None,
                        mask_t: torch.Tensor | None, cu_seqlens_v: torch.Tensor | None,
                        cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int, max_seqlen_t: int, dropout_p: float,
                        scale: float, seed: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """(ctx_v, ctx_t, lse_v, lse_t, seed used, keep_v, keep_t), both directions in one launch; keep_*:
    each direction's stored dropout keep-mask, or empty tensors."""
    seed = launch.draw_seed(dropout_p, seed, q_v.device)
    keep = _keep_buffers(q_v, cu_seqlens_v, max_seqlen_v, max_seqlen_t, dropout_p)
    outputs = launch.co_attention_forward(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_seqlens_v, cu_seqlens_t,
                                          max_seqlen_v, max_seqlen_t, dropout_p, scale, seed,
                                          keep=_stored(*keep))
    return (*outputs, seed, *keep)


co_attention_fwd_op = torch.library.custom_op("fastvl::co_attention_fwd", mutates_args=())(_co_attention_fwd)


def _keep_buffers(q_v, cu_seqlens_v, max_v, max_t, dropout_p):
    """Each direction's keep-mask buffer (``launch.new_co_keep_masks``), or two empty tensors where the
    rule (``launch.stores_keep_mask``) stores none."""
    if not launch.stores_keep_mask(max(max_v, max_t), q_v.dtype, q_v.shape[-1], dropout_p):
        return tuple(torch.empty((0,), dtype=torch.int32, device=q_v.device) for _ in range(2))
    batch = cu_seqlens_v.shape[0] - 1 if cu_seqlens_v is not None else q_v.shape[0]
    return launch.new_co_keep_masks(batch, q_v.shape[-2], max_v, max_t, q_v.device)


def _stored(keep_v, keep_t):
    return None if launch.stored_keep(keep_v) is None else (keep_v, keep_t)


@co_attention_fwd_op.register_fake
def _(q_v, k_v, v_v, q_t, k_t, v_t, mask_v, mask_t, cu_seqlens_v, cu_seqlens_t, max_v, max_t, dropout_p, *_rest):
    packed = cu_seqlens_v is not None
    return (q_v.new_empty(q_v.shape), q_t.new_empty(q_t.shape),
            q_v.new_empty(launch.lse_shape(q_v, packed), dtype=torch.float32),
            q_t.new_empty(launch.lse_shape(q_t, packed), dtype=torch.float32), q_v.new_empty((1,), dtype=torch.int64),
            *_keep_buffers(q_v, cu_seqlens_v, max_v, max_t, dropout_p))


def _co_attention_bwd(grad_v: torch.Tensor, grad_t: torch.Tensor, q_v: torch.Tensor, k_v: torch.Tensor,
                        v_v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, ctx_v: torch.Tensor,
                        ctx_t: torch.Tensor, lse_v: torch.Tensor, lse_t: torch.Tensor, mask_v: torch.Tensor | None,
                        mask_t: torch.Tensor | None, cu_seqlens_v: torch.Tensor | None,
                        cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int, max_seqlen_t: int, dropout_p: float,
                        scale: float, seed: torch.Tensor, keep_v: torch.Tensor, keep_t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq_v, dk_v, dv_v, dq_t, dk_t, dv_t), every gradient of both directions in one launch."""
    return launch.co_attention_backward(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t,
                                        mask_v, mask_t, cu_seqlens_v, cu_seqlens_t, max_seqlen_v, max_seqlen_t,
                                        dropout_p, scale, seed, keep=_stored(keep_v, keep_t))


co_attention_bwd_op = torch.library.custom_op("fastvl::co_attention_bwd", mutates_args=())(_co_attention_bwd)


@co_attention_bwd_op.register_fake
def _(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, *_rest):
    return tuple(torch.empty_like(t) for t in (q_v, k_v, v_v, q_t, k_t, v_t))


def _setup_context(ctx, inputs, output):
    q_v, k_v, v_v, q_t, k_t, v_t, mask_v, mask_t, cu_v, cu_t, max_v, max_t, dropout_p, scale, _ = inputs
    ctx_v, ctx_t, lse_v, lse_t, *seed_keep = output
    ctx.save_for_backward(q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t,
                          *seed_keep)
    ctx.arguments = (max_v, max_t, dropout_p, scale)
    ctx.inputs_count = len(inputs)
    ctx.set_materialize_grads(False)  # the lse and seed outputs get no gradient: no zero-filled buffers


def _backward(ctx, grad_v, grad_t, _grad_lse_v, _grad_lse_t, *_grad_seed_keep):
    *saved, seed, keep_v, keep_t = ctx.saved_tensors
    if grad_v is None or grad_t is None:  # one direction's output unused: its upstream gradient is zero
        ctx_v, ctx_t = saved[6], saved[7]
        grad_v = torch.zeros_like(ctx_v) if grad_v is None else grad_v
        grad_t = torch.zeros_like(ctx_t) if grad_t is None else grad_t
    backward = _co_attention_bwd if getattr(ctx, "eager", False) else co_attention_bwd_op
    grads = backward(grad_v, grad_t, *saved, *ctx.arguments, seed, keep_v, keep_t)
    return *grads, *[None] * (ctx.inputs_count - len(grads))


co_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerCoAttention = eager_path.eager_function("_EagerCoAttention", _co_attention_fwd, _setup_context, _backward,
                                              outputs=7, results=2)


# The same op when each stream's q, k, v are the head groups of one fused projection ``[..., 3, H, D]``
# (ViLBERT's v_qkv / t_qkv): autograd sees the two fused tensors, and the backward writes each stream's
# three gradients into one buffer of that layout (no concatenation of three per stream).


def _co_attention_qkv_fwd(qkv_v: torch.Tensor, qkv_t: torch.Tensor, mask_v: torch.Tensor | None,
                            mask_t: torch.Tensor | None, cu_seqlens_v: torch.Tensor | None,
                            cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int, max_seqlen_t: int,
                            dropout_p: float, scale: float, seed: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    """(ctx_v, ctx_t, lse_v, lse_t, seed used, keep_v, keep_t) of ``co_attention`` on ``qkv_v.unbind(-3)``,
    ``qkv_t.unbind(-3)``."""
    seed = launch.draw_seed(dropout_p, seed, qkv_v.device)
    keep = _keep_buffers(qkv_v.select(-3, 0), cu_seqlens_v, max_seqlen_v, max_seqlen_t, dropout_p)
    outputs = launch.co_attention_forward(*qkv_v.unbind(-3), mask_v, *qkv_t.unbind(-3), mask_t, cu_seqlens_v,
                                          cu_seqlens_t, max_seqlen_v, max_seqlen_t, dropout_p, scale, seed,
                                          keep=_stored(*keep))
    return (*outputs, seed, *keep)


co_attention_qkv_fwd_op = torch.library.custom_op("fastvl::co_attention_qkv_fwd", mutates_args=())(
    _co_attention_qkv_fwd)


@co_attention_qkv_fwd_op.register_fake
def _(qkv_v, qkv_t, mask_v, mask_t, cu_seqlens_v, cu_seqlens_t, max_v, max_t, dropout_p, *_rest):
    packed, q_v, q_t = cu_seqlens_v is not None, qkv_v.select(-3, 0), qkv_t.select(-3, 0)
    return (q_v.new_empty(q_v.shape), q_t.new_empty(q_t.shape),
            q_v.new_empty(launch.lse_shape(q_v, packed), dtype=torch.float32),
            q_t.new_empty(launch.lse_shape(q_t, packed), dtype=torch.float32), q_v.new_empty((1,), dtype=torch.int64),
            *_keep_buffers(q_v, cu_seqlens_v, max_v, max_t, dropout_p))


def _co_attention_qkv_bwd(grad_v: torch.Tensor, grad_t: torch.Tensor, qkv_v: torch.Tensor, qkv_t: torch.Tensor,
                            ctx_v: torch.Tensor, ctx_t: torch.Tensor, lse_v: torch.Tensor, lse_t: torch.Tensor,
                            mask_v: torch.Tensor | None, mask_t: torch.Tensor | None,
                            cu_seqlens_v: torch.Tensor | None, cu_seqlens_t: torch.Tensor | None, max_seqlen_v: int,
                            max_seqlen_t: int, dropout_p: float, scale: float, seed: torch.Tensor,
                            keep_v: torch.Tensor, keep_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d qkv_v, d qkv_t), each stream's three gradients written by the one backward launch as views."""
    into = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (qkv_v, qkv_t))
    launch.co_attention_backward(grad_v, grad_t, *qkv_v.unbind(-3), *qkv_t.unbind(-3), ctx_v, ctx_t, lse_v, lse_t,
                                 mask_v, mask_t, cu_seqlens_v, cu_seqlens_t, max_seqlen_v, max_seqlen_t, dropout_p,
                                 scale, seed, into=into, keep=_stored(keep_v, keep_t))
    return into


co_attention_qkv_bwd_op = torch.library.custom_op("fastvl::co_attention_qkv_bwd", mutates_args=())(
    _co_attention_qkv_bwd)


@co_attention_qkv_bwd_op.register_fake
def _(grad_v, grad_t, qkv_v, qkv_t, *_rest):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (qkv_v, qkv_t))


def _setup_qkv_context(ctx, inputs, output):
    qkv_v, qkv_t, mask_v, mask_t, cu_v, cu_t, max_v, max_t, dropout_p, scale, _ = inputs
    ctx_v, ctx_t, lse_v, lse_t, *seed_keep = output
    ctx.save_for_backward(qkv_v, qkv_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t, *seed_keep)
    ctx.arguments = (max_v, max_t, dropout_p, scale)
    ctx.inputs_count = len(inputs)
    ctx.set_materialize_grads(False)


def _qkv_backward(ctx, grad_v, grad_t, _grad_lse_v, _grad_lse_t, *_grad_seed_keep):
    *saved, seed, keep_v, keep_t = ctx.saved_tensors
    if grad_v is None or grad_t is None:  # one direction's output unused: its upstream gradient is zero
        grad_v = torch.zeros_like(saved[2]) if grad_v is None else grad_v
        grad_t = torch.zeros_like(saved[3]) if grad_t is None else grad_t
    backward = _co_attention_qkv_bwd if getattr(ctx, "eager", False) else co_attention_qkv_bwd_op
    grads = backward(grad_v, grad_t, *saved, *ctx.arguments, seed, keep_v, keep_t)
    return *grads, *[None] * (ctx.inputs_count - len(grads))


co_attention_qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_setup_qkv_context)
_EagerCoAttentionQkv = eager_path.eager_function("_EagerCoAttentionQkv", _co_attention_qkv_fwd, _setup_qkv_context,
                                                 _qkv_backward, outputs=7, results=2)


# Backends ----------------------------------------------------------------------------------------------


def _triton_impl(inputs: CoAttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    a = inputs
    max_v, max_t = a.lengths()
    scale, seed = softmax_scale(a.q_v.shape[-1], a.scale), seed_tensor(a.dropout_seed, a.q_v.device)
    qkv_v, qkv_t = launch.fused_projection(a.q_v, a.k_v, a.v_v), launch.fused_projection(a.q_t, a.k_t, a.v_t)
    if qkv_v is not None and qkv_t is not None:  # one fused projection per stream: one gradient buffer each
        return eager_path.call(co_attention_qkv_fwd_op, _EagerCoAttentionQkv, qkv_v, qkv_t, a.mask_v, a.mask_t,
                               a.cu_seqlens_v, a.cu_seqlens_t, max_v, max_t, float(a.dropout_p), scale, seed,
                               results=2)
    return eager_path.call(co_attention_fwd_op, _EagerCoAttention, a.q_v, a.k_v, a.v_v, a.q_t, a.k_t, a.v_t, a.mask_v,
                           a.mask_t, a.cu_seqlens_v, a.cu_seqlens_t, max_v, max_t, float(a.dropout_p), scale, seed,
                           results=2)


def _sdpa_impl(inputs: CoAttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    a = inputs
    if a.packed:
        ctx_v = sdpa_packed(a.q_v, a.k_t, a.v_t, a.cu_seqlens_v, a.cu_seqlens_t, a.max_seqlen_v, a.max_seqlen_t,
                            a.dropout_p, a.scale, False)
        ctx_t = sdpa_packed(a.q_t, a.k_v, a.v_v, a.cu_seqlens_t, a.cu_seqlens_v, a.max_seqlen_t, a.max_seqlen_v,
                            a.dropout_p, a.scale, False)
        return ctx_v, ctx_t
    return (sdpa_padded(a.q_v, a.k_t, a.v_t, a.mask_t, a.dropout_p, a.scale, False),
            sdpa_padded(a.q_t, a.k_v, a.v_v, a.mask_v, a.dropout_p, a.scale, False))


def _eager_impl(inputs: CoAttentionInputs) -> tuple:
    a = inputs
    ctx_v, probs_v = eager_padded(a.q_v, a.k_t, a.v_t, a.mask_t, a.dropout_p, a.scale, False)
    ctx_t, probs_t = eager_padded(a.q_t, a.k_v, a.v_v, a.mask_v, a.dropout_p, a.scale, False)
    return ctx_v, ctx_t, (probs_v, probs_t)


def _reference_impl(inputs: CoAttentionInputs) -> tuple:
    a = inputs
    if a.return_probs:  # co_attention_ref's two directions, keeping their probabilities
        ctx_v, probs_v = attention_ref(a.q_v, a.k_t, a.v_t, a.mask_t, a.dropout_p, a.scale, return_probs=True)
        ctx_t, probs_t = attention_ref(a.q_t, a.k_v, a.v_v, a.mask_v, a.dropout_p, a.scale, return_probs=True)
        return ctx_v, ctx_t, (probs_v, probs_t)
    if a.packed:
        return varlen_co_attention_ref(a.q_v, a.k_v, a.v_v, a.cu_seqlens_v, a.q_t, a.k_t, a.v_t, a.cu_seqlens_t,
                                       a.dropout_p, a.scale)
    return co_attention_ref(a.q_v, a.k_v, a.v_v, a.mask_v, a.q_t, a.k_t, a.v_t, a.mask_t, a.dropout_p, a.scale)


CO_ATTENTION.register("triton", available=triton_available, supports=triton_supports, auto_devices=("cuda",))(
    _triton_impl)
CO_ATTENTION.register("sdpa", supports=torch_supports)(_sdpa_impl)
CO_ATTENTION.register("eager", supports=eager_supports)(_eager_impl)
CO_ATTENTION.register("reference", supports=reference_supports)(_reference_impl)
