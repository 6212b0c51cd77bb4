"""Reference image-text contrastive loss with momentum distillation, queue update and ITM hard-negative
sampling, as ALBEF defines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss_ref(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor, txt_queue: torch.Tensor,
                 temp: torch.Tensor | float, alpha: float, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor,
                 return_sims: bool = False):
    """ALBEF's ITC loss.

    img_feat / txt_feat ``[B, E]``: L2-normalised projections of the [CLS] tokens (with grad);
    img_feat_m / txt_feat_m ``[B, E]``: the momentum encoders' normalised features (no grad);
    img_queue / txt_queue ``[E, Q]``: the momentum queues (ALBEF's layout, columns are entries);
    temp: temperature (a tensor may carry grad); alpha: distillation weight in [0, 1].
    Targets are ``alpha * softmax(momentum similarities) + (1 - alpha) * one-hot(diagonal)``; the loss
    is the mean of the image-to-text and text-to-image soft cross-entropies. With ``return_sims`` also
    returns ``(sim_i2t, sim_t2i)`` ``[B, B + Q]`` for ITM hard-negative sampling.
    """
    with torch.no_grad():  # a 16-bit model's float32 queues are read in the features' dtype
        img_feat_all = torch.cat([img_feat_m.t(), img_queue.detach().to(img_feat_m.dtype)], dim=1)
        txt_feat_all = torch.cat([txt_feat_m.t(), txt_queue.detach().to(txt_feat_m.dtype)], dim=1)
        sim_i2t_m = img_feat_m @ txt_feat_all / temp
        sim_t2i_m = txt_feat_m @ img_feat_all / temp
        sim_targets = torch.zeros_like(sim_i2t_m)
        sim_targets.fill_diagonal_(1)
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = img_feat @ txt_feat_all / temp
    sim_t2i = txt_feat @ img_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    return (loss, sim_i2t, sim_t2i) if return_sims else loss


@torch.no_grad()
def itc_queue_update_ref(img_queue: torch.Tensor, txt_queue: torch.Tensor, queue_ptr: torch.Tensor,
                         img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor) -> None:
    """ALBEF's ``_dequeue_and_enqueue`` on one process: writes the batch's momentum features as the
    queue columns ``[ptr, ptr + B)`` (modulo Q) and advances ``queue_ptr`` (int64 ``[1]``) in place,
    with no host sync. ALBEF requires Q to be a multiple of the (global) batch size."""
    batch, queue_size = img_feat_m.shape[0], img_queue.shape[1]
    columns = (queue_ptr + torch.arange(batch, device=queue_ptr.device)) % queue_size
    img_queue.index_copy_(1, columns, img_feat_m.t().to(img_queue.dtype))
    txt_queue.index_copy_(1, columns, txt_feat_m.t().to(txt_queue.dtype))
    queue_ptr.copy_((queue_ptr + batch) % queue_size)


@torch.no_grad()
def itm_hard_negatives_ref(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's hard negatives: for each image a text, for each text an image, drawn in proportion to
    ``softmax(in-batch similarity) + 1e-4`` with the diagonal (the positive pair) excluded. A row with
    a non-finite similarity (an overflowed fp16 step, which the loss scaler then skips) draws uniformly.

    sim_i2t / sim_t2i ``[B, >= B]`` (only the first B columns, the batch, are used).
    Returns ``(neg_txt_for_img [B], neg_img_for_txt [B])`` int64 indices into the batch.
    """
    batch = sim_i2t.shape[0]
    weights_i2t = F.softmax(sim_i2t[:, :batch].float(), dim=1).nan_to_num(0.0) + 1e-4
    weights_t2i = F.softmax(sim_t2i[:, :batch].float(), dim=1).nan_to_num(0.0) + 1e-4
    weights_i2t.fill_diagonal_(0)
    weights_t2i.fill_diagonal_(0)
    neg_txt = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_img = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_txt, neg_img
