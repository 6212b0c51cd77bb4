"""The task registry: a task is one module here with one :class:`Task` subclass.

A task knows its annotation reader, how it builds the family's task model, how it collates a
training micro-batch from ``(epoch, index)`` sample keys, the loss of a batch (its per-objective
parts for the log), and how it scores a split (split over the ranks, gathered). The engine
(:mod:`fastvl.finetune.engine`) does the rest: DeepSpeed, the data order, checkpoints, resumption,
per-epoch evaluation and the best checkpoint by ``Task.metric``. A new task (issue 16: RefCOCO+,
VCR, NLVR2, SNLI-VE ...) is a new module plus one line in :data:`TASKS`.
"""

from __future__ import annotations

import importlib
import os

import torch

from fastvl.data.format import VOCAB_FILE, RegionDataset
from fastvl.data.tokenizer import load_tokenizer, special_ids

# task name -> "module:class"
TASKS = {
    "vqa": "fastvl.finetune.tasks.vqa:VQATask",
    "retrieval": "fastvl.finetune.tasks.retrieval:RetrievalTask",
    "refcoco": "fastvl.finetune.tasks.refcoco:RefCOCOTask",
    "grounding": "fastvl.finetune.tasks.grounding:GroundingTask",
    "vcr_q2a": "fastvl.finetune.tasks.vcr:VCRAnswerTask",
    "vcr_qa2r": "fastvl.finetune.tasks.vcr:VCRRationaleTask",
    "nlvr2": "fastvl.finetune.tasks.nlvr2:NLVR2Task",
    "nlvr2_ta": "fastvl.finetune.tasks.nlvr2:TextAssignmentTask",
    "snli_ve": "fastvl.finetune.tasks.snli_ve:SNLIVETask",
}


class Task:
    """The interface every task implements (see the module docstring).

    ``objectives``: names of the loss parts ``loss`` returns; ``metric``: the key of
    :meth:`evaluate`'s result the best checkpoint is chosen by (higher is better); ``families``: the
    model families the task supports; ``state``: what a checkpoint must carry to rebuild the task
    (the VQA answer list).
    """

    name: str = ""
    families: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ()
    metric: str = ""
    val_split: str = "val"  # what the engine validates on at each evaluation point
    has_step_inputs: bool = False  # step_inputs adds per-step model inputs (ALBEF's place in the step)
    supports_zero_shot: bool = False  # can score a pretraining checkpoint without fine-tuning
    data_task: str = ""  # the "task" of the task.json it reads, when not its name (VCR's sub-tasks: "vcr")

    def __init__(self, task_dir, family: str, dataset, special, *, max_text_len: int, max_regions: int,
                 seed: int = 0, state: dict | None = None, zero_shot: bool = False):
        if family not in self.families:
            raise ValueError(f"task {self.name!r} supports the families {list(self.families)}, not {family!r}")
        if zero_shot and not self.supports_zero_shot:
            raise ValueError(f"task {self.name!r} needs a fine-tuned checkpoint (its head is not pretrained); "
                             "fine-tune with `fastvl finetune` first")
        self.zero_shot = zero_shot
        self.task_dir, self.family, self.dataset, self.special = task_dir, family, dataset, special
        self.max_text_len, self.max_regions, self.seed = max_text_len, max_regions, seed

    def make_model(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def init_state(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``--init``'s weights renamed for this task's model, where its layout differs (ALBEF's NLVR2
        replicates the fusion layers for two images); by default as they are."""
        return state

    def num_train(self) -> int:
        raise NotImplementedError

    def sampler(self, global_batch: int, micro_batch: int, *, world_size: int, rank: int, seed: int):
        """The training data order: a :class:`~fastvl.data.sampler.GlobalBatchSampler` over
        :meth:`num_train` (a composite task, :mod:`fastvl.finetune.multitask`, has its own)."""
        from fastvl.data.sampler import GlobalBatchSampler

        return GlobalBatchSampler(self.num_train(), global_batch, micro_batch, world_size=world_size, rank=rank,
                                  seed=seed)

    def collate(self, keys) -> dict:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def step_inputs(self, micro, sampler) -> dict:
        return {}

    def evaluate(self, model: torch.nn.Module, split: str, ctx) -> tuple[dict, dict]:
        """``(metrics, outputs)``: the split's metrics (identical on every rank) and task outputs (for
        VQA the predicted answer per question, written as the submission file)."""
        raise NotImplementedError

    def joint(self, other, outputs: dict, source: str) -> dict:
        """Metrics of this evaluation's ``outputs`` combined with another evaluation's outputs ``other``
        (read from ``source``; ``fastvl evaluate --joint``; VCR: Q->A with QA->R gives Q->AR)."""
        raise ValueError(f"the {self.name} task combines no predictions (VCR: vcr_q2a with vcr_qa2r)")


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {name!r}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def open_images(task_dir, vocab: str | None):
    tokenizer = load_tokenizer(vocab or os.path.join(task_dir.images, VOCAB_FILE))
    return RegionDataset(task_dir.images, tokenizer), special_ids(tokenizer)


def make_task(args, family: str, dataset, special, task_dir, preset, state: dict | None = None,
              name: str | None = None, **extra):
    """Task ``name`` (default ``args.task``) on ``task_dir`` with the arguments' and the preset's settings."""
    name = name or args.task
    kwargs = dict(max_text_len=args.max_text_len or preset.max_text_len, max_regions=args.max_regions,
                  seed=args.seed, state=state, **extra)
    if name == "vqa":
        kwargs["min_answer_count"] = getattr(args, "min_answer_count", 9)
    if name == "retrieval":
        kwargs["k_test"] = getattr(args, "k_test", None) or preset.k_test
    for option in getattr(task_class(name), "options", ()):  # the task's own command-line options
        if getattr(args, option, None) is not None:
            kwargs[option] = getattr(args, option)
    return task_class(name)(task_dir, family, dataset, special, **kwargs)
