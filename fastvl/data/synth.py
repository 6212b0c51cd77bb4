"""``fastvl data synth``: a small, deterministic region-feature dataset with learnable structure.

Every image holds 10-24 regions, each of one of ``num_classes`` object classes:

* region feature = the class's prototype (a fixed random vector) + Gaussian noise, so the visual
  stream can tell classes apart;
* box = a class-specific centre and size (+ jitter), so a masked region's class is predictable
  from its location alone (region KL has signal even when its feature is zeroed);
* detector distribution = a softmax peaked on the class (about 0.8 of the mass), the KL target;
* caption = a template naming 1-3 classes present in the image with their counts ("two dogs"),
  so masked class and count words are predictable from the image (MLM) and a swapped caption names
  the wrong classes (alignment);
* with ``image_size`` N, the image itself as uint8 ``[N, N, 3]`` pixels (for ALBEF, which reads
  pixels, not region features): a noisy grey background with every region painted over it as a filled
  box at its (rescaled) location, in its class's colour and texture (solid, horizontal or vertical
  stripes, checks), so the classes a caption names are visible in the pixels.

The same seed gives byte-identical shards and vocabulary (with or without pixels: drawing them uses
its own random stream, so the features, boxes and captions do not change).
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


def class_textures(num_classes: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[C, size, size, 3]``: each class's colour and texture over a whole image (a region of
    that class shows the part under its box). Colours are drawn per seed; the texture is class % 4:
    solid, horizontal stripes, vertical stripes, checks (2-pixel period, the colour and its half)."""
    colours = np.random.default_rng((seed, 0xC01)).uniform(40, 255, (num_classes, 3))
    y, x = np.mgrid[:size, :size]
    patterns = np.stack([np.ones_like(y, dtype=bool), (y // 2) % 2 == 0, (x // 2) % 2 == 0,
                         ((y // 2) + (x // 2)) % 2 == 0])  # [4, size, size]: True = full colour
    shade = np.where(patterns[np.arange(num_classes) % 4], 1.0, 0.5)  # [C, size, size]
    return (shade[..., None] * colours[:, None, None, :]).round().astype(np.uint8)


def render_image(classes: np.ndarray, boxes: np.ndarray, image_h: int, image_w: int, textures: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, N, 3]`` (N = ``textures.shape[1]``): a noisy grey background, then each region as a
    filled box (its pixel box rescaled to N x N, at least one pixel) in its class's texture, largest
    first, so a smaller box is never hidden under a larger one."""
    size = textures.shape[1]
    image = np.clip(rng.normal(110.0, 12.0, (size, size, 3)), 0, 255).astype(np.uint8)
    scale = np.array([size / image_w, size / image_h, size / image_w, size / image_h])
    corners = np.floor(np.asarray(boxes, np.float64) * scale).astype(np.int64)
    corners[:, :2] = corners[:, :2].clip(0, size - 1)  # first pixel
    corners[:, 2:] = np.maximum(corners[:, 2:].clip(0, size), corners[:, :2] + 1)  # one past the last
    areas = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    for region in np.argsort(-areas, kind="stable"):
        x1, y1, x2, y2 = corners[region]
        image[y1:y2, x1:x2] = textures[classes[region], y1:y2, x1:x2]
    return image


def synth_records(num_images: int, *, seed: int = 0, feature_dim: int = 2048, num_classes: int = 24,
                  min_regions: int = 10, max_regions: int = 24, noise: float = 0.5, image_size: int | None = None):
    """Yields ``num_images`` :class:`ImageRecord` (deterministic in ``seed``); with ``image_size`` each
    carries its rendered ``[image_size, image_size, 3]`` pixels (:func:`render_image`)."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    if not 1 <= min_regions <= max_regions:
        raise ValueError(f"need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    textures = None if image_size is None else class_textures(num_classes, image_size, seed)
    pixel_rng = np.random.default_rng((seed, 0x1AA6E))  # its own stream: the rest is the same with or without
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
        pixels = None if textures is None else render_image(classes, boxes, height, width, textures, pixel_rng)
        yield ImageRecord(image_id=f"synth-{image:06d}", caption=caption, features=features, boxes=boxes,
                          cls_prob=cls_prob.astype(np.float32), image_h=height, image_w=width, pixels=pixels)


def make_synthetic_dataset(out_dir: str, num_images: int = 2048, *, seed: int = 0, feature_dim: int = 2048,
                           num_classes: int = 24, shard_size: int = 512, min_regions: int = 10,
                           max_regions: int = 24, image_size: int | None = None) -> dict:
    """Writes the synthetic set (shards, ``index.json``) and its WordPiece ``vocab.txt`` into ``out_dir``;
    with ``image_size`` N also every image's pixels (uint8 ``[N, N, 3]``)."""
    kwargs = dict(seed=seed, feature_dim=feature_dim, num_classes=num_classes, min_regions=min_regions,
                  max_regions=max_regions, image_size=image_size)
    index = write_dataset(out_dir, synth_records(num_images, **kwargs), feature_dim=feature_dim,
                          num_classes=num_classes, shard_size=shard_size, source=f"synth(seed={seed})",
                          pixels=None if image_size is None else (image_size, image_size))
    # every template word, class name (singular and plural) and count word, whatever the sample drew
    words = [t.replace("{", " ").replace("}", " ") for t in TEMPLATES]
    words += [f"{name} {name}s" for name in CLASS_NAMES] + list(COUNT_WORDS.values()) + ["many"]
    closed_vocab(words, os.path.join(out_dir, VOCAB_FILE))
    return index
