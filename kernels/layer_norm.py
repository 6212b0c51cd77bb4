"""Residual + dropout + LayerNorm, fused: ``y = LN(dropout(x) + residual) * weight + bias``.

Rows are the flattened leading dims (``[M, N]``, N = hidden size). The forward keeps the pre-norm
sum (when there is a residual or dropout), the per-row mean and 1/std, and the dropout keep-mask
(int8) for the backward. Dropout draws its keep decisions with Philox from a seed tensor, so no host
sync is needed to seed it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvl.kernels.aot_spec import AotSpec


@triton.jit
def layer_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, seed_ptr, y_ptr, sum_ptr, keep_ptr, mean_ptr, rstd_ptr,
    stride_x, stride_residual, stride_y, stride_sum, stride_keep,
    n_rows, n_cols, dropout_p, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program normalises BLOCK_M rows: h = dropout(x) + residual, y = (h - mean) * rstd * w + b.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    inside = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = tl.rand(seed, rows64 * n_cols + cols[None, :]) >= dropout_p
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
        tl.store(keep_ptr + rows64 * stride_keep + cols[None, :], keep.to(tl.int8), mask=inside)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + rows64 * stride_residual + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if STORE_SUM:
        # normalise the rounded sum that is stored, so that forward and backward see the same values
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64 * stride_sum + cols[None, :], h, mask=inside)
        h = h.to(tl.float32)
    mean = tl.sum(h, axis=1) / n_cols
    centred = tl.where(inside, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def layer_norm_bwd_kernel(
    dy_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, keep_ptr, dh_ptr, dx_ptr, dweight_ptr, dbias_ptr,
    stride_dy, stride_h, stride_keep, stride_dh, stride_dx,
    n_rows, n_cols, blocks_per_program, dropout_p,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program walks blocks_per_program blocks of BLOCK_M rows: dh = rstd * (w*dy - mean(w*dy) -
    # xhat * mean(w*dy*xhat)) (the residual's gradient), dx = dh * keep / (1 - p); it accumulates its
    # rows' partial dweight = sum(dy * xhat) and dbias = sum(dy) into row pid of the partial buffers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        inside = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(inside, (h - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        dh = (wdy - (tl.sum(wdy * xhat, axis=1)[:, None] * xhat + tl.sum(wdy, axis=1)[:, None]) / n_cols)
        dh = dh * rstd[:, None]
        tl.store(dh_ptr + rows64 * stride_dh + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=inside)
        if HAS_DROPOUT:
            keep = tl.load(keep_ptr + rows64 * stride_keep + cols[None, :], mask=inside, other=0)
            dx = tl.where(keep != 0, dh / (1.0 - dropout_p), 0.0)
            tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)
        dweight += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            dbias += tl.sum(dy, axis=0)
    tl.store(dweight_ptr + pid * n_cols + cols, dweight, mask=col_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid * n_cols + cols, dbias, mask=col_ok)


MAX_BLOCK_N = 8192
# BLOCK_N = next power of two >= N (at least 128); BLOCK_M rows per program (a tile of <= 2048 values).
BLOCK_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)


def block_rows(block_n: int) -> int:
    return max(1, min(16, 2048 // block_n))


def num_warps_for(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16) if block_n > 1024 else 4


def _specs() -> list[AotSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for block in BLOCK_SIZES:
            fwd_sig = {name: f"*{dtype}" for name in ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "y_ptr",
                                                         "sum_ptr")}
            fwd_sig.update(seed_ptr="*i64", keep_ptr="*i8", mean_ptr="*fp32", rstd_ptr="*fp32", stride_x="i64",
                           stride_residual="i64", stride_y="i64", stride_sum="i64", stride_keep="i64", n_rows="i32",
                           n_cols="i32",
                           dropout_p="fp32", eps="fp32", HAS_RESIDUAL="constexpr", HAS_DROPOUT="constexpr",
                           HAS_BIAS="constexpr", STORE_SUM="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr")
            specs.append(AotSpec(f"layer_norm_fwd_{dtype}_N{block}", layer_norm_fwd_kernel, fwd_sig,
                                 dict(HAS_RESIDUAL=True, HAS_DROPOUT=True, HAS_BIAS=True, STORE_SUM=True,
                                      BLOCK_M=block_rows(block), BLOCK_N=block), num_warps=num_warps_for(block),
                                 num_stages=1))
            bwd_sig = {name: f"*{dtype}" for name in ("dy_ptr", "h_ptr", "weight_ptr", "dh_ptr", "dx_ptr")}
            bwd_sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", keep_ptr="*i8", dweight_ptr="*fp32",
                           dbias_ptr="*fp32", stride_dy="i64", stride_h="i64", stride_keep="i64", stride_dh="i64",
                           stride_dx="i64", n_rows="i32", n_cols="i32", blocks_per_program="i32", dropout_p="fp32",
                           HAS_DROPOUT="constexpr", HAS_BIAS="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr")
            specs.append(AotSpec(f"layer_norm_bwd_{dtype}_N{block}", layer_norm_bwd_kernel, bwd_sig,
                                 dict(HAS_DROPOUT=True, HAS_BIAS=True, BLOCK_M=block_rows(block), BLOCK_N=block),
                                 num_warps=num_warps_for(block), num_stages=1))
    return specs


AOT_SPECS = _specs()
