"""VQA v2 for ViLBERT, VL-BERT and ALBEF's classifier form.

* Answers: the task directory's answer list (``answers`` in ``task.json``, e.g. BUTD's
  ``trainval_ans2label``), else :func:`answer_vocabulary` of the training annotations (answers that
  are the humans' most common answer of >= ``min_count`` questions, 3,129 on VQA v2 train + val).
* Targets: each question's normalised human answers with their soft score 0 / 0.3 / 0.6 / 0.9 / 1 for
  0 / 1 / 2 / 3 / >= 4 humans (BUTD's targets, which ViLBERT trains on; the official accuracy of that
  answer); answers outside the list are dropped, as BUTD drops them.
* Loss: binary cross-entropy with logits, mean x the number of answers (ViLBERT's and VL-BERT's scaling).
* Models: ViLBERT ``vil_prediction`` on the fused vector; VL-BERT's answer head at the ``[MASK]`` slot of
  ``[CLS] question [SEP] [MASK] [SEP]``; ALBEF: :class:`~fastvl.models.albef.ALBEFClassifier` over the
  answers on the fusion [CLS] (ALBEF's released VQA model ranks candidate answers with a 6-layer answer
  decoder; that decoder is **not implemented**: only this classifier form exists).
* Evaluation: the top answer per question; the official VQA accuracy and the BUTD soft score
  (:mod:`fastvl.finetune.metrics`); the outputs are the official result file's records
  ``{"question_id", "answer"}`` (the submission for the evaluation server).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from fastvl.data.format import DataError
from fastvl.data.tasks import ImageLookup, VQAQuestion, read_answer_vocabulary, read_vqa_split
from fastvl.finetune import metrics
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import image_batch, num_tokens, pad_ids, text_batch, tokenize


def answer_vocabulary(questions: list[VQAQuestion], min_count: int = 9, max_answers: int = 3129) -> list[str]:
    """BUTD's answer list: normalised answers that are the most common human answer of at least
    ``min_count`` questions, most frequent first (ties alphabetical), at most ``max_answers``."""
    counts: Counter = Counter()
    for q in questions:
        if q.answers is None:
            raise DataError(f"question_id {q.question_id} has no annotations: the answer list needs annotated "
                            "questions")
        counts[metrics.normalize_answer(Counter(q.answers).most_common(1)[0][0])] += 1
    ranked = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
    if not ranked:
        raise DataError(f"no answer is the top answer of >= {min_count} training questions; lower the threshold "
                        "or give an answer list in task.json ('answers')")
    return ranked[:max_answers]


class VQATask(Task):
    name = "vqa"
    families = ("vilbert", "vlbert", "albef")
    objectives = ("bce",)
    metric = "vqa_accuracy"

    def __init__(self, task_dir, family, dataset, special, *, state=None, min_answer_count: int = 9, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict[str, tuple[list[VQAQuestion], list[int], list[np.ndarray]]] = {}
        if state and "answers" in state:
            self.answers = list(state["answers"])
        elif task_dir.answers is not None:
            self.answers = read_answer_vocabulary(task_dir.answers)
        else:
            self.answers = answer_vocabulary(self.split("train")[0], min_answer_count)
        self.label = {a: i for i, a in enumerate(self.answers)}

    def state(self) -> dict:
        return {"answers": list(self.answers)}

    def split(self, name: str):
        """``(questions, image index per question, question word pieces)`` of a split (read once)."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            questions = read_vqa_split(files)
            where = files["questions"]
            images = [self.lookup(q.image_id, f"{where}: question_id {q.question_id}") for q in questions]
            pieces = tokenize(self.dataset.tokenizer, [q.question for q in questions], self.family)
            self._splits[name] = (questions, images, pieces)
        return self._splits[name]

    def targets(self, questions: list[VQAQuestion]) -> torch.Tensor:
        out = torch.zeros(len(questions), len(self.answers))
        for row, q in enumerate(questions):
            for answer, score in metrics.answer_scores(q.answers).items():
                if answer in self.label:
                    out[row, self.label[answer]] = score
        return out

    def make_model(self, config) -> torch.nn.Module:
        if self.family == "vilbert":
            from fastvl.models.vilbert import ViLBERTForTasks

            return ViLBERTForTasks(config, num_labels=len(self.answers), dropout=config.hidden_dropout_prob)
        if self.family == "vlbert":
            from fastvl.models.vlbert import VLBERTForVQA

            return VLBERTForVQA(config, num_answers=len(self.answers))
        from fastvl.models.albef import ALBEFClassifier

        return ALBEFClassifier(config, num_classes=len(self.answers))

    def num_train(self) -> int:
        return len(self.split("train")[0])

    def _batch(self, split: str, indices) -> dict:
        questions, images, pieces = self.split(split)
        chosen = [pieces[i] for i in indices]
        if self.family == "vlbert":  # the model lays out [CLS] q [SEP] [MASK] [SEP] itself
            question, _ = pad_ids([p[: self.max_text_len - 4] for p in chosen], self.special.pad)
            batch = {"question": question}
        else:
            batch = text_batch(chosen, self.special, self.family, self.max_text_len)
        batch.update(image_batch(self.family, self.dataset, [images[i] for i in indices], self.max_regions))
        return batch

    def collate(self, keys) -> dict:
        indices = [int(index) for _, index in keys]
        batch = self._batch("train", indices)
        batch["soft_targets"] = self.targets([self.split("train")[0][i] for i in indices])
        batch["num_tokens"] = num_tokens(batch) if "text_mask" in batch else int((batch["question"] != self.special.pad).sum())
        return batch

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if self.family == "vilbert":
            return model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                         batch["region_loc"], batch["region_mask"]).vqa
        if self.family == "vlbert":
            s = self.special
            input_ids, token_type_ids, positions = model.prepare_text(batch["question"], s.cls, s.sep, s.mask, s.pad)
            return model(input_ids, batch["region_feats"], batch["region_loc"][..., :4], positions,
                         token_type_ids=token_type_ids, text_mask=input_ids != s.pad,
                         region_mask=batch["region_mask"])["logits"]
        return model(batch["images"], batch["input_ids"], batch["text_mask"])["logits"]

    def loss(self, model, batch):
        logits = self.logits(model, batch)
        targets = batch["soft_targets"].to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        return loss, {"bce": loss}

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        questions, _, _ = self.split(split)
        indices, real = share(len(questions), ctx.rank, ctx.world)
        predicted: list[int] = []
        for chunk in batches(indices, ctx.batch_size):
            logits = self.logits(model, ctx.to_device(self._batch(split, chunk)))
            predicted += logits.argmax(dim=1).tolist()
        mine = [(questions[i].question_id, self.answers[p]) for i, p in zip(indices[:real], predicted[:real])]
        results = [{"question_id": qid, "answer": answer} for qid, answer in gather(mine, ctx)]
        out = {"questions": len(results)}
        if questions and questions[0].answers is not None:
            humans = {q.question_id: q.answers for q in questions}
            out = metrics.vqa_metrics({r["question_id"]: r["answer"] for r in results}, humans)
            # chance: the best single answer given to every question (among the 10 most common answers)
            common = Counter(metrics.normalize_answer(a) for q in questions for a in q.answers).most_common(10)
            out["constant_answer_accuracy"] = 100.0 * max(
                float(np.mean([metrics.vqa_accuracy(answer, q.answers) for q in questions])) for answer, _ in common)
            # a text-only prior: the best constant answer per question type (the first two words)
            by_type: dict[str, list[VQAQuestion]] = {}
            for q in questions:
                by_type.setdefault(" ".join(q.question.lower().split()[:2]), []).append(q)
            out["question_type_prior_accuracy"] = 100.0 * sum(
                max(sum(metrics.vqa_accuracy(answer, q.answers) for q in group) for answer, _ in
                    Counter(metrics.normalize_answer(a) for q in group for a in q.answers).most_common(10))
                for group in by_type.values()) / len(questions)
            # the best a classifier over this answer list can do (the answer list's coverage)
            out["soft_score_upper_bound"] = 100.0 * float(np.mean(
                [max([s for a, s in metrics.answer_scores(q.answers).items() if a in self.label], default=0.0)
                 for q in questions]))
        return out, {"results": results}
