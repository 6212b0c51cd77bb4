"""Model families the trainer knows: each is a small adapter (model factory + collator + inputs).

A family turns ``--model NAME-VARIANT`` into a model, a collator, the model's inputs from a batch and
(total, per-objective) losses from its output; the training loop never looks inside any of them.
ViLBERT and VL-BERT are here; ALBEF (image pixels, not region features) needs its own data path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fastvl.data.collate import ViLBERTCollator, VLBERTCollator, unpack

MODEL_INPUTS = ("input_ids", "token_type_ids", "text_mask", "region_feats", "region_loc", "region_mask",
                "mlm_labels", "region_targets", "region_labels", "is_next")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What the trainer passes to a family's model factory."""

    vocab_size: int
    num_classes: int  # detector classes = region KL target size
    feature_dim: int
    activation_checkpointing: bool = False
    dropout: float | None = None  # None: the variant's default


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
    losses: Callable[[object], tuple[torch.Tensor, dict]] = lambda out: (out.loss, out.losses)  # (total, per objective)


def _vilbert_model(variant: str, options: ModelOptions) -> torch.nn.Module:
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining  # noqa: PLC0415
    from fastvl.nn import set_gradient_checkpointing  # noqa: PLC0415

    overrides = {"vocab_size": options.vocab_size, "v_target_size": options.num_classes,
                 "v_feature_size": options.feature_dim}
    if options.dropout is not None:
        overrides.update(hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout,
                         v_hidden_dropout_prob=options.dropout, v_attention_probs_dropout_prob=options.dropout)
    model = ViLBERTForPretraining(ViLBERTConfig.named(variant, **overrides))
    return set_gradient_checkpointing(model, options.activation_checkpointing)


def _text_stream_from_bert(model: torch.nn.Module, path: str):
    """Loads a Hugging Face BERT checkpoint (safetensors, or torch weights_only) into the text stream."""
    from fastvl.convert.common import load_state_dict_file  # noqa: PLC0415
    from fastvl.convert.hf_bert import text_stream_from_hf_bert  # noqa: PLC0415

    return text_stream_from_hf_bert(model, load_state_dict_file(path))


def _vilbert_collator(dataset, special, vocab_size: int, *, seed: int, packed: bool, max_text_len: int,
                      max_regions: int, pad_to_multiple_of: int = 1) -> ViLBERTCollator:
    return ViLBERTCollator(dataset, special, vocab_size, seed=seed, packed=packed, max_text_len=max_text_len,
                           max_regions=max_regions, pad_to_multiple_of=pad_to_multiple_of)


def _vilbert_inputs(batch: dict) -> dict:
    # The model takes padded inputs; a packed batch is padded here (exactly, to its longest sequence).
    batch = unpack(batch)
    return {key: batch[key] for key in MODEL_INPUTS}


def _vlbert_model(variant: str, options: ModelOptions) -> torch.nn.Module:
    from fastvl.models.vlbert import VLBERTConfig, VLBERTForPretraining  # noqa: PLC0415
    from fastvl.nn import set_gradient_checkpointing  # noqa: PLC0415

    overrides = {"vocab_size": options.vocab_size, "visual_region_classes": options.num_classes,
                 "visual_feature_dim": options.feature_dim}
    if options.dropout is not None:
        overrides.update(hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout)
    model = VLBERTForPretraining(VLBERTConfig.named(variant, **overrides))
    return set_gradient_checkpointing(model, options.activation_checkpointing)


def _vlbert_collator(dataset, special, vocab_size: int, *, seed: int, packed: bool, max_text_len: int,
                     max_regions: int, pad_to_multiple_of: int = 1) -> VLBERTCollator:
    return VLBERTCollator(dataset, special, vocab_size, seed=seed, packed=packed, max_text_len=max_text_len,
                          max_regions=max_regions, pad_to_multiple_of=pad_to_multiple_of)


def _vlbert_inputs(batch: dict) -> dict:
    batch = unpack(batch)
    return {"input_ids": batch["input_ids"], "region_features": batch["region_feats"],
            "boxes": batch["region_loc"][..., :4], "token_type_ids": batch["token_type_ids"],
            "text_mask": batch["text_mask"], "region_mask": batch["region_mask"], "mlm_labels": batch["mlm_labels"],
            "masked_regions": batch["region_labels"], "replaced_regions": batch["region_replaced"],
            "region_class_scores": batch["region_targets"]}


def _vlbert_losses(out: dict) -> tuple[torch.Tensor, dict]:
    return out["loss"], {"mlm": out["mlm_loss"], "mvrc": out["mvrc_loss"]}


FAMILIES = {
    "vilbert": Family("vilbert", ("tiny", "2-layer", "4-layer", "6-layer", "8-layer", "base"), _vilbert_model,
                      _vilbert_collator, _vilbert_inputs, "vilbert", ("mlm", "region", "align"), _text_stream_from_bert),
    "vlbert": Family("vlbert", ("tiny", "base", "large"), _vlbert_model, _vlbert_collator, _vlbert_inputs, "vlbert",
                     ("mlm", "mvrc"), losses=_vlbert_losses),
}


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
