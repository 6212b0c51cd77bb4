"""RefCOCO+ referring expressions for ViLBERT and VL-BERT: score every region, pick the top one.

**Data** (:mod:`fastvl.data.refer`): per split the REFER refs and COCO ``instances.json`` (one example
per sentence, the referred box from its annotation). Regions come from fastvl feature sets: ``images``
of ``task.json`` holds the features of the **detected** proposals (ViLBERT's and VL-BERT's MAttNet
detections), the optional ``gt_images`` those of the **ground-truth** COCO boxes. ``boxes``
(``--boxes``) chooses the track VL-BERT reports both of:

* ``detected``: training sees the detected regions plus the ground-truth ones (when ``gt_images`` is
  given; ViLBERT's training mix, VL-BERT's ``TRAIN_BOXES: proposal+gt``), evaluation the detected ones
  only;
* ``gt``: training and evaluation on the ground-truth regions.

Every example's regions are the IMG region (mean feature, whole image) then up to ``max_regions``
real ones; each region's IoU with the referred box uses the originals' convention (COCO ``[x, y, w,
h]`` -> ``[x, y, x + w, y + h]``, inclusive pixels: :func:`fastvl.finetune.metrics.box_iou`); IMG's box
is the whole image.

**Loss**: ViLBERT (``vision_logit``, ``region_score``): binary cross-entropy against the soft targets
of vilbert-multi-task's RefCOCO dataset, the IoU where it is >= 0.5 and 0 elsewhere, summed over real
regions and divided by the batch (its mean x regions); ``soft_targets=False`` gives the hard
``IoU >= 0.5`` labels of :func:`fastvl.models.vilbert.region_loss`. VL-BERT: its RefCOCO head
(:class:`~fastvl.models.vlbert.VLBERTForRefCOCO`), BCE against ``IoU > 0.5``, mean over real regions.

**Metric** ``accuracy``: the percentage of expressions whose top-scored region has IoU >= 0.5 with the
referred box (ViLBERT's score counts IoU > 0.5; equal unless an IoU is exactly 0.5). Reported with it:
``upper_bound`` (some region reaches 0.5: the proposals' recall), and three text-free rules as the
chance level, ``random_region_accuracy`` (the expected accuracy of a uniformly random real region),
``largest_region_accuracy`` and ``first_region_accuracy``, and ``best_trivial_accuracy`` (their max).
Outputs: ``results`` ``[{sent_id, ref_id, box: [x, y, w, h], iou}]``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from fastvl.data.collate import IMG_LOCATION, region_locations
from fastvl.data.format import DataError, RegionDataset
from fastvl.data.refer import read_refcoco_split
from fastvl.data.tasks import TASK_FILE, ImageLookup, read_json
from fastvl.finetune import metrics
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import num_tokens, region_task_model, text_batch, tokenize

BOX_MODES = ("detected", "gt")
THRESHOLD = 0.5


def soft_region_targets(ious: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """vilbert-multi-task's RefCOCO training targets: the IoU where it is >= ``threshold``, else 0."""
    return torch.where(ious >= threshold, ious, torch.zeros_like(ious))


def vilbert_region_bce(region_score: torch.Tensor, targets: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """BCE with logits of ``region_score [B, R]`` against ``targets [B, R]`` (soft or 0/1), summed over
    real regions (``region_mask``) and divided by B."""
    per_region = F.binary_cross_entropy_with_logits(region_score.float(), targets.float(), reduction="none")
    return (per_region * region_mask.float()).sum() / region_score.shape[0]


def extra_image_set(task_dir, key: str, tokenizer) -> RegionDataset | None:
    """A second feature set named by ``key`` in ``task.json`` (``gt_images``), or None."""
    manifest = read_json(os.path.join(task_dir.root, TASK_FILE))
    if manifest.get(key) is None:
        return None
    if not isinstance(manifest[key], str):
        raise DataError(f"{os.path.join(task_dir.root, TASK_FILE)}: {key!r} must be a fastvl dataset path")
    return RegionDataset(os.path.join(task_dir.root, manifest[key]), tokenizer)


class RefCOCOTask(Task):
    name = "refcoco"
    families = ("vilbert", "vlbert")
    objectives = ("bce",)
    metric = "accuracy"
    options = ("boxes", "trust_pickle")  # task options the command line passes through

    def __init__(self, task_dir, family, dataset, special, *, state=None, boxes: str | None = None,
                 trust_pickle: bool = False, soft_targets: bool = True, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        boxes = boxes or (state or {}).get("boxes", "detected")
        if boxes not in BOX_MODES:
            raise ValueError(f"--boxes must be one of {list(BOX_MODES)}, got {boxes!r}")
        self.boxes, self.trust_pickle, self.soft_targets = boxes, trust_pickle, soft_targets
        self.gt = extra_image_set(task_dir, "gt_images", dataset.tokenizer)
        if boxes == "gt" and self.gt is None:
            raise DataError(f"{os.path.join(task_dir.root, TASK_FILE)}: --boxes gt needs 'gt_images' (the features "
                            "of the ground-truth boxes)")
        if self.gt is not None and (self.gt.feature_dim, self.gt.num_classes) != (dataset.feature_dim,
                                                                                 dataset.num_classes):
            raise DataError(f"{self.gt.dir}: features {self.gt.feature_dim} / classes {self.gt.num_classes} differ "
                            f"from {dataset.dir}'s {dataset.feature_dim} / {dataset.num_classes}")
        self.lookups = {"detected": ImageLookup(dataset.image_ids, dataset.dir)}
        if self.gt is not None:
            self.lookups["gt"] = ImageLookup(self.gt.image_ids, self.gt.dir)
        self._splits: dict = {}

    def state(self) -> dict:
        return {"boxes": self.boxes}

    def sources(self, split: str) -> list[str]:
        """The feature sets whose regions an example of ``split`` sees, in order."""
        if self.boxes == "gt":
            return ["gt"]
        return ["detected", "gt"] if split == "train" and self.gt is not None else ["detected"]

    def split(self, name: str):
        """``(expressions, {source: image index per expression}, word pieces)`` of a split (read once)."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            expressions = read_refcoco_split(files, name, self.trust_pickle)
            where = files["refs"]
            images = {source: [self.lookups[source](e.image_id, f"{where}: sent_id {e.sent_id}") for e in expressions]
                      for source in self.sources(name)}
            pieces = tokenize(self.dataset.tokenizer, [e.text for e in expressions], self.family)
            self._splits[name] = (expressions, images, pieces)
        return self._splits[name]

    def make_model(self, config) -> torch.nn.Module:
        return region_task_model(config, self.family, "VLBERTForRefCOCO")

    def num_train(self) -> int:
        return len(self.split("train")[0])

    def regions(self, split: str, indices) -> dict:
        """Region inputs of expressions ``indices`` and every region's IoU with the referred box:
        ``region_feats``, ``region_loc``, ``region_mask``, ``ious`` ``[B, Lv]`` and ``boxes`` (pixels
        ``x1, y1, x2, y2``, float64 numpy ``[B, Lv, 4]``)."""
        expressions, images, _ = self.split(split)
        sets = {"detected": self.dataset, "gt": self.gt}
        feats, boxes, sizes = [], [], []
        for i in indices:
            parts_f, parts_b = [], []
            left = self.max_regions
            for source in self.sources(split):
                example = sets[source][images[source][i]]
                n = min(example.features.shape[0], left)
                parts_f.append(np.asarray(example.features[:n], np.float32))
                parts_b.append(np.asarray(example.boxes[:n], np.float64))
                left -= n
            f, b = np.concatenate(parts_f), np.concatenate(parts_b)
            first = sets[self.sources(split)[0]][images[self.sources(split)[0]][i]]
            sizes.append((first.image_h, first.image_w))  # the feature sets' pixel frame (normally the COCO one)
            whole = np.array([[0.0, 0.0, first.image_w, first.image_h]])
            feats.append(np.concatenate([parts_f[0].mean(axis=0, keepdims=True), f]))
            boxes.append(np.concatenate([whole, b]))
        length = max(len(f) for f in feats)
        out_f = np.zeros((len(feats), length, feats[0].shape[1]), np.float32)
        out_l = np.zeros((len(feats), length, 5), np.float32)
        out_b = np.zeros((len(feats), length, 4), np.float64)
        ious = np.zeros((len(feats), length), np.float32)
        for row, (i, f, b, (height, width)) in enumerate(zip(indices, feats, boxes, sizes)):
            e = expressions[i]
            out_f[row, : len(f)], out_b[row, : len(b)] = f, b
            out_l[row, 0] = IMG_LOCATION
            out_l[row, 1: len(b)] = region_locations(b[1:].astype(np.float32), height, width)
            ious[row, : len(b)] = metrics.box_iou(b, metrics.xywh_to_xyxy(e.box)[None])[:, 0]
        mask = np.arange(length)[None, :] < np.array([len(f) for f in feats])[:, None]
        return {"region_feats": torch.from_numpy(out_f), "region_loc": torch.from_numpy(out_l).clamp_(0, 1),
                "region_mask": torch.from_numpy(mask), "ious": torch.from_numpy(ious), "boxes": out_b}

    def _batch(self, split: str, indices) -> dict:
        _, _, pieces = self.split(split)
        batch = text_batch([pieces[i] for i in indices], self.special, self.family, self.max_text_len)
        batch.update(self.regions(split, indices))
        return batch

    def collate(self, keys) -> dict:
        batch = self._batch("train", [int(index) for _, index in keys])
        batch.pop("boxes")
        batch["num_tokens"] = num_tokens(batch)
        return batch

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Region scores ``[B, Lv]`` (padded regions -10000)."""
        if self.family == "vilbert":
            return model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                         batch["region_loc"], batch["region_mask"]).region_score
        return model(batch["input_ids"], batch["region_feats"], batch["region_loc"][..., :4],
                     token_type_ids=batch["token_type_ids"], text_mask=batch["text_mask"],
                     region_mask=batch["region_mask"])["logits"]

    def loss(self, model, batch):
        if self.family == "vlbert":
            out = model(batch["input_ids"], batch["region_feats"], batch["region_loc"][..., :4], ious=batch["ious"],
                        token_type_ids=batch["token_type_ids"], text_mask=batch["text_mask"],
                        region_mask=batch["region_mask"])
            return out["loss"], {"bce": out["loss"]}
        score = self.scores(model, batch)
        ious = batch["ious"].float()
        targets = soft_region_targets(ious) if self.soft_targets else (ious >= THRESHOLD).float()
        loss = vilbert_region_bce(score, targets, batch["region_mask"]).to(score.dtype)
        return loss, {"bce": loss}

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        expressions, _, _ = self.split(split)
        indices, real = share(len(expressions), ctx.rank, ctx.world)
        rows = []
        for chunk in batches(indices, ctx.batch_size):
            batch = self._batch(split, chunk)
            boxes = batch.pop("boxes")
            scores = self.scores(model, ctx.to_device(batch)).float().cpu()
            rows += region_rows(scores, batch["ious"], batch["region_mask"], boxes)
        mine = [(expressions[i].sent_id, expressions[i].ref_id, *row) for i, row in zip(indices[:real], rows[:real])]
        return summarise(gather(mine, ctx))


def region_rows(scores: torch.Tensor, ious: torch.Tensor, mask: torch.Tensor, boxes: np.ndarray) -> list[tuple]:
    """Per example ``(predicted box [x, y, w, h], its IoU, reachable, random-region hit rate, largest
    region's IoU, first real region's IoU)`` from region scores, IoUs, the mask and pixel boxes."""
    rows = []
    top = scores.masked_fill(~mask, float("-inf")).argmax(dim=1)
    for row in range(scores.shape[0]):
        real = mask[row].numpy()
        iou = ious[row].double().numpy()
        b = boxes[row]
        area = np.where(real, (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), -np.inf)
        area[0] = -np.inf if real[1:].any() else area[0]  # the whole image is not a region of its own
        pick = int(top[row])
        x1, y1, x2, y2 = b[pick]
        first = 1 if real.sum() > 1 else 0
        rows.append(([float(x1), float(y1), float(x2 - x1), float(y2 - y1)], float(iou[pick]),
                     bool(((iou >= THRESHOLD) & real).any()), float((iou[real] >= THRESHOLD).mean()),
                     float(iou[int(np.argmax(area))]), float(iou[first])))
    return rows


def summarise(rows: list[tuple]) -> tuple[dict, dict]:
    """Metrics and outputs from every example's ``(sent_id, ref_id, *region_rows row)``."""
    if not rows:
        raise DataError("no referring expressions to score")
    ious = [r[3] for r in rows]
    out = {"accuracy": metrics.accuracy_at_iou(ious, THRESHOLD),
           "upper_bound": 100.0 * float(np.mean([r[4] for r in rows])),
           "random_region_accuracy": 100.0 * float(np.mean([r[5] for r in rows])),
           "largest_region_accuracy": metrics.accuracy_at_iou([r[6] for r in rows], THRESHOLD),
           "first_region_accuracy": metrics.accuracy_at_iou([r[7] for r in rows], THRESHOLD),
           "expressions": len(rows)}
    out["best_trivial_accuracy"] = max(out["random_region_accuracy"], out["largest_region_accuracy"],
                                       out["first_region_accuracy"])
    results = [{"sent_id": r[0], "ref_id": r[1], "box": r[2], "iou": r[3]} for r in rows]
    return out, {"results": results}

