"""``fastvl data convert``: bottom-up-attention TSV files and original ViLBERT LMDB files -> fastvl shards.

**TSV** (the bottom-up-attention ``generate_tsv.py`` layout): one image per line, tab-separated
fields ``image_id, image_w, image_h, num_boxes, boxes, features`` and optionally ``cls_prob``, or
``objects_id, objects_conf`` (LXMERT's variant). ``boxes`` / ``features`` / ``cls_prob`` are base64 of
little-endian float32 arrays ``[num_boxes, 4]`` (pixels x1 y1 x2 y2) / ``[num_boxes, D]`` /
``[num_boxes, C]``; ``objects_id`` int64, ``objects_conf`` float32 ``[num_boxes]``. Name the columns
with ``--fields`` when a file has no header row (default: the six above, plus ``cls_prob`` when a line
has seven fields). Without ``cls_prob``, the class distribution is rebuilt from the top class and its
confidence (``conf`` on the class, the rest spread evenly), which needs ``--num-classes``.

**LMDB** (ViLBERT's ``ImageFeaturesH5Reader`` files): key ``b"keys"`` holds the list of image ids and
each image id holds a dict with ``image_id, image_h, image_w, num_boxes, boxes, features`` (base64 float32)
and ``cls_prob``. Both are Python pickles, which can run arbitrary code when loaded: conversion refuses
unless ``--trust-pickle`` is given. Needs the optional ``lmdb`` package.

Captions come from ``--captions``: JSON lines ``{"image_id": ..., "caption": ...}`` or ``image_id<TAB>caption``
lines. An image with several captions becomes one record per caption (features repeated); images
without a caption, captions without an image and images with 0 regions are counted and left out.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from fastvl.data.format import DataError, ImageRecord, ShardWriter

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
log = logging.getLogger("fastvl.data")


def read_captions(path: str) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("{"):
                    row = json.loads(line)
                    image_id, caption = str(row["image_id"]), str(row["caption"])
                else:
                    image_id, caption = line.split("\t", 1)
            except (ValueError, KeyError) as error:
                raise DataError(f"{path}:{line_number}: expected a JSON object with image_id and caption or "
                                f"'image_id<TAB>caption' ({error})") from error
            captions.setdefault(image_id.strip(), []).append(caption.strip())
    return captions


def _decode(field: str, value: str, dtype, columns: int | None, rows: int, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise DataError(f"{where}: field {field!r} is not valid base64 ({error})") from error
    itemsize = np.dtype(dtype).itemsize
    if rows == 0 or len(raw) % (itemsize * rows):
        raise DataError(f"{where}: field {field!r} has {len(raw)} bytes, not a whole number of {rows} rows of "
                        f"{np.dtype(dtype).name} (truncated?)")
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    width = array.size // rows
    if columns is not None and width != columns:
        raise DataError(f"{where}: field {field!r} has {width} values per box, expected {columns}")
    return array.reshape(rows, width)


def _distribution(objects_id: np.ndarray, objects_conf: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    if num_classes is None:
        raise DataError(f"{where}: no cls_prob field; rebuilding it from objects_id/objects_conf needs --num-classes")
    if (objects_id < 0).any() or (objects_id >= num_classes).any():
        raise DataError(f"{where}: objects_id outside [0, {num_classes})")
    conf = np.clip(objects_conf.astype(np.float32), 0.0, 1.0)
    dist = np.repeat(((1.0 - conf) / max(num_classes - 1, 1))[:, None], num_classes, axis=1)
    dist[np.arange(len(conf)), objects_id] = conf
    return dist


def read_butd_tsv(path: str, fields: tuple[str, ...] | None = None,
                  num_classes: int | None = None) -> Iterator[dict]:
    """Yields ``{image_id, image_h, image_w, boxes, features, cls_prob}`` per line of a BUTD TSV file."""
    with open(path, encoding="ascii", errors="strict") as f:
        for line_number, line in enumerate(f, 1):
            values = line.rstrip("\r\n").split("\t")
            if line_number == 1 and values[0] == "image_id":  # header row
                fields = tuple(values)
                continue
            names = fields or (BUTD_FIELDS + ("cls_prob",) if len(values) == 7 else BUTD_FIELDS)
            where = f"{path}:{line_number}"
            if len(values) != len(names):
                raise DataError(f"{where}: {len(values)} tab-separated fields, expected {len(names)} "
                                f"({', '.join(names)}); truncated line?")
            row = dict(zip(names, values))
            try:
                image_id = row["image_id"]
                image_w, image_h, num_boxes = int(row["image_w"]), int(row["image_h"]), int(row["num_boxes"])
            except (KeyError, ValueError) as error:
                raise DataError(f"{where}: bad image_id/image_w/image_h/num_boxes ({error})") from error
            where = f"{where} (image_id {image_id!r})"
            if num_boxes == 0:
                yield {"image_id": image_id, "num_boxes": 0, "where": where}
                continue
            boxes = _decode("boxes", row["boxes"], np.float32, 4, num_boxes, where)
            features = _decode("features", row["features"], np.float32, None, num_boxes, where)
            if "cls_prob" in row:
                cls_prob = _decode("cls_prob", row["cls_prob"], np.float32, num_classes, num_boxes, where)
            elif "objects_id" in row and "objects_conf" in row:
                ids = _decode("objects_id", row["objects_id"], np.int64, 1, num_boxes, where)[:, 0]
                conf = _decode("objects_conf", row["objects_conf"], np.float32, 1, num_boxes, where)[:, 0]
                cls_prob = _distribution(ids, conf, num_classes, where)
            else:
                raise DataError(f"{where}: no cls_prob (or objects_id/objects_conf) field: the region KL objective "
                                "needs the detector's class distribution")
            yield {"image_id": image_id, "image_h": image_h, "image_w": image_w, "num_boxes": num_boxes,
                   "boxes": boxes, "features": features, "cls_prob": cls_prob, "where": where}


def read_vilbert_lmdb(path: str, trust_pickle: bool = False) -> Iterator[dict]:
    """Yields images from a ViLBERT feature LMDB (pickled rows; ``trust_pickle`` must be True)."""
    if not trust_pickle:
        raise DataError(f"{path}: ViLBERT LMDB files store Python pickles, which can execute code when loaded; "
                        "convert them only if you trust their origin, with --trust-pickle")
    try:
        import lmdb  # noqa: PLC0415 - optional dependency
    except ImportError as error:
        raise DataError("converting LMDB files needs the 'lmdb' package (pip install lmdb); it is optional "
                        "and not installed") from error
    import pickle  # noqa: PLC0415, S403 - only behind --trust-pickle

    env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(path))
    with env.begin(write=False) as txn:
        raw_keys = txn.get(b"keys")
        if raw_keys is None:
            raise DataError(f"{path}: no 'keys' entry; not a ViLBERT ImageFeaturesH5Reader LMDB")
        for key in pickle.loads(raw_keys):  # noqa: S301
            raw = txn.get(key if isinstance(key, bytes) else str(key).encode())
            where = f"{path} (image_id {key!r})"
            if raw is None:
                raise DataError(f"{where}: listed in 'keys' but missing")
            item = pickle.loads(raw)  # noqa: S301
            num_boxes = int(item["num_boxes"])
            image_id = item.get("image_id", key)
            image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
            if num_boxes == 0:
                yield {"image_id": image_id, "num_boxes": 0, "where": where}
                continue

            def array(name, columns, item=item, where=where, num_boxes=num_boxes):
                value = item[name]
                if isinstance(value, (bytes, str)):
                    return _decode(name, value, np.float32, columns, num_boxes, where)
                return np.asarray(value, dtype=np.float32).reshape(num_boxes, -1)

            if "cls_prob" not in item:
                raise DataError(f"{where}: no cls_prob: the region KL objective needs the detector distribution")
            yield {"image_id": image_id, "image_h": int(item["image_h"]), "image_w": int(item["image_w"]),
                   "num_boxes": num_boxes, "boxes": array("boxes", 4), "features": array("features", None),
                   "cls_prob": array("cls_prob", None), "where": where}


def convert(images: Iterator[dict], captions: dict[str, list[str]], out_dir: str, *, shard_size: int = 1024,
            source: str = "") -> dict:
    """Writes images x captions as a fastvl dataset; returns the index plus conversion counts."""
    writer = None
    seen: set[str] = set()
    counts = {"images": 0, "records": 0, "no_caption": 0, "zero_regions": 0}
    for image in images:
        counts["images"] += 1
        image_id = image["image_id"]
        seen.add(image_id)
        if image["num_boxes"] == 0:  # kept out; the dataset would skip it anyway
            counts["zero_regions"] += 1
            log.warning("%s: 0 regions, left out", image["where"])
            continue
        if image_id not in captions:
            counts["no_caption"] += 1
            continue
        if writer is None:
            writer = ShardWriter(out_dir, feature_dim=image["features"].shape[1],
                                 num_classes=image["cls_prob"].shape[1], shard_size=shard_size, source=source)
        for caption in captions[image_id]:
            try:
                writer.add(ImageRecord(image_id, caption, image["features"], image["boxes"], image["cls_prob"],
                                       image["image_h"], image["image_w"]))
            except DataError as error:
                raise DataError(f"{image['where']}: {error}") from error
            counts["records"] += 1
    missing = sorted(set(captions) - seen)
    counts["caption_without_image"] = len(missing)
    if missing:
        log.warning("%d captioned images are not in the feature files (left out), e.g. %s", len(missing), missing[:3])
    if writer is None:
        raise DataError("no image had both regions and a caption; nothing written")
    index = writer.close()
    return {**index, "conversion": counts}
