"""``fastvl data synth``: a small, deterministic region-feature dataset with learnable structure.

Every image holds 10-24 regions, each of one of ``num_classes`` object classes:

* region feature = the class's prototype (a fixed random vector) + Gaussian noise, so the visual
  stream can tell classes apart;
* box = a class-specific centre and size (+ jitter), so a masked region's class is predictable
  from its location alone (region KL has signal even when its feature is zeroed);
* detector distribution = a softmax peaked on the class (about 0.8 of the mass), the KL target;
* caption = a template naming 1-3 classes present in the image with their counts ("two dogs"),
  so masked class and count words are predictable from the image (MLM) and a swapped caption names
  the wrong classes (alignment).

The same seed gives byte-identical shards and vocabulary.
"""

from __future__ import annotations

import os

import numpy as np

from fastvl.data.format import VOCAB_FILE, ImageRecord, write_dataset
from fastvl.data.tokenizer import closed_vocab

CLASS_NAMES = ("dog", "cat", "horse", "bird", "car", "bus", "bicycle", "tree", "house", "person", "boat", "chair",
               "table", "lamp", "cup", "bottle", "clock", "kite", "train", "sheep", "cow", "flower", "bench", "plane")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
TEMPLATES = ("a photo of {0} .", "{0} .", "{0} next to {1} .", "{0} and {1} .", "{0} , {1} and {2} .",
             "{0} near {1} and {2} .")


def _phrase(name: str, count: int) -> str:
    if count == 1:
        return f"a {name}"
    return f"{COUNT_WORDS.get(count, 'many')} {name}s"


def synth_records(num_images: int, *, seed: int = 0, feature_dim: int = 2048, num_classes: int = 24,
                  min_regions: int = 10, max_regions: int = 24, noise: float = 0.5):
    """Yields ``num_images`` :class:`ImageRecord` (deterministic in ``seed``)."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    if not 1 <= min_regions <= max_regions:
        raise ValueError(f"need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}")
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0.0, 1.0, (num_classes, feature_dim)).astype(np.float32)
    centres = rng.uniform(0.2, 0.8, (num_classes, 2))
    sizes = rng.uniform(0.08, 0.4, (num_classes, 2))
    for image in range(num_images):
        n = int(rng.integers(min_regions, max_regions + 1))
        # a few classes per image, repeated, so captions can name counts
        present = rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False)
        classes = rng.choice(present, size=n)
        features = prototypes[classes] + rng.normal(0.0, noise, (n, feature_dim)).astype(np.float32)
        height, width = int(rng.integers(300, 641)), int(rng.integers(300, 641))
        centre = centres[classes] + rng.normal(0.0, 0.03, (n, 2))
        half = sizes[classes] * rng.uniform(0.8, 1.2, (n, 1)) / 2
        x1y1 = np.clip(centre - half, 0.0, 1.0) * [width, height]
        x2y2 = np.clip(centre + half, 0.0, 1.0) * [width, height]
        boxes = np.concatenate([x1y1, x2y2], axis=1).astype(np.float32)
        logits = rng.normal(0.0, 0.5, (n, num_classes))
        logits[np.arange(n), classes] += 5.0
        cls_prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        cls_prob /= cls_prob.sum(axis=1, keepdims=True)
        named, counts = np.unique(classes, return_counts=True)
        order = rng.permutation(len(named))
        phrases = [_phrase(CLASS_NAMES[named[i]], int(counts[i])) for i in order]
        fitting = [t for t in TEMPLATES if t.count("{") == len(phrases)]
        caption = fitting[int(rng.integers(len(fitting)))].format(*phrases)
        yield ImageRecord(image_id=f"synth-{image:06d}", caption=caption, features=features, boxes=boxes,
                          cls_prob=cls_prob.astype(np.float32), image_h=height, image_w=width)


def make_synthetic_dataset(out_dir: str, num_images: int = 2048, *, seed: int = 0, feature_dim: int = 2048,
                           num_classes: int = 24, shard_size: int = 512, min_regions: int = 10,
                           max_regions: int = 24) -> dict:
    """Writes the synthetic set (shards, ``index.json``) and its WordPiece ``vocab.txt`` into ``out_dir``."""
    kwargs = dict(seed=seed, feature_dim=feature_dim, num_classes=num_classes, min_regions=min_regions,
                  max_regions=max_regions)
    index = write_dataset(out_dir, synth_records(num_images, **kwargs), feature_dim=feature_dim,
                          num_classes=num_classes, shard_size=shard_size, source=f"synth(seed={seed})")
    # every template word, class name (singular and plural) and count word, whatever the sample drew
    words = [t.replace("{", " ").replace("}", " ") for t in TEMPLATES]
    words += [f"{name} {name}s" for name in CLASS_NAMES] + list(COUNT_WORDS.values()) + ["many"]
    closed_vocab(words, os.path.join(out_dir, VOCAB_FILE))
    return index
