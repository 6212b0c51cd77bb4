"""``fastvl.ops.itc_loss``, ``itc_queue_update_`` and ``itm_hard_negatives``: ALBEF's image-text
contrastive loss with momentum distillation, its queue, and its ITM hard-negative sampler.

Backends (auto order): ``reference`` (ALBEF's formulas). The loss issue adds fused backends.
"""

from __future__ import annotations

import torch

from fastvl import _checks
from fastvl.dispatch import op
from fastvl.reference.itc import itc_loss_ref, itc_queue_update_ref, itm_hard_negatives_ref

ITC = op("itc_loss")


def itc_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor, txt_queue: torch.Tensor,
             temp: torch.Tensor | float, alpha: float, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor, *,
             backend: str | None = None) -> torch.Tensor:
    """ALBEF's ITC loss with momentum distillation (see :func:`fastvl.reference.itc_loss_ref`).

    img_feat, txt_feat, img_feat_m, txt_feat_m ``[B, E]`` (L2-normalised); img_queue, txt_queue
    ``[E, Q]`` (ALBEF's layout); temp > 0 (float or a scalar tensor with grad); alpha in [0, 1].
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
    if isinstance(temp, torch.Tensor):
        if temp.numel() != 1:
            raise ValueError(f"temp must be a float or a one-element tensor, got shape {list(temp.shape)}")
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


ITC.register("reference")(itc_loss_ref)
