"""ALBEF's image-file datasets: a JSON list (or JSONL) of ``{"image": path, "caption": text}`` records as
ALBEF's released ``*.json`` pretraining files, images decoded with Pillow when a batch is collated
(so in the DataLoader workers), with ALBEF's pretraining augmentation.

Per sample (ALBEF's ``pretrain_transform``), when ``augment`` is on:

* **RandomResizedCrop** to ``image_res`` (scale 0.2-1.0 of the area, aspect ratio 3/4-4/3, ten tries
  then a centre crop; bicubic), as torchvision's;
* **horizontal flip** with probability 0.5;
* **RandAugment** as ALBEF's ``RandomAugment(2, 7)``: two operations drawn with replacement from
  Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY,
  Rotate, each applied with probability 0.5 at magnitude 7 of 10 (enhance factor 1.36, shear 0.21,
  translation 7 px, rotation 21 degrees; a random sign for the geometric ones; fill grey 128), here
  with Pillow's operations (ALBEF's are OpenCV ports of them: the geometric ones agree, Sharpness
  differs on the 1-pixel border).

Without ``augment`` (evaluation, embedding extraction) the image is resized to ``image_res`` square
(bicubic), as ALBEF's ``test_transform``. Fine-tuning at another resolution (ALBEF: 384 px) is a
different ``image_res`` here plus the model's position grid interpolated
(:func:`fastvl.nn.vision.resize_pos_embed`, done by ``fastvl convert albef --image-res``).

Randomness: ``numpy.random.default_rng((seed, epoch, index, 1))`` per sample, so a sample's crop,
flip and operations depend only on the seed, the epoch and the sample (never on workers, batching or
resumption) and a resumed run sees exactly the images an uninterrupted one would.

Records whose image file is missing are skipped and counted (``skipped["missing_image"]``;
``strict=True`` raises :class:`DataError` naming the file instead), as records with an empty caption
are (``skipped["empty_caption"]``). An image that exists but does not decode raises
:class:`DataError` naming the file when its batch is collated.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from fastvl.data.format import DataError

log = logging.getLogger("fastvl.data")
RAND_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                    "TranslateX", "TranslateY", "Rotate")
_MAGNITUDE, _MAX_MAGNITUDE, _FILL = 7, 10, (128, 128, 128)


def read_annotations(path: str) -> list[dict]:
    """The records of one ALBEF annotation file: a JSON list, or JSON Lines (one object a line)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: neither a JSON list nor JSON Lines of {{image, caption}} ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: must hold a list of {{\"image\": path, \"caption\": text}} objects")
    for number, record in enumerate(records):
        if "image" not in record or "caption" not in record:
            raise DataError(f"{path}: record {number} lacks 'image' or 'caption' (has {sorted(record)})")
    return records


class ImageCaptionDataset:
    """Image-caption pairs from ALBEF-style annotation files, for :class:`fastvl.data.collate_albef.ALBEFCollator`.

    ``files``: one path or several (ALBEF's ``train_file`` list); ``image_root``: joined to relative
    image paths; ``tokenizer``: the WordPiece tokenizer. A record whose caption is a list becomes one
    pair per caption (ALBEF draws one of them per visit). ``image(epoch, index)`` decodes, augments
    and returns uint8 ``[image_res, image_res, 3]``.
    """

    def __init__(self, files: str | Sequence[str], tokenizer, *, image_root: str = "", image_res: int = 256,
                 augment: bool = True, seed: int = 0, strict: bool = False):
        if image_res < 1:
            raise ValueError(f"image_res must be >= 1, got {image_res}")
        self.tokenizer, self.image_res, self.augment, self.seed = tokenizer, image_res, augment, seed
        self.pixel_size = (image_res, image_res)
        self.num_classes = self.feature_dim = 0  # no detector regions: ALBEF reads the pixels
        self.skipped = {"missing_image": 0, "empty_caption": 0}
        self.images: list[str] = []
        self.captions: list[str] = []
        for path in [files] if isinstance(files, str) else list(files):
            for record in read_annotations(path):
                image = os.path.join(image_root, record["image"])
                captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
                if not os.path.isfile(image):
                    if strict:
                        raise DataError(f"{path}: image {image} not found")
                    self.skipped["missing_image"] += len(captions)
                    continue
                for caption in captions:
                    if not str(caption).strip():
                        if strict:
                            raise DataError(f"{path}: an empty caption for {image}")
                        self.skipped["empty_caption"] += 1
                        continue
                    self.images.append(image)
                    self.captions.append(str(caption))
        if not self.images:
            raise DataError(f"{files}: no usable records (skipped: {self.skipped})")
        if sum(self.skipped.values()):
            log.warning("fastvl.data: skipped %d records of %s (%s)", sum(self.skipped.values()), files,
                        ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v))

    def __len__(self) -> int:
        return len(self.images)

    def caption_texts(self) -> list[str]:
        return list(self.captions)

    def require_pixels(self, who: str) -> tuple[int, int]:
        return self.pixel_size

    def image(self, epoch: int, index: int) -> np.ndarray:
        """The sample's image, decoded, cropped / flipped / RandAugmented (or resized), uint8 ``[S, S, 3]``."""
        from PIL import Image, UnidentifiedImageError

        path = self.images[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{path}: cannot decode the image ({error})") from None
        size = (self.image_res, self.image_res)
        if not self.augment:
            return np.asarray(image.resize(size, Image.BICUBIC), dtype=np.uint8)
        rng = np.random.default_rng((self.seed, epoch, index, 1))
        image = image.resize(size, Image.BICUBIC, box=random_resized_crop_box(image.width, image.height, rng))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(rand_augment(image, rng), dtype=np.uint8)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, right, bottom)``: ten tries at a random area
    fraction and log-uniform aspect ratio, else the centre crop with the ratio clamped."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def rand_augment(image, rng: np.random.Generator, ops: Sequence[str] = RAND_AUGMENT_OPS, count: int = 2):
    """ALBEF's ``RandomAugment(count, 7)`` on a PIL image: ``count`` operations drawn with replacement,
    each applied with probability 0.5."""
    from PIL import Image, ImageEnhance, ImageOps

    level = _MAGNITUDE / _MAX_MAGNITUDE
    for name in rng.choice(list(ops), count):
        if rng.random() > 0.5:
            continue
        if name == "AutoContrast":
            image = ImageOps.autocontrast(image)
        elif name == "Equalize":
            image = ImageOps.equalize(image)
        elif name == "Brightness":
            image = ImageEnhance.Brightness(image).enhance(level * 1.8 + 0.1)
        elif name == "Sharpness":
            image = ImageEnhance.Sharpness(image).enhance(level * 1.8 + 0.1)
        elif name in ("ShearX", "ShearY"):
            shear = _sign(rng) * level * 0.3
            matrix = (1, shear, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, shear, 1, 0)
            image = image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL)
        elif name in ("TranslateX", "TranslateY"):
            offset = _sign(rng) * level * 10  # pixels, ALBEF's translate_const
            matrix = (1, 0, offset, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, offset)
            image = image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL)
        elif name == "Rotate":
            image = image.rotate(_sign(rng) * level * 30, Image.BILINEAR, fillcolor=_FILL)
    return image


def _sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.random() > 0.5 else 1.0
