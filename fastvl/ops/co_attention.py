"""``fastvl.ops.co_attention``: ViLBERT's bidirectional co-attention (image queries over text keys and
values, text queries over image keys and values) as one op.

Backends (auto order): ``sdpa`` (two torch SDPA calls), ``reference`` (mirrors ``BertBiAttention``).
The kernel issue adds a ``triton`` backend that runs both directions in one launch.
"""

from __future__ import annotations

import torch

from fastvl import _checks
from fastvl.dispatch import op
from fastvl.ops.attention import ATTENTION
from fastvl.reference.co_attention import co_attention_ref

CO_ATTENTION = op("co_attention")


def co_attention(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, mask_v: torch.Tensor | None,
                 q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, mask_t: torch.Tensor | None,
                 dropout_p: float = 0.0, scale: float | None = None, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional co-attention (ViLBERT's Co-TRM attention).

    Image stream: q_v, k_v, v_v ``[B, Lv, H, D]``, mask_v ``[B, Lv]`` (True = real region).
    Text stream: q_t, k_t, v_t ``[B, Lt, H, D]``, mask_t ``[B, Lt]`` (True = real token).
    Masks may also be the original additive float form (0 / -10000, ``[B, L]`` or ``[B, 1, 1, L]``).
    Returns ``(ctx_v [B, Lv, H, D], ctx_t [B, Lt, H, D])``: ``ctx_v`` = image queries attending to the
    text keys/values under mask_t; ``ctx_t`` = text queries attending to the image keys/values under
    mask_v. Rows with no real key are zeros. All six projections share B, H, D and one dtype.
    """
    _checks.tensor("q_v", q_v, shape="[B, Lv, H, D]", ndim=4)
    batch, len_v, heads, head_dim = q_v.shape
    for name, t in (("k_v", k_v), ("v_v", v_v)):
        _checks.tensor(name, t, shape="[B, Lv, H, D]", ndim=4)
        _checks.same_shape(name, t, [batch, len_v, heads, head_dim], "[B, Lv, H, D] equal to q_v")
    _checks.tensor("q_t", q_t, shape="[B, Lt, H, D]", ndim=4)
    len_t = q_t.shape[1]
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.tensor(name, t, shape="[B, Lt, H, D]", ndim=4)
        _checks.same_shape(name, t, [batch, len_t, heads, head_dim], "[B, Lt, H, D] with B, H, D of q_v")
    _checks.same_device("q_v", q_v, k_v=k_v, v_v=v_v, q_t=q_t, k_t=k_t, v_t=v_t, mask_v=mask_v, mask_t=mask_t)
    _checks.same_dtype("q_v", q_v, k_v=k_v, v_v=v_v, q_t=q_t, k_t=k_t, v_t=v_t)
    _checks.probability("dropout_p", dropout_p)
    mask_v = _checks.key_padding_mask("mask_v", mask_v, batch, len_v, q_v.device)
    mask_t = _checks.key_padding_mask("mask_t", mask_t, batch, len_t, q_v.device)
    chosen = CO_ATTENTION.select(backend, q_v.device, dtype=q_v.dtype, head_dim=head_dim, dropout=dropout_p > 0.0,
                                 packed=False)
    return chosen.impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale)


def _sdpa_impl(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, dropout_p, scale):
    sdpa = ATTENTION.backends["sdpa"].impl
    ctx_v = sdpa(q_v, k_t, v_t, mask_t, dropout_p, scale, False, None, None, None, None)
    ctx_t = sdpa(q_t, k_v, v_v, mask_v, dropout_p, scale, False, None, None, None, None)
    return ctx_v, ctx_t


CO_ATTENTION.register("sdpa")(_sdpa_impl)
CO_ATTENTION.register("reference")(co_attention_ref)
