"""``fastvl.ops.attention``: scaled dot-product attention over padded ``[B, L, H, D]`` or packed
variable-length ``[total, H, D]`` batches, with key padding masks, dropout and fully masked rows
defined as zeros.

Backends (auto order): ``sdpa`` (torch's ``scaled_dot_product_attention``), ``reference`` (eager,
mirrors BERT's self-attention). Kernel issues add ``triton`` / ``xformers`` / ``flash_attn`` ahead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.dispatch import op
from fastvl.reference.attention import attention_ref, varlen_attention_ref

ATTENTION = op("attention")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None, causal: bool = False, *,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + mask) v``.

    Padded form: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` (any strides: a fused QKV projection's
    output can be passed as views), key_padding_mask ``[B, Lk]`` bool with True = a real key (the
    original projects' additive float mask, 0 / -10000, shaped ``[B, Lk]`` or ``[B, 1, 1, Lk]``, is
    accepted and converted). Returns ``[B, Lq, H, D]`` in q's dtype.

    Packed form: q ``[total_q, H, D]``, k/v ``[total_k, H, D]``, ``cu_seqlens_q`` / ``cu_seqlens_k``
    int32 ``[B + 1]`` prefix sums of the sequence lengths (FlashAttention's convention), optional
    ``max_seqlen_*`` (pass them to avoid a host sync). No key_padding_mask. Returns ``[total_q, H, D]``.

    A query with no real key (all padded, an empty key sequence) gets zeros and zero gradient.
    ``scale`` defaults to ``1/sqrt(D)``; ``causal`` aligns the mask to the bottom-right corner when
    Lq != Lk. Dtypes: float16, bfloat16, float32 (float64 on the torch backends).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    features = _validate(q, k, v, key_padding_mask, dropout_p, packed, cu_seqlens_q, cu_seqlens_k)
    key_padding_mask = features.pop("mask")
    chosen = ATTENTION.select(backend, q.device, **features)
    if packed:
        return chosen.impl(q, k, v, None, dropout_p, scale, causal, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k)
    return chosen.impl(q, k, v, key_padding_mask, dropout_p, scale, causal, None, None, None, None)


def _validate(q, k, v, key_padding_mask, dropout_p, packed, cu_seqlens_q, cu_seqlens_k) -> dict:
    rank, form_q, form_k = (3, "[total_q, H, D]", "[total_k, H, D]") if packed else (4, "[B, Lq, H, D]", "[B, Lk, H, D]")
    _checks.tensor("q", q, shape=form_q, ndim=rank)
    _checks.tensor("k", k, shape=form_k, ndim=rank)
    _checks.tensor("v", v, shape=form_k, ndim=rank)
    _checks.same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k)
    _checks.same_dtype("q", q, k=k, v=v)
    _checks.probability("dropout_p", dropout_p)
    heads, head_dim = q.shape[-2], q.shape[-1]
    _checks.same_shape("k", k, [*k.shape[:-2], heads, head_dim], form_k + f" with H={heads}, D={head_dim} as q")
    _checks.same_shape("v", v, list(k.shape), form_k + " equal to k's shape")
    if packed:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask must be None in the packed form (cu_seqlens_* carry the lengths)")
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("the packed form needs both cu_seqlens_q and cu_seqlens_k ([B + 1] int32)")
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
            check_cu_seqlens(name, cu, total)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1], got {list(cu_seqlens_q.shape)} "
                             f"and {list(cu_seqlens_k.shape)}")
        mask = None
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must have the same batch size B, got {q.shape[0]} and {k.shape[0]}")
        mask = _checks.key_padding_mask("key_padding_mask", key_padding_mask, k.shape[0], k.shape[1], q.device)
    return {"dtype": q.dtype, "head_dim": head_dim, "dropout": dropout_p > 0.0, "packed": packed, "mask": mask}


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> None:
    """cu_seqlens must be int32/int64 ``[B + 1]``, start at 0, not decrease, and end at ``total``.

    The value checks read the tensor on the host (one sync); they run only while validation is on
    (``FASTVL_VALIDATE_CU_SEQLENS=0`` disables them for CUDA-graph capture).
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 tensor [B + 1], got "
                        f"{getattr(cu, 'dtype', type(cu).__name__)} {list(getattr(cu, 'shape', []))}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must have B + 1 >= 2 entries, got {cu.numel()}")
    if torch.compiler.is_compiling() or not _validate_values():
        return
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the packed length {total}")


def _validate_values() -> bool:
    import os  # noqa: PLC0415

    return os.environ.get("FASTVL_VALIDATE_CU_SEQLENS", "1") != "0"


# Packing helpers (no host sync when max_seqlen is given) --------------------------------------------


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[total, ...]`` packed rows -> ``([B, max_seqlen, ...]`` zero-padded, bool ``[B, max_seqlen]`` mask)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    positions = torch.arange(max_seqlen, device=x.device)
    valid = positions[None, :] < lengths[:, None]
    index = (cu_seqlens[:-1, None].long() + positions[None, :]).clamp_max(max(x.shape[0] - 1, 0))
    padded = x[index] * valid.view(*valid.shape, *([1] * (x.dim() - 1))).to(x.dtype)
    return padded, valid


def unpad(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of :func:`pad_packed`: ``[B, max_seqlen, ...]`` -> ``[total, ...]``."""
    token = torch.arange(total, device=padded.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    return padded[sequence, token - cu_seqlens.long()[sequence]]


def _max_seqlen(cu_seqlens: torch.Tensor, given: int | None) -> int:
    return int(given) if given is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


# Backends ------------------------------------------------------------------------------------------


def _via_padding(padded_impl):
    """Runs a padded implementation on a packed batch by padding, attending, and unpadding."""

    def run(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k):
        if cu_q is None:
            return padded_impl(q, k, v, mask, dropout_p, scale, causal)
        q_pad, _ = pad_packed(q, cu_q, _max_seqlen(cu_q, max_q))
        k_pad, key_mask = pad_packed(k, cu_k, _max_seqlen(cu_k, max_k))
        v_pad, _ = pad_packed(v, cu_k, k_pad.shape[1])
        return unpad(padded_impl(q_pad, k_pad, v_pad, key_mask, dropout_p, scale, causal), cu_q, q.shape[0])

    return run


def _sdpa_padded(q, k, v, mask, dropout_p, scale, causal):
    keep = None
    if mask is not None or causal:
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
        if causal:
            keep = keep.tril(diagonal=k.shape[1] - q.shape[1])
        keep = keep[None, None]
        if mask is not None:
            keep = keep & mask[:, None, None, :]
    has_key = None
    if keep is not None:
        has_key = keep.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]
        keep = keep | ~has_key  # give empty rows every key, then zero them: finite values and gradients
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                         dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


def _reference_impl(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k):
    if cu_q is None:
        return attention_ref(q, k, v, mask, dropout_p, scale, causal)
    return varlen_attention_ref(q, k, v, cu_q, cu_k, dropout_p, scale, causal)


ATTENTION.register("sdpa")(_via_padding(_sdpa_padded))
ATTENTION.register("reference")(_reference_impl)
