"""ALBEF checkpoints (salesforce/ALBEF) <-> fastvl's ALBEF models.

Original layout (``{"model": state_dict, ...}``): ``visual_encoder[_m].{cls_token, pos_embed,
patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}`` (the same
names in fastvl), the text encoder ``text_encoder[_m].bert.*`` in pretraining checkpoints (a
``BertForMaskedLM``, with ``text_encoder[_m].cls.predictions.*``) or ``text_encoder[_m].*`` in the
fine-tuned ones (a ``BertModel``): ``embeddings.{word,position,token_type}_embeddings``,
``embeddings.LayerNorm``, ``encoder.layer.{i}.{attention, crossattention (i >= fusion_layer),
intermediate, output}``; then ``{vision,text}_proj[_m]``, ``itm_head``, ``temp``, ``image_queue``,
``text_queue``, ``queue_ptr`` (pretraining / retrieval) or ``cls_head`` (SNLI-VE, NLVR2).

Known and skipped: ``embeddings.position_ids`` (a constant buffer), the retrieval model's
``idx_queue``, and the fine-tuned classifiers' momentum copies (``*_m``, used only to distil during
fine-tuning).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

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
from fastvl.models.albef import ALBEF, ALBEFClassifier, ALBEFConfig
from fastvl.nn.vision import resize_pos_embed

TASKS = ("pretrain", "retrieval", "ve", "nlvr")
KNOWN_UNUSED = ("*embeddings.position_ids", "idx_queue")
_CLASSIFIER_MOMENTUM = ("visual_encoder_m.*", "text_encoder_m.*", "cls_head_m.*")


def _text_rules(bert: str, fusion_layer: int) -> list[Rule]:
    """fastvl text-encoder names -> original ones; ``bert`` is ``"bert."`` or ``""``."""
    enc = r"^text_encoder(_m)?\."

    def layer(m: re.Match, fusion: bool) -> int:
        return int(m[2]) + (fusion_layer if fusion else 0)

    def sub_layer(fusion: bool):
        def names(m: re.Match) -> list[str]:
            base = f"text_encoder{m[1] or ''}.{bert}encoder.layer.{layer(m, fusion)}."
            part, rest = m[3], m[4]
            table = {
                "attention.qkv": [base + f"attention.self.{p}.{rest}" for p in ("query", "key", "value")],
                "attention.dense": [base + f"attention.output.dense.{rest}"],
                "attention.norm": [base + f"attention.output.LayerNorm.{rest}"],
                "crossattention.query": [base + f"crossattention.self.query.{rest}"],
                "crossattention.kv": [base + f"crossattention.self.{p}.{rest}" for p in ("key", "value")],
                "crossattention.dense": [base + f"crossattention.output.dense.{rest}"],
                "crossattention.norm": [base + f"crossattention.output.LayerNorm.{rest}"],
                "ffn.intermediate": [base + f"intermediate.dense.{rest}"],
                "ffn.output": [base + f"output.dense.{rest}"],
                "ffn.norm": [base + f"output.LayerNorm.{rest}"],
            }
            if part not in table:
                raise ConversionError(f"no original name known for {m[0]!r}")
            return table[part]
        return names

    def prefix(m: re.Match) -> str:
        return f"text_encoder{m[1] or ''}."

    return [
        (enc + r"embeddings\.norm\.(\w+)$", lambda m: [f"{prefix(m)}{bert}embeddings.LayerNorm.{m[2]}"]),
        (enc + r"embeddings\.(\w+_embeddings\.weight)$", lambda m: [f"{prefix(m)}{bert}embeddings.{m[2]}"]),
        (enc + r"text_layers\.(\d+)\.(\w+\.\w+)\.(\w+)$", sub_layer(False)),
        (enc + r"fusion_layers\.(\d+)\.(\w+\.\w+)\.(\w+)$", sub_layer(True)),
        (enc + r"mlm_head\.dense\.(\w+)$", lambda m: [f"{prefix(m)}cls.predictions.transform.dense.{m[2]}"]),
        (enc + r"mlm_head\.norm\.(\w+)$", lambda m: [f"{prefix(m)}cls.predictions.transform.LayerNorm.{m[2]}"]),
        (enc + r"mlm_head\.bias$", lambda m: [f"{prefix(m)}cls.predictions.bias"]),
        (r"^([\w.]+)$", lambda m: [m[1]]),  # visual encoders, projections, itm_head, temp, queues, cls_head
    ]


def detect_task(keys: list[str], num_hidden_layers: int) -> str:
    """NLVR2's text encoder has more layers than the config says (ALBEF sets 18 in code)."""
    present = set(keys)
    if "cls_head.2.weight" in present:
        layers = {int(m[1]) for k in keys if (m := re.match(r"text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.", k))}
        return "nlvr" if len(layers) > num_hidden_layers else "ve"
    if any(k.startswith("text_encoder.cls.") for k in keys):
        return "pretrain"
    if "itm_head.weight" in present:
        return "retrieval"
    raise ConversionError("cannot tell the ALBEF model from the keys (no cls_head, no itm_head); pass task= one of "
                          f"{list(TASKS)}")


def _config_for(source: SourceState, config_dict: Mapping, image_res: int | None) -> ALBEFConfig:
    config = ALBEFConfig.from_original(config_dict)
    shapes = {k: v.shape for k, v in source.state.items()}
    updates = {}
    if "visual_encoder.pos_embed" in shapes:
        side = round((shapes["visual_encoder.pos_embed"][1] - 1) ** 0.5)
        updates["image_res"] = side * config.patch_size
    if image_res is not None:  # fine-tune at another resolution: interpolate the position grid, as ALBEF does
        if image_res % config.patch_size:
            raise ValueError(f"image_res ({image_res}) must be a multiple of patch_size ({config.patch_size})")
        for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
            if key in source.state:
                source.state[key] = resize_pos_embed(source.state[key], (image_res // config.patch_size) ** 2)
        updates["image_res"] = image_res
    if "image_queue" in shapes:
        updates.update(embed_dim=shapes["image_queue"][0], queue_size=shapes["image_queue"][1])
    return dataclasses.replace(config, **updates)


def albef_from_original(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping, *, task: str | None = None,
                        strict: bool = True, return_report: bool = False, dtype: torch.dtype = torch.float32,
                        image_res: int | None = None):
    """Builds the fastvl ALBEF model for an original checkpoint and loads it.

    state_dict: the original's (load files with :func:`fastvl.convert.load_state_dict_file`,
    weights-only; the ``"model"`` container is unwrapped there). config_dict: ``Pretrain.yaml`` (or
    the task's YAML) as a dict, its ``bert_config`` given as a dict or a path of
    ``config_bert.json`` (opened as given), or the BERT keys merged in. task: ``"pretrain"``
    (:class:`ALBEF` with the MLM head), ``"retrieval"`` (:class:`ALBEF` without it), ``"ve"``
    (SNLI-VE) or ``"nlvr"`` (NLVR2) -- default: told from the keys. The image resolution and queue
    size come from the tensors' shapes; ``image_res`` (e.g. 384 for a 256-px checkpoint)
    interpolates the position embeddings bicubically to that resolution, as ALBEF's fine-tuning
    scripts do. Strict: missing, unused or mis-shaped keys raise :class:`ConversionError` naming
    them. The model's parameters get ``dtype``. Returns the model (eval mode), or
    ``(model, report)`` with ``return_report``.
    """
    raw = SourceState(state_dict)
    task = task or detect_task(list(raw.state), ALBEFConfig.from_original(config_dict).num_hidden_layers)
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    classifier = task in ("ve", "nlvr")
    source = SourceState(state_dict, known_unused=KNOWN_UNUSED + (_CLASSIFIER_MOMENTUM if classifier else ()))
    config = _config_for(source, config_dict, image_res)
    if classifier:
        classes = source.state["cls_head.2.weight"].shape[0] if "cls_head.2.weight" in source else 3
        model = ALBEFClassifier(config, num_classes=classes, num_images=2 if task == "nlvr" else 1)
    else:
        model = ALBEF(config, with_mlm_head=task == "pretrain")
    bert = "bert." if any(k.startswith("text_encoder.bert.") for k in source.state) else ""
    converted = convert_with_rules(model, source, _text_rules(bert, config.fusion_layer))
    for suffix in ("", "_m") if not classifier else ("",):
        encoder = f"text_encoder{suffix}"
        word = converted.get(f"{encoder}.embeddings.word_embeddings.weight")
        bias = converted.get(f"{encoder}.mlm_head.bias")
        check_tied(source, f"{encoder}.cls.predictions.decoder.weight", word, f"{encoder}'s word embeddings")
        check_tied(source, f"{encoder}.cls.predictions.decoder.bias", bias, f"{encoder}.cls.predictions.bias")
    report = load_converted(model.to(dtype), converted, source, strict=strict)
    model.eval()
    return (model, report) if return_report else model


def albef_to_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A fastvl ALBEF model's tensors in the original layout: ``text_encoder[_m].bert.*`` plus the
    tied ``cls.predictions.decoder`` for the pretraining model, ``text_encoder.*`` for the retrieval
    and classifier models (as ALBEF's fine-tuned checkpoints)."""
    if not isinstance(model, (ALBEF, ALBEFClassifier)):
        raise TypeError(f"model must be a fastvl ALBEF or ALBEFClassifier, got {type(model).__name__}")
    has_mlm = isinstance(model, ALBEF) and model.text_encoder.mlm_head is not None
    exported = export_with_rules(model, _text_rules("bert." if has_mlm else "", model.config.fusion_layer))
    if has_mlm:
        for suffix in ("", "_m"):
            encoder = getattr(model, f"text_encoder{suffix}")
            exported[f"text_encoder{suffix}.cls.predictions.decoder.weight"] = \
                encoder.embeddings.word_embeddings.weight.detach().clone()
            exported[f"text_encoder{suffix}.cls.predictions.decoder.bias"] = encoder.mlm_head.bias.detach().clone()
    return exported


def albef_from_fastvl(state_dict: Mapping[str, torch.Tensor], sidecar: Mapping) -> torch.nn.Module:
    """Rebuilds the ALBEF model a ``fastvl convert`` run saved: its state dict and the ``.json``
    sidecar (``class``, ``config``). Loads strictly."""
    config = ALBEFConfig(**sidecar["config"])
    name = str(sidecar["class"]).rsplit(".", 1)[-1]
    if name == "ALBEF":
        model = ALBEF(config, with_mlm_head=any(k.startswith("text_encoder.mlm_head.") for k in state_dict))
    elif name == "ALBEFClassifier":
        fusion = {k.split(".")[2] for k in state_dict if k.startswith("text_encoder.fusion_layers.")}
        images = 2 if len(fusion) > config.num_hidden_layers - config.fusion_layer else 1
        model = ALBEFClassifier(config, num_classes=state_dict["cls_head.2.weight"].shape[0], num_images=images)
    else:
        raise ConversionError(f"the sidecar names {sidecar['class']!r}, not a fastvl ALBEF model")
    model.load_state_dict(dict(state_dict))
    return model.eval()
