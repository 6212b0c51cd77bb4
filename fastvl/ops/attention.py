"""``fastvl.ops.attention``: scaled dot-product attention over padded ``[B, L, H, D]`` or packed
variable-length ``[total, H, D]`` batches, with key padding masks, dropout and fully masked rows
defined as zeros.

Backends (auto order): ``triton`` (fused FlashAttention-2 style kernels of ``fastvl.kernels.attention``;
CUDA, or CPU under ``TRITON_INTERPRET=1`` when asked for by name), ``xformers`` and ``flash_attn``
(when installed, plain cases), ``sdpa`` (torch's ``scaled_dot_product_attention``), ``reference``
(eager, mirrors BERT's self-attention).

The triton backend is three layers: the custom ops ``fastvl::attention_fwd`` / ``attention_bwd``
(with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them), the autograd
glue registered on the forward op, and the public :func:`attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.dispatch import needs_cuda_device, needs_module, op, triton_available, triton_device, triton_interpreting
from fastvl.reference.attention import attention_ref, varlen_attention_ref

ATTENTION = op("attention", probe=dict(head_dim=64, dropout=False, packed=False))
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None, causal: bool = False, *,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              dropout_seed: int | torch.Tensor | None = None, deterministic: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + mask) v``.

    Padded form: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` (any strides: a fused QKV projection's
    output can be passed as views), key_padding_mask ``[B, Lk]`` bool with True = a real key (the
    original projects' additive float mask, 0 / -10000, shaped ``[B, Lk]`` or ``[B, 1, 1, Lk]``, is
    accepted and converted). Returns ``[B, Lq, H, D]`` in q's dtype.

    Packed form: q ``[total_q, H, D]``, k/v ``[total_k, H, D]``, ``cu_seqlens_q`` / ``cu_seqlens_k``
    int32 ``[B + 1]`` prefix sums of the sequence lengths (FlashAttention's convention), optional
    ``max_seqlen_*`` (pass them to avoid a host sync; they must be at least the longest sequence).
    No key_padding_mask. Returns ``[total_q, H, D]``.

    A query with no real key (all padded, an empty key sequence) gets zeros and zero gradient.
    ``scale`` defaults to ``1/sqrt(D)``; ``causal`` aligns the mask to the bottom-right corner when
    Lq != Lk. Dtypes: float16, bfloat16, float32 (float64 on the torch backends).

    Dropout (``dropout_p`` > 0) on the triton backend draws its keep-mask from a seed: ``dropout_seed``
    if given (same seed, same mask; :func:`dropout_keep_mask` returns it), else one drawn from torch's
    generator on q's device without a host sync (so ``torch.manual_seed`` reproduces it).
    ``deterministic=True`` asks for a bitwise repeatable backward (the triton backend always is).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    features = _validate(q, k, v, key_padding_mask, dropout_p, packed, cu_seqlens_q, cu_seqlens_k)
    key_padding_mask = features.pop("mask")
    features.update(seeded=dropout_seed is not None, deterministic=deterministic, causal=causal)
    chosen = ATTENTION.select(backend, q.device, **features)
    if packed:
        return chosen.impl(q, k, v, None, dropout_p, scale, causal, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, dropout_seed, deterministic)
    return chosen.impl(q, k, v, key_padding_mask, dropout_p, scale, causal, None, None, None, None, dropout_seed,
                       deterministic)


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
    return {"dtype": q.dtype, "head_dim": head_dim, "dropout": dropout_p > 0.0, "packed": packed, "mask": mask,
            "has_mask": mask is not None}


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


# Torch backends ------------------------------------------------------------------------------------


def _via_padding(padded_impl):
    """Runs a padded implementation on a packed batch by padding, attending, and unpadding."""

    def run(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k, dropout_seed=None,
            deterministic=False):
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


def _reference_impl(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k, dropout_seed=None,
                    deterministic=False):
    if cu_q is None:
        return attention_ref(q, k, v, mask, dropout_p, scale, causal)
    return varlen_attention_ref(q, k, v, cu_q, cu_k, dropout_p, scale, causal)


# Triton backend: launchers ---------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _kernels():
    from fastvl.kernels import attention as kernels  # noqa: PLC0415 - imports triton; TRITON_INTERPRET is read here

    return kernels


def block_configs(dtype: torch.dtype, head_dim: int, long: bool):
    """(forward, backward) BlockConfig the launchers use; ``long``: a long-sequence attention."""
    kernels = _kernels()
    if triton_interpreting():
        return kernels.INTERPRETER_CONFIG, kernels.INTERPRETER_CONFIG
    name, block_d = _DTYPE_NAMES[dtype], kernels.head_block(head_dim)
    return kernels.fwd_config(name, block_d, long), kernels.bwd_config(name, block_d)


def rows_strides(t: torch.Tensor, packed: bool) -> tuple[int, ...]:
    """Strides of ``t`` as (batch, row, head, dim); packed ``[total, H, D]`` has batch stride 0."""
    return (0, *t.stride()) if packed else tuple(t.stride())


def new_lse(q: torch.Tensor, batch: int, packed: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """Float32 per-row buffer (log-sum-exp or delta): ``[H, total_q]`` packed or ``[B, H, Lq]``
    padded, with its (batch, head) strides."""
    if packed:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        return lse, (0, lse.stride(0))
    lse = torch.empty((batch, q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return lse, (lse.stride(0), lse.stride(1))


def lse_strides(lse: torch.Tensor, packed: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if packed else (lse.stride(0), lse.stride(1))


def mask_arg(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer, batch stride, position stride) of a bool key mask read as uint8."""
    if mask is None:
        return placeholder, 0, 0
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1)


def draw_seed(dropout_p: float, seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The int64 ``[1]`` Philox seed on ``device``: a copy of the given one, a fresh draw from torch's
    generator (no host sync) when dropping out, else an unread placeholder (no kernel launched)."""
    if seed is not None:
        return seed.to(device=device, dtype=torch.int64).reshape(1).clone()
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.empty(1, dtype=torch.int64, device=device)


def _triton_cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed):
    kernels = _kernels()
    packed = cu_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_q.shape[0] - 1 if packed else q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse, lse_stride = new_lse(q, batch, packed)
    config, _ = block_configs(q.dtype, head_dim, max_q >= kernels.LONG_SEQUENCE)
    grid = (_triton_cdiv(max_q, config.block_m), batch * heads)
    if q.numel() == 0 or grid[0] * grid[1] == 0:
        return out.zero_(), lse.fill_(math.inf)
    mask_ptr, *mask_stride = mask_arg(mask, seed)
    kernels.attention_fwd_kernel[grid](
        q, k, v, out, lse, mask_ptr, cu_q if packed else seed, cu_k if packed else seed, seed,
        *rows_strides(q, packed), *rows_strides(k, packed), *rows_strides(v, packed), *rows_strides(out, packed),
        *lse_stride, *mask_stride, max_q, max_k, heads, head_dim, scale * kernels.LOG2E, dropout_p,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=kernels.head_block(head_dim),
        EVEN_D=head_dim == kernels.head_block(head_dim), HAS_MASK=mask is not None, IS_VARLEN=packed,
        IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=kernels.PRECISION[_DTYPE_NAMES[q.dtype]], num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


def _attention_backward(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed):
    kernels = _kernels()
    packed = cu_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_q.shape[0] - 1 if packed else q.shape[0]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _, config = block_configs(q.dtype, head_dim, False)
    grid = (_triton_cdiv(max_k, config.block_n) + _triton_cdiv(max_q, config.block_m), batch * heads)
    mask_ptr, *mask_stride = mask_arg(mask, seed)
    kernels.attention_bwd_kernel[grid](
        q, k, v, out, grad_out, dq, dk, dv, lse, mask_ptr, cu_q if packed else seed, cu_k if packed else seed, seed,
        *(s for t in (q, k, v, out, grad_out, dq, dk, dv) for s in rows_strides(t, packed)),
        *lse_strides(lse, packed), *mask_stride,
        max_q, max_k, heads, head_dim, scale * kernels.LOG2E, scale, dropout_p,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=kernels.head_block(head_dim),
        EVEN_D=head_dim == kernels.head_block(head_dim), HAS_MASK=mask is not None,
        IS_VARLEN=packed, IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=kernels.PRECISION[_DTYPE_NAMES[q.dtype]], num_warps=config.num_warps, num_stages=config.num_stages)
    return dq, dk, dv


def dropout_keep_mask(seed: int | torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, *,
                      device: torch.device | str | None = None, seed_offset: int = 0) -> torch.Tensor:
    """Debug helper: the keep-mask bool ``[B, H, len_q, len_k]`` (True = kept) that the triton
    kernels draw for ``seed`` (``seed_offset`` 1 = co-attention's direction 1). For a packed batch,
    pass ``max_seqlen_q`` / ``max_seqlen_k`` as the lengths: sequence b's element (m, n) is at
    ``[b, :, m, n]``. Replays through ``attention_ref(..., dropout_mask=...)``."""
    kernels = _kernels()
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    keep = torch.empty((batch, heads, len_q, len_k), dtype=torch.int8, device=seed.device)
    config = kernels.INTERPRETER_CONFIG if triton_interpreting() else kernels.KEEP_CONFIG
    if keep.numel():
        kernels.dropout_keep_kernel[(_triton_cdiv(len_q, config.block_m), batch * heads)](
            keep, seed, keep.stride(0), keep.stride(1), keep.stride(2), seed_offset, heads, len_q, len_k,
            float(dropout_p), BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return keep.bool()


# Triton backend: custom ops and autograd --------------------------------------------------------------


@torch.library.custom_op("fastvl::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                     cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                     max_seqlen_k: int, dropout_p: float, scale: float, causal: bool,
                     seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp, seed used). The seed is drawn here when not given (see :func:`draw_seed`)."""
    seed = draw_seed(dropout_p, seed, q.device)
    out, lse = _attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, scale, causal, seed)
    return out, lse, seed


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, causal,
      seed):
    packed = cu_seqlens_q is not None
    lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
    return (q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("fastvl::attention_bwd", mutates_args=())
def attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                     scale: float, causal: bool,
                     seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's output and log-sum-exp; dropout regenerated from ``seed``."""
    return _attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, scale, causal, seed)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      dropout_p, scale, causal, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, _ = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.arguments = (max_q, max_k, dropout_p, scale, causal)


def _attention_backward_glue(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, causal = ctx.arguments
    dq, dk, dv = attention_bwd_op(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, dropout_p, scale,
                                  causal, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_fwd_op.register_autograd(_attention_backward_glue, setup_context=_attention_setup_context)


def _triton_impl(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k, dropout_seed=None,
                 deterministic=False):
    if cu_q is not None:
        max_q, max_k = _max_seqlen(cu_q, max_q), _max_seqlen(cu_k, max_k)
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed = None if dropout_seed is None else torch.as_tensor(dropout_seed, dtype=torch.int64).reshape(1).to(q.device)
    out, _, _ = attention_fwd_op(q, k, v, mask, cu_q, cu_k, max_q, max_k, float(dropout_p), float(scale), causal, seed)
    return out


def triton_supports(dtype, head_dim, device, **_features) -> list[str]:
    reasons = triton_device(device)
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} (triton runs float16, bfloat16, float32)")
    if head_dim > 128:
        reasons.append(f"head dim {head_dim} > 128")
    return reasons


# Other backends ---------------------------------------------------------------------------------------


def _plain_features(dtype, head_dim, device, packed, seeded=False, **_features):
    """Reasons shared by the thin xformers / flash_attn wrappers: dense, unmasked, on CUDA."""
    reasons = needs_cuda_device(device)
    if packed:
        reasons.append("packed (cu_seqlens) batches are not wired for this backend")
    if seeded:
        reasons.append("dropout_seed is honoured by the triton backend only")
    return reasons


def _xformers_supports(dtype, head_dim, device, packed, deterministic=False, has_mask=False, **features):
    reasons = _plain_features(dtype, head_dim, device, packed, **features)
    if has_mask:
        reasons.append("key_padding_mask is not wired for this backend")
    if deterministic:
        reasons.append("xformers' backward is not bitwise repeatable")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype}")
    return reasons


def _xformers_impl(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k, dropout_seed=None,
                   deterministic=False):
    from xformers.ops import fmha  # noqa: PLC0415

    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)


def _flash_attn_supports(dtype, head_dim, device, packed, has_mask=False, **features):
    reasons = _plain_features(dtype, head_dim, device, False, **features)
    if has_mask:
        reasons.append("key_padding_mask is not wired for this backend (use the packed form)")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {dtype} (flash_attn runs float16, bfloat16)")
    if head_dim > 256 or head_dim % 8:
        reasons.append(f"head dim {head_dim} (flash_attn needs a multiple of 8 up to 256)")
    return reasons


def _flash_attn_impl(q, k, v, mask, dropout_p, scale, causal, cu_q, cu_k, max_q, max_k, dropout_seed=None,
                     deterministic=False):
    import flash_attn  # noqa: PLC0415

    if cu_q is None:
        return flash_attn.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                                          deterministic=deterministic)
    return flash_attn.flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), _max_seqlen(cu_q, max_q),
                                             _max_seqlen(cu_k, max_k), dropout_p=dropout_p, softmax_scale=scale,
                                             causal=causal, deterministic=deterministic)


def _torch_supports(device, seeded=False, deterministic=False, **_features) -> list[str]:
    reasons = []
    if seeded:
        reasons.append("dropout_seed is honoured by the triton backend only")
    if deterministic and device.type == "cuda":
        reasons.append("torch's CUDA attention backward is not promised bitwise repeatable")
    return reasons


# Auto order: fused first, plain torch last (so the CPU always works).
ATTENTION.register("triton", available=triton_available, supports=triton_supports, auto_devices=("cuda",))(
    _triton_impl)
ATTENTION.register("xformers", available=needs_module("xformers"), supports=_xformers_supports,
                   auto_devices=("cuda",))(_xformers_impl)
ATTENTION.register("flash_attn", available=needs_module("flash_attn"), supports=_flash_attn_supports,
                   auto_devices=("cuda",))(_flash_attn_impl)
ATTENTION.register("sdpa", supports=_torch_supports)(_via_padding(_sdpa_padded))
ATTENTION.register("reference", supports=lambda seeded=False, **_: (
    ["dropout_seed is honoured by the triton backend only"] if seeded else []))(_reference_impl)
