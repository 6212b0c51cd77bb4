"""VL-BERT (Su et al., 2020): one BERT stream over the caption's tokens and the image's regions.

The stream is packed as the original packs it: the real text tokens first, then the valid objects,
then a learned END embedding, padding only at the tail. Text tokens keep positions ``0..n-1``;
every object shares position ``n``; END takes ``n + 1``. Segments: the text's own token types (A = 0,
B = 1), objects and END C = 2. Every element also carries a visual feature embedding: the text tokens
that of the region named by their tag (by default region 0, the whole-image box), the objects their
own. Visual features pass through the zero-initialised ``visual_ln_text`` / ``visual_ln_object``
LayerNorms, so training starts from BERT's text-only behaviour.

Packing is done with one stable sort of ``(text, object, END, padding)`` group ids and a gather:
no host sync, the packed length is fixed at ``Lt + R + 1`` (the original trims to the longest row;
the extra tail rows are padding and change no output).

Models: :class:`VLBERT` (the backbone), :class:`VLBERTForPretraining` (MLM with visual clues,
masked RoI classification, the optional sentence-image relation head), and the task models
:class:`VLBERTForVQA`, :class:`VLBERTForVCR`, :class:`VLBERTForRefCOCO`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import _checks
from fastvl.models.bert_config import BertConfig, check_unknown_keys
from fastvl.models.outputs import PretrainingOutput, total
from fastvl.nn import LayerNorm, TransformerEncoder, init_bert_weights
from fastvl.nn.common import on_backend, zero_one_mask
from fastvl.nn.geometry import VisualFeatureEmbedding
from fastvl.ops import bias_gelu, linear_cross_entropy
from fastvl.profiling import nvtx_range

# Keys of the original ``NETWORK.VLBERT`` config that describe training, not the network.
_TRAINING_ONLY_KEYS = {"input_transform_type", "pos_embedding_frozen", "from_scratch", "initializer_range"}


@dataclasses.dataclass
class VLBERTConfig(BertConfig):
    """VL-BERT's configuration. Field names are the original ``NETWORK.VLBERT`` keys where one exists;
    the rest are fastvl's (feature width, sinusoid size, class counts, which heads exist)."""

    hidden_act: str = "gelu"
    type_vocab_size: int = 3
    visual_size: int = 768  # IMAGE_FINAL_DIM: width of the visual feature embedding
    visual_ln: bool = True
    visual_scale_text_init: float = 0.0
    visual_scale_object_init: float = 0.0
    with_pooler: bool = False
    visual_feature_dim: int = 2048  # RoI feature width
    sinusoid_dim: int = 256  # per coordinate; the geometry is 8 * sinusoid_dim wide
    visual_region_classes: int = 1601  # detector classes (masked RoI classification)
    object_word_classes: int = 1  # object_word_embed_mode 2 -> 1 (one shared embedding), 1 -> 81
    with_mlm_head: bool = True
    with_mvrc_head: bool = True
    with_rel_head: bool = False  # off in the released pretraining config
    pad_token_id: int = 0

    @classmethod
    def named(cls, name: str, **overrides) -> VLBERTConfig:
        """``"base"`` (12 x 768), ``"large"`` (24 x 1024) or ``"tiny"`` (for tests)."""
        _checks.choice("name", name, list(VLBERT_CONFIGS))
        return cls(**{**VLBERT_CONFIGS[name], **overrides})

    @classmethod
    def from_original(cls, config: Mapping, strict: bool = True) -> VLBERTConfig:
        """From the original YAML config as a dict: the whole file (``NETWORK.VLBERT`` and the
        ``NETWORK.WITH_*_LOSS`` / ``IMAGE_FINAL_DIM`` flags are read) or its ``NETWORK.VLBERT`` part.
        Unknown keys raise ``ValueError`` (``strict=False``: ignored with a warning); settings fastvl cannot honour
        (frozen word embeddings with special words, absolute object positions, semantic object
        embeddings) always raise."""
        values: dict = {}
        network = config.get("NETWORK") if isinstance(config.get("NETWORK"), Mapping) else None
        vlbert = dict(network["VLBERT"] if network is not None else config)
        if network is not None:
            flags = {"WITH_MLM_LOSS": "with_mlm_head", "WITH_MVRC_LOSS": "with_mvrc_head",
                     "WITH_REL_LOSS": "with_rel_head"}
            values.update({field: bool(network[key]) for key, field in flags.items() if key in network})
            if network.get("IMAGE_SEMANTIC"):
                raise ValueError("NETWORK.IMAGE_SEMANTIC (class embeddings in the RoI feature) is not supported")
            if "IMAGE_FINAL_DIM" in network:
                values["visual_size"] = int(network["IMAGE_FINAL_DIM"])
        if vlbert.pop("word_embedding_frozen", False):
            raise ValueError("word_embedding_frozen=True (separate special-word embeddings) is not supported")
        if not vlbert.pop("obj_pos_id_relative", True):
            raise ValueError("obj_pos_id_relative=False (objects at positions 510/511) is not supported; the "
                             "original asserts against it too")
        if vlbert.pop("position_padding_idx", -1) != -1:
            raise ValueError("position_padding_idx other than -1 (RoBERTa positions) is not supported")
        mode = vlbert.pop("object_word_embed_mode", 2)
        if mode not in (1, 2):
            raise ValueError(f"object_word_embed_mode must be 1 (81 classes) or 2 (one embedding), got {mode}")
        values["object_word_classes"] = 81 if mode == 1 else 1
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in vlbert if k not in fields and k not in _TRAINING_ONLY_KEYS)
        check_unknown_keys("VL-BERT", unknown, strict)
        values.update({k: v for k, v in vlbert.items() if k in fields})
        config_out = cls(**values)
        if config_out.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu', got {config_out.hidden_act!r}")
        return config_out


VLBERT_CONFIGS: dict[str, dict] = {
    "base": {},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "visual_size": 1024},
    "tiny": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 40, "visual_size": 32, "visual_feature_dim": 24,
             "sinusoid_dim": 4, "visual_region_classes": 11},
}


@dataclasses.dataclass
class VLBERTOutput:
    """``sequence`` [B, L, H] packed states (L = Lt + R + 1), ``attention_mask`` [B, L] (True = real),
    ``text`` [B, Lt, H] and ``objects`` [B, R, H] unpacked to the inputs' layout (zeros where padded),
    ``pooled`` [B, H] (tanh pooler on position 0, or None), ``attentions`` (per layer, on request)."""

    sequence: torch.Tensor
    attention_mask: torch.Tensor
    text: torch.Tensor
    objects: torch.Tensor
    pooled: torch.Tensor | None = None
    attentions: list | None = None


def dense_gelu(dense: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``gelu(dense(x))`` with the bias + GELU fused (:func:`fastvl.ops.bias_gelu`)."""
    return bias_gelu(F.linear(x, dense.weight), dense.bias)


class MaskedLMHead(nn.Module):
    """BERT's MLM head: ``dense -> GELU -> LayerNorm`` then the decoder, whose weight is the word
    embedding matrix passed in at call time (tied), plus ``bias``."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(dense_gelu(self.dense, hidden))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]``."""
        return F.linear(self.transform(hidden), decoder_weight, self.bias)

    def loss(self, hidden: torch.Tensor, decoder_weight: torch.Tensor, labels: torch.Tensor,
             ignore_index: int) -> torch.Tensor:
        """Mean cross-entropy over labelled positions through :func:`fastvl.ops.linear_cross_entropy`;
        0 with zero gradient when no position is labelled (the original's mean gives NaN there)."""
        hidden = self.transform(hidden)  # under autocast: the low-precision dtype the projection runs in
        return linear_cross_entropy(hidden, decoder_weight.to(hidden.dtype), self.bias.to(hidden.dtype), labels,
                                    ignore_index)


class VLBERT(nn.Module):
    """The VL-BERT backbone: embeddings, visual feature embedding, packing, BERT encoder, pooler.

    Parameters: ``word_embeddings``, ``end_embedding`` [1, H], ``position_embeddings``,
    ``token_type_embeddings`` [3, H], ``embedding_norm``, ``visual`` (geometry + RoI feature ->
    visual_size; the original's ``obj_downsample``), ``object_linguistic_embeddings``,
    ``visual_1x1_text`` / ``visual_1x1_object`` (only when visual_size != hidden_size),
    ``visual_ln_text`` / ``visual_ln_object`` (or scalar ``visual_scale_text`` / ``visual_scale_object``
    when ``visual_ln`` is off), ``encoder`` (:class:`fastvl.nn.TransformerEncoder`), ``pooler``.
    """

    def __init__(self, config: VLBERTConfig, backend: str | None = None):
        super().__init__()
        self.config = c = config
        self.backend = backend
        h = c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, h)
        self.end_embedding = nn.Embedding(1, h)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, h)
        self.embedding_norm = LayerNorm(h, c.layer_norm_eps)
        self.visual = VisualFeatureEmbedding(c.visual_feature_dim, c.visual_size, c.sinusoid_dim, dropout=0.1)
        self.object_linguistic_embeddings = nn.Embedding(c.object_word_classes, h)
        self.visual_1x1_text = nn.Linear(c.visual_size, h) if c.visual_size != h else None
        self.visual_1x1_object = nn.Linear(c.visual_size, h) if c.visual_size != h else None
        if c.visual_ln:
            self.visual_ln_text = LayerNorm(h, c.layer_norm_eps)
            self.visual_ln_object = LayerNorm(h, c.layer_norm_eps)
        else:
            self.visual_scale_text = nn.Parameter(torch.tensor(float(c.visual_scale_text_init)))
            self.visual_scale_object = nn.Parameter(torch.tensor(float(c.visual_scale_object_init)))
        self.encoder = TransformerEncoder(c.num_hidden_layers, h, c.num_attention_heads, c.intermediate_size,
                                          c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.layer_norm_eps)
        self.pooler = nn.Linear(h, h) if c.with_pooler else None
        self.apply(lambda m: init_bert_weights(m, c.initializer_range))
        if c.visual_ln:
            self.visual_ln_text.weight.data.fill_(c.visual_scale_text_init)
            self.visual_ln_object.weight.data.fill_(c.visual_scale_object_init)

    def _visual(self, reps: torch.Tensor, which: str) -> torch.Tensor:
        projection = getattr(self, f"visual_1x1_{which}")
        if projection is not None:
            reps = projection(reps)
        if self.config.visual_ln:
            return getattr(self, f"visual_ln_{which}")(reps)
        return reps * getattr(self, f"visual_scale_{which}")

    @on_backend
    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor, *,
                token_type_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, text_tags: torch.Tensor | None = None,
                object_classes: torch.Tensor | None = None, masked_regions: torch.Tensor | None = None,
                mask_visual_embedding: torch.Tensor | None = None, mask_word_embedding: torch.Tensor | None = None,
                output_attentions: bool = False, unpad: bool = False, cu_seqlens_text: torch.Tensor | None = None,
                cu_seqlens_regions: torch.Tensor | None = None, max_seqlen_text: int | None = None,
                max_seqlen_regions: int | None = None) -> VLBERTOutput:
        """Encodes a batch.

        input_ids ``[B, Lt]`` (e.g. ``[CLS] caption [SEP]``); region_features ``[B, R, F]`` (F =
        ``visual_feature_dim``, 2048); boxes ``[B, R, 4]`` normalised ``(x1, y1, x2, y2)`` in [0, 1];
        region 0 is by convention the whole image (``[0, 0, 1, 1]``, its feature the mean of the
        others), whose representation every text token receives unless ``text_tags`` ``[B, Lt]``
        names another region. token_type_ids ``[B, Lt]`` in {0, 1} (default 0); text_mask ``[B, Lt]``
        (default ``input_ids != pad``, the original's ``> 0``); region_mask ``[B, R]`` (default all
        real; the boxes of padded regions are not read); masks are bool or 0 / 1 integers (1 = real); object_classes ``[B, R]`` indexes
        ``object_linguistic_embeddings`` (default 0). masked_regions ``[B, R]`` bool: those regions'
        features become ``mask_visual_embedding`` [F] and their word embedding
        ``mask_word_embedding`` [H] (masked RoI classification). ``unpad=True`` runs the encoder on the
        real rows only (packed ``[total, H]`` with ``cu_seqlens``; one host sync for the total), which
        skips the tail padding's work; the results are the same.

        Packed inputs (``cu_seqlens_text`` / ``cu_seqlens_regions`` int32 ``[B + 1]`` with
        ``max_seqlen_text`` / ``max_seqlen_regions``, as ``fastvl.data``'s packed collation gives them):
        input_ids / token_type_ids ``[total_t]``, region_features ``[total_v, F]``, boxes ``[total_v, 4]``,
        masked_regions ``[total_v]``, no masks (every row is real; each sample's first region is its
        whole image). Each sample's VL-BERT sequence (text, objects, END) is built on the ragged rows
        and the encoder runs on them: no padding and no host sync; ``sequence`` is ``[total_t +
        total_v + B, H]``, ``text`` ``[total_t, H]``, ``objects`` ``[total_v, H]``, ``attention_mask`` None.
        """
        c = self.config
        if cu_seqlens_text is not None or cu_seqlens_regions is not None:
            if None in (cu_seqlens_text, cu_seqlens_regions, max_seqlen_text, max_seqlen_regions):
                raise ValueError("a packed batch needs cu_seqlens_text, cu_seqlens_regions, max_seqlen_text and "
                                 "max_seqlen_regions (fastvl.data's packed collation gives all four)")
            if text_mask is not None or region_mask is not None or text_tags is not None or output_attentions:
                raise ValueError("a packed batch takes no text_mask / region_mask / text_tags / output_attentions")
            return self._forward_packed(input_ids, region_features, boxes, token_type_ids, object_classes,
                                        zero_one_mask("masked_regions", masked_regions), mask_visual_embedding,
                                        mask_word_embedding, cu_seqlens_text, cu_seqlens_regions,
                                        int(max_seqlen_text), int(max_seqlen_regions))
        text_mask, region_mask, masked_regions = (zero_one_mask(name, value) for name, value in (
            ("text_mask", text_mask), ("region_mask", region_mask), ("masked_regions", masked_regions)))
        batch, text_len, regions = self._validate(input_ids, region_features, boxes, token_type_ids, text_mask,
                                                  region_mask, text_tags, object_classes, masked_regions)
        device = input_ids.device
        if masked_regions is not None and (mask_visual_embedding is None or mask_word_embedding is None):
            raise ValueError("masked_regions needs mask_visual_embedding [F] and mask_word_embedding [H] (use "
                             "VLBERTForPretraining, which owns them)")
        if text_mask is None:
            text_mask = input_ids != c.pad_token_id
        if region_mask is None:
            region_mask = torch.ones(batch, regions, dtype=torch.bool, device=device)
        # Padded regions may hold anything (e.g. -1 boxes): zero them so nothing non-finite flows back.
        real = region_mask[..., None]
        zero = region_features.new_zeros(())
        features = torch.where(real, region_features, zero)
        boxes = torch.where(real, boxes, boxes.new_zeros(()))
        if masked_regions is not None:
            features = torch.where(masked_regions[..., None], mask_visual_embedding.to(features.dtype), features)
        object_reps = self.visual(features, boxes, region_mask) * real.to(features.dtype)  # [B, R, visual_size]

        tags = torch.zeros_like(input_ids) if text_tags is None else text_tags.clamp(min=0)
        text_visual = torch.gather(object_reps, 1, tags[..., None].expand(-1, -1, object_reps.shape[-1]))
        text_vl = self.word_embeddings(input_ids) + self._visual(text_visual, "text")
        classes = torch.zeros_like(region_mask, dtype=torch.long) if object_classes is None else object_classes
        object_words = self.object_linguistic_embeddings(classes)
        if masked_regions is not None:
            object_words = torch.where(masked_regions[..., None], mask_word_embedding.to(object_words.dtype),
                                       object_words)
        object_vl = object_words + self._visual(object_reps, "object")

        # Pack: group 0 = text, 1 = objects, 2 = END, 3 = padding; a stable sort keeps each group's order.
        length = text_len + regions + 1
        end = self.end_embedding.weight.to(text_vl.dtype).expand(batch, 1, -1)
        sources = torch.cat((text_vl, object_vl.to(text_vl.dtype), end), dim=1)
        pad_group = torch.full((), 3, dtype=torch.long, device=device)
        group = torch.cat((torch.where(text_mask, 0, pad_group), torch.where(region_mask, 1, pad_group),
                           torch.full((batch, 1), 2, dtype=torch.long, device=device)), dim=1)
        order = torch.sort(group, dim=1, stable=True).indices  # packed slot p <- source order[:, p]
        packed_group = torch.gather(group, 1, order)
        packed = torch.gather(sources, 1, order[..., None].expand(-1, -1, sources.shape[-1]))
        attention_mask = packed_group < 3
        n_text = text_mask.sum(1, keepdim=True)
        slots = torch.arange(length, device=device).expand(batch, -1)
        positions = torch.where(packed_group == 0, slots, torch.where(packed_group == 1, n_text, n_text + 1))
        positions = torch.where(attention_mask, positions, 0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        types = torch.cat((token_type_ids.long(), torch.full((batch, regions + 1), 2, dtype=torch.long, device=device)),
                          dim=1)
        types = torch.where(attention_mask, torch.gather(types, 1, order), 0)
        embedded = self.embedding_norm(self.position_embeddings(positions) + self.token_type_embeddings(types),
                                       packed)
        embedded = F.dropout(embedded, c.hidden_dropout_prob, self.training)

        attentions = None
        if unpad and not output_attentions:
            encoded = self._encode_unpadded(embedded, attention_mask)
        else:
            encoded = self.encoder(embedded, attention_mask, output_attentions=output_attentions)
            if output_attentions:
                encoded, attentions = encoded
        # Unpack: source s sits at packed slot inverse[:, s].
        inverse = torch.empty_like(order).scatter_(1, order, slots)
        hidden = encoded.shape[-1]
        text = torch.gather(encoded, 1, inverse[:, :text_len, None].expand(-1, -1, hidden))
        objects = torch.gather(encoded, 1, inverse[:, text_len:text_len + regions, None].expand(-1, -1, hidden))
        text = text * text_mask[..., None].to(text.dtype)
        objects = objects * region_mask[..., None].to(objects.dtype)
        pooled = torch.tanh(self.pooler(encoded[:, 0])) if self.pooler is not None else None
        return VLBERTOutput(encoded, attention_mask, text, objects, pooled, attentions)

    def _forward_packed(self, input_ids, region_features, boxes, token_type_ids, object_classes, masked_regions,
                        mask_visual_embedding, mask_word_embedding, cu_seqlens_text, cu_seqlens_regions,
                        max_seqlen_text, max_seqlen_regions) -> VLBERTOutput:
        c = self.config
        ints = (torch.int64, torch.int32)
        _checks.tensor("input_ids", input_ids, shape="[total_t] int64 (packed)", ndim=1, dtypes=ints)
        _checks.tensor("region_features", region_features, shape=f"[total_v, {c.visual_feature_dim}] (packed)",
                       ndim=2)
        total_t, total_v = input_ids.shape[0], region_features.shape[0]
        _checks.same_shape("boxes", boxes, [total_v, 4], "[total_v, 4] (packed)")
        for name, value in (("token_type_ids", token_type_ids), ("object_classes", object_classes),
                            ("masked_regions", masked_regions)):
            if value is not None:
                _checks.same_shape(name, value, [total_t if name == "token_type_ids" else total_v], "packed rows")
        for name, cu in (("cu_seqlens_text", cu_seqlens_text), ("cu_seqlens_regions", cu_seqlens_regions)):
            _checks.tensor(name, cu, shape="[B + 1] int32", ndim=1, dtypes=(torch.int32,))
        if max_seqlen_text + 2 > c.max_position_embeddings:
            raise ValueError(f"max_seqlen_text {max_seqlen_text}: VL-BERT needs text length + 2 <= "
                             f"max_position_embeddings = {c.max_position_embeddings}")
        if masked_regions is not None and (mask_visual_embedding is None or mask_word_embedding is None):
            raise ValueError("masked_regions needs mask_visual_embedding [F] and mask_word_embedding [H] (use "
                             "VLBERTForPretraining, which owns them)")
        device = input_ids.device
        batch = cu_seqlens_text.shape[0] - 1
        cu_t, cu_v = cu_seqlens_text.long(), cu_seqlens_regions.long()
        n_t, n_v = cu_t[1:] - cu_t[:-1], cu_v[1:] - cu_v[:-1]
        rows = torch.arange(batch, device=device)
        sample_t = torch.repeat_interleave(rows, n_t, output_size=total_t)
        sample_v = torch.repeat_interleave(rows, n_v, output_size=total_v)
        index_t = torch.arange(total_t, device=device) - cu_t[:-1][sample_t]  # a token's place in its caption
        index_v = torch.arange(total_v, device=device) - cu_v[:-1][sample_v]
        # sample i's sequence (text, objects, END) starts at cu_t[i] + cu_v[i] + i
        cu = cu_t + cu_v + torch.arange(batch + 1, device=device)
        slot_t = cu[:-1][sample_t] + index_t
        slot_v = cu[:-1][sample_v] + n_t[sample_v] + index_v
        slot_end = cu[1:] - 1

        features = region_features
        if masked_regions is not None:
            features = torch.where(masked_regions[:, None], mask_visual_embedding.to(features.dtype), features)
        object_reps = self.visual(features[None], boxes[None])[0]  # [total_v, visual_size]
        text_visual = object_reps[cu_v[:-1][sample_t]]  # every token sees its image's region 0 (the whole image)
        text_vl = self.word_embeddings(input_ids) + self._visual(text_visual, "text")
        classes = torch.zeros(total_v, dtype=torch.long, device=device) if object_classes is None else object_classes
        object_words = self.object_linguistic_embeddings(classes)
        if masked_regions is not None:
            object_words = torch.where(masked_regions[:, None], mask_word_embedding.to(object_words.dtype),
                                       object_words)
        object_vl = (object_words + self._visual(object_reps, "object")).to(text_vl.dtype)
        total = total_t + total_v + batch
        hidden = text_vl.shape[-1]
        packed = text_vl.new_zeros(total, hidden)
        packed = packed.index_put((slot_t,), text_vl).index_put((slot_v,), object_vl)
        packed = packed.index_put((slot_end,), self.end_embedding.weight.to(text_vl.dtype).expand(batch, -1))
        positions = torch.zeros(total, dtype=torch.long, device=device)
        positions = positions.index_put((slot_t,), index_t).index_put((slot_v,), n_t[sample_v])
        positions = positions.index_put((slot_end,), n_t + 1)
        types = torch.full((total,), 2, dtype=torch.long, device=device)
        if token_type_ids is not None:
            types = types.index_put((slot_t,), token_type_ids.long())
        else:
            types = types.index_put((slot_t,), torch.zeros_like(index_t))
        embedded = self.embedding_norm(self.position_embeddings(positions) + self.token_type_embeddings(types), packed)
        embedded = F.dropout(embedded, c.hidden_dropout_prob, self.training)
        encoded = self.encoder(embedded, cu_seqlens=cu.to(torch.int32),
                               max_seqlen=max_seqlen_text + max_seqlen_regions + 1)
        pooled = torch.tanh(self.pooler(encoded[cu[:-1]])) if self.pooler is not None else None
        return VLBERTOutput(encoded, None, encoded[slot_t], encoded[slot_v], pooled, None)

    def _encode_unpadded(self, embedded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder on the real rows (a prefix of every packed row) as one varlen batch."""
        lengths = attention_mask.sum(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        rows = self.encoder(embedded[attention_mask], cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))
        return embedded.new_zeros(embedded.shape).index_put((attention_mask,), rows)

    def _validate(self, input_ids, region_features, boxes, token_type_ids, text_mask, region_mask, text_tags,
                  object_classes, masked_regions) -> tuple[int, int, int]:
        c = self.config
        ints = (torch.int64, torch.int32)
        _checks.tensor("input_ids", input_ids, shape="[B, Lt] int64", ndim=2, dtypes=ints)
        width = c.visual_feature_dim
        _checks.tensor("region_features", region_features, shape=f"[B, R, {width}]", ndim=3)
        if region_features.shape[-1] != width:
            raise ValueError(f"region_features must have shape [B, R, {width}] (RoI features of width {width}), "
                             f"got {list(region_features.shape)}")
        batch, text_len = input_ids.shape
        regions = region_features.shape[1]
        if region_features.shape[0] != batch:
            raise ValueError(f"region_features has batch size {region_features.shape[0]} but input_ids has "
                             f"{batch}; they must match")
        if regions < 1:
            raise ValueError("region_features must hold at least one region (region 0: the whole image)")
        _checks.tensor("boxes", boxes, shape="[B, R, 4]", ndim=3)
        _checks.same_shape("boxes", boxes, [batch, regions, 4], "[B, R, 4] with B, R of region_features")
        if text_len + 2 > c.max_position_embeddings:
            raise ValueError(f"input_ids has {text_len} tokens; VL-BERT needs text length + 2 (objects, END) <= "
                             f"max_position_embeddings = {c.max_position_embeddings}")
        text_form, region_form = f"[B, Lt] = [{batch}, {text_len}]", f"[B, R] = [{batch}, {regions}]"
        for name, value, form, dtypes in (("token_type_ids", token_type_ids, text_form, ints),
                                          ("text_mask", text_mask, text_form, (torch.bool,)),
                                          ("text_tags", text_tags, text_form, ints),
                                          ("region_mask", region_mask, region_form, (torch.bool,)),
                                          ("object_classes", object_classes, region_form, ints),
                                          ("masked_regions", masked_regions, region_form, (torch.bool,))):
            if value is not None:
                _checks.tensor(name, value, shape=form, ndim=2, dtypes=dtypes)
                _checks.same_shape(name, value, [batch, text_len if form == text_form else regions], form)
        _checks.same_device("input_ids", input_ids, region_features=region_features, boxes=boxes,
                            token_type_ids=token_type_ids, text_mask=text_mask, region_mask=region_mask,
                            text_tags=text_tags, object_classes=object_classes, masked_regions=masked_regions)
        return batch, text_len, regions


@dataclasses.dataclass
class VLBERTPretrainingOutput(PretrainingOutput):
    """``losses`` {"mlm", "mvrc", "relationship"} (those whose labels were given), ``loss`` their sum;
    ``mvrc_logits [B, R, visual_region_classes]`` and ``relationship_logits [B, 2]`` when computed."""

    mvrc_logits: torch.Tensor | None = None
    relationship_logits: torch.Tensor | None = None


class VLBERTForPretraining(nn.Module):
    """VL-BERT pretraining: MLM with visual clues, masked RoI classification, and (when
    ``with_rel_head``) the sentence-image relation head, off by default as in the released config.

    Parameters: ``vlbert``, ``object_mask_visual_embedding`` [1, F] (zero-initialised),
    ``object_mask_word_embedding`` [1, H], ``mlm_head`` (decoder tied to the word embeddings),
    ``mvrc_head`` (``dense`` + GELU -> ``classifier`` over ``visual_region_classes``),
    ``relationship_head`` (Linear(H, 2) on the pooled state; needs ``with_pooler``).
    """

    def __init__(self, config: VLBERTConfig, backend: str | None = None):
        super().__init__()
        if config.with_rel_head and not config.with_pooler:
            raise ValueError("with_rel_head needs with_pooler=True (the relation head reads the pooled state)")
        self.config, self.backend = config, backend
        h = config.hidden_size
        self.vlbert = VLBERT(config, backend)
        self.object_mask_visual_embedding = nn.Embedding(1, config.visual_feature_dim)
        self.object_mask_word_embedding = nn.Embedding(1, h)
        self.mlm_head = MaskedLMHead(h, config.vocab_size, config.layer_norm_eps) if config.with_mlm_head else None
        self.mvrc_head = None
        if config.with_mvrc_head:
            self.mvrc_head = nn.Module()
            self.mvrc_head.dense = nn.Linear(h, h)
            self.mvrc_head.classifier = nn.Linear(h, config.visual_region_classes)
        self.relationship_head = nn.Linear(h, 2) if config.with_rel_head else None
        for module in (self.object_mask_word_embedding, self.mlm_head, self.mvrc_head, self.relationship_head):
            if module is not None:
                module.apply(lambda m: init_bert_weights(m, config.initializer_range))
        nn.init.zeros_(self.object_mask_visual_embedding.weight)

    @on_backend
    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor, *,
                mlm_labels: torch.Tensor | None = None, masked_regions: torch.Tensor | None = None,
                region_class_scores: torch.Tensor | None = None, relationship_labels: torch.Tensor | None = None,
                replaced_regions: torch.Tensor | None = None, **inputs) -> VLBERTPretrainingOutput:
        """Losses (and logits) for one batch; ``inputs`` go to :meth:`VLBERT.forward`.

        mlm_labels ``[B, Lt]`` int64, -1 where not predicted (the original's ignore index): loss =
        mean cross-entropy over labelled tokens, **0 with zero gradient when none is labelled** (the
        original's mean is NaN there). masked_regions ``[B, R]`` bool with region_class_scores
        ``[B, R, C]`` (the detector's class probabilities): loss = mean over masked real regions of the
        soft cross-entropy ``-sum_c p_c log softmax(logits)_c``, 0 when none is masked (guarded, as
        the original). replaced_regions ``[B, R]`` bool: the regions whose inputs become the mask
        embeddings (default ``masked_regions``; VL-BERT's collation replaces 90% of the masked regions
        and keeps 10% as they are, all of them predicted). relationship_labels ``[B]`` (1 = matching
        caption) with ``with_rel_head``.
        Returns a :class:`VLBERTPretrainingOutput`: ``losses`` {"mlm", "mvrc", "relationship"} (those
        that apply), their sum ``loss``, and ``mvrc_logits`` / ``relationship_logits``.
        """
        c = self.config
        masked_regions = zero_one_mask("masked_regions", masked_regions)
        replaced_regions = zero_one_mask("replaced_regions", replaced_regions)
        inputs = {name: zero_one_mask(name, value) if name.endswith("_mask") else value
                  for name, value in inputs.items()}
        replaced = masked_regions if replaced_regions is None else replaced_regions
        out = self.vlbert(input_ids, region_features, boxes, masked_regions=replaced,
                          mask_visual_embedding=self.object_mask_visual_embedding.weight[0],
                          mask_word_embedding=self.object_mask_word_embedding.weight[0], **inputs)
        with nvtx_range("heads and losses"):
            result = VLBERTPretrainingOutput(None, {})
            losses = result.losses
            if mlm_labels is not None:
                if self.mlm_head is None:
                    raise ValueError("mlm_labels given but the model has no MLM head (with_mlm_head=False)")
                _checks.tensor("mlm_labels", mlm_labels, shape="[B, Lt] int64", ndim=input_ids.dim(),
                               dtypes=(torch.int64,))
                _checks.same_shape("mlm_labels", mlm_labels, list(input_ids.shape), "[B, Lt] like input_ids")
                losses["mlm"] = self.mlm_head.loss(out.text, self.vlbert.word_embeddings.weight, mlm_labels, -1)
            if masked_regions is not None and region_class_scores is not None and self.mvrc_head is not None:
                _checks.tensor("region_class_scores", region_class_scores, shape=f"[B, R, {c.visual_region_classes}]",
                               ndim=region_features.dim())
                _checks.same_shape("region_class_scores", region_class_scores,
                                   [*masked_regions.shape, c.visual_region_classes], "[B, R, C]")
                logits = self.mvrc_head.classifier(dense_gelu(self.mvrc_head.dense, out.objects))
                region_mask = inputs.get("region_mask")
                chosen = masked_regions if region_mask is None else masked_regions & region_mask
                per_region = -(region_class_scores.to(logits.dtype) * F.log_softmax(logits, -1)).sum(-1)
                weight = chosen.to(per_region.dtype)
                losses["mvrc"] = (per_region * weight).sum() / weight.sum().clamp(min=1)
                result.mvrc_logits = logits
            if self.relationship_head is not None:
                logits = self.relationship_head(out.pooled)
                result.relationship_logits = logits
                if relationship_labels is not None:
                    losses["relationship"] = F.cross_entropy(logits, relationship_labels)
            result.loss = total(losses)
            return result


class VLBERTForVQA(nn.Module):
    """VQA as VL-BERT fine-tunes it: the text is ``[CLS] question [SEP] [MASK] [SEP]`` (the answer
    segment has token type 1); the hidden state at the [MASK] answer slot goes through an MLM-style
    transform (``head.dense`` + GELU + ``head.norm``), dropout, and ``head.classifier`` over the
    answers (3129). Loss: BCE against the soft scores, times the number of answers (as the original).
    """

    def __init__(self, config: VLBERTConfig, num_answers: int = 3129, classifier_dropout: float = 0.1,
                 backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.config, self.num_answers, self.classifier_dropout = config, num_answers, classifier_dropout
        self.vlbert = VLBERT(config, backend)
        self.head = nn.Module()
        self.head.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.head.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.head.classifier = nn.Linear(config.hidden_size, num_answers)
        self.head.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @staticmethod
    def prepare_text(question: torch.Tensor, cls_id: int = 101, sep_id: int = 102, mask_id: int = 103,
                     pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, Lq]`` question ids (``pad_id`` padding) -> ``(input_ids [B, Lq + 4], token_type_ids,
        answer_positions [B])`` laid out ``[CLS] question [SEP] [MASK] [SEP]``, the last two of type 1,
        as VL-BERT's VQA model builds them (BERT uncased ids by default)."""
        _checks.tensor("question", question, shape="[B, Lq] int64", ndim=2, dtypes=(torch.int64, torch.int32))
        batch, length = question.shape
        n = (question != pad_id).sum(1, keepdim=True)
        slots = torch.arange(length + 4, device=question.device).expand(batch, -1)
        body = torch.cat((question.new_full((batch, 1), cls_id), question, question.new_full((batch, 3), pad_id)), 1)
        tail = torch.where(slots == n + 2, mask_id, torch.where((slots == n + 1) | (slots == n + 3), sep_id, pad_id))
        input_ids = torch.where(slots <= n, body, tail)
        token_type_ids = ((slots > n + 1) & (slots <= n + 3)).long()
        return input_ids, token_type_ids, (n + 2).squeeze(1)

    @on_backend
    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor,
                answer_positions: torch.Tensor, *, answer_scores: torch.Tensor | None = None,
                **inputs) -> dict[str, torch.Tensor]:
        """answer_positions ``[B]``: index of the [MASK] answer slot in input_ids; answer_scores
        ``[B, num_answers]`` soft targets in [0, 1]. Returns ``logits`` (and ``loss``)."""
        _checks.tensor("answer_positions", answer_positions, shape="[B] int64", ndim=1,
                       dtypes=(torch.int64, torch.int32))
        _checks.same_shape("answer_positions", answer_positions, [input_ids.shape[0]], "[B]")
        out = self.vlbert(input_ids, region_features, boxes, **inputs)
        slot = torch.gather(out.text, 1, answer_positions.long()[:, None, None].expand(-1, 1, out.text.shape[-1]))
        hidden = self.head.norm(dense_gelu(self.head.dense, slot[:, 0]))
        hidden = F.dropout(hidden, self.classifier_dropout, self.training)
        logits = self.head.classifier(hidden)
        result = {"logits": logits}
        if answer_scores is not None:
            _checks.same_shape("answer_scores", answer_scores, list(logits.shape), "[B, num_answers]")
            result["loss"] = F.binary_cross_entropy_with_logits(logits, answer_scores.to(logits.dtype)) \
                * self.num_answers
        return result


class VLBERTForVCR(nn.Module):
    """VCR multiple choice: each (question, answer option) text with the image is one sequence; the
    tanh pooler's output -> dropout -> ``classifier`` Linear(H, 1) scores it; softmax cross-entropy
    over the options.

    ``object_classes > 0`` adds the original's auxiliary object classification (its
    ``CNN_LOSS_TOP`` regularisation, on in its VCR configs): every real region's final state, in
    every option's sequence, -> ``object_head.dense`` + GELU -> ``object_head.classifier``
    Linear(H, object_classes); ``object_loss`` is the cross-entropy against ``object_labels``
    averaged over the labelled regions of all options (label -1: not scored)."""

    def __init__(self, config: VLBERTConfig, classifier_dropout: float = 0.1, backend: str | None = None,
                 object_classes: int = 0):
        super().__init__()
        self.backend = backend
        config = dataclasses.replace(config, with_pooler=True)
        self.config, self.classifier_dropout = config, classifier_dropout
        self.vlbert = VLBERT(config, backend)
        self.classifier = nn.Linear(config.hidden_size, 1)
        init_bert_weights(self.classifier, config.initializer_range)
        self.object_head = None
        if object_classes:
            self.object_head = nn.Module()
            self.object_head.dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.object_head.classifier = nn.Linear(config.hidden_size, object_classes)
            self.object_head.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @on_backend
    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor, *,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_tags: torch.Tensor | None = None,
                object_labels: torch.Tensor | None = None, **region_inputs) -> dict[str, torch.Tensor]:
        """input_ids ``[B, C, Lt]`` (C options; token_type_ids / text_mask / text_tags likewise);
        region inputs ``[B, R, ...]`` shared by the options. labels ``[B]`` the right option;
        object_labels ``[B, R]`` int64 each region's class (-1: none; needs ``object_classes``).
        Returns ``logits`` ``[B, C]``, with labels ``loss``, with object_labels ``object_loss``
        (0 when no region is labelled); ``loss`` is the sum of the two."""
        _checks.tensor("input_ids", input_ids, shape="[B, C, Lt] int64", ndim=3, dtypes=(torch.int64, torch.int32))
        batch, options, _ = input_ids.shape
        if region_features.shape[0] != batch:
            raise ValueError(f"region_features has batch size {region_features.shape[0]} but input_ids has "
                             f"{batch}; they must match")
        if object_labels is not None:
            if self.object_head is None:
                raise ValueError("object_labels given but the model has no object head (object_classes=0)")
            _checks.tensor("object_labels", object_labels, shape="[B, R] int64", ndim=2, dtypes=(torch.int64,))
            _checks.same_shape("object_labels", object_labels, list(region_features.shape[:2]), "[B, R]")
            if int(object_labels.max()) >= self.object_head.classifier.out_features:
                raise ValueError(f"object_labels must be -1 or 0 .. "
                                 f"{self.object_head.classifier.out_features - 1}, got {int(object_labels.max())}")

        def per_option(t):
            return None if t is None else t.flatten(0, 1)

        def repeat(t):
            return None if t is None else t.repeat_interleave(options, dim=0)

        out = self.vlbert(per_option(input_ids), repeat(region_features), repeat(boxes),
                          token_type_ids=per_option(token_type_ids), text_mask=per_option(text_mask),
                          text_tags=per_option(text_tags), **{k: repeat(v) for k, v in region_inputs.items()})
        logits = self.classifier(F.dropout(out.pooled, self.classifier_dropout, self.training)).view(batch, options)
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = F.cross_entropy(logits, labels)
        if object_labels is not None:
            targets = repeat(object_labels)
            region_mask = region_inputs.get("region_mask")
            if region_mask is not None:
                targets = torch.where(repeat(zero_one_mask("region_mask", region_mask)), targets, -1)
            scored = targets >= 0
            object_logits = self.object_head.classifier(dense_gelu(self.object_head.dense, out.objects[scored]))
            result["object_loss"] = (F.cross_entropy(object_logits.float(), targets[scored], reduction="sum")
                                     / scored.sum().clamp(min=1))
            result["loss"] = result.get("loss", 0.0) + result["object_loss"]
        return result


class VLBERTForRefCOCO(nn.Module):
    """RefCOCO+ grounding: each region's state -> ``head.dense`` + GELU -> dropout ->
    ``head.classifier`` Linear(H, 1); BCE over real regions against ``IoU > 0.5`` with the target."""

    def __init__(self, config: VLBERTConfig, classifier_dropout: float = 0.1, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.config, self.classifier_dropout = config, classifier_dropout
        self.vlbert = VLBERT(config, backend)
        self.head = nn.Module()
        self.head.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.head.classifier = nn.Linear(config.hidden_size, 1)
        self.head.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @on_backend
    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor, *,
                ious: torch.Tensor | None = None, **inputs) -> dict[str, torch.Tensor]:
        """ious ``[B, R]``: each region's IoU with the referred box (label = IoU > 0.5). Returns
        ``logits`` ``[B, R]`` (padded regions -10000, as the original) and ``loss`` (mean BCE over
        real regions)."""
        out = self.vlbert(input_ids, region_features, boxes, **inputs)
        hidden = dense_gelu(self.head.dense, out.objects)
        logits = self.head.classifier(F.dropout(hidden, self.classifier_dropout, self.training))[..., 0]
        region_mask = inputs.get("region_mask")
        if region_mask is None:
            region_mask = torch.ones_like(logits, dtype=torch.bool)
        result = {"logits": logits.masked_fill(~region_mask, -10000.0)}
        if ious is not None:
            _checks.same_shape("ious", ious, list(logits.shape), "[B, R]")
            targets = (ious > 0.5).to(logits.dtype)
            per_region = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            weight = region_mask.to(per_region.dtype)
            result["loss"] = (per_region * weight).sum() / weight.sum().clamp(min=1)
        return result
