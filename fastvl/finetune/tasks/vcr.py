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
  cross-entropy over the four scores (VL-BERT also fine-tunes with masked RoI classification: **not
  done here**; ViLBERT's co-attention mask of the references is not used by its model either).
* Evaluation: accuracy of the top-scored option (chance 25%); the outputs (``--submission``) are one
  record per question ``{annot_id, task, prediction, label, scores}``. The joint Q->AR
  (``fastvl evaluate --joint FILE``): a question is right only if the Q->A model's answer and the
  QA->R model's rationale both are (:func:`fastvl.finetune.metrics.vcr_joint_metrics`), FILE being the
  other model's predictions (``--submission`` of its evaluation on the same split).
"""

from __future__ import annotations

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
SEPARATOR = ("[SEP]", NO_OBJECT)  # between the question and the given answer (QA->R)


class VCRTask(Task):
    """One VCR sub-task (``mode`` ``q2a`` or ``qa2r``): the task directory's ``task.json`` says
    ``"task": "vcr"`` with a ``{"jsonl": FILE}`` per split, shared by both sub-tasks."""

    mode = ""
    data_task = "vcr"
    families = ("vilbert", "vlbert")
    objectives = ("ce",)

    def __init__(self, task_dir, family, dataset, special, *, state=None, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}
        self._pieces: dict[str, np.ndarray] = {}

    def state(self) -> dict:
        return {"mode": self.mode}

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

    def _sequences(self, q: VCRQuestion) -> list[tuple[list[int], list[int], list[int]]]:
        """``(ids, token types, object tags)`` of the question's four option texts."""
        names = object_words(q.objects)
        first = resolve(q.question, names)
        options = q.answer_choices
        if self.mode == "qa2r":
            if q.answer_label is None:
                raise DataError(f"{q.where}: QA->R gives the model the right answer, but the line has no "
                                "answer_label (score Q->A on it instead)")
            first = first + [SEPARATOR] + resolve(q.answer_choices[q.answer_label], names)
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
            texts = [self._sequences(q) for q in questions]
            self._splits[name] = (questions, images, texts)
        return self._splits[name]

    def label(self, q: VCRQuestion) -> int | None:
        return q.answer_label if self.mode == "q2a" else q.rationale_label

    def make_model(self, config) -> torch.nn.Module:
        return region_task_model(config, self.family, "VLBERTForVCR")

    def num_train(self) -> int:
        return len(self.split("train")[0])

    def _batch(self, split: str, indices) -> dict:
        questions, images, texts = self.split(split)
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
        return batch

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``[B, 4]`` option scores."""
        if self.family == "vilbert":
            out = model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                        batch["region_loc"], batch["region_mask"])
            return out.option_score.view(-1, NUM_OPTIONS)
        return model(batch["input_ids"], batch["region_feats"], batch["region_loc"][..., :4],
                     token_type_ids=batch["token_type_ids"], text_mask=batch["text_mask"],
                     text_tags=batch["text_tags"], region_mask=batch["region_mask"])["logits"]

    def loss(self, model, batch):
        loss = F.cross_entropy(self.scores(model, batch).float(), batch["labels"])
        return loss, {"ce": loss}

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        questions, _, _ = self.split(split)
        indices, real = share(len(questions), ctx.rank, ctx.world)
        rows: list[list[float]] = []
        for chunk in batches(indices, ctx.batch_size):
            rows += self.scores(model, ctx.to_device(self._batch(split, chunk))).float().cpu().tolist()
        mine = [(i, r) for i, r in zip(indices[:real], rows[:real])]
        results = []
        for i, scores in gather(mine, ctx):
            q = questions[i]
            results.append({"annot_id": q.annot_id, "task": self.name, "prediction": int(np.argmax(scores)),
                            "label": self.label(q), "scores": [round(s, 6) for s in scores]})
        out = {"questions": len(results), "chance_accuracy": 100.0 / NUM_OPTIONS}
        if results and results[0]["label"] is not None:
            out[self.metric] = metrics.multiple_choice_accuracy([r["prediction"] for r in results],
                                                                [r["label"] for r in results])
        return out, {"results": results}

    def joint(self, other: list, outputs: dict, source: str) -> dict:
        """Q->AR from this evaluation's predictions and ``other`` (the other sub-task's records from
        ``source``)."""
        partner = {"q2a": "vcr_qa2r", "qa2r": "vcr_q2a"}[self.mode]
        if not isinstance(other, list) or not all(isinstance(r, dict) and {"annot_id", "prediction", "label", "task"}
                                                  <= set(r) for r in other):
            raise DataError(f"{source}: expected the records of `fastvl evaluate --task {partner} --submission` "
                            "([{annot_id, task, prediction, label, scores}, ...])")
        tasks = {r["task"] for r in other}
        if tasks != {partner}:
            raise DataError(f"{source}: --joint needs {partner} predictions to combine with {self.name}, got {sorted(tasks)}")
        answers, rationales = (outputs["results"], other) if self.mode == "q2a" else (other, outputs["results"])
        return metrics.vcr_joint_metrics({r["annot_id"]: (r["prediction"], r["label"]) for r in answers},
                                         {r["annot_id"]: (r["prediction"], r["label"]) for r in rationales})


class VCRAnswerTask(VCRTask):
    name = "vcr_q2a"
    mode = "q2a"
    metric = "q2a_accuracy"


class VCRRationaleTask(VCRTask):
    name = "vcr_qa2r"
    mode = "qa2r"
    metric = "qa2r_accuracy"
