"""Model families the trainer knows: each is a small adapter (model factory + collator + inputs).

A family turns ``--model NAME-VARIANT`` into a model, a collator, the model's inputs from a batch and
(total, per-objective) losses from its output; the training loop never looks inside any of them.
ViLBERT and VL-BERT train on region features; ALBEF on image pixels (:mod:`fastvl.data.collate_albef`,
:mod:`fastvl.train.albef`), with per-step inputs (its distillation ramp, where a micro-batch sits in
its optimizer step) from ``step_inputs``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from fastvl.data.collate import ViLBERTCollator, VLBERTCollator
from fastvl.data.collate_albef import ALBEFCollator
from fastvl.data.tokenizer import SpecialIds

log = logging.getLogger("fastvl.train")

MODEL_INPUTS = ("input_ids", "token_type_ids", "text_mask", "region_feats", "region_loc", "region_mask",
                "mlm_labels", "region_targets", "region_labels", "is_next")
PACKED_INPUTS = (*(k for k in MODEL_INPUTS if not k.endswith("_mask")), "cu_seqlens_text", "cu_seqlens_regions",
                 "max_seqlen_text", "max_seqlen_regions")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What the trainer passes to a family's model factory."""

    vocab_size: int
    num_classes: int  # detector classes = region KL target size
    feature_dim: int
    activation_checkpointing: bool = False
    dropout: float | None = None  # None: the variant's default
    image_size: tuple[int, int] | None = None  # (H, W) of the dataset's pixels, for models that read them
    global_batch: int | None = None  # samples per optimizer step, all ranks (ALBEF's queue size is a multiple)
    special: SpecialIds | None = None  # the vocabulary's [PAD]/[CLS]/[MASK] ids, for models that store them


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    variants: tuple[str, ...]
    make_model: Callable[[str, ModelOptions], torch.nn.Module]
    make_collator: Callable[..., Callable]
    model_inputs: Callable[[dict], dict]
    preset: str  # optimizer / schedule preset in fastvl.train.presets
    objectives: tuple[str, ...]
    init_text: Callable[[torch.nn.Module, str], object] | None = None  # text stream from a BERT checkpoint
    # extra model inputs from (fastvl.data.sampler.MicroBatch, GlobalBatchSampler): where the step is
    step_inputs: Callable[[object, object], dict] | None = None
    max_text_len: int = 36  # tokens per caption unless --max-text-len says otherwise
    after_initialize: Callable[[torch.nn.Module], None] | None = None  # on the module deepspeed.initialize cast

    def losses(self, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, one loss per objective) of a model's :class:`fastvl.models.outputs.PretrainingOutput`;
        an objective the run does not train (ViLBERT's alignment under --objective 2) counts 0, as the
        original's ``next_sentence_loss * 0``."""
        return out.loss, {name: out.losses.get(name, out.loss.new_zeros(())) for name in self.objectives}


def _vilbert_model(variant: str, options: ModelOptions) -> torch.nn.Module:
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining
    from fastvl.nn import set_gradient_checkpointing

    overrides = {"vocab_size": options.vocab_size, "v_target_size": options.num_classes,
                 "v_feature_size": options.feature_dim}
    if options.dropout is not None:
        overrides.update(hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout,
                         v_hidden_dropout_prob=options.dropout, v_attention_probs_dropout_prob=options.dropout)
    model = ViLBERTForPretraining(ViLBERTConfig.named(variant, **overrides))
    return set_gradient_checkpointing(model, options.activation_checkpointing)


def _text_stream_from_bert(model: torch.nn.Module, path: str):
    """Loads a Hugging Face BERT checkpoint (safetensors, or torch weights_only) into the model's BERT
    part (ViLBERT's text stream, VL-BERT's stack, ALBEF's text + fusion encoders: convert/hf_bert.py)."""
    from fastvl.convert.common import load_state_dict_file
    from fastvl.convert.hf_bert import text_stream_from_hf_bert

    return text_stream_from_hf_bert(model, load_state_dict_file(path))


def _vilbert_collator(dataset, special, vocab_size: int, *, seed: int, packed: bool, max_text_len: int,
                      max_regions: int, pad_to_multiple_of: int = 1, objective: int | None = None) -> ViLBERTCollator:
    return ViLBERTCollator(dataset, special, vocab_size, seed=seed, packed=packed, max_text_len=max_text_len,
                           max_regions=max_regions, pad_to_multiple_of=pad_to_multiple_of, objective=objective or 0)


def _no_objective_variants(family: str, objective: int | None) -> None:
    if objective not in (None, 0):
        raise ValueError(f"--objective {objective} is ViLBERT's (vilbert-multi-task's objective settings); "
                         f"{family} has one objective setting")


def _vilbert_inputs(batch: dict) -> dict:
    """The model's inputs, padded or packed as collated (a packed batch runs packed end to end)."""
    keys = PACKED_INPUTS if batch.get("packed") else MODEL_INPUTS
    return {key: batch[key] for key in keys if key in batch}  # no is_next under --objective 2


def _vlbert_model(variant: str, options: ModelOptions) -> torch.nn.Module:
    from fastvl.models.vlbert import VLBERTConfig, VLBERTForPretraining
    from fastvl.nn import set_gradient_checkpointing

    overrides = {"vocab_size": options.vocab_size, "visual_region_classes": options.num_classes,
                 **({"pad_token_id": options.special.pad} if options.special else {}),
                 "visual_feature_dim": options.feature_dim}
    if options.dropout is not None:
        overrides.update(hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout)
    model = VLBERTForPretraining(VLBERTConfig.named(variant, **overrides))
    return set_gradient_checkpointing(model, options.activation_checkpointing)


def _vlbert_collator(dataset, special, vocab_size: int, *, seed: int, packed: bool, max_text_len: int,
                     max_regions: int, pad_to_multiple_of: int = 1, objective: int | None = None) -> VLBERTCollator:
    _no_objective_variants("vlbert", objective)
    return VLBERTCollator(dataset, special, vocab_size, seed=seed, packed=packed, max_text_len=max_text_len,
                          max_regions=max_regions, pad_to_multiple_of=pad_to_multiple_of)


def _vlbert_inputs(batch: dict) -> dict:
    """The model's inputs, padded or packed as collated (a packed batch runs packed end to end)."""
    inputs = {"input_ids": batch["input_ids"], "region_features": batch["region_feats"],
              "boxes": batch["region_loc"][..., :4], "token_type_ids": batch["token_type_ids"],
              "mlm_labels": batch["mlm_labels"], "masked_regions": batch["region_labels"],
              "replaced_regions": batch["region_replaced"], "region_class_scores": batch["region_targets"]}
    if batch.get("packed"):
        return {**inputs, **{k: batch[k] for k in PACKED_INPUTS if k.startswith(("cu_seqlens", "max_seqlen"))}}
    return {**inputs, "text_mask": batch["text_mask"], "region_mask": batch["region_mask"]}


def _albef_model(variant: str, options: ModelOptions) -> torch.nn.Module:
    from fastvl.models.albef import ALBEFConfig
    from fastvl.nn import set_gradient_checkpointing
    from fastvl.train.albef import ALBEFPretraining

    overrides: dict = {"vocab_size": options.vocab_size}
    if options.special is not None:
        overrides.update(pad_token_id=options.special.pad, cls_token_id=options.special.cls,
                         mask_token_id=options.special.mask)
    if options.image_size is not None:  # the model reads the dataset's images at their stored size
        height, width = options.image_size
        if height != width:
            raise ValueError(f"ALBEF's ViT takes square images; the dataset's pixels (index.json) are "
                             f"{height} x {width}")
        overrides["image_res"] = height
    if options.dropout is not None:
        overrides.update(hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout)
    config = ALBEFConfig.named(variant, **overrides)
    batch = options.global_batch
    if batch and config.queue_size % batch:  # every step enqueues the global batch (ALBEF: Q % B == 0)
        queue = -(-config.queue_size // batch) * batch
        log.warning("albef-%s: queue size %d is not a multiple of the global batch %d; using %d", variant,
                    config.queue_size, batch, queue)
        config = dataclasses.replace(config, queue_size=queue)
    return set_gradient_checkpointing(ALBEFPretraining(config), options.activation_checkpointing)


def _albef_collator(dataset, special, vocab_size: int, *, seed: int, packed: bool, max_text_len: int,
                    max_regions: int, pad_to_multiple_of: int = 1, objective: int | None = None) -> ALBEFCollator:
    _no_objective_variants("albef", objective)
    del max_regions, pad_to_multiple_of  # region options: ALBEF reads pixels
    if packed:
        raise ValueError("--packed is not supported for ALBEF (its batches are padded image-text pairs)")
    return ALBEFCollator(dataset, special, vocab_size, seed=seed, max_text_len=max_text_len)


def _albef_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in ("images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")}


def _albef_step_inputs(micro, sampler) -> dict:
    """ALBEF's distillation weight ramps in over the first epoch (alpha x min(1, step / steps per
    epoch)); momentum encoders move on a step's first micro-batch, queues advance after its last."""
    return {"alpha_scale": min(1.0, micro.global_step / sampler.steps_per_epoch),
            "first_micro_step": micro.micro_step == 0, "last_micro_step": micro.micro_step == sampler.grad_accum - 1}


def _albef_after_initialize(model: torch.nn.Module) -> None:
    """Momentum encoders back to fp32 after DeepSpeed's 16-bit cast (fastvl.train.albef explains why)."""
    if not model.keep_momentum_fp32():
        dtype = next(model.visual_encoder_m.parameters()).dtype
        if dtype != torch.float32:
            log.warning("albef: ZeRO-3 partitions the momentum encoders, which stay in %s: momentum steps "
                        "smaller than half a %s ulp round away", dtype, dtype)


FAMILIES = {
    "vilbert": Family("vilbert", ("tiny", "2-layer", "4-layer", "6-layer", "8-layer", "base"), _vilbert_model,
                      _vilbert_collator, _vilbert_inputs, "vilbert", ("mlm", "region", "align"), _text_stream_from_bert),
    "vlbert": Family("vlbert", ("tiny", "base", "large"), _vlbert_model, _vlbert_collator, _vlbert_inputs, "vlbert",
                     ("mlm", "mvrc"), _text_stream_from_bert),
    "albef": Family("albef", ("tiny", "base"), _albef_model, _albef_collator, _albef_inputs, "albef",
                    ("itc", "itm", "mlm"), _text_stream_from_bert, step_inputs=_albef_step_inputs, max_text_len=25,
                    after_initialize=_albef_after_initialize),
}


def open_dataset(family: Family, path: str, tokenizer, *, strict: bool = False, image_root: str = "",
                 image_res: int | None = None, seed: int = 0):
    """The training set at ``path``: a shard directory (:class:`fastvl.data.format.RegionDataset`), or
    for ALBEF an annotation file ``*.json`` / ``*.jsonl`` of ``{image, caption}`` records
    (:class:`fastvl.data.images.ImageCaptionDataset`: images decoded and augmented in the workers)."""
    from fastvl.data.format import DataError, RegionDataset

    if path.endswith((".json", ".jsonl")):
        if family.name != "albef":
            raise DataError(f"{path}: image-caption files train ALBEF; {family.name} trains on region features "
                            "(a directory from `fastvl data convert`)")
        from fastvl.data.images import ImageCaptionDataset

        return ImageCaptionDataset(path, tokenizer, image_root=image_root, image_res=image_res or 256, seed=seed,
                                   strict=strict)
    return RegionDataset(path, tokenizer, strict=strict)


def resolve(model: str) -> tuple[Family, str]:
    """``"vilbert-tiny"`` -> (the ViLBERT family, ``"tiny"``)."""
    name, _, variant = model.partition("-")
    family = FAMILIES.get(name)
    if family is None or variant not in family.variants:
        known = [f"{f.name}-{v}" for f in FAMILIES.values() for v in f.variants]
        raise ValueError(f"--model must be one of {known}, got {model!r}")
    return family, variant


def model_names() -> list[str]:
    return [f"{f.name}-{v}" for f in FAMILIES.values() for v in f.variants]
