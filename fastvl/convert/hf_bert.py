"""Hugging Face BERT weights -> a fastvl text stream (the ViLBERT paper starts from BERT-base).

Accepts ``BertModel`` (keys ``embeddings.*``, ``encoder.layer.{i}.*``, ``pooler.*``) and
``BertForPreTraining`` / ``BertForMaskedLM`` state dicts (the same under ``bert.``, plus
``cls.predictions.*``), with ``LayerNorm.weight/bias`` or the older ``gamma/beta``. Fills the text
embeddings and the text layers and, when the target has them, the MLM head's transform and bias (the
decoder is tied to the word embeddings) when the checkpoint has it. BERT's tanh pooler and next-sentence head have no
counterpart in ViLBERT (its poolers map to ``bi_hidden_size`` with ReLU): they are reported as
known and skipped. Every other parameter (visual stream, co-attention) is left as initialised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fastvl.convert.common import ConversionError, ConversionReport, SourceState, load_converted
from fastvl.convert.vilbert import Rule, original_names, text_embedding_rules, transformer_layer_rules

KNOWN_UNUSED = ("pooler.*", "cls.seq_relationship.*", "embeddings.position_ids", "cls.predictions.decoder.*")


def _rules(model: torch.nn.Module, with_mlm_head: bool) -> tuple[str, list[Rule]]:
    """(prefix of the text stream in the model, rules fastvl name -> HF name without ``bert.``)."""
    names = dict(model.named_modules())
    prefix = "bert." if "bert" in names else ""
    table = [*text_embedding_rules(f"{prefix}embeddings", "embeddings"),
             *transformer_layer_rules(f"{prefix}layer", "encoder.layer")]
    if with_mlm_head and "cls.predictions.transform" in names:
        table += [(r"^cls\.predictions\.decoder\.bias$", lambda m: ["cls.predictions.bias"]),
                  (r"^cls\.predictions\.transform\.dense\.(\w+)$",
                   lambda m: [f"cls.predictions.transform.dense.{m[1]}"]),
                  (r"^cls\.predictions\.transform\.norm\.(\w+)$",
                   lambda m: [f"cls.predictions.transform.LayerNorm.{m[1]}"])]
    return prefix, table


def text_stream_from_hf_bert(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                             strict: bool = True) -> ConversionReport:
    """Loads HF BERT weights into ``model``'s text stream (a ViLBERT model, its pretraining / task
    wrapper, or anything with ``embeddings`` and ``layer`` in fastvl's layout), in place.

    Strict: raises :class:`ConversionError` naming every missing or unused HF key and every shape
    mismatch (e.g. BERT-large weights into a base text stream). Extra HF layers are an error too.
    Returns the report."""
    hf = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    source = SourceState(hf, KNOWN_UNUSED)
    prefix, table = _rules(model, any(k.startswith("cls.predictions.") for k in hf))
    patterns = [re.compile(pattern) for pattern, _ in table]
    targets = [name for name in model.state_dict() if any(p.match(name) for p in patterns)]
    if not targets:
        raise ConversionError(f"{type(model).__name__} has no BERT text stream ({prefix}embeddings, {prefix}layer)")
    converted = {name: source.take_cat(original_names(name, table)) for name in targets}
    decoder = hf.get("cls.predictions.decoder.weight")
    words = converted.get(f"{prefix}embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ConversionError("cls.predictions.decoder.weight differs from the word embeddings; BERT ties them")
    return load_converted(model, converted, source, strict=strict, expected=targets)
