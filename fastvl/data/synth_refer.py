"""Synthetic referring expressions (``fastvl data synth-task --task refcoco`` / ``--task grounding``),
in the REFER layout :mod:`fastvl.data.refer` reads.

Each region of a synthetic image is an object of its class (the argmax of its detector
distribution) with its box: the ground truth (``instances.json``, one annotation per region). Per
image and present class one ref with two sentences naming the class and, when the class has several
instances, which one: the leftmost ("the dog on the left" / "the left dog"), the rightmost or the
largest ("the big dog" / "the largest dog"), picked at random; the referred box is that instance's.

The **detections** are every region's box moved and rescaled (centre shifted by N(0, 0.12) of its
size each way, each side scaled by exp(N(0, 0.2)), clipped to the image), with the region's own
features: a second feature set ``detections/`` (the ``images`` of a refcoco task set; the original
regions are its ``gt_images``) and ``proposals.json`` (ALBEF's ``dets.json`` layout, ``[x, y, w, h]``
per image: the grounding task's candidates, ranked on the pixels of the original set).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from fastvl.data.format import VOCAB_FILE, DataError, ImageRecord, write_dataset
from fastvl.data.synth import CLASS_NAMES

DETECTIONS_DIR = "detections"


def _write(out_dir: str, name: str, data) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(data, f)


def _expressions(name: str, which: str) -> list[str]:
    return {"only": [f"the {name}", f"a {name}"], "left": [f"the {name} on the left", f"the left {name}"],
            "right": [f"the {name} on the right", f"the right {name}"],
            "big": [f"the big {name}", f"the largest {name}"]}[which]


def detections(boxes: np.ndarray, image_h: int, image_w: int, rng: np.random.Generator) -> np.ndarray:
    """Detected ``x1, y1, x2, y2`` boxes: each box moved and rescaled (see the module docstring)."""
    size = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.normal(0.0, 0.12, size.shape) * size
    half = size * np.exp(rng.normal(0.0, 0.2, size.shape)) / 2
    limit = np.array([image_w, image_h], np.float64)
    return np.concatenate([np.clip(centre - half, 0, limit), np.clip(centre + half, 0, limit)], axis=1)


def write_refer(images, task: str) -> dict:
    """refs.json, instances.json, proposals.json and (refcoco) the detections' feature set."""
    dataset, out_dir = images.dataset, images.out_dir
    rng = np.random.default_rng((images.seed, 0x2EF))
    refs, image_rows, annotations, dets, detected = [], [], [], {}, []
    counts = {"train": 0, "val": 0, "test": 0}
    for index in range(len(dataset)):
        example = dataset[index]
        boxes = np.asarray(example.boxes, np.float64)
        classes = np.asarray(example.cls_prob).argmax(axis=1)
        image_rows.append({"id": index, "width": int(example.image_w), "height": int(example.image_h),
                           "file_name": f"{dataset.image_ids[index]}.jpg"})
        for region, (box, c) in enumerate(zip(boxes, classes)):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": index * 1000 + region, "image_id": index, "category_id": int(c) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        found = detections(boxes, example.image_h, example.image_w, rng)
        detected.append(found)
        dets[str(index)] = [[float(a), float(b), float(c - a), float(d - b), 1.0] for a, b, c, d in found]
        split = images.split_of(index)
        for c in sorted(set(classes.tolist())):
            members = np.nonzero(classes == c)[0]
            if len(members) == 1:
                target, which = int(members[0]), "only"
            else:
                which = ("left", "right", "big")[int(rng.integers(3))]
                centre_x = (boxes[members, 0] + boxes[members, 2]) / 2
                area = (boxes[members, 2] - boxes[members, 0]) * (boxes[members, 3] - boxes[members, 1])
                target = int(members[{"left": np.argmin(centre_x), "right": np.argmax(centre_x),
                                      "big": np.argmax(area)}[which]])
            ref_id = len(refs)
            sentences = [{"sent_id": ref_id * 10 + k, "raw": text, "sent": text, "tokens": text.split()}
                         for k, text in enumerate(_expressions(CLASS_NAMES[c], which))]
            refs.append({"ref_id": ref_id, "ann_id": index * 1000 + target, "image_id": index, "split": split,
                         "category_id": int(c) + 1, "file_name": f"{dataset.image_ids[index]}.jpg",
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
            counts[split] += len(sentences)
    categories = [{"id": c + 1, "name": CLASS_NAMES[c]} for c in range(dataset.num_classes)]
    _write(out_dir, "refs.json", refs)
    _write(out_dir, "instances.json", {"images": image_rows, "annotations": annotations, "categories": categories})
    _write(out_dir, "proposals.json", dets)
    files = {"refs": "refs.json", "instances": "instances.json"}
    manifest = {"task": task, "counts": counts}
    if task == "grounding":
        dataset.require_pixels("ALBEF grounding")
        manifest["splits"] = {s: {**files, "proposals": "proposals.json"} for s in counts}
        return manifest

    captions = dataset.caption_texts()

    def records():
        for index in range(len(dataset)):
            e = dataset[index]
            yield ImageRecord(image_id=dataset.image_ids[index], caption=captions[index], features=np.asarray(e.features),
                              boxes=detected[index].astype(np.float32), cls_prob=np.asarray(e.cls_prob),
                              image_h=int(e.image_h), image_w=int(e.image_w))

    target_dir = os.path.join(out_dir, DETECTIONS_DIR)
    write_dataset(target_dir, records(), feature_dim=dataset.feature_dim, num_classes=dataset.num_classes,
                  source=f"synth detections (seed={images.seed})")
    shutil.copyfile(os.path.join(dataset.dir, VOCAB_FILE), os.path.join(target_dir, VOCAB_FILE))
    manifest.update(images=DETECTIONS_DIR,
                    gt_images=os.path.relpath(os.path.abspath(dataset.dir), os.path.abspath(out_dir)),
                    splits={s: dict(files) for s in counts})
    return manifest


def write_refcoco(images) -> dict:
    return write_refer(images, "refcoco")


def write_grounding(images) -> dict:
    if images.dataset.pixel_size is None:
        raise DataError(f"{images.images_dir}: ALBEF grounding ranks boxes on the pixels; synthesise the images "
                        "with `fastvl data synth --image-size N`")
    return write_refer(images, "grounding")
