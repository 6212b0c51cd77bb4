"""VCR (Zellers et al., 2019) annotations: the released ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``.

One JSON object per line with ``annot_id``, ``img_fn`` (``lsmdc_.../...@0.jpg``), ``objects`` (the
image's ground-truth object names, e.g. ``["person", "person", "chair"]``), ``question``, four
``answer_choices`` and four ``rationale_choices`` (each a list of tokens), ``answer_label`` and
``rationale_label`` (0-3; absent in ``test.jsonl``). A token is a word (``"is"``) or an object reference:
a list of 0-based indices into ``objects`` (``[1]``, ``[0, 2]``); the annotation tool's
``[1, 'person']`` form (an index with its name) is read too, and the name must agree with ``objects``.

References become words as the originals resolve them: a ``person`` becomes a gender-neutral first
name (the k-th person of the image's object list gets :data:`PERSON_NAMES` ``[k]``, so every person
of a question keeps one name in the question and all its options; ViLBERT draws the names at random,
VL-BERT cycles through its list over the data set), other objects their class name; several objects
in one reference are joined by "and" (VL-BERT's form). Every word carries the object it refers to
(-1 for plain words and the "and"): VL-BERT links those words to the object's region (its text tags),
ViLBERT reads the names only.

Images are matched to the feature set by the stem of ``img_fn``; the image's first ``len(objects)``
regions must be its objects in order (features pooled on the ground-truth boxes, as VL-BERT feeds
them; ViLBERT's released features append the detected boxes after them). Bad lines raise
:class:`~fastvl.data.format.DataError` naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import os

from fastvl.data.format import DataError
from fastvl.data.tasks import read_json_lines

NUM_OPTIONS = 4
# gender-neutral first names for the people of an image (in order of the image's object list)
PERSON_NAMES = ("Riley", "Casey", "Avery", "Quinn", "Jordan", "Morgan", "Jessie", "Peyton", "Skyler", "Parker",
                "Jackie", "Kendall", "Rowan", "Sawyer", "Emerson", "Finley", "Hayden", "Reese", "Dakota", "Logan")

Token = str | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VCRQuestion:
    annot_id: str
    image: str  # key into the feature set (the stem of img_fn)
    objects: tuple[str, ...]
    question: tuple[Token, ...]
    answer_choices: tuple[tuple[Token, ...], ...]
    rationale_choices: tuple[tuple[Token, ...], ...]
    answer_label: int | None
    rationale_label: int | None
    where: str  # "FILE:LINE", for errors about this question


def _tokens(value, objects: list[str], where: str, what: str) -> tuple[Token, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {what} must be a non-empty list of tokens, got {value!r:.120}")
    out: list[Token] = []
    for position, token in enumerate(value):
        if isinstance(token, str):
            out.append(token)
            continue
        if not isinstance(token, list) or not token:
            raise DataError(f"{where}: {what}[{position}] must be a word or a list of object indices, got {token!r}")
        if len(token) == 2 and isinstance(token[0], int) and isinstance(token[1], str):  # [1, 'person']
            index, name = token
            if 0 <= index < len(objects) and objects[index] != name:
                raise DataError(f"{where}: {what}[{position}] {token!r} names {name!r} but objects[{index}] is "
                                f"{objects[index]!r}")
            token = [index]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in token):
            raise DataError(f"{where}: {what}[{position}] must list object indices (ints), got {token!r}")
        bad = [i for i in token if not 0 <= i < len(objects)]
        if bad:
            raise DataError(f"{where}: {what}[{position}] refers to object {bad[0]}, but the image has "
                            f"{len(objects)} objects")
        out.append(tuple(token))
    return tuple(out)


def _label(row: dict, key: str, where: str) -> int | None:
    if key not in row:
        return None
    label = row[key]
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_OPTIONS:
        raise DataError(f"{where}: {key} must be 0 .. {NUM_OPTIONS - 1}, got {label!r}")
    return label


def _choices(row: dict, key: str, objects: list[str], where: str) -> tuple[tuple[Token, ...], ...]:
    choices = row.get(key)
    if not isinstance(choices, list) or len(choices) != NUM_OPTIONS:
        raise DataError(f"{where}: {key} must be a list of {NUM_OPTIONS} token lists, got {choices!r:.120}")
    return tuple(_tokens(c, objects, where, f"{key}[{i}]") for i, c in enumerate(choices))


def read_vcr(path: str) -> list[VCRQuestion]:
    """The questions of a VCR jsonl file (labels None where the file has none, as ``test.jsonl``)."""
    questions: list[VCRQuestion] = []
    seen: dict[str, int] = {}
    for number, row in read_json_lines(path, "questions"):
        where = f"{path}:{number}"
        missing = [k for k in ("annot_id", "img_fn", "objects", "question", "answer_choices",
                               "rationale_choices") if k not in row]
        if missing:
            raise DataError(f"{where}: missing {missing} (a VCR line has annot_id, img_fn, objects, question, "
                            "answer_choices, rationale_choices, answer_label, rationale_label)")
        objects = row["objects"]
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise DataError(f"{where}: objects must be a list of names, got {objects!r:.120}")
        if not isinstance(row["img_fn"], str):
            raise DataError(f"{where}: img_fn must be a string, got {row['img_fn']!r}")
        annot_id = str(row["annot_id"])
        if annot_id in seen:
            raise DataError(f"{where}: annot_id {annot_id!r} repeats line {seen[annot_id]}")
        seen[annot_id] = number
        questions.append(VCRQuestion(
            annot_id, os.path.splitext(os.path.basename(row["img_fn"]))[0], tuple(objects),
            _tokens(row["question"], objects, where, "question"),
            _choices(row, "answer_choices", objects, where), _choices(row, "rationale_choices", objects, where),
            _label(row, "answer_label", where), _label(row, "rationale_label", where), where))
    labelled = {q.answer_label is not None for q in questions}
    if len(labelled) > 1:
        raise DataError(f"{path}: some lines have answer_label and some do not")
    return questions


def object_words(objects: tuple[str, ...]) -> list[str]:
    """The word each object is called by: people get :data:`PERSON_NAMES` in order, others their name."""
    words, people = [], 0
    for name in objects:
        if name == "person":
            words.append(PERSON_NAMES[people % len(PERSON_NAMES)])
            people += 1
        else:
            words.append(name)
    return words


def resolve(tokens: tuple[Token, ...], words: list[str]) -> list[tuple[str, int]]:
    """``(word, object index or -1)`` for every token; a reference to several objects reads
    ``name and name``, the "and" belonging to no object."""
    out: list[tuple[str, int]] = []
    for token in tokens:
        if isinstance(token, str):
            out.append((token, -1))
            continue
        for k, index in enumerate(token):
            if k:
                out.append(("and", -1))
            out.append((words[index], index))
    return out
