"""ALBEF's retrieval fine-tuning objective: every caption of an image is a positive of it.

As ALBEF's retrieval model (``models/model_retrieval.py``) trains, each sample carries the id of its
image:

* ITC: the hard part of the targets is ``pos / pos.sum(1)``, where ``pos[b, j]`` says whether column j
  (the micro-batch's momentum features, then the queue) shows sample b's image; the queue keeps the ids
  of its entries (``idx_queue``, -100 = no image, as ALBEF initialises it). The momentum distillation
  targets are mixed in by ``alpha`` as in pretraining. With all ids distinct and no id in the queue this
  is exactly pretraining's ITC (:func:`fastvl.ops.itc_loss`).
* ITM: hard negatives are drawn from the in-batch similarities with every same-image pair given weight
  0, so a caption of the same image is never a negative.

The fused :func:`fastvl.ops.itc_loss` builds one-hot (diagonal) targets inside its kernel, so the
multi-positive ITC is computed here in plain torch (:func:`multi_positive_itc_loss`, the reference
formula of :func:`fastvl.reference.itc_loss_ref` with the targets above).

Two things differ from ALBEF's code, both only where it would fail: the sampling weights are
``softmax + 1e-4`` (fastvl's pretraining sampler, so a row whose softmax underflows or overflows still
draws; ALBEF's ``softmax(sim + 1e-4)`` has no floor), and a sample whose micro-batch holds no other
image (possible for micro-batches no larger than an image's caption count) has no ITM negative: its two
negative pairs are left out of the ITM mean, where ALBEF's ``multinomial`` would raise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.models.albef import ALBEFPretrainingOutput, _all_gather, _text_mask
from fastvl.models.outputs import total
from fastvl.nn.common import on_backend
from fastvl.ops import itc_queue_update_
from fastvl.profiling import nvtx_range
from fastvl.train.albef import ALBEFPretraining

NO_IMAGE = -100  # the id of a queue entry that holds no training image yet (ALBEF's initial idx_queue)


def positive_targets(image_ids: torch.Tensor, bank_ids: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` float32: row b spreads 1 evenly over the columns whose id equals ``image_ids[b]``
    (``image_ids [B]``, ``bank_ids [N]``; every row must find itself among the columns)."""
    positive = (image_ids[:, None] == bank_ids[None, :]).float()
    return positive / positive.sum(dim=1, keepdim=True)


def multi_positive_itc_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor, img_queue: torch.Tensor,
                            txt_queue: torch.Tensor, temp: torch.Tensor | float, alpha: float,
                            img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor, image_ids: torch.Tensor,
                            idx_queue: torch.Tensor) -> torch.Tensor:
    """ALBEF's retrieval ITC: :func:`fastvl.ops.itc_loss`'s arguments plus ``image_ids [B]`` and the
    queue's ids ``idx_queue [1, Q]``; targets ``alpha * softmax(momentum similarities) + (1 - alpha) *
    positive_targets`` against ``[batch | queue]``, both directions, the mean of the two soft
    cross-entropies. Softmaxes in float32; the loss in the features' dtype."""
    bank_ids = torch.cat([image_ids, idx_queue.reshape(-1).to(image_ids.device)])
    hard = positive_targets(image_ids, bank_ids)
    temp = temp.float().reshape(()) if isinstance(temp, torch.Tensor) else float(temp)
    loss = 0.0
    for feat, feat_m, other_m, other_queue in ((img_feat, img_feat_m, txt_feat_m, txt_queue),
                                               (txt_feat, txt_feat_m, img_feat_m, img_queue)):
        with torch.no_grad():
            bank = torch.cat([other_m.detach().t(), other_queue.detach().to(feat.dtype)], dim=1)
            targets = alpha * F.softmax((feat_m.detach() @ bank).float() / temp, dim=1) + (1 - alpha) * hard
        log_probs = F.log_softmax((feat @ bank).float() / temp, dim=1)
        loss = loss - (log_probs * targets).sum(dim=1).mean() / 2
    return loss.to(img_feat.dtype)


@torch.no_grad()
def itm_negatives_of_other_images(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: torch.Tensor,
                                  generator: torch.Generator | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image a text and for each text an image of the micro-batch, drawn in proportion to
    ``softmax(in-batch similarity) + 1e-4`` with every pair of the same image weighted 0.

    sim_i2t / sim_t2i ``[B, >= B]`` (the first B columns are the batch); image_ids ``[B]``. Returns
    ``(neg_txt_for_img [B], neg_img_for_txt [B], has_negative [B] bool)``; where the batch holds no
    other image than sample b's, ``has_negative[b]`` is False and its two indices are meaningless."""
    batch = image_ids.shape[0]
    same_image = image_ids[:, None] == image_ids[None, :]
    has_negative = ~same_image.all(dim=1)
    draws = []
    for sim in (sim_i2t, sim_t2i):
        weights = F.softmax(sim[:, :batch].float(), dim=1).nan_to_num(0.0) + 1e-4
        weights.masked_fill_(same_image, 0.0)
        weights[~has_negative] = 1.0  # something to draw from; these pairs are left out of the ITM loss
        draws.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return draws[0], draws[1], has_negative


class ALBEFRetrieval(ALBEFPretraining):
    """ALBEF's retrieval model as fastvl fine-tunes it: :class:`fastvl.train.albef.ALBEFPretraining`'s
    per-optimizer-step momentum and queue semantics, no MLM head (ALBEF's retrieval checkpoints have
    none), an ``idx_queue [1, Q]`` buffer (ALBEF's name) with the image id of every queue entry, and
    ITC + ITM with multiple positives (see the module docstring).

    ``forward(images, input_ids, attention_mask, image_ids, *, alpha_scale, first_micro_step,
    last_micro_step, itm_negatives=None, generator=None)``; ``itm_negatives`` ``(neg_txt_for_img,
    neg_img_for_txt)`` replaces the draw (every pair then counts).
    """

    def __init__(self, config):
        super().__init__(config, with_mlm_head=False)
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), NO_IMAGE, dtype=torch.long))

    @on_backend
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor, *, alpha_scale: float = 1.0, first_micro_step: bool = True,
                last_micro_step: bool = True, itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> ALBEFPretrainingOutput:
        c = self.config
        _checks.tensor("images", images, shape=f"[B, 3, {c.image_res}, {c.image_res}]", ndim=4)
        batch = images.shape[0]
        _checks.tensor("image_ids", image_ids, shape="[B] int64", ndim=1, dtypes=(torch.int64, torch.int32))
        _checks.same_shape("image_ids", image_ids, [batch], "[B] with B = images.shape[0]")
        if batch < 2:
            raise ValueError(f"ALBEF retrieval fine-tuning needs a batch of at least 2 (hard negatives), got {batch}")
        image_ids = image_ids.long()
        attention_mask = _text_mask(input_ids, attention_mask, batch, c.pad_token_id)
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.image_features(images)
        text_embeds, text_feat = self.text_features(input_ids, attention_mask)
        with torch.no_grad():  # the momentum encoders moved in the pre-hook, once per optimizer step
            _, image_feat_m = self.image_features(images, momentum=True)
            _, text_feat_m = self.text_features(input_ids, attention_mask, momentum=True)
            image_feat_m, text_feat_m = image_feat_m.to(image_feat.dtype), text_feat_m.to(text_feat.dtype)
        with nvtx_range("itc"):
            loss_itc = multi_positive_itc_loss(image_feat, text_feat, self.image_queue, self.text_queue, self.temp,
                                               c.alpha * alpha_scale, image_feat_m, text_feat_m, image_ids,
                                               self.idx_queue)
        with nvtx_range("itm"):
            if itm_negatives is None:
                with torch.no_grad():  # ALBEF's in-batch similarities (momentum features opposite)
                    temp = self.temp.reshape(())
                    sim_i2t = image_feat @ text_feat_m.t() / temp
                    sim_t2i = text_feat @ image_feat_m.t() / temp
                neg_text, neg_image, has_negative = itm_negatives_of_other_images(sim_i2t, sim_t2i, image_ids,
                                                                                  generator)
            else:
                (neg_text, neg_image), has_negative = itm_negatives, torch.ones_like(image_ids, dtype=torch.bool)
            # B positive pairs, then (text, negative image) and (negative text, image)
            text_all = torch.cat((text_embeds, text_embeds, text_embeds[neg_text]), dim=0)
            mask_all = torch.cat((attention_mask, attention_mask, attention_mask[neg_text]), dim=0)
            image_all = torch.cat((image_embeds, image_embeds[neg_image], image_embeds), dim=0)
            itm_logits = self.itm_head(self.text_encoder.fuse(text_all, mask_all, image_all)[:, 0])
            negative = torch.where(has_negative, 0, -100)
            itm_labels = torch.cat((torch.ones_like(negative), negative, negative))
            loss_itm = F.cross_entropy(itm_logits, itm_labels, ignore_index=-100)
        if self.training:
            self._enqueue_at_end_of_step(image_feat_m, text_feat_m, image_ids, last_micro_step)
        losses = {"itc": loss_itc, "itm": loss_itm}
        return ALBEFPretrainingOutput(total(losses), losses, itm_logits, image_feat_m, text_feat_m)

    @torch.no_grad()
    def _enqueue_at_end_of_step(self, image_feat_m, text_feat_m, image_ids, last_micro_step: bool) -> None:
        """As :class:`ALBEFPretraining`: the step's momentum features (and here their image ids) of all
        micro-batches and ranks enter the queues after its last micro-batch, unless any is not finite."""
        self._step_features.append((image_feat_m, text_feat_m, image_ids))
        if not last_micro_step:
            return
        image_feat_m, text_feat_m, image_ids = (_all_gather(torch.cat(parts)) for parts in zip(*self._step_features))
        self._step_features.clear()
        if bool(torch.isfinite(image_feat_m).all() & torch.isfinite(text_feat_m).all()):
            # the ids go to the columns the features are about to fill (before the pointer moves)
            offsets = torch.arange(image_ids.shape[0], device=self.queue_ptr.device)
            columns = (self.queue_ptr + offsets) % self.idx_queue.shape[1]
            self.idx_queue[0].index_copy_(0, columns, image_ids.to(self.idx_queue.device))
            itc_queue_update_(self.image_queue, self.text_queue, self.queue_ptr,
                              image_feat_m.to(self.image_queue.dtype), text_feat_m.to(self.text_queue.dtype))
