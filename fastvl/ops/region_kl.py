"""``fastvl.ops.region_kl_loss`` and ``linear_region_kl_loss``: ViLBERT's masked-region KL loss.

Backends (auto order): ``reference`` (the original formula). The loss issue adds ``triton`` (GPU)
and ``cpp`` (CPU, csrc/) backends that compute the loss and its gradient in one pass.
"""

from __future__ import annotations

import torch

from fastvl import _checks
from fastvl.dispatch import op
from fastvl.reference.region_kl import linear_region_kl_loss_ref, region_kl_loss_ref

REGION_KL = op("region_kl_loss")
LINEAR_REGION_KL = op("linear_region_kl_loss")
REDUCTIONS = ("mean", "sum", "none")


def _validate_targets(logits_name: str, leading: torch.Size, classes: int, reference: torch.Tensor,
                      target_probs: torch.Tensor, region_mask: torch.Tensor, reduction: str) -> None:
    _checks.tensor("target_probs", target_probs, shape=f"[..., C] like {logits_name}")
    _checks.same_shape("target_probs", target_probs, [*leading, classes], f"[..., C] = {logits_name}'s shape")
    _checks.tensor("region_mask", region_mask, shape="[...] (bool, True = masked region)",
                   dtypes=(torch.bool, torch.uint8, torch.int32, torch.int64, *_checks.FLOAT_DTYPES))
    _checks.same_shape("region_mask", region_mask, list(leading), f"{logits_name}'s shape without the class dim")
    _checks.same_device(logits_name, reference, target_probs=target_probs, region_mask=region_mask)
    _checks.choice("reduction", reduction, REDUCTIONS)


def region_kl_loss(logits: torch.Tensor, target_probs: torch.Tensor, region_mask: torch.Tensor,
                   reduction: str = "mean", *, backend: str | None = None) -> torch.Tensor:
    """KL(target_probs || softmax(logits)) summed over classes, over masked regions.

    logits ``[..., C]`` (fp32/fp16/bf16; accumulation in fp32); target_probs ``[..., C]`` (the
    detector's class distribution; exact zeros allowed); region_mask ``[...]`` bool, True = a masked
    region that is scored. reduction 'mean' (over masked regions; 0 with zero gradient when nothing is
    masked, where the original gives NaN), 'sum', or 'none' (``[...]``, 0 on unmasked regions).
    ViLBERT scores positions 1.. (its IMG token at 0 is never masked): slicing is the caller's choice.
    """
    _checks.tensor("logits", logits, shape="[..., C]", ndim=range(1, 8))
    _validate_targets("logits", logits.shape[:-1], logits.shape[-1], logits, target_probs, region_mask, reduction)
    region_mask = region_mask.bool()
    chosen = REGION_KL.select(backend, logits.device, dtype=logits.dtype, classes=logits.shape[-1])
    return chosen.impl(logits, target_probs, region_mask, reduction)


def linear_region_kl_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          target_probs: torch.Tensor, region_mask: torch.Tensor, reduction: str = "mean", *,
                          backend: str | None = None) -> torch.Tensor:
    """``region_kl_loss(hidden @ weight.T + bias, target_probs, region_mask)`` without materialising
    the logits of unmasked regions (fused backends).

    hidden ``[..., K]``, weight ``[C, K]``, bias ``[C]`` or None, target_probs ``[..., C]``,
    region_mask ``[...]`` bool. Gradients flow to hidden, weight and bias. Under ZeRO-3 pass the
    gathered weight (call through the owning module, or inside ``GatheredParameters``).
    """
    _checks.tensor("hidden", hidden, shape="[..., K]", ndim=range(1, 8))
    _checks.tensor("weight", weight, shape="[C, K]", ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [C, K] with K = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {list(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, shape="[C]", ndim=1)
        _checks.same_shape("bias", bias, [weight.shape[0]], "[C] with C = weight.shape[0]")
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    _validate_targets("hidden", hidden.shape[:-1], weight.shape[0], hidden, target_probs, region_mask, reduction)
    region_mask = region_mask.bool()
    chosen = LINEAR_REGION_KL.select(backend, hidden.device, dtype=hidden.dtype, classes=weight.shape[0])
    return chosen.impl(hidden, weight, bias, target_probs, region_mask, reduction)


REGION_KL.register("reference")(region_kl_loss_ref)
LINEAR_REGION_KL.register("reference")(linear_region_kl_loss_ref)
