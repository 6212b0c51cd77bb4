"""ALBEF (Li et al., 2021): align the image and text [CLS] features contrastively, then fuse them.

Image encoder: ViT-B/16 (:class:`fastvl.nn.vision.VisionTransformer`). Text encoder: BERT layers
``0 .. fusion_layer-1``; fusion encoder: layers ``fusion_layer ..`` each with a cross-attention to
the image tokens (:class:`fastvl.nn.CrossAttentionLayer`). Pretraining objectives, as ALBEF runs
them (one call of :meth:`ALBEF.forward`):

- ITC: L2-normalised 256-d projections of both [CLS] states against the momentum features and the
  queues, with momentum distillation (:func:`fastvl.ops.itc_loss`); temperature clamped to
  [0.001, 0.5] before each step; then the queues advance (:func:`fastvl.ops.itc_queue_update_`).
- ITM: for every image one hard negative text and for every text one hard negative image, drawn from
  the in-batch similarities (:func:`fastvl.ops.itm_hard_negatives`); ``itm_head`` on the fusion
  [CLS] of the B positive and 2B negative pairs; cross-entropy.
- MLM: 15% of the tokens except [PAD] / [CLS] (80% [MASK], half of the rest random, half kept);
  ``(1 - alpha) CE + alpha soft-CE`` against the momentum model's prediction.

ALBEF's tokenisation has no trailing [SEP] (``[CLS] tokens``); pass its ids as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import _checks
from fastvl.models.bert_config import BertConfig, check_unknown_keys
from fastvl.models.outputs import PretrainingOutput, total
from fastvl.models.vlbert import MaskedLMHead
from fastvl.nn import CrossAttentionLayer, TextEmbeddings, TransformerLayer, init_bert_weights
from fastvl.nn.common import on_backend, zero_one_mask
from fastvl.nn.vision import VisionTransformer
from fastvl.ops import itc_loss, itc_queue_update_, itm_hard_negatives
from fastvl.profiling import nvtx_range

_PRETRAIN_KEYS = {"image_res", "embed_dim", "queue_size", "momentum", "temp", "alpha", "mlm_probability",
                  "vision_width"}
# Keys of ALBEF's YAML files that describe data, optimisation or evaluation, not the network.
_OTHER_KEYS = {"train_file", "val_file", "test_file", "image_root", "batch_size", "batch_size_train",
               "batch_size_test", "optimizer", "schedular", "warm_up", "distill", "k_test", "bert_config",
               "max_words", "answer_list", "eos", "max_tokens"}
_BERT_ARCHITECTURE_KEYS = {"architectures", "model_type", "hidden_act", "initializer_range", "pad_token_id",
                           "gradient_checkpointing", "position_embedding_type", "use_cache", "classifier_dropout"}


@dataclasses.dataclass
class ALBEFConfig(BertConfig):
    """ALBEF's configuration: the ViT, the BERT config (``config_bert.json`` keys) and the
    pretraining settings (``Pretrain.yaml`` keys)."""

    image_res: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_eps: float = 1e-6
    fusion_layer: int = 6
    encoder_width: int = 768
    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    temp: float = 0.07
    mlm_probability: float = 0.15
    pad_token_id: int = 0
    cls_token_id: int = 101
    mask_token_id: int = 103

    @classmethod
    def named(cls, name: str, **overrides) -> ALBEFConfig:
        """``"base"`` (ViT-B/16 at 256 px, 6 + 6 BERT-base layers) or ``"tiny"`` (for tests)."""
        _checks.choice("name", name, list(ALBEF_CONFIGS))
        return cls(**{**ALBEF_CONFIGS[name], **overrides})

    @classmethod
    def from_original(cls, config: Mapping, strict: bool = True) -> ALBEFConfig:
        """From ALBEF's configs as dicts: ``Pretrain.yaml``'s keys, with the BERT config either under
        ``bert_config`` (a dict, or the path of ``config_bert.json``) or merged at the top level.
        Unknown keys raise ``ValueError`` (``strict=False``: ignored with a warning)."""
        values = dict(config)
        bert = values.pop("bert_config", None)
        if isinstance(bert, (str, os.PathLike)):
            with open(bert, encoding="utf-8") as handle:
                bert = json.load(handle)
        merged = {**(bert or {}), **values}
        fields = {f.name for f in dataclasses.fields(cls)}
        if merged.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act must be 'gelu', got {merged['hidden_act']!r}")
        unknown = sorted(k for k in merged if k not in fields and k not in _OTHER_KEYS | _BERT_ARCHITECTURE_KEYS)
        check_unknown_keys("ALBEF", unknown, strict)
        return cls(**{k: v for k, v in merged.items() if k in fields})


# "tiny" initialises its BERT side with std 0.1 ~ 0.02 * sqrt(768 / 32), not BERT's 0.02: a Linear's output
# scales with std * sqrt(width), so at width 32 the 0.02 init makes the cross-attention branch (kv, then dense)
# ~36x weaker against the text residual than at width 768 -- swapping the image moved the fused [CLS] by 0.23%
# (base width: 8.4%) and fine-tuning sat at the text-only prior; at 0.1 it moves by 6.0%, as base's does.
# (0.1 on the cross-attention alone, or on all but the classifier head, still sat there after 800 steps.)
ALBEF_CONFIGS: dict[str, dict] = {
    "base": {},
    "tiny": {"image_res": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 2, "vision_heads": 4,
             "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 32, "encoder_width": 32, "embed_dim": 16,
             "queue_size": 12, "cls_token_id": 1, "mask_token_id": 2, "initializer_range": 0.1},
}


class ALBEFTextEncoder(nn.Module):
    """ALBEF's BERT (``BertForMaskedLM`` with ``fusion_layer``): ``embeddings``, ``text_layers``
    (:class:`fastvl.nn.TransformerLayer`), ``fusion_layers`` (:class:`fastvl.nn.CrossAttentionLayer`
    to the image), ``mlm_head`` (decoder tied to the word embeddings; None without one)."""

    def __init__(self, config: ALBEFConfig, with_mlm_head: bool = True, fusion_layers: int | None = None):
        super().__init__()
        c = config
        if not 0 <= c.fusion_layer <= c.num_hidden_layers:
            raise ValueError(f"fusion_layer ({c.fusion_layer}) must be in [0, num_hidden_layers = "
                             f"{c.num_hidden_layers}]")
        h = c.hidden_size
        self.embeddings = TextEmbeddings(c.vocab_size, h, c.max_position_embeddings, c.type_vocab_size,
                                         c.hidden_dropout_prob, c.layer_norm_eps, c.pad_token_id)
        self.text_layers = nn.ModuleList(
            TransformerLayer(h, c.num_attention_heads, c.intermediate_size, c.hidden_dropout_prob,
                             c.attention_probs_dropout_prob, c.layer_norm_eps) for _ in range(c.fusion_layer))
        count = c.num_hidden_layers - c.fusion_layer if fusion_layers is None else fusion_layers
        self.fusion_layers = nn.ModuleList(
            CrossAttentionLayer(h, c.num_attention_heads, c.intermediate_size, c.encoder_width, c.hidden_dropout_prob,
                                c.attention_probs_dropout_prob, c.layer_norm_eps) for _ in range(count))
        self.mlm_head = MaskedLMHead(h, c.vocab_size, c.layer_norm_eps) if with_mlm_head else None
        self.apply(lambda m: init_bert_weights(m, c.initializer_range))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    output_attentions: bool = False):
        """``[B, L]`` ids -> ``[B, L, H]`` (the text layers only; ALBEF's ``mode='text'``). With
        ``output_attentions`` also each layer's probabilities ``[B, heads, L, L]``."""
        attention_mask = zero_one_mask("attention_mask", attention_mask)
        hidden = self.embeddings(input_ids)
        probabilities = []
        for layer in self.text_layers:
            hidden = layer(hidden, attention_mask, output_attentions=output_attentions)
            if output_attentions:
                hidden, probs = hidden
                probabilities.append(probs)
        return (hidden, probabilities) if output_attentions else hidden

    def fuse(self, text: torch.Tensor, attention_mask: torch.Tensor | None, image: torch.Tensor | list,
             image_mask: torch.Tensor | None | list = None, output_attentions: bool = False):
        """Fusion layers over text states ``[B, L, H]`` and image tokens ``[B, Lv, W]`` (``mode='fusion'``).
        ``image`` may be a list of image token tensors: fusion layer i then attends to image ``i % n``
        (ALBEF's NLVR2 model). With ``output_attentions`` also a ``(self, cross)`` probability pair
        per layer (the cross-attention maps ALBEF's grounding visualises)."""
        images = image if isinstance(image, (list, tuple)) else [image]
        masks = image_mask if isinstance(image_mask, (list, tuple)) else [image_mask] * len(images)
        attention_mask = zero_one_mask("attention_mask", attention_mask)
        masks = [zero_one_mask("image_mask", mask) for mask in masks]
        hidden = text
        probabilities = []
        for index, layer in enumerate(self.fusion_layers):
            hidden = layer(hidden, attention_mask, images[index % len(images)], masks[index % len(images)],
                           output_attentions=output_attentions)
            if output_attentions:
                hidden, self_probs, cross_probs = hidden
                probabilities.append((self_probs, cross_probs))
        return (hidden, probabilities) if output_attentions else hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image, image_mask)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(hidden, self.embeddings.word_embeddings.weight)


def _text_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int | None,
               pad_token_id: int) -> torch.Tensor:
    """Checks the text inputs; returns the bool mask (True = real). ALBEF's 0 / 1 integer masks and
    bool masks are accepted; None means ``input_ids != pad``."""
    _checks.tensor("input_ids", input_ids, shape="[B, L] int64", ndim=2, dtypes=(torch.int64, torch.int32))
    if batch is not None and input_ids.shape[0] != batch:
        raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but images has {batch}; they must match")
    if attention_mask is None:
        return input_ids != pad_token_id
    _checks.tensor("attention_mask", attention_mask, shape="[B, L] bool or 0 / 1 integers", ndim=2,
                   dtypes=(torch.bool, torch.int64, torch.int32, torch.uint8))
    _checks.same_shape("attention_mask", attention_mask, list(input_ids.shape), "[B, L] like input_ids")
    return zero_one_mask("attention_mask", attention_mask)


def _temperature_as_stored(module, state_dict, prefix, *_) -> None:
    """Accepts ``temp`` as [1] too (DeepSpeed-trained checkpoints consolidated by zero_to_fp32 hold it so)."""
    key = prefix + "temp"
    if key in state_dict and state_dict[key].shape == (1,) and module.temp.dim() == 0:
        state_dict[key] = state_dict[key].reshape(())


@dataclasses.dataclass
class ALBEFPretrainingOutput(PretrainingOutput):
    """``losses`` {"itc", "itm", "mlm"} (no "mlm" with ``mlm=False``), ``loss`` their sum; the ITM
    logits ``[3B, 2]`` and the momentum features ``[B, embed_dim]`` the queues receive."""

    itm_logits: torch.Tensor | None = None
    image_feat_m: torch.Tensor | None = None
    text_feat_m: torch.Tensor | None = None


class ALBEF(nn.Module):
    """ALBEF for pretraining and retrieval.

    Parameters (the original's names): ``visual_encoder``, ``text_encoder``, ``vision_proj``,
    ``text_proj`` (Linear -> embed_dim), ``itm_head`` (Linear(H, 2)), ``temp``; momentum copies
    ``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m`` (no gradient);
    buffers ``image_queue`` / ``text_queue`` ``[embed_dim, queue_size]`` and ``queue_ptr``.
    ``with_mlm_head=False`` builds the retrieval model (ALBEF's fine-tuned retrieval checkpoints have
    no MLM head); :meth:`forward` then needs ``mlm=False``.
    """

    def __init__(self, config: ALBEFConfig, with_mlm_head: bool = True, backend: str | None = None):
        super().__init__()
        self.config = c = config
        self.backend = backend
        self.visual_encoder = VisionTransformer(c.image_res, c.patch_size, c.vision_width, c.vision_depth,
                                                c.vision_heads, c.vision_mlp_ratio, c.vision_eps)
        self.text_encoder = ALBEFTextEncoder(c, with_mlm_head=with_mlm_head)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.itm_head = nn.Linear(c.hidden_size, 2)
        for module in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_weights(module, c.initializer_range)
        self.temp = nn.Parameter(torch.tensor(float(c.temp)))
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for module in self._momentum_modules():
            module.requires_grad_(False)
        self.register_buffer("image_queue", F.normalize(torch.randn(c.embed_dim, c.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(c.embed_dim, c.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_temperature_as_stored)

    def _momentum_pairs(self):
        return ((self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.vision_proj, self.vision_proj_m), (self.text_proj, self.text_proj_m))

    def _momentum_modules(self):
        return [pair[1] for pair in self._momentum_pairs()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m <- m p_m + (1 - m) p`` for every momentum parameter."""
        for online, moving in self._momentum_pairs():
            params, params_m = list(online.parameters()), list(moving.parameters())
            torch._foreach_mul_(params_m, self.config.momentum)
            torch._foreach_add_(params_m, [p.to(q.dtype) for p, q in zip(params, params_m)],
                                alpha=1.0 - self.config.momentum)

    @torch.no_grad()
    def mask_tokens(self, input_ids: torch.Tensor, generator: torch.Generator | None = None,
                    probability: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ALBEF's MLM masking: ``(masked_ids, labels)`` with labels -100 where not predicted."""
        c = self.config
        p = c.mlm_probability if probability is None else probability
        device = input_ids.device

        def draw(prob):
            return torch.rand(input_ids.shape, generator=generator, device=device) < prob

        chosen = draw(p) & (input_ids != c.pad_token_id) & (input_ids != c.cls_token_id)
        labels = torch.where(chosen, input_ids, -100)
        replaced = draw(0.8) & chosen
        randomised = draw(0.5) & chosen & ~replaced
        random_ids = torch.randint(c.vocab_size, input_ids.shape, generator=generator, device=device)
        masked = torch.where(replaced, c.mask_token_id, input_ids)
        return torch.where(randomised, random_ids, masked), labels

    @on_backend
    def image_features(self, images: torch.Tensor, momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image tokens [B, 1 + N, W], normalised [CLS] projection [B, embed_dim])``."""
        encoder, proj = (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder,
                                                                                      self.vision_proj)
        tokens = encoder(images.to(proj.weight.dtype))  # momentum encoders may be kept wider than the model
        return tokens, F.normalize(proj(tokens[:, 0]), dim=-1)

    @on_backend
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text states [B, L, H], normalised [CLS] projection [B, embed_dim])``."""
        encoder, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        states = encoder.encode_text(input_ids, attention_mask)
        return states, F.normalize(proj(states[:, 0]), dim=-1)

    @on_backend
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                alpha: float | None = None, update: bool | None = None, generator: torch.Generator | None = None,
                itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                mlm_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
                mlm: bool = True) -> ALBEFPretrainingOutput:
        """One pretraining step's :class:`ALBEFPretrainingOutput`: ``losses`` {"itc", "itm", "mlm"} and
        their sum ``loss`` (also ``itm_logits`` and the momentum features ``image_feat_m`` /
        ``text_feat_m`` ``[B, embed_dim]`` that ``update`` enqueues, for callers that enqueue themselves).

        images ``[B, 3, S, S]``; input_ids ``[B, L]`` (``[CLS] tokens``, no trailing [SEP]);
        attention_mask ``[B, L]`` (1 / True = real). alpha: distillation weight (default the config's;
        ALBEF ramps it in over the first epoch). ``update`` (default: training mode) moves the momentum
        encoders before and the queues after the step, and clamps the temperature. ``itm_negatives``
        ``(neg_text_for_image [B], neg_image_for_text [B])`` and ``mlm_inputs`` ``(masked_ids,
        labels)`` replace the random draws (which use ``generator``). B >= 2 (one negative each).
        ``mlm=False`` skips MLM (ALBEF's retrieval fine-tuning: ITC + ITM only). Under
        ``torch.distributed`` the queues receive the all-gathered momentum features (queue_size must
        be a multiple of the global batch), as ALBEF's ``_dequeue_and_enqueue``.

        MLM with nothing to predict (every label -100) gives ``losses["mlm"]`` = 0 with zero gradient; the
        original's mean is NaN there.
        """
        c = self.config
        _checks.tensor("images", images, shape=f"[B, 3, {c.image_res}, {c.image_res}]", ndim=4)
        batch = images.shape[0]
        attention_mask = _text_mask(input_ids, attention_mask, batch, c.pad_token_id)
        if batch < 2:
            raise ValueError(f"ALBEF pretraining needs a batch of at least 2 (hard negatives), got {batch}")
        alpha = c.alpha if alpha is None else alpha
        update = self.training if update is None else update
        if update:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.image_features(images)
        text_embeds, text_feat = self.text_features(input_ids, attention_mask)
        with torch.no_grad():
            if update:
                self.momentum_update()
            image_embeds_m, image_feat_m = self.image_features(images, momentum=True)
            _, text_feat_m = self.text_features(input_ids, attention_mask, momentum=True)
            # momentum encoders kept in fp32 under a 16-bit model: their features meet the model's
            image_feat_m, text_feat_m = image_feat_m.to(image_feat.dtype), text_feat_m.to(text_feat.dtype)
        with nvtx_range("itc"):
            # A copy of temp: ZeRO-3 empties this module's parameters after its forward, so a backward that
            # reads temp (the reference's division) must find its value in a tensor of its own.
            loss_itc = itc_loss(image_feat, text_feat, self.image_queue, self.text_queue, self.temp.clone(), alpha,
                                image_feat_m, text_feat_m)
            if update:  # the queues hold the global batch's features, as ALBEF's all-gather does
                itc_queue_update_(self.image_queue, self.text_queue, self.queue_ptr, _all_gather(image_feat_m),
                                  _all_gather(text_feat_m))

        with nvtx_range("itm"):
            # ITM: B positive pairs, then (positive text, negative image) and (negative text, positive image).
            if itm_negatives is None:
                with torch.no_grad():  # the in-batch part of ALBEF's similarities (momentum features opposite)
                    sim_i2t = image_feat @ text_feat_m.t() / self.temp
                    sim_t2i = text_feat @ image_feat_m.t() / self.temp
                itm_negatives = itm_hard_negatives(sim_i2t, sim_t2i, generator)
            neg_text, neg_image = itm_negatives
            text_all = torch.cat((text_embeds, text_embeds, text_embeds[neg_text]), dim=0)
            mask_all = torch.cat((attention_mask, attention_mask, attention_mask[neg_text]), dim=0)
            image_all = torch.cat((image_embeds, image_embeds[neg_image], image_embeds), dim=0)
            fused = self.text_encoder.fuse(text_all, mask_all, image_all)
            itm_logits = self.itm_head(fused[:, 0])
            itm_labels = torch.cat((torch.ones(batch, dtype=torch.long, device=images.device),
                                    torch.zeros(2 * batch, dtype=torch.long, device=images.device)))
            loss_itm = F.cross_entropy(itm_logits, itm_labels)
        losses = {"itc": loss_itc, "itm": loss_itm}
        result = ALBEFPretrainingOutput(None, losses, itm_logits, image_feat_m, text_feat_m)
        if not mlm:
            result.loss = total(losses)
            return result
        if self.text_encoder.mlm_head is None:
            raise ValueError("this ALBEF has no MLM head (with_mlm_head=False); call with mlm=False")
        with nvtx_range("mlm"):
            masked_ids, labels = self.mask_tokens(input_ids, generator) if mlm_inputs is None else mlm_inputs
            # Only predicted positions count, so only they go through the MLM head and the vocabulary
            # projection (~15% of the rows; one host sync). Under torch.compile every row does (static shapes).
            rows = None if torch.compiler.is_compiling() else (labels != -100)

            def predicted(hidden):
                return hidden if rows is None else hidden[rows]

            with torch.no_grad():
                soft = self.text_encoder_m.mlm_logits(
                    predicted(self.text_encoder_m(masked_ids, attention_mask, image_embeds_m))).softmax(-1)
            hidden = self.text_encoder(masked_ids, attention_mask, image_embeds)
            logits = self.text_encoder.mlm_logits(predicted(hidden))
            loss_mlm = mlm_distillation_loss(logits, predicted(labels), soft, alpha)
        losses["mlm"] = loss_mlm
        result.loss = total(losses)
        return result

    @torch.no_grad()
    @on_backend
    def retrieval_scores(self, images: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, k: int = 256,
                         chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """ALBEF's retrieval: rank by ITC similarity, re-rank each query's top ``k`` by the ITM
        positive logit. Returns ``(scores_i2t [Ni, Nt], scores_t2i [Nt, Ni])``: the ITM score for the
        top k candidates, -100 elsewhere (as the original). ``chunk`` pairs are fused at a time."""
        c = self.config
        _checks.tensor("images", images, shape=f"[Ni, 3, {c.image_res}, {c.image_res}]", ndim=4)
        attention_mask = _text_mask(input_ids, attention_mask, None, c.pad_token_id)
        image_embeds, image_feat = self.image_features(images)
        text_embeds, text_feat = self.text_features(input_ids, attention_mask)
        sims = image_feat @ text_feat.t()

        def rerank(similarity, image_index_of, text_index_of):
            top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # [Q, k]
            queries = torch.arange(similarity.shape[0], device=similarity.device)[:, None].expand_as(top)
            scores = torch.full_like(similarity, -100.0)
            flat_q, flat_c = queries.flatten(), top.flatten()
            for start in range(0, flat_q.numel(), chunk):
                q, cand = flat_q[start:start + chunk], flat_c[start:start + chunk]
                ti, ii = text_index_of(q, cand), image_index_of(q, cand)
                fused = self.text_encoder.fuse(text_embeds[ti], attention_mask[ti], image_embeds[ii])
                scores[q, cand] = self.itm_head(fused[:, 0])[:, 1].to(scores.dtype)
            return scores

        scores_i2t = rerank(sims, lambda q, cand: q, lambda q, cand: cand)
        scores_t2i = rerank(sims.t(), lambda q, cand: cand, lambda q, cand: q)
        return scores_i2t, scores_t2i


@torch.no_grad()
def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates ``tensor`` over the ranks of the default process group (itself without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world = torch.distributed.get_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def mlm_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, soft_targets: torch.Tensor | None,
                          alpha: float, ignore_index: int = -100) -> torch.Tensor:
    """ALBEF's MLM loss: ``(1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, soft_targets)``,
    each averaged over the predicted positions (label != ignore_index). With no predicted position the
    loss is 0 with zero gradient (ALBEF's mean gives NaN there). ``soft_targets`` None: plain CE."""
    chosen = labels != ignore_index
    weight = chosen.to(logits.dtype)
    count = weight.sum().clamp(min=1)
    log_probs = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    hard = -torch.gather(log_probs, -1, torch.where(chosen, labels, 0)[..., None])[..., 0]
    loss = (hard * weight).sum() / count
    if soft_targets is not None and alpha > 0:
        soft = -(soft_targets.to(log_probs.dtype) * log_probs).sum(-1)
        loss = (1 - alpha) * loss + alpha * (soft * weight).sum() / count
    return loss.to(logits.dtype)


def _momentum_copies_when_absent(module, state_dict, prefix, *_) -> None:
    """A state dict without momentum parameters (a model trained without distillation, a converted
    checkpoint) loads into a ``distill`` model with its momentum copies set to the online weights."""
    names = ("visual_encoder", "text_encoder", "cls_head")
    if any(key.startswith(tuple(f"{prefix}{name}_m." for name in names)) for key in state_dict):
        return
    for key in list(state_dict):
        for name in names:
            if key.startswith(f"{prefix}{name}."):
                state_dict[f"{prefix}{name}_m.{key[len(prefix) + len(name) + 1:]}"] = state_dict[key]


class ALBEFClassifier(nn.Module):
    """ALBEF fine-tuned for classification on the fusion [CLS]: ``cls_head`` = Linear(H, H), ReLU,
    Linear(H, classes). SNLI-VE (3 classes, one image) and NLVR2 (2 classes, two images: the fusion
    encoder has 2 x (layers - fusion_layer) layers alternating between the images, with each pair
    sharing the cross-attention key/value projection, as ALBEF's NLVR2 model).

    Parameters: ``visual_encoder``, ``text_encoder`` (no MLM head), ``cls_head``. With ``distill``
    (ALBEF's ``distill: True``) also the momentum copies ``visual_encoder_m``, ``text_encoder_m``,
    ``cls_head_m`` (no gradient; ``p_m <- m p_m + (1 - m) p`` with the config's ``momentum`` in
    :meth:`momentum_update`): training with labels and ``alpha`` > 0 then minimises
    ``(1 - alpha) CE(logits, labels) + alpha soft-CE(logits, softmax(momentum logits))``.
    """

    def __init__(self, config: ALBEFConfig, num_classes: int = 3, num_images: int = 1,
                 backend: str | None = None, distill: bool = False):
        super().__init__()
        self.backend = backend
        _checks.choice("num_images", num_images, [1, 2])
        self.config, self.num_images = config, num_images
        c = config
        self.visual_encoder = VisionTransformer(c.image_res, c.patch_size, c.vision_width, c.vision_depth,
                                                c.vision_heads, c.vision_mlp_ratio, c.vision_eps)
        fusion = (c.num_hidden_layers - c.fusion_layer) * num_images
        self.text_encoder = ALBEFTextEncoder(c, with_mlm_head=False, fusion_layers=fusion)
        if num_images == 2:
            layers = self.text_encoder.fusion_layers
            for first, second in zip(layers[0::2], layers[1::2]):
                first.crossattention.kv = second.crossattention.kv
        self.cls_head = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.ReLU(),
                                      nn.Linear(c.hidden_size, num_classes))
        self.cls_head.apply(lambda m: init_bert_weights(m, c.initializer_range))
        self.distill = distill
        if distill:  # deepcopy keeps the two-image model's shared key / value tensors shared in the copy
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder).requires_grad_(False)
            self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.cls_head_m = copy.deepcopy(self.cls_head).requires_grad_(False)
            self.register_load_state_dict_pre_hook(_momentum_copies_when_absent)

    def _momentum_pairs(self):
        return ((self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.cls_head, self.cls_head_m))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m <- m p_m + (1 - m) p`` for every momentum parameter (``distill`` models only)."""
        if not self.distill:
            raise ValueError("this ALBEFClassifier has no momentum model (distill=False)")
        for online, moving in self._momentum_pairs():
            params, params_m = list(online.parameters()), list(moving.parameters())
            torch._foreach_mul_(params_m, self.config.momentum)
            torch._foreach_add_(params_m, [p.to(q.dtype) for p, q in zip(params, params_m)],
                                alpha=1.0 - self.config.momentum)

    def _logits(self, pair, input_ids, attention_mask, momentum: bool = False) -> torch.Tensor:
        visual, text, head = ((self.visual_encoder_m, self.text_encoder_m, self.cls_head_m) if momentum
                              else (self.visual_encoder, self.text_encoder, self.cls_head))
        batch = pair[0].shape[0]
        tokens = visual(torch.cat(pair, dim=0)).split(batch)
        return head(text(input_ids, attention_mask, list(tokens))[:, 0])

    @on_backend
    def forward(self, images: torch.Tensor | tuple, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                alpha: float = 0.0, momentum_step: bool = True) -> dict:
        """images ``[B, 3, S, S]`` (or a pair of them for NLVR2); returns ``logits`` (and with labels
        ``loss`` and ``losses`` {"ce", "soft_ce"}). A ``distill`` model in training mode with labels
        first moves its momentum model (when ``momentum_step``: once per optimizer step, the first
        micro-batch), then with ``alpha`` > 0 distils from it; otherwise ``loss`` is the cross-entropy
        (``soft_ce`` 0)."""
        pair = images if isinstance(images, (tuple, list)) else (images,)
        if len(pair) != self.num_images:
            raise ValueError(f"this model takes {self.num_images} image tensor(s) per example, got {len(pair)}")
        batch = pair[0].shape[0]
        for index, image in enumerate(pair):
            _checks.tensor(f"images[{index}]", image, shape="[B, 3, S, S]", ndim=4)
            if image.shape[0] != batch:
                raise ValueError(f"images[{index}] has batch size {image.shape[0]}, images[0] has {batch}")
        attention_mask = _text_mask(input_ids, attention_mask, batch, self.config.pad_token_id)
        logits = self._logits(pair, input_ids, attention_mask)
        result = {"logits": logits}
        if labels is None:
            return result
        ce = F.cross_entropy(logits, labels)
        soft_ce, loss = torch.zeros_like(ce), ce
        if self.distill and self.training:
            if momentum_step:  # also at alpha 0 (the start of ALBEF's warm-up), as the original
                self.momentum_update()
            if alpha > 0:
                with torch.no_grad():
                    soft = self._logits(pair, input_ids, attention_mask, momentum=True).float().softmax(-1)
                soft_ce = -(soft * F.log_softmax(logits.float(), -1)).sum(-1).mean().to(ce.dtype)
                loss = (1 - alpha) * ce + alpha * soft_ce
        result["loss"], result["losses"] = loss, {"ce": ce, "soft_ce": soft_ce}
        return result
