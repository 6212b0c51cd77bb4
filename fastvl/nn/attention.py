"""Self-attention and cross-attention sub-layers (BERT's ``BertAttention``: projections, attention,
output projection, residual + dropout + LayerNorm).

The self-attention has ONE fused QKV projection ``qkv`` (Linear hidden -> 3 * hidden, output laid
out ``[q | k | v]``, heads inside each third); its output is viewed as q, k, v and passed to
:func:`fastvl.ops.attention` without copies. The cross-attention has ``query`` and one fused ``kv``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvl.nn.common import InputSharingLinear, LayerNorm, bool_mask, split_heads
from fastvl.ops import attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
           output_attentions: bool, packed: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fastvl.ops.attention`` on ``[B, L, H, D]`` views (or packed ``[total, H, D]`` with ``packed``
    holding cu_seqlens / max_seqlen); with ``output_attentions`` it asks the op for the probabilities
    ``[B, H, Lq, Lk]`` too (``return_probs=True``: dispatched like every call, to a backend that
    materialises them; differentiable)."""
    if not output_attentions:
        return attention(q, k, v, mask, dropout_p, **(packed or {})), None
    if packed:
        raise ValueError("output_attentions=True needs the padded form ([B, L, hidden] with a mask), not cu_seqlens")
    mask = bool_mask("attention_mask", mask, k.shape[0], k.shape[1], k.device)
    return attention(q, k, v, mask, dropout_p, return_probs=True)


def _packed(cu_seqlens: torch.Tensor | None, max_seqlen: int | None,
            cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None) -> dict | None:
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k given without cu_seqlens (the queries' packing)")
        return None
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    return {"cu_seqlens_q": cu_seqlens, "cu_seqlens_k": cu_seqlens_k, "max_seqlen_q": max_seqlen,
            "max_seqlen_k": max_seqlen_k}


class SelfAttention(nn.Module):
    """BERT's ``BertAttention`` (self-attention + ``BertSelfOutput``) with a fused QKV projection.

    Parameters: ``qkv`` (Linear hidden -> 3 * hidden), ``dense`` (Linear hidden -> hidden), ``norm``.
    ``forward(hidden [B, L, hidden], attention_mask [B, L] bool (True = real) | additive | None)`` or
    packed ``hidden [total, hidden]`` with ``cu_seqlens`` (int32 ``[B + 1]``) and ``max_seqlen``.
    Returns ``LN(dropout(dense(context)) + hidden)``, plus the probabilities ``[B, H, L, L]`` when
    ``output_attentions``.
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.1,
                 hidden_dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.attention_dropout, self.hidden_dropout = num_heads, attention_dropout, hidden_dropout
        self.qkv = InputSharingLinear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                output_attentions: bool = False):
        qkv, hidden = self.qkv(hidden)  # hidden: also the residual
        q, k, v = split_heads(qkv, 3 * self.num_heads).chunk(3, dim=-2)
        dropout_p = self.attention_dropout if self.training else 0.0
        context, probs = attend(q, k, v, attention_mask, dropout_p, output_attentions,
                                _packed(cu_seqlens, max_seqlen))
        out = self.norm(self.dense(context.flatten(-2)), hidden, self.hidden_dropout)
        return (out, probs) if output_attentions else out


class CrossAttention(nn.Module):
    """ALBEF's cross-attention sub-layer (``BertAttention(is_cross_attention=True)``): queries from the
    text, keys / values from the encoder (image) states, output projection, residual + LN.

    Parameters: ``query`` (Linear hidden -> hidden), ``kv`` (Linear encoder_hidden -> 2 * hidden,
    output ``[k | v]``), ``dense``, ``norm``. ``forward(hidden [B, Lq, hidden], encoder_hidden
    [B, Lk, encoder_hidden], encoder_mask [B, Lk] | None)``, or packed rows with ``cu_seqlens`` /
    ``max_seqlen`` (queries) and ``cu_seqlens_k`` / ``max_seqlen_k`` (encoder states).
    """

    def __init__(self, hidden_size: int, num_heads: int, encoder_hidden_size: int | None = None,
                 attention_dropout: float = 0.1, hidden_dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.attention_dropout, self.hidden_dropout = num_heads, attention_dropout, hidden_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(encoder_hidden_size or hidden_size, 2 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None = None,
                *, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None,
                output_attentions: bool = False):
        if encoder_hidden.shape[:-2] != hidden.shape[:-2]:
            raise ValueError(f"encoder_hidden must have the batch layout of hidden {list(hidden.shape[:-2])}, "
                             f"got {list(encoder_hidden.shape)}")
        q = split_heads(self.query(hidden), self.num_heads)
        k, v = split_heads(self.kv(encoder_hidden), 2 * self.num_heads).chunk(2, dim=-2)
        dropout_p = self.attention_dropout if self.training else 0.0
        context, probs = attend(q, k, v, encoder_mask, dropout_p, output_attentions,
                                _packed(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k))
        out = self.norm(self.dense(context.flatten(-2)), hidden, self.hidden_dropout)
        return (out, probs) if output_attentions else out
