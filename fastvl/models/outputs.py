"""The pretraining output every model returns (one contract, so training and benchmarks read any model alike)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PretrainingOutput:
    """``loss``: the sum of ``losses`` (None when no objective's labels were given); ``losses``: one
    scalar per objective computed, keyed by the objective's short name (ViLBERT ``mlm`` / ``region``
    / ``align``, VL-BERT ``mlm`` / ``mvrc`` / ``relationship``, ALBEF ``itc`` / ``itm`` / ``mlm``).
    Each model's subclass adds its scores and features."""

    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The equal-weight sum of the objectives' losses (None if there is none)."""
    result = None
    for value in losses.values():
        result = value if result is None else result + value
    return result
