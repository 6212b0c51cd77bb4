"""SNLI-VE (visual entailment: does the image entail, contradict, or leave open the hypothesis?) for
ViLBERT (``vil_tri_prediction`` on the fused vector, vilbert-multi-task's SNLI-VE head) and ALBEF
(:class:`~fastvl.models.albef.ALBEFClassifier`, one image, 3 classes: Linear, ReLU, Linear on the
fusion [CLS], ALBEF's ``model_ve.py``). Classes: contradiction 0, neutral 1, entailment 2, the order
of both originals (so their released heads convert as they are); hypotheses whose gold label is
``"-"`` are left out of training and of the accuracy (their predictions are still written).
"""

from __future__ import annotations

import torch

from fastvl.data.pairs import VE_LABELS, read_snli_ve
from fastvl.finetune.tasks.classification import PairClassificationTask
from fastvl.finetune.tasks.common import tokenize


class SNLIVETask(PairClassificationTask):
    name = "snli_ve"
    families = ("vilbert", "albef")
    num_images = 1
    class_names = VE_LABELS
    vilbert_head = "snli_ve"
    split_role = "snli_ve"
    distills = True  # ALBEF's VE.yaml: distill: True, warm_up: False

    def read_split(self, name, path):
        """``(examples, dataset index per example, hypothesis word pieces)``; train keeps the labelled ones."""
        examples = self.labelled(read_snli_ve(path), path, "hypothesis", name == "train")
        images = [self.lookup(e.image, f"{path}: pairID {e.pair_id}") for e in examples]
        return examples, images, tokenize(self.dataset.tokenizer, [e.hypothesis for e in examples], self.family)

    def example(self, split, index, epoch=None):
        examples, images, pieces = self.split(split)
        return pieces[index], (images[index],), examples[index].label, examples[index].pair_id

    def make_model(self, config) -> torch.nn.Module:
        if self.family == "vilbert":
            from fastvl.models.vilbert import ViLBERTForTasks

            return ViLBERTForTasks(config, num_labels=2)
        return self.albef_model(config, num_classes=3)
