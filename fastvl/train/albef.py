"""ALBEF as the trainer runs it: momentum encoders and queues move once per optimizer step.

ALBEF (one forward = one optimizer step) moves its momentum encoders before, and enqueues the
all-gathered momentum features after, every forward. Under gradient accumulation that would move
the momentum encoders once per micro-batch (k micro-batches = momentum ``m^k``) and let later
micro-batches of a step contrast against features of earlier ones. :class:`ALBEFPretraining`
keeps ALBEF's per-step semantics instead:

* before the first micro-batch of an optimizer step, the momentum encoders move once
  (``p_m <- m p_m + (1 - m) p``, from a forward pre-hook);
* every micro-batch computes its losses against the queues as they stood at the start of the step
  (ALBEF's in-batch momentum features are the micro-batch's own, as on one GPU of ALBEF's eight);
* after the step's last micro-batch, the momentum features of all its micro-batches on all ranks enter
  the queues together, in global-batch order, exactly what ALBEF's all-gather enqueues for that global
  batch.

So one rank accumulating k micro-batches computes what k ranks compute with one each, and the queue
holds the same features for any layout. The temperature is clamped to [0.001, 0.5] in every training
forward. ALBEF clamps the parameter itself; where DeepSpeed keeps an fp32 master copy (ZeRO 1-3, bf16 /
fp16) that copy is not clamped, so a temperature pushed past a bound is used clamped until its gradient
brings it back.

The queues (``image_queue``, ``text_queue``, ``queue_ptr``) are buffers and the momentum encoders
parameters of the module, so DeepSpeed's checkpoints hold them; a resumed run continues with the same
queues and momentum weights. The queue size must be a multiple of the global batch (ALBEF's rule).

Under ZeRO-3 the parameters are partitioned over the ranks; the momentum update gathers the online
and momentum encoders with ``deepspeed.zero.GatheredParameters`` (rank 0 writes the new momentum
weights, which are then re-partitioned), before DeepSpeed's own hooks gather anything for the forward.
DeepSpeed's checkpoints keep the partitioned momentum weights as frozen parameters and restore them.

Precision: under bf16 / fp16 DeepSpeed casts every parameter to 16 bits (buffers, the queues, stay
fp32). A momentum step ``(1 - m) (p - p_m)`` with m = 0.995 is then mostly below half a 16-bit ulp of
``p_m`` and rounds away (in a 60-step bf16 run 90% of the momentum weights never moved).
:meth:`ALBEFPretraining.keep_momentum_fp32` (the trainer calls it after ``deepspeed.initialize``)
returns the momentum encoders to fp32, as ALBEF's own mixed precision (autocast over fp32 weights)
has them; their forward runs in fp32 and their features are cast to the model's dtype where they meet
it. Under ZeRO-3 the partitioned momentum weights stay in 16 bits (a warning says so).
"""

from __future__ import annotations

import torch

from fastvl.models.albef import ALBEF, _all_gather
from fastvl.ops import itc_queue_update_


def _partitioned(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned these parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in parameters)


def _temperature_as_scalar(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "temp"
    if key in state_dict and state_dict[key].shape == (1,):
        state_dict[key] = state_dict[key].reshape(())


def _temperature_as_vector(module, state_dict, prefix, *_) -> None:
    key = prefix + "temp"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def _start_of_step(module: ALBEFPretraining, args: tuple, kwargs: dict) -> None:
    """Before the first micro-batch of an optimizer step: move the momentum encoders."""
    if module.training and kwargs.get("first_micro_step", True):
        module._step_features.clear()
        module.momentum_update()


class ALBEFPretraining(ALBEF):
    """:class:`fastvl.models.albef.ALBEF` with the trainer's inputs and per-optimizer-step updates.

    ``forward(images, input_ids, attention_mask, mlm_input_ids, mlm_labels, *, alpha_scale,
    first_micro_step, last_micro_step)``: ``alpha_scale`` multiplies the config's distillation weight
    (ALBEF ramps it from 0 to 1 over the first epoch); the two flags mark the micro-batch's place in
    its optimizer step. In eval mode nothing moves. Parameter and buffer names are ALBEF's, so its
    checkpoints and converters apply unchanged.
    """

    def __init__(self, config, with_mlm_head: bool = True):
        super().__init__(config, with_mlm_head=with_mlm_head)
        self._step_features: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's momentum features so far
        # DeepSpeed (0.19) broadcasts every parameter as bytes at start-up (``p.data.view(torch.uint8)``),
        # which fails for a 0-dim tensor: the temperature is held as [1]; state dicts carry ALBEF's 0-dim one.
        self.temp = torch.nn.Parameter(self.temp.detach().reshape(1))
        self.register_state_dict_post_hook(_temperature_as_scalar)
        self.register_load_state_dict_pre_hook(_temperature_as_vector)
        # Registered before DeepSpeed's ZeRO-3 hooks, so it runs before they gather (and prefetch) anything.
        self.register_forward_pre_hook(_start_of_step, with_kwargs=True)

    def keep_momentum_fp32(self) -> bool:
        """Returns the momentum encoders to fp32 after a 16-bit cast (see the module docstring); False
        (nothing done) when ZeRO-3 has partitioned them."""
        moving = [p for pair in self._momentum_pairs() for p in pair[1].parameters()]
        if _partitioned(moving):
            return False
        for module in self._momentum_modules():
            module.float()
        return True

    @torch.no_grad()
    def momentum_update(self) -> None:
        online = [p for pair in self._momentum_pairs() for p in pair[0].parameters()]
        moving = [p for pair in self._momentum_pairs() for p in pair[1].parameters()]
        if not _partitioned(online + moving):
            super().momentum_update()
            return
        import deepspeed  # only under ZeRO-3

        with deepspeed.zero.GatheredParameters(online), deepspeed.zero.GatheredParameters(moving, modifier_rank=0):
            torch._foreach_mul_(moving, self.config.momentum)
            torch._foreach_add_(moving, online, alpha=1.0 - self.config.momentum)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor, mlm_labels: torch.Tensor, *, alpha_scale: float = 1.0,
                first_micro_step: bool = True, last_micro_step: bool = True):
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        out = super().forward(images, input_ids, attention_mask, alpha=self.config.alpha * alpha_scale, update=False,
                              mlm_inputs=(mlm_input_ids, mlm_labels))
        if self.training:
            self._step_features.append((out.image_feat_m, out.text_feat_m))
            if last_micro_step:
                image_feat_m = _all_gather(torch.cat([image for image, _ in self._step_features]))
                text_feat_m = _all_gather(torch.cat([text for _, text in self._step_features]))
                self._step_features.clear()
                # a step whose features overflowed (fp16: DeepSpeed skips that step) leaves the queues as
                # they are, instead of filling them with NaN for queue_size / global_batch steps
                if bool(torch.isfinite(image_feat_m).all() & torch.isfinite(text_feat_m).all()):  # one sync a step
                    itc_queue_update_(self.image_queue, self.text_queue, self.queue_ptr,
                                      image_feat_m.to(self.image_queue.dtype), text_feat_m.to(self.text_queue.dtype))
        return out
