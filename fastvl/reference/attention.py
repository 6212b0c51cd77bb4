"""Reference attention, written as BERT's self-attention computes it (matmul, scale, additive mask,
softmax, dropout, matmul), on fastvl's ``[B, L, H, D]`` layout."""

from __future__ import annotations

import math

import torch

MASKED_ADDEND = -10000.0  # the original projects' additive mask value


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, scale: float | None = None, causal: bool = False,
                  dropout_mask: torch.Tensor | None = None, upcast: bool = False,
                  return_probs: bool = False):
    """Eager attention. q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]``, key_padding_mask bool ``[B, Lk]``
    (True = real key) -> ``[B, Lq, H, D]`` (and the probabilities ``[B, H, Lq, Lk]`` if asked).

    Padded keys get the original's additive -10000 (and their key and value rows are zeroed first, so
    a non-finite value in a padded slot stays out of the sample); a query with no real key (all padded, or causal
    with none before it) returns zeros, where the original would average every value.
    ``dropout_mask`` (bool ``[B, H, Lq, Lk]``, True = kept) replaces random dropout so a kernel's
    keep-mask can be replayed; kept probabilities are scaled by ``1 / (1 - dropout_p)``.
    ``upcast=True`` computes in float64 and casts the result back.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    if key_padding_mask is not None:  # padded keys and values never reach the result (not even as 0 * inf)
        padded = ~key_padding_mask[:, :, None, None]
        k, v = k.masked_fill(padded, 0), v.masked_fill(padded, 0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_, k_, v_ = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, L, D]
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.ones_like(keep).tril(diagonal=scores.shape[-1] - scores.shape[-2])
    keep = keep.expand(q.shape[0], 1, *keep.shape)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    scores = scores + (~keep).to(scores.dtype) * MASKED_ADDEND
    probs = torch.softmax(scores, dim=-1)
    probs = probs * keep.any(dim=-1, keepdim=True).to(probs.dtype)  # no real key -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v_).permute(0, 2, 1, 3).to(out_dtype)
    return (out, probs) if return_probs else out


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None,
                         causal: bool = False, upcast: bool = False) -> torch.Tensor:
    """Packed attention: q ``[total_q, H, D]``, k/v ``[total_k, H, D]``, ``cu_seqlens_*`` int32
    ``[B + 1]`` prefix sums. Sequence i's queries attend only to sequence i's keys."""
    outputs = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs, ks = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        outputs.append(attention_ref(q[None, qs], k[None, ks], v[None, ks], None, dropout_p, scale, causal,
                                     upcast=upcast)[0])
    return torch.cat(outputs, dim=0)
