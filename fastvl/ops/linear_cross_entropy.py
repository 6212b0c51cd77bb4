"""``fastvl.ops.linear_cross_entropy``: the MLM head (projection to the vocabulary + cross-entropy).

Backends (auto order): ``reference`` (projects every position, as the original). The loss issue adds
fused backends that project only the positions whose label is not ignored, chunk by chunk.
"""

from __future__ import annotations

import torch

from fastvl import _checks
from fastvl.dispatch import op
from fastvl.ops.region_kl import REDUCTIONS
from fastvl.reference.cross_entropy import linear_cross_entropy_ref

LINEAR_CROSS_ENTROPY = op("linear_cross_entropy")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int = -1, reduction: str = "mean", *,
                         backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    hidden ``[..., K]``; weight ``[V, K]`` (tied to the word embeddings in BERT); bias ``[V]`` or None;
    labels int64 ``[...]`` in ``[0, V)`` or ``ignore_index`` (default -1, ViLBERT's; HF uses -100).
    reduction 'mean' over non-ignored positions (0 with zero gradient when all are ignored), 'sum',
    or 'none'. Under ZeRO-3 pass the gathered weight.
    """
    _checks.tensor("hidden", hidden, shape="[..., K]", ndim=range(1, 8))
    _checks.tensor("weight", weight, shape="[V, K]", ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, K] with K = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {list(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, shape="[V]", ndim=1)
        _checks.same_shape("bias", bias, [weight.shape[0]], "[V] with V = weight.shape[0]")
    _checks.tensor("labels", labels, shape="[...] int64", dtypes=(torch.int64, torch.int32))
    _checks.same_shape("labels", labels, list(hidden.shape[:-1]), "hidden's shape without the last dim")
    _checks.same_device("hidden", hidden, weight=weight, bias=bias, labels=labels)
    _checks.choice("reduction", reduction, REDUCTIONS)
    chosen = LINEAR_CROSS_ENTROPY.select(backend, hidden.device, dtype=hidden.dtype, classes=weight.shape[0])
    return chosen.impl(hidden, weight, bias, labels.long(), ignore_index, reduction)


LINEAR_CROSS_ENTROPY.register("reference")(linear_cross_entropy_ref)
