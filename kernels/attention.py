"""Fused multi-head attention and ViLBERT's bidirectional co-attention, FlashAttention-2 style.

Forward: each program owns BLOCK_M query rows of one (sequence, head), streams the keys in blocks of
BLOCK_N with an online softmax, and stores the output plus one log-sum-exp per row (base 2, of the
scaled scores) -- nothing of size Lq x Lk is kept. Backward: one launch holds two kinds of program,
dK/dV programs (one key block, looping over query blocks) and dQ programs (one query block, looping
over key blocks); each recomputes ``delta = rowsum(O * dO)`` of the query tiles it reads instead of
a separate preprocess launch. Every gradient element is written by exactly one program: no atomics,
bitwise repeatable.

Co-attention runs both directions (image queries over text keys/values, text queries over image
keys/values) in the same launches: the grid enumerates direction 0's blocks, then direction 1's,
and each program calls the shared block function with its direction's tensors, strides and mask.

Conventions: tensors are addressed as ``[B, L, H, D]`` through (batch, row, head) strides with a
head-dim stride of 1, one stride set per group of tensors that share strides (q; k and v; an output
and its gradient; a stream's input gradients -- the launcher makes them agree); packed batches pass
batch stride 0 and take each sequence's first row from ``cu_seqlens``; offsets are int64 before
they meet a stride; key masks are contiguous uint8 ``[B, Lk]`` (nonzero = real key); absent masks,
``cu_seqlens`` and seeds are ``None`` (their constexpr flag is off); the log-sum-exp
is float32, ``[B, H, Lq]`` padded or ``[H, total_q]`` packed. A row with no key that may be attended
gets log-sum-exp +inf, hence zero output and zero gradients. Dropout keeps element (b, h, m, n) when
``tl.rand(seed, ((b * H + h) * len_q + m) * len_k + n) >= dropout_p`` (len = the padded length or
``max_seqlen``); co-attention's direction 1 uses ``seed + 1``. Forward and backward are one launch
each, for attention and for both directions of co-attention.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Arguments whose value follows the sequence lengths are not specialised (Triton would otherwise key
# its cache on ``== 1`` and ``% 16`` of each): one compiled variant serves every length.
LENGTH_ARGS = ["len_q", "len_k", "stride_lse_b", "stride_lse_h", "stride_mask_b"]
CO_LENGTH_ARGS = ["len_v", "len_t", "stride_lse_vb", "stride_lse_vh", "stride_lse_tb", "stride_lse_th",
                  "stride_mask_vb", "stride_mask_tb"]


# Shared device functions -------------------------------------------------------------------------


@triton.jit
def _sequence(CU, b, length, IS_VARLEN: tl.constexpr):
    """(first row, number of rows) of sequence b: from cu_seqlens when packed, else (0, length)."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        return start.to(tl.int64), tl.load(CU + b + 1) - start
    else:
        return 0, length


@triton.jit
def _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p):
    """Keep-mask of a [BLOCK_M, BLOCK_N] tile of head h of sequence b (see the module docstring)."""
    rows = (b * n_heads + h).to(tl.int64) * len_q + offs_m.to(tl.int64)
    return tl.rand(seed, rows[:, None] * len_k + offs_n[None, :]) >= dropout_p


@triton.jit
def _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK: tl.constexpr):
    """Which keys of a block exist and may be attended (inside the sequence, mask nonzero)."""
    ok = offs_n < seq_k
    if HAS_MASK:
        bits = tl.load(MASK + b.to(tl.int64) * stride_mask_b + offs_n, mask=ok, other=0)
        ok = ok & (bits != 0)
    return ok


@triton.jit
def _rows(T, b, h, first, offs, offs_d, stride_b, stride_l, stride_h):
    """Addresses [len(offs), BLOCK_D] of rows ``first + offs`` of head h of sequence b (head-dim
    stride 1), computed in int64."""
    rows = first + offs.to(tl.int64)
    return (T + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows[:, None] * stride_l
            + offs_d[None, :])


@triton.jit
def _head_base(T, b, h, first, offs_d, stride_b, stride_l, stride_h):
    """[1, BLOCK_D] addresses of row ``first`` of head h of sequence b; a loop adds ``offs * stride_l``
    (the invariant part stays out of the loop)."""
    return (T + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + first * stride_l + offs_d[None, :])


@triton.jit
def _row_dot(O, DO, rows, row_ok, head_dim, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, EVEN_D: tl.constexpr):
    """rowsum(O * dO) of the rows at element offsets ``rows`` (O and dO share strides), read CHUNK
    columns at a time on their own loads: the backward's query loop then holds no full O tile and
    does not keep its dO dot operand in registers (-170 to -290 B spill at d=128 on sm_90)."""
    delta = tl.zeros(rows.shape, tl.float32)
    for c in tl.static_range(BLOCK_D // CHUNK):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < (BLOCK_D if EVEN_D else head_dim))[None, :]
        offs = rows[:, None] + cols[None, :]
        o = tl.load(O + offs, mask=mask, other=0.0)
        do = tl.load(DO + offs, mask=mask, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    return delta


@triton.jit
def _fwd_block(pid_m, b, h, Q, K, V, O, LSE, MASK, CU_Q, CU_K, seed,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
               IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """Output rows [pid_m * BLOCK_M, +BLOCK_M) of head h of sequence b, and their log-sum-exp
    (k and v share the stride set ``stride_k*``)."""
    q_start, seq_q = _sequence(CU_Q, b, len_q, IS_VARLEN)
    k_start, seq_k = _sequence(CU_K, b, len_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seq_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seq_q
        d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)  # EVEN_D: a mask the compiler folds away
        tile = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_rows(Q, b, h, q_start, offs_m, offs_d, stride_qb, stride_ql, stride_qh), mask=tile, other=0.0)
        k_base = _head_base(K, b, h, k_start, offs_d, stride_kb, stride_kl, stride_kh)
        v_base = _head_base(V, b, h, k_start, offs_d, stride_kb, stride_kl, stride_kh)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = seq_k
        if IS_CAUSAL:  # key n is visible to query m when n <= m + seq_k - seq_q (bottom-right aligned)
            end_n = tl.minimum(seq_k, start_m + BLOCK_M + seq_k - seq_q)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK)
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kl, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            allowed = key_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2 finite
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
                p = tl.where(keep, p, 0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_kl, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        inv = tl.where(has_key, 1.0 / l_safe, 0.0)
        if HAS_DROPOUT:
            inv = inv / (1.0 - dropout_p)
        out = acc * inv[:, None]
        tl.store(_rows(O, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh), out.to(O.dtype.element_ty),
                 mask=tile)
        lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
        tl.store(LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m, lse,
                 mask=row_ok)


@triton.jit
def _bwd_kv_block(pid_n, b, h, Q, K, V, O, DO, DK, DV, LSE, MASK, CU_Q, CU_K, seed,
                  stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
                  stride_dkb, stride_dkl, stride_dkh, stride_lse_b, stride_lse_h, stride_mask_b,
                  len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                  IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, EVEN_D: tl.constexpr, DELTA_CHUNK: tl.constexpr):
    """dK and dV of key rows [pid_n * BLOCK_N, +BLOCK_N) of head h of sequence b (loop over queries;
    each query block's delta = rowsum(O * dO) is recomputed from O and dO: in DELTA_CHUNK-column chunks
    on their own loads, or with DELTA_CHUNK = 0 from a full O tile and the dO dot operand, whichever
    spills less on the target, see ``delta_chunk``). Stride sets: q; k and v; o and do; dk and dv."""
    q_start, seq_q = _sequence(CU_Q, b, len_q, IS_VARLEN)
    k_start, seq_k = _sequence(CU_K, b, len_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < seq_k:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)  # EVEN_D: a mask the compiler folds away
        key_ok = _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(K, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=kv_mask, other=0.0)
        v = tl.load(_rows(V, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=kv_mask, other=0.0)
        q_base = _head_base(Q, b, h, q_start, offs_d, stride_qb, stride_ql, stride_qh)
        do_base = _head_base(DO, b, h, q_start, offs_d, stride_ob, stride_ol, stride_oh)
        o_base = _head_base(O, b, h, q_start, offs_d, stride_ob, stride_ol, stride_oh)
        o_head = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_ol  # of o and do
        lse_base = LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        begin_m = 0
        if IS_CAUSAL:  # queries before start_n - (seq_k - seq_q) see none of these keys
            begin_m = (tl.maximum(start_n - (seq_k - seq_q), 0) // BLOCK_M) * BLOCK_M
        for start_m in range(begin_m, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            tile = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_ql, mask=tile, other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_ol, mask=tile, other=0.0)
            if DELTA_CHUNK == 0:  # reuse the dO tile already in registers
                o = tl.load(o_base + offs_m[:, None].to(tl.int64) * stride_ol, mask=tile, other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            else:
                delta = _row_dot(O, DO, o_head + offs_m.to(tl.int64) * stride_ol, row_ok, head_dim, BLOCK_D,
                                 DELTA_CHUNK, EVEN_D)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            allowed = key_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
                inv_keep = 1.0 / (1.0 - dropout_p)
                p_used = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                p_used = p
            dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        store_mask = (offs_n < seq_k)[:, None] & d_ok[None, :]
        tl.store(_rows(DK, b, h, k_start, offs_n, offs_d, stride_dkb, stride_dkl, stride_dkh),
                 (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
        tl.store(_rows(DV, b, h, k_start, offs_n, offs_d, stride_dkb, stride_dkl, stride_dkh),
                 dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _bwd_q_block(pid_m, b, h, Q, K, V, O, DO, DQ, LSE, MASK, CU_Q, CU_K, seed,
                 stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
                 stride_dqb, stride_dql, stride_dqh, stride_lse_b, stride_lse_h, stride_mask_b,
                 len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                 IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ of query rows [pid_m * BLOCK_M, +BLOCK_M) of head h of sequence b (loop over keys)."""
    q_start, seq_q = _sequence(CU_Q, b, len_q, IS_VARLEN)
    k_start, seq_k = _sequence(CU_K, b, len_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seq_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seq_q
        d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)  # EVEN_D: a mask the compiler folds away
        tile = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_rows(Q, b, h, q_start, offs_m, offs_d, stride_qb, stride_ql, stride_qh), mask=tile, other=0.0)
        do = tl.load(_rows(DO, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh), mask=tile, other=0.0)
        lse = tl.load(LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m,
                      mask=row_ok, other=float("inf"))
        o = tl.load(_rows(O, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh), mask=tile, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        k_base = _head_base(K, b, h, k_start, offs_d, stride_kb, stride_kl, stride_kh)
        v_base = _head_base(V, b, h, k_start, offs_d, stride_kb, stride_kl, stride_kh)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = seq_k
        if IS_CAUSAL:
            end_n = tl.minimum(seq_k, start_m + BLOCK_M + seq_k - seq_q)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK)
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kl, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_kl, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            allowed = key_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(_rows(DQ, b, h, q_start, offs_m, offs_d, stride_dqb, stride_dql, stride_dqh),
                 (dq * scale).to(DQ.dtype.element_ty), mask=tile)


# Attention kernels -------------------------------------------------------------------------------
# Stride sets (batch, row, head; the head-dim stride is 1): q; k and v; o and do; dq; dk and dv.


@triton.jit(do_not_specialize=LENGTH_ARGS)
def attention_fwd_kernel(Q, K, V, O, LSE, MASK, CU_Q, CU_K, SEED,
                         stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                         stride_ob, stride_ol, stride_oh, stride_lse_b, stride_lse_h, stride_mask_b,
                         len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """Program (i, b * H + h): output and log-sum-exp of query block i of head h of sequence b."""
    pid_bh = tl.program_id(1)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    _fwd_block(tl.program_id(0), pid_bh // n_heads, pid_bh % n_heads, Q, K, V, O, LSE, MASK, CU_Q, CU_K, seed,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
               BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK, IS_VARLEN, IS_CAUSAL, HAS_DROPOUT, PRECISION, EVEN_D)


@triton.jit(do_not_specialize=LENGTH_ARGS)
def attention_bwd_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, CU_Q, CU_K, SEED,
                         stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                         stride_ob, stride_ol, stride_oh, stride_dqb, stride_dql, stride_dqh,
                         stride_dkb, stride_dkl, stride_dkh, stride_lse_b, stride_lse_h, stride_mask_b,
                         len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                         DELTA_CHUNK: tl.constexpr):
    """Program (i, b * H + h): for i < cdiv(len_k, BLOCK_N), dK/dV of key block i; otherwise dQ of
    query block i - cdiv(len_k, BLOCK_N); of head h of sequence b."""
    pid = tl.program_id(0)
    kv_blocks = tl.cdiv(len_k, BLOCK_N)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    if pid < kv_blocks:
        _bwd_kv_block(pid, b, h, Q, K, V, O, DO, DK, DV, LSE, MASK, CU_Q, CU_K, seed,
                      stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol,
                      stride_oh, stride_dkb, stride_dkl, stride_dkh, stride_lse_b, stride_lse_h, stride_mask_b,
                      len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                      HAS_MASK, IS_VARLEN, IS_CAUSAL, HAS_DROPOUT, PRECISION, EVEN_D, DELTA_CHUNK)
    else:
        _bwd_q_block(pid - kv_blocks, b, h, Q, K, V, O, DO, DQ, LSE, MASK, CU_Q, CU_K, seed,
                     stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol,
                     stride_oh, stride_dqb, stride_dql, stride_dqh, stride_lse_b, stride_lse_h, stride_mask_b,
                     len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                     HAS_MASK, IS_VARLEN, IS_CAUSAL, HAS_DROPOUT, PRECISION, EVEN_D)


@triton.jit
def dropout_keep_kernel(KEEP, SEED, stride_keep_b, stride_keep_h, stride_keep_m, seed_offset,
                        n_heads, len_q, len_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: program (i, b * H + h) writes the keep-mask rows of query block i of head h of sequence
    b exactly as the attention kernels draw them (seed = SEED + seed_offset), for every key."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) + seed_offset
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = KEEP + b.to(tl.int64) * stride_keep_b + h.to(tl.int64) * stride_keep_h
    for start_n in range(0, len_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
        tl.store(base + offs_m[:, None].to(tl.int64) * stride_keep_m + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < len_q) & (offs_n[None, :] < len_k))


# Co-attention kernels (direction 0: image queries over text keys/values; 1: text over image) ------
# Stride sets (batch, row, head; head-dim stride 1): per stream its q/k/v (v, t), its output and
# output gradient (ov, ot), its three input gradients (gv, gt).


@triton.jit
def _co_fwd_program(QV, KV, VV, QT, KT, VT, OV, OT, LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED,
                    stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th,
                    stride_ovb, stride_ovl, stride_ovh, stride_otb, stride_otl, stride_oth,
                    stride_lse_vb, stride_lse_vh, stride_lse_tb, stride_lse_th,
                    stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale, dropout_p,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_MASK_V: tl.constexpr, HAS_MASK_T: tl.constexpr, IS_VARLEN: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                    QUERY_BLOCK: tl.constexpr):
    """Program (i, b * H + h) of a co-attention forward (the tiled one here, the short-sequence one in
    ``attention_short``): for i < v_blocks = cdiv(len_v, BLOCK_M), ``QUERY_BLOCK`` (the path's
    one-direction forward of a query block) runs image-query block i over the text keys/values
    (ctx_v); otherwise text-query block i - v_blocks over the image keys/values (ctx_t, seed + 1);
    head h, sequence b."""
    pid = tl.program_id(0)
    v_blocks = tl.cdiv(len_v, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    if pid < v_blocks:
        QUERY_BLOCK(pid, b, h, QV, KT, VT, OV, LSE_V, MASK_T, CU_V, CU_T, seed,
                    stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                    stride_ovh, stride_lse_vb, stride_lse_vh, stride_mask_tb, len_v, len_t, n_heads, head_dim,
                    qk_scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_T, IS_VARLEN, False, HAS_DROPOUT,
                    PRECISION, EVEN_D)
    else:
        QUERY_BLOCK(pid - v_blocks, b, h, QT, KV, VV, OT, LSE_T, MASK_V, CU_T, CU_V, seed + 1,
                    stride_tb, stride_tl, stride_th, stride_vb, stride_vl, stride_vh, stride_otb, stride_otl,
                    stride_oth, stride_lse_tb, stride_lse_th, stride_mask_vb, len_t, len_v, n_heads, head_dim,
                    qk_scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_V, IS_VARLEN, False, HAS_DROPOUT,
                    PRECISION, EVEN_D)


@triton.jit(do_not_specialize=CO_LENGTH_ARGS)
def co_attention_fwd_kernel(QV, KV, VV, QT, KT, VT, OV, OT, LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED,
                            stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th,
                            stride_ovb, stride_ovl, stride_ovh, stride_otb, stride_otl, stride_oth,
                            stride_lse_vb, stride_lse_vh, stride_lse_tb, stride_lse_th,
                            stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale, dropout_p,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_MASK_V: tl.constexpr, HAS_MASK_T: tl.constexpr, IS_VARLEN: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """Program (i, b * H + h): query block i of either direction (see ``_co_fwd_program``), tiled."""
    _co_fwd_program(QV, KV, VV, QT, KT, VT, OV, OT, LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED,
                    stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                    stride_ovh, stride_otb, stride_otl, stride_oth, stride_lse_vb, stride_lse_vh, stride_lse_tb,
                    stride_lse_th, stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale,
                    dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_V, HAS_MASK_T, IS_VARLEN, HAS_DROPOUT,
                    PRECISION, EVEN_D, _fwd_block)


@triton.jit(do_not_specialize=CO_LENGTH_ARGS)
def co_attention_bwd_kernel(QV, KV, VV, QT, KT, VT, OV, OT, DOV, DOT, DQV, DKV, DVV, DQT, DKT, DVT,
                            LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED,
                            stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th,
                            stride_ovb, stride_ovl, stride_ovh, stride_otb, stride_otl, stride_oth,
                            stride_gvb, stride_gvl, stride_gvh, stride_gtb, stride_gtl, stride_gth,
                            stride_lse_vb, stride_lse_vh, stride_lse_tb, stride_lse_th,
                            stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale, scale,
                            dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_MASK_V: tl.constexpr, HAS_MASK_T: tl.constexpr, IS_VARLEN: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                            DELTA_CHUNK: tl.constexpr):
    """Program (i, b * H + h) of head h, sequence b; by i, in this order: an image key block (dK_v,
    dV_v, from the text queries), a text key block (dK_t, dV_t, from the image queries), an
    image-query block (dQ_v), a text-query block (dQ_t). Key blocks have BLOCK_N rows, query blocks
    BLOCK_M."""
    pid = tl.program_id(0)
    v_blocks = tl.cdiv(len_v, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    kv_v_blocks = tl.cdiv(len_v, BLOCK_N)
    kv_t_blocks = tl.cdiv(len_t, BLOCK_N)
    if pid < kv_v_blocks:  # image keys/values serve direction 1 (text queries)
        _bwd_kv_block(pid, b, h, QT, KV, VV, OT, DOT, DKV, DVV, LSE_T, MASK_V, CU_T, CU_V, seed + 1,
                      stride_tb, stride_tl, stride_th, stride_vb, stride_vl, stride_vh, stride_otb, stride_otl,
                      stride_oth, stride_gvb, stride_gvl, stride_gvh, stride_lse_tb, stride_lse_th, stride_mask_vb,
                      len_t, len_v, n_heads, head_dim, qk_scale, scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                      HAS_MASK_V, IS_VARLEN, False, HAS_DROPOUT, PRECISION, EVEN_D, DELTA_CHUNK)
    elif pid < kv_v_blocks + kv_t_blocks:  # text keys/values serve direction 0 (image queries)
        _bwd_kv_block(pid - kv_v_blocks, b, h, QV, KT, VT, OV, DOV, DKT, DVT, LSE_V, MASK_T, CU_V, CU_T, seed,
                      stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                      stride_ovh, stride_gtb, stride_gtl, stride_gth, stride_lse_vb, stride_lse_vh, stride_mask_tb,
                      len_v, len_t, n_heads, head_dim, qk_scale, scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                      HAS_MASK_T, IS_VARLEN, False, HAS_DROPOUT, PRECISION, EVEN_D, DELTA_CHUNK)
    elif pid < kv_v_blocks + kv_t_blocks + v_blocks:
        _bwd_q_block(pid - kv_v_blocks - kv_t_blocks, b, h, QV, KT, VT, OV, DOV, DQV, LSE_V, MASK_T, CU_V, CU_T,
                     seed, stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                     stride_ovh, stride_gvb, stride_gvl, stride_gvh, stride_lse_vb, stride_lse_vh, stride_mask_tb,
                     len_v, len_t, n_heads, head_dim, qk_scale, scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                     HAS_MASK_T, IS_VARLEN, False, HAS_DROPOUT, PRECISION, EVEN_D)
    else:
        _bwd_q_block(pid - kv_v_blocks - kv_t_blocks - v_blocks, b, h, QT, KV, VV, OT, DOT, DQT, LSE_T, MASK_V,
                     CU_T, CU_V, seed + 1, stride_tb, stride_tl, stride_th, stride_vb, stride_vl, stride_vh,
                     stride_otb, stride_otl, stride_oth, stride_gtb, stride_gtl, stride_gth, stride_lse_tb,
                     stride_lse_th, stride_mask_vb, len_t, len_v, n_heads, head_dim, qk_scale, scale, dropout_p,
                     BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_V, IS_VARLEN, False, HAS_DROPOUT, PRECISION, EVEN_D)


# Launch configurations (the launchers pick from these; ``python -m fastvl.aot`` reports them) ------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


HEAD_BLOCKS = (64, 128)  # BLOCK_D: the head dim rounded up to a power of two, at least 64
LONG_SEQUENCE = 512  # from this many query rows on, the forward uses 128-row query blocks
DTYPES = ("fp16", "bf16", "fp32")
# tl.dot precision per dtype: fp32 stays exact fp32 (ieee, CUDA cores) to meet the fp32 parity rule;
# it is the correctness path, not the fast one (use bf16/fp16 for speed).
PRECISION = {"fp16": "tf32", "bf16": "tf32", "fp32": "ieee"}
INTERPRETER_CONFIG = BlockConfig(32, 16, 1, 1)  # small blocks: several per sequence in CPU tests
KEEP_CONFIG = BlockConfig(64, 64, 4, 1)  # dropout_keep_kernel (debug helper)


def head_block(head_dim: int) -> int:
    return max(64, triton.next_power_of_2(head_dim))


def fwd_config(dtype: str, block_d: int, long: bool) -> BlockConfig:
    """Forward blocks; ``long``: at least LONG_SEQUENCE query rows (attention only; co-attention's
    ViLBERT-length streams always take the short configuration)."""
    if dtype == "fp32":  # exact fp32 dots unroll into FMA loops: small tiles keep the compile short
        return BlockConfig(32, 16, 8 if block_d == 128 else 4, 2)
    if long:  # 128-row query blocks: 8 warps (4 spill on sm_80 even at d=64)
        return BlockConfig(128, 64, 8, 2 if block_d == 128 else 3)
    return BlockConfig(64, 64, 8 if block_d == 128 else 4, 2 if block_d == 128 else 3)


def delta_chunk(dtype: str, block_d: int, major: int, causal: bool) -> int:
    """DELTA_CHUNK of the tiled backward, read off the compile report (bf16): exact fp32 dots keep dO
    in registers (0: reuse it); d=128 reads 16-column chunks (-170 to -290 B spill on sm_90); d=64
    reads 32-column chunks, except causal attention: it reuses dO on sm_80 (0 B spill; chunks 8 B)
    and reads one 64-column chunk on sm_90 (36 B; 32 columns 44 B, reusing dO 60 B). The same choices
    for non-causal d=64 spill more (sm_80 24 B against 8, sm_90 72 B against 28)."""
    if dtype == "fp32":
        return 0
    if block_d == 128:
        return 16
    if causal:
        return 64 if major >= 9 else 0
    return 32


def bwd_config(dtype: str, block_d: int) -> BlockConfig:
    if dtype == "fp32":  # d=128 on 8 warps: 4 spill 600-700 B
        return BlockConfig(16, 16, 8 if block_d == 128 else 4, 1)
    return BlockConfig(64, 64, 8 if block_d == 128 else 4, 2)
