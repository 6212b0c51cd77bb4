"""``fastvl.ops.attention``: scaled dot-product attention over padded ``[B, L, H, D]`` or packed
variable-length ``[total, H, D]`` batches, with key padding masks, dropout and fully masked rows
defined as zeros.

Backends (auto order): ``triton`` (fused FlashAttention-2 style kernels of ``fastvl.kernels.attention``;
CUDA, or CPU under ``TRITON_INTERPRET=1`` when asked for by name), ``xformers`` and ``flash_attn``
(when installed, plain cases), ``sdpa`` (torch's ``scaled_dot_product_attention``), ``eager`` (SDPA's
math step by step, for ``return_probs=True`` only), ``reference`` (eager, mirrors BERT's
self-attention). The public :func:`attention` validates once and hands every backend one frozen
:class:`AttentionInputs`. ``return_probs=True`` (what ``output_attentions`` needs) runs on the backends
that materialise the probabilities, ``eager`` and ``reference``; asking another for them raises
:class:`fastvl.dispatch.BackendUnavailableError` naming why.

The triton backend is three layers: the custom ops ``fastvl::attention_fwd`` / ``attention_bwd``
(with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them) over the
launchers of :mod:`fastvl.ops.attention_launch`, the autograd glue registered on the forward op, and
the backend function. When q, k, v are the head groups of one fused projection (``[..., 3, H, D]``,
as fastvl's layers build them) the backend calls ``fastvl::attention_qkv_fwd`` / ``attention_qkv_bwd``
on that tensor instead: the backward writes dq, dk, dv into one buffer in the projection's layout, so
autograd hands the projection its gradient without concatenating three (``retain_grad`` on the q, k,
v views then sees no gradient: they are not in the graph of the output).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree

from fastvl import _checks
from fastvl.dispatch import backward_expected, length_bucket, needs_cuda_device, needs_module, op, triton_available
from fastvl.ops import attention_launch as launch
from fastvl.ops import eager_path
from fastvl.ops.attention_common import (
    NO_PROBS,
    SEEDED_ONLY_ON_TRITON,
    TRITON_DTYPES,
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
from fastvl.reference.attention import attention_ref, varlen_attention_ref


def _rule(device, dtype, len_q=None, len_k=None, packed=False, seeded=False, deterministic=False, **_features):
    return attention_rule(device, dtype, (len_q, len_k), packed, seeded, deterministic)


ATTENTION = op("attention", probe=dict(head_dim=64, dropout=False, packed=False, len_q=64, len_k=64, grad=True),
               table_key=("dtype", "head_dim", "len_q", "len_k", "has_mask", "dropout", "packed", "causal", "grad"),
               rule=_rule)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """One validated attention call, as every backend receives it.

    ``key_padding_mask`` is normalised to bool ``[B, Lk]`` (True = real key) or None; the packed
    form has ``cu_seqlens_q/k`` and no mask. ``max_seqlen_q/k`` are what the caller passed (None:
    read from ``cu_seqlens`` when a backend needs them, see :meth:`lengths`). ``scale`` as given
    (None = ``1/sqrt(D)``). ``return_probs``: the backend returns ``(output, probabilities)``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    scale: float | None = None
    causal: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    dropout_seed: int | torch.Tensor | None = None
    deterministic: bool = False
    return_probs: bool = False

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    def lengths(self) -> tuple[int, int]:
        """(longest query sequence, longest key sequence)."""
        if not self.packed:
            return self.q.shape[1], self.k.shape[1]
        return max_seqlen(self.cu_seqlens_q, self.max_seqlen_q), max_seqlen(self.cu_seqlens_k, self.max_seqlen_k)

    def features(self) -> dict:
        """What dispatch decides on (besides the device): lengths as power-of-two buckets (None: a
        packed batch whose max_seqlen is not known without a sync), ``grad``: a backward will follow."""
        len_q, len_k = (self.q.shape[1], self.k.shape[1]) if not self.packed else (self.max_seqlen_q, self.max_seqlen_k)
        return dict(dtype=self.q.dtype, head_dim=self.q.shape[-1], dropout=self.dropout_p > 0.0, packed=self.packed,
                    has_mask=self.key_padding_mask is not None, seeded=self.dropout_seed is not None,
                    deterministic=self.deterministic, causal=self.causal, len_q=length_bucket(len_q),
                    len_k=length_bucket(len_k), grad=backward_expected(self.q, self.k, self.v),
                    probs=self.return_probs)


# A pytree node, so recorders (fastvl parity) see and recast the tensors inside.
pytree.register_dataclass(AttentionInputs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None, causal: bool = False, *,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              dropout_seed: int | torch.Tensor | None = None, deterministic: bool = False,
              return_probs: bool = False,
              backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention ``softmax(q k^T * scale + mask) v``.

    Padded form: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` (any strides: a fused QKV projection's
    output can be passed as views), key_padding_mask ``[B, Lk]`` bool with True = a real key (the
    original projects' additive float mask, 0 / -10000, shaped ``[B, Lk]`` or ``[B, 1, 1, Lk]``, is
    accepted and converted). Returns ``[B, Lq, H, D]`` in q's dtype.

    Packed form: q ``[total_q, H, D]``, k/v ``[total_k, H, D]``, ``cu_seqlens_q`` / ``cu_seqlens_k``
    int32 ``[B + 1]`` prefix sums of the sequence lengths (FlashAttention's convention), optional
    ``max_seqlen_*`` (pass them to avoid a host sync; they must be at least the longest sequence).
    No key_padding_mask. Returns ``[total_q, H, D]``.

    A query with no real key (all padded, an empty key sequence) gets zeros and zero gradient.
    ``scale`` defaults to ``1/sqrt(D)``; ``causal`` aligns the mask to the bottom-right corner when
    Lq != Lk. Dtypes: float16, bfloat16, float32 (float64 on the torch backends).

    Dropout (``dropout_p`` > 0) on the triton backend draws its keep-mask from a seed: ``dropout_seed``
    if given (same seed, same mask; :func:`fastvl.ops.dropout_keep_mask` returns it), else one drawn
    from torch's generator on q's device without a host sync (so ``torch.manual_seed`` reproduces it;
    inside :func:`fastvl.ops.dropout_seed.shared_seeds`, as in a fastvl model's forward, a view of the
    scope's one draw instead of a launch per call).
    ``deterministic=True`` asks for a bitwise repeatable backward (the triton backend always is).

    ``return_probs=True`` (padded form only) returns ``(output, probs)`` with the probabilities
    ``[B, H, Lq, Lk]`` the values were averaged with (after dropout, as BERT's ``output_attentions``;
    masked keys 0, rows with no real key zeros), differentiable like the output (Grad-CAM keeps their
    gradient). Only the ``eager`` and ``reference`` backends materialise them (``auto`` picks
    ``eager``); the fused ones raise :class:`fastvl.dispatch.BackendUnavailableError` when asked by name.
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    mask, max_seqlen_q, max_seqlen_k = _validate(q, k, v, key_padding_mask, dropout_p, packed, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_return_probs(return_probs, packed, "cu_seqlens_q / cu_seqlens_k")
    inputs = AttentionInputs(q, k, v, mask, dropout_p, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, dropout_seed, deterministic, return_probs)
    return ATTENTION.select(backend, q.device, **inputs.features()).impl(inputs)


def _validate(q, k, v, key_padding_mask, dropout_p, packed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Checks every argument; returns (key padding mask as bool ``[B, Lk]`` or None, max_seqlen_q,
    max_seqlen_k), the lengths filled in from ``cu_seqlens`` when it was read."""
    if packed:
        rank, form_q, form_k = 3, "[total_q, H, D]", "[total_k, H, D]"
    else:
        rank, form_q, form_k = 4, "[B, Lq, H, D]", "[B, Lk, H, D]"
    _checks.tensor("q", q, shape=form_q, ndim=rank)
    _checks.tensor("k", k, shape=form_k, ndim=rank)
    _checks.tensor("v", v, shape=form_k, ndim=rank)
    _checks.same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k)
    _checks.same_dtype("q", q, k=k, v=v)
    _checks.probability("dropout_p", dropout_p)
    heads, head_dim = q.shape[-2], q.shape[-1]
    _checks.same_shape("k", k, [*k.shape[:-2], heads, head_dim], form_k + f" with H={heads}, D={head_dim} as q")
    _checks.same_shape("v", v, list(k.shape), form_k + " equal to k's shape")
    if head_dim == 0:
        raise ValueError(f"q, k and v must have a head dim D >= 1, got shape {list(q.shape)}")
    if not packed:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must have the same batch size B, got {q.shape[0]} and {k.shape[0]}")
        mask = _checks.key_padding_mask("key_padding_mask", key_padding_mask, k.shape[0], k.shape[1], q.device)
        return mask, None, None
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask must be None in the packed form (cu_seqlens_* carry the lengths)")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("the packed form needs both cu_seqlens_q and cu_seqlens_k ([B + 1] int32)")
    max_seqlen_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1], got {list(cu_seqlens_q.shape)} "
                         f"and {list(cu_seqlens_k.shape)}")
    return None, max_seqlen_q, max_seqlen_k


# Triton backend: custom ops and autograd --------------------------------------------------------------
# The differentiable inputs come first, so the backward returns their gradients and None for the rest.


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                     cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                     max_seqlen_k: int, dropout_p: float, scale: float, causal: bool,
                     seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp, seed used, stored dropout keep-mask or an empty tensor). The seed is drawn
    here when not given (see ``draw_seed``)."""
    seed = launch.draw_seed(dropout_p, seed, q.device)
    keep = _keep_buffer(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p)
    out, lse = launch.attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p, scale, causal, seed, keep=launch.stored_keep(keep))
    return out, lse, seed, keep


attention_fwd_op = torch.library.custom_op("fastvl::attention_fwd", mutates_args=())(_attention_fwd)


def _keep_buffer(q, cu_seqlens_q, max_q, max_k, dropout_p):
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    return launch.forward_keep_mask(batch, q.shape[-2], q.shape[-1], q.dtype, max_q, max_k, dropout_p, q.device)


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, causal,
      seed):
    return (q.new_empty(q.shape), q.new_empty(launch.lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64), _keep_buffer(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p))


def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                     scale: float, causal: bool, seed: torch.Tensor,
                     keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's output and log-sum-exp; dropout read from the forward's stored
    ``keep`` or regenerated from ``seed``."""
    return launch.attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, dropout_p, scale, causal, seed,
                                     keep=launch.stored_keep(keep))


attention_bwd_op = torch.library.custom_op("fastvl::attention_bwd", mutates_args=())(_attention_bwd)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, *_rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, _ = inputs
    out, lse, seed, keep = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed, keep)
    ctx.arguments = (max_q, max_k, dropout_p, scale, causal)
    ctx.inputs_count = len(inputs)
    ctx.set_materialize_grads(False)  # lse and seed get no gradient: no zero-filled buffers (launches)


def _backward(ctx, grad_out, _grad_lse, _grad_seed, _grad_keep):
    if grad_out is None:
        return (None,) * ctx.inputs_count
    q, k, v, out, lse, mask, cu_q, cu_k, seed, keep = ctx.saved_tensors
    backward = _attention_bwd if getattr(ctx, "eager", False) else attention_bwd_op
    grads = backward(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, *ctx.arguments, seed, keep)
    return *grads, *[None] * (ctx.inputs_count - len(grads))


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerAttention = eager_path.eager_function("_EagerAttention", _attention_fwd, _setup_context, _backward, outputs=4)


# The same op when q, k, v are the three head groups of one fused projection ``qkv [..., 3, H, D]``
# (self-attention's fused QKV): autograd sees qkv, and the backward writes dq, dk, dv into one buffer of
# that layout, the fused projection's gradient as it is (no concatenation of three).


def _attention_qkv_fwd(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                         max_seqlen: int, dropout_p: float, scale: float, causal: bool,
                         seed: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp, seed used, stored keep-mask or empty) of ``attention(*qkv.unbind(-3))``."""
    seed = launch.draw_seed(dropout_p, seed, qkv.device)
    keep = _keep_buffer(qkv.select(-3, 0), cu_seqlens, max_seqlen, max_seqlen, dropout_p)
    out, lse = launch.attention_forward(*qkv.unbind(-3), key_padding_mask, cu_seqlens, cu_seqlens, max_seqlen,
                                        max_seqlen, dropout_p, scale, causal, seed, keep=launch.stored_keep(keep))
    return out, lse, seed, keep


attention_qkv_fwd_op = torch.library.custom_op("fastvl::attention_qkv_fwd", mutates_args=())(_attention_qkv_fwd)


@attention_qkv_fwd_op.register_fake
def _(qkv, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, *_rest):
    q = qkv.select(-3, 0)
    return (q.new_empty(q.shape), q.new_empty(launch.lse_shape(q, cu_seqlens is not None), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64), _keep_buffer(q, cu_seqlens, max_seqlen, max_seqlen, dropout_p))


def _attention_qkv_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                         dropout_p: float, scale: float, causal: bool, seed: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
    """d qkv ``[..., 3, H, D]``: dq, dk, dv written by the backward kernel as its three views."""
    grad = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    launch.attention_backward(grad_out, *qkv.unbind(-3), out, lse, key_padding_mask, cu_seqlens, cu_seqlens,
                              max_seqlen, max_seqlen, dropout_p, scale, causal, seed, into=grad,
                              keep=launch.stored_keep(keep))
    return grad


attention_qkv_bwd_op = torch.library.custom_op("fastvl::attention_qkv_bwd", mutates_args=())(_attention_qkv_bwd)


@attention_qkv_bwd_op.register_fake
def _(grad_out, qkv, *_rest):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_qkv_context(ctx, inputs, output):
    qkv, mask, cu, max_len, dropout_p, scale, causal, _ = inputs
    out, lse, seed, keep = output
    ctx.save_for_backward(qkv, out, lse, mask, cu, seed, keep)
    ctx.arguments = (max_len, dropout_p, scale, causal)
    ctx.inputs_count = len(inputs)
    ctx.set_materialize_grads(False)


def _qkv_backward(ctx, grad_out, _grad_lse, _grad_seed, _grad_keep):
    if grad_out is None:
        return (None,) * ctx.inputs_count
    qkv, out, lse, mask, cu, seed, keep = ctx.saved_tensors
    backward = _attention_qkv_bwd if getattr(ctx, "eager", False) else attention_qkv_bwd_op
    grad = backward(grad_out, qkv, out, lse, mask, cu, *ctx.arguments, seed, keep)
    return grad, *[None] * (ctx.inputs_count - 1)


attention_qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_setup_qkv_context)
_EagerAttentionQkv = eager_path.eager_function("_EagerAttentionQkv", _attention_qkv_fwd, _setup_qkv_context,
                                               _qkv_backward, outputs=4)


def _triton_impl(inputs: AttentionInputs) -> torch.Tensor:
    max_q, max_k = inputs.lengths()
    q = inputs.q
    scale, seed = softmax_scale(q.shape[-1], inputs.scale), seed_tensor(inputs.dropout_seed, q.device)
    one_packing = inputs.cu_seqlens_q is inputs.cu_seqlens_k
    qkv = launch.fused_projection(q, inputs.k, inputs.v) if one_packing else None
    if qkv is not None:  # one fused projection: one gradient buffer in its layout
        return eager_path.call(attention_qkv_fwd_op, _EagerAttentionQkv, qkv, inputs.key_padding_mask,
                               inputs.cu_seqlens_q, max_q, float(inputs.dropout_p), scale, inputs.causal, seed)
    return eager_path.call(attention_fwd_op, _EagerAttention, q, inputs.k, inputs.v, inputs.key_padding_mask,
                           inputs.cu_seqlens_q, inputs.cu_seqlens_k, max_q, max_k, float(inputs.dropout_p), scale,
                           inputs.causal, seed)


# Torch backends ----------------------------------------------------------------------------------------


def _sdpa_impl(inputs: AttentionInputs) -> torch.Tensor:
    a = inputs
    if a.packed:
        return sdpa_packed(a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.dropout_p,
                           a.scale, a.causal)
    return sdpa_padded(a.q, a.k, a.v, a.key_padding_mask, a.dropout_p, a.scale, a.causal)


def _eager_impl(inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    a = inputs
    return eager_padded(a.q, a.k, a.v, a.key_padding_mask, a.dropout_p, a.scale, a.causal)


def _reference_impl(inputs: AttentionInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    a = inputs
    if a.packed:
        return varlen_attention_ref(a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.dropout_p, a.scale, a.causal)
    return attention_ref(a.q, a.k, a.v, a.key_padding_mask, a.dropout_p, a.scale, a.causal,
                         return_probs=a.return_probs)


# Other backends ---------------------------------------------------------------------------------------


def _plain_features(dtype, head_dim, device, packed, seeded=False, probs=False, **_features):
    """Reasons shared by the thin xformers / flash_attn wrappers: dense, unmasked, on CUDA."""
    reasons = needs_cuda_device(device)
    if probs:
        reasons.append(NO_PROBS)
    if packed:
        reasons.append("packed (cu_seqlens) batches are not wired for this backend")
    if seeded:
        reasons.append(SEEDED_ONLY_ON_TRITON)
    return reasons


def _xformers_supports(dtype, head_dim, device, packed, deterministic=False, has_mask=False, **features):
    reasons = _plain_features(dtype, head_dim, device, packed, **features)
    if has_mask:
        reasons.append("key_padding_mask is not wired for this backend")
    if deterministic:
        reasons.append("xformers' backward is not bitwise repeatable")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype}")
    return reasons


def _xformers_impl(inputs: AttentionInputs) -> torch.Tensor:
    from xformers.ops import fmha

    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if inputs.causal else None
    return fmha.memory_efficient_attention(inputs.q, inputs.k, inputs.v, attn_bias=bias, p=inputs.dropout_p,
                                           scale=inputs.scale)


def _flash_attn_supports(dtype, head_dim, device, packed, has_mask=False, **features):
    reasons = _plain_features(dtype, head_dim, device, False, **features)
    if has_mask:
        reasons.append("key_padding_mask is not wired for this backend (use the packed form)")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {dtype} (flash_attn runs float16, bfloat16)")
    if head_dim > 256 or head_dim % 8:
        reasons.append(f"head dim {head_dim} (flash_attn needs a multiple of 8 up to 256)")
    return reasons


def _flash_attn_impl(inputs: AttentionInputs) -> torch.Tensor:
    import flash_attn

    a = inputs
    if not a.packed:
        return flash_attn.flash_attn_func(a.q, a.k, a.v, dropout_p=a.dropout_p, softmax_scale=a.scale,
                                          causal=a.causal, deterministic=a.deterministic)
    max_q, max_k = a.lengths()
    return flash_attn.flash_attn_varlen_func(a.q, a.k, a.v, a.cu_seqlens_q.int(), a.cu_seqlens_k.int(), max_q, max_k,
                                             dropout_p=a.dropout_p, softmax_scale=a.scale, causal=a.causal,
                                             deterministic=a.deterministic)


# Auto order: fused first, plain torch last (so the CPU always works).
ATTENTION.register("triton", available=triton_available, supports=triton_supports, auto_devices=("cuda",))(
    _triton_impl)
ATTENTION.register("xformers", available=needs_module("xformers"), supports=_xformers_supports,
                   auto_devices=("cuda",))(_xformers_impl)
ATTENTION.register("flash_attn", available=needs_module("flash_attn"), supports=_flash_attn_supports,
                   auto_devices=("cuda",))(_flash_attn_impl)
ATTENTION.register("sdpa", supports=torch_supports)(_sdpa_impl)
ATTENTION.register("eager", supports=eager_supports)(_eager_impl)
ATTENTION.register("reference", supports=reference_supports)(_reference_impl)
