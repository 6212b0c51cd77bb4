"""Hugging Face BERT weights -> the BERT part of a fastvl model; all three papers start from BERT-base.

Accepts ``BertModel`` (keys ``embeddings.*``, ``encoder.layer.{i}.*``, ``pooler.*``) and
``BertForPreTraining`` / ``BertForMaskedLM`` state dicts (the same under ``bert.``, plus
``cls.predictions.*``), with ``LayerNorm.weight/bias`` or the older ``gamma/beta``. What is filled,
per family (the rest is left as initialised):

* **ViLBERT** (:class:`~fastvl.models.vilbert.ViLBERTForPretraining` and friends): the text
  stream's embeddings and layers, and the MLM head's transform and bias when the checkpoint has
  them. BERT's tanh pooler has no counterpart (ViLBERT's poolers map to ``bi_hidden_size`` with
  ReLU): skipped.
* **VL-BERT** (:class:`~fastvl.models.vlbert.VLBERT` or a model holding it as ``vlbert``): the
  whole stack, as VL-BERT's ``load_language_pretrained_model``: word and position embeddings, the
  first rows of the token-type table (BERT has 2, VL-BERT 3: the visual type keeps its
  initialisation), the embedding LayerNorm, every layer, the tanh pooler when the model has one,
  and the MLM head when both have it.
* **ALBEF** (:class:`~fastvl.models.albef.ALBEF`): as ALBEF's ``BertForMaskedLM.from_pretrained``
  with ``fusion_layer = f``: the embeddings, text layers ``0 .. f-1`` from BERT's layers
  ``0 .. f-1``, the fusion layers' self-attention and feed-forward from BERT's layers ``f ..``
  (their cross-attention has no BERT counterpart and stays initialised), the MLM head; then the
  momentum text encoder is copied from the loaded one (ALBEF's ``copy_params``). The pooler is
  skipped (ALBEF's text encoder has none).

Strict (the default): a missing or unused BERT key or a shape mismatch raises
:class:`ConversionError` naming them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fastvl.convert.common import ConversionError, ConversionReport, SourceState, load_converted
from fastvl.convert.vilbert import Rule, original_names, text_embedding_rules, transformer_layer_rules

KNOWN_UNUSED = ("pooler.*", "cls.seq_relationship.*", "embeddings.position_ids", "cls.predictions.decoder.*")
_NORM = r"norm\.(weight|bias)$"


def _mlm_head_rules(fastvl_prefix: str) -> list[Rule]:
    """BERT's ``cls.predictions`` for fastvl's MLM heads (ViLBERT's ``predictions`` module with
    ``transform`` / ``decoder.bias``, or :class:`~fastvl.models.vlbert.MaskedLMHead`)."""
    f = re.escape(fastvl_prefix)
    if fastvl_prefix == "cls.predictions":
        return [(rf"^{f}\.decoder\.bias$", lambda m: ["cls.predictions.bias"]),
                (rf"^{f}\.transform\.dense\.(\w+)$", lambda m: [f"cls.predictions.transform.dense.{m[1]}"]),
                (rf"^{f}\.transform\.{_NORM}", lambda m: [f"cls.predictions.transform.LayerNorm.{m[1]}"])]
    return [(rf"^{f}\.bias$", lambda m: ["cls.predictions.bias"]),
            (rf"^{f}\.dense\.(\w+)$", lambda m: [f"cls.predictions.transform.dense.{m[1]}"]),
            (rf"^{f}\.{_NORM}", lambda m: [f"cls.predictions.transform.LayerNorm.{m[1]}"])]


def _family(model: torch.nn.Module) -> str:
    names = dict(model.named_modules())
    if "text_encoder" in names and "visual_encoder" in names:
        return "albef"
    if "vlbert" in names or ("encoder.layers" in names and "end_embedding" in names):
        return "vlbert"
    return "vilbert"


def _rules(model: torch.nn.Module, with_mlm_head: bool) -> tuple[str, list[Rule]]:
    """(prefix of the BERT part in the model, rules fastvl name -> HF name without ``bert.``)."""
    names = dict(model.named_modules())
    family = _family(model)
    if family == "albef":
        p = "text_encoder."
        table = [*text_embedding_rules(f"{p}embeddings", "embeddings"),
                 *transformer_layer_rules(f"{p}text_layers", "encoder.layer"),
                 *transformer_layer_rules(f"{p}fusion_layers", "encoder.layer",
                                          first=len(model.text_encoder.text_layers))]
        if with_mlm_head and f"{p}mlm_head" in names:
            table += _mlm_head_rules(f"{p}mlm_head")
        return p, table
    if family == "vlbert":
        p = "vlbert." if "vlbert" in names else ""
        table = [(rf"^{re.escape(p)}(word|position|token_type)_embeddings\.weight$",
                  lambda m: [f"embeddings.{m[1]}_embeddings.weight"]),
                 (rf"^{re.escape(p)}embedding_{_NORM}", lambda m: [f"embeddings.LayerNorm.{m[1]}"]),
                 *transformer_layer_rules(f"{p}encoder.layers", "encoder.layer"),
                 (rf"^{re.escape(p)}pooler\.(weight|bias)$", lambda m: [f"pooler.dense.{m[1]}"])]
        if with_mlm_head and "mlm_head" in names:
            table += _mlm_head_rules("mlm_head")
        return p, table
    p = "bert." if "bert" in names else ""  # ViLBERT
    table = [*text_embedding_rules(f"{p}embeddings", "embeddings"), *transformer_layer_rules(f"{p}layer", "encoder.layer")]
    if with_mlm_head and "cls.predictions.transform" in names:
        table += _mlm_head_rules("cls.predictions")
    return p, table


def text_stream_from_hf_bert(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                             strict: bool = True) -> ConversionReport:
    """Loads HF BERT weights into the BERT part of ``model`` (ViLBERT's text stream, VL-BERT's whole
    stack or ALBEF's text and fusion encoders; see the module docstring), in place.

    Strict: raises :class:`ConversionError` naming every missing or unused HF key and every shape
    mismatch (e.g. BERT-large weights into a base text stream). Extra HF layers are an error too.
    Returns the report."""
    hf = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    family = _family(model)
    prefix, table = _rules(model, any(k.startswith("cls.predictions.") for k in hf))
    known_unused = KNOWN_UNUSED
    if family == "vlbert" and f"{prefix}pooler.weight" in model.state_dict():
        known_unused = tuple(k for k in KNOWN_UNUSED if k != "pooler.*")  # the model has BERT's pooler
    source = SourceState(hf, known_unused)
    patterns = [re.compile(pattern) for pattern, _ in table]
    state = model.state_dict()
    targets = [name for name in state if any(p.match(name) for p in patterns)]
    if not targets:
        raise ConversionError(f"{type(model).__name__} has no BERT part ({prefix}embeddings, layers)")
    converted = {name: source.take_cat(original_names(name, table)) for name in targets}
    token_types = f"{prefix}token_type_embeddings.weight"
    if family == "vlbert" and converted.get(token_types) is not None:
        rows = converted[token_types]
        if rows.shape[0] < state[token_types].shape[0] and rows.shape[1:] == state[token_types].shape[1:]:
            converted[token_types] = torch.cat([rows, state[token_types][rows.shape[0]:].to(rows.dtype)])
    decoder = hf.get("cls.predictions.decoder.weight")
    words = next((v for k, v in converted.items() if k.endswith("word_embeddings.weight")), None)
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ConversionError("cls.predictions.decoder.weight differs from the word embeddings; BERT ties them")
    report = load_converted(model, converted, source, strict=strict, expected=targets)
    if family == "albef":
        with torch.no_grad():  # ALBEF's copy_params: the momentum text encoder starts as the online one
            for online, moving in zip(model.text_encoder.parameters(), model.text_encoder_m.parameters()):
                moving.copy_(online)
    return report
