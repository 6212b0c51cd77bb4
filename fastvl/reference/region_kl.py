"""Reference masked-region KL loss, as ViLBERT's masked multimodal modelling computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce_masked(per_item: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Applies ``mask`` to per-item losses and reduces; 'mean' divides by the masked count, and a
    count of zero gives 0 (not NaN) without a host sync."""
    per_item = per_item * mask.to(per_item.dtype)
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1).to(total.dtype)


def region_kl_loss_ref(logits: torch.Tensor, target_probs: torch.Tensor, region_mask: torch.Tensor,
                       reduction: str = "mean", upcast: bool = False) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over classes, over masked regions.

    logits ``[..., C]``; target_probs ``[..., C]`` (the detector's class distribution, rows summing
    to 1, exact zeros allowed: 0 * log 0 = 0); region_mask bool ``[...]`` (True = masked region that is
    scored). ``reduction``: 'mean' over masked regions (the original's
    ``sum(kl_div(log_softmax(x), p) * mask) / sum(mask)``, but 0 instead of NaN when nothing is
    masked), 'sum', or 'none' (per-region KL ``[...]``, 0 on unmasked regions).
    """
    out_dtype = logits.dtype
    if upcast:
        logits, target_probs = logits.double(), target_probs.double()
    log_probs = F.log_softmax(logits, dim=-1)
    per_class = F.kl_div(log_probs, target_probs.to(log_probs.dtype), reduction="none")
    loss = _reduce_masked(per_class.sum(dim=-1), region_mask, reduction)
    return loss.to(out_dtype)


def linear_region_kl_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              target_probs: torch.Tensor, region_mask: torch.Tensor, reduction: str = "mean",
                              upcast: bool = False) -> torch.Tensor:
    """``region_kl_loss_ref(hidden @ weight.T + bias, ...)``: hidden ``[..., K]``, weight ``[C, K]``,
    bias ``[C]`` or None. Projects every region, as the original head does."""
    out_dtype = hidden.dtype
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    logits = F.linear(hidden, weight, bias)
    return region_kl_loss_ref(logits, target_probs, region_mask, reduction, upcast=upcast).to(out_dtype)
