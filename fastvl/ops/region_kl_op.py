"""``fastvl.ops.region_kl_loss`` and ``linear_region_kl_loss``: ViLBERT's masked-region KL loss.

Backends (auto order): ``triton`` (CUDA; CPU only when asked for, under ``TRITON_INTERPRET=1``),
``cuda`` (``fastvl._C.region_kl_rows_cuda``, csrc/region_kl_cuda.cu, built where torch has CUDA: a second
GPU implementation to hold Triton against), ``cpp`` (CPU, ``fastvl._C.region_kl_rows``), ``reference``
(the original formula). The fused backends
compute each masked row's loss and its gradient in one kernel (the gradient is written during the
forward, as Liger-Kernel does, and scaled by the upstream gradient in the backward), never materialise
``log_softmax``, read nothing of unmasked rows, and keep the masked count on the device.

``linear_region_kl_loss`` projects only the masked regions, chunk by chunk (see
``fastvl.ops.linear_loss_common``).
"""

from __future__ import annotations

import torch

from fastvl import _checks, _ext
from fastvl.dispatch import needs_cpu_device, needs_cuda_device, op, triton_available, triton_device
from fastvl.ops import eager_path, linear_loss_common
from fastvl.reference.region_kl import linear_region_kl_loss_ref, region_kl_loss_ref

REGION_KL = op("region_kl_loss", probe=dict(target_dtype=torch.float32, classes=1601))
LINEAR_REGION_KL = op("linear_region_kl_loss", probe=dict(target_dtype=torch.float32, classes=1601))
REDUCTIONS = ("mean", "sum", "none")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate_targets(logits_name: str, leading: torch.Size, classes: int, reference: torch.Tensor,
                      target_probs: torch.Tensor, region_mask: torch.Tensor, reduction: str) -> None:
    _checks.tensor("target_probs", target_probs, shape=f"[..., C] like {logits_name}")
    _checks.same_shape("target_probs", target_probs, [*leading, classes], f"[..., C] = {logits_name}'s shape")
    _checks.tensor("region_mask", region_mask, shape="[...] (bool, True = masked region)",
                   dtypes=(torch.bool, torch.uint8, torch.int32, torch.int64, *_checks.FLOAT_DTYPES))
    _checks.same_shape("region_mask", region_mask, list(leading), f"{logits_name}'s shape without the class dim")
    _checks.same_device(logits_name, reference, target_probs=target_probs, region_mask=region_mask)
    _checks.choice("reduction", reduction, REDUCTIONS)


def region_kl_loss(logits: torch.Tensor, target_probs: torch.Tensor, region_mask: torch.Tensor,
                   reduction: str = "mean", *, backend: str | None = None) -> torch.Tensor:
    """KL(target_probs || softmax(logits)) summed over classes, over masked regions.

    logits ``[..., C]`` (fp32/fp16/bf16; accumulation in fp32); target_probs ``[..., C]`` (the
    detector's class distribution, fp32 or logits' dtype; exact zeros allowed: 0 log 0 = 0);
    region_mask ``[...]`` bool, True = a masked region that is scored. reduction 'mean' (over masked
    regions; 0 with zero gradient when nothing is masked, where the original gives NaN), 'sum', or
    'none' (``[...]``, 0 on unmasked regions). The result has logits' dtype.
    ViLBERT scores positions 1.. (its IMG token at 0 is never masked): slicing is the caller's choice.

    target_probs rows must be distributions (entries >= 0 summing to 1). Their values are not checked
    here (a check would read them back, a host sync per call): a negative entry gives NaN on the
    reference backend (the log of a negative number, as in the original) and a finite but meaningless
    loss on the fused ones, and unnormalised rows are scored as given (KL of an unnormalised target).
    Check them where they are made (the data converter, ``fastvl data inspect``).
    """
    _checks.tensor("logits", logits, shape="[..., C]", ndim=range(1, 8))
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., C] with C >= 1 classes, got {list(logits.shape)}")
    _validate_targets("logits", logits.shape[:-1], logits.shape[-1], logits, target_probs, region_mask, reduction)
    region_mask = region_mask.bool()
    chosen = REGION_KL.select(backend, logits.device, dtype=logits.dtype, target_dtype=target_probs.dtype,
                              classes=logits.shape[-1])
    return chosen.impl(logits, target_probs, region_mask, reduction)


def linear_region_kl_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          target_probs: torch.Tensor, region_mask: torch.Tensor, reduction: str = "mean", *,
                          chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """``region_kl_loss(hidden @ weight.T + bias, target_probs, region_mask)`` without materialising
    the logits of unmasked regions (fused backends).

    hidden ``[..., K]``, weight ``[C, K]``, bias ``[C]`` or None (all one dtype), target_probs
    ``[..., C]``, region_mask ``[...]`` bool. Gradients flow to hidden, weight and bias. The fused
    backends project ``chunk_rows`` rows at a time (default: about 16M logits per chunk): on CPU only
    the masked rows (gathered), on CUDA every row (no host sync, fixed shapes; unmasked rows score 0).
    Under ZeRO-3 pass the gathered weight
    (call through the owning module, or inside ``GatheredParameters``). target_probs as in
    :func:`region_kl_loss` (distributions, not checked).
    """
    linear_loss_common.validate_projection(hidden, weight, bias, "C")
    _validate_targets("hidden", hidden.shape[:-1], weight.shape[0], hidden, target_probs, region_mask, reduction)
    linear_loss_common.validate_chunk_rows(chunk_rows)
    region_mask = region_mask.bool()
    chosen = LINEAR_REGION_KL.select(backend, hidden.device, dtype=hidden.dtype, target_dtype=target_probs.dtype,
                                     classes=weight.shape[0])
    return chosen.impl(hidden, weight, bias, target_probs, region_mask, reduction, chunk_rows)


# Row kernels: one loss per row + its scaled gradient, per backend ----------------------------------


def region_kl_rows(backend: str, logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                   scale: torch.Tensor, grad: torch.Tensor | None, cross_entropy: bool = False) -> torch.Tensor:
    """Per-row KL of ``logits`` ``[N, C]`` (unit class stride) against ``targets`` ``[N, C]`` on rows
    where ``selected`` (bool ``[N]``); writes ``(softmax * sum p - p) * scale`` into ``grad`` (``[N, C]``,
    may be ``logits``) unless None; ``scale`` fp32 ``[1]`` or ``[N]``. Returns fp32 ``[N]``. With
    ``cross_entropy`` (triton only) the rows' soft cross-entropy ``-sum p log softmax`` instead of the KL."""
    if cross_entropy and backend != "triton":
        raise ValueError(f"region_kl_rows: cross_entropy is a triton-only output, not {backend!r}'s")
    if backend == "cpp":
        return _ext.load().region_kl_rows(logits, targets, selected, scale, grad)
    if backend == "cuda":
        with torch.cuda.device(logits.device):
            stream = torch.cuda.current_stream(logits.device).cuda_stream
            return _ext.load().region_kl_rows_cuda(logits, targets, selected, scale, grad, stream)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _region_kl_triton_rows(logits, targets, selected, scale, grad, loss, cross_entropy)
    return loss


def _region_kl_triton_rows(logits, targets, selected, scale, grad, loss, cross_entropy=False):
    """Launches the Triton row kernel: ``loss`` (any float dtype, ``[N]``) gets each row's loss (KL, or
    the soft cross-entropy with ``cross_entropy``); ``scale`` None means 1. Aligned row windows (vector
    loads) when logits, targets and gradient share their row stride."""
    from fastvl.kernels.region_kl import ALIGN, block_size, num_warps, region_kl_kernel

    rows, classes = logits.shape
    grad_stride = grad.stride(0) if grad is not None else logits.stride(0)
    align = ALIGN if logits.stride(0) == targets.stride(0) == grad_stride else 1
    if rows:
        block = block_size(classes + align - 1)
        region_kl_kernel[(rows,)](
            logits, targets, selected.view(torch.uint8), scale, loss, grad if grad is not None else logits,
            rows, classes, logits.stride(0), targets.stride(0), grad_stride,
            0 if scale is None or scale.numel() == 1 else 1, int(grad is not None),
            BLOCK_C=block, HAS_SCALE=scale is not None, ALIGN=align, CROSS_ENTROPY=cross_entropy,
            num_warps=num_warps(block))


def _region_kl_triton(logits, targets, selected, reduction, grad, shape, dtype):
    """The whole op in two launches: the row kernel (unscaled gradient) and, for 'mean' / 'sum', the
    one-program reduction (loss and the gradient factor, count kept on the device). Returns (loss,
    gradient factor fp32 [1], or an empty tensor for 'none')."""
    from fastvl.kernels.region_kl import REDUCE_BLOCK, region_kl_reduce_kernel

    if reduction == "none":
        loss = torch.empty(shape, dtype=dtype, device=logits.device)
        _region_kl_triton_rows(logits, targets, selected, None, grad, loss.view(-1))
        return loss, logits.new_empty(0, dtype=torch.float32)
    row_loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _region_kl_triton_rows(logits, targets, selected, None, grad, row_loss)
    loss = torch.empty((), dtype=dtype, device=logits.device)
    factor = torch.empty(1, dtype=torch.float32, device=logits.device)
    region_kl_reduce_kernel[(1,)](row_loss, selected.view(torch.uint8), loss, factor, row_loss.shape[0],
                                  IS_MEAN=reduction == "mean", BLOCK=REDUCE_BLOCK, num_warps=4)
    return loss, factor


def _rows_2d(t: torch.Tensor, classes: int) -> torch.Tensor:
    t = t.reshape(-1, classes)
    return t if t.stride(-1) == 1 else t.contiguous()


def reduce_rows(row_loss: torch.Tensor, scale: torch.Tensor, reduction: str, shape, dtype) -> torch.Tensor:
    """Per-row fp32 losses (0 on unselected rows) -> the requested reduction, in ``dtype``; ``scale``:
    :func:`~fastvl.ops.linear_loss_common.mean_scale`'s 1 / count for 'mean'."""
    if reduction == "none":
        return row_loss.reshape(shape).to(dtype)
    total = row_loss.sum()
    if reduction == "mean":
        total = (total * scale).reshape(())
    return total.to(dtype)


def _region_kl_compute(logits: torch.Tensor, targets: torch.Tensor, region_mask: torch.Tensor, reduction: str,
                       backend: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d logits for an upstream gradient of 1 -- or empty without ``with_grad`` --,
    the factor the backward still applies to that gradient: fp32 [1], or empty when it is applied)."""
    classes = logits.shape[-1]
    logits2d, targets2d = _rows_2d(logits, classes), _rows_2d(targets, classes)
    selected = region_mask.reshape(-1).contiguous()
    grad = torch.empty_like(logits2d) if with_grad else None
    if backend == "triton":
        loss, factor = _region_kl_triton(logits2d, targets2d, selected, reduction, grad, region_mask.shape,
                                         logits.dtype)
    else:
        scale = linear_loss_common.mean_scale(selected.sum() if reduction == "mean" else selected, reduction)
        row_loss = region_kl_rows(backend, logits2d, targets2d, selected, scale, grad)
        loss = reduce_rows(row_loss, scale, reduction, region_mask.shape, logits.dtype)
        factor = logits.new_empty(0, dtype=torch.float32)
    return loss, grad.view(logits.shape) if grad is not None else logits.new_empty(0), factor


@torch.library.custom_op("fastvl::region_kl_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _region_kl_fwd(logits: torch.Tensor, targets: torch.Tensor, region_mask: torch.Tensor, reduction: str,
                   backend: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _region_kl_compute(logits, targets, region_mask, reduction, backend, with_grad)


@_region_kl_fwd.register_fake
def _(logits, targets, region_mask, reduction, backend, with_grad):
    loss_shape = region_mask.shape if reduction == "none" else ()
    factor = logits.new_empty(1 if backend == "triton" and reduction != "none" else 0, dtype=torch.float32)
    return (logits.new_empty(loss_shape), torch.empty_like(logits) if with_grad else logits.new_empty(0), factor)


def _region_kl_setup(ctx, inputs, output):
    ctx.reduction = inputs[3]
    ctx.consumed = False
    ctx.save_for_backward(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled [N, C] gradient for the gradient output


def _region_kl_backward(ctx, grad_loss, _grad_of_grad, _grad_of_factor):
    # The gradient was written in the forward for an upstream gradient of 1: scale it in place (as
    # Liger-Kernel does, no second [N, C] buffer), which allows one backward per forward.
    if ctx.consumed:
        raise RuntimeError("fastvl fused region_kl_loss supports one backward per forward (no retain_graph reuse)")
    ctx.consumed = True
    grad, factor = ctx.saved_tensors
    upstream = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
    if factor.numel():
        upstream = upstream * factor
    return grad.mul_(upstream.to(grad.dtype)), None, None, None, None, None


_region_kl_fwd.register_autograd(_region_kl_backward, setup_context=_region_kl_setup)
_EagerRegionKl = eager_path.eager_function("_EagerRegionKl", _region_kl_compute, _region_kl_setup,
                                           _region_kl_backward, outputs=3)


def _fused_region_kl(backend: str):
    def impl(logits, target_probs, region_mask, reduction):
        with_grad = torch.is_grad_enabled() and logits.requires_grad
        return eager_path.call(_region_kl_fwd, _EagerRegionKl, logits, target_probs, region_mask, reduction, backend,
                               with_grad)

    return impl


def _fused_linear_region_kl(backend: str):
    def impl(hidden, weight, bias, target_probs, region_mask, reduction, chunk_rows):
        return linear_loss_common.apply("kl", backend, hidden, weight, bias, target_probs, region_mask, reduction,
                                        chunk_rows)

    return impl


def _projected_rows(backend, logits, targets, selected, scale, grad):
    if selected is None:  # gathered rows: every one is scored
        selected = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return region_kl_rows(backend, logits, targets, selected, scale, grad)


linear_loss_common.ROW_LOSSES["kl"] = _projected_rows


def _supports_fused(dtype: torch.dtype, target_dtype: torch.dtype, **_features) -> list[str]:
    reasons = []
    if dtype not in FUSED_DTYPES:
        reasons.append(f"dtype {dtype} (fused kernels take float32, float16, bfloat16)")
    if target_dtype not in (torch.float32, dtype):
        reasons.append(f"target_probs dtype {target_dtype} (must be float32 or the logits' dtype)")
    return reasons


def _triton_supports(device: torch.device, **features) -> list[str]:
    return triton_device(device) + _supports_fused(**features)


def _cpp_supports(device: torch.device, **features) -> list[str]:
    return needs_cpu_device(device) + _supports_fused(**features)


def _cuda_supports(device: torch.device, **features) -> list[str]:
    return needs_cuda_device(device) + _supports_fused(**features)


for _op, _make in ((REGION_KL, _fused_region_kl), (LINEAR_REGION_KL, _fused_linear_region_kl)):
    _op.register("triton", available=triton_available, supports=_triton_supports, auto_devices=("cuda",))(
        _make("triton"))
    _op.register("cuda", available=_ext.needs("region_kl_rows_cuda"), supports=_cuda_supports,
                 auto_devices=("cuda",))(_make("cuda"))
    _op.register("cpp", available=_ext.needs("region_kl_rows"), supports=_cpp_supports,
                 auto_devices=("cpu",))(_make("cpp"))

REGION_KL.register("reference")(region_kl_loss_ref)


@LINEAR_REGION_KL.register("reference")
def _linear_region_kl_reference(hidden, weight, bias, target_probs, region_mask, reduction, chunk_rows):
    return linear_region_kl_loss_ref(hidden, weight, bias, target_probs, region_mask, reduction)
