"""What NLVR2, SNLI-VE and ALBEF's text assignment share: an example is a text, one or two images and
a class; the metric is accuracy.

Batches per family (:meth:`PairClassificationTask.batch`):

* ViLBERT, one image: ``[CLS] text [SEP]`` with the image's regions (IMG region first).
* ViLBERT, two images (NLVR2): every example is two rows, ``(text, left)`` then ``(text, right)``, so
  rows 2k and 2k + 1 are example k; :class:`~fastvl.models.vilbert.ViLBERTForTasks` concatenates their
  fused vectors (``nlvr2 [B, 2]``), as vilbert-multi-task's NLVR2 model.
* ALBEF: ``[CLS] text`` and the pixels (``images``, or ``images0`` / ``images1`` for two images).

Loss: ViLBERT as vilbert-multi-task (``BCEWithLogitLoss`` on the one-hot target, mean x classes);
ALBEF softmax cross-entropy with momentum distillation (its ``model_nlvr.py`` / ``model_ve.py`` with
``distill: True``, the default here; ``distill=False`` for plain CE): a momentum copy of the model (EMA,
``momentum`` 0.995, moved once per optimizer step) gives soft targets, loss ``(1 - alpha) CE + alpha
soft-CE`` with alpha 0.4 (NLVR2 ramps it in over the first epoch, ``warm_up: True``; SNLI-VE does not).
**Difference**: the momentum copies start as copies of the ``--init`` weights (ALBEF's fine-tuning
loads a pretraining checkpoint's own momentum encoders into them). Text assignment (``nlvr2_ta``)
trains with plain CE, as ALBEF's ``Pretrain_nlvr.py``.

Evaluation: the argmax class of every labelled example (split over the ranks, gathered): ``accuracy``
(percent), per-class accuracy, and ``majority_accuracy`` (always answering the split's most common
class, the chance level to beat); the outputs are ``{id, prediction}`` records of every example.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from fastvl.data.format import DataError
from fastvl.data.tasks import ImageLookup
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import albef_step_inputs, num_tokens, pixel_batch, region_batch, text_batch

MOMENTUM_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "cls_head_m.")


def momentum_copies_of_online(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with every momentum parameter of ``model`` (``visual_encoder_m.*`` ...) set to its online
    counterpart's value in ``state``, so distillation starts from the initial weights; where ``state`` has
    no counterpart (a new head) the momentum parameter is left out, and keeps the model's copy of its
    online one."""
    out = {k: v for k, v in state.items() if not k.startswith(MOMENTUM_PREFIXES)}
    for key in model.state_dict():
        if key.startswith(MOMENTUM_PREFIXES):
            online = key.replace("_m.", ".", 1)
            if online in state:
                out[key] = state[online]
    return out


def fusion_layers_for_two_images(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An ALBEF one-image state dict (pretraining, retrieval, SNLI-VE) for a two-image model: fusion
    layer i becomes layers 2i and 2i + 1 (one per image; their cross-attention key / value are one
    tensor), as ALBEF's ``Pretrain_nlvr.py`` replicates the pretrained blocks. A state that already has
    the two-image layout is returned as is."""
    prefix = "text_encoder.fusion_layers."
    wanted = {int(k[len(prefix):].split(".")[0]) for k in model.state_dict() if k.startswith(prefix)}
    have = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not have or have == wanted or len(have) * 2 != len(wanted):
        return state
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            for copy in (2 * int(index), 2 * int(index) + 1):
                out[f"{prefix}{copy}.{rest}"] = value
    return out


class PairClassificationTask(Task):
    """A classification task over ``(text, images, label)`` examples; subclasses read a split's examples
    (:meth:`read_split`, cached by :meth:`split`) and give one (:meth:`example`)."""

    metric = "accuracy"
    num_images = 1
    class_names: tuple[str, ...] = ()
    vilbert_head = ""  # the ViLBERTTaskOutput field of the logits
    split_role = ""  # the task.json key of a split's annotation file
    image_lookup = ImageLookup  # how an annotation's image key finds its dataset index
    distills = False  # ALBEF's fine-tuning distils from a momentum model (distill: True in its config)
    alpha_warm_up = False  # the distillation weight ramps in over the first epoch (ALBEF's warm_up)
    options = ("distill",)

    def __init__(self, task_dir, family, dataset, special, *, state=None, distill: bool | None = None, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        self.distill = family == "albef" and self.distills and distill is not False
        if distill and not self.distill:
            raise ValueError(f"distill=True: {self.name} for {family} has no momentum distillation")
        self.objectives = ("bce",) if family == "vilbert" else ("ce", "soft_ce") if self.distill else ("ce",)
        self.has_step_inputs = self.distill
        self.lookup = self.image_lookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}

    def split(self, name: str):
        """The cached :meth:`read_split` of ``name``: a tuple whose first item holds the examples."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            if self.split_role not in files:
                raise DataError(f"{self.name} split {name!r} needs a {self.split_role!r} file, got {sorted(files)}")
            self._splits[name] = self.read_split(name, files[self.split_role])
        return self._splits[name]

    # what a subclass provides -----------------------------------------------------------------------

    def read_split(self, name: str, path: str) -> tuple:
        """``(examples, images, word pieces)`` of split ``name`` read from ``path``."""
        raise NotImplementedError

    def split_size(self, split: str) -> int:
        """Examples of ``split`` (the labelled ones of train)."""
        return len(self.split(split)[0])

    def example(self, split: str, index: int, epoch: int | None = None) -> tuple[np.ndarray, tuple[int, ...], int | None, str]:
        """``(word pieces, dataset indices of the images, label or None, id)`` of example ``index``;
        ``epoch`` is the training epoch (None when evaluating), for tasks that draw examples."""
        raise NotImplementedError

    # shared -----------------------------------------------------------------------------------------

    @staticmethod
    def labelled(examples: list, path: str, what: str, train: bool) -> list:
        """Train keeps the labelled examples (and needs one); other splits keep every example."""
        if not train:
            return examples
        examples = [e for e in examples if e.label is not None]
        if not examples:
            raise DataError(f"{path}: no labelled {what} to train on")
        return examples

    def init_state(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.family == "albef" and self.num_images == 2:
            state = fusion_layers_for_two_images(state, model)
        return momentum_copies_of_online(state, model) if self.distill else state

    def step_inputs(self, micro, sampler) -> dict:
        return albef_step_inputs(micro, sampler)

    def albef_model(self, config, num_classes: int) -> torch.nn.Module:
        from fastvl.models.albef import ALBEFClassifier

        return ALBEFClassifier(config, num_classes=num_classes, num_images=self.num_images, distill=self.distill)

    def num_train(self) -> int:
        return self.split_size("train")

    def batch(self, examples: list) -> dict:
        pieces = [e[0] for e in examples]
        images = [e[1] for e in examples]
        if self.family == "vilbert":
            if self.num_images == 2:  # rows (text, left), (text, right) per example
                pieces = [p for p in pieces for _ in range(2)]
            batch = text_batch(pieces, self.special, self.family, self.max_text_len)
            batch.update(region_batch(self.dataset, [i for pair in images for i in pair], self.max_regions))
        else:
            batch = text_batch(pieces, self.special, self.family, self.max_text_len)
            if self.num_images == 2:
                batch["images0"] = pixel_batch(self.dataset, [pair[0] for pair in images])
                batch["images1"] = pixel_batch(self.dataset, [pair[1] for pair in images])
            else:
                batch["images"] = pixel_batch(self.dataset, [pair[0] for pair in images])
        return batch

    def collate(self, keys) -> dict:
        examples = [self.example("train", int(index), int(epoch)) for epoch, index in keys]
        batch = self.batch(examples)
        batch["labels"] = torch.tensor([e[2] for e in examples], dtype=torch.long)
        batch["num_tokens"] = num_tokens(batch)
        return batch

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if self.family == "vilbert":
            out = model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                        batch["region_loc"], batch["region_mask"])
            return getattr(out, self.vilbert_head)
        images = (batch["images0"], batch["images1"]) if self.num_images == 2 else batch["images"]
        return model(images, batch["input_ids"], batch["text_mask"])["logits"]

    def loss(self, model, batch):
        labels = batch["labels"]
        logits = None if self.distill else self.logits(model, batch)
        if self.family == "vilbert":
            target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
            loss = F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]
            return loss, {"bce": loss}
        if self.distill:
            alpha = model.config.alpha * (batch.get("alpha_scale", 1.0) if self.alpha_warm_up else 1.0)
            images = (batch["images0"], batch["images1"]) if self.num_images == 2 else batch["images"]
            out = model(images, batch["input_ids"], batch["text_mask"], labels, alpha=alpha,
                        momentum_step=batch.get("first_micro_step", True))
            return out["loss"], out["losses"]
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"ce": loss}

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        indices, real = share(self.split_size(split), ctx.rank, ctx.world)
        predicted: list[int] = []
        for chunk in batches(indices, ctx.batch_size):
            logits = self.logits(model, ctx.to_device(self.batch([self.example(split, i) for i in chunk])))
            predicted += logits.argmax(dim=1).tolist()
        mine = [(i, p) for i, p in zip(indices[:real], predicted[:real])]
        everything = gather(mine, ctx)
        examples = [self.example(split, i) for i, _ in everything]
        results = [{"id": e[3], "prediction": self.class_names[p]} for e, (_, p) in zip(examples, everything)]
        pairs = [(e[2], p) for e, (_, p) in zip(examples, everything) if e[2] is not None]
        out: dict = {"examples": len(results), "labelled": len(pairs)}
        if pairs:
            labels = np.array([label for label, _ in pairs])
            right = np.array([label == p for label, p in pairs])
            out["accuracy"] = 100.0 * float(right.mean())
            counts = Counter(labels.tolist())
            out["majority_accuracy"] = 100.0 * max(counts.values()) / len(pairs)
            for index, name in enumerate(self.class_names):
                if counts.get(index):
                    out[f"accuracy_{name}"] = 100.0 * float(right[labels == index].mean())
        return out, {"results": results}
