"""``fastvl.ops.linear_cross_entropy``: the MLM head (projection to the vocabulary + cross-entropy).

Backends (auto order): ``triton`` (CUDA; CPU only when asked for, under ``TRITON_INTERPRET=1``), ``cpp``
(CPU, ``fastvl._C.cross_entropy_rows``), ``reference`` (projects every position, as the original). The
fused backends project only the positions whose label is not ignored, chunk by chunk, and turn each
chunk's logits into their gradient in place while computing the loss (``fastvl.ops.linear_loss_common``).
"""

from __future__ import annotations

import torch

from fastvl import _checks, _ext
from fastvl.dispatch import needs_cpu_device, op, triton_available, triton_device
from fastvl.ops import linear_loss_common
from fastvl.ops.region_kl_op import FUSED_DTYPES, REDUCTIONS
from fastvl.reference.cross_entropy import linear_cross_entropy_ref

LINEAR_CROSS_ENTROPY = op("linear_cross_entropy", probe=dict(classes=30522))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int = -1, reduction: str = "mean", *,
                         chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    hidden ``[..., K]``; weight ``[V, K]`` (tied to the word embeddings in BERT); bias ``[V]`` or None
    (all one dtype: fp32/fp16/bf16 fused, accumulation in fp32); labels int64 ``[...]`` in ``[0, V)`` or
    ``ignore_index`` (default -1, ViLBERT's; HF uses -100). reduction 'mean' over non-ignored positions
    (0 with zero gradient when all are ignored), 'sum', or 'none'. The fused backends project
    ``chunk_rows`` rows at a time (default: about 16M logits per chunk): on CPU only the non-ignored
    positions, on CUDA every position (no host sync, fixed shapes; ignored ones score 0). Labels are
    range-checked: on the host for CPU tensors (a ValueError),
    on the device for CUDA ones (no sync: out-of-range labels are left out and make the loss NaN). Under
    ZeRO-3 pass the gathered weight (call through the owning module).
    """
    linear_loss_common.validate_projection(hidden, weight, bias, "V")
    _checks.tensor("labels", labels, shape="[...] int64", dtypes=(torch.int64, torch.int32))
    _checks.same_shape("labels", labels, list(hidden.shape[:-1]), "hidden's shape without the last dim")
    _checks.same_device("hidden", hidden, labels=labels)
    _checks.choice("reduction", reduction, REDUCTIONS)
    linear_loss_common.validate_chunk_rows(chunk_rows)
    labels, out_of_range = _checked_labels(labels, weight.shape[0], ignore_index)
    chosen = LINEAR_CROSS_ENTROPY.select(backend, hidden.device, dtype=hidden.dtype, classes=weight.shape[0])
    loss = chosen.impl(hidden, weight, bias, labels.long(), ignore_index, reduction, chunk_rows)
    if out_of_range is None:
        return loss
    return torch.where(out_of_range if reduction == "none" else out_of_range.any(), torch.nan, loss)


def _checked_labels(labels: torch.Tensor, vocab: int, ignore_index: int):
    """(labels, None) after a host check of their range where reading them costs no sync (CPU); else
    (labels with the out-of-range ones ignored, bool mask of those) so the loss turns NaN on the device."""
    if labels.numel() == 0:
        return labels, None
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if not _checks.may_read_values(labels):
        return torch.where(bad, ignore_index, labels), bad
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"labels must be in [0, V) = [0, {vocab}) or ignore_index = {ignore_index}, found {value}")
    return labels, None


def cross_entropy_rows(backend: str, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                       scale: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` ``[N, C]`` (unit class stride) against int64 ``labels``
    ``[N]``, rows labelled ``ignore_index`` give 0; writes ``(softmax - onehot) * scale`` into ``grad``
    (``[N, C]``, may be ``logits``) unless None; ``scale`` fp32 ``[1]`` or ``[N]``. Returns fp32 ``[N]``."""
    if backend == "cpp":
        return _ext.load().cross_entropy_rows(logits, labels, ignore_index, scale, grad)
    from fastvl.kernels.cross_entropy import cross_entropy_kernel
    from fastvl.kernels.region_kl import block_size, num_warps

    rows, classes = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = block_size(classes)
        cross_entropy_kernel[(rows,)](
            logits, labels, scale, loss, grad if grad is not None else logits, classes, ignore_index,
            logits.stride(0), grad.stride(0) if grad is not None else 0, 0 if scale.numel() == 1 else 1,
            int(grad is not None), BLOCK_C=block, num_warps=num_warps(block))
    return loss


def _projected_rows(backend, logits, labels, _selected, scale, grad):
    # The labels of unselected rows are -1 (see _fused), which cannot collide with a label in [0, V).
    return cross_entropy_rows(backend, logits, labels.contiguous(), -1, scale, grad)


linear_loss_common.ROW_LOSSES["ce"] = _projected_rows


def _fused(backend: str):
    def impl(hidden, weight, bias, labels, ignore_index, reduction, chunk_rows):
        selected = labels != ignore_index
        if ignore_index != -1:  # the row kernel ignores -1 (ViLBERT's ignore_index: no remapping launch)
            labels = torch.where(selected, labels, -1)
        return linear_loss_common.apply("ce", backend, hidden, weight, bias, labels, selected, reduction,
                                        chunk_rows)

    return impl


def _supports_fused(dtype: torch.dtype, **_features) -> list[str]:
    return [] if dtype in FUSED_DTYPES else [f"dtype {dtype} (fused kernels take float32, float16, bfloat16)"]


LINEAR_CROSS_ENTROPY.register(
    "triton", available=triton_available, auto_devices=("cuda",),
    supports=lambda device, **f: triton_device(device) + _supports_fused(**f))(_fused("triton"))
LINEAR_CROSS_ENTROPY.register(
    "cpp", available=_ext.needs("cross_entropy_rows"), auto_devices=("cpu",),
    supports=lambda device, **f: needs_cpu_device(device) + _supports_fused(**f))(_fused("cpp"))


@LINEAR_CROSS_ENTROPY.register("reference")
def _reference(hidden, weight, bias, labels, ignore_index, reduction, chunk_rows):
    return linear_cross_entropy_ref(hidden, weight, bias, labels, ignore_index, reduction)
