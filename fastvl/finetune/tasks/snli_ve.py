"""SNLI-VE (visual entailment: does the image entail, contradict, or leave open the hypothesis?) for
ViLBERT (``vil_tri_prediction`` on the fused vector, vilbert-multi-task's SNLI-VE head) and ALBEF
(:class:`~fastvl.models.albef.ALBEFClassifier`, one image, 3 classes: Linear, ReLU, Linear on the
fusion [CLS], ALBEF's ``model_ve.py``). Classes: contradiction 0, neutral 1, entailment 2, the order
of both originals (so their released heads convert as they are); hypotheses whose gold label is
``"-"`` are left out of training and of the accuracy (their predictions are still written).
"""

from __future__ import annotations

import torch

from fastvl.data.format import DataError
from fastvl.data.pairs import VE_LABELS, read_snli_ve
from fastvl.data.tasks import ImageLookup
from fastvl.finetune.tasks.classification import PairClassificationTask
from fastvl.finetune.tasks.common import tokenize


class SNLIVETask(PairClassificationTask):
    name = "snli_ve"
    families = ("vilbert", "albef")
    num_images = 1
    class_names = VE_LABELS
    vilbert_head = "snli_ve"

    def __init__(self, task_dir, family, dataset, special, *, state=None, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}

    def split(self, name: str):
        """``(examples, dataset index per example, hypothesis word pieces)``; train keeps the labelled ones."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            if "snli_ve" not in files:
                raise DataError(f"snli_ve split {name!r} needs a 'snli_ve' file, got {sorted(files)}")
            path = files["snli_ve"]
            examples = read_snli_ve(path)
            if name == "train":
                examples = [e for e in examples if e.label is not None]
                if not examples:
                    raise DataError(f"{path}: no labelled hypothesis to train on")
            images = [self.lookup(e.image, f"{path}: pairID {e.pair_id}") for e in examples]
            pieces = tokenize(self.dataset.tokenizer, [e.hypothesis for e in examples], self.family)
            self._splits[name] = (examples, images, pieces)
        return self._splits[name]

    def split_size(self, split):
        return len(self.split(split)[0])

    def example(self, split, index, epoch=None):
        examples, images, pieces = self.split(split)
        return pieces[index], (images[index],), examples[index].label, examples[index].pair_id

    def make_model(self, config) -> torch.nn.Module:
        if self.family == "vilbert":
            from fastvl.models.vilbert import ViLBERTForTasks

            return ViLBERTForTasks(config, num_labels=2)
        from fastvl.models.albef import ALBEFClassifier

        return ALBEFClassifier(config, num_classes=3, num_images=1)
