"""Downstream metrics: VQA accuracy (official and BUTD soft score) and retrieval recall@K.

**VQA answer normalisation** follows the official evaluation script (GT-Vision-Lab ``vqaEval.py``):
newlines / tabs become spaces and the answer is stripped; then, only for a question whose ten human
answers are not all the same string, every answer and the prediction go through

* punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
  space (or when the text has a comma between digits, ``1,000``), else replaced by a space; a period
  not followed by a digit is deleted (``2.5`` keeps its point);
* words (lower-cased, split on spaces): number words ``none``/``zero`` .. ``ten`` become digits,
  the articles ``a``, ``an``, ``the`` are dropped, contractions written without their apostrophe
  (``dont``, ``isnt``, ``youre`` ...) get it back.

**Official accuracy** of a prediction: the mean over the 10 leave-one-out subsets of 9 human
answers of ``min(1, matches in the subset / 3)``. For ``n`` matching humans out of 10 this is
0, 0.3, 0.6, 0.9, 1 for n = 0, 1, 2, 3, >= 4: the BUTD / ViLBERT soft target
(:func:`soft_score`), so the **BUTD soft score** (the target score of the predicted label, as
bottom-up-attention-vqa and ViLBERT report it) equals the official accuracy when the answers are
already normalised, and differs only where normalisation changes a match.

**Recall@K** (:func:`recall_at_k`): a query is a hit at K when a ground-truth candidate is among its
K best. Ties are counted against the query: the rank of the best ground truth is the number of
*other* (non-ground-truth) candidates scoring ``>=`` it. A model that scores every pair the same gets
R@K = 0 for K <= the number of other candidates (never a free 100%).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, kept as written


def _contractions() -> dict[str, str]:
    """Apostrophe-less spelling -> the official spelling (``dont`` -> ``don't``, ``wouldnt've`` ...)."""
    words = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
             "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll it's let's ma'am "
             "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd "
             "she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll "
             "somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
             "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
             "we'd we'd've we'll we're we've weren't what'll what're what's what've when's where'd where's "
             "where've who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't "
             "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()
    table = {}
    for word in words:
        table[word.replace("'", "")] = word
        parts = word.split("'")
        if len(parts) == 3:  # two apostrophes: either one may be missing (couldnt've, couldn'tve)
            table[parts[0] + parts[1] + "'" + parts[2]] = word
            table[parts[0] + "'" + parts[1] + parts[2]] = word
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    out = text
    digits_with_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or digits_with_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The full normalisation: whitespace, punctuation, then number words, articles, contractions."""
    return process_digits_articles(process_punctuation(_clean(answer)))


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one prediction against the human answers (10 in VQA v2)."""
    if not human_answers:
        raise ValueError("human_answers is empty: the official accuracy needs the annotators' answers")
    humans = [_clean(a) for a in human_answers]
    prediction = _clean(prediction)
    if len(set(humans)) > 1:  # the official script normalises only questions the humans disagree on
        humans = [process_digits_articles(process_punctuation(a)) for a in humans]
        prediction = process_digits_articles(process_punctuation(prediction))
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(1 for i, a in enumerate(humans) if i != left_out and a == prediction)
        total += min(1.0, matches / 3.0)
    return total / len(humans)


def soft_score(count: int) -> float:
    """BUTD / ViLBERT's soft target of an answer given by ``count`` of the 10 humans: 0, 0.3, 0.6, 0.9, 1
    (the official accuracy of that answer)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return min(1.0, 0.3 * count) if count < 4 else 1.0


def answer_scores(human_answers: Iterable[str], normalise: bool = True) -> dict[str, float]:
    """{answer: soft score} of one question's human answers (normalised by default, as BUTD's
    preprocessing does before it builds the targets)."""
    counts = Counter(normalize_answer(a) if normalise else a for a in human_answers)
    return {answer: soft_score(n) for answer, n in counts.items()}


def vqa_metrics(predictions: Mapping[int, str], human_answers: Mapping[int, Sequence[str]]) -> dict:
    """``{"vqa_accuracy", "soft_score", "questions"}`` in percent over the questions in ``predictions``
    (every one must have human answers)."""
    missing = [q for q in predictions if q not in human_answers]
    if missing:
        raise ValueError(f"{len(missing)} predicted questions have no human answers, e.g. question_id {missing[0]}")
    if not predictions:
        raise ValueError("no predictions to score")
    official = [vqa_accuracy(predictions[q], human_answers[q]) for q in predictions]
    soft = [answer_scores(human_answers[q]).get(normalize_answer(predictions[q]), 0.0) for q in predictions]
    return {"vqa_accuracy": 100.0 * float(np.mean(official)), "soft_score": 100.0 * float(np.mean(soft)),
            "questions": len(predictions)}


# retrieval ------------------------------------------------------------------------------------------


def ranks(scores: torch.Tensor | np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """Per query (row of ``scores [Q, C]``), the 0-based rank of its best ground truth among the
    candidates: the number of non-ground-truth candidates scoring ``>=`` the best ground-truth score."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [queries, candidates], got shape {list(scores.shape)}")
    if len(positives) != scores.shape[0]:
        raise ValueError(f"positives has {len(positives)} entries for {scores.shape[0]} queries")
    out = np.empty(scores.shape[0], dtype=np.int64)
    for query, gold in enumerate(positives):
        if len(gold) == 0:
            raise ValueError(f"query {query} has no ground-truth candidate")
        is_gold = torch.zeros(scores.shape[1], dtype=torch.bool)
        is_gold[list(gold)] = True
        best = scores[query, is_gold].max()
        out[query] = int((scores[query, ~is_gold] >= best).sum())
    return out


def recall_at_k(scores: torch.Tensor | np.ndarray, positives: Sequence[Sequence[int]],
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """{K: percentage of queries with a ground truth among the K best} (ties against the query)."""
    r = ranks(scores, positives)
    return {k: 100.0 * float((r < k).mean()) for k in ks}


def retrieval_metrics(scores_i2t: torch.Tensor | np.ndarray, text_image: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), scores_t2i: torch.Tensor | np.ndarray | None = None) -> dict:
    """The originals' retrieval report from ``scores_i2t [images, texts]`` and the image of every text:
    ``tr_r1`` .. (image -> text: any of the image's captions), ``ir_r1`` .. (text -> image), their
    means ``tr_mean`` / ``ir_mean`` and ``r_mean`` (the mean of all six). ``scores_t2i [texts, images]``
    when text -> image is scored separately (ALBEF re-ranks each direction's own top k); default
    ``scores_i2t`` transposed."""
    scores_i2t = torch.as_tensor(scores_i2t, dtype=torch.float64)
    scores_t2i = scores_i2t.t() if scores_t2i is None else torch.as_tensor(scores_t2i, dtype=torch.float64)
    num_images, num_texts = scores_i2t.shape
    if len(text_image) != num_texts:
        raise ValueError(f"text_image has {len(text_image)} entries for {num_texts} texts")
    captions: list[list[int]] = [[] for _ in range(num_images)]
    for text, image in enumerate(text_image):
        if not 0 <= image < num_images:
            raise ValueError(f"text {text} belongs to image {image}, outside [0, {num_images})")
        captions[image].append(text)
    without = [i for i, c in enumerate(captions) if not c]
    if without:
        raise ValueError(f"{len(without)} images have no caption, e.g. image {without[0]}")
    tr = recall_at_k(scores_i2t, captions, ks)
    ir = recall_at_k(scores_t2i, [[image] for image in text_image], ks)
    out = {**{f"tr_r{k}": v for k, v in tr.items()}, **{f"ir_r{k}": v for k, v in ir.items()}}
    out["tr_mean"] = float(np.mean(list(tr.values())))
    out["ir_mean"] = float(np.mean(list(ir.values())))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    out.update(images=num_images, texts=num_texts)
    return out


def multiple_choice_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percent of questions whose predicted option is the labelled one."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no questions to score")
    return 100.0 * sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


def vcr_joint_metrics(answers: Mapping[str, tuple[int, int]], rationales: Mapping[str, tuple[int, int]]) -> dict:
    """VCR's Q->AR: ``{annot_id: (predicted, label)}`` of a Q->A and a QA->R evaluation of the same
    questions; a question counts only if both its answer and its rationale are right (the VCR
    paper's holistic setting; the QA->R model was given the right answer)."""
    if set(answers) != set(rationales):
        only = sorted(set(answers) ^ set(rationales))
        raise ValueError(f"the Q->A and QA->R predictions cover different questions ({len(only)} in one only, "
                         f"e.g. {only[0]!r}); evaluate both on the same split")
    if any(label is None for _, label in [*answers.values(), *rationales.values()]):
        raise ValueError("Q->AR needs labelled questions (a split with answer_label and rationale_label)")
    ids = sorted(answers)
    a_right = [answers[i][0] == answers[i][1] for i in ids]
    r_right = [rationales[i][0] == rationales[i][1] for i in ids]
    return {"q2a_accuracy": 100.0 * float(np.mean(a_right)), "qa2r_accuracy": 100.0 * float(np.mean(r_right)),
            "q2ar_accuracy": 100.0 * float(np.mean([a and r for a, r in zip(a_right, r_right)])),
            "joint_questions": len(ids), "q2ar_chance_accuracy": 100.0 / 16}


# referring expressions and grounding: boxes and IoU ---------------------------------------------------
#
# Formats: COCO / RefCOCO annotations and ALBEF's detections are ``[x, y, w, h]`` (top-left corner and
# size, pixels); region features and proposals inside ViLBERT and VL-BERT are ``[x1, y1, x2, y2]``.
# The originals convert a COCO box as ``[x, y, x + w, y + h]`` and then measure IoU in the inclusive
# pixel convention (width ``x2 - x1 + 1``; vilbert-multi-task's ``iou``, VL-BERT's
# ``bbox_iou_py_vectorized`` and its test accuracy): :func:`box_iou` with ``plus_one=True``. Their
# consequence: two boxes that touch along an edge share one pixel row or column (IoU > 0), and a box
# with ``x1 == x2`` is one pixel wide. ``plus_one=False`` is the continuous area. ALBEF scores
# grounding with the REFER toolkit's ``computeIoU`` on ``[x, y, w, h]``: :func:`refer_iou`.


def xywh_to_xyxy(boxes) -> np.ndarray:
    """``[..., 4]`` ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (as the originals convert COCO boxes)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [..., 4] (x, y, w, h), got shape {list(boxes.shape)}")
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def clip_boxes(boxes, image_h: float, image_w: float) -> np.ndarray:
    """``[..., 4]`` ``x1, y1, x2, y2`` clamped to the image, ``[0, w - 1] x [0, h - 1]`` (VL-BERT's
    clamp before it labels its boxes); a box wholly outside becomes a degenerate one on the border."""
    boxes = np.array(boxes, dtype=np.float64)
    boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, image_w - 1)
    boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, image_h - 1)
    return boxes


def box_iou(boxes, query_boxes, *, plus_one: bool = True) -> np.ndarray:
    """Pairwise IoU ``[N, K]`` of ``x1, y1, x2, y2`` boxes ``[N, 4]`` and ``[K, 4]`` (float64).

    ``plus_one``: the inclusive pixel convention of ViLBERT and VL-BERT (widths ``x2 - x1 + 1``);
    else the continuous area. A negative width or height counts as 0 (no area); a pair whose union
    is empty (two zero-area boxes) has IoU 0."""
    a, b = (np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in (boxes, query_boxes))
    one = 1.0 if plus_one else 0.0

    def side(low, high):
        return np.maximum(high - low + one, 0.0)

    area_a = side(a[:, 0], a[:, 2]) * side(a[:, 1], a[:, 3])
    area_b = side(b[:, 0], b[:, 2]) * side(b[:, 1], b[:, 3])
    inter = (side(np.maximum(a[:, None, 0], b[None, :, 0]), np.minimum(a[:, None, 2], b[None, :, 2]))
             * side(np.maximum(a[:, None, 1], b[None, :, 1]), np.minimum(a[:, None, 3], b[None, :, 3])))
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def refer_iou(box, other) -> float:
    """IoU of two ``[x, y, w, h]`` boxes as the REFER toolkit's ``computeIoU`` (ALBEF's grounding
    score): the intersection spans ``max(x) .. min(x + w - 1)`` inclusive and counts only when that
    span is more than one pixel each way (strictly ``x1 < x2``; so touching boxes, and boxes sharing a
    single pixel column, give 0); the union is ``w * h + w' * h' - intersection``; 0 for an empty union."""
    x1, y1 = max(box[0], other[0]), max(box[1], other[1])
    x2 = min(box[0] + box[2] - 1, other[0] + other[2] - 1)
    y2 = min(box[1] + box[3] - 1, other[1] + other[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0.0
    union = box[2] * box[3] + other[2] * other[3] - inter
    return float(inter) / union if union > 0 else 0.0


def top_region_accuracy(scores, ious, mask=None, threshold: float = 0.5) -> dict:
    """Referring-expression accuracy from region scores ``[B, R]`` and each region's IoU with the
    referred box ``[B, R]``: the percentage of rows whose top-scored real region (``mask [B, R]``,
    default all) has IoU ``>= threshold``; ties go to the first region. Also ``upper_bound``: rows
    where some real region reaches the threshold (what a perfect ranker gets), and ``count``."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    ious = torch.as_tensor(ious, dtype=torch.float64)
    if scores.ndim != 2 or ious.shape != scores.shape:
        raise ValueError(f"scores and ious must both be [B, R], got {list(scores.shape)} and {list(ious.shape)}")
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask must be [B, R] like scores, got {list(mask.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("no referring expressions to score")
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"row {int((~mask.any(dim=1)).nonzero()[0])} has no real region")
    top = scores.masked_fill(~mask, float("-inf")).argmax(dim=1)
    hit = ious.gather(1, top[:, None])[:, 0] >= threshold
    reachable = ((ious >= threshold) & mask).any(dim=1)
    return {"accuracy": 100.0 * float(hit.double().mean()), "upper_bound": 100.0 * float(reachable.double().mean()),
            "count": int(scores.shape[0])}


def accuracy_at_iou(ious, threshold: float = 0.5) -> float:
    """Percentage of predictions whose IoU with the ground truth is ``>= threshold``."""
    ious = np.asarray(ious, dtype=np.float64).reshape(-1)
    if ious.size == 0:
        raise ValueError("no predictions to score")
    return 100.0 * float((ious >= threshold).mean())
