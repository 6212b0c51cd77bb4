"""Row-wise KL(p || softmax(x)) with its gradient in one kernel (ViLBERT's masked-region loss).

Never materialises ``log_softmax``: a first sweep over the row keeps a running max ``m`` and
``s = sum exp(x - m)`` together with ``sum p``, ``sum p (x - c)`` and ``sum p log p``; the loss follows from
``log softmax(x) = x - m - log s``. A second sweep writes the gradient
``(softmax(x) * sum p - p) * scale`` (the loss's gradient, scaled by the caller's per-row factor), which may
overwrite the logits in place. Rows with ``selected == 0`` only get a zero gradient written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvl.kernels.aot_spec import AotSpec


@triton.jit
def region_kl_kernel(
    logits_ptr, target_ptr, selected_ptr, scale_ptr, loss_ptr, grad_ptr,
    n_classes, stride_logits_row, stride_target_row, stride_grad_row, stride_scale, write_grad,
    BLOCK_C: tl.constexpr,
):
    # One program = one row: its loss (fp32) and, if write_grad, its gradient row.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    target_row = target_ptr + row * stride_target_row
    selected = tl.load(selected_ptr + row) != 0
    # Unselected rows read nothing: their loop bound is 0.
    row_end = tl.where(selected, n_classes, 0)
    cols = tl.arange(0, BLOCK_C)

    # Shift for sum p (x - c): the first block's max, close to the row max, keeps |x - c| small so that
    # the loss does not cancel catastrophically for logits of size ~1e4.
    first = tl.load(logits_row + cols, mask=(cols < row_end), other=float("-inf")).to(tl.float32)
    shift = tl.max(first, axis=0)
    shift = tl.where(selected, shift, 0.0)
    row_max = shift
    sum_exp = tl.zeros((), dtype=tl.float32)
    sum_p = tl.zeros((), dtype=tl.float32)
    sum_p_x = tl.zeros((), dtype=tl.float32)
    sum_p_log_p = tl.zeros((), dtype=tl.float32)
    for start in range(0, row_end, BLOCK_C):
        offsets = start + cols
        valid = offsets < row_end
        x = tl.load(logits_row + offsets, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.load(target_row + offsets, mask=valid, other=0.0).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
        sum_p += tl.sum(p, axis=0)
        sum_p_x += tl.sum(p * (tl.where(valid, x, shift) - shift), axis=0)
        sum_p_log_p += tl.sum(tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0), axis=0)

    log_norm = row_max + tl.log(tl.where(selected, sum_exp, 1.0))
    loss = sum_p_log_p - sum_p_x + sum_p * (log_norm - shift)
    tl.store(loss_ptr + row, tl.where(selected, loss, 0.0))

    if write_grad != 0:
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        grad_row = grad_ptr + row * stride_grad_row
        for start in range(0, n_classes, BLOCK_C):
            offsets = start + cols
            in_row = offsets < n_classes
            valid = offsets < row_end
            x = tl.load(logits_row + offsets, mask=valid, other=0.0).to(tl.float32)
            p = tl.load(target_row + offsets, mask=valid, other=0.0).to(tl.float32)
            grad = (tl.exp(x - log_norm) * sum_p - p) * scale
            grad = tl.where(valid, grad, 0.0)
            tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


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


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _specs() -> list[AotSpec]:
    specs = []
    for logits_name, logits_type in _DTYPES.items():
        for target_name in sorted({"fp32", logits_name}):
            for block in BLOCK_SIZES:
                signature = {
                    "logits_ptr": logits_type, "target_ptr": _DTYPES[target_name], "selected_ptr": "*u8",
                    "scale_ptr": "*fp32", "loss_ptr": "*fp32", "grad_ptr": logits_type,
                    "n_classes": "i32", "stride_logits_row": "i32", "stride_target_row": "i32",
                    "stride_grad_row": "i32", "stride_scale": "i32", "write_grad": "i32", "BLOCK_C": "constexpr",
                }
                specs.append(AotSpec(name=f"region_kl_{logits_name}_t{target_name}_b{block}", kernel=region_kl_kernel,
                                     signature=signature, constexprs={"BLOCK_C": block}, num_warps=num_warps(block),
                                     num_stages=1))
    return specs


AOT_SPECS = _specs()
