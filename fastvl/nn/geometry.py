"""VL-BERT's visual feature embedding: a sinusoidal embedding of each box's geometry concatenated with
its RoI feature, then ``Dropout -> Linear -> ReLU`` (the original's ``obj_downsample``).

Geometry, as VL-BERT computes it: the box ``(cx, cy, w, h)`` divided by the image size and times 100,
each of the four coordinates embedded as ``[sin(p / 1000^(i/d)) | cos(p / 1000^(i/d))]`` for
``i < d`` (d = 256), giving ``4 * 2 * 256 = 2048`` values, laid out coordinate by coordinate. The
geometry comes first in the concatenation, the 2048-d RoI feature second.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvl import _checks

BOX_SHAPE = "[B, R, 4] (x1, y1, x2, y2) normalised to [0, 1]"


def box_geometry_embedding(boxes: torch.Tensor, dim: int = 256, wavelength: float = 1000.0) -> torch.Tensor:
    """``[..., 4]`` normalised ``(x1, y1, x2, y2)`` boxes -> ``[..., 8 * dim]`` sinusoidal geometry.

    Computed in float32 (float64 for float64 boxes) whatever the autocast state: the arguments reach
    100, where half-precision sines are meaningless. Returns that dtype; the caller casts.
    """
    compute = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    with torch.autocast(boxes.device.type, enabled=False):
        x1, y1, x2, y2 = boxes.to(compute).unbind(-1)
        position = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1) * 100.0
        inverse_frequency = wavelength ** (-torch.arange(dim, dtype=compute, device=boxes.device) / dim)
        angles = position[..., None] * inverse_frequency  # [..., 4, dim]
        return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def check_boxes(name: str, boxes: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """Boxes must lie in [0, 1] with x1 <= x2 and y1 <= y2 (only rows where ``valid`` is True are read).

    The value check reads the tensor on the host (one sync); it is skipped under ``torch.compile``.
    """
    if torch.compiler.is_compiling():
        return
    rows = boxes if valid is None else boxes[valid]
    if rows.numel() == 0:
        return
    finite = bool(torch.isfinite(rows).all())
    inside = finite and bool(((rows >= 0) & (rows <= 1)).all())
    ordered = inside and bool(((rows[..., 2] >= rows[..., 0]) & (rows[..., 3] >= rows[..., 1])).all())
    if not ordered:
        low, high = (float(rows.nan_to_num().min()), float(rows.nan_to_num().max()))
        problem = ("has non-finite values" if not finite else
                   f"has values outside [0, 1] (min {low:.4g}, max {high:.4g})" if not inside else
                   "has boxes with x2 < x1 or y2 < y1")
        raise ValueError(f"{name} must be {BOX_SHAPE} with x1 <= x2, y1 <= y2; it {problem} "
                         "(divide pixel boxes by the image width/height)")


class VisualFeatureEmbedding(nn.Module):
    """``[B, R, feature_dim]`` RoI features + ``[B, R, 4]`` normalised boxes -> ``[B, R, hidden]``.

    ``relu(linear(dropout(cat(geometry(boxes), features))))``, VL-BERT's ``obj_downsample``
    (``proj`` is its ``obj_downsample.1``).
    """

    def __init__(self, feature_dim: int = 2048, hidden_size: int = 768, sinusoid_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.feature_dim = feature_dim
        self.sinusoid_dim = sinusoid_dim
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(8 * sinusoid_dim + feature_dim, hidden_size)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (bool ``[B, R]``, optional) limits the box value check to real regions."""
        _checks.tensor("features", features, shape=f"[B, R, {self.feature_dim}]", ndim=3)
        _checks.tensor("boxes", boxes, shape=BOX_SHAPE, ndim=3)
        if features.shape[-1] != self.feature_dim:
            raise ValueError(f"features must have shape [B, R, {self.feature_dim}] (RoI features of width "
                             f"{self.feature_dim}), got {list(features.shape)}")
        _checks.same_shape("boxes", boxes, [*features.shape[:2], 4], "[B, R, 4] with B, R as features")
        _checks.same_device("features", features, boxes=boxes, valid=valid)
        check_boxes("boxes", boxes, valid)
        geometry = box_geometry_embedding(boxes, self.sinusoid_dim).to(features.dtype)
        return torch.relu(self.proj(self.dropout(torch.cat((geometry, features), dim=-1))))
