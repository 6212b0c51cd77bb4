"""VL-BERT checkpoints (jackroos/VL-BERT) <-> fastvl's VL-BERT models.

The original saves ``{"state_dict": ...}`` with every key under DataParallel's ``module.``:
``vlbert.{word,position,token_type}_embeddings``, ``vlbert.end_embedding``,
``vlbert.embedding_LayerNorm``, ``vlbert.visual_ln_{text,object}``, ``vlbert.encoder.layer.{i}.*``
(BERT names, separate query / key / value, fused here into one ``qkv``), ``vlbert.pooler.dense``,
``vlbert.mlm_head.predictions.*`` (decoder tied to the word embeddings),
``vlbert.mvrc_head.{transform.dense, region_cls_pred}``,
``vlbert.relationsip_head.caption_image_relationship`` (sic), ``image_feature_extractor.
obj_downsample.1`` (the visual feature projection), ``object_linguistic_embeddings``,
``object_mask_visual_embedding`` (precomputed-feature pretraining only; end-to-end checkpoints get
zeros, its initial value), ``object_mask_word_embedding``; the task models add ``final_mlp.*``.

fastvl takes precomputed RoI features, so the detector inside end-to-end checkpoints
(``image_feature_extractor.*`` other than ``obj_downsample``) and the text-only corpus embedding
(``aux_text_visual_embedding``) are listed in the report as known and skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from fastvl.convert.common import (
    ConversionError,
    Rule,
    SourceState,
    check_tied,
    convert_with_rules,
    export_with_rules,
    load_converted,
)
from fastvl.models.vlbert import VLBERTConfig, VLBERTForPretraining, VLBERTForRefCOCO, VLBERTForVCR, VLBERTForVQA

TASKS = ("pretraining", "vqa", "vcr", "refcoco")

_LAYER = r"vlbert\.encoder\.layers\.(\d+)\."
_BACKBONE_RULES: list[Rule] = [
    (r"^vlbert\.embedding_norm\.(\w+)$", lambda m: [f"vlbert.embedding_LayerNorm.{m[1]}"]),
    (r"^vlbert\.visual\.proj\.(\w+)$", lambda m: [f"image_feature_extractor.obj_downsample.1.{m[1]}"]),
    (r"^vlbert\.object_linguistic_embeddings\.weight$", lambda m: ["object_linguistic_embeddings.weight"]),
    (_LAYER + r"attention\.qkv\.(\w+)$",
     lambda m: [f"vlbert.encoder.layer.{m[1]}.attention.self.{p}.{m[2]}" for p in ("query", "key", "value")]),
    (_LAYER + r"attention\.dense\.(\w+)$", lambda m: [f"vlbert.encoder.layer.{m[1]}.attention.output.dense.{m[2]}"]),
    (_LAYER + r"attention\.norm\.(\w+)$",
     lambda m: [f"vlbert.encoder.layer.{m[1]}.attention.output.LayerNorm.{m[2]}"]),
    (_LAYER + r"ffn\.intermediate\.(\w+)$", lambda m: [f"vlbert.encoder.layer.{m[1]}.intermediate.dense.{m[2]}"]),
    (_LAYER + r"ffn\.output\.(\w+)$", lambda m: [f"vlbert.encoder.layer.{m[1]}.output.dense.{m[2]}"]),
    (_LAYER + r"ffn\.norm\.(\w+)$", lambda m: [f"vlbert.encoder.layer.{m[1]}.output.LayerNorm.{m[2]}"]),
    (r"^vlbert\.pooler\.(\w+)$", lambda m: [f"vlbert.pooler.dense.{m[1]}"]),
    (r"^vlbert\.([\w.]+)$", lambda m: [f"vlbert.{m[1]}"]),  # embeddings, visual_ln_* / visual_1x1_* / scales
]
_TASK_RULES: dict[str, list[Rule]] = {
    "pretraining": [
        (r"^(object_mask_(visual|word)_embedding\.weight)$", lambda m: [m[1]]),
        (r"^mlm_head\.dense\.(\w+)$", lambda m: [f"vlbert.mlm_head.predictions.transform.dense.{m[1]}"]),
        (r"^mlm_head\.norm\.(\w+)$", lambda m: [f"vlbert.mlm_head.predictions.transform.LayerNorm.{m[1]}"]),
        (r"^mlm_head\.bias$", lambda m: ["vlbert.mlm_head.predictions.bias"]),
        (r"^mvrc_head\.dense\.(\w+)$", lambda m: [f"vlbert.mvrc_head.transform.dense.{m[1]}"]),
        (r"^mvrc_head\.classifier\.(\w+)$", lambda m: [f"vlbert.mvrc_head.region_cls_pred.{m[1]}"]),
        (r"^relationship_head\.(\w+)$", lambda m: [f"vlbert.relationsip_head.caption_image_relationship.{m[1]}"]),
    ],
    "vqa": [
        (r"^head\.dense\.(\w+)$", lambda m: [f"final_mlp.0.dense.{m[1]}"]),
        (r"^head\.norm\.(\w+)$", lambda m: [f"final_mlp.0.LayerNorm.{m[1]}"]),
        (r"^head\.classifier\.(\w+)$", lambda m: [f"final_mlp.2.{m[1]}"]),
    ],
    "vcr": [(r"^classifier\.(\w+)$", lambda m: [f"final_mlp.1.{m[1]}"])],
    "refcoco": [
        (r"^head\.dense\.(\w+)$", lambda m: [f"final_mlp.0.dense.{m[1]}"]),
        (r"^head\.classifier\.(\w+)$", lambda m: [f"final_mlp.2.{m[1]}"]),
    ],
}
# The detector of end-to-end checkpoints, the text-only corpus embedding of multitask pretraining, and
# VCR's auxiliary object-classification head (a training-only loss on the objects' states).
KNOWN_UNUSED = ("image_feature_extractor.*", "aux_text_visual_embedding.*", "cnn_loss_reg.*")
_TIED_DECODER = "vlbert.mlm_head.predictions.decoder.weight"


def detect_task(keys: Sequence[str]) -> str:
    present = set(keys)
    if any(k.startswith(("vlbert.mlm_head.", "vlbert.mvrc_head.", "vlbert.relationsip_head.")) for k in keys):
        return "pretraining"
    if "final_mlp.0.LayerNorm.weight" in present:
        return "vqa"
    if "final_mlp.1.weight" in present:
        return "vcr"
    if "final_mlp.0.dense.weight" in present:
        return "refcoco"
    if "object_mask_word_embedding.weight" in present or "object_mask_visual_embedding.weight" in present:
        return "pretraining"
    raise ConversionError("cannot tell the VL-BERT task from the keys (no mlm/mvrc head, no final_mlp); pass "
                          f"task= one of {list(TASKS)}")


def _config_for(source: SourceState, config_dict: Mapping, task: str) -> VLBERTConfig:
    config = VLBERTConfig.from_original(config_dict)
    shapes = {k: source.state[k].shape for k in source.state}
    updates: dict = {}
    if "image_feature_extractor.obj_downsample.1.weight" in shapes:
        out_dim, in_dim = shapes["image_feature_extractor.obj_downsample.1.weight"]
        feature_dim = in_dim - 8 * config.sinusoid_dim
        if "object_mask_visual_embedding.weight" in shapes:  # the RoI feature width, stated directly
            feature_dim = shapes["object_mask_visual_embedding.weight"][1]
        if feature_dim <= 0 or (in_dim - feature_dim) % 8:
            raise ConversionError(f"obj_downsample.1 takes {in_dim} inputs, which is not 8 x sinusoid_dim "
                                  f"({config.sinusoid_dim}) + a feature width; set sinusoid_dim in the config")
        updates.update(visual_size=out_dim, visual_feature_dim=feature_dim, sinusoid_dim=(in_dim - feature_dim) // 8)
    if "object_linguistic_embeddings.weight" in shapes:
        updates["object_word_classes"] = shapes["object_linguistic_embeddings.weight"][0]
    if "vlbert.mvrc_head.region_cls_pred.weight" in shapes:
        updates["visual_region_classes"] = shapes["vlbert.mvrc_head.region_cls_pred.weight"][0]
    if task == "pretraining" and "NETWORK" not in config_dict:  # heads from the keys when the flags are absent
        updates.update(with_mlm_head="vlbert.mlm_head.predictions.bias" in shapes,
                       with_mvrc_head="vlbert.mvrc_head.region_cls_pred.weight" in shapes,
                       with_rel_head="vlbert.relationsip_head.caption_image_relationship.weight" in shapes)
    if "vlbert.pooler.dense.weight" in shapes:
        updates["with_pooler"] = True
    return dataclasses.replace(config, **updates)


def vlbert_from_original(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping, *, task: str | None = None,
                         strict: bool = True, return_report: bool = False, dtype: torch.dtype = torch.float32):
    """Builds the fastvl VL-BERT model for an original checkpoint and loads it.

    state_dict: the original's (``module.``-prefixed keys, gamma/beta LayerNorm names accepted; load
    files with :func:`fastvl.convert.load_state_dict_file`, weights-only). config_dict: its YAML
    config as a dict (the whole file or ``NETWORK.VLBERT``). task: ``"pretraining"``, ``"vqa"``,
    ``"vcr"`` or ``"refcoco"`` (default: told from the keys). Strict: any missing, unused or
    mis-shaped key raises :class:`ConversionError` naming it. The model's parameters get ``dtype``.
    Returns the model (in eval mode), or ``(model, report)`` with ``return_report``.
    """
    source = SourceState(state_dict, known_unused=KNOWN_UNUSED)
    # VCR wraps the backbone in TimeDistributed: its keys read ``vlbert._module.*``.
    source.state = {k.replace("vlbert._module.", "vlbert.", 1): v for k, v in source.state.items()}
    task = task or detect_task(list(source.state))
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    config = _config_for(source, config_dict, task)
    if task == "pretraining":
        model = VLBERTForPretraining(config)
    elif task == "vqa":
        answers = source.state.get("final_mlp.2.weight")
        model = VLBERTForVQA(config, num_answers=answers.shape[0] if answers is not None else 3129)
    elif task == "vcr":
        model = VLBERTForVCR(config)
    else:
        model = VLBERTForRefCOCO(config)
    if task == "pretraining" and "object_mask_visual_embedding.weight" not in source:
        # End-to-end checkpoints mask raw pixels and have no masked-feature embedding; fastvl takes
        # precomputed features, so it starts from the original's initial value for those: zeros.
        source.state["object_mask_visual_embedding.weight"] = torch.zeros(1, config.visual_feature_dim)
    converted = convert_with_rules(model, source, _rules(task))
    if task == "pretraining" and model.mlm_head is not None:
        check_tied(source, _TIED_DECODER, converted["vlbert.word_embeddings.weight"], "the word embeddings")
    report = load_converted(model.to(dtype), converted, source, strict=strict)
    model.eval()
    return (model, report) if return_report else model


def _rules(task: str) -> list[Rule]:
    return _TASK_RULES[task] + _BACKBONE_RULES


def vlbert_to_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A fastvl VL-BERT model's tensors in the original layout (``module.`` keys, separate
    query / key / value, the tied MLM decoder included), loadable by the original code."""
    task = {VLBERTForPretraining: "pretraining", VLBERTForVQA: "vqa", VLBERTForVCR: "vcr",
            VLBERTForRefCOCO: "refcoco"}.get(type(model))
    if task is None:
        raise TypeError(f"model must be a fastvl VL-BERT task model, got {type(model).__name__}")
    exported = export_with_rules(model, _rules(task), prefix="module.")
    if task == "pretraining" and model.mlm_head is not None:
        exported["module." + _TIED_DECODER] = model.vlbert.word_embeddings.weight.detach().clone()
    if task == "vcr":  # the original's VCR model wraps the backbone in TimeDistributed
        exported = {k.replace("module.vlbert.", "module.vlbert._module.", 1): v for k, v in exported.items()}
    return exported


def vlbert_from_fastvl(state_dict: Mapping[str, torch.Tensor], sidecar: Mapping) -> torch.nn.Module:
    """Rebuilds the VL-BERT model a ``fastvl convert`` run saved: its state dict and the ``.json``
    sidecar (``class``, ``config``). Loads strictly."""
    config = VLBERTConfig(**sidecar["config"])
    name = str(sidecar["class"]).rsplit(".", 1)[-1]
    classes = {"VLBERTForPretraining": VLBERTForPretraining, "VLBERTForVCR": VLBERTForVCR,
               "VLBERTForRefCOCO": VLBERTForRefCOCO}
    if name == "VLBERTForVQA":
        model = VLBERTForVQA(config, num_answers=state_dict["head.classifier.weight"].shape[0])
    elif name in classes:
        model = classes[name](config)
    else:
        raise ConversionError(f"the sidecar names {sidecar['class']!r}, not a fastvl VL-BERT task model")
    model.load_state_dict(dict(state_dict))
    return model.eval()
