"""Reference bidirectional co-attention, mirroring ViLBERT's ``BertBiAttention`` op for op."""

from __future__ import annotations

import torch

from fastvl.reference.attention import attention_ref, varlen_attention_ref


def co_attention_ref(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, mask_v: torch.Tensor | None,
                     q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, mask_t: torch.Tensor | None,
                     dropout_p: float = 0.0, scale: float | None = None, upcast: bool = False,
                     dropout_masks: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Image queries over text keys/values and text queries over image keys/values.

    ``q_v, k_v, v_v``: the image stream's projections ``[B, Lv, H, D]``; ``q_t, k_t, v_t``: the text
    stream's ``[B, Lt, H, D]``; ``mask_v`` bool ``[B, Lv]``, ``mask_t`` bool ``[B, Lt]`` (True = real).
    Returns ``(ctx_v [B, Lv, H, D], ctx_t [B, Lt, H, D])``: ``ctx_v`` is the image queries' context
    (over text, text mask applied), ``ctx_t`` the text queries' context (over image, image mask).
    In BertBiAttention's names: ``ctx_t`` = ``context_layer1`` (query2 . key1, attention_mask1) and
    ``ctx_v`` = ``context_layer2`` (query1 . key2, attention_mask2).
    """
    keep_v, keep_t = dropout_masks if dropout_masks is not None else (None, None)
    ctx_t = attention_ref(q_t, k_v, v_v, mask_v, dropout_p, scale, dropout_mask=keep_t, upcast=upcast)
    ctx_v = attention_ref(q_v, k_t, v_t, mask_t, dropout_p, scale, dropout_mask=keep_v, upcast=upcast)
    return ctx_v, ctx_t


def varlen_co_attention_ref(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor, cu_seqlens_v: torch.Tensor,
                            q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cu_seqlens_t: torch.Tensor,
                            dropout_p: float = 0.0, scale: float | None = None, upcast: bool = False):
    """Packed co-attention: image rows ``[total_v, H, D]`` with ``cu_seqlens_v``, text rows
    ``[total_t, H, D]`` with ``cu_seqlens_t`` (int ``[B + 1]`` each; each stream has its own lengths).
    Returns ``(ctx_v [total_v, H, D], ctx_t [total_t, H, D])`` as :func:`co_attention_ref` would on
    the padded batch, restricted to the real rows."""
    ctx_v = varlen_attention_ref(q_v, k_t, v_t, cu_seqlens_v, cu_seqlens_t, dropout_p, scale, upcast=upcast)
    ctx_t = varlen_attention_ref(q_t, k_v, v_v, cu_seqlens_t, cu_seqlens_v, dropout_p, scale, upcast=upcast)
    return ctx_v, ctx_t
