"""ViLBERT's pretraining collation: masking, alignment negatives, padding or packing.

Per pair (the released ViLBERT code's rules; SEED-SYSTEMS.md):

* **Alignment**: with probability 0.5 the caption is replaced by another record's caption
  (``is_next = 1``; 0 = aligned).
* **Words**: each word piece (never [CLS]/[SEP]) is selected with probability 0.15; a selected one
  becomes [MASK] 80% of the time, a uniformly random vocabulary id 10%, stays itself 10%; every
  selected position is labelled with its original id (``mlm_labels``, -1 elsewhere).
* **Regions**: each real region is selected with probability 0.15; a selected one has its feature
  zeroed 90% of the time and kept 10%; every selected region is labelled (``region_labels``) with the
  detector's class distribution as KL target. Position 0 is the IMG region (location
  ``[0, 0, 1, 1, 1]``, never masked); its feature is vilbert-multi-task's: the sum of the region
  features *after* zeroing, divided by the number of real regions that overlap no selected region
  (pixel-box IoU > 0.4, the ``+1`` pixel convention; at least 1). A zeroed region's feature therefore
  never reaches the IMG token, so masked-region prediction cannot read its answer there.
* Locations are ``[x1/W, y1/H, x2/W, y2/H, box area / image area]``.

Objectives (vilbert-multi-task's ``--objective``): 0 = every loss on every pair (the ViLBERT paper's
setting, and vilbert_beta's only one); 1 = a misaligned pair (``is_next = 1``) gets no masked-word
or masked-region labels (its inputs are masked all the same; its caption does not describe the
image), the setting vilbert-multi-task's README pretrains with; 2 = no misaligned pairs and no
alignment loss (the batch carries no ``is_next``).

Randomness is drawn from ``numpy.random.default_rng((seed, epoch, index))`` per sample, so a
sample's masking depends only on the seed, the epoch and the sample, never on batching, worker
count, data-parallel layout or resumption.

Batches are padded to the longest sequence (optionally a multiple of ``pad_to_multiple_of``), or
packed: every per-token / per-region field flattened to ``[total, ...]`` with int32 ``cu_seqlens``
(FlashAttention's convention); :func:`unpack` turns a packed batch into the padded one.
"""

from __future__ import annotations

import numpy as np
import torch

from fastvl.data.format import Example

IMG_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)
OBJECTIVES = {0: "every loss on every pair", 1: "no masked-word / masked-region labels on misaligned pairs",
              2: "no misaligned pairs, no alignment loss"}
IMG_OVERLAP_IOU = 0.4  # regions overlapping a selected one this much leave the IMG feature's count
TEXT_FIELDS = ("input_ids", "token_type_ids", "mlm_labels")
REGION_FIELDS = ("region_feats", "region_loc", "region_targets", "region_labels", "region_replaced")
PAD_VALUES = {"input_ids": 0, "token_type_ids": 0, "mlm_labels": -1, "region_feats": 0.0, "region_loc": 0.0,
              "region_targets": 0.0, "region_labels": False,
              "region_replaced": False}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, K]`` of pixel boxes ``a [N, 4]`` and ``b [K, 4]`` (x1, y1, x2, y2), with the detectors'
    inclusive-pixel ``+1`` widths as vilbert-multi-task computes it."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1, 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1, 0, None)
    inter = width * height
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def region_locations(boxes: np.ndarray, image_h: int, image_w: int) -> np.ndarray:
    """Pixel boxes ``[N, 4]`` -> ViLBERT's 5-d locations ``[N, 5]`` (float32)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    width, height = float(max(image_w, 1)), float(max(image_h, 1))
    scaled = boxes / np.array([width, height, width, height], dtype=np.float32)
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    return np.concatenate([scaled, area[:, None]], axis=1).astype(np.float32)


class ViLBERTCollator:
    """Turns a list of ``(epoch, index)`` sample keys into a ViLBERT pretraining batch.

    ``dataset``: a :class:`fastvl.data.format.RegionDataset` (also the source of negative captions);
    ``special``: :class:`fastvl.data.tokenizer.SpecialIds`; ``vocab_size`` for random replacements.
    Output (padded): input_ids / token_type_ids / mlm_labels ``[B, Lt]`` long, text_mask ``[B, Lt]``
    bool, region_feats ``[B, Lv, D]`` float32, region_loc ``[B, Lv, 5]``, region_mask ``[B, Lv]`` bool,
    region_targets ``[B, Lv, C]``, region_labels ``[B, Lv]`` bool (masked: the loss's regions),
    region_replaced ``[B, Lv]`` bool (the masked ones whose input was replaced), is_next ``[B]`` long, plus
    ``num_tokens`` (int: real text tokens + real regions) and ``keys`` (the sample keys).
    """

    def __init__(self, dataset, special, vocab_size: int, *, seed: int = 0, max_text_len: int = 36,
                 max_regions: int = 36, word_mask_prob: float = 0.15, region_mask_prob: float = 0.15,
                 negative_prob: float = 0.5, packed: bool = False, pad_to_multiple_of: int = 1,
                 objective: int = 0):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} (vilbert-multi-task's --objective: "
                             f"{'; '.join(f'{k} = {v}' for k, v in OBJECTIVES.items())}), got {objective!r}")
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 ([CLS] word [SEP]), got {max_text_len}")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.dataset = dataset
        self.special = special
        self.vocab_size = vocab_size
        self.seed = seed
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.word_mask_prob = word_mask_prob
        self.region_mask_prob = region_mask_prob
        self.objective = objective
        self.negative_prob = 0.0 if objective == 2 else negative_prob
        self.packed = packed
        self.pad_to_multiple_of = pad_to_multiple_of

    def sample(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """One masked pair as unpadded arrays (text ``[Lt]``, regions ``[1 + N, ...]``)."""
        rng = np.random.default_rng((self.seed, epoch, index))
        example: Example = self.dataset[index]
        is_next = 0
        caption = example.token_ids
        if len(self.dataset) > 1 and rng.random() < self.negative_prob:
            other = int(rng.integers(len(self.dataset) - 1))
            other += other >= index
            caption, is_next = self.dataset.token_ids[other], 1
        text = self._mask_words(caption[: self.max_text_len - 2], rng)
        regions = self._mask_regions(example, rng)
        if is_next and self.objective == 1:  # the caption does not describe the image: nothing to predict
            text["mlm_labels"] = np.full_like(text["mlm_labels"], -1)
            regions["region_labels"] = np.zeros_like(regions["region_labels"])
        return {**text, **regions, "is_next": np.int64(is_next)}

    def _mask_words(self, pieces: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = self.special
        ids = np.concatenate([[s.cls], pieces, [s.sep]]).astype(np.int64)
        labels = np.full_like(ids, -1)
        draw = rng.random(len(ids))
        action = rng.random(len(ids))
        random_ids = rng.integers(self.vocab_size, size=len(ids))
        selected = draw < self.word_mask_prob
        selected[0] = selected[-1] = False  # [CLS] and [SEP] are never masked
        labels[selected] = ids[selected]
        return _replace_masked(ids, labels, selected, action, random_ids, s.mask)

    def _mask_regions(self, example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
        features, locations, targets = _real_regions(example, self.max_regions)
        selected = rng.random(len(features)) < self.region_mask_prob
        zeroed = selected & (rng.random(len(features)) < 0.9)
        features = np.where(zeroed[:, None], np.float32(0.0), features)
        boxes = np.asarray(example.boxes[: len(features)], dtype=np.float64)
        overlapped = (box_iou(boxes[selected], boxes) > IMG_OVERLAP_IOU).any(axis=0)
        image_feature = features.sum(axis=0, keepdims=True) / max(1, int((~overlapped).sum()))
        return _with_img_region(image_feature, features, locations, targets, selected, zeroed)

    def __call__(self, keys) -> dict:
        samples = [self.sample(int(epoch), int(index)) for epoch, index in keys]
        batch = pack(samples) if self.packed else pad(samples, self.pad_to_multiple_of)
        if self.objective == 2:  # no alignment task
            del batch["is_next"]
        batch["keys"] = [(int(e), int(i)) for e, i in keys]
        return batch



def _replace_masked(ids, labels, selected, action, random_ids, mask_id) -> dict[str, np.ndarray]:
    """BERT's replacement of selected pieces: 80% [MASK], 10% a random id, 10% kept."""
    ids = np.where(selected & (action < 0.8), mask_id, ids)
    ids = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, ids)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "mlm_labels": labels}


def _real_regions(example: Example, max_regions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, D], locations [n, 5], detector targets [n, C]) of the first ``max_regions`` regions."""
    n = min(example.features.shape[0], max_regions)
    features = np.asarray(example.features[:n], dtype=np.float32)
    locations = region_locations(example.boxes[:n], example.image_h, example.image_w)
    return features, locations, np.asarray(example.cls_prob[:n], dtype=np.float32)


def _with_img_region(image_feature, features, locations, targets, selected, replaced) -> dict[str, np.ndarray]:
    """Prepends the IMG region (mean feature, whole-image box, never masked) to a sample's regions.

    ``selected``: labelled regions (the loss's targets); ``replaced``: the selected ones whose input was
    masked (90% of them; the other 10% keep their feature)."""
    return {
        "region_feats": np.concatenate([image_feature, features]),
        "region_loc": np.concatenate([np.array([IMG_LOCATION], dtype=np.float32), locations]),
        "region_targets": np.concatenate([np.zeros((1, targets.shape[1]), np.float32), targets]),
        "region_labels": np.concatenate([[False], selected]),
        "region_replaced": np.concatenate([[False], replaced]),
    }

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad(samples: list[dict], pad_to_multiple_of: int = 1) -> dict:
    """Per-sample arrays -> padded tensors with ``text_mask`` / ``region_mask`` (True = real)."""
    text_lengths = [len(s["input_ids"]) for s in samples]
    region_lengths = [len(s["region_feats"]) for s in samples]
    lt, lv = (_round_up(max(v), pad_to_multiple_of) for v in (text_lengths, region_lengths))
    batch = {}
    for fields, length, lengths in ((TEXT_FIELDS, lt, text_lengths), (REGION_FIELDS, lv, region_lengths)):
        for key in fields:
            first = samples[0][key]
            out = np.full((len(samples), length, *first.shape[1:]), PAD_VALUES[key], dtype=first.dtype)
            for row, s in enumerate(samples):
                out[row, : len(s[key])] = s[key]
            batch[key] = torch.from_numpy(out)
        mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
        batch["text_mask" if fields is TEXT_FIELDS else "region_mask"] = torch.from_numpy(mask)
    if all("is_next" in s for s in samples):
        batch["is_next"] = torch.tensor([int(s["is_next"]) for s in samples], dtype=torch.long)
    batch["num_tokens"] = sum(text_lengths) + sum(region_lengths)
    return batch


def pack(samples: list[dict]) -> dict:
    """Per-sample arrays -> packed ``[total, ...]`` tensors with ``cu_seqlens_text`` / ``cu_seqlens_regions``."""
    batch: dict = {"packed": True}
    for fields, name in ((TEXT_FIELDS, "text"), (REGION_FIELDS, "regions")):
        lengths = [len(s[fields[0]]) for s in samples]
        for key in fields:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples]))
        batch[f"cu_seqlens_{name}"] = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        batch[f"max_seqlen_{name}"] = max(lengths)
    batch["is_next"] = torch.tensor([int(s["is_next"]) for s in samples], dtype=torch.long)
    batch["num_tokens"] = int(batch["cu_seqlens_text"][-1] + batch["cu_seqlens_regions"][-1])
    return batch


def unpack(batch: dict, pad_to_multiple_of: int = 1) -> dict:
    """A packed batch -> the padded batch :func:`pad` gives for the same samples."""
    if not batch.get("packed"):
        return batch
    samples = []
    cu_t, cu_v = batch["cu_seqlens_text"].tolist(), batch["cu_seqlens_regions"].tolist()
    for row in range(len(cu_t) - 1):
        sample = {k: batch[k][cu_t[row]: cu_t[row + 1]].numpy() for k in TEXT_FIELDS}
        sample.update({k: batch[k][cu_v[row]: cu_v[row + 1]].numpy() for k in REGION_FIELDS})
        if "is_next" in batch:
            sample["is_next"] = batch["is_next"][row]
        samples.append(sample)
    out = pad(samples, pad_to_multiple_of)
    for key in ("keys",):
        if key in batch:
            out[key] = batch[key]
    return out


class VLBERTCollator(ViLBERTCollator):
    """VL-BERT's pretraining rules on the same batch layout (field names as :class:`ViLBERTCollator`'s):

    * **Words**, whole-word masking: each word (a piece and its ``##`` continuations) is selected with
      probability 0.15; all its pieces become [MASK] 80% of the time, random ids 10%, stay 10%, and all
      are labelled.
    * **Regions**: region 0 is the whole image (mean feature, box ``[0, 0, 1, 1]``); each real region
      is selected with probability 0.15 and labelled (``region_labels``) with the detector's class
      distribution; 90% of the selected ones are marked ``region_replaced`` (the other 10% keep their
      input). Features are left as they are: the model swaps a replaced region's feature and word
      embedding for its learned mask embeddings.
    * No caption swapping: the released configuration trains without the sentence-image relation
      loss, so every pair is aligned (``is_next`` 0).
    """

    def __init__(self, dataset, special, vocab_size: int, **kwargs):
        kwargs.setdefault("negative_prob", 0.0)
        super().__init__(dataset, special, vocab_size, **kwargs)
        tokenizer = dataset.tokenizer
        self.continuation = np.array([(tokenizer.id_to_token(i) or "").startswith("##")
                                      for i in range(tokenizer.get_vocab_size())])

    def _mask_words(self, pieces: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = self.special
        ids = np.concatenate([[s.cls], pieces, [s.sep]]).astype(np.int64)
        word = np.cumsum(~self.continuation[ids]) - 1  # word index of every piece ([CLS], [SEP] their own)
        words = word[-1] + 1
        draw, action = rng.random(words), rng.random(words)
        random_ids = rng.integers(self.vocab_size, size=len(ids))
        selected_word = draw < self.word_mask_prob
        selected_word[word[0]] = selected_word[word[-1]] = False
        selected, act = selected_word[word], action[word]
        labels = np.where(selected, ids, -1)
        return _replace_masked(ids, labels, selected, act, random_ids, s.mask)

    def _mask_regions(self, example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
        features, locations, targets = _real_regions(example, self.max_regions)
        selected = rng.random(len(features)) < self.region_mask_prob
        replaced = selected & (rng.random(len(features)) < 0.9)
        return _with_img_region(features.mean(axis=0, keepdims=True), features, locations, targets, selected, replaced)
