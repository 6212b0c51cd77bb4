"""What the sibling attention ops (:mod:`fastvl.ops.attention_op`, :mod:`fastvl.ops.co_attention_op`)
share besides the Triton launchers (:mod:`fastvl.ops.attention_launch`): ``cu_seqlens`` validation,
packing helpers, the torch SDPA path, and the backends' support rules.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from fastvl.dispatch import triton_device

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEEDED_ONLY_ON_TRITON = "dropout_seed is honoured by the triton backend only"


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
    if torch.compiler.is_compiling() or os.environ.get("FASTVL_VALIDATE_CU_SEQLENS", "1") == "0":
        return
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the packed length {total}")


def max_seqlen(cu_seqlens: torch.Tensor, given: int | None) -> int:
    """The longest sequence of a packed batch: ``given`` if passed, else read from the device (a sync)."""
    return int(given) if given is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def softmax_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def seed_tensor(dropout_seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A user's dropout seed as the int64 ``[1]`` tensor the kernels read (None stays None)."""
    if dropout_seed is None:
        return None
    return torch.as_tensor(dropout_seed, dtype=torch.int64).reshape(1).to(device)


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


# The torch SDPA path ----------------------------------------------------------------------------------


def sdpa_padded(q, k, v, mask, dropout_p: float, scale: float | None, causal: bool) -> torch.Tensor:
    """torch's SDPA on ``[B, L, H, D]``; queries with no real key get zeros (and zero gradient)."""
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


def sdpa_packed(q, k, v, cu_q, cu_k, max_q: int | None, max_k: int | None, dropout_p: float, scale: float | None,
                causal: bool) -> torch.Tensor:
    """:func:`sdpa_padded` on a packed batch: pad, attend, unpad."""
    q_pad, _ = pad_packed(q, cu_q, max_seqlen(cu_q, max_q))
    k_pad, key_mask = pad_packed(k, cu_k, max_seqlen(cu_k, max_k))
    v_pad, _ = pad_packed(v, cu_k, k_pad.shape[1])
    return unpad(sdpa_padded(q_pad, k_pad, v_pad, key_mask, dropout_p, scale, causal), cu_q, q.shape[0])


# Support rules shared by both ops' backends -------------------------------------------------------------


def triton_supports(dtype, head_dim, device, **_features) -> list[str]:
    reasons = triton_device(device)
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} (triton runs float16, bfloat16, float32)")
    if head_dim > 128:
        reasons.append(f"head dim {head_dim} > 128")
    return reasons


def torch_supports(device, seeded=False, deterministic=False, **_features) -> list[str]:
    reasons = []
    if seeded:
        reasons.append(SEEDED_ONLY_ON_TRITON)
    if deterministic and device.type == "cuda":
        reasons.append("torch's CUDA attention backward is not promised bitwise repeatable")
    return reasons


def reference_supports(seeded=False, **_features) -> list[str]:
    return [SEEDED_ONLY_ON_TRITON] if seeded else []
