"""Transformer layers: BERT's layer and encoder stack, ALBEF's fusion layer (self-attention,
cross-attention to the image, feed-forward) and ViLBERT's co-attention layer (``BertConnectionLayer``).

Every layer takes padding masks (bool ``[B, L]``, True = real; the original additive 0 / -10000 form
is accepted too), supports activation checkpointing (``layer.gradient_checkpointing = True``), and
returns attention probabilities when called with ``output_attentions=True`` (the attention ops'
``return_probs=True``, dispatched to a backend that materialises them). Every layer also takes
packed ``[total, hidden]`` rows with ``cu_seqlens`` (the co-attention layer one per stream).
"""

from __future__ import annotations

import torch
from torch import nn

from fastvl.nn.attention import CrossAttention, SelfAttention
from fastvl.nn.common import Checkpointable, FeedForward, InputSharingLinear, LayerNorm, bool_mask, split_heads
from fastvl.ops import co_attention


class TransformerLayer(Checkpointable):
    """BERT's ``BertLayer``: self-attention (fused QKV), then the feed-forward.

    Parameters: ``attention`` (:class:`SelfAttention`: ``qkv``, ``dense``, ``norm``) and ``ffn``
    (:class:`FeedForward`: ``intermediate``, ``output``, ``norm``).
    ``forward(hidden [B, L, hidden], attention_mask [B, L] | None, *, cu_seqlens, max_seqlen,
    output_attentions)`` -> hidden (and probabilities ``[B, H, L, L]`` if asked).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1, eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads, attention_dropout, hidden_dropout, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, hidden_dropout, eps, activation)

    def compute(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                output_attentions: bool = False):
        out = self.attention(hidden, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             output_attentions=output_attentions)
        if output_attentions:
            out, probs = out
            return self.ffn(out), probs
        return self.ffn(out)


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerLayer` (parameters ``layers.{i}.*``).

    ``forward(hidden, attention_mask=None, *, cu_seqlens=None, max_seqlen=None,
    output_attentions=False)`` -> hidden, or ``(hidden, [probs per layer])`` with output_attentions.
    """

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1, eps: float = 1e-12,
                 activation: str = "gelu"):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, num_heads, intermediate_size, hidden_dropout, attention_dropout, eps,
                             activation) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                output_attentions: bool = False):
        all_probs = []
        for layer in self.layers:
            hidden = layer(hidden, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           output_attentions=output_attentions)
            if output_attentions:
                hidden, probs = hidden
                all_probs.append(probs)
        return (hidden, all_probs) if output_attentions else hidden


class CrossAttentionLayer(Checkpointable):
    """ALBEF's fusion layer (its ``BertLayer`` with ``has_cross_attention``): self-attention over the
    text, cross-attention from the text to the image tokens, feed-forward.

    Parameters: ``attention`` (:class:`SelfAttention`), ``crossattention`` (:class:`CrossAttention`:
    ``query``, ``kv``, ``dense``, ``norm``), ``ffn``.
    ``forward(hidden [B, Lt, hidden], attention_mask [B, Lt] | None, encoder_hidden [B, Lv, enc],
    encoder_mask [B, Lv] | None, *, cu_seqlens / max_seqlen (text), cu_seqlens_k / max_seqlen_k
    (image), output_attentions)`` -> hidden, or ``(hidden, self_probs, cross_probs)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 encoder_hidden_size: int | None = None, hidden_dropout: float = 0.1, attention_dropout: float = 0.1,
                 eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads, attention_dropout, hidden_dropout, eps)
        self.crossattention = CrossAttention(hidden_size, num_heads, encoder_hidden_size, attention_dropout,
                                             hidden_dropout, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, hidden_dropout, eps, activation)

    def compute(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, encoder_hidden: torch.Tensor,
                encoder_mask: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, cu_seqlens_k: torch.Tensor | None = None,
                max_seqlen_k: int | None = None, output_attentions: bool = False):
        out = self.attention(hidden, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             output_attentions=output_attentions)
        self_probs = None
        if output_attentions:
            out, self_probs = out
        out = self.crossattention(out, encoder_hidden, encoder_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
                                  output_attentions=output_attentions)
        if output_attentions:
            out, cross_probs = out
            return self.ffn(out), self_probs, cross_probs
        return self.ffn(out)


class CoAttentionLayer(Checkpointable):
    """ViLBERT's co-attention layer (``BertConnectionLayer``, the Co-TRM).

    Image queries attend to the text keys / values (text mask) and text queries to the image keys /
    values (image mask) through :func:`fastvl.ops.co_attention`, in a ``bi_hidden_size`` space with
    ``bi_num_heads`` heads. Then image = LN1(dropout(dense1(image context)) + image input), text =
    LN2(dropout(dense2(text context)) + text input), and one feed-forward per stream.

    Parameters: ``v_qkv`` (Linear v_hidden -> 3 * bi_hidden; the original's query1 / key1 / value1),
    ``t_qkv`` (Linear hidden -> 3 * bi_hidden; query2 / key2 / value2), ``dense1`` (bi -> v_hidden),
    ``norm1``, ``dense2`` (bi -> hidden), ``norm2``, ``v_ffn``, ``t_ffn``.
    ``forward(image [B, Lv, v_hidden], image_mask [B, Lv] | None, text [B, Lt, hidden], text_mask
    [B, Lt] | None, output_attentions=False)`` -> ``(image, text)``, or ``(image, text, (probs_v
    [B, Hb, Lv, Lt], probs_t [B, Hb, Lt, Lv]))``. Packed form: image ``[total_v, v_hidden]`` and text
    ``[total_t, hidden]`` with masks None and ``cu_seqlens_v`` / ``cu_seqlens_t`` (int32 ``[B + 1]``,
    each stream its own lengths), optional ``max_seqlen_v`` / ``max_seqlen_t``.
    """

    def __init__(self, hidden_size: int, v_hidden_size: int, bi_hidden_size: int, bi_num_heads: int,
                 intermediate_size: int, v_intermediate_size: int, hidden_dropout: float = 0.1,
                 v_hidden_dropout: float = 0.1, attention_dropout: float = 0.1, eps: float = 1e-12,
                 activation: str = "gelu", v_activation: str = "gelu"):
        super().__init__()
        if bi_hidden_size % bi_num_heads:
            raise ValueError(f"bi_hidden_size ({bi_hidden_size}) must be divisible by bi_num_heads ({bi_num_heads})")
        self.bi_num_heads, self.attention_dropout = bi_num_heads, attention_dropout
        self.hidden_dropout, self.v_hidden_dropout = hidden_dropout, v_hidden_dropout
        self.v_qkv = InputSharingLinear(v_hidden_size, 3 * bi_hidden_size)
        self.t_qkv = InputSharingLinear(hidden_size, 3 * bi_hidden_size)
        self.dense1 = nn.Linear(bi_hidden_size, v_hidden_size)
        self.norm1 = LayerNorm(v_hidden_size, eps)
        self.dense2 = nn.Linear(bi_hidden_size, hidden_size)
        self.norm2 = LayerNorm(hidden_size, eps)
        self.v_ffn = FeedForward(v_hidden_size, v_intermediate_size, v_hidden_dropout, eps, v_activation)
        self.t_ffn = FeedForward(hidden_size, intermediate_size, hidden_dropout, eps, activation)

    def compute(self, image: torch.Tensor, image_mask: torch.Tensor | None, text: torch.Tensor,
                text_mask: torch.Tensor | None, output_attentions: bool = False, *,
                cu_seqlens_v: torch.Tensor | None = None, max_seqlen_v: int | None = None,
                cu_seqlens_t: torch.Tensor | None = None, max_seqlen_t: int | None = None):
        packed = cu_seqlens_v is not None or cu_seqlens_t is not None
        if packed and output_attentions:
            raise ValueError("output_attentions=True needs the padded form, not cu_seqlens")
        if not packed and (image.dim() != 3 or text.dim() != 3 or image.shape[0] != text.shape[0]):
            raise ValueError(f"image [B, Lv, v_hidden] and text [B, Lt, hidden] must share B, got "
                             f"{list(image.shape)} and {list(text.shape)}")
        qkv_v, image = self.v_qkv(image)  # image, text: also the residuals
        qkv_t, text = self.t_qkv(text)
        q_v, k_v, v_v = split_heads(qkv_v, 3 * self.bi_num_heads).chunk(3, dim=-2)
        q_t, k_t, v_t = split_heads(qkv_t, 3 * self.bi_num_heads).chunk(3, dim=-2)
        dropout_p = self.attention_dropout if self.training else 0.0
        if output_attentions:
            image_mask = bool_mask("image_mask", image_mask, image.shape[0], image.shape[1], image.device)
            text_mask = bool_mask("text_mask", text_mask, text.shape[0], text.shape[1], text.device)
        out = co_attention(q_v, k_v, v_v, image_mask, q_t, k_t, v_t, text_mask, dropout_p,
                           cu_seqlens_v=cu_seqlens_v, cu_seqlens_t=cu_seqlens_t, max_seqlen_v=max_seqlen_v,
                           max_seqlen_t=max_seqlen_t, return_probs=output_attentions)
        ctx_v, ctx_t = out[:2]
        probs = out[2] if output_attentions else None
        image = self.norm1(self.dense1(ctx_v.flatten(-2)), image, self.v_hidden_dropout)
        text = self.norm2(self.dense2(ctx_t.flatten(-2)), text, self.hidden_dropout)
        image, text = self.v_ffn(image), self.t_ffn(text)
        return (image, text, probs) if output_attentions else (image, text)
