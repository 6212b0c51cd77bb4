"""``fastvl data synth-task``: downstream task sets over the synthetic images (``fastvl data synth``),
written in the original formats, so every reader and task runs end to end without real data.

The images' regions carry their class (the detector distribution peaks on it), so questions and
captions are derived from what each image holds:

* ``vqa`` (VQA v2 questions + annotations JSON): per image "how many {class}s are there ?" (answer:
  the count), "is there a {class} ?" for a present class (yes) and for an absent one (no); ten human
  answers each, 90% right (a count written as a digit or, 30% of the time, as a word, which the
  official normalisation merges), the others off by one or the opposite yes/no.
* ``retrieval`` (a Karpathy-split ``dataset.json``): five captions per image, each naming the image's
  classes with their counts in a random order and template, as the synthetic captions do.
* ``vcr`` (VCR ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``): "a photo of [object] and" with 4-way
  answers (a class the image holds vs three it lacks) and rationales (the answer's class with its true count vs three wrong
  counts), referring to the image's regions as VCR's objects (:func:`write_vcr`).
* ``nlvr2`` (ALBEF's NLVR2 JSON): image pairs of a split with a statement true or false of them (half
  each), about which image holds a class: "the left image has a dog .", "both images have a cat .",
  "there are more cars in the right image ." (:func:`nlvr2_statement`).
* ``snli_ve`` (SNLI-VE JSON lines): per image one entailed ("there is a C ."), one neutral ("the C is
  old .") and one contradicted hypothesis (either wording about a class the image lacks).
* ``nlvr2_ta`` (ALBEF's pretraining JSON): the images' own captions, for ALBEF's text assignment.

The last ``--test-images`` images form the test split, the ``--val-images`` before them val, the rest
train; VQA's test split is val's questions without annotations (for the submission file).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from fastvl.data.format import VOCAB_FILE, DataError, RegionDataset
from fastvl.data.synth import CLASS_NAMES, TEMPLATES, _phrase
from fastvl.data.synth_refer import write_grounding, write_refcoco
from fastvl.data.tasks import TASK_FILE
from fastvl.data.tokenizer import load_tokenizer

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def image_contents(dataset: RegionDataset) -> list[dict[int, int]]:
    """{class: count} of every image (each region's class = the argmax of its detector distribution)."""
    out = []
    for index in range(len(dataset)):
        classes = np.asarray(dataset[index].cls_prob, dtype=np.float32).argmax(axis=1)
        named, counts = np.unique(classes, return_counts=True)
        out.append({int(c): int(n) for c, n in zip(named, counts)})
    return out


@dataclasses.dataclass(frozen=True)
class SynthImages:
    """What every task writer gets: the image set, what each image holds and the split sizes."""

    images_dir: str
    out_dir: str
    dataset: RegionDataset
    contents: list[dict[int, int]]  # per image {class: count}
    seed: int
    val: int
    test: int

    @property
    def image_ids(self) -> list[str]:
        return self.dataset.image_ids

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def split_of(self, index: int) -> str:
        return _split_of(index, len(self.contents), self.val, self.test)


def _split_of(index: int, total: int, val: int, test: int) -> str:
    if index >= total - test:
        return "test"
    return "val" if index >= total - test - val else "train"


def _human_answers(right: str, wrong: list[str], rng: np.random.Generator, count: int | None) -> list[str]:
    answers = []
    for _ in range(10):
        if rng.random() < 0.9:
            spoken = count is not None and count < len(NUMBER_WORDS) and rng.random() < 0.3
            answers.append(NUMBER_WORDS[count] if spoken else right)
        else:
            answers.append(wrong[int(rng.integers(len(wrong)))])
    return answers


def write_vqa(images: SynthImages) -> dict:
    out_dir, contents, image_ids, num_classes = images.out_dir, images.contents, images.image_ids, images.num_classes
    rng = np.random.default_rng((images.seed, 0x7A))
    splits: dict[str, dict[str, list]] = {s: {"questions": [], "annotations": []} for s in ("train", "val", "test")}
    for index, (present, image_id) in enumerate(zip(contents, image_ids)):
        split = splits[images.split_of(index)]
        classes = sorted(present)
        counted = classes[int(rng.integers(len(classes)))]
        shown = classes[int(rng.integers(len(classes)))]
        absent = [c for c in range(num_classes) if c not in present]
        count = present[counted]
        items = [(f"how many {CLASS_NAMES[counted]}s are there ?", str(count),
                  [str(max(0, count - 1)), str(count + 1)], count, "number"),
                 (f"is there a {CLASS_NAMES[shown]} ?", "yes", ["no"], None, "yes/no")]
        if absent:
            items.append((f"is there a {CLASS_NAMES[absent[int(rng.integers(len(absent)))]]} ?", "no", ["yes"], None,
                          "yes/no"))
        for k, (question, right, wrong, number, answer_type) in enumerate(items):
            qid = index * 10 + k
            split["questions"].append({"question_id": qid, "image_id": image_id, "question": question})
            answers = _human_answers(right, wrong, rng, number)
            split["annotations"].append({
                "question_id": qid, "image_id": image_id, "answer_type": answer_type,
                "question_type": question.split(" ")[0], "multiple_choice_answer": right,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(answers)]})
    files = {}
    for name in ("train", "val"):
        questions, annotations = f"{name}_questions.json", f"{name}_annotations.json"
        _write(out_dir, questions, {"task_type": "Open-Ended", "data_subtype": f"synth-{name}",
                                    "questions": splits[name]["questions"]})
        _write(out_dir, annotations, {"data_subtype": f"synth-{name}", "annotations": splits[name]["annotations"]})
        files[name] = {"questions": questions, "annotations": annotations}
    _write(out_dir, "test_questions.json", {"task_type": "Open-Ended", "data_subtype": "synth-test",
                                            "questions": splits["test"]["questions"]})
    files["test"] = {"questions": "test_questions.json"}
    answers = sorted({str(n) for c in contents for n in range(max(c.values()) + 2)} | {"yes", "no"},
                     key=lambda a: (not a.isalpha(), int(a) if a.isdigit() else 0, a))
    _write(out_dir, "answers.json", answers)
    return {"task": "vqa", "splits": files, "answers": "answers.json",
            "counts": {s: len(splits[s]["questions"]) for s in splits}}


def write_retrieval(images: SynthImages, captions_per_image: int = 5) -> dict:
    rng = np.random.default_rng((images.seed, 0x2E7))
    records, sentence_id = [], 0
    for index, (present, image_id) in enumerate(zip(images.contents, images.image_ids)):
        sentences = []
        for _ in range(captions_per_image):
            order = rng.permutation(sorted(present))
            phrases = [_phrase(CLASS_NAMES[c], present[c]) for c in order]
            fitting = [t for t in TEMPLATES if t.count("{") == len(phrases)] or ["{0} ."]
            raw = fitting[int(rng.integers(len(fitting)))].format(*phrases) if len(phrases) <= 3 else " ".join(phrases)
            sentences.append({"raw": raw, "tokens": raw.split(), "imgid": index, "sentid": sentence_id})
            sentence_id += 1
        records.append({"filename": f"{image_id}.jpg", "imgid": index, "split": images.split_of(index),
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    _write(images.out_dir, "dataset.json", {"dataset": "synth", "images": records})
    splits = {name: {"karpathy": "dataset.json"} for name in ("train", "val", "test")}
    return {"task": "retrieval", "splits": splits,
            "counts": {s: sum(i["split"] == s for i in records) for s in ("train", "val", "test")}}


def write_vcr(images: SynthImages, questions_per_image: int = 3) -> dict:
    """VCR jsonl files: each image's regions are its objects (named by their class); up to
    ``questions_per_image`` questions "a photo of [i] and" about a random object ``i`` (the synthetic
    vocabulary's words): the right answer "a {class} ." names another class the image holds, the three
    wrong ones classes it lacks (an image of one class is asked "a photo of"); the rationales
    "N {class}s near [i] ." name the right answer's class with its true count (right) or three wrong
    counts. Test lines have no labels (as VCR's test.jsonl)."""
    rng = np.random.default_rng((images.seed, 0x7C2))
    lines: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    counts = (1, 2, 3, 4, 5)  # _phrase: a / two / three / four / many
    for index, image_id in enumerate(images.image_ids):
        split = images.split_of(index)
        classes = np.asarray(images.dataset[index].cls_prob, dtype=np.float32).argmax(axis=1).tolist()
        present = images.contents[index]
        absent = [c for c in range(images.num_classes) if c not in present]
        if len(absent) < 3:
            continue
        objects = [CLASS_NAMES[c] for c in classes]
        for k in range(questions_per_image):
            ref = int(rng.integers(len(classes)))
            others = sorted(c for c in present if c != classes[ref])
            if others:
                question = ["a", "photo", "of", [ref], "and"]
                right = others[int(rng.integers(len(others)))]
            else:
                question = ["a", "photo", "of"]
                right = classes[ref]
            wrong = rng.choice(absent, 3, replace=False).tolist()
            answer_order = rng.permutation(4)
            answers = [[right, *wrong][j] for j in answer_order]
            true = min(present[right], 5)
            options = [true, *rng.choice([n for n in counts if n != true], 3, replace=False).tolist()]
            rationale_order = rng.permutation(4)
            rationales = [[*_phrase(CLASS_NAMES[right], options[j]).split(), "near", [ref], "."]
                          for j in rationale_order]
            line = {"annot_id": f"{split}-{index * questions_per_image + k}", "img_id": f"{split}-{index}",
                    "img_fn": f"synth/{image_id}.jpg", "metadata_fn": f"synth/{image_id}.json", "objects": objects,
                    "question": question, "answer_choices": [["a", CLASS_NAMES[c], "."] for c in answers],
                    "rationale_choices": rationales}
            if split != "test":
                line["answer_label"] = int(np.argmax(answer_order == 0))
                line["rationale_label"] = int(np.argmax(rationale_order == 0))
            lines[split].append(line)
    for name, rows in lines.items():
        if not rows:
            raise DataError(f"{images.images_dir}: no {name} image has 3 classes it lacks; the VCR set needs more "
                            "classes than an image holds")
        with open(os.path.join(images.out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {"task": "vcr", "splits": {name: {"jsonl": f"{name}.jsonl"} for name in lines},
            "counts": {name: len(rows) for name, rows in lines.items()}}


def _split_indices(images: SynthImages) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index in range(len(images.contents)):
        out[images.split_of(index)].append(index)
    return out


def nlvr2_statement(left: dict[int, int], right: dict[int, int], label: bool, rng: np.random.Generator,
                    num_classes: int) -> str | None:
    """A statement about the image pair (``{class: count}`` each) that is ``label``, or None if this
    pair has none of the drawn kind: "the left / right image has a C ." (C in / not in that image),
    "both images have a C ." (C in both / in exactly one), "there are more Cs in the left / right image ."
    (C in that image only / in the other only)."""
    kind = int(rng.integers(4))
    side = int(rng.integers(2))
    names = ("left", "right")
    images = (left, right)

    def pick(classes):
        classes = sorted(classes)
        return CLASS_NAMES[classes[int(rng.integers(len(classes)))]] if classes else None

    if kind < 2:
        shown = images[side]
        name = pick(shown) if label else pick(set(range(num_classes)) - set(shown))
        return None if name is None else f"the {names[side]} image has a {name} ."
    if kind == 2:
        name = pick(set(left) & set(right)) if label else pick(set(left) ^ set(right))
        return None if name is None else f"both images have a {name} ."
    mine, other = images[side], images[1 - side]
    name = pick(set(mine) - set(other)) if label else pick(set(other) - set(mine))
    return None if name is None else f"there are more {name}s in the {names[side]} image ."


def write_nlvr2(images: SynthImages, statements_per_image: int = 2) -> dict:
    """ALBEF's NLVR2 layout (``nlvr_{split}.json``: ``[{"images": [left, right], "sentence", "label"}]``):
    each image of a split is the left image of ``statements_per_image`` pairs with another image of the
    split, half of the statements true (:func:`nlvr2_statement`)."""
    rng = np.random.default_rng((images.seed, 0x2B2))
    files, counts = {}, {}
    for split, members in _split_indices(images).items():
        records = []
        for left in members:
            for k in range(statements_per_image):
                label = bool(rng.random() < 0.5)
                for _ in range(100):  # another partner or kind until the pair has such a statement
                    right = members[int(rng.integers(len(members)))]
                    sentence = None if right == left else nlvr2_statement(
                        images.contents[left], images.contents[right], label, rng, images.num_classes)
                    if sentence is not None:
                        break
                else:
                    raise DataError(f"{images.images_dir}: no {label} NLVR2 statement found for image {left}")
                records.append({"identifier": f"{split}-{left}-{k}", "sentence": sentence, "label": str(label),
                                "images": [f"{images.image_ids[left]}.png", f"{images.image_ids[right]}.png"]})
        name = f"nlvr_{split}.json"
        _write(images.out_dir, name, records)
        files[split], counts[split] = {"nlvr2": name}, len(records)
    return {"task": "nlvr2", "splits": files, "counts": counts}


def write_snli_ve(images: SynthImages) -> dict:
    """SNLI-VE JSON lines (``snli_ve_{split}.jsonl``), three hypotheses per image, one of each label:
    entailment "there is a C ." (C in the image), neutral "the C is old ." (C in the image: its age is
    not shown) and contradiction, either "there is a C ." or "the C is old ." with C not in the image.
    The wording alone tells neutral from entailment, not contradiction from either (text-only ceiling
    66.7%; chance 33.3%)."""
    rng = np.random.default_rng((images.seed, 0x5E))
    files, counts = {}, {}
    for split, members in _split_indices(images).items():
        lines = []
        for index in members:
            present = sorted(images.contents[index])
            absent = [c for c in range(images.num_classes) if c not in images.contents[index]]
            shown = CLASS_NAMES[present[int(rng.integers(len(present)))]]
            old = CLASS_NAMES[present[int(rng.integers(len(present)))]]
            hypotheses = [(f"there is a {shown} .", "entailment"), (f"the {old} is old .", "neutral")]
            if absent:
                missing = CLASS_NAMES[absent[int(rng.integers(len(absent)))]]
                template = "there is a {} ." if rng.random() < 0.5 else "the {} is old ."
                hypotheses.append((template.format(missing), "contradiction"))
            for k, (hypothesis, label) in enumerate(hypotheses):
                lines.append({"Flikr30kID": f"{images.image_ids[index]}.jpg", "pairID": f"{images.image_ids[index]}#{k}",
                              "sentence2": hypothesis, "gold_label": label})
        name = f"snli_ve_{split}.jsonl"
        with open(os.path.join(images.out_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        files[split], counts[split] = {"snli_ve": name}, len(lines)
    return {"task": "snli_ve", "splits": files, "counts": counts}


def write_nlvr2_ta(images: SynthImages) -> dict:
    """ALBEF's pretraining JSON (``ta_{split}.json``: ``[{"image", "caption"}]``) of the image set's own
    captions, for the text-assignment step (``--task nlvr2_ta``)."""
    captions = images.dataset.caption_texts()
    files, counts = {}, {}
    for split, members in _split_indices(images).items():
        name = f"ta_{split}.json"
        _write(images.out_dir, name, [{"image": f"{images.image_ids[i]}.png", "caption": captions[i]} for i in members])
        files[split], counts[split] = {"albef": name}, len(members)
    return {"task": "nlvr2_ta", "splits": files, "counts": counts}


# --task name -> writer(SynthImages) -> manifest (without "images"); a new task set is one line here
WRITERS = {"vqa": write_vqa, "retrieval": write_retrieval, "vcr": write_vcr, "refcoco": write_refcoco,
           "grounding": write_grounding, "nlvr2": write_nlvr2, "snli_ve": write_snli_ve, "nlvr2_ta": write_nlvr2_ta}


def _write(out_dir: str, name: str, data) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(data, f)


def make_task_set(task: str, images_dir: str, out_dir: str, *, seed: int = 0, val_images: int = 64,
                  test_images: int = 64) -> dict:
    """Writes ``task.json`` and the task's annotation files into ``out_dir`` for the synthetic images in
    ``images_dir``; returns the manifest (with the split sizes under ``counts``)."""
    dataset = RegionDataset(images_dir, load_tokenizer(os.path.join(images_dir, VOCAB_FILE)))
    if val_images < 1 or test_images < 1 or len(dataset) <= val_images + test_images:
        raise DataError(f"{images_dir}: {len(dataset)} images cannot make train, {val_images} val and {test_images} "
                        "test images; lower --val-images / --test-images or synthesise more images")
    num_classes = dataset.num_classes
    if num_classes > len(CLASS_NAMES):
        raise DataError(f"{images_dir}: {num_classes} classes; synthetic task sets name at most {len(CLASS_NAMES)}")
    if task not in WRITERS:
        raise ValueError(f"--task must be one of {sorted(WRITERS)}, got {task!r}")
    os.makedirs(out_dir, exist_ok=True)
    manifest = WRITERS[task](SynthImages(images_dir, out_dir, dataset, image_contents(dataset), seed, val_images,
                                         test_images))
    manifest = {"task": manifest.pop("task"), "images": os.path.relpath(os.path.abspath(images_dir),
                                                                         os.path.abspath(out_dir)), **manifest}
    _write(out_dir, TASK_FILE, manifest)
    return manifest


def add_arguments(actions) -> None:
    """``fastvl data synth-task`` (registered by :mod:`fastvl.data.cli`)."""
    parser = actions.add_parser("synth-task", help="write a downstream task set over `fastvl data synth` images")
    parser.add_argument("--task", required=True, choices=sorted(WRITERS))
    parser.add_argument("--images", required=True, help="the synthetic image set (fastvl data synth --out)")
    parser.add_argument("--out", required=True, help="output directory (task.json and the annotation files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=64)


def run(args) -> int:
    manifest = make_task_set(args.task, args.images, args.out, seed=args.seed, val_images=args.val_images,
                             test_images=args.test_images)
    print(f"wrote a {args.task} task set over {args.images} to {args.out}: {manifest['counts']}")
    return 0
