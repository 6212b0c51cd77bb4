"""Row-wise KL(p || softmax(x)) with its gradient in one kernel (ViLBERT's masked-region loss).

Never materialises ``log_softmax``: a first sweep over the row keeps a running max ``m`` and
``s = sum exp(x - m)`` together with ``sum p``, ``sum p (x - c)`` and ``sum p log p``; the loss follows from
``log softmax(x) = x - m - log s``. A second sweep writes the gradient
``(softmax(x) * sum p - p) * scale`` (the loss's gradient, scaled by the caller's per-row factor), which may
overwrite the logits in place. Rows with ``selected == 0`` only get a zero gradient written. A second,
one-program kernel reduces the row losses ('mean' over the selected count, counted on the device) and
writes the gradient factor, so the op is two launches.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_sums(logits_row, target_row, cols, lead, load_end, row_end, BLOCK_C: tl.constexpr):
    """Sweep 1 over one row read through a window: lanes [lead, lead + row_end) hold its classes, the
    loads cover [0, load_end) (lanes outside the row are loaded but never used)."""
    # Shift for sum p (x - c): the first block's max, close to the row max, keeps |x - c| small so that
    # the loss does not cancel catastrophically for logits of size ~1e4.
    in_row = (cols >= lead) & (cols < lead + row_end)
    first = tl.load(logits_row + cols, mask=cols < load_end, other=float("-inf")).to(tl.float32)
    shift = tl.max(tl.where(in_row, first, float("-inf")), axis=0)
    shift = tl.where(row_end > 0, shift, 0.0)
    row_max = shift
    sum_exp = tl.zeros((), dtype=tl.float32)
    sum_p = tl.zeros((), dtype=tl.float32)
    sum_p_x = tl.zeros((), dtype=tl.float32)
    sum_p_log_p = tl.zeros((), dtype=tl.float32)
    for start in range(0, load_end, BLOCK_C):
        offsets = start + cols
        loaded = offsets < load_end
        valid = (offsets >= lead) & (offsets < lead + row_end)
        x = tl.load(logits_row + offsets, mask=loaded, other=float("-inf")).to(tl.float32)
        p = tl.load(target_row + offsets, mask=loaded, other=0.0).to(tl.float32)
        x = tl.where(valid, x, float("-inf"))
        p = tl.where(valid, p, 0.0)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
        sum_p += tl.sum(p, axis=0)
        sum_p_x += tl.sum(p * (tl.where(valid, x, shift) - shift), axis=0)
        sum_p_log_p += tl.sum(tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0), axis=0)
    return shift, row_max, sum_exp, sum_p, sum_p_x, sum_p_log_p


@triton.jit
def _row_grad(logits_row, target_row, grad_row, cols, lead, load_end, row_end, n_classes, log_norm, sum_p, scale,
              BLOCK_C: tl.constexpr):
    """Sweep 2: the gradient of the row's classes (zeros on an unselected row's), same window."""
    read_end = tl.where(row_end > 0, load_end, 0)  # an unselected row reads nothing, writes zeros
    for start in range(0, load_end, BLOCK_C):
        offsets = start + cols
        valid = (offsets >= lead) & (offsets < lead + row_end)
        x = tl.load(logits_row + offsets, mask=offsets < read_end, other=0.0).to(tl.float32)
        p = tl.load(target_row + offsets, mask=offsets < read_end, other=0.0).to(tl.float32)
        grad = tl.where(valid, (tl.exp(x - log_norm) * sum_p - p) * scale, 0.0)
        tl.store(grad_row + offsets, grad.to(grad_row.dtype.element_ty),
                 mask=(offsets >= lead) & (offsets < lead + n_classes))


@triton.jit
def region_kl_kernel(
    logits_ptr, target_ptr, selected_ptr, scale_ptr, loss_ptr, grad_ptr,
    n_rows, n_classes, stride_logits_row, stride_target_row, stride_grad_row, stride_scale, write_grad,
    BLOCK_C: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGN: tl.constexpr, CROSS_ENTROPY: tl.constexpr,
):
    # One program = one row: its loss (stored in loss_ptr's dtype; with CROSS_ENTROPY the soft
    # cross-entropy -sum p log softmax(x) instead of the KL) and, if write_grad, its gradient
    # row times scale (1 without HAS_SCALE). With ALIGN > 1 (logits, targets and gradient share one row
    # stride) every row but the last is read through a window that starts and ends ALIGN-aligned (the
    # neighbours' lanes are loaded, never used), so an odd class count (C = 1601) still gets vector
    # loads; the last row, whose window could end past the tensor, reads exactly its own classes.
    row = tl.program_id(0).to(tl.int64)
    selected = tl.load(selected_ptr + row) != 0
    row_end = tl.where(selected, n_classes, 0)  # unselected rows read nothing
    cols = tl.arange(0, BLOCK_C)
    lead = (row * stride_logits_row) % ALIGN
    logits_row = logits_ptr + tl.multiple_of(row * stride_logits_row - lead, ALIGN)
    target_row = target_ptr + tl.multiple_of(row * stride_target_row - lead, ALIGN)
    grad_row = grad_ptr + tl.multiple_of(row * stride_grad_row - lead, ALIGN)
    window_end = tl.multiple_of((lead + row_end + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    if row + 1 < n_rows:
        shift, row_max, sum_exp, sum_p, sum_p_x, sum_p_log_p = _row_sums(logits_row, target_row, cols, lead,
                                                                          window_end, row_end, BLOCK_C)
    else:
        shift, row_max, sum_exp, sum_p, sum_p_x, sum_p_log_p = _row_sums(logits_row, target_row, cols, lead,
                                                                          lead + row_end, row_end, BLOCK_C)
    log_norm = row_max + tl.log(tl.where(selected, sum_exp, 1.0))
    if CROSS_ENTROPY:
        loss = sum_p * (log_norm - shift) - sum_p_x
    else:
        loss = sum_p_log_p - sum_p_x + sum_p * (log_norm - shift)
    tl.store(loss_ptr + row, tl.where(selected, loss, 0.0).to(loss_ptr.dtype.element_ty))

    if write_grad != 0:
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32) if HAS_SCALE else 1.0
        full_end = tl.multiple_of((lead + n_classes + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
        if row + 1 < n_rows:
            _row_grad(logits_row, target_row, grad_row, cols, lead, full_end, row_end, n_classes, log_norm, sum_p,
                      scale, BLOCK_C)
        else:
            _row_grad(logits_row, target_row, grad_row, cols, lead, lead + n_classes, row_end, n_classes, log_norm,
                      sum_p, scale, BLOCK_C)


@triton.jit
def region_kl_reduce_kernel(row_loss_ptr, selected_ptr, loss_ptr, scale_ptr, n_rows, IS_MEAN: tl.constexpr,
                            BLOCK: tl.constexpr):
    # One program: loss = sum of the row losses (over the selected count for 'mean'; 0 when nothing is
    # selected), stored in loss_ptr's dtype, and the gradient factor 1 / max(count, 1) (1 for 'sum')
    # into scale_ptr; fixed summation order, so the result is bitwise repeatable.
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        ok = start + offsets < n_rows
        total += tl.load(row_loss_ptr + start + offsets, mask=ok, other=0.0)
        count += (tl.load(selected_ptr + start + offsets, mask=ok, other=0) != 0).to(tl.int32)
    loss = tl.sum(total, axis=0)
    scale = 1.0
    if IS_MEAN:
        scale = 1.0 / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    tl.store(loss_ptr, (loss * scale).to(loss_ptr.dtype.element_ty))
    tl.store(scale_ptr, scale)


BLOCK_SIZES = (1024, 2048, 4096)
MAX_BLOCK = BLOCK_SIZES[-1]


def block_size(n_classes: int) -> int:
    """The smallest listed block that holds the row, capped (longer rows loop over blocks)."""
    for block in BLOCK_SIZES:
        if n_classes <= block:
            return block
    return MAX_BLOCK


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


ALIGN = 8  # window alignment in elements: 16 bytes of fp16 / bf16, 32 of fp32
REDUCE_BLOCK = 1024
