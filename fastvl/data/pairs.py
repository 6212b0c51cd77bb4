"""NLVR2 and SNLI-VE annotations: readers for their released layouts.

* **NLVR2** (``train.json`` / ``dev.json`` / ``test1.json`` of the NLVR2 release: JSON lines): one
  statement per line, ``{"identifier": "dev-850-0-0", "sentence": "...", "label": "True" | "False",
  ...}``; the two images are named after the identifier without its last part, ``dev-850-0-img0`` and
  ``dev-850-0-img1`` (vilbert-multi-task's rule). Also ALBEF's ``nlvr_{train,dev,test}.json`` (one JSON
  list of ``{"images": [left, right], "sentence", "label"}``), the file names' stems being the keys.
  ``label``: ``"True"`` / ``"False"`` (or a JSON bool); absent on an unlabelled test split.
* **SNLI-VE** (``snli_ve_{train,dev,test}.jsonl``: JSON lines): ``{"Flikr30kID": "2248275918.jpg",
  "sentence2": hypothesis, "gold_label": "entailment" | "neutral" | "contradiction" | "-", "pairID":
  ...}`` (the premise image's key is the file name's stem). ``"-"`` (no annotator majority) or an
  absent label reads as unlabelled. Labels are numbered as both originals do: contradiction 0,
  neutral 1, entailment 2.

Bad files raise :class:`~fastvl.data.format.DataError` naming the file and the line (or record).
"""

from __future__ import annotations

import dataclasses
import os

from fastvl.data.format import DataError
from fastvl.data.tasks import read_json, read_json_lines

VE_LABELS = ("contradiction", "neutral", "entailment")  # label index = position (ViLBERT's and ALBEF's order)


@dataclasses.dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    sentence: str
    images: tuple[str, str]  # the left and right image keys
    label: int | None  # 1 = the statement is true of the pair, 0 = false; None = unlabelled


@dataclasses.dataclass(frozen=True)
class VEExample:
    pair_id: str
    image: str  # the premise image's key
    hypothesis: str
    label: int | None  # index into VE_LABELS; None = unlabelled ("-")


def _key(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _bool_label(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if value in ("True", "False"):
        return int(value == "True")
    raise DataError(f"{where}: label must be \"True\" or \"False\", got {value!r}")


def nlvr2_image_keys(identifier: str, where: str) -> tuple[str, str]:
    """``("{split}-{set}-{pair}-img0", "...-img1")`` of an NLVR2 identifier ``{split}-{set}-{pair}-{n}``."""
    parts = identifier.split("-")
    if len(parts) < 2 or not all(parts):
        raise DataError(f"{where}: identifier {identifier!r} is not of the form SPLIT-SET-PAIR-N")
    stem = "-".join(parts[:-1])
    return f"{stem}-img0", f"{stem}-img1"


def read_nlvr2(path: str) -> list[NLVR2Example]:
    """An NLVR2 split: the release's JSON lines or ALBEF's JSON list (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return _read_albef_nlvr(path)
    out, seen = [], {}
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        identifier, sentence = row.get("identifier"), row.get("sentence")
        if not isinstance(identifier, str) or not isinstance(sentence, str):
            raise DataError(f"{where}: expected {{identifier: str, sentence: str, label: \"True\"/\"False\"}}, "
                            f"got {row!r:.200}")
        if identifier in seen:
            raise DataError(f"{where}: identifier {identifier!r} repeats line {seen[identifier]}")
        seen[identifier] = number
        out.append(NLVR2Example(identifier, sentence, nlvr2_image_keys(identifier, where),
                                _bool_label(row.get("label"), where)))
    return out


def _read_albef_nlvr(path: str) -> list[NLVR2Example]:
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of {{images: [left, right], sentence, label}}")
    out = []
    for i, row in enumerate(data):
        where = f"{path}: record {i}"
        images = row.get("images") if isinstance(row, dict) else None
        if not isinstance(images, list) or len(images) != 2 or not all(isinstance(x, str) for x in images) \
                or not isinstance(row.get("sentence"), str):
            raise DataError(f"{where}: expected {{images: [left, right], sentence: str, label}}, got {row!r:.200}")
        out.append(NLVR2Example(str(row.get("identifier", i)), row["sentence"], (_key(images[0]), _key(images[1])),
                                _bool_label(row.get("label"), where)))
    return out


def read_snli_ve(path: str) -> list[VEExample]:
    """An SNLI-VE split (JSON lines, see the module docstring)."""
    out = []
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        image, hypothesis, gold = row.get("Flikr30kID"), row.get("sentence2"), row.get("gold_label")
        if not isinstance(image, str) or not image or not isinstance(hypothesis, str):
            raise DataError(f"{where}: expected {{Flikr30kID: str, sentence2: str, gold_label}}, got {row!r:.200}")
        if gold is not None and gold != "-" and gold not in VE_LABELS:
            raise DataError(f"{where}: gold_label must be one of {list(VE_LABELS)} or '-', got {gold!r}")
        label = None if gold in (None, "-") else VE_LABELS.index(gold)
        out.append(VEExample(str(row.get("pairID", number)), _key(image), hypothesis, label))
    return out


class ExactImageLookup:
    """Image key -> index of its (first) record in a fastvl dataset, by exact id only (NLVR2's keys
    differ in their last characters: ``-img0`` / ``-img1``, so no number fallback)."""

    def __init__(self, image_ids, source: str):
        self.source = source
        self.by_id: dict[str, int] = {}
        for index, image_id in enumerate(image_ids):
            self.by_id.setdefault(image_id, index)

    def __call__(self, key: str, where: str) -> int:
        if key not in self.by_id:
            raise DataError(f"{where}: image {key!r} is not in the feature set {self.source}")
        return self.by_id[key]
