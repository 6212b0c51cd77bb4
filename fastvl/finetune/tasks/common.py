"""What the task modules share: the models per family, image inputs per family, text batches and
loading a pretraining checkpoint into a task model.

Families: ``vilbert`` (region features; :class:`~fastvl.models.vilbert.ViLBERTForTasks`), ``vlbert``
(region features; its task models), ``albef`` (pixels; :class:`~fastvl.models.albef.ALBEFClassifier`
or, for retrieval, the pretraining model itself). A task model's encoder has the pretraining model's
parameter names, so ``--init`` loads the encoder (and the heads that exist in both) by name.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from fastvl.data.collate import IMG_LOCATION, region_locations
from fastvl.data.collate_albef import albef_caption, normalise_images
from fastvl.data.format import DataError

QUEUE_BUFFERS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
# parameter prefixes every one of which --init must provide (the pretrained encoder)
ENCODER_PREFIXES = {"vilbert": ("bert.",), "vlbert": ("vlbert.",), "albef": ("visual_encoder.", "text_encoder.")}


def model_config(family: str, variant: str, dataset, special, dropout: float | None = None):
    """The family's named config with the dataset's vocabulary, feature width, classes and image size."""
    vocab = dataset.tokenizer.get_vocab_size()
    if family == "vilbert":
        from fastvl.models.vilbert import ViLBERTConfig

        overrides = {"vocab_size": vocab, "v_target_size": dataset.num_classes, "v_feature_size": dataset.feature_dim}
        if dropout is not None:
            overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                             v_hidden_dropout_prob=dropout, v_attention_probs_dropout_prob=dropout)
        return ViLBERTConfig.named(variant, **overrides)
    if family == "vlbert":
        from fastvl.models.vlbert import VLBERTConfig

        overrides = {"vocab_size": vocab, "visual_region_classes": dataset.num_classes,
                     "visual_feature_dim": dataset.feature_dim, "pad_token_id": special.pad}
        if dropout is not None:
            overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return VLBERTConfig.named(variant, **overrides)
    if family == "albef":
        from fastvl.models.albef import ALBEFConfig

        height, width = dataset.require_pixels("ALBEF")
        if height != width:
            raise DataError(f"{dataset.dir}: ALBEF's ViT takes square images, the set's are {height} x {width}")
        overrides = {"vocab_size": vocab, "pad_token_id": special.pad, "cls_token_id": special.cls,
                     "mask_token_id": special.mask, "image_res": height}
        if dropout is not None:
            overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return ALBEFConfig.named(variant, **overrides)
    raise ValueError(f"unknown model family {family!r}")


def config_class(family: str):
    from fastvl.models.albef import ALBEFConfig
    from fastvl.models.vilbert import ViLBERTConfig
    from fastvl.models.vlbert import VLBERTConfig

    return {"vilbert": ViLBERTConfig, "vlbert": VLBERTConfig, "albef": ALBEFConfig}[family]


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(family: str, values: dict):
    cls = config_class(family)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in fields})


# --init ---------------------------------------------------------------------------------------------


def read_init_state(path: str) -> dict[str, torch.Tensor]:
    """The weights of ``path``: a fastvl checkpoint file (``best.pt`` of a fine-tuning run, a converted
    or exported state dict; safetensors or torch, loaded weights_only), or a DeepSpeed checkpoint
    directory of ``fastvl pretrain`` (``OUT``, ``OUT/checkpoints`` or a ``step-N`` tag folder; ZeRO 0-2:
    its ``mp_rank_00_model_states.pt``; ZeRO-3 shards are consolidated by DeepSpeed's zero_to_fp32)."""
    from fastvl.convert.common import load_state_dict_file, normalise_keys

    if os.path.isfile(path):
        return normalise_keys(load_state_dict_file(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--init {path!r}: no such file or directory")
    from fastvl.train.checkpoint import load_weights_only, read_latest

    folder = path
    for candidate in (os.path.join(path, "checkpoints"), path):
        tag = read_latest(candidate)
        if tag:
            folder = os.path.join(candidate, tag)
            break
    states = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise FileNotFoundError(f"--init {path!r}: no DeepSpeed checkpoint there (no {states})")
    loaded = load_weights_only(states, map_location="cpu")
    module = loaded.get("module") if isinstance(loaded, dict) else None
    if not module or any(v.numel() == 0 for v in module.values() if isinstance(v, torch.Tensor)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), os.path.basename(folder))
    return normalise_keys({k: v for k, v in module.items() if isinstance(v, torch.Tensor)})


def convert_original(family: str, path: str, config_path: str) -> dict[str, torch.Tensor]:
    """An original release (ViLBERT / VL-BERT / ALBEF checkpoint, loaded weights_only, and its JSON or YAML
    config) converted on the fly by :mod:`fastvl.convert` (strict: every key must map)."""
    import importlib
    import json

    from fastvl.convert.cli import CONVERTERS
    from fastvl.convert.common import load_state_dict_file

    with open(config_path, encoding="utf-8") as f:
        if config_path.endswith((".yaml", ".yml")):
            import yaml

            config = yaml.safe_load(f)
        else:
            config = json.load(f)
    module, function = CONVERTERS[family]
    model = getattr(importlib.import_module(module), function)(load_state_dict_file(path), config)
    return model.state_dict()


def load_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor], family: str, source: str) -> dict:
    """Loads the parameters of ``state`` that ``model`` has (same name and shape). Every encoder
    parameter (:data:`ENCODER_PREFIXES`) must be there; returns ``{"loaded", "new", "unused"}`` counts
    and the new (randomly initialised) parameter names."""
    target = model.state_dict()
    # (ViLBERT's task-token table is new when the pretraining had none, as in 12-in-1's multi-task fine-tuning)
    encoder = [k for k in target if k.startswith(ENCODER_PREFIXES[family]) and ".mlm_head." not in k
               and not k.startswith("bert.task_embeddings.")]
    missing = [k for k in encoder if k not in state]
    # ALBEF's queues are sized by the global batch: a different size starts new (random) queues
    state = {k: v for k, v in state.items() if not (k in QUEUE_BUFFERS and k in target and v.shape != target[k].shape)}
    wrong = [f"{k}: {list(state[k].shape)} vs {list(target[k].shape)}" for k in target
             if k in state and state[k].shape != target[k].shape and not (k == "temp" and state[k].numel() == 1)]
    if missing or wrong:
        raise ValueError(f"--init {source}: not a {family} checkpoint of this size: "
                         + (f"{len(missing)} encoder parameters missing (e.g. {missing[:3]})" if missing else "")
                         + (f"; shapes differ: {wrong[:3]}" if wrong else ""))
    chosen = {k: v for k, v in state.items() if k in target}
    result = model.load_state_dict(chosen, strict=False)
    return {"loaded": len(chosen), "new": list(result.missing_keys), "unused": len(state) - len(chosen)}


# batches --------------------------------------------------------------------------------------------


def pad_ids(rows: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows -> ``(ids [B, L], mask [B, L] bool)`` padded with ``pad``."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = np.arange(length)[None, :] < np.array([len(r) for r in rows])[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask)


def tokenize(tokenizer, texts: list[str], family: str) -> list[np.ndarray]:
    """Word pieces of ``texts`` (ALBEF: after its caption cleaning), without special tokens."""
    if family == "albef":
        texts = [albef_caption(t) for t in texts]
    return [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def text_batch(pieces: list[np.ndarray], special, family: str, max_len: int) -> dict[str, torch.Tensor]:
    """``[CLS] pieces [SEP]`` (ALBEF: ``[CLS] pieces``, no [SEP]) padded: input_ids, token_type_ids, text_mask."""
    if family == "albef":
        rows = [np.concatenate([[special.cls], p[: max_len - 1]]) for p in pieces]
    else:
        rows = [np.concatenate([[special.cls], p[: max_len - 2], [special.sep]]) for p in pieces]
    ids, mask = pad_ids(rows, special.pad)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "text_mask": mask}


def region_batch(dataset, indices, max_regions: int) -> dict[str, torch.Tensor]:
    """Regions of images ``indices``: the IMG region (mean feature, whole-image box) then up to
    ``max_regions`` real ones; ``region_feats [B, Lv, D]``, ``region_loc [B, Lv, 5]``, ``region_mask``."""
    feats, locs = [], []
    for index in indices:
        example = dataset[int(index)]
        n = min(example.features.shape[0], max_regions)
        f = np.asarray(example.features[:n], dtype=np.float32)
        feats.append(np.concatenate([f.mean(axis=0, keepdims=True), f]))
        locs.append(np.concatenate([np.array([IMG_LOCATION], np.float32),
                                    region_locations(example.boxes[:n], example.image_h, example.image_w)]))
    length = max(len(f) for f in feats)
    out_f = np.zeros((len(feats), length, feats[0].shape[1]), np.float32)
    out_l = np.zeros((len(feats), length, 5), np.float32)
    for i, (f, loc) in enumerate(zip(feats, locs)):
        out_f[i, : len(f)], out_l[i, : len(loc)] = f, loc
    mask = np.arange(length)[None, :] < np.array([len(f) for f in feats])[:, None]
    return {"region_feats": torch.from_numpy(out_f), "region_loc": torch.from_numpy(out_l).clamp_(0, 1),
            "region_mask": torch.from_numpy(mask)}


def pixel_batch(dataset, indices) -> torch.Tensor:
    return normalise_images(np.stack([dataset[int(i)].pixels for i in indices]))


def image_batch(family: str, dataset, indices, max_regions: int) -> dict[str, torch.Tensor]:
    if family == "albef":
        return {"images": pixel_batch(dataset, indices)}
    return region_batch(dataset, indices, max_regions)


def num_tokens(batch: dict) -> int:
    count = int(batch["text_mask"].sum())
    if "region_mask" in batch:
        count += int(batch["region_mask"].sum())
    return count


def repeat_rows(batch: dict, times: int) -> dict:
    return {k: v.repeat_interleave(times, dim=0) for k, v in batch.items()}


def albef_step_inputs(micro, sampler) -> dict:
    """Where a micro-step sits, for ALBEF's ITC + ITM training: the distillation weight's warm-up over the
    first epoch and the first / last micro-step of the optimizer step (the queue and momentum updates)."""
    return {"alpha_scale": min(1.0, micro.global_step / sampler.steps_per_epoch),
            "first_micro_step": micro.micro_step == 0, "last_micro_step": micro.micro_step == sampler.grad_accum - 1}


def region_task_model(config, family: str, vlbert_head: str) -> torch.nn.Module:
    """The task model of a region-feature task scored per option or region: ViLBERT's
    ``ViLBERTForTasks`` (its ``vil_logit`` / ``vision_logit``; the VQA classifier kept small), or the
    VL-BERT task model named ``vlbert_head`` (``VLBERTForVCR``, ``VLBERTForRefCOCO``)."""
    if family == "vilbert":
        from fastvl.models.vilbert import ViLBERTForTasks

        return ViLBERTForTasks(config, num_labels=2)
    from fastvl.models import vlbert

    return getattr(vlbert, vlbert_head)(config)
