"""The models the benchmarks and ``fastvl parity`` run: the training families of
:mod:`fastvl.train.families` (the same factories and loss readers ``fastvl pretrain`` uses), each with
a synthetic pretraining batch at the paper's per-sample shape (ragged text and regions, 15% masked).

``WORKLOADS["vilbert-base"]()`` -> a :class:`Workload`; names are ``<family>-<variant>`` for every
variant a family has a batch shape for here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fastvl.train import families


@dataclasses.dataclass
class Workload:
    """How to build a model and a synthetic pretraining batch for it.

    ``make_batch(batch_size, generator, device)`` -> the model's keyword arguments; ``shape``: the
    per-sample lengths (text tokens, regions or patches) whose sum counts as the sample's tokens;
    ``losses(output)`` -> (total loss, {objective: loss}), the family's; ``batch_ok``: batch sizes the
    model accepts (ALBEF's queue needs a divisor of its size); ``deterministic``: the forward is a
    function of weights and batch (no momentum encoders, queues or random draws), which ``fastvl
    parity`` needs."""

    build: Callable[[], torch.nn.Module]
    make_batch: Callable[[int, torch.Generator, torch.device], dict]
    shape: dict[str, int]
    losses: Callable[[object], tuple[torch.Tensor, dict]]
    batch_ok: Callable[[int], bool] = lambda batch_size: True
    deterministic: bool = True
    pack: Callable[[dict], dict] | None = None  # padded batch -> the same samples packed (cu_seqlens)

    @property
    def tokens(self) -> int:
        return sum(self.shape.values())

    def loss(self, output) -> torch.Tensor:
        return self.losses(output)[0]

    def packed(self) -> Workload:
        """The same samples as packed batches (every per-token tensor ``[total, ...]``, no padding)."""
        if self.pack is None:
            raise ValueError("this model has no packed batches here (ViLBERT has)")
        make, pack = self.make_batch, self.pack
        return dataclasses.replace(self, make_batch=lambda n, g, d: pack(make(n, g, d)))


def _family_model(name: str, variant: str, options: families.ModelOptions) -> Callable[[], torch.nn.Module]:
    family, _ = families.resolve(f"{name}-{variant}")
    return lambda: family.make_model(variant, options)


def _vilbert(variant: str) -> Workload:
    from fastvl.models.vilbert import ViLBERTConfig

    config = ViLBERTConfig.named(variant)
    make = _family_model("vilbert", variant, families.ModelOptions(config.vocab_size, config.v_target_size,
                                                                   config.v_feature_size))

    def build() -> torch.nn.Module:
        model = make()
        model.bert.validate_values = False  # the region-box range check is a host sync, not model work
        return model

    return Workload(build, lambda n, g, d: _vilbert_batch(config, n, g, d, 36, 37), {"text": 36, "regions": 37},
                    families.FAMILIES["vilbert"].losses, pack=_pack_vilbert)


def _vlbert(variant: str) -> Workload:
    from fastvl.models.vlbert import VLBERTConfig

    config = VLBERTConfig.named(variant)
    text, regions = (59, 100) if variant == "base" else (11, 9)  # base: 160 packed positions with the END token
    make = _family_model("vlbert", variant, families.ModelOptions(config.vocab_size, config.visual_region_classes,
                                                                  config.visual_feature_dim))
    return Workload(make, lambda n, g, d: _vlbert_batch(config, n, g, d, text, regions),
                    {"text": text, "regions": regions, "end": 1}, families.FAMILIES["vlbert"].losses)


def _albef(variant: str) -> Workload:
    from fastvl.models.albef import ALBEFConfig

    config = ALBEFConfig.named(variant)
    text = 30 if variant == "base" else 12
    patches = (config.image_res // config.patch_size) ** 2 + 1
    make = _family_model("albef", variant, families.ModelOptions(config.vocab_size, 0, 0))
    return Workload(make, lambda n, g, d: _albef_batch(config, n, g, d, text), {"text": text, "patches": patches},
                    families.FAMILIES["albef"].losses, batch_ok=lambda n: n >= 2 and config.queue_size % n == 0,
                    deterministic=False)


_SHAPED = {"vilbert": (_vilbert, ("tiny", "base")), "vlbert": (_vlbert, ("tiny", "base")),
           "albef": (_albef, ("tiny", "base"))}
WORKLOADS: dict[str, Callable[[], Workload]] = {
    f"{name}-{variant}": (lambda make=make, variant=variant: make(variant))
    for name, (make, variants) in _SHAPED.items() for variant in variants
    if variant in families.FAMILIES[name].variants
}


# Synthetic batches -----------------------------------------------------------------------------------


def _ragged_text(vocab_size: int, batch: int, length: int, generator: torch.Generator):
    """(input_ids with 0 as padding, bool mask, bool predicted (~15% of the real tokens, token 1 always))."""
    lengths = torch.randint(max(2, length // 2), length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None] < lengths[:, None]
    input_ids = torch.randint(1, vocab_size, (batch, length), generator=generator) * mask
    predicted = (torch.rand(batch, length, generator=generator) < 0.15) & mask
    predicted[:, 1] = True
    return input_ids, mask, predicted


def _boxes(batch: int, regions: int, generator: torch.Generator) -> torch.Tensor:
    """Normalised (x1, y1, x2, y2) with x1 < x2 and y1 < y2; region 0 the whole image."""
    corners = torch.rand(batch, regions, 2, 2, generator=generator).sort(dim=2).values
    boxes = torch.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], dim=-1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


def _vlbert_batch(config, batch: int, generator: torch.Generator, device: torch.device, text_len: int,
                  regions: int) -> dict:
    input_ids, text_mask, predicted = _ragged_text(config.vocab_size, batch, text_len, generator)
    counts = torch.randint(max(2, regions // 2), regions + 1, (batch,), generator=generator)
    region_mask = torch.arange(regions)[None] < counts[:, None]
    masked = (torch.rand(batch, regions, generator=generator) < 0.15) & region_mask
    masked[:, 0] = False
    masked[:, 1] = True
    scores = torch.softmax(4 * torch.randn(batch, regions, config.visual_region_classes, generator=generator), -1)
    tensors = {"input_ids": input_ids, "text_mask": text_mask,
               "mlm_labels": torch.where(predicted, input_ids, torch.full_like(input_ids, -1)),
               "region_features": torch.randn(batch, regions, config.visual_feature_dim, generator=generator).relu(),
               "boxes": _boxes(batch, regions, generator), "region_mask": region_mask, "masked_regions": masked,
               "region_class_scores": scores}
    return {name: t.to(device) for name, t in tensors.items()}


def _albef_batch(config, batch: int, generator: torch.Generator, device: torch.device, text_len: int) -> dict:
    """Images, captions and their MLM inputs ([MASK] at ~15% of the tokens, labels -100 elsewhere), as
    ``fastvl.data.collate_albef`` makes them."""
    input_ids, mask, predicted = _ragged_text(config.vocab_size, batch, text_len, generator)
    input_ids[:, 0] = config.cls_token_id
    predicted[:, 0] = False
    tensors = {"images": torch.randn(batch, 3, config.image_res, config.image_res, generator=generator),
               "input_ids": input_ids, "attention_mask": mask,
               "mlm_input_ids": torch.where(predicted, torch.full_like(input_ids, config.mask_token_id), input_ids),
               "mlm_labels": torch.where(predicted, input_ids, torch.full_like(input_ids, -100))}
    return {name: t.to(device) for name, t in tensors.items()}


def _vilbert_batch(config, batch: int, generator: torch.Generator, device: torch.device, text_len: int,
                   regions: int) -> dict:
    """A ViLBERT pretraining batch with ragged text and regions (region 0 the IMG token over the whole
    image), 15% of tokens and regions masked."""
    text_lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=generator)
    region_counts = torch.randint(regions // 2, regions + 1, (batch,), generator=generator)
    text_mask = torch.arange(text_len)[None] < text_lengths[:, None]
    region_mask = torch.arange(regions)[None] < region_counts[:, None]
    input_ids = torch.randint(1, config.vocab_size, (batch, text_len), generator=generator) * text_mask
    masked_words = (torch.rand(batch, text_len, generator=generator) < 0.15) & text_mask
    masked_words[:, 1] = True
    masked_regions = (torch.rand(batch, regions, generator=generator) < 0.15) & region_mask
    masked_regions[:, 0] = False  # the IMG token is never masked
    masked_regions[:, 1] = True
    corners = torch.rand(batch, regions, 2, 2, generator=generator).sort(dim=2).values  # x1<x2, y1<y2
    x1, x2, y1, y2 = corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], corners[..., 1, 1]
    area = (x2 - x1) * (y2 - y1)
    region_loc = torch.stack([x1, y1, x2, y2, area], dim=-1)
    region_loc[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    tensors = {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros(batch, text_len, dtype=torch.long),
        "text_mask": text_mask,
        "region_feats": torch.randn(batch, regions, config.v_feature_size, generator=generator).relu(),
        "region_loc": region_loc,
        "region_mask": region_mask,
        "mlm_labels": torch.where(masked_words, input_ids, torch.full_like(input_ids, -1)),
        "region_targets": torch.softmax(4 * torch.randn(batch, regions, config.v_target_size, generator=generator), -1),
        "region_labels": masked_regions,
        "is_next": torch.randint(0, 2, (batch,), generator=generator),
    }
    return {name: t.to(device) for name, t in tensors.items()}


def _pack_vilbert(batch: dict) -> dict:
    """A padded ViLBERT batch as ``ViLBERTForPretraining`` takes it packed: real tokens and regions only,
    with int32 ``cu_seqlens_text`` / ``cu_seqlens_regions`` and the longest lengths."""
    text_mask, region_mask = batch["text_mask"], batch["region_mask"]
    packed = {"is_next": batch["is_next"]}
    for name, mask in (("text", text_mask), ("regions", region_mask)):
        lengths = mask.sum(1)
        packed[f"cu_seqlens_{name}"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        packed[f"max_seqlen_{name}"] = int(lengths.max())
    for key in ("input_ids", "token_type_ids", "mlm_labels"):
        packed[key] = batch[key][text_mask]
    for key in ("region_feats", "region_loc", "region_targets", "region_labels"):
        packed[key] = batch[key][region_mask]
    return packed
