"""ViLBERT checkpoints (facebookresearch/vilbert-multi-task, jiasenlu/vilbert_beta) <-> fastvl.

Original layout: ``bert.embeddings.{word,position,token_type}_embeddings``, ``bert.embeddings.
LayerNorm`` (``task_embeddings`` with task tokens), ``bert.v_embeddings.{image_embeddings,
image_location_embeddings,LayerNorm}``, ``bert.encoder.{layer,v_layer}.{i}.{attention.self.{query,key,
value}, attention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm}}`` (query /
key / value fused here into one ``qkv``), ``bert.encoder.c_layer.{i}.biattention.{query,key,value}
{1,2}`` (1 = from the image stream, fused into ``v_qkv``; 2 = from the text, ``t_qkv``),
``...biOutput.{dense1,LayerNorm1,dense2,LayerNorm2}``, ``...{v,t}_intermediate.dense``,
``...{v,t}_output.{dense,LayerNorm}``, ``bert.{t,v}_pooler.dense``, ``cls.predictions.{bias,
transform.dense,transform.LayerNorm,decoder}`` (decoder tied to the word embeddings),
``cls.bi_seq_relationship``, ``cls.imagePredictions.{transform.dense,transform.LayerNorm,decoder}``.
Task models (``VILBertForVLTasks``) add ``vil_prediction.logit_fc.{0,2,3}`` (the older release:
weight-normed ``vil_prediction.main.{0,3}.weight_{g,v}`` and bias, ReLU, no LayerNorm),
``vil_prediction_gqa``, ``vil_binary_prediction``, ``vil_logit``, ``vil_tri_prediction``,
``vision_logit``, ``linguisic_logit`` (sic). ``biOutput.q_dense1`` / ``q_dense2`` are defined by the
original but never used in its forward: they are reported as known and skipped, and not exported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastvl.convert.common import ConversionError, ConversionReport, Rule, SourceState, load_converted, original_names
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks

KNOWN_UNUSED = ("bert.encoder.c_layer.*.biOutput.q_dense1.*", "bert.encoder.c_layer.*.biOutput.q_dense2.*",
                "bert.embeddings.position_ids")
TIED_DECODER = "cls.predictions.decoder.weight"
_NORM = r"(?:norm)\.(weight|bias)$"


def transformer_layer_rules(fastvl_prefix: str, original_prefix: str, first: int = 0) -> list[Rule]:
    """Rules for a :class:`fastvl.nn.TransformerLayer` list at ``fastvl_prefix.{i}`` stored in BERT's
    names at ``original_prefix.{first + i}`` (query / key / value concatenated into ``qkv``)."""
    f = re.escape(fastvl_prefix)

    def layer(m):
        return f"{original_prefix}.{first + int(m[1])}"

    return [
        (rf"^{f}\.(\d+)\.attention\.qkv\.(\w+)$",
         lambda m: [f"{layer(m)}.attention.self.{p}.{m[2]}" for p in ("query", "key", "value")]),
        (rf"^{f}\.(\d+)\.attention\.dense\.(\w+)$", lambda m: [f"{layer(m)}.attention.output.dense.{m[2]}"]),
        (rf"^{f}\.(\d+)\.attention\.{_NORM}", lambda m: [f"{layer(m)}.attention.output.LayerNorm.{m[2]}"]),
        (rf"^{f}\.(\d+)\.ffn\.intermediate\.(\w+)$", lambda m: [f"{layer(m)}.intermediate.dense.{m[2]}"]),
        (rf"^{f}\.(\d+)\.ffn\.output\.(\w+)$", lambda m: [f"{layer(m)}.output.dense.{m[2]}"]),
        (rf"^{f}\.(\d+)\.ffn\.{_NORM}", lambda m: [f"{layer(m)}.output.LayerNorm.{m[2]}"]),
    ]


def text_embedding_rules(fastvl_prefix: str, original_prefix: str) -> list[Rule]:
    """Rules for :class:`fastvl.nn.TextEmbeddings` (``norm`` = BERT's ``LayerNorm``)."""
    f, o = re.escape(fastvl_prefix), original_prefix
    return [(rf"^{f}\.{_NORM}", lambda m: [f"{o}.LayerNorm.{m[1]}"]),
            (rf"^{f}\.(\w+_embeddings\.weight)$", lambda m: [f"{o}.{m[1]}"])]


def _mlp_rules(name: str, release: str) -> list[Rule]:
    if release == "beta":  # weight-normed Linear -> ReLU -> Dropout -> weight-normed Linear
        return [(rf"^{name}\.dense\.(weight|bias)$", lambda m: [f"{name}.main.0.{m[1]}"]),
                (rf"^{name}\.out\.(weight|bias)$", lambda m: [f"{name}.main.3.{m[1]}"])]
    return [(rf"^{name}\.dense\.(\w+)$", lambda m: [f"{name}.logit_fc.0.{m[1]}"]),
            (rf"^{name}\.{_NORM}", lambda m: [f"{name}.logit_fc.2.{m[1]}"]),
            (rf"^{name}\.out\.(\w+)$", lambda m: [f"{name}.logit_fc.3.{m[1]}"])]


def rules(release: str | None) -> list[Rule]:
    """fastvl name -> original name(s) for the pretraining model (``release=None``) or the task model."""
    c = r"^bert\.c_layer\.(\d+)\."
    oc = "bert.encoder.c_layer"
    table: list[Rule] = [
        *text_embedding_rules("bert.embeddings", "bert.embeddings"),
        (r"^bert\.task_embeddings\.weight$", lambda m: ["bert.embeddings.task_embeddings.weight"]),
        (r"^bert\.v_embeddings\." + _NORM, lambda m: [f"bert.v_embeddings.LayerNorm.{m[1]}"]),
        (r"^bert\.v_embeddings\.(image_\w+)\.(\w+)$", lambda m: [f"bert.v_embeddings.{m[1]}.{m[2]}"]),
        *transformer_layer_rules("bert.layer", "bert.encoder.layer"),
        *transformer_layer_rules("bert.v_layer", "bert.encoder.v_layer"),
        (c + r"v_qkv\.(\w+)$", lambda m: [f"{oc}.{m[1]}.biattention.{p}1.{m[2]}" for p in ("query", "key", "value")]),
        (c + r"t_qkv\.(\w+)$", lambda m: [f"{oc}.{m[1]}.biattention.{p}2.{m[2]}" for p in ("query", "key", "value")]),
        (c + r"dense([12])\.(\w+)$", lambda m: [f"{oc}.{m[1]}.biOutput.dense{m[2]}.{m[3]}"]),
        (c + r"norm([12])\.(\w+)$", lambda m: [f"{oc}.{m[1]}.biOutput.LayerNorm{m[2]}.{m[3]}"]),
        (c + r"([vt])_ffn\.intermediate\.(\w+)$", lambda m: [f"{oc}.{m[1]}.{m[2]}_intermediate.dense.{m[3]}"]),
        (c + r"([vt])_ffn\.output\.(\w+)$", lambda m: [f"{oc}.{m[1]}.{m[2]}_output.dense.{m[3]}"]),
        (c + r"([vt])_ffn\." + _NORM, lambda m: [f"{oc}.{m[1]}.{m[2]}_output.LayerNorm.{m[3]}"]),
        (r"^bert\.([tv])_pooler\.(\w+)$", lambda m: [f"bert.{m[1]}_pooler.dense.{m[2]}"]),
        (r"^cls\.predictions\.decoder\.bias$", lambda m: ["cls.predictions.bias"]),
        (r"^cls\.predictions\.decoder\.weight$", lambda m: [TIED_DECODER]),
        (r"^cls\.predictions\.transform\.dense\.(\w+)$", lambda m: [f"cls.predictions.transform.dense.{m[1]}"]),
        (r"^cls\.predictions\.transform\." + _NORM, lambda m: [f"cls.predictions.transform.LayerNorm.{m[1]}"]),
        (r"^cls\.bi_seq_relationship\.(\w+)$", lambda m: [f"cls.bi_seq_relationship.{m[1]}"]),
        (r"^cls\.image_predictions\.transform\.dense\.(\w+)$",
         lambda m: [f"cls.imagePredictions.transform.dense.{m[1]}"]),
        (r"^cls\.image_predictions\.transform\." + _NORM,
         lambda m: [f"cls.imagePredictions.transform.LayerNorm.{m[1]}"]),
        (r"^cls\.image_predictions\.decoder\.(\w+)$", lambda m: [f"cls.imagePredictions.decoder.{m[1]}"]),
    ]
    if release is not None:
        for head in ("vil_prediction", "vil_prediction_gqa", "vil_binary_prediction"):
            table += _mlp_rules(head, release)
        table += [(r"^(vil_logit|vil_tri_prediction|vision_logit)\.(\w+)$", lambda m: [f"{m[1]}.{m[2]}"]),
                  (r"^linguistic_logit\.(\w+)$", lambda m: [f"linguisic_logit.{m[1]}"])]
    return table


def detect_layout(keys: Sequence[str]) -> str | None:
    """None for the pretraining layout; "multi-task" or "beta" for a ``VILBertForVLTasks`` state dict."""
    if any(k.startswith("vil_prediction.main.") for k in keys):
        return "beta"
    if any(k.startswith(("vil_prediction.", "vil_logit.")) for k in keys):
        return "multi-task"
    return None


def _fold_weight_norm(source: SourceState, key: str) -> torch.Tensor | None:
    """``weight = g * v / ||v||`` (``torch.nn.utils.weight_norm(dim=None)``, the older release)."""
    stem = key.removesuffix(".weight")
    g, v = source.take(f"{stem}.weight_g"), source.take(f"{stem}.weight_v")
    if g is None or v is None:
        return None
    return (g.double() * v.double() / v.double().norm()).to(v.dtype)


def vilbert_from_original(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any] | ViLBERTConfig,
                          *, strict: bool = True, return_report: bool = False, **model_kwargs):
    """Builds a fastvl ViLBERT from an original state dict and its JSON config (keys as they are).

    The layout decides the model: ``BertForMultiModalPreTraining`` -> :class:`ViLBERTForPretraining`;
    ``VILBertForVLTasks`` -> :class:`ViLBERTForTasks` (``release`` "multi-task", or "beta" for the
    older weight-normed heads, whose weights are folded; ``num_labels`` from ``vil_prediction``).
    Strict: raises :class:`ConversionError` naming every missing / unused key, shape mismatch, or a
    decoder that is not tied to the word embeddings. ``model_kwargs`` go to the model (e.g.
    ``backend``). Returns the model (in eval mode), or ``(model, report)`` with ``return_report``.
    """
    config = config_dict if isinstance(config_dict, ViLBERTConfig) else ViLBERTConfig.from_original(config_dict, strict=False)
    source = SourceState(state_dict, KNOWN_UNUSED)
    release = detect_layout(list(source.state))
    if release is None:
        model = ViLBERTForPretraining(config, **model_kwargs)
    else:
        stem = "vil_prediction.main.3" if release == "beta" else "vil_prediction.logit_fc.3"
        bias = source.state.get(f"{stem}.bias")
        num_labels = bias.shape[0] if bias is not None else 3129
        model = ViLBERTForTasks(config, num_labels=num_labels, release=release, **model_kwargs)
    table = rules(release)
    converted: dict[str, torch.Tensor | None] = {}
    for name in model.state_dict():
        originals = original_names(name, table)
        if originals == [TIED_DECODER]:
            continue
        if release == "beta" and len(originals) == 1 and re.match(r"vil_prediction\.main\.\d\.weight$", originals[0]):
            converted[name] = _fold_weight_norm(source, originals[0])
        else:
            converted[name] = source.take_cat(originals)
    converted[TIED_DECODER] = _tied_decoder(source, converted["bert.embeddings.word_embeddings.weight"])
    report = load_converted(model, converted, source, strict=strict)
    model.eval()
    return (model, report) if return_report else model


def _tied_decoder(source: SourceState, word_embeddings: torch.Tensor | None) -> torch.Tensor | None:
    """The MLM decoder is the word-embedding matrix; a checkpoint that stores it must store the same."""
    if TIED_DECODER in source:
        decoder = source.take(TIED_DECODER)
        if word_embeddings is not None and not torch.equal(decoder, word_embeddings):
            raise ConversionError(f"{TIED_DECODER} differs from bert.embeddings.word_embeddings.weight, but "
                                  "ViLBERT ties them; this checkpoint is not a ViLBERT one")
    return word_embeddings


def vilbert_to_original(model: ViLBERTForPretraining | ViLBERTForTasks) -> dict[str, torch.Tensor]:
    """The model's weights in the original layout (the inverse of :func:`vilbert_from_original`), the
    tied decoder written out as its own copy, as the original saves it. Lossless round trip, except for the older
    release's weight-normed heads, exported as ``v = W``, ``g = ||W||`` (equal up to float rounding)."""
    release = getattr(model, "release", None)
    table = rules(release)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        originals = original_names(name, table)
        tensor = tensor.detach().clone()
        if release == "beta" and re.match(r"vil_prediction\.main\.\d\.weight$", originals[0]):
            stem = originals[0].removesuffix(".weight")
            out[f"{stem}.weight_v"] = tensor
            out[f"{stem}.weight_g"] = tensor.norm().reshape(())
            continue
        for original, part in zip(originals, tensor.chunk(len(originals), dim=0)):
            out[original] = part.clone()
    return out


__all__ = ["ConversionReport", "Rule", "original_names", "vilbert_from_original", "vilbert_to_original",
           "transformer_layer_rules", "text_embedding_rules"]
