"""Reference residual + dropout + LayerNorm, as BERT's ``BertSelfOutput`` / ``BertOutput`` compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, dropout_p: float = 0.0, eps: float = 1e-12,
                   dropout_mask: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dim.

    x ``[..., N]``; residual ``[..., N]`` or None; weight / bias ``[N]``; ``eps`` defaults to BERT's
    1e-12. ``dropout_mask`` (bool ``[..., N]``, True = kept) replaces random dropout so a kernel's
    keep-mask can be replayed; kept values are scaled by ``1 / (1 - dropout_p)``. ``upcast=True``
    computes in float64 and casts back. The result has the promoted dtype of x and residual.
    """
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    if upcast:
        x, weight = x.double(), weight.double()
        bias = bias.double() if bias is not None else None
        residual = residual.double() if residual is not None else None
    if dropout_mask is not None:
        x = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p)
    hidden = x + residual if residual is not None else x
    return F.layer_norm(hidden, hidden.shape[-1:], weight.to(hidden.dtype),
                        bias.to(hidden.dtype) if bias is not None else None, eps).to(out_dtype)
