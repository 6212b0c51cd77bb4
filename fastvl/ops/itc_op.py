"""``fastvl.ops.itc_loss``, ``itc_queue_update_`` and ``itm_hard_negatives``: ALBEF's image-text
contrastive loss with momentum distillation, its queue, and its ITM hard-negative sampler.

Backends (auto order): ``triton`` (CUDA; CPU only when asked for, under ``TRITON_INTERPRET=1``), ``cpp``
(CPU, only when asked for: a tenth of the reference's memory, but not faster in the committed CPU benchmark),
``reference`` (ALBEF's formulas). The fused backends are one custom op computing both directions'
soft cross-entropy and their gradients in the forward: per direction the similarity GEMMs run in torch
(the op is GEMM-bound on GPU), the distillation targets are built in place, and the region-KL row kernel
turns each similarity row into its soft cross-entropy and gradient (written over the similarities), so
only two ``[B, B + Q]`` buffers live at once (three on cpp, whose kernel returns the KL: plus xlogy's).
"""

from __future__ import annotations

import numbers

import torch

from fastvl import _checks, _ext
from fastvl.dispatch import needs_cpu_device, op, triton_available, triton_device
from fastvl.ops import eager_path
from fastvl.ops.region_kl_op import FUSED_DTYPES, region_kl_rows
from fastvl.reference.itc import itc_loss_ref, itc_queue_update_ref, itm_hard_negatives_ref

ITC = op("itc_loss", probe=dict(queue=65536))


def itc_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor, txt_queue: torch.Tensor,
             temp: torch.Tensor | float, alpha: float, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor, *,
             backend: str | None = None) -> torch.Tensor:
    """ALBEF's ITC loss with momentum distillation (see :func:`fastvl.reference.itc_loss_ref`).

    img_feat, txt_feat, img_feat_m, txt_feat_m ``[B, E]`` (L2-normalised); img_queue, txt_queue
    ``[E, Q]`` (ALBEF's layout); temp > 0 (float or a scalar tensor with grad); alpha in [0, 1]. All
    one dtype (outside autocast, which casts the similarity matmuls' operands itself); B >= 1.
    """
    _checks.tensor("img_feat", img_feat, shape="[B, E]", ndim=2)
    batch, embed = img_feat.shape
    for name, t in (("txt_feat", txt_feat), ("img_feat_m", img_feat_m), ("txt_feat_m", txt_feat_m)):
        _checks.tensor(name, t, shape="[B, E]", ndim=2)
        _checks.same_shape(name, t, [batch, embed], "[B, E] equal to img_feat")
    for name, t in (("img_queue", img_queue), ("txt_queue", txt_queue)):
        _checks.tensor(name, t, shape="[E, Q]", ndim=2)
        _checks.same_shape(name, t, [embed, None], "[E, Q] with E = img_feat.shape[1]")
    if img_queue.shape != txt_queue.shape:
        raise ValueError(f"img_queue and txt_queue must have the same shape [E, Q], got {list(img_queue.shape)} "
                         f"and {list(txt_queue.shape)}")
    _checks.same_device("img_feat", img_feat, txt_feat=txt_feat, img_queue=img_queue, txt_queue=txt_queue,
                        img_feat_m=img_feat_m, txt_feat_m=txt_feat_m)
    if not torch.is_autocast_enabled(img_feat.device.type):  # autocast casts the matmuls' operands itself
        _checks.same_dtype("img_feat", img_feat, txt_feat=txt_feat, img_feat_m=img_feat_m, txt_feat_m=txt_feat_m)
        for name, queue in (("img_queue", img_queue), ("txt_queue", txt_queue)):
            # a 16-bit model keeps its queues in float32 (ALBEF under DeepSpeed bf16/fp16): read in img_feat's dtype
            if queue.dtype not in (img_feat.dtype, torch.float32):
                raise TypeError(f"{name} has dtype {queue.dtype} but img_feat has {img_feat.dtype}; a queue must be "
                                f"{img_feat.dtype} or torch.float32")
    if batch == 0:
        raise ValueError("itc_loss needs a batch B >= 1 (a contrastive loss over no pairs is undefined), got "
                         f"img_feat of shape {list(img_feat.shape)}")
    if not isinstance(temp, torch.Tensor) and (isinstance(temp, bool) or not isinstance(temp, numbers.Real)):
        raise TypeError(f"temp must be a float > 0 or a one-element tensor, got {type(temp).__name__} {temp!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float in [0, 1], got {type(alpha).__name__} {alpha!r}")
    if isinstance(temp, torch.Tensor):
        if temp.numel() != 1:
            raise ValueError(f"temp must be a float or a one-element tensor, got shape {list(temp.shape)}")
        # A CUDA temp is not read back: that would be a host sync every step.
        if _checks.may_read_values(temp) and not bool(temp.detach() > 0):
            raise ValueError(f"temp must be > 0, got {float(temp)!r}")
    elif not temp > 0:
        raise ValueError(f"temp must be > 0, got {temp!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    chosen = ITC.select(backend, img_feat.device, dtype=img_feat.dtype, queue=img_queue.shape[1])
    return chosen.impl(img_feat, txt_feat, img_queue, txt_queue, temp, alpha, img_feat_m, txt_feat_m)


def itc_queue_update_(img_queue: torch.Tensor, txt_queue: torch.Tensor, queue_ptr: torch.Tensor,
                      img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor) -> None:
    """Enqueues the momentum features as queue columns ``[ptr, ptr + B)`` and advances ``queue_ptr``
    (int64 ``[1]`` on the queues' device), in place, without a host sync. Q must be a multiple of B
    (ALBEF's rule). With data parallelism, pass the all-gathered features."""
    _checks.tensor("queue_ptr", queue_ptr, shape="[1] int64", ndim=1, dtypes=(torch.int64,))
    if img_queue.shape[1] % img_feat_m.shape[0]:
        raise ValueError(f"queue size Q = {img_queue.shape[1]} must be a multiple of the batch "
                         f"B = {img_feat_m.shape[0]} (ALBEF's rule)")
    itc_queue_update_ref(img_queue, txt_queue, queue_ptr, img_feat_m, txt_feat_m)


def itm_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's ITM hard negatives: indices ``(neg_txt_for_img [B], neg_img_for_txt [B])`` drawn in
    proportion to the in-batch contrastive similarity, the positive pair excluded. Needs B >= 2."""
    _checks.tensor("sim_i2t", sim_i2t, shape="[B, >= B]", ndim=2)
    _checks.tensor("sim_t2i", sim_t2i, shape="[B, >= B]", ndim=2)
    if sim_i2t.shape[0] < 2 or sim_i2t.shape[1] < sim_i2t.shape[0] or sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_i2t and sim_t2i must both be [B, >= B] with B >= 2, got {list(sim_i2t.shape)} "
                         f"and {list(sim_t2i.shape)}")
    return itm_hard_negatives_ref(sim_i2t, sim_t2i, generator)


# Fused backends --------------------------------------------------------------------------------------


_ALL_ROWS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _all_rows(rows: int, device: torch.device) -> torch.Tensor:
    """The row kernel's ``selected`` mask when every row is scored (read-only, made once per shape; one
    made while a CUDA graph is captured belongs to that graph and is not kept)."""
    mask = _ALL_ROWS.get((rows, device))
    if mask is None:
        mask = torch.ones(rows, dtype=torch.bool, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _ALL_ROWS[(rows, device)] = mask
    return mask


def _itc_compute(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor, txt_queue: torch.Tensor,
                 temp: torch.Tensor, alpha: float, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor, backend: str,
                 with_grad: bool, temp_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d/d img_feat, d/d txt_feat, d/d temp) for an upstream gradient of 1 (grads empty without
    ``with_grad``; temp's without ``temp_grad``: a float temperature). Runs without autograd (the custom
    op's and the eager Function's forward). At the small shapes of VL pretraining each op here costs more
    host time than device time: as few as possible."""
    batch = img_feat.shape[0]
    inv_temp = temp.float().reciprocal()
    # the kernel scales each row's gradient by 1 / temp (d sim / d (feat @ other^T)) and the mean's 1 / 2B,
    # so the feature gradients come straight out of their GEMMs
    grad_scale = (inv_temp * (0.5 / batch)).reshape(1)
    every_row = _all_rows(batch, img_feat.device)
    losses, grads = [], []  # the soft cross-entropies' sums (or their KL and entropy terms), feature grads
    in_batch_m = img_feat_m @ txt_feat_m.t()  # the momentum in-batch similarities (text-to-image: transposed)
    for feat, feat_m, sim_m, other_m, other_queue in ((img_feat, img_feat_m, in_batch_m, txt_feat_m, txt_queue),
                                                      (txt_feat, txt_feat_m, in_batch_m.t(), img_feat_m, img_queue)):
        if other_queue.dtype != feat.dtype:  # a 16-bit model's float32 queue
            other_queue = other_queue.to(feat.dtype)
        # Similarities against [batch momentum features | queue] as two GEMMs, so the [E, B + Q] bank is
        # never concatenated (ALBEF's cat copies both queues every step). Distillation targets
        # alpha * softmax(sim_m) + (1 - alpha) * onehot(diagonal), built in place.
        targets = torch.cat([sim_m, feat_m @ other_queue], 1)
        targets = (targets if targets.dtype == torch.float32 else targets.float()).mul_(inv_temp).softmax(1).mul_(alpha)
        targets.diagonal().add_(1.0 - alpha)
        sim = torch.cat([feat @ other_m.t(), feat @ other_queue], 1).mul_(inv_temp)
        # the gradient overwrites the similarities: two [B, B + Q] buffers (and, on cpp, xlogy's temporary)
        rows = region_kl_rows(backend, sim, targets, every_row, grad_scale, sim if with_grad else None,
                              cross_entropy=backend == "triton")
        losses.append(rows.sum())
        if backend != "triton":  # soft cross-entropy = KL(t || softmax) - sum t log t
            losses.append(-torch.xlogy(targets, targets).sum())
        del targets
        if with_grad:
            grad_feat = sim[:, :batch] @ other_m
            grads.append(grad_feat.addmm_(sim[:, batch:], other_queue.t()))
        del sim
    loss = sum(losses[1:], losses[0]).mul_(0.5 / batch)
    if loss.dtype != img_feat.dtype:
        loss = loss.to(img_feat.dtype)
    if not with_grad:
        return loss, *(img_feat.new_empty(0) for _ in range(3))
    if not temp_grad:
        return loss, grads[0], grads[1], temp.new_empty(0)
    # d loss / d temp = -sum(dL/dsim * sim) / temp = -<feat, d loss / d feat> / temp over both directions
    # (sim = feat @ other^T / temp), a [B, E] dot instead of a [B, B + Q] one
    pairs = ((img_feat, grads[0]), (txt_feat, grads[1]))
    if img_feat.dtype != torch.float32 or grads[0].dtype != torch.float32:  # 16-bit: the dot in float32
        pairs = tuple((feat.float(), grad.float()) for feat, grad in pairs)
    (img, grad_img), (txt, grad_txt) = pairs
    grad_temp = torch.dot(img.reshape(-1), grad_img.reshape(-1)).add_(torch.dot(txt.reshape(-1), grad_txt.reshape(-1)))
    grad_temp = grad_temp.mul_(inv_temp).neg_()
    return loss, grads[0], grads[1], grad_temp.to(temp.dtype).reshape(temp.shape)


@torch.library.custom_op("fastvl::itc_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _itc_fwd(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor, txt_queue: torch.Tensor,
             temp: torch.Tensor, alpha: float, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor, backend: str,
             with_grad: bool, temp_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _itc_compute(img_feat, txt_feat, img_queue, txt_queue, temp, alpha, img_feat_m, txt_feat_m, backend,
                        with_grad, temp_grad)


@_itc_fwd.register_fake
def _(img_feat, txt_feat, img_queue, txt_queue, temp, alpha, img_feat_m, txt_feat_m, backend, with_grad, temp_grad):
    if not with_grad:
        return img_feat.new_empty(()), img_feat.new_empty(0), img_feat.new_empty(0), img_feat.new_empty(0)
    return (img_feat.new_empty(()), torch.empty_like(img_feat), torch.empty_like(txt_feat),
            torch.empty_like(temp) if temp_grad else temp.new_empty(0))


def _itc_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no zero-filled buffers


def _itc_backward(ctx, grad_loss, *_grads_of_grads):
    needed = ctx.needs_input_grad
    grad_img, grad_txt, grad_temp = (g * grad_loss.to(g.dtype) if needed[i] else None
                                     for i, g in zip((0, 1, 4), ctx.saved_tensors))
    return grad_img, grad_txt, None, None, grad_temp, None, None, None, None, None, None


_itc_fwd.register_autograd(_itc_backward, setup_context=_itc_setup)
_EagerItc = eager_path.eager_function("_EagerItc", _itc_compute, _itc_setup, _itc_backward, outputs=4)


def _fused(backend: str):
    def impl(img_feat, txt_feat, img_queue, txt_queue, temp, alpha, img_feat_m, txt_feat_m):
        if not isinstance(temp, torch.Tensor):
            temp = torch.tensor(float(temp), dtype=torch.float32, device=img_feat.device)
        grad_enabled = torch.is_grad_enabled()
        temp_grad = grad_enabled and temp.requires_grad
        with_grad = temp_grad or grad_enabled and (img_feat.requires_grad or txt_feat.requires_grad)
        return eager_path.call(_itc_fwd, _EagerItc, img_feat, txt_feat, img_queue, txt_queue, temp.reshape(()),
                               float(alpha), img_feat_m.detach(), txt_feat_m.detach(), backend, with_grad, temp_grad)

    return impl


def _fused_supports(device_check):
    """The row kernel's limits (the one ITC runs on its similarity rows), without faking a target dtype."""

    def supports(device, dtype, **_features) -> list[str]:
        reasons = device_check(device)
        if dtype not in FUSED_DTYPES:
            reasons.append(f"dtype {dtype} (fused kernels take float32, float16, bfloat16)")
        return reasons

    return supports


ITC.register("triton", available=triton_available, supports=_fused_supports(triton_device), auto_devices=("cuda",))(
    _fused("triton"))
ITC.register("cpp", available=_ext.needs("region_kl_rows"), supports=_fused_supports(needs_cpu_device),
             auto_devices=())(_fused("cpp"))
ITC.register("reference")(itc_loss_ref)
