"""Short-sequence attention and co-attention (every sequence at most 128 rows at head dims <= 64, 64
rows at head dims 65-128): the regime of ViLBERT, VL-BERT and ALBEF (10-101 regions, 16-80 tokens).

All keys of a sequence fit one block of BLOCK_N = 64 or 128 rows (the key bucket), so the forward
is a single pass: one ``S = Q K^T``, one exact softmax, one ``P V`` -- no online rescaling, no
software pipeline (num_stages=1). The backward program owns one (sequence, head, direction) whole:
it loads Q, K, V, O and dO once and computes dV, dK and dQ with five GEMMs (S, dP, dV, dK, dQ) and the
dropout mask drawn once, or read from the forward's bit-packed copy (STORED_KEEP: one bit per score,
[B, H, Lq, ceil(Lk / 32)] int32, bit n % 32 of word n // 32); every gradient element is written by exactly one program (no atomics,
bitwise repeatable). K and V loads are predicated on the keys that may be attended (bounds and key
mask): a masked key's values never meet an arithmetic operation, so NaN or Inf there cannot leak.

Same conventions as ``fastvl.kernels.attention`` (log-sum-exp base 2 of the scaled scores, +inf for a
row without keys, the Philox dropout stream, ``seed + 1`` for co-attention's direction 1), so the two
paths are interchangeable between forward and backward. Signatures are slim: the head-dim stride is 1
(the launcher makes it so), tensors that share strides share one (batch, row, head) stride set -- a
stream's q/k/v, an output and its gradient, a stream's three input gradients -- and absent masks or
``cu_seqlens`` are ``None``. Lengths and length-derived strides are not specialised, so one compiled
variant serves every length of a bucket.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvl.kernels.attention import (
    CO_LENGTH_ARGS,
    LENGTH_ARGS,
    _dropout_keep,
    _key_ok,
    _rows,
    _sequence,
)

SHORT_MAX_LEN = 128
KEY_BUCKETS = (64, 128)
# Longest sequence the short path takes per BLOCK_D (head dim rounded up): at d=128 the 128-row bucket's
# backward spills 1.7 KB on sm_80 and its forward spills too, so d=128 keeps it to the 64-row bucket.
SHORT_MAX_LEN_BY_HEAD_BLOCK = {64: 128, 128: 64}
BLOCK_M = 64  # query rows per forward program


def key_bucket(max_len: int) -> int:
    """BLOCK_N for sequences of at most ``max_len`` rows (<= SHORT_MAX_LEN)."""
    return KEY_BUCKETS[0] if max_len <= KEY_BUCKETS[0] else KEY_BUCKETS[1]


FWD_WARPS = 4


def bwd_warps(block_n: int, block_d: int, major: int) -> int:
    """Backward warps, read off the compile report (bf16): key bucket 64 on sm_90, 4 warps (d=128:
    255 registers, no spill, 2 CTAs/SM; 8 warps need 166 registers, 1 CTA/SM); on sm_80 (mma operands
    in registers) d=128 takes 8 warps (4 spill 0.8-1.5 KB with dropout); bucket 128, 8 warps (4 spill
    1.3-1.7 KB)."""
    if block_n > 64 or (major < 9 and block_d > 64):
        return 8
    return 4


def keep_words(len_k: int) -> int:
    """int32 words per query row of a stored keep-mask: one bit per key, bit n % 32 of word n // 32."""
    return (len_k + 31) // 32


@triton.jit
def _keep_rows(b, h, n_heads, offs_m, len_q, len_k):
    """Word offsets of query rows offs_m of head h of sequence b in a [B, H, len_q, keep_words] mask."""
    return ((b * n_heads + h).to(tl.int64) * len_q + offs_m.to(tl.int64)) * ((len_k + 31) // 32)


@triton.jit
def _store_keep(KEEP, keep, b, h, n_heads, offs_m, offs_n, seq_q, seq_k, len_q, len_k, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Pack the [BLOCK_M, BLOCK_N] keep tile along the keys into BLOCK_N // 32 int32 words per row (bits
    of keys past the sequence are 0) and store the words of the sequence's rows."""
    bits = tl.where(keep & (offs_n < seq_k)[None, :], 1 << (offs_n % 32)[None, :], 0)
    words = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // 32, 32)), 2)  # distinct bits: the sum is their OR
    offs_w = tl.arange(0, BLOCK_N // 32)
    tl.store(KEEP + _keep_rows(b, h, n_heads, offs_m, len_q, len_k)[:, None] + offs_w[None, :], words,
             mask=(offs_m < seq_q)[:, None] & (offs_w < (seq_k + 31) // 32)[None, :])


@triton.jit
def _load_keep(KEEP, b, h, n_heads, offs_m, seq_q, seq_k, len_q, len_k, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] keep tile unpacked from KEEP (False outside the sequence): BLOCK_N // 32 words
    per row loaded, each spread into its 32 bits."""
    offs_w = tl.arange(0, BLOCK_N // 32)
    words = tl.load(KEEP + _keep_rows(b, h, n_heads, offs_m, len_q, len_k)[:, None] + offs_w[None, :],
                    mask=(offs_m < seq_q)[:, None] & (offs_w < (seq_k + 31) // 32)[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _visible(key_ok, offs_m, offs_n, seq_q, seq_k, IS_CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: key n may be attended by query m (causal: bottom-right aligned)."""
    allowed = key_ok[None, :]
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
    return allowed


@triton.jit
def _fwd_short(pid_m, b, h, Q, K, V, O, LSE, MASK, CU_Q, CU_K, seed, KEEP,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
               IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, EVEN_D: tl.constexpr, STORED_KEEP: tl.constexpr):
    """Output rows [pid_m * BLOCK_M, +BLOCK_M) of head h of sequence b over all its keys at once, and
    their log-sum-exp (STORED_KEEP: and their dropout keep-mask, bit-packed into KEEP)."""
    q_start, seq_q = _sequence(CU_Q, b, len_q, IS_VARLEN)
    k_start, seq_k = _sequence(CU_K, b, len_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seq_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)
        row_tile = (offs_m < seq_q)[:, None] & d_ok[None, :]
        key_ok = _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK)
        key_tile = key_ok[:, None] & d_ok[None, :]
        q = tl.load(_rows(Q, b, h, q_start, offs_m, offs_d, stride_qb, stride_ql, stride_qh), mask=row_tile,
                    other=0.0)
        k = tl.load(_rows(K, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=key_tile,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(_visible(key_ok, offs_m, offs_n, seq_q, seq_k, IS_CAUSAL), s, float("-inf"))
        row_max = tl.max(s, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # no key: keep exp2 finite
        p = tl.exp2(s - row_max[:, None])
        row_sum = tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
            p = tl.where(keep, p, 0.0)
            if STORED_KEEP:
                _store_keep(KEEP, keep, b, h, n_heads, offs_m, offs_n, seq_q, seq_k, len_q, len_k, BLOCK_M, BLOCK_N)
        v = tl.load(_rows(V, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=key_tile,
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        has_key = row_sum > 0.0
        safe_sum = tl.where(has_key, row_sum, 1.0)
        inv = tl.where(has_key, 1.0 / safe_sum, 0.0)
        if HAS_DROPOUT:
            inv = inv / (1.0 - dropout_p)
        tl.store(_rows(O, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh),
                 (acc * inv[:, None]).to(O.dtype.element_ty), mask=row_tile)
        lse = tl.where(has_key, row_max + tl.log2(safe_sum), float("inf"))
        tl.store(LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m, lse,
                 mask=offs_m < seq_q)


@triton.jit
def _bwd_short(b, h, Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, CU_Q, CU_K, seed, KEEP,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_dqb, stride_dql, stride_dqh, stride_dkb, stride_dkl, stride_dkh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, scale,
               dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, EVEN_D: tl.constexpr, STORED_KEEP: tl.constexpr):
    """dQ, dK, dV of head h of sequence b: all its queries (BLOCK_M rows) against all its keys
    (BLOCK_N rows), each tile loaded once, five GEMMs (S, dP, dV, dK, dQ), each gradient stored as soon
    as it is complete (fewer live registers). The dropout mask is read from KEEP (STORED_KEEP) or
    regenerated from the seed."""
    q_start, seq_q = _sequence(CU_Q, b, len_q, IS_VARLEN)
    k_start, seq_k = _sequence(CU_K, b, len_k, IS_VARLEN)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)
    row_tile = (offs_m < seq_q)[:, None] & d_ok[None, :]
    key_ok = _key_ok(MASK, b, offs_n, seq_k, stride_mask_b, HAS_MASK)
    key_tile = key_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q, b, h, q_start, offs_m, offs_d, stride_qb, stride_ql, stride_qh), mask=row_tile, other=0.0)
    k = tl.load(_rows(K, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=key_tile, other=0.0)
    lse = tl.load(LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m,
                  mask=offs_m < seq_q, other=float("inf"))
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(_visible(key_ok, offs_m, offs_n, seq_q, seq_k, IS_CAUSAL), tl.exp2(s - lse[:, None]), 0.0)
    if HAS_DROPOUT:  # the mask dies here: where p > 0, p_used > 0 says "kept" (and where p = 0, dS = 0)
        inv_keep = 1.0 / (1.0 - dropout_p)
        if STORED_KEEP:
            keep = _load_keep(KEEP, b, h, n_heads, offs_m, seq_q, seq_k, len_q, len_k, BLOCK_M, BLOCK_N)
        else:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, len_q, len_k, dropout_p)
        p_used = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_used = p
    do = tl.load(_rows(DO, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh), mask=row_tile, other=0.0)
    o = tl.load(_rows(O, b, h, q_start, offs_m, offs_d, stride_ob, stride_ol, stride_oh), mask=row_tile, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    v = tl.load(_rows(V, b, h, k_start, offs_n, offs_d, stride_kb, stride_kl, stride_kh), mask=key_tile, other=0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_DROPOUT:
        dp = tl.where(p_used > 0.0, dp * inv_keep, 0.0)
    dv = tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=PRECISION)
    in_seq = (offs_n < seq_k)[:, None] & d_ok[None, :]  # masked keys get their zero gradients written
    tl.store(_rows(DV, b, h, k_start, offs_n, offs_d, stride_dkb, stride_dkl, stride_dkh),
             dv.to(DV.dtype.element_ty), mask=in_seq)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    tl.store(_rows(DK, b, h, k_start, offs_n, offs_d, stride_dkb, stride_dkl, stride_dkh),
             (dk * scale).to(DK.dtype.element_ty), mask=in_seq)
    dq = tl.dot(ds, k, input_precision=PRECISION)
    tl.store(_rows(DQ, b, h, q_start, offs_m, offs_d, stride_dqb, stride_dql, stride_dqh),
             (dq * scale).to(DQ.dtype.element_ty), mask=row_tile)


# Attention -----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=LENGTH_ARGS)
def attention_fwd_short_kernel(Q, K, V, O, LSE, MASK, CU_Q, CU_K, SEED, KEEP,
                               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                               stride_ob, stride_ol, stride_oh, stride_lse_b, stride_lse_h, stride_mask_b,
                               len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                               HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                               STORED_KEEP: tl.constexpr):
    """Program (i, b * H + h): output and log-sum-exp of query block i of head h of sequence b (and
    its packed keep-mask rows, STORED_KEEP); k and v share one stride set."""
    pid_bh = tl.program_id(1)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    _fwd_short(tl.program_id(0), pid_bh // n_heads, pid_bh % n_heads, Q, K, V, O, LSE, MASK, CU_Q, CU_K, seed, KEEP,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, dropout_p,
               BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK, IS_VARLEN, IS_CAUSAL, HAS_DROPOUT, PRECISION, EVEN_D,
               STORED_KEEP)


@triton.jit(do_not_specialize=LENGTH_ARGS)
def attention_bwd_short_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, CU_Q, CU_K, SEED, KEEP,
                               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                               stride_ob, stride_ol, stride_oh, stride_dqb, stride_dql, stride_dqh,
                               stride_dkb, stride_dkl, stride_dkh, stride_lse_b, stride_lse_h, stride_mask_b,
                               len_q, len_k, n_heads, head_dim, qk_scale, scale, dropout_p,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                               HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                               STORED_KEEP: tl.constexpr):
    """Program (b * H + h): dQ, dK, dV of head h of sequence b. Stride sets: q; k and v; o and do; dq;
    dk and dv."""
    pid_bh = tl.program_id(0)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    _bwd_short(pid_bh // n_heads, pid_bh % n_heads, Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, CU_Q, CU_K, seed, KEEP,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_ol, stride_oh,
               stride_dqb, stride_dql, stride_dqh, stride_dkb, stride_dkl, stride_dkh,
               stride_lse_b, stride_lse_h, stride_mask_b, len_q, len_k, n_heads, head_dim, qk_scale, scale,
               dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK, IS_VARLEN, IS_CAUSAL, HAS_DROPOUT, PRECISION, EVEN_D,
               STORED_KEEP)


# Co-attention (direction 0: image queries over text keys/values; 1: text over image) ----------------


@triton.jit(do_not_specialize=CO_LENGTH_ARGS)
def co_attention_fwd_short_kernel(QV, KV, VV, QT, KT, VT, OV, OT, LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED,
                                  KEEP_V, KEEP_T, stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th,
                                  stride_ovb, stride_ovl, stride_ovh, stride_otb, stride_otl, stride_oth,
                                  stride_lse_vb, stride_lse_vh, stride_lse_tb, stride_lse_th,
                                  stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale,
                                  dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  HAS_MASK_V: tl.constexpr, HAS_MASK_T: tl.constexpr, IS_VARLEN: tl.constexpr,
                                  HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                                  STORED_KEEP: tl.constexpr):
    """Program (i, b * H + h), single pass: for i < cdiv(len_v, BLOCK_M), image-query block i over the
    text keys/values (ctx_v, keep-mask KEEP_V [B, H, len_v, words of len_t]); otherwise text-query block
    i - that over the image keys/values (ctx_t, seed + 1, KEEP_T). The tiled twin is
    ``attention._co_fwd_program``. One stride set per stream (its q, k, v) and per output."""
    pid = tl.program_id(0)
    v_blocks = tl.cdiv(len_v, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    if pid < v_blocks:
        _fwd_short(pid, b, h, QV, KT, VT, OV, LSE_V, MASK_T, CU_V, CU_T, seed, KEEP_V,
                   stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                   stride_ovh, stride_lse_vb, stride_lse_vh, stride_mask_tb, len_v, len_t, n_heads, head_dim,
                   qk_scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_T, IS_VARLEN, False, HAS_DROPOUT,
                   PRECISION, EVEN_D, STORED_KEEP)
    else:
        _fwd_short(pid - v_blocks, b, h, QT, KV, VV, OT, LSE_T, MASK_V, CU_T, CU_V, seed + 1, KEEP_T,
                   stride_tb, stride_tl, stride_th, stride_vb, stride_vl, stride_vh, stride_otb, stride_otl,
                   stride_oth, stride_lse_tb, stride_lse_th, stride_mask_vb, len_t, len_v, n_heads, head_dim,
                   qk_scale, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, HAS_MASK_V, IS_VARLEN, False, HAS_DROPOUT,
                   PRECISION, EVEN_D, STORED_KEEP)


@triton.jit(do_not_specialize=CO_LENGTH_ARGS)
def co_attention_bwd_short_kernel(QV, KV, VV, QT, KT, VT, OV, OT, DOV, DOT, DQV, DKV, DVV, DQT, DKT, DVT,
                                  LSE_V, LSE_T, MASK_V, MASK_T, CU_V, CU_T, SEED, KEEP_V, KEEP_T,
                                  stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th,
                                  stride_ovb, stride_ovl, stride_ovh, stride_otb, stride_otl, stride_oth,
                                  stride_gvb, stride_gvl, stride_gvh, stride_gtb, stride_gtl, stride_gth,
                                  stride_lse_vb, stride_lse_vh, stride_lse_tb, stride_lse_th,
                                  stride_mask_vb, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale, scale,
                                  dropout_p, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  HAS_MASK_V: tl.constexpr, HAS_MASK_T: tl.constexpr,
                                  IS_VARLEN: tl.constexpr,
                                  HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                                  STORED_KEEP: tl.constexpr):
    """Program (direction, b * H + h): direction 0 gives dQ_v, dK_t, dV_t (image queries over the text
    keys), direction 1 dQ_t, dK_v, dV_v. Stride sets: per stream its inputs, its output and output
    gradient, its three input gradients."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    if tl.program_id(0) == 0:
        _bwd_short(b, h, QV, KT, VT, OV, DOV, DQV, DKT, DVT, LSE_V, MASK_T, CU_V, CU_T, seed, KEEP_V,
                   stride_vb, stride_vl, stride_vh, stride_tb, stride_tl, stride_th, stride_ovb, stride_ovl,
                   stride_ovh, stride_gvb, stride_gvl, stride_gvh, stride_gtb, stride_gtl, stride_gth,
                   stride_lse_vb, stride_lse_vh, stride_mask_tb, len_v, len_t, n_heads, head_dim, qk_scale, scale,
                   dropout_p, BLOCK_N, BLOCK_N, BLOCK_D, HAS_MASK_T, IS_VARLEN, False, HAS_DROPOUT, PRECISION,
                   EVEN_D, STORED_KEEP)
    else:
        _bwd_short(b, h, QT, KV, VV, OT, DOT, DQT, DKV, DVV, LSE_T, MASK_V, CU_T, CU_V, seed + 1, KEEP_T,
                   stride_tb, stride_tl, stride_th, stride_vb, stride_vl, stride_vh, stride_otb, stride_otl,
                   stride_oth, stride_gtb, stride_gtl, stride_gth, stride_gvb, stride_gvl, stride_gvh,
                   stride_lse_tb, stride_lse_th, stride_mask_vb, len_t, len_v, n_heads, head_dim, qk_scale, scale,
                   dropout_p, BLOCK_N, BLOCK_N, BLOCK_D, HAS_MASK_V, IS_VARLEN, False, HAS_DROPOUT, PRECISION,
                   EVEN_D, STORED_KEEP)

