"""VCR multiple choice for ViLBERT and VL-BERT: ``vcr_q2a`` (Q->A) and ``vcr_qa2r`` (QA->R), and
the joint Q->AR of two such models.

* Inputs (both originals): every option is one text with the image, ``[CLS] first [SEP] option
  [SEP]`` (segment 0, then 1). Q->A: first = the question, options = the four answers. QA->R: first
  = ``question [SEP] right answer`` (the right answer is given, in training and in evaluation, as both
  originals do), options = the four rationales. Object references are resolved by
  :mod:`fastvl.data.vcr` (names; ViLBERT reads only the words, VL-BERT also links each word of a
  reference to its object's region with its text tags, every other word to the whole image). The
  pair is cut to the text length by dropping the last piece of the longer part (ViLBERT's rule).
* Regions: the whole-image region, then the image's regions (its VCR objects first, in order, so object
  ``i`` is region ``i + 1``; references beyond ``--max-regions`` fall back to the whole image).
* Models: ViLBERT scores each (option, image) with ``vil_logit`` on the fused vector; VL-BERT with
  its VCR head (:class:`~fastvl.models.vlbert.VLBERTForVCR`, tanh pooler -> Linear(1)). Loss: softmax
  cross-entropy over the four scores. VL-BERT adds, as its VCR configs do (``ENABLE_CNN_REG_LOSS``
  with ``CNN_LOSS_TOP``, ``CNN_LOSS_WEIGHT`` 1.0), an object classification loss: every region's
  final state in every option's sequence classified into its object's name (the whole image:
  ``__background__``; the class list is the training split's object names, kept in the checkpoint),
  ``--object-loss-weight`` x its mean cross-entropy (0: off). With ``--init`` from VL-BERT
  pretraining its transform starts from the masked RoI classification head's, as the original's.
  The original's answer loss in those configs is each option's sigmoid cross-entropy
  (``CLASSIFIER_SIGMOID``): ``--answer-loss sigmoid``; the default is the softmax over the options for
  both families (ViLBERT's; on the synthetic set it learned as well or better). ViLBERT's
  co-attention mask of the references is not used by its model either.
* Evaluation: accuracy of the top-scored option (chance 25%); the outputs (``--submission``) are one
  record per question ``{annot_id, task, prediction, label, scores}``. The joint Q->AR
  (``fastvl evaluate --joint FILE``): a question is right only if the Q->A model's answer and the
  QA->R model's rationale both are (:func:`fastvl.finetune.metrics.vcr_joint_metrics`), FILE being the
  other model's predictions (``--submission`` of its evaluation on the same split).
* Leaderboard (``fastvl evaluate --task vcr_qa2r --joint Q2A_FILE --leaderboard CSV``, on ``test``
  or a labelled split): the QA->R model scores the rationales given each of the four answers (four
  passes, as the test server needs: it takes the argmax answer, then the rationale given the right
  one) and :func:`write_leaderboard` writes r2c's CSV layout, ``annot_id``, ``answer_0..3``,
  ``rationale_conditioned_on_a{i}_{j}`` (softmax probabilities).
"""

from __future__ import annotations

import csv

import numpy as np
import torch
import torch.nn.functional as F

from fastvl.data.format import DataError
from fastvl.data.tasks import ImageLookup
from fastvl.data.vcr import NUM_OPTIONS, VCRQuestion, object_words, read_vcr, resolve
from fastvl.finetune import metrics
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import pad_ids, region_batch, region_task_model, repeat_rows

NO_OBJECT = -1
BACKGROUND = "__background__"  # the whole-image region's class (the original's image box: class 0)
OBJECT_LOSS_WEIGHT = 1.0  # VL-BERT's NETWORK.CNN_LOSS_WEIGHT in its VCR configs
ANSWER_LOSSES = ("softmax", "sigmoid")  # over the 4 options; or per option (VL-BERT's CLASSIFIER_SIGMOID)
SEPARATOR = ("[SEP]", NO_OBJECT)  # between the question and the given answer (QA->R)


class VCRTask(Task):
    """One VCR sub-task (``mode`` ``q2a`` or ``qa2r``): the task directory's ``task.json`` says
    ``"task": "vcr"`` with a ``{"jsonl": FILE}`` per split, shared by both sub-tasks."""

    mode = ""
    data_task = "vcr"
    families = ("vilbert", "vlbert")
    objectives = ("ce",)  # and "object" when VL-BERT's object classification is on
    options = ("object_loss_weight", "answer_loss", "leaderboard")  # task options the command line passes through

    def __init__(self, task_dir, family, dataset, special, *, state=None, object_loss_weight: float | None = None,
                 answer_loss: str | None = None, leaderboard: str | None = None, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        if answer_loss not in (None, *ANSWER_LOSSES):
            raise ValueError(f"--answer-loss must be one of {list(ANSWER_LOSSES)}, got {answer_loss!r}")
        self.answer_loss = answer_loss or "softmax"
        if leaderboard and self.mode != "qa2r":
            raise ValueError("--leaderboard is written by the vcr_qa2r evaluation (it scores the rationales given "
                             "each answer) with the vcr_q2a predictions as --joint")
        self.leaderboard = leaderboard
        self._rank = 0
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}
        self._pieces: dict[str, np.ndarray] = {}
        if object_loss_weight is None:
            object_loss_weight = OBJECT_LOSS_WEIGHT if family == "vlbert" else 0.0
        if object_loss_weight < 0 or (object_loss_weight > 0 and family != "vlbert"):
            raise ValueError(f"--object-loss-weight must be >= 0 and only VL-BERT has the object classification "
                             f"loss, got {object_loss_weight} for {family}")
        self.object_loss_weight = float(object_loss_weight)
        self.objectives = ("ce", "object") if self.object_loss_weight > 0 else ("ce",)
        if state is not None:  # a checkpoint's task: its head's classes
            self.object_classes = list(state.get("object_classes", []))
        elif self.object_loss_weight > 0:
            names = {name for q in self.split("train")[0] for name in q.objects}
            self.object_classes = [BACKGROUND, *sorted(names - {BACKGROUND})]
        else:
            self.object_classes = []

    def state(self) -> dict:
        return {"mode": self.mode, "object_classes": self.object_classes}

    # inputs -----------------------------------------------------------------------------------------

    def _encode(self, words: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
        """Word pieces and the object of each (``NO_OBJECT`` for plain words); :data:`SEPARATOR` is
        the ``[SEP]`` token."""
        new = sorted({w for w, o in words if (w, o) != SEPARATOR and w not in self._pieces})
        if new:
            for word, encoding in zip(new, self.dataset.tokenizer.encode_batch(new, add_special_tokens=False)):
                self._pieces[word] = np.asarray(encoding.ids, dtype=np.int64)
        ids: list[int] = []
        tags: list[int] = []
        for word, obj in words:
            pieces = [self.special.sep] if (word, obj) == SEPARATOR else self._pieces[word].tolist()
            ids += pieces
            tags += [obj] * len(pieces)
        return ids, tags

    def _sequences(self, q: VCRQuestion, given: int | None = None) -> list[tuple[list[int], list[int], list[int]]]:
        """``(ids, token types, object tags)`` of the question's four option texts; QA->R gives the
        model answer ``given`` (default: the right one)."""
        names = object_words(q.objects)
        first = resolve(q.question, names)
        options = q.answer_choices
        if self.mode == "qa2r":
            if given is None:
                if q.answer_label is None:
                    raise DataError(f"{q.where}: QA->R gives the model the right answer, but the line has no "
                                    "answer_label (score Q->A on it instead, or QA->R given every answer with "
                                    "--leaderboard)")
                given = q.answer_label
            first = first + [SEPARATOR] + resolve(q.answer_choices[given], names)
            options = q.rationale_choices
        s = self.special
        first_ids, first_tags = self._encode(first)
        out = []
        budget = self.max_text_len - 3
        for option in options:
            a_ids, a_tags = list(first_ids), list(first_tags)
            b_ids, b_tags = self._encode(resolve(option, names))
            while len(a_ids) + len(b_ids) > budget:
                if len(a_ids) > len(b_ids):
                    a_ids.pop()
                    a_tags.pop()
                else:
                    b_ids.pop()
                    b_tags.pop()
            ids = [s.cls, *a_ids, s.sep, *b_ids, s.sep]
            types = [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)
            tags = [NO_OBJECT, *a_tags, NO_OBJECT, *b_tags, NO_OBJECT]
            out.append((ids, types, tags))
        return out

    def split(self, name: str):
        """``(questions, image index per question, option texts per question)`` (read once)."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            if "jsonl" not in files:
                raise DataError(f"VCR split {name!r} needs a 'jsonl' file (train.jsonl / val.jsonl), got {sorted(files)}")
            questions = read_vcr(files["jsonl"])
            images = [self.lookup(q.image, f"{q.where}: annot_id {q.annot_id}") for q in questions]
            texts = None if self.leaderboard else [self._sequences(q) for q in questions]
            self._splits[name] = (questions, images, texts)
        return self._splits[name]

    def label(self, q: VCRQuestion) -> int | None:
        return q.answer_label if self.mode == "q2a" else q.rationale_label

    def make_model(self, config) -> torch.nn.Module:
        if self.object_classes:
            from fastvl.models.vlbert import VLBERTForVCR

            return VLBERTForVCR(config, object_classes=len(self.object_classes))
        return region_task_model(config, self.family, "VLBERTForVCR")

    def init_state(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``--init`` from VL-BERT pretraining: the masked RoI classification head's transform starts
        the object head's (the original's ``mvrc_head.transform -> cnn_loss_reg.0``); its classifier,
        over the detector's classes, is not used."""
        if getattr(model, "object_head", None) is None:
            return state
        moved = {k.replace("mvrc_head.dense.", "object_head.dense.", 1): v for k, v in state.items()
                 if k.startswith("mvrc_head.dense.")}
        return {**state, **moved}

    def object_labels(self, questions: list[VCRQuestion], num_regions: int) -> torch.Tensor:
        """``[B, R]`` each region's class in :attr:`object_classes`: the whole image background,
        region ``o + 1`` object ``o``'s name; other regions (and names outside the list) -1."""
        index = {name: k for k, name in enumerate(self.object_classes)}
        labels = torch.full((len(questions), num_regions), -1, dtype=torch.long)
        labels[:, 0] = index[BACKGROUND]
        for row, q in enumerate(questions):
            for o, name in enumerate(q.objects[:min(self.max_regions, num_regions - 1)]):
                labels[row, o + 1] = index.get(name, -1)
        return labels

    def num_train(self) -> int:
        return len(self.split("train")[0])

    def _batch(self, split: str, indices, given: int | None = None) -> dict:
        """The model inputs of questions ``indices``; QA->R given answer ``given`` of every question
        (default: its right answer)."""
        questions, images, texts = self.split(split)
        if texts is None or given is not None:
            texts = {i: self._sequences(questions[i], given) for i in indices}
        for i in indices:
            regions = self.dataset[images[i]].features.shape[0]
            if len(questions[i].objects) > regions:
                raise DataError(f"{questions[i].where}: the question's image has {len(questions[i].objects)} objects "
                                f"but {regions} regions in {self.dataset.dir}; its first regions must be its objects")
        rows = [option for i in indices for option in texts[i]]
        ids, mask = pad_ids([r[0] for r in rows], self.special.pad)
        types, _ = pad_ids([r[1] for r in rows], 0)
        # object o is region o + 1 (region 0: the whole image); plain words and far objects: the whole image
        tags, _ = pad_ids([[t + 1 if 0 <= t < self.max_regions else 0 for t in r[2]] for r in rows], 0)
        regions = region_batch(self.dataset, [images[i] for i in indices], self.max_regions)
        if self.family == "vilbert":
            batch = {"input_ids": ids, "token_type_ids": types, "text_mask": mask}
            batch.update(repeat_rows(regions, NUM_OPTIONS))
        else:
            shape = (len(indices), NUM_OPTIONS, ids.shape[1])
            batch = {"input_ids": ids.view(shape), "token_type_ids": types.view(shape), "text_mask": mask.view(shape),
                     "text_tags": tags.view(shape), **regions}
        batch["num_tokens"] = int(mask.sum()) + int(regions["region_mask"].sum()) * NUM_OPTIONS
        return batch

    def collate(self, keys) -> dict:
        indices = [int(index) for _, index in keys]
        questions = self.split("train")[0]
        labels = [self.label(questions[i]) for i in indices]
        if None in labels:
            raise DataError(f"{questions[indices[labels.index(None)]].where}: no label to train on")
        batch = self._batch("train", indices)
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.object_loss_weight > 0:
            batch["object_labels"] = self.object_labels([questions[i] for i in indices],
                                                        batch["region_feats"].shape[1])
        return batch

    def _forward(self, model: torch.nn.Module, batch: dict) -> dict:
        """``{"logits": [B, 4]}`` option scores (VL-BERT with ``object_labels``: also ``object_loss``)."""
        if self.family == "vilbert":
            out = model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                        batch["region_loc"], batch["region_mask"])
            return {"logits": out.option_score.view(-1, NUM_OPTIONS)}
        return model(batch["input_ids"], batch["region_feats"], batch["region_loc"][..., :4],
                     token_type_ids=batch["token_type_ids"], text_mask=batch["text_mask"],
                     text_tags=batch["text_tags"], region_mask=batch["region_mask"],
                     object_labels=batch.get("object_labels"))

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``[B, 4]`` option scores."""
        return self._forward(model, batch)["logits"]

    def loss(self, model, batch):
        """The answer loss (``answer_loss``: softmax cross-entropy over the options, or each option's
        sigmoid cross-entropy), plus ``object_loss_weight`` x VL-BERT's object classification loss
        when it is on."""
        out = self._forward(model, batch)
        logits = out["logits"].float()
        if self.answer_loss == "sigmoid":  # each option right or wrong, averaged over the B x 4 options
            ce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch["labels"], NUM_OPTIONS).to(logits.dtype))
        else:
            ce = F.cross_entropy(logits, batch["labels"])
        if "object_loss" not in out:
            return ce, {"ce": ce}
        return ce + self.object_loss_weight * out["object_loss"], {"ce": ce, "object": out["object_loss"]}

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        """Accuracy of the top-scored option and a record per question. With ``leaderboard``
        (QA->R), the rationales are scored given each of the four answers (``scores_given_answer``
        ``[4][4]``, four passes); ``prediction`` / ``scores`` are those given the right answer
        (None on an unlabelled split)."""
        self._rank = ctx.rank
        questions, _, _ = self.split(split)
        indices, real = share(len(questions), ctx.rank, ctx.world)
        rows: list = []
        for chunk in batches(indices, ctx.batch_size):
            if self.leaderboard:
                given = [self.scores(model, ctx.to_device(self._batch(split, chunk, a))).float().cpu().tolist()
                         for a in range(NUM_OPTIONS)]
                rows += [[given[a][k] for a in range(NUM_OPTIONS)] for k in range(len(chunk))]
            else:
                rows += self.scores(model, ctx.to_device(self._batch(split, chunk))).float().cpu().tolist()
        mine = [(i, r) for i, r in zip(indices[:real], rows[:real])]
        results = []
        for i, row in gather(mine, ctx):
            q = questions[i]
            record = {"annot_id": q.annot_id, "task": self.name, "label": self.label(q)}
            if self.leaderboard:
                record["scores_given_answer"] = [[round(x, 6) for x in scores] for scores in row]
                row = None if q.answer_label is None else row[q.answer_label]
            record["prediction"] = None if row is None else int(np.argmax(row))
            record["scores"] = None if row is None else [round(x, 6) for x in row]
            results.append(record)
        out = {"questions": len(results), "chance_accuracy": 100.0 / NUM_OPTIONS}
        if results and results[0]["label"] is not None:
            out[self.metric] = metrics.multiple_choice_accuracy([r["prediction"] for r in results],
                                                                [r["label"] for r in results])
        return out, {"results": results}

    def joint(self, other: list, outputs: dict, source: str) -> dict:
        """Q->AR from this evaluation's predictions and ``other`` (the other sub-task's records from
        ``source``); with ``leaderboard``, also writes the leaderboard file (:func:`write_leaderboard`)
        from the Q->A scores and this evaluation's rationale scores given each answer."""
        partner = {"q2a": "vcr_qa2r", "qa2r": "vcr_q2a"}[self.mode]
        if not isinstance(other, list) or not all(isinstance(r, dict) and {"annot_id", "prediction", "label", "task"}
                                                  <= set(r) for r in other):
            raise DataError(f"{source}: expected the records of `fastvl evaluate --task {partner} --submission` "
                            "([{annot_id, task, prediction, label, scores}, ...])")
        tasks = {r["task"] for r in other}
        if tasks != {partner}:
            raise DataError(f"{source}: --joint needs {partner} predictions to combine with {self.name}, got {sorted(tasks)}")
        answers, rationales = (outputs["results"], other) if self.mode == "q2a" else (other, outputs["results"])
        out = {}
        if self.leaderboard:
            bad = next((r for r in answers if not _scores_ok(r.get("scores"))), None)
            if bad is not None:
                raise DataError(f"{source}: annot_id {bad['annot_id']!r} has no 4 answer 'scores' (the leaderboard "
                                f"takes answer probabilities), got {bad.get('scores')!r:.80}")
            probabilities = leaderboard_probabilities({r["annot_id"]: r["scores"] for r in answers},
                                                      {r["annot_id"]: r["scores_given_answer"] for r in rationales},
                                                      [r["annot_id"] for r in rationales], source)
            if self._rank == 0:
                write_leaderboard(self.leaderboard, probabilities)
            out["leaderboard_rows"] = len(probabilities)
        if self.leaderboard and any(r["label"] is None for r in [*answers, *rationales]):
            return out  # the test split: no labels to score
        return {**out, **metrics.vcr_joint_metrics({r["annot_id"]: (r["prediction"], r["label"]) for r in answers},
                                                   {r["annot_id"]: (r["prediction"], r["label"]) for r in rationales})}


LEADERBOARD_COLUMNS = ("annot_id", *(f"answer_{k}" for k in range(NUM_OPTIONS)),
                       *(f"rationale_conditioned_on_a{a}_{k}" for a in range(NUM_OPTIONS) for k in range(NUM_OPTIONS)))


def _scores_ok(scores) -> bool:
    return (isinstance(scores, list) and len(scores) == NUM_OPTIONS
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in scores))


def _softmax(scores) -> list[float]:
    e = np.exp(np.asarray(scores, dtype=np.float64) - max(scores))
    return (e / e.sum()).tolist()


def leaderboard_probabilities(answer_scores: dict, rationale_scores: dict, order: list[str],
                              source: str = "--joint") -> list[tuple[str, list[float], list[list[float]]]]:
    """``(annot_id, answer probabilities [4], rationale probabilities given each answer [4][4])`` per
    question in ``order``: softmax over each set of 4 option scores. ``answer_scores`` ``{annot_id:
    [4]}`` (Q->A), ``rationale_scores`` ``{annot_id: [4][4]}`` (QA->R given answer 0..3)."""
    if set(answer_scores) != set(rationale_scores):
        only = sorted(set(answer_scores) ^ set(rationale_scores))
        raise DataError(f"{source}: the Q->A and QA->R predictions cover different questions ({len(only)} in one "
                        f"only, e.g. {only[0]!r}); evaluate both on the same split")
    out = []
    for annot_id in order:
        given = rationale_scores[annot_id]
        if not isinstance(given, list) or len(given) != NUM_OPTIONS or not all(_scores_ok(g) for g in given):
            raise DataError(f"annot_id {annot_id!r}: the leaderboard needs the rationale scores given each of the "
                            f"{NUM_OPTIONS} answers ([4][4]), got {given!r:.80}")
        out.append((annot_id, _softmax(answer_scores[annot_id]), [_softmax(g) for g in given]))
    return out


def write_leaderboard(path: str, rows: list[tuple[str, list[float], list[list[float]]]]) -> None:
    """The VCR leaderboard's CSV: a header, then per question ``annot_id``, ``answer_0..3`` and
    ``rationale_conditioned_on_a{i}_{j}`` (the probability of rationale j given answer i), as
    r2c's ``eval_for_leaderboard.py`` lays it out. Probabilities with 9 significant digits."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LEADERBOARD_COLUMNS)
        for annot_id, answers, given in rows:
            writer.writerow([annot_id, *(f"{p:.9g}" for p in answers), *(f"{p:.9g}" for g in given for p in g)])


class VCRAnswerTask(VCRTask):
    name = "vcr_q2a"
    mode = "q2a"
    metric = "q2a_accuracy"


class VCRRationaleTask(VCRTask):
    name = "vcr_qa2r"
    mode = "qa2r"
    metric = "qa2r_accuracy"
