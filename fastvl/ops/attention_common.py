"""What the sibling attention ops (:mod:`fastvl.ops.attention_op`, :mod:`fastvl.ops.co_attention_op`)
share besides the Triton launchers (:mod:`fastvl.ops.attention_launch`): ``cu_seqlens`` validation,
packing helpers, the torch SDPA path, the eager path that returns probabilities, and the backends'
support rules.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fastvl.dispatch import triton_device, triton_interpreting
from fastvl.ops import attention_launch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEEDED_ONLY_ON_TRITON = "dropout_seed is honoured by the triton backend only"
NO_PROBS = ("returns no attention probabilities (it never materialises them); return_probs=True runs on the "
            "eager or reference backend")
SHORT_SEQUENCE = 128  # the ViLBERT / VL-BERT / ALBEF range, where fastvl's Triton kernels are meant to win


_VALIDATED = WeakIdKeyDictionary()  # cu_seqlens tensor -> (version, packed length, longest sequence)


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_name: str, given_max: int | None) -> int | None:
    """Validates a packed batch's ``cu_seqlens`` (int32/int64 ``[B + 1]``, starts at 0, never
    decreases, ends at the packed length ``total``) and its ``max_seqlen`` (an int at least the
    longest sequence; 0 only for an empty batch). Returns the max_seqlen to launch with: the given
    one, else the longest sequence when the values were read, else None.

    The value checks read ``cu`` on the host, once per tensor (and again only after it is changed in
    place): the first layer of a step pays one sync, the others reuse the result. They are skipped
    under ``torch.compile`` and with ``FASTVL_VALIDATE_CU_SEQLENS=0`` (CUDA-graph capture).
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 tensor [B + 1], got "
                        f"{getattr(cu, 'dtype', type(cu).__name__)} {list(getattr(cu, 'shape', []))}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must have B + 1 >= 2 entries, got {cu.numel()}")
    if torch.compiler.is_compiling():
        return given_max
    if given_max is not None:
        if isinstance(given_max, bool) or not isinstance(given_max, numbers.Integral):
            raise TypeError(f"{max_name} must be an int (the longest sequence of {name}), got "
                            f"{type(given_max).__name__}")
        given_max = int(given_max)
        if given_max < 0 or (given_max == 0 and total > 0):
            raise ValueError(f"{max_name} must be >= 1 (the longest sequence of {name}), got {given_max}")
    if os.environ.get("FASTVL_VALIDATE_CU_SEQLENS", "1") == "0":
        return given_max
    longest = _checked_longest(name, cu, total)
    if given_max is not None and given_max < longest:
        raise ValueError(f"{max_name} = {given_max} is below the longest sequence of {name} ({longest}): rows past "
                         f"it would be dropped; pass at least {longest} (or None to read it from {name})")
    return longest if given_max is None else given_max


def _checked_longest(name: str, cu: torch.Tensor, total: int) -> int:
    try:
        version = cu._version
    except RuntimeError:  # an inference-mode tensor has no version counter: check every time
        version = None
    seen = _VALIDATED.get(cu) if version is not None else None
    if seen is not None and seen[0] == version and seen[1] == total:
        return seen[2]
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the packed length {total}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if version is not None:
        _VALIDATED[cu] = (version, total, longest)
    return longest


def check_return_probs(return_probs, packed: bool, packing: str) -> None:
    """``return_probs`` must be a bool, and False for a packed batch (probabilities are ``[B, H, Lq, Lk]``)."""
    if not isinstance(return_probs, bool):
        raise TypeError(f"return_probs must be a bool, got {type(return_probs).__name__}")
    if return_probs and packed:
        raise ValueError(f"return_probs=True needs the padded form ([B, L, H, D] with a mask), not {packing}")


def max_seqlen(cu_seqlens: torch.Tensor, given: int | None) -> int:
    """The longest sequence of a packed batch: ``given`` if known, else read from the device (a sync)."""
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
    padded = x[index].masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 1))), 0)
    return padded, valid


def unpad(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of :func:`pad_packed`: ``[B, max_seqlen, ...]`` -> ``[total, ...]``."""
    token = torch.arange(total, device=padded.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    return padded[sequence, token - cu_seqlens.long()[sequence]]


# The torch SDPA path ----------------------------------------------------------------------------------


def _keep_mask(len_q: int, len_k: int, mask, causal: bool, device) -> tuple[torch.Tensor | None, ...]:
    """(bool keep ``[B or 1, 1, Lq, Lk]`` with every key given to rows that have none, bool has_key
    ``[B or 1, 1, Lq, 1]``), both None when nothing is masked. Rows with no real key attend to every
    key (finite values and gradients) and are zeroed afterwards through ``has_key``."""
    if mask is None and not causal:
        return None, None
    keep = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(diagonal=len_k - len_q)
    keep = keep[None, None]
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    has_key = keep.any(dim=-1, keepdim=True)
    return keep | ~has_key, has_key


def _zero_padded_keys(k, v, mask):
    """Padded key and value rows zeroed, so a non-finite value there stays out of the sample."""
    if mask is None:
        return k, v
    padded = ~mask[:, :, None, None]
    return k.masked_fill(padded, 0), v.masked_fill(padded, 0)


def sdpa_padded(q, k, v, mask, dropout_p: float, scale: float | None, causal: bool) -> torch.Tensor:
    """torch's SDPA on ``[B, L, H, D]``; queries with no real key get zeros (and zero gradient). Padded
    key and value rows are zeroed first, so a non-finite value there stays out of the sample."""
    k, v = _zero_padded_keys(k, v, mask)
    keep, has_key = _keep_mask(q.shape[1], k.shape[1], mask, causal, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                         dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


def eager_padded(q, k, v, mask, dropout_p: float, scale: float | None,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention math step by step on ``[B, L, H, D]`` (SDPA's math path, in q's dtype with the
    softmax in float32 for 16-bit inputs), keeping the probabilities: ``(out [B, Lq, H, D], probs
    [B, H, Lq, Lk])``, both differentiable. ``probs`` are the ones the values are averaged with (after
    dropout, as BERT's ``output_attentions`` returns them); masked keys get 0, rows with no real key
    are zeros (zero output, zero gradient)."""
    k, v = _zero_padded_keys(k, v, mask)
    keep, has_key = _keep_mask(q.shape[1], k.shape[1], mask, causal, q.device)
    q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * softmax_scale(q.shape[-1], scale)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    half = q.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if half else None).to(q.dtype)
    if has_key is not None:
        probs = torch.where(has_key, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v_).transpose(1, 2), probs


def sdpa_packed(q, k, v, cu_q, cu_k, max_q: int | None, max_k: int | None, dropout_p: float, scale: float | None,
                causal: bool) -> torch.Tensor:
    """:func:`sdpa_padded` on a packed batch: pad, attend, unpad."""
    q_pad, _ = pad_packed(q, cu_q, max_seqlen(cu_q, max_q))
    k_pad, key_mask = pad_packed(k, cu_k, max_seqlen(cu_k, max_k))
    v_pad, _ = pad_packed(v, cu_k, k_pad.shape[1])
    return unpad(sdpa_padded(q_pad, k_pad, v_pad, key_mask, dropout_p, scale, causal), cu_q, q.shape[0])


# Support rules shared by both ops' backends -------------------------------------------------------------


def triton_supports(dtype, head_dim, device, probs=False, **_features) -> list[str]:
    reasons = triton_device(device)
    if probs:
        reasons.append(NO_PROBS)
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} (triton runs float16, bfloat16, float32)")
    if dtype == torch.bfloat16 and triton_interpreting():
        reasons.append("bfloat16 under TRITON_INTERPRET=1 (the interpreter's bfloat16 tl.dot returns wrong values; "
                       "use float16 or float32 there)")
    if not reasons:
        max_head_dim = max(attention_launch.kernels().HEAD_BLOCKS)
        if head_dim > max_head_dim:
            reasons.append(f"head dim {head_dim} > {max_head_dim}")
    return reasons


def torch_supports(device, seeded=False, deterministic=False, probs=False, **_features) -> list[str]:
    """The SDPA backends' rules (torch's fused kernels return no probabilities)."""
    reasons = [NO_PROBS] if probs else []
    if seeded:
        reasons.append(SEEDED_ONLY_ON_TRITON)
    if deterministic and device.type == "cuda":
        reasons.append("torch's CUDA attention backward is not promised bitwise repeatable")
    return reasons


def reference_supports(seeded=False, **_features) -> list[str]:
    return [SEEDED_ONLY_ON_TRITON] if seeded else []


def eager_supports(seeded=False, probs=False, **_features) -> list[str]:
    """The eager backend is the probabilities path: without ``return_probs`` SDPA runs the same math fused."""
    reasons = [] if probs else ["only for return_probs=True (without it, sdpa runs the same math fused)"]
    if seeded:
        reasons.append(SEEDED_ONLY_ON_TRITON)
    return reasons


def attention_rule(device, dtype, lengths: tuple[int | None, ...], packed: bool, seeded: bool = False,
                   deterministic: bool = False) -> list[tuple[str, str]]:
    """auto's fallback order for both attention ops (when no calibration table entry decides): on CUDA
    Triton in the short-sequence range and for what only it offers (a seeded dropout mask, a bitwise
    repeatable backward); torch SDPA (flash / cuDNN / memory-efficient kernels), or flash_attn's
    varlen kernel for packed batches, for long sequences and float32. Elsewhere: registration order."""
    if device.type != "cuda":
        return []
    if seeded or deterministic:
        return [("triton", "only triton honours dropout_seed and promises a bitwise repeatable backward")]
    known = [n for n in lengths if n is not None]
    longest = max(known) if known else None
    if dtype == torch.float32 or (longest is not None and longest > SHORT_SEQUENCE):
        why = "float32" if dtype == torch.float32 else f"long sequences (> {SHORT_SEQUENCE})"
        order = [("flash_attn", f"{why}, packed: flash_attn's varlen kernel")] if packed else []
        return order + [("sdpa", f"{why}: torch SDPA (flash / cuDNN / memory-efficient kernels)"),
                        ("triton", f"{why}, SDPA unusable: triton")]
    return [("triton", f"short sequences (<= {SHORT_SEQUENCE}) in 16 bits: fastvl's Triton kernels")]
