"""Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg in the REFER toolkit's layout) and detection
proposals, for ``fastvl finetune --task refcoco`` and ``--task grounding``.

* **refs**: ``refs(unc).p``, a Python pickle of a list of refs ``{ref_id, ann_id, image_id, split,
  category_id, sentences: [{sent_id, raw, sent, tokens}], sent_ids, file_name}``. A pickle can run
  code when loaded, so fastvl reads it only with ``trust_pickle`` (``--trust-pickle``: for a file
  you trust), and then with an unpickler that builds plain containers only (no class is looked up).
  Or the same list as JSON (``refs.json``), which needs no flag; convert once with
  ``python -m fastvl.data.refer --trust-pickle 'refs(unc).p' refs.json``.
* **instances**: the COCO ``instances.json`` next to it: ``images`` ``[{id, width, height}]`` and
  ``annotations`` ``[{id, image_id, bbox: [x, y, w, h], category_id}]``; a ref's box is its
  annotation's (REFER's ``getRefBox``).
* **proposals** (detected boxes per image, ``[x, y, w, h]`` pixels): ALBEF's ``dets.json``
  ``{image_id: [[x, y, w, h, ...], ...]}``, MAttNet's / VL-BERT's list ``[{image_id, box: [x, y, w, h]}]``,
  or an ``.npz`` of one ``[N, >= 4]`` array per image id (loaded without pickle).

One example per sentence (as the originals train and score). A split is the refs whose ``split``
field equals the name (``train``, ``val``, ``testA``, ``testB``, RefCOCOg's ``test``). Bad files raise
:class:`~fastvl.data.format.DataError` naming the file and the record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys

import numpy as np

from fastvl.data.format import DataError
from fastvl.data.tasks import read_json, read_npz


@dataclasses.dataclass(frozen=True)
class RefExpression:
    """One sentence of a ref: ``box`` is the referred object's ``[x, y, w, h]`` (pixels)."""

    sent_id: int
    ref_id: int
    ann_id: int
    image_id: str
    text: str
    box: tuple[float, float, float, float]
    image_h: int
    image_w: int
    category_id: int | None = None


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings and numbers only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise DataError(f"the pickle references {module}.{name}; a refs file holds plain lists and dicts only, "
                        "so it was not loaded")


def read_refs(path: str, trust_pickle: bool = False) -> list[dict]:
    """The refs list of ``path``: JSON, or (only with ``trust_pickle``) the REFER pickle."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80" or path.endswith((".p", ".pkl", ".pickle")):
        if not trust_pickle:
            raise DataError(f"{path}: a Python pickle (REFER's refs(unc).p), which can execute code when loaded; "
                            "nothing was unpickled. If you trust the file, pass --trust-pickle, or convert it once "
                            "to JSON with `python -m fastvl.data.refer --trust-pickle REFS.p refs.json`")
        try:
            with open(path, "rb") as f:
                refs = _PlainUnpickler(f, encoding="utf-8").load()
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
        except Exception as error:  # any failure of a corrupt pickle
            raise DataError(f"{path}: corrupt or truncated pickle ({type(error).__name__}: {error})") from error
    else:
        refs = read_json(path)
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs (REFER's layout), got {type(refs).__name__}")
    return refs


def read_instances(path: str) -> tuple[dict[int, dict], dict[int, tuple[int, int]]]:
    """``({ann_id: annotation}, {image_id: (height, width)})`` of a COCO ``instances.json``."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected COCO instances {{images: [...], annotations: [...]}}")
    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not all(isinstance(image.get(k), int) for k in ("id", "width", "height")):
            raise DataError(f"{path}: images[{i}]: expected {{id: int, width: int, height: int}}, got {image!r:.200}")
        sizes[image["id"]] = (image["height"], image["width"])
    annotations: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int) or not isinstance(ann.get("image_id"), int) \
                or not _is_box(bbox):
            raise DataError(f"{path}: annotations[{i}]: expected {{id: int, image_id: int, bbox: [x, y, w, h]}}, "
                            f"got {ann!r:.200}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{path}: annotations[{i}] (id {ann['id']}): bbox {bbox} has a negative width or height")
        if ann["id"] in annotations:
            raise DataError(f"{path}: annotations[{i}]: id {ann['id']} repeats")
        if ann["image_id"] not in sizes:
            raise DataError(f"{path}: annotations[{i}] (id {ann['id']}): image_id {ann['image_id']} is not in 'images'")
        annotations[ann["id"]] = ann
    return annotations, sizes


def _is_box(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) >= 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value[:4])


def read_refcoco(refs_file: str, instances_file: str, split: str, trust_pickle: bool = False) -> list[RefExpression]:
    """Every sentence of the refs of ``split``, with its ref's box and image size."""
    refs = read_refs(refs_file, trust_pickle)
    annotations, sizes = read_instances(instances_file)
    out: list[RefExpression] = []
    splits = set()
    for i, ref in enumerate(refs):
        where = f"{refs_file}: refs[{i}]"
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), int) for k in ("ref_id", "ann_id", "image_id")) \
                or not isinstance(ref.get("split"), str) or not isinstance(ref.get("sentences"), list):
            raise DataError(f"{where}: expected {{ref_id: int, ann_id: int, image_id: int, split: str, "
                            f"sentences: [...]}}, got {ref!r:.200}")
        splits.add(ref["split"])
        if ref["split"] != split:
            continue
        ann = annotations.get(ref["ann_id"])
        if ann is None:
            raise DataError(f"{where} (ref_id {ref['ref_id']}): ann_id {ref['ann_id']} is not in {instances_file}")
        if ann["image_id"] != ref["image_id"]:
            raise DataError(f"{where} (ref_id {ref['ref_id']}): image_id {ref['image_id']} but its annotation "
                            f"{ref['ann_id']} is on image {ann['image_id']} in {instances_file}")
        if not ref["sentences"]:
            raise DataError(f"{where} (ref_id {ref['ref_id']}): no sentences")
        height, width = sizes[ref["image_id"]]
        for j, sent in enumerate(ref["sentences"]):
            text = sent.get("raw", sent.get("sent")) if isinstance(sent, dict) else None
            if not isinstance(text, str) or not isinstance(sent.get("sent_id"), int):
                raise DataError(f"{where}.sentences[{j}]: expected {{sent_id: int, raw: str}}, got {sent!r:.200}")
            out.append(RefExpression(sent["sent_id"], ref["ref_id"], ref["ann_id"], str(ref["image_id"]), text,
                                     tuple(float(v) for v in ann["bbox"][:4]), height, width, ref.get("category_id")))
    if not out:
        raise DataError(f"{refs_file}: no ref has split {split!r} (splits there: {sorted(splits)})")
    return out


def read_proposals(path: str) -> dict[str, np.ndarray]:
    """``{image_id: boxes [N, 4] float64 (x, y, w, h)}`` of a proposals file (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    if path.endswith(".npz"):
        data = read_npz(path)
        rows = {key: (f"{path}: {key!r}", value) for key, value in data.items()}
    else:
        data = read_json(path)
        rows = {}
        if isinstance(data, dict):
            rows = {str(key): (f"{path}: {key!r}", value) for key, value in data.items()}
        elif isinstance(data, list):
            grouped: dict[str, list] = {}
            for i, row in enumerate(data):
                if not isinstance(row, dict) or "image_id" not in row or not _is_box(row.get("box")):
                    raise DataError(f"{path}: [{i}]: expected {{image_id, box: [x, y, w, h]}}, got {row!r:.200}")
                grouped.setdefault(str(row["image_id"]), []).append(row["box"][:4])
            rows = {key: (f"{path}: image {key}", value) for key, value in grouped.items()}
        else:
            raise DataError(f"{path}: expected {{image_id: [[x, y, w, h], ...]}} or [{{image_id, box}}, ...]")
    out = {}
    for key, (where, value) in rows.items():
        try:
            boxes = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: boxes must be numbers [[x, y, w, h, ...], ...]") from None
        if boxes.ndim != 2 or boxes.shape[0] == 0 or boxes.shape[1] < 4 or not np.isfinite(boxes[:, :4]).all():
            raise DataError(f"{where}: expected a non-empty [N, >= 4] list of finite [x, y, w, h] boxes, "
                            f"got shape {list(boxes.shape)}")
        if (boxes[:, 2:4] < 0).any():
            raise DataError(f"{where}: box {int(np.nonzero((boxes[:, 2:4] < 0).any(1))[0][0])} has a negative "
                            "width or height")
        out[key] = boxes[:, :4]
    return out


def read_refcoco_split(files: dict, split: str, trust_pickle: bool = False) -> list[RefExpression]:
    """A split from its ``task.json`` entry ``{"refs": ..., "instances": ..., ["proposals": ...]}``."""
    missing = [k for k in ("refs", "instances") if k not in files]
    if missing:
        raise DataError(f"a referring-expression split needs {missing} files, got {sorted(files)}")
    return read_refcoco(files["refs"], files["instances"], split, trust_pickle)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastvl.data.refer",
                                     description="convert REFER's refs(unc).p to JSON (read by fastvl without a flag)")
    parser.add_argument("refs", help="refs(unc).p")
    parser.add_argument("out", help="refs.json to write")
    parser.add_argument("--trust-pickle", action="store_true", help="unpickle REFS (only for a file you trust)")
    args = parser.parse_args(argv)
    try:
        refs = read_refs(args.refs, args.trust_pickle)
    except DataError as error:
        print(f"fastvl.data.refer: error: {error}", file=sys.stderr)
        return 2
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(refs, f)
    print(f"wrote {len(refs)} refs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
