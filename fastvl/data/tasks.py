"""Downstream task annotations: readers for the original formats and the task directory manifest.

A task directory holds ``task.json``::

    {"task": "vqa" | "retrieval" | "vcr" | "refcoco" | "grounding" | "nlvr2" | "nlvr2_ta" | "snli_ve",
     "images": "PATH",              # a fastvl dataset (region features; pixels for ALBEF), relative to DIR
     "answers": "answers.json",     # VQA only, optional: the answer vocabulary (a JSON list, or an
                                    # {answer: label} dict as trainval_ans2label); default: built from train
     "splits": {"train": {...}, "val": {...}, "test": {...}}}

with per split, for VQA ``{"questions": FILE, "annotations": FILE}`` (the VQA v2 JSON files;
``annotations`` absent for test-dev / test) and for retrieval ``{"karpathy": FILE}`` (the Karpathy-split
``dataset_flickr30k.json`` / ``dataset_coco.json``; the split's images are the entries with that
``split``, ``restval`` counting as train) or ``{"albef": FILE}`` (ALBEF's released
``flickr30k_train.json`` / ``coco_test.json`` ...: ``{image, caption, image_id}`` records, a caption
list per image in val / test); for VCR ``{"jsonl": FILE}`` (``train.jsonl`` ...; :mod:`fastvl.data.vcr`).
Images are matched to the feature set by the file name's stem (``1000092795.jpg`` -> ``1000092795``), then
by the number in it (``COCO_val2014_000000391895.jpg`` -> ``391895``). NLVR2 (``{"nlvr2": FILE}``), SNLI-VE (``{"snli_ve": FILE}``) and ALBEF's text assignment
(``{"albef": FILE}``, its pretraining JSON) are read by :mod:`fastvl.data.pairs` and :func:`read_albef`.
Bad or inconsistent files raise :class:`~fastvl.data.format.DataError` naming the file
and the record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from fastvl.data.format import DataError

TASK_FILE = "task.json"
TASKS = ("vqa", "retrieval", "vcr", "refcoco", "grounding", "nlvr2", "nlvr2_ta", "snli_ve")


def read_json(path: str):
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not readable JSON ({error})") from error


def read_npz(path: str) -> dict:
    """The arrays of an ``.npz`` file, read without unpickling (object arrays are an error)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({error})") from error


def read_json_lines(path: str, what: str = "records") -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file (of ``what``: at least one)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not a JSON object ({error})") from error
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {row!r:.200}")
                rows.append((number, row))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    if not rows:
        raise DataError(f"{path}: no {what}")
    return rows


@dataclasses.dataclass(frozen=True)
class TaskDir:
    root: str
    task: str
    images: str
    splits: dict
    answers: str | None = None

    def split(self, name: str) -> dict:
        if name not in self.splits:
            raise DataError(f"{os.path.join(self.root, TASK_FILE)}: no split {name!r} (has {sorted(self.splits)})")
        return {k: os.path.join(self.root, v) for k, v in self.splits[name].items()}


def read_task_dir(root: str, task: str | None = None) -> TaskDir:
    path = os.path.join(root, TASK_FILE)
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("task") not in TASKS:
        raise DataError(f"{path}: 'task' must be one of {list(TASKS)}, got {manifest.get('task') if isinstance(manifest, dict) else manifest!r}")
    if task is not None and manifest["task"] != task:
        raise DataError(f"{path}: this directory holds a {manifest['task']!r} task, not {task!r}")
    if not isinstance(manifest.get("images"), str) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: needs 'images' (a fastvl dataset path) and 'splits' ({{name: files}})")
    for name, files in manifest["splits"].items():
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise DataError(f"{path}: splits[{name!r}] must map roles to file names, got {files!r}")
    answers = manifest.get("answers")
    return TaskDir(root, manifest["task"], os.path.join(root, manifest["images"]), manifest["splits"],
                   None if answers is None else os.path.join(root, answers))


# VQA v2 ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image_id: str
    question: str
    answers: tuple[str, ...] | None = None  # the human answers (10 in VQA v2); None without annotations
    answer_type: str | None = None


def _records(path: str, data, key: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list (the VQA v2 layout)")
    return data[key]


def read_vqa(questions_file: str, annotations_file: str | None = None) -> list[VQAQuestion]:
    """The questions of a VQA v2 split, with their human answers when ``annotations_file`` is given;
    every question must have exactly one annotation with the same image (and vice versa)."""
    questions = []
    seen: dict[int, int] = {}
    for i, row in enumerate(_records(questions_file, read_json(questions_file), "questions")):
        where = f"{questions_file}: questions[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("question_id"), int) \
                or not isinstance(row.get("question"), str) or "image_id" not in row:
            raise DataError(f"{where}: expected {{question_id: int, image_id, question: str}}, got {row!r:.200}")
        if row["question_id"] in seen:
            raise DataError(f"{where}: question_id {row['question_id']} repeats questions[{seen[row['question_id']]}]")
        seen[row["question_id"]] = i
        questions.append(VQAQuestion(row["question_id"], str(row["image_id"]), row["question"]))
    if annotations_file is None:
        return questions
    annotated: dict[int, VQAQuestion] = {}
    by_id = {q.question_id: q for q in questions}
    for i, row in enumerate(_records(annotations_file, read_json(annotations_file), "annotations")):
        where = f"{annotations_file}: annotations[{i}]"
        qid = row.get("question_id") if isinstance(row, dict) else None
        answers = row.get("answers") if isinstance(row, dict) else None
        if not isinstance(qid, int) or not isinstance(answers, list) or not answers \
                or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise DataError(f"{where}: expected {{question_id: int, image_id, answers: [{{answer: str}}, ...]}}, "
                            f"got {row!r:.200}")
        if qid not in by_id:
            raise DataError(f"{where}: question_id {qid} is not in {questions_file}")
        if qid in annotated:
            raise DataError(f"{where}: question_id {qid} is annotated twice")
        question = by_id[qid]
        if "image_id" in row and str(row["image_id"]) != question.image_id:
            raise DataError(f"{where}: question_id {qid} has image_id {row['image_id']} here but "
                            f"{question.image_id} in {questions_file}")
        annotated[qid] = dataclasses.replace(question, answers=tuple(a["answer"] for a in answers),
                                             answer_type=row.get("answer_type"))
    missing = [q.question_id for q in questions if q.question_id not in annotated]
    if missing:
        raise DataError(f"{annotations_file}: {len(missing)} questions of {questions_file} have no annotation, "
                        f"e.g. question_id {missing[0]}")
    return [annotated[q.question_id] for q in questions]


def read_vqa_split(files: dict) -> list[VQAQuestion]:
    """A split's questions from its manifest entry ``{"questions": ..., "annotations": ...}``."""
    if "questions" not in files:
        raise DataError(f"a VQA split needs a 'questions' file, got {sorted(files)}")
    return read_vqa(files["questions"], files.get("annotations"))


def read_answer_vocabulary(path: str) -> list[str]:
    """A JSON list of answers (label order) or an ``{answer: label}`` dict (``trainval_ans2label.json``)."""
    data = read_json(path)
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return data
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        labels = sorted(data.values())
        if labels != list(range(len(data))):
            raise DataError(f"{path}: labels must be 0 .. {len(data) - 1}, each once")
        return sorted(data, key=data.get)
    raise DataError(f"{path}: expected a JSON list of answers or an {{answer: label}} object")


# retrieval ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
    """A pool: ``images`` (keys into the feature set), ``texts`` and the image of every text."""

    images: tuple[str, ...]
    texts: tuple[str, ...]
    text_image: tuple[int, ...]
    source: str


def _image_key(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read_karpathy(path: str, split: str) -> RetrievalSplit:
    """The Karpathy-split JSON (``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``)."""
    data = read_json(path)
    wanted = {"train", "restval"} if split == "train" else {split}
    images, texts, text_image = [], [], []
    for i, row in enumerate(_records(path, data, "images")):
        where = f"{path}: images[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("filename"), str) or "split" not in row \
                or not isinstance(row.get("sentences"), list):
            raise DataError(f"{where}: expected {{filename: str, split, sentences: [{{raw: str}}, ...]}}, "
                            f"got {row!r:.200}")
        if row["split"] not in wanted:
            continue
        sentences = row["sentences"]
        if not sentences or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise DataError(f"{where} ({row['filename']}): 'sentences' must be a non-empty list of {{raw: str}}")
        for sentence in sentences:
            texts.append(sentence["raw"])
            text_image.append(len(images))
        images.append(_image_key(row["filename"]))
    if not images:
        raise DataError(f"{path}: no image has split {split!r}")
    return RetrievalSplit(tuple(images), tuple(texts), tuple(text_image), path)


def read_albef(path: str) -> RetrievalSplit:
    """ALBEF's retrieval JSON: a list of ``{image, caption, image_id}`` (train: one caption per record)
    or ``{image, caption: [...]}`` (val / test: every caption of the image)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{image, caption}} records (ALBEF's layout)")
    index: dict[str, int] = {}
    texts, text_image = [], []
    for i, row in enumerate(data):
        caption = row.get("caption") if isinstance(row, dict) else None
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(captions, list) \
                or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: record {i}: expected {{image: str, caption: str or [str, ...]}}, "
                            f"got {row!r:.200}")
        key = _image_key(row["image"])
        image = index.setdefault(key, len(index))
        for c in captions:
            texts.append(c)
            text_image.append(image)
    if not index:
        raise DataError(f"{path}: no records")
    return RetrievalSplit(tuple(index), tuple(texts), tuple(text_image), path)


def read_retrieval(files: dict, split: str) -> RetrievalSplit:
    if "karpathy" in files:
        return read_karpathy(files["karpathy"], split)
    if "albef" in files:
        return read_albef(files["albef"])
    raise DataError(f"retrieval split {split!r} needs a 'karpathy' or 'albef' file, got {sorted(files)}")


class ImageLookup:
    """Image key -> index of its (first) record in a fastvl dataset, by id, then by the number in it."""

    def __init__(self, image_ids: Sequence[str], source: str):
        self.source = source
        self.by_id: dict[str, int] = {}
        self.by_number: dict[int, int] = {}
        for index, image_id in enumerate(image_ids):
            self.by_id.setdefault(image_id, index)
            number = _number(image_id)
            if number is not None:
                self.by_number.setdefault(number, index)

    def __call__(self, key: str, where: str) -> int:
        if key in self.by_id:
            return self.by_id[key]
        number = _number(key)
        if number is not None and number in self.by_number:
            return self.by_number[number]
        raise DataError(f"{where}: image {key!r} is not in the feature set {self.source}")


def _number(text: str) -> int | None:
    digits = re.findall(r"\d+", text)
    return int(digits[-1]) if digits else None
