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
    n_cols, dropout_p, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program normalises one row: h = dropout(x) + residual, y = (h - mean) * rstd * w + b.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    h = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = tl.rand(seed, row * n_cols + cols) >= dropout_p
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
        tl.store(keep_ptr + row * stride_keep + cols, keep.to(tl.int8), mask=in_row)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + row * stride_residual + cols, mask=in_row, other=0.0).to(tl.float32)
    if STORE_SUM:
        # normalise the rounded sum that is stored, so that forward and backward see the same values
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, h, mask=in_row)
        h = h.to(tl.float32)
    mean = tl.sum(h, axis=0) / n_cols
    centred = tl.where(in_row, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centred * rstd * w
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    dy_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, keep_ptr, dh_ptr, dx_ptr, dweight_ptr, dbias_ptr,
    stride_dy, stride_h, stride_keep, stride_dh, stride_dx,
    n_rows, n_cols, rows_per_program, dropout_p,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program walks rows [pid * rows_per_program, ...): dh = rstd * (w*dy - mean(w*dy) - xhat *
    # mean(w*dy*xhat)) (the gradient of the residual), dx = dh * keep / (1 - p); it accumulates this
    # block's partial dweight = sum(dy * xhat) and dbias = sum(dy) into row pid of the partial buffers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    for offset in range(0, rows_per_program):
        row = (first + offset).to(tl.int64)
        if row < n_rows:
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + row * stride_h + cols, mask=in_row, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(in_row, (h - mean) * rstd, 0.0)
            wdy = w * dy
            dh = (wdy - (tl.sum(wdy * xhat, axis=0) * xhat + tl.sum(wdy, axis=0)) / n_cols) * rstd
            tl.store(dh_ptr + row * stride_dh + cols, dh.to(dh_ptr.dtype.element_ty), mask=in_row)
            if HAS_DROPOUT:
                keep = tl.load(keep_ptr + row * stride_keep + cols, mask=in_row, other=0)
                dx = tl.where(keep != 0, dh / (1.0 - dropout_p), 0.0)
                tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
            dweight += dy * xhat
            if HAS_BIAS:
                dbias += dy
    tl.store(dweight_ptr + pid * n_cols + cols, dweight, mask=in_row)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid * n_cols + cols, dbias, mask=in_row)


MAX_BLOCK_N = 8192
# BLOCK_N = next power of two >= N (at least 128); one row per program.
BLOCK_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)


def num_warps_for(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16) if block_n > 1024 else 4


def _specs() -> list[AotSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for block in BLOCK_SIZES:
            fwd_sig = {name: f"*{dtype}" for name in ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "y_ptr",
                                                         "sum_ptr")}
            fwd_sig.update(seed_ptr="*i64", keep_ptr="*i8", mean_ptr="*fp32", rstd_ptr="*fp32", stride_x="i64",
                           stride_residual="i64", stride_y="i64", stride_sum="i64", stride_keep="i64", n_cols="i32",
                           dropout_p="fp32", eps="fp32", HAS_RESIDUAL="constexpr", HAS_DROPOUT="constexpr",
                           HAS_BIAS="constexpr", STORE_SUM="constexpr", BLOCK_N="constexpr")
            specs.append(AotSpec(f"layer_norm_fwd_{dtype}_N{block}", layer_norm_fwd_kernel, fwd_sig,
                                 dict(HAS_RESIDUAL=True, HAS_DROPOUT=True, HAS_BIAS=True, STORE_SUM=True,
                                      BLOCK_N=block), num_warps=num_warps_for(block), num_stages=1))
            bwd_sig = {name: f"*{dtype}" for name in ("dy_ptr", "h_ptr", "weight_ptr", "dh_ptr", "dx_ptr")}
            bwd_sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", keep_ptr="*i8", dweight_ptr="*fp32",
                           dbias_ptr="*fp32", stride_dy="i64", stride_h="i64", stride_keep="i64", stride_dh="i64",
                           stride_dx="i64", n_rows="i32", n_cols="i32", rows_per_program="i32", dropout_p="fp32",
                           HAS_DROPOUT="constexpr", HAS_BIAS="constexpr", BLOCK_N="constexpr")
            specs.append(AotSpec(f"layer_norm_bwd_{dtype}_N{block}", layer_norm_bwd_kernel, bwd_sig,
                                 dict(HAS_DROPOUT=True, HAS_BIAS=True, BLOCK_N=block),
                                 num_warps=num_warps_for(block), num_stages=1))
    return specs


AOT_SPECS = _specs()
