"""Bias + GELU (erf form, as BERT): ``y = gelu(x + bias)`` and its backward, on ``[M, N]`` rows.

The backward also reduces the bias gradient over its block of rows, so the bias never needs a
second pass over ``dx``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvl.kernels.aot_spec import AotSpec


@triton.jit
def _load_tile(x_ptr, bias_ptr, stride_x, n_rows, n_cols, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # This program's tile: int64 row offsets, columns, the in-bounds mask and h = x + bias in fp32.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    return rows64, cols, inside, h


@triton.jit
def bias_gelu_fwd_kernel(x_ptr, bias_ptr, y_ptr, stride_x, stride_y, n_rows, n_cols,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program computes a BLOCK_M x BLOCK_N tile of y = h * Phi(h), h = x + bias (fp32 math).
    rows64, cols, inside, h = _load_tile(x_ptr, bias_ptr, stride_x, n_rows, n_cols, HAS_BIAS, BLOCK_M, BLOCK_N)
    y = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def bias_gelu_bwd_kernel(dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_ptr, stride_dy, stride_x, stride_dx,
                         n_rows, n_cols, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program computes a BLOCK_M x BLOCK_N tile of dx = dy * (Phi(h) + h * phi(h)) and writes that
    # tile's column sums of dx into row program_id(0) of the partial bias-gradient buffer.
    rows64, cols, inside, h = _load_tile(x_ptr, bias_ptr, stride_x, n_rows, n_cols, HAS_BIAS, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    dx = tl.where(inside, dy * (cdf + h * pdf), 0.0)
    tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if HAS_BIAS:
        tl.store(dbias_ptr + tl.program_id(0).to(tl.int64) * n_cols + cols, tl.sum(dx, axis=0), mask=cols < n_cols)


# The one tile shape every launch uses (BLOCK_M rows x BLOCK_N columns, 4 warps).
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 128, 4


def _specs() -> list[AotSpec]:
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        fwd = {"x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "stride_x": "i64",
               "stride_y": "i64", "n_rows": "i32", "n_cols": "i32", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        specs.append(AotSpec(f"bias_gelu_fwd_{dtype}", bias_gelu_fwd_kernel, fwd,
                             dict(HAS_BIAS=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), num_warps=NUM_WARPS, num_stages=1))
        bwd = {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}",
               "dbias_ptr": "*fp32", "stride_dy": "i64", "stride_x": "i64", "stride_dx": "i64", "n_rows": "i32",
               "n_cols": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        specs.append(AotSpec(f"bias_gelu_bwd_{dtype}", bias_gelu_bwd_kernel, bwd,
                             dict(HAS_BIAS=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), num_warps=NUM_WARPS, num_stages=1))
    return specs


AOT_SPECS = _specs()
