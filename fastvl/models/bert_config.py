"""The BERT fields that ViLBERT's, VL-BERT's and ALBEF's configurations share."""

from __future__ import annotations

import dataclasses
import warnings


@dataclasses.dataclass
class BertConfig:
    """BERT's text-transformer settings, named as in BERT's ``config.json`` (BERT-base defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12


def check_unknown_keys(family: str, unknown: list[str], strict: bool) -> None:
    """The config contract of every ``from_original(config, strict=True)``: keys that mean nothing to
    fastvl raise ``ValueError`` naming them, or with ``strict=False`` are ignored with a warning."""
    if not unknown:
        return
    if strict:
        raise ValueError(f"unknown {family} config keys {unknown} (pass strict=False to ignore them)")
    warnings.warn(f"{family} config: ignoring unknown keys {unknown}", stacklevel=3)
