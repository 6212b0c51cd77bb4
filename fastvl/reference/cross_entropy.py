"""Reference MLM head loss and soft cross-entropy, as the original projects compute them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.reference.region_kl import _reduce_masked


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, ignore_index: int = -1, reduction: str = "mean",
                             upcast: bool = False) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, skipping ``ignore_index``.

    hidden ``[..., K]``, weight ``[V, K]`` (tied to the word embeddings in BERT), bias ``[V]`` or None,
    labels int64 ``[...]``. Projects every position, as the original heads do. 'mean' averages over
    positions whose label is not ignored, and gives 0 (not the original's NaN) when every label is
    ignored; 'sum'; 'none' gives ``[...]`` with 0 at ignored positions.
    """
    out_dtype = hidden.dtype
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    logits = F.linear(hidden, weight, bias)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    return _reduce_masked(per_token, labels != ignore_index, reduction).to(out_dtype)


def soft_cross_entropy_ref(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None = None,
                           reduction: str = "mean") -> torch.Tensor:
    """``-sum(target * log_softmax(logits))`` per row (ALBEF's distillation term, VL-BERT's masked RoI
    classification), over rows where ``mask`` is True (all rows if None); 'mean' gives 0 when none."""
    per_row = -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    mask = torch.ones_like(per_row, dtype=torch.bool) if mask is None else mask
    return _reduce_masked(per_row, mask, reduction)
