"""ALBEF's pretraining collation: its caption cleaning, [CLS]-only token layout, MLM masking and
normalised image tensors (the released code's rules; SEED-SYSTEMS.md).

Per pair:

* **Caption**: lower-cased, the characters ``, . ' ! ? " ( ) * # : ; ~`` removed, ``-`` and ``/`` read
  as spaces, runs of spaces collapsed, at most ``max_words`` (30) words; tokenised to word pieces once,
  when the collator is built.
* **Tokens**: ``[CLS] pieces`` with no trailing [SEP], at most ``max_text_len`` (25) tokens.
* **MLM**: every token but [CLS] (and padding, which is added later) is selected with probability
  0.15 (independent Bernoulli draws); a selected token becomes [MASK] with probability 0.8, else a
  uniformly random vocabulary id with probability 0.5, else stays; selected positions are labelled
  with their original id, all others with -100 (the ignore index of ALBEF's loss). ITC and ITM read
  the unmasked ids; MLM reads the masked ones.
* **Image**: the stored uint8 ``[H, W, 3]`` pixels as float ``[3, H, W]`` in [0, 1], normalised per
  channel with ALBEF's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258,
  0.27577711). A shard set's fixed-size pixels are used as stored; an image-file dataset
  (:class:`fastvl.data.images.ImageCaptionDataset`) decodes each image here and applies ALBEF's
  random resized crop, flip and RandAugment, seeded per (seed, epoch, sample).

Randomness comes from ``numpy.random.default_rng((seed, epoch, index))`` per sample, as in
:class:`fastvl.data.collate.ViLBERTCollator`: a sample's masking depends only on the seed, the epoch
and the sample, never on batching, workers, data-parallel layout or resumption.
"""

from __future__ import annotations

import re

import numpy as np
import torch

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100  # ALBEF's MLM labels: not predicted
_DROPPED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def albef_caption(text: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning (its ``pre_caption``): lower case, punctuation removed, ``-`` / ``/`` as
    spaces, ``<person>`` as ``person``, runs of whitespace as one space, at most ``max_words`` words."""
    text = _DROPPED.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(_SPACES.sub(" ", text).rstrip("\n").strip(" ").split(" ")[:max_words])


def normalise_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` normalised with ALBEF's mean and std."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


class ALBEFCollator:
    """Turns a list of ``(epoch, index)`` sample keys into an ALBEF pretraining batch.

    ``dataset``: a :class:`fastvl.data.format.RegionDataset` with pixels (else :class:`DataError`
    naming its ``index.json``) or a :class:`fastvl.data.images.ImageCaptionDataset`; ``special``: :class:`fastvl.data.tokenizer.SpecialIds`; ``vocab_size``
    for random replacements. Output: ``images`` ``[B, 3, H, W]`` float32; ``input_ids``,
    ``mlm_input_ids``, ``mlm_labels`` ``[B, L]`` int64 (padded with [PAD] / -100); ``attention_mask``
    ``[B, L]`` bool (True = real); ``num_tokens`` (real text tokens) and ``keys``.
    """

    def __init__(self, dataset, special, vocab_size: int, *, seed: int = 0, max_text_len: int = 25,
                 max_words: int = 30, mlm_probability: float = 0.15):
        if max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 ([CLS] and a word piece), got {max_text_len}")
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        dataset.require_pixels("ALBEF")
        self.dataset = dataset
        self.special = special
        self.vocab_size = vocab_size
        self.seed = seed
        self.max_text_len = max_text_len
        self.mlm_probability = mlm_probability
        captions = [albef_caption(text, max_words) for text in dataset.caption_texts()]
        encoded = dataset.tokenizer.encode_batch(captions, add_special_tokens=False)
        self.token_ids = [np.asarray(e.ids[: max_text_len - 1], dtype=np.int64) for e in encoded]

    def sample(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """One pair: ``input_ids`` / ``mlm_input_ids`` / ``mlm_labels`` ``[L]`` and ``pixels`` ``[H, W, 3]``."""
        rng = np.random.default_rng((self.seed, epoch, index))
        s = self.special
        ids = np.concatenate([[s.cls], self.token_ids[index]]).astype(np.int64)
        selected = rng.random(len(ids)) < self.mlm_probability
        selected[0] = False  # [CLS] is never masked
        to_mask = selected & (rng.random(len(ids)) < 0.8)
        to_random = selected & ~to_mask & (rng.random(len(ids)) < 0.5)
        random_ids = rng.integers(self.vocab_size, size=len(ids))
        masked = np.where(to_mask, s.mask, np.where(to_random, random_ids, ids))
        # image-file datasets (fastvl.data.images) decode and augment here, in the DataLoader worker
        pixels = self.dataset.image(epoch, index) if hasattr(self.dataset, "image") else self.dataset[index].pixels
        return {"input_ids": ids, "mlm_input_ids": masked, "mlm_labels": np.where(selected, ids, IGNORE_INDEX),
                "pixels": pixels}

    def __call__(self, keys) -> dict:
        samples = [self.sample(int(epoch), int(index)) for epoch, index in keys]
        lengths = np.array([len(s["input_ids"]) for s in samples])
        length = int(lengths.max())
        batch: dict = {}
        for key, pad in (("input_ids", self.special.pad), ("mlm_input_ids", self.special.pad),
                         ("mlm_labels", IGNORE_INDEX)):
            out = np.full((len(samples), length), pad, dtype=np.int64)
            for row, s in enumerate(samples):
                out[row, : len(s[key])] = s[key]
            batch[key] = torch.from_numpy(out)
        batch["attention_mask"] = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None])
        batch["images"] = normalise_images(np.stack([s["pixels"] for s in samples]))
        batch["num_tokens"] = int(lengths.sum())
        batch["keys"] = [(int(e), int(i)) for e, i in keys]
        return batch
