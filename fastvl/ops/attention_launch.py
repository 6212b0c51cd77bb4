"""Host-side launchers of the Triton attention kernels (``fastvl.kernels.attention``), shared by the
sibling ops :mod:`fastvl.ops.attention_op` and :mod:`fastvl.ops.co_attention_op`.

Every launcher takes plain tensors and ints (no validation: the public ops validated already) and
returns freshly allocated outputs. Padded tensors are ``[B, L, H, D]``, packed ones ``[total, H, D]``
with ``cu_seqlens`` (batch stride 0); the per-row float32 buffers (log-sum-exp) are ``[B, H, L]``
padded or ``[H, total]`` packed.
"""

from __future__ import annotations

import math
import os

import torch

from fastvl.dispatch import triton_interpreting
from fastvl.ops import dropout_seed

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def kernels():
    """The kernel module (imported on first use: it imports triton, which reads TRITON_INTERPRET then)."""
    from fastvl.kernels import attention as attention_kernels

    return attention_kernels


def cdiv(n: int, block: int) -> int:
    return -(-n // block)


def block_configs(dtype: torch.dtype, head_dim: int, long: bool):
    """(forward, backward) BlockConfig the launchers use; ``long``: a long-sequence attention."""
    k = kernels()
    if triton_interpreting():
        return k.INTERPRETER_CONFIG, k.INTERPRETER_CONFIG
    name, block_d = DTYPE_NAMES[dtype], k.head_block(head_dim)
    return k.fwd_config(name, block_d, long), k.bwd_config(name, block_d)


def new_lse(q: torch.Tensor, batch: int, packed: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """Float32 per-row buffer (log-sum-exp or delta): ``[H, total_q]`` packed or ``[B, H, Lq]``
    padded, with its (batch, head) strides."""
    if packed:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        return lse, (0, lse.stride(0))
    lse = torch.empty((batch, q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return lse, (lse.stride(0), lse.stride(1))


def lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    """Shape of :func:`new_lse`'s buffer (for the custom ops' fake implementations)."""
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def lse_strides(lse: torch.Tensor, packed: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if packed else (lse.stride(0), lse.stride(1))


def draw_seed(dropout_p: float, seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The int64 ``[1]`` Philox seed on ``device``: a copy of the given one, a fresh one from torch's
    generator (no host sync; inside a model's forward a view of its seed pool, no launch:
    :mod:`fastvl.ops.dropout_seed`) when dropping out, else an unread placeholder (no launch)."""
    if seed is not None:
        return seed.to(device=device, dtype=torch.int64).reshape(1).clone()
    if dropout_p > 0.0:
        return dropout_seed.next_seed(device)
    return torch.empty(1, dtype=torch.int64, device=device)


def _meta(dtype: torch.dtype, head_dim: int, *, block_n: int, num_warps: int, num_stages: int,
          block_m: int | None = None) -> dict:
    """The constexprs and launch options every attention kernel shares (``block_m``: the kernels with
    query blocks)."""
    k = kernels()
    block_d = k.head_block(head_dim)
    meta = dict(BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=head_dim == block_d, PRECISION=k.PRECISION[DTYPE_NAMES[dtype]],
                num_warps=num_warps, num_stages=num_stages)
    return meta if block_m is None else {**meta, "BLOCK_M": block_m}


def _tiled_meta(dtype: torch.dtype, head_dim: int, config) -> dict:
    return _meta(dtype, head_dim, block_m=config.block_m, block_n=config.block_n, num_warps=config.num_warps,
                 num_stages=config.num_stages)


def _tiled_bwd_meta(dtype: torch.dtype, head_dim: int, config, device: torch.device, causal: bool) -> dict:
    k = kernels()
    chunk = k.delta_chunk(DTYPE_NAMES[dtype], k.head_block(head_dim), _capability(device)[0], causal)
    return {**_tiled_meta(dtype, head_dim, config), "DELTA_CHUNK": chunk}


def _forward_kernel(name: str, dtype: torch.dtype, head_dim: int, max_len: int, long: bool = False):
    """(kernel, query rows per program, meta) of a forward: ``{name}_short_kernel`` where the short path
    takes ``max_len``, else the tiled ``{name}_kernel`` (``long``: its long-sequence query blocks)."""
    if attention_path(max_len, dtype, head_dim) == "short":
        short, block_m = short_kernels(), _short_block_m()
        meta = _meta(dtype, head_dim, block_m=block_m, block_n=short.key_bucket(max_len), num_warps=short.FWD_WARPS,
                     num_stages=1)
        return getattr(short, f"{name}_short_kernel"), block_m, meta
    config, _ = block_configs(dtype, head_dim, long)
    return getattr(kernels(), f"{name}_kernel"), config.block_m, _tiled_meta(dtype, head_dim, config)


# Attention (one direction) ---------------------------------------------------------------------------


def attention_forward(q, k, v, mask, cu_q, cu_k, max_q: int, max_k: int, dropout_p: float, scale: float,
                      causal: bool, seed: torch.Tensor, keep: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output like q, log-sum-exp) of one attention; rows with no key get zeros and lse = inf.
    ``keep`` (from ``new_keep_mask``): the dropout keep-mask is also written there, bit-packed."""
    kern = kernels()
    packed = cu_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_q.shape[0] - 1 if packed else q.shape[0]
    (q,), q_strides = shared_strides(q)
    (k, v), kv_strides = shared_strides(k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _, o_strides = shared_strides(out)
    lse, lse_stride = new_lse(q, batch, packed)
    kernel, block_m, meta = _forward_kernel("attention_fwd", q.dtype, head_dim, max(max_q, max_k),
                                            long=max_q >= kern.LONG_SEQUENCE)
    grid = (cdiv(max_q, block_m), batch * heads)
    if q.numel() == 0 or grid[0] * grid[1] == 0:
        return out.zero_(), lse.fill_(math.inf)
    mask_u8, mask_stride = _mask_pointer(mask)
    keep_args, meta = _with_keep(kernel, meta, keep)
    kernel[grid](
        q, k, v, out, lse, mask_u8, cu_q, cu_k, _seed_pointer(dropout_p, seed), *keep_args,
        *q_strides, *kv_strides, *o_strides, *lse_stride, mask_stride, max_q, max_k, heads, head_dim,
        scale * kern.LOG2E, dropout_p, HAS_MASK=mask is not None, IS_VARLEN=packed, IS_CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0, **meta)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, max_q: int, max_k: int, dropout_p: float,
                       scale: float, causal: bool, seed: torch.Tensor, into: torch.Tensor | None = None,
                       keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) from the forward's output and log-sum-exp; the dropout mask read from ``keep``
    (the forward's stored mask) or else regenerated from ``seed``.
    ``into``: a ``[..., 3, H, D]`` buffer (the layout of a fused QKV projection) that dq, dk, dv are
    written into as its three views."""
    kern = kernels()
    packed = cu_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_q.shape[0] - 1 if packed else q.shape[0]
    (q,), q_strides = shared_strides(q)
    (k, v), kv_strides = shared_strides(k, v)
    (out, grad_out), o_strides = shared_strides(out, grad_out)
    dq, dk, dv = _gradients(q, k, k) if into is None else into.unbind(-3)
    _, dq_strides = shared_strides(dq)
    _, dkv_strides = shared_strides(dk, dv)
    if q.numel() == 0 or k.numel() == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if attention_path(max(max_q, max_k), q.dtype, head_dim) == "short":
        # one program per (batch, head): all of its queries and keys in one block
        short = short_kernels()
        block_n = short.key_bucket(max(max_q, max_k))
        kernel, grid = short.attention_bwd_short_kernel, (batch * heads,)
        meta = _meta(q.dtype, head_dim, block_m=block_n, block_n=block_n,
                     num_warps=_short_bwd_warps(block_n, kern.head_block(head_dim), q.device), num_stages=1)
    else:
        _, config = block_configs(q.dtype, head_dim, False)
        kernel, meta = kern.attention_bwd_kernel, _tiled_bwd_meta(q.dtype, head_dim, config, q.device, causal)
        grid = (cdiv(max_k, config.block_n) + cdiv(max_q, config.block_m), batch * heads)
    mask_u8, mask_stride = _mask_pointer(mask)
    keep_args, meta = _with_keep(kernel, meta, keep)
    kernel[grid](
        q, k, v, out, grad_out, dq, dk, dv, lse, mask_u8, cu_q, cu_k, _seed_pointer(dropout_p, seed),
        *keep_args, *q_strides, *kv_strides, *o_strides, *dq_strides, *dkv_strides, *lse_strides(lse, packed),
        mask_stride, max_q, max_k, heads, head_dim, scale * kern.LOG2E, scale, dropout_p,
        HAS_MASK=mask is not None, IS_VARLEN=packed, IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0, **meta)
    return dq, dk, dv


# Co-attention (both directions in one launch) --------------------------------------------------------


def co_attention_forward(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_v, cu_t, len_v: int, len_t: int,
                         dropout_p: float, scale: float, seed: torch.Tensor,
                         keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(ctx_v, ctx_t, lse_v, lse_t): image queries over text keys and text queries over image keys.
    ``keep`` (from ``new_co_keep_masks``): each direction's keep-mask is also written there, bit-packed."""
    kern = kernels()
    packed = cu_v is not None
    heads, head_dim = q_v.shape[-2:]
    batch = cu_v.shape[0] - 1 if packed else q_v.shape[0]
    (q_v, k_v, v_v), v_strides = shared_strides(q_v, k_v, v_v)
    (q_t, k_t, v_t), t_strides = shared_strides(q_t, k_t, v_t)
    ctx_v = torch.empty(q_v.shape, dtype=q_v.dtype, device=q_v.device)
    ctx_t = torch.empty(q_t.shape, dtype=q_t.dtype, device=q_t.device)
    _, ov_strides = shared_strides(ctx_v)
    _, ot_strides = shared_strides(ctx_t)
    lse_v, stride_lse_v = new_lse(q_v, batch, packed)
    lse_t, stride_lse_t = new_lse(q_t, batch, packed)
    kernel, block_m, meta = _forward_kernel("co_attention_fwd", q_v.dtype, head_dim, max(len_v, len_t))
    grid = (cdiv(len_v, block_m) + cdiv(len_t, block_m), batch * heads)
    if grid[0] * grid[1] == 0:
        return ctx_v.zero_(), ctx_t.zero_(), lse_v.fill_(math.inf), lse_t.fill_(math.inf)
    mask_v_u8, mask_v_stride = _mask_pointer(mask_v)
    mask_t_u8, mask_t_stride = _mask_pointer(mask_t)
    keep_args, meta = _with_keep(kernel, meta, keep, 2)
    kernel[grid](
        q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v_u8, mask_t_u8, cu_v, cu_t,
        _seed_pointer(dropout_p, seed), *keep_args, *v_strides, *t_strides, *ov_strides,
        *ot_strides, *stride_lse_v, *stride_lse_t, mask_v_stride, mask_t_stride, len_v, len_t, heads, head_dim,
        scale * kern.LOG2E, dropout_p,
        HAS_MASK_V=mask_v is not None, HAS_MASK_T=mask_t is not None, IS_VARLEN=packed,
        HAS_DROPOUT=dropout_p > 0.0, **meta)
    return ctx_v, ctx_t, lse_v, lse_t


def co_attention_backward(grad_v, grad_t, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t,
                          cu_v, cu_t, len_v: int, len_t: int, dropout_p: float, scale: float, seed: torch.Tensor,
                          into: tuple[torch.Tensor, torch.Tensor] | None = None,
                          keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(dq_v, dk_v, dv_v, dq_t, dk_t, dv_t), every gradient of both directions in one launch; the
    dropout masks read from ``keep`` (the forward's) or else regenerated from ``seed``.
    ``into``: per stream a ``[..., 3, H, D]`` buffer (a fused QKV projection's layout) that its three
    gradients are written into as views."""
    kern = kernels()
    packed = cu_v is not None
    heads, head_dim = q_v.shape[-2:]
    batch = cu_v.shape[0] - 1 if packed else q_v.shape[0]
    (q_v, k_v, v_v), v_strides = shared_strides(q_v, k_v, v_v)
    (q_t, k_t, v_t), t_strides = shared_strides(q_t, k_t, v_t)
    (ctx_v, grad_v), ov_strides = shared_strides(ctx_v, grad_v)
    (ctx_t, grad_t), ot_strides = shared_strides(ctx_t, grad_t)
    if into is None:
        grads_v, grads_t = _gradients(q_v, q_v, q_v), _gradients(q_t, q_t, q_t)
    else:
        grads_v, grads_t = into[0].unbind(-3), into[1].unbind(-3)
    _, gv_strides = shared_strides(*grads_v)
    _, gt_strides = shared_strides(*grads_t)
    if batch * heads == 0 or len_v + len_t == 0:
        return tuple(g.zero_() for g in (*grads_v, *grads_t))
    if attention_path(max(len_v, len_t), q_v.dtype, head_dim) == "short":
        # one program per (direction, batch, head)
        short = short_kernels()
        block_n = short.key_bucket(max(len_v, len_t))
        kernel, grid = short.co_attention_bwd_short_kernel, (2, batch * heads)
        meta = _meta(q_v.dtype, head_dim, block_n=block_n, num_stages=1,
                     num_warps=_short_bwd_warps(block_n, kern.head_block(head_dim), q_v.device))
    else:
        _, config = block_configs(q_v.dtype, head_dim, False)
        kernel, meta = kern.co_attention_bwd_kernel, _tiled_bwd_meta(q_v.dtype, head_dim, config, q_v.device, False)
        grid = (sum(cdiv(n, config.block_n) + cdiv(n, config.block_m) for n in (len_v, len_t)), batch * heads)
    mask_v_u8, mask_v_stride = _mask_pointer(mask_v)
    mask_t_u8, mask_t_stride = _mask_pointer(mask_t)
    keep_args, meta = _with_keep(kernel, meta, keep, 2)
    kernel[grid](
        q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, grad_v, grad_t, *grads_v, *grads_t,
        lse_v, lse_t, mask_v_u8, mask_t_u8, cu_v, cu_t, _seed_pointer(dropout_p, seed),
        *keep_args, *v_strides, *t_strides, *ov_strides, *ot_strides, *gv_strides, *gt_strides,
        *lse_strides(lse_v, packed), *lse_strides(lse_t, packed), mask_v_stride, mask_t_stride,
        len_v, len_t, heads, head_dim, scale * kern.LOG2E, scale, dropout_p,
        HAS_MASK_V=mask_v is not None, HAS_MASK_T=mask_t is not None, IS_VARLEN=packed,
        HAS_DROPOUT=dropout_p > 0.0, **meta)
    return (*grads_v, *grads_t)


# Stride groups, pointers ------------------------------------------------------------------------------


def shared_strides(*tensors):
    """(tensors, their common (batch, row, head) strides): the kernels take one stride set per group
    of tensors and a head-dim stride of 1, so a tensor with another head-dim stride, or a group whose
    strides differ, is made contiguous (packed ``[total, H, D]``: batch stride 0)."""
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
    if any(t.stride() != tensors[0].stride() for t in tensors[1:]):
        tensors = [t.contiguous() for t in tensors]
    strides = tensors[0].stride()[:-1]
    if tensors[0].dim() == 3:
        strides = (0, *strides)
    return tensors, strides


def fused_projection(*views: torch.Tensor) -> torch.Tensor | None:
    """The ``[..., n, H, D]`` view of the tensor that ``views`` (n of them, ``[..., H, D]`` each) are the
    consecutive head groups of -- one fused projection's output split per head, as fastvl's layers
    build q, k, v -- or None when they are not exactly that (or under torch.compile, which traces the
    separate views). Passing it to autograd instead of the views lets the backward hand the fused
    projection one gradient buffer in its own layout (no concatenation of the three)."""
    base = views[0]._base
    if torch.compiler.is_compiling() or base is None or not base.is_contiguous():
        return None
    heads, head_dim = views[0].shape[-2:]
    shape = (*views[0].shape[:-2], len(views), heads, head_dim)
    if base.numel() != math.prod(shape) or views[0].stride(-1) != 1:
        return None
    fused = base.view(shape)
    strides = fused.stride()[:-3] + fused.stride()[-2:]
    for index, t in enumerate(views):
        if (t._base is not base or t.shape != views[0].shape or t.stride() != strides
                or t.storage_offset() != base.storage_offset() + index * heads * head_dim):
            return None
    return fused


def _gradients(*like):
    """Contiguous gradient buffers shaped like ``like``: same-shaped ones share one stride set
    (separate tensors -- a custom op's outputs may not alias each other)."""
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]


def _mask_pointer(mask):
    """(uint8 pointer or None, batch stride) of a bool [B, L] key mask; position stride 1."""
    if mask is None:
        return None, 0
    mask = mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _seed_pointer(dropout_p: float, seed: torch.Tensor):
    """The seed tensor when the kernel reads it (dropout), else None."""
    return seed if dropout_p > 0.0 else None


# Short-sequence path (short sequences, fp16 / bf16: fastvl.kernels.attention_short) ------------------


def short_kernels():
    from fastvl.kernels import attention_short

    return attention_short


def attention_path(max_len: int, dtype: torch.dtype, head_dim: int) -> str:
    """``"short"`` for float16 / bfloat16 when no sequence is longer than the short kernels take at
    this head dim (128 rows up to d=64, 64 rows up to d=128; host-known lengths, no sync), else
    ``"tiled"`` (exact fp32 dots unroll on the CUDA cores and spill at these tiles: fp32 keeps the
    tiled kernels). ``FASTVL_ATTENTION_PATH=tiled`` or ``=short`` overrides the dtype rule (tests,
    benchmarks); the length limit always holds."""
    forced = os.environ.get("FASTVL_ATTENTION_PATH")
    short = short_kernels()
    if max_len > short.SHORT_MAX_LEN_BY_HEAD_BLOCK[kernels().head_block(head_dim)] or forced == "tiled":
        return "tiled"
    if forced == "short" or dtype in (torch.float16, torch.bfloat16):
        return "short"
    return "tiled"


TARGET_CAPABILITY: tuple[int, int] | None = None  # set by ``fastvl.aot`` to capture launches for an arch


def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability the launch is for (torch caches the device query)."""
    if TARGET_CAPABILITY is not None:
        return TARGET_CAPABILITY
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def _short_bwd_warps(block_n: int, block_d: int, device: torch.device) -> int:
    return short_kernels().bwd_warps(block_n, block_d, _capability(device)[0])


def stores_keep_mask(max_len: int, dtype: torch.dtype, head_dim: int, dropout_p: float) -> bool:
    """Whether the forward stores the dropout keep-mask bit-packed for the backward to read: on the
    short path with dropout at head dims <= 64. There the Philox draw is ~2,600 of the backward's
    ~4,100 PTX instructions per thread (bf16 d=64) and the mask ~1% of the op's bytes at ViLBERT
    shapes; at d=128 the reading backward spills 68 B on sm_90 (none regenerating), so d=128 and the
    tiled kernels regenerate it (README, Performance). ``FASTVL_DROPOUT_MASK=regenerate`` / ``=store``
    override the head-dim rule (GPU A/B runs, benchmarks/bench_dropout_mask.py)."""
    if dropout_p <= 0.0 or attention_path(max_len, dtype, head_dim) != "short":
        return False
    forced = os.environ.get("FASTVL_DROPOUT_MASK")
    return forced == "store" if forced in ("store", "regenerate") else kernels().head_block(head_dim) <= 64


def new_keep_mask(batch: int, heads: int, len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    """int32 [B, H, len_q, ceil(len_k / 32)]: bit n % 32 of word n // 32 of row m says whether
    score (m, n) of the head is kept (packed batches: len = the max_seqlen, rows local to the sequence)."""
    return torch.empty((batch, heads, len_q, short_kernels().keep_words(len_k)), dtype=torch.int32, device=device)


def forward_keep_mask(batch: int, heads: int, head_dim: int, dtype: torch.dtype, len_q: int, len_k: int,
                      dropout_p: float, device: torch.device) -> torch.Tensor:
    """The buffer a forward op stores its keep-mask in: ``new_keep_mask`` where ``stores_keep_mask``
    says so, else an empty int32 tensor (none stored; ``stored_keep`` maps it to None)."""
    if stores_keep_mask(max(len_q, len_k), dtype, head_dim, dropout_p):
        return new_keep_mask(batch, heads, len_q, len_k, device)
    return torch.empty((0,), dtype=torch.int32, device=device)


def stored_keep(keep: torch.Tensor) -> torch.Tensor | None:
    """A forward op's keep-mask output as the launchers take it (None: the backward regenerates it)."""
    return keep if keep.numel() else None


def new_co_keep_masks(batch: int, heads: int, len_v: int, len_t: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-attention's two packed keep-masks: image queries over text keys, text queries over image keys."""
    return new_keep_mask(batch, heads, len_v, len_t, device), new_keep_mask(batch, heads, len_t, len_v, device)


def unpack_keep_mask(keep: torch.Tensor, len_k: int) -> torch.Tensor:
    """bool [..., len_k] of a packed keep-mask (tests, debugging)."""
    bits = (keep.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=keep.device)) & 1
    return bits.flatten(-2)[..., :len_k].bool()


def _with_keep(kernel, meta: dict, keep, count: int = 1) -> tuple[tuple, dict]:
    """(keep-mask arguments, meta with STORED_KEEP) of a short kernel (None pointers without a stored
    mask); nothing for a tiled one, which always regenerates the mask."""
    if not kernel.__name__.endswith("_short_kernel"):
        if keep is not None:
            raise ValueError("keep: only the short-sequence kernels store the dropout keep-mask")
        return (), meta
    pointers = (None,) * count if keep is None else tuple(keep) if count > 1 else (keep,)
    return pointers, {**meta, "STORED_KEEP": keep is not None}


def _short_block_m():
    """Forward query rows per program (16 under the interpreter, so CPU tests cover several blocks)."""
    return 16 if triton_interpreting() else short_kernels().BLOCK_M


# Debug helper ---------------------------------------------------------------------------------------


def dropout_keep_mask(seed: int | torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, *,
                      device: torch.device | str | None = None, seed_offset: int = 0) -> torch.Tensor:
    """The keep-mask bool ``[B, H, len_q, len_k]`` (True = kept) that the triton kernels draw for
    ``seed`` (``seed_offset`` 1 = co-attention's direction 1, the text queries). For a packed batch,
    pass ``max_seqlen_q`` / ``max_seqlen_k`` as the lengths: sequence b's element (m, n) is at
    ``[b, :, m, n]``. Replays through ``attention_ref(..., dropout_mask=...)``. Public as
    ``fastvl.ops.dropout_keep_mask``."""
    kern = kernels()
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    keep = torch.empty((batch, heads, len_q, len_k), dtype=torch.int8, device=seed.device)
    config = kern.INTERPRETER_CONFIG if triton_interpreting() else kern.KEEP_CONFIG
    if keep.numel():
        kern.dropout_keep_kernel[(cdiv(len_q, config.block_m), batch * heads)](
            keep, seed, keep.stride(0), keep.stride(1), keep.stride(2), seed_offset, heads, len_q, len_k,
            float(dropout_p), BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return keep.bool()
