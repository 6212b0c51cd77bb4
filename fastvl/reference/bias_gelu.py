"""Reference bias + GELU (erf form), as BERT's intermediate layer computes it."""

from __future__ import annotations

import math

import torch


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """``gelu(x + bias)`` with BERT's exact form ``h * 0.5 * (1 + erf(h / sqrt(2)))``.

    x ``[..., N]``, bias ``[N]`` or None. ``upcast=True`` computes in float64 and casts back.
    """
    out_dtype = x.dtype
    if upcast:
        x = x.double()
        bias = bias.double() if bias is not None else None
    hidden = x + bias.to(x.dtype) if bias is not None else x
    return (hidden * 0.5 * (1.0 + torch.erf(hidden / math.sqrt(2.0)))).to(out_dtype)
