"""Row-wise cross-entropy against a hard label with its gradient in one kernel (the MLM head's loss).

A first sweep over the row keeps a running max ``m`` and ``s = sum exp(x - m)``; the loss is
``m + log s - x[label]``. A second sweep writes ``(softmax(x) - onehot(label)) * scale``, which may
overwrite the logits in place. Rows whose label equals ``ignore_index`` read nothing and get a zero
gradient and loss.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvl.kernels.aot_spec import AotSpec
from fastvl.kernels.region_kl import BLOCK_SIZES, num_warps


@triton.jit
def cross_entropy_kernel(
    logits_ptr, label_ptr, scale_ptr, loss_ptr, grad_ptr,
    n_classes, ignore_index, stride_logits_row, stride_grad_row, stride_scale, write_grad,
    BLOCK_C: tl.constexpr,
):
    # One program = one row: its loss (fp32) and, if write_grad, its gradient row.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    label = tl.load(label_ptr + row)
    selected = label != ignore_index
    row_end = tl.where(selected, n_classes, 0)
    cols = tl.arange(0, BLOCK_C)

    row_max = tl.full((), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((), dtype=tl.float32)
    for start in range(0, row_end, BLOCK_C):
        offsets = start + cols
        x = tl.load(logits_row + offsets, mask=offsets < row_end, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max

    safe_label = tl.where(selected, label, 0)
    label_logit = tl.load(logits_row + safe_label, mask=selected, other=0.0).to(tl.float32)
    row_max = tl.where(selected, row_max, 0.0)
    log_sum_exp = tl.log(tl.where(selected, sum_exp, 1.0))
    loss = (row_max - label_logit) + log_sum_exp
    tl.store(loss_ptr + row, tl.where(selected, loss, 0.0))

    if write_grad != 0:
        log_norm = row_max + log_sum_exp
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        grad_row = grad_ptr + row * stride_grad_row
        for start in range(0, n_classes, BLOCK_C):
            offsets = start + cols
            in_row = offsets < n_classes
            valid = offsets < row_end
            x = tl.load(logits_row + offsets, mask=valid, other=0.0).to(tl.float32)
            grad = tl.exp(x - log_norm) - tl.where(offsets == safe_label, 1.0, 0.0)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _specs() -> list[AotSpec]:
    specs = []
    for dtype_name, pointer in (("fp32", "*fp32"), ("fp16", "*fp16"), ("bf16", "*bf16")):
        signature = {
            "logits_ptr": pointer, "label_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32", "grad_ptr": pointer,
            "n_classes": "i32", "ignore_index": "i64", "stride_logits_row": "i32", "stride_grad_row": "i32",
            "stride_scale": "i32", "write_grad": "i32", "BLOCK_C": "constexpr",
        }
        for block in BLOCK_SIZES:
            specs.append(AotSpec(name=f"cross_entropy_{dtype_name}_b{block}", kernel=cross_entropy_kernel,
                                 signature=signature, constexprs={"BLOCK_C": block}, num_warps=num_warps(block),
                                 num_stages=1))
    return specs


AOT_SPECS = _specs()
