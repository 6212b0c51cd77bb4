"""Multi-task fine-tuning in ViLBERT's 12-in-1 style: ``fastvl finetune --tasks vqa=DIR,retrieval=DIR``.

One :class:`~fastvl.models.vilbert.ViLBERTForTasks` carries every task's head (the original's
``VILBertForVLTasks``; its answer classifier is sized by the task with an answer list, VQA) and is
trained with task tokens (``task_specific_tokens``): every forward of a task gets ``task_ids [B, 1]``
filled with the task's id in the 12-in-1 release's numbering (:data:`TASK_TOKEN_IDS`, from its
``vilbert_tasks.yml``), which the encoder embeds and splices in after [CLS].

:class:`MultiTask` is a composite :class:`~fastvl.finetune.tasks.Task`, so the engine treats the run as
one task: every optimizer step is one task's (all its micro-batches, on every rank), chosen by
:class:`MultiTaskSampler` from ``(seed, step)`` alone:

* ``round-robin`` (12-in-1's order: its loop trains the tasks' batches in turn, an optimizer step after
  each): step ``s`` is task ``s mod K``;
* ``proportional``: step ``s`` is task ``k`` with probability ``N_k / sum N`` (``N_k`` training examples),
  drawn from ``default_rng((seed, s // 4096))`` per block of 4096 steps.

Each task walks its own data as a single-task run does: task ``k``'s ``j``-th step is step ``j`` of its
own :class:`~fastvl.data.sampler.GlobalBatchSampler` (seeded with the run's seed; its own epochs). A
step's task and each task's position are functions of the global step, so a resumed run restores every
task's data position exactly. A multi-task "epoch" is ``K x`` the largest task's steps per epoch
(round-robin: the largest task's data once) or the sum of the tasks' steps per epoch (proportional: each
task's data once in expectation).

Log: per step ``{task}_{objective}`` (the step's loss when that task ran, 0 otherwise) and
``{task}_steps`` (1 when it ran, 0 otherwise) for every task, so ``window_mean[f"{t}_{o}"] /
window_mean[f"{t}_steps"]`` is task ``t``'s mean loss over the window. Evaluation scores every task on its
validation split with its own metric (keys ``{task}_{metric}``); the best checkpoint is chosen by
``mean_task_metric``, the mean of the tasks' metrics (VQA accuracy, retrieval mean recall; all in percent).
``fastvl evaluate --task vqa --checkpoint OUT/best.pt`` scores one task of a multi-task checkpoint with
that task's token.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fastvl.data.format import DataError
from fastvl.data.sampler import GlobalBatchSampler, MicroBatch
from fastvl.finetune.tasks import Task, make_task, open_images

NAME = "multitask"
SAMPLING = ("round-robin", "proportional")
# the 12-in-1 release's task ids (vilbert_tasks.yml TASK<n>: VQA 1, VCR Q-A 5 / QA-R 6, RetrievalFlickr30k 8,
# refcoco+ 10, NLVR2 12, VisualEntailment 13); tasks it does not have take the free ids from 16 on
TASK_TOKEN_IDS = {"vqa": 1, "vcr_q2a": 5, "vcr_qa2r": 6, "retrieval": 8, "refcoco": 10, "nlvr2": 12, "snli_ve": 13}
PROPORTIONAL_BLOCK = 4096


def parse_tasks(spec: str) -> list[tuple[str, str]]:
    """``"vqa=DIR_A,retrieval=DIR_B"`` -> ``[("vqa", DIR_A), ("retrieval", DIR_B)]`` (each task once)."""
    from fastvl.finetune.tasks import TASKS

    pairs = []
    for item in (part.strip() for part in spec.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--tasks takes NAME=DIR[,NAME=DIR ...], got {item!r} in {spec!r}")
        if name not in TASKS:
            raise ValueError(f"--tasks: unknown task {name!r} (tasks: {sorted(TASKS)})")
        if name in (n for n, _ in pairs):
            raise ValueError(f"--tasks names {name!r} twice")
        pairs.append((name, path))
    if len(pairs) < 2:
        raise ValueError(f"--tasks needs at least two tasks (one task: --task NAME --data DIR), got {spec!r}")
    return pairs


def task_token_ids(names: list[str]) -> dict[str, int]:
    """Task name -> token id: 12-in-1's where it has the task, else the next free id from 16."""
    ids, free = {}, iter(range(16, 10_000))
    for name in names:
        ids[name] = TASK_TOKEN_IDS.get(name) or next(free)
    return ids


class WithTaskToken:
    """The shared ViLBERT task model as one task sees it: every forward gets ``task_ids`` filled with
    ``task_id`` (rows of ``input_ids``); anything else is the model's (``.bert``, heads, ``.config``)."""

    def __init__(self, model: torch.nn.Module, task_id: int):
        self.model, self.task_id = model, task_id

    def __call__(self, *args, **kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        kwargs.setdefault("task_ids", torch.full((input_ids.shape[0], 1), self.task_id, dtype=torch.long,
                                                 device=input_ids.device))
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


# the task sampler -----------------------------------------------------------------------------------


class MultiTaskSampler:
    """Global batches of several tasks: one task per optimizer step (``sampling``), each task's batches
    from its own :class:`~fastvl.data.sampler.GlobalBatchSampler`. Presents the sampler interface the
    Trainer reads; a micro-batch's keys are ``(task index, task epoch, example index)``."""

    def __init__(self, names: list[str], sizes: list[int], global_batch: int, micro_batch: int, *,
                 world_size: int = 1, rank: int = 0, seed: int = 0, sampling: str = "round-robin"):
        if sampling not in SAMPLING:
            raise ValueError(f"--task-sampling must be one of {list(SAMPLING)}, got {sampling!r}")
        self.names, self.sizes, self.sampling, self.seed = list(names), list(sizes), sampling, seed
        self.samplers = []
        for name, size in zip(names, sizes):
            try:
                self.samplers.append(GlobalBatchSampler(size, global_batch, micro_batch, world_size=world_size,
                                                        rank=rank, seed=seed))
            except ValueError as error:
                raise ValueError(f"task {name!r}: {error}") from None
        first = self.samplers[0]
        self.global_batch, self.micro_batch, self.grad_accum = first.global_batch, first.micro_batch, first.grad_accum
        self.world_size, self.rank = world_size, rank
        per_task = [s.steps_per_epoch for s in self.samplers]
        self.steps_per_epoch = len(names) * max(per_task) if sampling == "round-robin" else sum(per_task)
        self.num_samples = sum(sizes)
        self._probabilities = np.asarray(sizes, np.float64) / sum(sizes)
        self._blocks: dict[int, np.ndarray] = {}
        self._counts_before = [np.zeros(len(names), np.int64)]  # task steps before each proportional block

    def _block(self, block: int) -> np.ndarray:
        if block not in self._blocks:
            rng = np.random.default_rng((self.seed, block, 0x7A5C))
            self._blocks[block] = rng.choice(len(self.names), size=PROPORTIONAL_BLOCK, p=self._probabilities)
        return self._blocks[block]

    def _counts(self, global_step: int) -> np.ndarray:
        """Proportional sampling: the steps each task has taken before ``global_step``."""
        block, offset = divmod(global_step, PROPORTIONAL_BLOCK)
        while len(self._counts_before) <= block:
            done = len(self._counts_before) - 1
            self._counts_before.append(self._counts_before[-1] + np.bincount(self._block(done),
                                                                             minlength=len(self.names)))
        return self._counts_before[block] + np.bincount(self._block(block)[:offset], minlength=len(self.names))

    def task_of(self, global_step: int) -> tuple[int, int]:
        """``(task index, that task's own step)`` of global step ``global_step``."""
        if self.sampling == "round-robin":
            return global_step % len(self.names), global_step // len(self.names)
        task = int(self._block(global_step // PROPORTIONAL_BLOCK)[global_step % PROPORTIONAL_BLOCK])
        return task, int(self._counts(global_step)[task])

    def task_steps(self, global_step: int) -> list[int]:
        """Steps each task has taken before global step ``global_step``."""
        count = len(self.names)
        if self.sampling == "round-robin":
            return [(global_step - k + count - 1) // count for k in range(count)]
        return [int(c) for c in self._counts(global_step)]

    def micro_batches(self, epoch: int, step: int) -> list[MicroBatch]:
        global_step = epoch * self.steps_per_epoch + step
        task, own = self.task_of(global_step)
        sampler = self.samplers[task]
        out = []
        for micro in sampler.micro_batches(*sampler.position(own)):
            out.append(MicroBatch(epoch, step, global_step, micro.micro_step, micro.chunk,
                                  [(task, e, i) for e, i in micro.keys]))
        return out

    def position(self, global_step: int) -> tuple[int, int]:
        return divmod(global_step, self.steps_per_epoch)

    def iterate(self, start_step: int, stop_step: int):
        for global_step in range(start_step, stop_step):
            yield from self.micro_batches(*self.position(global_step))

    def state_dict(self, global_step: int) -> dict:
        epoch, step = self.position(global_step)
        positions = {}
        for name, sampler, own in zip(self.names, self.samplers, self.task_steps(global_step)):
            task_epoch, task_step = sampler.position(own)
            positions[name] = {"task_steps": own, "epoch": task_epoch, "step": task_step,
                               "num_samples": sampler.num_samples}
        return {"global_step": global_step, "epoch": epoch, "step": step, "seed": self.seed,
                "global_batch": self.global_batch, "num_samples": self.num_samples, "sampling": self.sampling,
                "tasks": positions}

    def check_resumable(self, state: dict) -> None:
        for key in ("seed", "global_batch", "sampling"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, "
                                 f"this run has {getattr(self, key)}")
        saved = state.get("tasks")
        mine = {n: s for n, s in zip(self.names, self.sizes)}
        if not isinstance(saved, dict) or {n: v.get("num_samples") for n, v in saved.items()} != mine:
            have = saved and {n: v.get("num_samples") for n, v in saved.items()}
            raise ValueError(f"cannot resume the data position: the checkpoint's tasks (training examples) are "
                             f"{have}, this run's are {mine}")


# the composite task ---------------------------------------------------------------------------------


class MultiTask(Task):
    """Several ViLBERT tasks trained as one (see the module docstring). ``tasks``: the member tasks,
    built by the engine with their own directories, image sets and text lengths."""

    name = NAME
    families = ("vilbert",)
    metric = "mean_task_metric"

    def __init__(self, tasks: list[Task], *, seed: int = 0, sampling: str = "round-robin"):
        family = tasks[0].family
        if family not in self.families:
            raise ValueError(f"multi-task training supports {list(self.families)}, not {family!r}")
        if sampling not in SAMPLING:
            raise ValueError(f"--task-sampling must be one of {list(SAMPLING)}, got {sampling!r}")
        self.tasks, self.seed, self.sampling, self.family = list(tasks), seed, sampling, family
        self.names = [t.name for t in tasks]
        self.token_ids = task_token_ids(self.names)
        self.objectives = tuple(f"{t.name}_{o}" for t in tasks for o in t.objectives) + tuple(
            f"{n}_steps" for n in self.names)
        if any(t.has_step_inputs for t in tasks):
            raise ValueError("multi-task training does not take tasks with per-step inputs (ALBEF)")

    def state(self) -> dict:
        return {"tasks": list(self.names), "token_ids": dict(self.token_ids), "sampling": self.sampling,
                "train_examples": {t.name: t.num_train() for t in self.tasks},
                "states": {t.name: t.state() for t in self.tasks}}

    def make_model(self, config) -> torch.nn.Module:
        if not config.task_specific_tokens:
            raise ValueError("a multi-task model needs task_specific_tokens in its config")
        if max(self.token_ids.values()) >= config.num_task_tokens:
            raise ValueError(f"task ids {self.token_ids} need num_task_tokens > {max(self.token_ids.values())}")
        owner = next((t for t in self.tasks if "answers" in t.state()), self.tasks[0])
        return owner.make_model(config)

    def num_train(self) -> int:
        return sum(t.num_train() for t in self.tasks)

    def sampler(self, global_batch: int, micro_batch: int, *, world_size: int, rank: int, seed: int):
        return MultiTaskSampler(self.names, [t.num_train() for t in self.tasks], global_batch, micro_batch,
                                world_size=world_size, rank=rank, seed=seed, sampling=self.sampling)

    def collate(self, keys) -> dict:
        tasks = {k for k, _, _ in keys}
        if len(tasks) != 1:
            raise ValueError(f"a multi-task micro-batch holds one task's samples, got tasks {sorted(tasks)}")
        (task,) = tasks
        batch = self.tasks[task].collate([(e, i) for _, e, i in keys])
        batch["task_index"] = torch.tensor(task)
        return batch

    def loss(self, model, batch):
        index = int(batch["task_index"])
        task = self.tasks[index]
        inputs = {k: v for k, v in batch.items() if k != "task_index"}
        loss, own = task.loss(WithTaskToken(model, self.token_ids[task.name]), inputs)
        zero = torch.zeros((), device=loss.device, dtype=torch.float32)
        losses = {name: zero for name in self.objectives}
        losses.update({f"{task.name}_{o}": value for o, value in own.items() if f"{task.name}_{o}" in losses})
        losses[f"{task.name}_steps"] = torch.ones((), device=loss.device)
        return loss, losses

    def evaluate(self, model, split, ctx):
        """Every task on its own validation split (``split`` names the engine's, "val"), with its token;
        metrics ``{task}_{key}`` and ``mean_task_metric``."""
        metrics, outputs = {}, {}
        for task in self.tasks:
            own, out = task.evaluate(WithTaskToken(model, self.token_ids[task.name]), task.val_split, ctx)
            metrics.update({f"{task.name}_{k}": v for k, v in own.items()})
            outputs[task.name] = out
        metrics[self.metric] = float(np.mean([metrics[f"{t.name}_{t.metric}"] for t in self.tasks]))
        return metrics, outputs


# building it (fastvl finetune) and reading its checkpoints (fastvl evaluate) ------------------------


def open_multitask(args, family: str):
    """The :class:`MultiTask` of ``args.tasks`` (each task's directory, image set, preset text length),
    and the first task's image set and special ids (the model's vocabulary, features and classes, which
    every task's image set must share)."""
    from fastvl.data.tasks import read_task_dir
    from fastvl.finetune.presets import preset_for
    from fastvl.finetune.tasks import task_class

    members, first = [], None
    for name, path in parse_tasks(args.tasks):
        if not os.path.isdir(path):
            raise DataError(f"--tasks {name}={path}: no such directory")
        task_dir = read_task_dir(path, task_class(name).data_task or name)  # VCR: one "vcr" dir
        dataset, special = open_images(task_dir, args.vocab)
        shape = (dataset.tokenizer.get_vocab_size(), dataset.feature_dim, dataset.num_classes)
        if first is None:
            first = (dataset, special, shape, name)
        elif shape != first[2]:
            raise DataError(f"--tasks: {name}'s image set has (vocabulary, feature width, classes) {shape}, "
                            f"{first[3]}'s has {first[2]}; one model needs them equal")
        members.append(make_task(args, family, dataset, special, task_dir, preset_for(family, name), name=name))
    return MultiTask(members, seed=args.seed, sampling=args.task_sampling), first[0], first[1]


def is_multitask_checkpoint(checkpoint: dict) -> bool:
    return checkpoint.get("task") == NAME


def member_state(checkpoint: dict, name: str) -> dict:
    """The state of task ``name`` in a multi-task checkpoint (ValueError if it was not trained)."""
    state = checkpoint["task_state"]
    if name not in state["tasks"]:
        raise ValueError(f"the multi-task checkpoint was trained on {state['tasks']}, not {name!r}")
    return state["states"][name]


def member_model(checkpoint: dict, name: str, family: str) -> WithTaskToken:
    """The shared model of a multi-task checkpoint, seen with task ``name``'s token."""
    from fastvl.finetune.tasks.common import config_from_dict
    from fastvl.models.vilbert import ViLBERTForTasks

    state_dict = checkpoint["state_dict"]
    net = ViLBERTForTasks(config_from_dict(family, checkpoint["config"]),
                          num_labels=state_dict["vil_prediction.out.weight"].shape[0])
    net.load_state_dict(state_dict)
    return WithTaskToken(net, checkpoint["task_state"]["token_ids"][name])
