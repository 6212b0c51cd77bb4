"""ViLBERT (Lu et al., 2019) on fastvl's fused layers, wired exactly as the released encoder runs it.

Two streams: a BERT text stream (``layer``) and a visual stream over detector regions (``v_layer``),
joined by co-attention layers (``c_layer``). For co-attention layer i, the text stream runs its
layers up to ``t_biattention_id[i]`` and the visual stream up to ``v_biattention_id[i]``, then the
co-attention layer mixes both; after the last one the visual stream runs its remaining layers, then
the text stream. The default 6-layer model therefore runs text 0-5, co 0, [text 6, visual 0, co 1],
..., [text 10, visual 4, co 5], visual 5, text 11: the first co-attention sees the raw region
embeddings. Text layers below ``fixed_t_layer`` (visual below ``fixed_v_layer``) run without grad.

Inputs (the interface the training code uses)::

    input_ids [B, Lt] long, token_type_ids [B, Lt] long, text_mask [B, Lt] bool or 0 / 1 integers
    (True / 1 = real token), region_feats [B, Lv, v_feature_size] float, region_loc [B, Lv, 5] float in
    [0, 1] ([x1/W, y1/H, x2/W, y2/H, area fraction]), region_mask [B, Lv] bool or 0 / 1 (1 = real region).

The original's keyword names work as well (``image_feat``, ``image_loc``, ``attention_mask``,
``image_attention_mask``, ``masked_lm_labels``, ``image_label`` with its 1 / -1 values,
``image_target``, ``next_sentence_label``), so ``model(input_ids, image_feat=..., image_loc=...,
token_type_ids=..., attention_mask=..., image_attention_mask=...)`` runs as the original scripts call
it by keyword. (The original's *positional* order differs: pass those inputs by name.)

Region 0 is the IMG token, built by the data collator (``fastvl.data``): its feature is the mean of
the real regions' features and its location the whole image ``[0, 0, 1, 1, 1]``; it is never masked.

Where the original computes NaN (region KL or MLM with nothing masked), fastvl returns 0 with zero
gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import _checks
from fastvl.dispatch import use_backend
from fastvl.models.bert_config import BertConfig, check_unknown_keys
from fastvl.models.outputs import PretrainingOutput, total
from fastvl.nn import (
    CoAttentionLayer,
    LayerNorm,
    LinearGELU,
    RegionEmbeddings,
    TextEmbeddings,
    TransformerLayer,
    init_bert_weights,
)
from fastvl.nn.common import bool_mask
from fastvl.ops import linear_cross_entropy, linear_region_kl_loss
from fastvl.ops.dropout_seed import shared_seeds
from fastvl.profiling import nvtx_range

# Keys of the original JSON configs that fastvl accepts but that do not change the model it builds.
_IGNORED_ORIGINAL_KEYS = {
    "bi_intermediate_size", "bi_attention_type", "pooling_method", "fast_mode", "in_batch_pairs",
    "intra_gate", "dynamic_attention", "visual_target", "objective", "num_negative", "model", "visualization",
    "predict_feature", "v_initializer_range", "vocab_size_or_config_json_file", "bi_hidden_act",
}


@dataclasses.dataclass
class ViLBERTConfig(BertConfig):
    """ViLBERT's configuration, with the original JSON keys (``bert_base_6layer_6conect.json`` and
    friends) as field names. ``ViLBERTConfig.from_original(json.load(f))`` accepts an original config
    as it is; ``ViLBERTConfig.named("base" | "2-layer" | "4-layer" | "6-layer" | "8-layer" | "tiny")``.

    fastvl additions: ``max_regions`` (the most regions, IMG included, a batch may have) and
    ``layer_norm_eps`` (BERT's 1e-12).
    """

    hidden_act: str = "gelu"
    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_attention_probs_dropout_prob: float = 0.1
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = dataclasses.field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    fixed_t_layer: int = 0
    fixed_v_layer: int = 0
    fusion_method: str = "mul"
    with_coattention: bool = True
    task_specific_tokens: bool = False
    num_task_tokens: int = 20
    max_regions: int = 101

    def __post_init__(self):
        self.v_biattention_id, self.t_biattention_id = list(self.v_biattention_id), list(self.t_biattention_id)
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            raise ValueError(f"v_biattention_id {self.v_biattention_id} and t_biattention_id "
                             f"{self.t_biattention_id} must have the same length (one entry per co-attention layer)")
        for name, ids, depth in (("v_biattention_id", self.v_biattention_id, self.v_num_hidden_layers),
                                 ("t_biattention_id", self.t_biattention_id, self.num_hidden_layers)):
            if any(b < a for a, b in zip(ids, ids[1:])) or any(not 0 <= i <= depth for i in ids):
                raise ValueError(f"{name} must be non-decreasing layer indices in [0, {depth}], got {ids}")
        _checks.choice("fusion_method", self.fusion_method, ("mul", "sum"))
        for name in ("hidden_act", "v_hidden_act"):
            _checks.choice(name, getattr(self, name), ("gelu",))
        for hidden, heads in ((self.hidden_size, self.num_attention_heads),
                              (self.v_hidden_size, self.v_num_attention_heads),
                              (self.bi_hidden_size, self.bi_num_attention_heads)):
            if hidden % heads:
                raise ValueError(f"hidden size {hidden} must be divisible by its number of heads {heads}")

    @property
    def num_co_attention_layers(self) -> int:
        return len(self.v_biattention_id)

    @classmethod
    def from_original(cls, config: Mapping[str, Any], strict: bool = True) -> ViLBERTConfig:
        """From an original JSON config dict (``bert_base_6layer_6conect.json`` and friends, keys as they
        are). Unknown keys raise ``ValueError`` (``strict=False``: ignored with a warning), as every
        fastvl config's ``from_original``."""
        merged = dict(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        if "vocab_size_or_config_json_file" in merged and "vocab_size" not in merged:
            merged["vocab_size"] = merged["vocab_size_or_config_json_file"]
        check_unknown_keys("ViLBERT", sorted(k for k in merged if k not in fields and k not in _IGNORED_ORIGINAL_KEYS),
                           strict)
        return cls(**{k: v for k, v in merged.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def named(cls, name: str, **overrides) -> ViLBERTConfig:
        """A named configuration: "base" (= "6-layer", the paper's default bert_base_6layer_6conect),
        "2-layer", "4-layer", "8-layer" (the paper's co-attention depths; the visual stream has as many
        layers), or "tiny" (small sizes, the same wiring as "2-layer", for tests and CI)."""
        depths = {"2-layer": 2, "4-layer": 4, "6-layer": 6, "base": 6, "8-layer": 8}
        if name in depths:
            depth = depths[name]
            base = dict(v_num_hidden_layers=depth, v_biattention_id=list(range(depth)),
                        t_biattention_id=list(range(12 - depth, 12)))
        elif name == "tiny":
            base = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, v_hidden_size=24, v_num_hidden_layers=2,
                        v_num_attention_heads=2, v_intermediate_size=40, bi_hidden_size=32, bi_num_attention_heads=2,
                        v_biattention_id=[0, 1], t_biattention_id=[2, 3],
                        # BERT's 0.02 scaled to the width (0.02 * sqrt(768 / 32)): at 0.02 each linear
                        # layer shrinks its input ~10x, and the alignment head (a product of two poolers)
                        # starts on a plateau the tiny model does not leave within a demo run.
                        initializer_range=0.1)
        else:
            raise ValueError(f"unknown ViLBERT config {name!r}; known: {[*depths, 'tiny']}")
        return cls(**{**base, **overrides})


# The original code's keyword names (vilbert-multi-task's BertModel / BertForMultiModalPreTraining /
# VILBertForVLTasks) -> fastvl's.
ORIGINAL_NAMES = {"image_feat": "region_feats", "image_loc": "region_loc", "attention_mask": "text_mask",
                  "image_attention_mask": "region_mask", "masked_lm_labels": "mlm_labels",
                  "image_label": "region_labels", "image_target": "region_targets", "next_sentence_label": "is_next"}


def _original_names(where: str, original: dict, **ours) -> dict:
    """``ours`` (fastvl's names -> values, in order) with the values passed under the original's names."""
    for name, value in original.items():
        mine = ORIGINAL_NAMES.get(name)
        if mine is None or mine not in ours:
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")
        if ours[mine] is not None:
            raise TypeError(f"{where}(): {name} (the original's name) and {mine} are the same input; pass one")
        ours[mine] = value
    return ours


def _region_labels(labels: torch.Tensor) -> torch.Tensor:
    """``region_labels`` as bool: bool as it is, or the original's integers (1 = masked, -1 / 0 = not)."""
    if labels.dtype == torch.bool:
        return labels
    if labels.is_floating_point():
        raise TypeError(f"region_labels must be bool or integers (1 = masked, -1 / 0 = not), got {labels.dtype}")
    if not torch.compiler.is_compiling():
        bad = (labels != 1) & (labels != 0) & (labels != -1)
        if bool(bad.any()):
            raise ValueError(f"region_labels must hold 1 (masked) or -1 / 0 (not masked), got the value "
                             f"{labels[bad][0].item()}")
    return labels == 1


@dataclasses.dataclass(frozen=True)
class Packing:
    """A packed ViLBERT batch's layout (FlashAttention's convention, as ``fastvl.data`` collates it):
    ``cu_seqlens_text`` / ``cu_seqlens_regions`` int32 ``[B + 1]`` prefix sums of each sample's text
    and region counts (IMG included), and the longest of each (host ints, so no layer syncs)."""

    cu_seqlens_text: torch.Tensor
    cu_seqlens_regions: torch.Tensor
    max_seqlen_text: int
    max_seqlen_regions: int

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens_text.shape[0] - 1

    def positions(self, total: int) -> torch.Tensor:
        """Each of the ``total`` tokens' position in its own caption ``[total_t]`` (no host sync)."""
        cu = self.cu_seqlens_text.long()
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
        return torch.arange(total, device=cu.device) - starts

    def validate(self, input_ids, token_type_ids, region_feats, region_loc, config) -> None:
        for name, cu in (("cu_seqlens_text", self.cu_seqlens_text), ("cu_seqlens_regions", self.cu_seqlens_regions)):
            _checks.tensor(name, cu, shape="[B + 1] int32", ndim=1, dtypes=(torch.int32,))
        if self.cu_seqlens_regions.shape != self.cu_seqlens_text.shape:
            raise ValueError(f"cu_seqlens_text {list(self.cu_seqlens_text.shape)} and cu_seqlens_regions "
                             f"{list(self.cu_seqlens_regions.shape)} must both be [B + 1]")
        _checks.tensor("input_ids", input_ids, shape="[total_t] int64 (packed)", ndim=1,
                       dtypes=(torch.int64, torch.int32))
        if token_type_ids is not None:
            _checks.same_shape("token_type_ids", token_type_ids, list(input_ids.shape), "[total_t] like input_ids")
        _checks.tensor("region_feats", region_feats, shape=f"[total_v, {config.v_feature_size}] (packed)", ndim=2)
        _checks.same_shape("region_feats", region_feats, [None, config.v_feature_size],
                           f"[total_v, {config.v_feature_size}] (packed, v_feature_size)")
        _checks.tensor("region_loc", region_loc, shape="[total_v, 5] (packed)", ndim=2)
        _checks.same_shape("region_loc", region_loc, [region_feats.shape[0], 5], "[total_v, 5] (packed)")
        if self.max_seqlen_text > config.max_position_embeddings:
            raise ValueError(f"max_seqlen_text {self.max_seqlen_text} is more than the config's "
                             f"max_position_embeddings = {config.max_position_embeddings}")
        if self.max_seqlen_regions > config.max_regions:
            raise ValueError(f"max_seqlen_regions {self.max_seqlen_regions} is more than the config's max_regions = "
                             f"{config.max_regions} (IMG token included)")


def _backend_scope(backend: str | None):
    return use_backend(backend) if backend is not None else contextlib.nullcontext()


class ViLBERTModel(nn.Module):
    """The two-stream encoder (the original's ``BertModel``) with its poolers.

    Parameters: ``embeddings`` (:class:`TextEmbeddings`), ``task_embeddings`` (only with
    ``task_specific_tokens``), ``v_embeddings`` (:class:`RegionEmbeddings`), ``layer.{i}`` /
    ``v_layer.{i}`` (:class:`TransformerLayer`), ``c_layer.{i}`` (:class:`CoAttentionLayer`),
    ``t_pooler`` / ``v_pooler`` (Linear -> bi_hidden_size, ReLU on the first token of each stream).

    ``backend``: run every op on this backend (e.g. "reference", the parity baseline); None = auto.
    ``validate_values``: check region locations are in [0, 1] (one host sync per forward; skipped
    under torch.compile).
    """

    def __init__(self, config: ViLBERTConfig, backend: str | None = None, validate_values: bool = True):
        super().__init__()
        self.config, self.backend, self.validate_values = config, backend, validate_values
        c = config
        self.embeddings = TextEmbeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                                         c.hidden_dropout_prob, c.layer_norm_eps)
        self.task_embeddings = nn.Embedding(c.num_task_tokens, c.hidden_size) if c.task_specific_tokens else None
        self.v_embeddings = RegionEmbeddings(c.v_feature_size, c.v_hidden_size, 5, c.v_hidden_dropout_prob,
                                             c.layer_norm_eps)
        self.layer = nn.ModuleList(
            TransformerLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_dropout_prob,
                             c.attention_probs_dropout_prob, c.layer_norm_eps) for _ in range(c.num_hidden_layers))
        self.v_layer = nn.ModuleList(
            TransformerLayer(c.v_hidden_size, c.v_num_attention_heads, c.v_intermediate_size, c.v_hidden_dropout_prob,
                             c.v_attention_probs_dropout_prob, c.layer_norm_eps) for _ in range(c.v_num_hidden_layers))
        self.c_layer = nn.ModuleList(
            CoAttentionLayer(c.hidden_size, c.v_hidden_size, c.bi_hidden_size, c.bi_num_attention_heads,
                             c.intermediate_size, c.v_intermediate_size, c.hidden_dropout_prob, c.v_hidden_dropout_prob,
                             c.attention_probs_dropout_prob, c.layer_norm_eps)
            for _ in range(c.num_co_attention_layers if c.with_coattention else 0))
        self.t_pooler = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.v_pooler = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.apply(lambda m: init_bert_weights(m, c.initializer_range))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, region_feats: torch.Tensor | None = None,
                region_loc: torch.Tensor | None = None, region_mask: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, output_attentions: bool = False, *,
                packing: Packing | None = None, **original_names) -> dict[str, Any]:
        """Returns a dict: ``sequence_t [B, Lt(+1), hidden]``, ``sequence_v [B, Lv, v_hidden]``,
        ``pooled_t`` / ``pooled_v`` ``[B, bi_hidden]``, ``text_mask`` (with the task token's slot when
        used), and with ``output_attentions`` ``attentions`` = {"t": [...], "v": [...], "c": [(v, t)...]}.
        The original's keyword names are accepted too (:data:`ORIGINAL_NAMES`).

        Packed batches (``packing``, a :class:`Packing`): every per-token input is ``[total_t]`` /
        per-region input ``[total_v, ...]``, no masks; the sequences are ``sequence_t [total_t, hidden]``
        and ``sequence_v [total_v, v_hidden]``, every layer runs on the ragged rows (no padding)."""
        named = _original_names("ViLBERTModel.forward", original_names, region_feats=region_feats,
                                region_loc=region_loc, text_mask=text_mask, region_mask=region_mask)
        region_feats, region_loc, text_mask, region_mask = named.values()
        with _backend_scope(self.backend), shared_seeds():  # one launch draws every dropout seed
            if packing is not None:
                return self._encode_packed(input_ids, token_type_ids, text_mask, region_feats, region_loc,
                                           region_mask, task_ids, output_attentions, packing)
            return self._encode(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask,
                                task_ids, output_attentions)

    def validate(self, input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, task_ids):
        c = self.config
        if region_feats is None or region_loc is None:
            raise TypeError("region_feats [B, Lv, v_feature_size] and region_loc [B, Lv, 5] are required (the "
                            "original's image_feat / image_loc)")
        _checks.tensor("input_ids", input_ids, shape="[B, Lt] int64", ndim=2, dtypes=(torch.int64, torch.int32))
        batch, length = input_ids.shape
        extra = 1 if c.task_specific_tokens else 0
        if length + extra > c.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens (+{extra} task token), more than the config's "
                             f"max_position_embeddings = {c.max_position_embeddings}")
        for name, value in (("token_type_ids", token_type_ids), ("text_mask", text_mask)):
            if value is not None:
                _checks.tensor(name, value, shape="[B, Lt]", ndim=2, dtypes=None)
                _checks.same_shape(name, value, [batch, length], "[B, Lt] like input_ids")
        _checks.tensor("region_feats", region_feats, shape=f"[B, Lv, {c.v_feature_size}]", ndim=3)
        if region_feats.shape[0] != batch:
            raise ValueError(f"region_feats has batch size {region_feats.shape[0]} but input_ids has {batch}; "
                             "the text and image streams must have the same batch size")
        if region_feats.shape[-1] != c.v_feature_size:
            raise ValueError(f"region_feats must have shape [B, Lv, {c.v_feature_size}] (v_feature_size), "
                             f"got {list(region_feats.shape)}")
        regions = region_feats.shape[1]
        if regions > c.max_regions:
            raise ValueError(f"region_feats has {regions} regions, more than the config's max_regions = "
                             f"{c.max_regions} (IMG token included)")
        _checks.tensor("region_loc", region_loc, shape="[B, Lv, 5]", ndim=3)
        _checks.same_shape("region_loc", region_loc, [batch, regions, 5], "[B, Lv, 5] with B, Lv of region_feats")
        if region_mask is not None:
            _checks.tensor("region_mask", region_mask, shape="[B, Lv]", ndim=2, dtypes=None)
            _checks.same_shape("region_mask", region_mask, [batch, regions], "[B, Lv] like region_feats")
        _checks.same_device("input_ids", input_ids, token_type_ids=token_type_ids, text_mask=text_mask,
                            region_feats=region_feats, region_loc=region_loc, region_mask=region_mask)
        if c.task_specific_tokens and task_ids is None:
            raise ValueError("task_ids [B, 1] is required: the config has task_specific_tokens")
        self._check_locations(region_loc)

    def _check_locations(self, region_loc: torch.Tensor) -> None:
        if self.validate_values and not torch.compiler.is_compiling():
            outside = (region_loc < 0) | (region_loc > 1)
            if bool(outside.any()):
                where = outside.nonzero()[0].tolist()
                raise ValueError(f"region_loc must hold [x1/W, y1/H, x2/W, y2/H, area fraction] in [0, 1]; "
                                 f"region_loc{where} = {region_loc[tuple(where)].item():.4g} is outside")

    def _encode(self, input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, task_ids,
                output_attentions):
        self.validate(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, task_ids)
        batch = input_ids.shape[0]
        if text_mask is None:
            text_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if region_mask is None:
            region_mask = torch.ones(region_feats.shape[:2], dtype=torch.bool, device=region_feats.device)
        text_mask = bool_mask("text_mask", text_mask, *input_ids.shape, input_ids.device)
        region_mask = bool_mask("region_mask", region_mask, *region_feats.shape[:2], input_ids.device)
        inserted = None
        if self.task_embeddings is not None:
            inserted = self.task_embeddings(task_ids.view(batch, -1))
            text_mask = torch.cat([text_mask[:, :1], torch.ones_like(text_mask[:, :1]), text_mask[:, 1:]], dim=1)
        text = self.embeddings(input_ids, token_type_ids, insert_after_first=inserted)
        image = self.v_embeddings(region_feats, region_loc)
        text, image, probs = self._streams(text, text_mask, image, region_mask, output_attentions, {}, {}, {})
        result = {"sequence_t": text, "sequence_v": image, "pooled_t": F.relu(self.t_pooler(text[:, 0])),
                  "pooled_v": F.relu(self.v_pooler(image[:, 0])), "text_mask": text_mask, "region_mask": region_mask}
        if output_attentions:
            result["attentions"] = probs
        return result

    def _encode_packed(self, input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, task_ids,
                       output_attentions, packing: Packing):
        c = self.config
        if text_mask is not None or region_mask is not None:
            raise ValueError("a packed batch (packing=...) has no text_mask / region_mask: cu_seqlens delimit it")
        if output_attentions:
            raise ValueError("output_attentions=True needs the padded form, not a packed batch")
        if c.task_specific_tokens:
            raise ValueError("task_specific_tokens needs the padded form, not a packed batch")
        packing.validate(input_ids, token_type_ids, region_feats, region_loc, c)
        self._check_locations(region_loc)
        text = self.embeddings(input_ids[None], None if token_type_ids is None else token_type_ids[None],
                               packing.positions(input_ids.shape[0])[None])[0]
        image = self.v_embeddings(region_feats[None], region_loc[None])[0]
        t_pack = {"cu_seqlens": packing.cu_seqlens_text, "max_seqlen": packing.max_seqlen_text}
        v_pack = {"cu_seqlens": packing.cu_seqlens_regions, "max_seqlen": packing.max_seqlen_regions}
        c_pack = {"cu_seqlens_t": packing.cu_seqlens_text, "max_seqlen_t": packing.max_seqlen_text,
                  "cu_seqlens_v": packing.cu_seqlens_regions, "max_seqlen_v": packing.max_seqlen_regions}
        text, image, _ = self._streams(text, None, image, None, False, t_pack, v_pack, c_pack)
        first_t, first_v = packing.cu_seqlens_text[:-1].long(), packing.cu_seqlens_regions[:-1].long()
        return {"sequence_t": text, "sequence_v": image, "pooled_t": F.relu(self.t_pooler(text[first_t])),
                "pooled_v": F.relu(self.v_pooler(image[first_v])), "text_mask": None, "region_mask": None}

    def _streams(self, text, text_mask, image, region_mask, output_attentions, t_pack, v_pack, c_pack):
        """Both streams through their layers and the co-attention layers, in the original's order."""
        c = self.config
        probs: dict[str, list] = {"t": [], "v": [], "c": []}

        def run(layers, start, end, fixed, hidden, mask, key, pack):
            # the original: layers [start, fixed) without grad (start jumps to fixed), then [start, end)
            if start < fixed:
                with torch.no_grad():
                    for index in range(start, fixed):
                        hidden = self._layer(layers[index], hidden, mask, output_attentions, probs[key], pack)
                start = fixed
            for index in range(start, end):
                hidden = self._layer(layers[index], hidden, mask, output_attentions, probs[key], pack)
            return hidden, start

        t_start = v_start = 0
        for count, (v_end, t_end) in enumerate(zip(c.v_biattention_id, c.t_biattention_id)):
            text, t_start = run(self.layer, t_start, t_end, c.fixed_t_layer, text, text_mask, "t", t_pack)
            image, v_start = run(self.v_layer, v_start, v_end, c.fixed_v_layer, image, region_mask, "v", v_pack)
            if c.with_coattention:
                out = self.c_layer[count](image, region_mask, text, text_mask, output_attentions=output_attentions,
                                          **c_pack)
                image, text = out[0], out[1]
                if output_attentions:
                    probs["c"].append(out[2])
            v_start, t_start = v_end, t_end
        image, _ = run(self.v_layer, v_start, len(self.v_layer), 0, image, region_mask, "v", v_pack)
        text, _ = run(self.layer, t_start, len(self.layer), 0, text, text_mask, "t", t_pack)
        return text, image, probs

    @staticmethod
    def _layer(layer, hidden, mask, output_attentions, probs, pack):
        if output_attentions:
            hidden, layer_probs = layer(hidden, mask, output_attentions=True)
            probs.append(layer_probs)
            return hidden
        return layer(hidden, mask, **pack)


def fuse(config: ViLBERTConfig, pooled_t: torch.Tensor, pooled_v: torch.Tensor) -> torch.Tensor:
    """The fused vector: ``pooled_t * pooled_v`` ("mul") or ``pooled_t + pooled_v`` ("sum")."""
    return pooled_t * pooled_v if config.fusion_method == "mul" else pooled_t + pooled_v


class PredictionTransform(nn.Module):
    """BERT's ``BertPredictionHeadTransform``: ``LN(gelu(dense(x)))`` (parameters ``dense``, ``norm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = LinearGELU(hidden_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(x))


class MLMDecoder(nn.Module):
    """The MLM decoder: ``weight`` is the word-embedding matrix (the same Parameter, tied), ``bias`` its
    own. ``forward(hidden, labels)`` gives the cross-entropy through :func:`fastvl.ops.linear_cross_entropy`
    (labels -1 ignored), ``forward(hidden)`` the scores. The loss runs inside this module's forward so
    that DeepSpeed ZeRO-3 gathers the (partitioned) weights before the fused op reads them."""

    def __init__(self, word_embeddings: nn.Parameter, vocab_size: int):
        super().__init__()
        self.weight = word_embeddings
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # under autocast the head runs in the activations' dtype, as F.linear would
        weight, bias = self.weight.to(hidden.dtype), self.bias.to(hidden.dtype)
        if labels is None:
            return F.linear(hidden, weight, bias)
        return linear_cross_entropy(hidden, weight, bias, labels, -1)


class RegionDecoder(nn.Linear):
    """The masked-region classifier Linear(v_hidden, v_target_size). ``forward(hidden, targets, mask)``
    gives the KL loss through :func:`fastvl.ops.linear_region_kl_loss` (inside this module's forward,
    for ZeRO-3), ``forward(hidden)`` the scores."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weight.to(hidden.dtype), self.bias.to(hidden.dtype)
        if targets is None:
            return F.linear(hidden, weight, bias)
        return linear_region_kl_loss(hidden, weight, bias, targets.to(hidden.dtype), mask)


class PretrainingHeads(nn.Module):
    """ViLBERT's ``BertPreTrainingHeads``: MLM (``predictions``: ``transform`` + ``decoder``, an
    :class:`MLMDecoder` tied to the word embeddings), alignment (``bi_seq_relationship``:
    Linear(bi_hidden, 2)), masked-region classification (``image_predictions``: ``transform`` +
    ``decoder``, a :class:`RegionDecoder` Linear(v_hidden, v_target_size))."""

    def __init__(self, config: ViLBERTConfig, word_embeddings: nn.Parameter):
        super().__init__()
        c = config
        self.predictions = nn.Module()
        self.predictions.transform = PredictionTransform(c.hidden_size, c.layer_norm_eps)
        self.predictions.decoder = MLMDecoder(word_embeddings, c.vocab_size)
        self.bi_seq_relationship = nn.Linear(c.bi_hidden_size, 2)
        self.image_predictions = nn.Module()
        self.image_predictions.transform = PredictionTransform(c.v_hidden_size, c.layer_norm_eps)
        self.image_predictions.decoder = RegionDecoder(c.v_hidden_size, c.v_target_size)

    def init_weights(self, std: float) -> None:
        """BERT's initialisation for every head parameter except the tied word embeddings."""
        for module in (self.predictions.transform, self.bi_seq_relationship, self.image_predictions):
            module.apply(lambda m: init_bert_weights(m, std))
        self.predictions.decoder.bias.data.zero_()


@dataclasses.dataclass
class ViLBERTPretrainingOutput(PretrainingOutput):
    """``loss`` = mlm + region + align (equal weights; the sum of the losses whose labels were given,
    None if none); ``losses`` {"mlm", "region", "align"}; the scores when asked for
    (``return_scores=True``): ``prediction_scores_t [B, Lt, vocab]``, ``prediction_scores_v
    [B, Lv, v_target_size]``, and always ``alignment_scores [B, 2]``; the encoder outputs."""

    alignment_scores: torch.Tensor
    prediction_scores_t: torch.Tensor | None = None
    prediction_scores_v: torch.Tensor | None = None
    encoder: dict[str, Any] | None = None


class ViLBERTForPretraining(nn.Module):
    """ViLBERT with its pretraining heads (the original's ``BertForMultiModalPreTraining``).

    Parameters: ``bert`` (:class:`ViLBERTModel`), ``cls`` (:class:`PretrainingHeads`).
    ``forward(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask,
    mlm_labels=None, region_targets=None, region_labels=None, is_next=None, *, task_ids=None,
    return_scores=False, output_attentions=False)`` -> :class:`ViLBERTPretrainingOutput`.

    * MLM: cross-entropy through the tied decoder over labels ``mlm_labels [B, Lt]`` (-1 = ignored);
      the mean over labelled tokens, 0 with zero gradient when none (the original: NaN).
    * Region: ``KL(region_targets || softmax(scores))`` summed over the ``v_target_size`` classes, over
      regions 1.. (IMG excluded) with ``region_labels [B, Lv]`` True, divided by their count; 0 with
      zero gradient when no region is masked (the original: NaN). ``region_targets [B, Lv, C]``.
    * Packed batches (``cu_seqlens_text`` / ``cu_seqlens_regions`` int32 ``[B + 1]`` with
      ``max_seqlen_text`` / ``max_seqlen_regions``, as ``fastvl.data``'s ``--packed`` collation gives
      them): every per-token input ``[total_t]``, per-region input ``[total_v, ...]``, no masks; the
      model runs on the ragged rows end to end (embeddings, every layer, heads) and gives the
      padded form's losses.
    * Alignment: cross-entropy of ``bi_seq_relationship(dropout(fused))`` against ``is_next [B]``
      (0 = aligned caption); the dropout is ``hidden_dropout_prob`` (the original hard-codes 0.1,
      the default).
    """

    def __init__(self, config: ViLBERTConfig, backend: str | None = None, validate_values: bool = True):
        super().__init__()
        self.config, self.backend = config, backend
        self.bert = ViLBERTModel(config, backend, validate_values)
        self.cls = PretrainingHeads(config, self.bert.embeddings.word_embeddings.weight)
        self.cls.init_weights(config.initializer_range)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, region_feats: torch.Tensor | None = None,
                region_loc: torch.Tensor | None = None, region_mask: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None, region_targets: torch.Tensor | None = None,
                region_labels: torch.Tensor | None = None, is_next: torch.Tensor | None = None, *,
                task_ids: torch.Tensor | None = None, return_scores: bool = False,
                output_attentions: bool = False, cu_seqlens_text: torch.Tensor | None = None,
                cu_seqlens_regions: torch.Tensor | None = None, max_seqlen_text: int | None = None,
                max_seqlen_regions: int | None = None, **original_names) -> ViLBERTPretrainingOutput:
        named = _original_names("ViLBERTForPretraining.forward", original_names, region_feats=region_feats,
                                region_loc=region_loc, text_mask=text_mask, region_mask=region_mask,
                                mlm_labels=mlm_labels, region_labels=region_labels, region_targets=region_targets,
                                is_next=is_next)
        region_feats, region_loc, text_mask, region_mask, mlm_labels, region_labels, region_targets, is_next = \
            named.values()
        packing = None
        if cu_seqlens_text is not None or cu_seqlens_regions is not None:
            if None in (cu_seqlens_text, cu_seqlens_regions, max_seqlen_text, max_seqlen_regions):
                raise ValueError("a packed batch needs cu_seqlens_text, cu_seqlens_regions, max_seqlen_text and "
                                 "max_seqlen_regions (fastvl.data's packed collation gives all four)")
            packing = Packing(cu_seqlens_text, cu_seqlens_regions, int(max_seqlen_text), int(max_seqlen_regions))
        with _backend_scope(self.backend):
            return self._forward(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask,
                                 mlm_labels, region_targets, region_labels, is_next, task_ids, return_scores,
                                 output_attentions, packing)

    def _forward(self, input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, mlm_labels,
                 region_targets, region_labels, is_next, task_ids, return_scores, output_attentions, packing):
        c = self.config
        encoded = self.bert(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask, task_ids,
                            output_attentions, packing=packing)
        if packing is not None:
            return self._heads_packed(encoded, input_ids, region_feats, mlm_labels, region_targets, region_labels,
                                      is_next, return_scores, packing)
        with nvtx_range("heads and losses"):
            batch, regions = region_feats.shape[:2]
            seq_t, seq_v = encoded["sequence_t"], encoded["sequence_v"]
            heads = self.cls
            fused = F.dropout(fuse(c, encoded["pooled_t"], encoded["pooled_v"]), c.hidden_dropout_prob, self.training)
            alignment_scores = heads.bi_seq_relationship(fused)
            hidden_t = heads.predictions.transform(seq_t)
            hidden_v = heads.image_predictions.transform(seq_v)
            losses: dict[str, torch.Tensor] = {}
            if mlm_labels is not None:
                _checks.tensor("mlm_labels", mlm_labels, shape="[B, Lt] int64 (-1 = ignored)", ndim=2,
                               dtypes=(torch.int64, torch.int32))
                _checks.same_shape("mlm_labels", mlm_labels, list(input_ids.shape), "[B, Lt] like input_ids")
                if c.task_specific_tokens:  # the task token's slot is never labelled
                    unlabelled = torch.full_like(mlm_labels[:, :1], -1)
                    mlm_labels = torch.cat([mlm_labels[:, :1], unlabelled, mlm_labels[:, 1:]], dim=1)
                losses["mlm"] = heads.predictions.decoder(hidden_t, mlm_labels)
            if region_targets is not None or region_labels is not None:
                if region_targets is None or region_labels is None:
                    raise ValueError("region_targets and region_labels must be given together")
                _checks.tensor("region_targets", region_targets, shape=f"[B, Lv, {c.v_target_size}]", ndim=3)
                _checks.same_shape("region_targets", region_targets, [batch, regions, c.v_target_size],
                                   "[B, Lv, v_target_size] with B, Lv of region_feats")
                _checks.tensor("region_labels", region_labels, shape="[B, Lv] bool", ndim=2, dtypes=None)
                _checks.same_shape("region_labels", region_labels, [batch, regions], "[B, Lv] like region_mask")
                losses["region"] = heads.image_predictions.decoder(hidden_v[:, 1:], region_targets[:, 1:],
                                                                   _region_labels(region_labels)[:, 1:])
            if is_next is not None:
                _checks.tensor("is_next", is_next, shape="[B] int64 (0 = aligned)", ndim=1,
                               dtypes=(torch.int64, torch.int32))
                _checks.same_shape("is_next", is_next, [batch], "[B]")
                losses["align"] = F.cross_entropy(alignment_scores, is_next.long())
            return self._output(losses, alignment_scores, encoded, hidden_t, hidden_v, return_scores)

    def _output(self, losses, alignment_scores, encoded, hidden_t, hidden_v, return_scores):
        output = ViLBERTPretrainingOutput(total(losses), losses, alignment_scores, encoder=encoded)
        if return_scores:
            output.prediction_scores_t = self.cls.predictions.decoder(hidden_t)
            output.prediction_scores_v = self.cls.image_predictions.decoder(hidden_v)
        return output

    def _heads_packed(self, encoded, input_ids, region_feats, mlm_labels, region_targets, region_labels, is_next,
                      return_scores, packing):
        """The heads on packed rows: the same losses as the padded form (each a mean over its labelled
        tokens / regions, alignment over the B pairs); every sample's first region (IMG) is never scored."""
        c, heads = self.config, self.cls
        with nvtx_range("heads and losses"):
            fused = F.dropout(fuse(c, encoded["pooled_t"], encoded["pooled_v"]), c.hidden_dropout_prob, self.training)
            alignment_scores = heads.bi_seq_relationship(fused)
            hidden_t = heads.predictions.transform(encoded["sequence_t"])
            hidden_v = heads.image_predictions.transform(encoded["sequence_v"])
            losses: dict[str, torch.Tensor] = {}
            if mlm_labels is not None:
                _checks.same_shape("mlm_labels", mlm_labels, list(input_ids.shape), "[total_t] like input_ids (packed)")
                losses["mlm"] = heads.predictions.decoder(hidden_t, mlm_labels)
            if region_targets is not None or region_labels is not None:
                if region_targets is None or region_labels is None:
                    raise ValueError("region_targets and region_labels must be given together")
                total_v = region_feats.shape[0]
                _checks.same_shape("region_targets", region_targets, [total_v, c.v_target_size],
                                   "[total_v, v_target_size] (packed)")
                _checks.same_shape("region_labels", region_labels, [total_v], "[total_v] (packed)")
                img = torch.zeros(total_v, dtype=torch.bool, device=region_feats.device)
                img[packing.cu_seqlens_regions[:-1].long()] = True
                labels = _region_labels(region_labels) & ~img
                losses["region"] = heads.image_predictions.decoder(hidden_v, region_targets, labels)
            if is_next is not None:
                _checks.same_shape("is_next", is_next, [packing.batch_size], "[B]")
                losses["align"] = F.cross_entropy(alignment_scores, is_next.long())
            return self._output(losses, alignment_scores, encoded, hidden_t, hidden_v, return_scores)


class MLPClassifier(nn.Module):
    """The task heads' 2-layer MLP. Release "multi-task" (vilbert-multi-task's ``SimpleClassifier``):
    ``out(LN(gelu(dense(x))))``; release "beta" (vilbert_beta's): ``out(dropout(relu(dense(x))))``
    (its checkpoints store weight-normed matrices, folded by the converter).
    Parameters: ``dense``, ``norm`` (multi-task only), ``out``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, release: str = "multi-task",
                 dropout: float = 0.5, eps: float = 1e-12):
        super().__init__()
        _checks.choice("release", release, ("multi-task", "beta"))
        self.release, self.dropout = release, dropout
        self.dense = LinearGELU(in_dim, hidden_dim) if release == "multi-task" else nn.Linear(in_dim, hidden_dim)
        self.norm = LayerNorm(hidden_dim, eps) if release == "multi-task" else None
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            return self.out(self.norm(self.dense(x)))
        return self.out(F.dropout(F.relu(self.dense(x)), self.dropout, self.training))


@dataclasses.dataclass
class ViLBERTTaskOutput:
    """Every task head's scores (the original computes them all; a task reads its own):
    ``vqa [B, num_labels]``, ``gqa [B, 1533]`` (multi-task), ``nlvr2 [B/2, 2]`` (multi-task, even B),
    ``option_score [B, 1]`` (VCR / retrieval: view as [N, options]), ``snli_ve [B, 3]`` (multi-task),
    ``region_score [B, Lv]`` (RefCOCO+; padded regions -10000), ``token_score [B, Lt]``,
    ``alignment_scores [B, 2]`` (zero-shot retrieval: the pretraining alignment head), ``encoder``."""

    vqa: torch.Tensor
    option_score: torch.Tensor
    region_score: torch.Tensor
    token_score: torch.Tensor
    alignment_scores: torch.Tensor
    gqa: torch.Tensor | None = None
    nlvr2: torch.Tensor | None = None
    snli_ve: torch.Tensor | None = None
    encoder: dict[str, Any] | None = None


class ViLBERTForTasks(nn.Module):
    """ViLBERT with the downstream heads (the original's ``VILBertForVLTasks``).

    Parameters: ``bert``, ``cls`` (pretraining heads, kept for zero-shot retrieval), ``vil_prediction``
    (:class:`MLPClassifier` bi -> 2 bi -> num_labels, VQA), ``vil_logit`` (Linear(bi, 1): VCR and
    retrieval, one score per option), ``vision_logit`` (Linear(v_hidden, 1): RefCOCO+, one score per
    region), ``linguistic_logit`` (Linear(hidden, 1)); release "multi-task" adds ``vil_prediction_gqa``
    (-> 1533), ``vil_binary_prediction`` (2 bi -> 2 bi -> 2, NLVR2 on pairs of fused vectors) and
    ``vil_tri_prediction`` (Linear(bi, 3), SNLI-VE). Loss helpers: :func:`vqa_loss`,
    :func:`multiple_choice_loss`, :func:`region_loss`, :func:`classification_loss`.
    """

    def __init__(self, config: ViLBERTConfig, num_labels: int = 3129, release: str = "multi-task",
                 dropout: float = 0.1, backend: str | None = None, validate_values: bool = True):
        super().__init__()
        _checks.choice("release", release, ("multi-task", "beta"))
        c = config
        self.config, self.backend, self.release, self.dropout = config, backend, release, dropout
        self.bert = ViLBERTModel(config, backend, validate_values)
        self.cls = PretrainingHeads(config, self.bert.embeddings.word_embeddings.weight)
        bi = c.bi_hidden_size
        self.vil_prediction = MLPClassifier(bi, 2 * bi, num_labels, release, eps=c.layer_norm_eps)
        if release == "multi-task":
            self.vil_prediction_gqa = MLPClassifier(bi, 2 * bi, 1533, release, eps=c.layer_norm_eps)
            self.vil_binary_prediction = MLPClassifier(2 * bi, 2 * bi, 2, release, eps=c.layer_norm_eps)
            self.vil_tri_prediction = nn.Linear(bi, 3)
        self.vil_logit = nn.Linear(bi, 1)
        self.vision_logit = nn.Linear(c.v_hidden_size, 1)
        self.linguistic_logit = nn.Linear(c.hidden_size, 1)
        self.cls.init_weights(c.initializer_range)
        for name, module in self.named_children():
            if name not in ("bert", "cls"):
                module.apply(lambda m: init_bert_weights(m, c.initializer_range))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, region_feats: torch.Tensor | None = None,
                region_loc: torch.Tensor | None = None, region_mask: torch.Tensor | None = None, *,
                task_ids: torch.Tensor | None = None, output_attentions: bool = False,
                **original_names) -> ViLBERTTaskOutput:
        named = _original_names("ViLBERTForTasks.forward", original_names, region_feats=region_feats,
                                region_loc=region_loc, text_mask=text_mask, region_mask=region_mask)
        region_feats, region_loc, text_mask, region_mask = named.values()
        with _backend_scope(self.backend):
            encoded = self.bert(input_ids, token_type_ids, text_mask, region_feats, region_loc, region_mask,
                                task_ids, output_attentions)
            raw_fused = fuse(self.config, encoded["pooled_t"], encoded["pooled_v"])
            fused = F.dropout(raw_fused, self.dropout, self.training)
            seq_v = F.dropout(encoded["sequence_v"], self.dropout, self.training)
            seq_t = F.dropout(encoded["sequence_t"], self.dropout, self.training)
            region_pad = (~encoded["region_mask"]).to(seq_v.dtype) * -10000.0
            out = ViLBERTTaskOutput(
                vqa=self.vil_prediction(fused), option_score=self.vil_logit(fused),
                region_score=self.vision_logit(seq_v).squeeze(-1) + region_pad,
                token_score=self.linguistic_logit(seq_t).squeeze(-1),
                alignment_scores=self.cls.bi_seq_relationship(
                    F.dropout(raw_fused, self.config.hidden_dropout_prob, self.training)),
                encoder=encoded)
            if self.release == "multi-task":
                out.gqa = self.vil_prediction_gqa(fused)
                out.snli_ve = self.vil_tri_prediction(fused)
                if fused.shape[0] % 2 == 0:
                    out.nlvr2 = self.vil_binary_prediction(fused.reshape(-1, 2 * fused.shape[1]))
            return out


def vqa_loss(scores: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """VQA: binary cross-entropy on soft answer scores ``[B, num_labels]``, mean x num_labels (the
    original's scaling)."""
    return F.binary_cross_entropy_with_logits(scores, soft_targets.to(scores.dtype)) * soft_targets.shape[1]


def multiple_choice_loss(option_score: torch.Tensor, labels: torch.Tensor, num_options: int) -> torch.Tensor:
    """VCR / caption retrieval: ``option_score [N * options, 1]`` viewed as ``[N, options]``, softmax
    cross-entropy against the right option ``labels [N]``."""
    return F.cross_entropy(option_score.view(-1, num_options), labels.long())


def region_loss(region_score: torch.Tensor, iou: torch.Tensor, region_mask: torch.Tensor,
                threshold: float = 0.5) -> torch.Tensor:
    """RefCOCO+: binary cross-entropy of each real region's score ``[B, Lv]`` against
    ``iou >= threshold``, summed over real regions and divided by B (the original's mean x Lv, where
    padded regions, scored -10000, add nothing)."""
    mask = region_mask.to(region_score.dtype)
    targets = (iou >= threshold).to(region_score.dtype)
    per_region = F.binary_cross_entropy_with_logits(region_score, targets, reduction="none")
    return (per_region * mask).sum() / region_score.shape[0]


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLVR2 (``nlvr2 [B/2, 2]``) and SNLI-VE (``snli_ve [B, 3]``): softmax cross-entropy."""
    return F.cross_entropy(scores, labels.long())
