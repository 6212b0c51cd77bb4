"""NLVR2 (is the statement true of the image pair?) for ViLBERT and ALBEF, and ALBEF's
text-assignment pre-training step.

* ``nlvr2``: ViLBERT runs ``(text, left)`` and ``(text, right)`` as two rows and classifies their
  concatenated fused vectors with ``vil_binary_prediction`` (vilbert-multi-task's NLVR2 model); ALBEF's
  :class:`~fastvl.models.albef.ALBEFClassifier` with two images (fusion layers alternating between the
  images, their cross-attention key / value shared), 2 classes. Labels: 1 = "True", 0 = "False". An
  ALBEF ``--init`` with one-image fusion layers (a pretraining checkpoint) gets each fusion layer
  replicated for both images (:func:`~fastvl.finetune.tasks.classification.fusion_layers_for_two_images`);
  a ``nlvr2_ta`` ``best.pt`` already has the two-image layout (its ``ta_head`` is left unused, the
  ``cls_head`` starts new, as ALBEF's ``NLVR.py`` loads it).
* ``nlvr2_ta`` (ALBEF only): ALBEF's text assignment (``Pretrain_nlvr.py``), run on image-caption
  pairs before NLVR2 fine-tuning: given a caption and two images, is the caption of the first image (0),
  of the second (1), or of neither (2)? Each training caption draws, per epoch: with probability 1/3 two
  other images (class 2), else its own image and one other, its own on the left or right with equal
  odds (classes 0 / 1), as ALBEF. **Difference**: ALBEF draws the other images within the batch in
  proportion to the softmax of their ITC image similarity (harder negatives); fastvl draws them
  uniformly among the split's other images, seeded by (seed, epoch, caption), so a resumed or 2-rank run
  sees the same examples. The head is ALBEF's ``ta_head`` = Linear(H, 3). The data: ALBEF's pretraining
  JSON (``[{"image", "caption"}]``, e.g. ``coco.json``) per split (``{"albef": FILE}``); validation draws
  are fixed per caption.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastvl.data.format import DataError
from fastvl.data.pairs import ExactImageLookup, read_nlvr2
from fastvl.data.tasks import read_albef
from fastvl.finetune.tasks.classification import PairClassificationTask
from fastvl.finetune.tasks.common import tokenize
from fastvl.models.albef import ALBEFClassifier, _text_mask
from fastvl.nn import init_bert_weights
from fastvl.nn.common import on_backend


class NLVR2Task(PairClassificationTask):
    name = "nlvr2"
    families = ("vilbert", "albef")
    num_images = 2
    class_names = ("False", "True")
    vilbert_head = "nlvr2"
    split_role = "nlvr2"
    image_lookup = ExactImageLookup
    distills, alpha_warm_up = True, True  # ALBEF's NLVR.yaml: distill: True, warm_up: True

    def read_split(self, name, path):
        """``(examples, (left, right) dataset indices, word pieces)``; train keeps the labelled examples."""
        examples = self.labelled(read_nlvr2(path), path, "statement", name == "train")
        images = [tuple(self.lookup(key, f"{path}: {e.identifier}") for key in e.images) for e in examples]
        return examples, images, tokenize(self.dataset.tokenizer, [e.sentence for e in examples], self.family)

    def example(self, split, index, epoch=None):
        examples, images, pieces = self.split(split)
        return pieces[index], images[index], examples[index].label, examples[index].identifier

    def make_model(self, config) -> torch.nn.Module:
        if self.family == "vilbert":
            from fastvl.models.vilbert import ViLBERTForTasks

            return ViLBERTForTasks(config, num_labels=2)
        return self.albef_model(config, num_classes=2)


class ALBEFTextAssignment(ALBEFClassifier):
    """ALBEF's text-assignment model (``model_pretrain_nlvr.py``): the two-image fusion encoder of
    :class:`~fastvl.models.albef.ALBEFClassifier` with ``ta_head`` = Linear(H, 3) on the fusion [CLS]
    (no ``cls_head``). ``forward(images=(left, right), input_ids, attention_mask)`` -> ``{"logits"}``."""

    def __init__(self, config, backend: str | None = None):
        super().__init__(config, num_classes=3, num_images=2, backend=backend)
        del self.cls_head
        self.ta_head = nn.Linear(config.hidden_size, 3)
        init_bert_weights(self.ta_head, config.initializer_range)

    @on_backend
    def forward(self, images, input_ids, attention_mask=None, labels=None) -> dict:
        left, right = images
        attention_mask = _text_mask(input_ids, attention_mask, left.shape[0], self.config.pad_token_id)
        tokens = self.visual_encoder(torch.cat((left, right), dim=0)).split(left.shape[0])
        logits = self.ta_head(self.text_encoder(input_ids, attention_mask, list(tokens))[:, 0])
        return {"logits": logits}


class TextAssignmentTask(PairClassificationTask):
    name = "nlvr2_ta"
    families = ("albef",)
    num_images = 2
    class_names = ("first", "second", "neither")
    split_role = "albef"

    def read_split(self, name, path):
        """``(RetrievalSplit of captions, dataset index per image, caption word pieces)``."""
        pool = read_albef(path)
        if len(pool.images) < 3:
            raise DataError(f"{path}: text assignment needs at least 3 images, got {len(pool.images)}")
        images = [self.lookup(key, f"{path}: image {key!r}") for key in pool.images]
        return pool, images, tokenize(self.dataset.tokenizer, list(pool.texts), self.family)

    def split_size(self, split):
        return len(self.split(split)[0].texts)

    def example(self, split, index, epoch=None):
        pool, images, pieces = self.split(split)
        own = pool.text_image[index]
        # validation draws are fixed per caption; training draws change every epoch
        rng = np.random.default_rng((self.seed, 0 if epoch is None else epoch + 1, index, 0x7A))
        others = rng.choice(len(images) - 1, size=2, replace=False)
        others = [int(o) + (int(o) >= own) for o in others]
        if rng.random() < 1 / 3:
            label, pair = 2, (others[0], others[1])
        elif rng.random() < 0.5:
            label, pair = 0, (own, others[0])
        else:
            label, pair = 1, (others[0], own)
        return pieces[index], (images[pair[0]], images[pair[1]]), label, f"{split}-{index}"

    def make_model(self, config) -> torch.nn.Module:
        return ALBEFTextAssignment(config)
