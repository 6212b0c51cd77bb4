"""The fine-tuning and evaluation engine behind ``fastvl finetune`` and ``fastvl evaluate``.

Fine-tuning presents the task to the pretraining :class:`~fastvl.train.loop.Trainer` as a model
family (objectives, model inputs, losses), so it has the same guarantees: DeepSpeed ZeRO 0-3,
bf16 / fp16 / fp32, exact resume after SIGKILL (the data order is the sampler's, every micro-batch's
randomness is seeded by its place in the run), 2 ranks == 1 rank accumulating, JSONL + TensorBoard
logs and a progress bar. The run is cut at every evaluation point (the end of each epoch, or every
``--eval-every`` steps): the Trainer runs up to it and checkpoints there, the task scores the
validation split (split over the ranks) and the result is appended to ``OUT/evaluations.jsonl``;
a better score by the task's metric replaces ``OUT/best.pt``. A run resumed at an evaluation point whose
evaluation is missing (killed in between) evaluates it first, so evaluations and the best checkpoint
are as the uninterrupted run's. Multi-task training (``--tasks``) is one composite task
(:class:`fastvl.finetune.multitask.MultiTask`) with its own sampler; the engine runs it as any other.

``best.pt`` is a fastvl task checkpoint (loadable with ``torch.load(weights_only=True)``): ``format``
``"fastvl-finetune"``, ``task``, ``model`` (``vilbert-tiny`` ...), ``config`` (the model config as a
dict), ``task_state`` (the VQA answer list ...), ``state_dict``, ``step``, ``metrics``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch

from fastvl.data.format import DataError
from fastvl.data.tasks import read_json, read_task_dir
from fastvl.finetune.parallel import EvalContext
from fastvl.finetune.presets import preset_for
from fastvl.finetune.tasks import make_task, open_images, task_class
from fastvl.finetune.tasks.common import (
    config_from_dict,
    config_to_dict,
    convert_original,
    load_pretrained,
    model_config,
    read_init_state,
)

CHECKPOINT_FORMAT = "fastvl-finetune"
BEST_FILE = "best.pt"
EVALUATIONS_FILE = "evaluations.jsonl"

log = logging.getLogger("fastvl.finetune")


class TaskModule(torch.nn.Module):
    """The module DeepSpeed trains: the task model ``net`` and the task's loss on a batch."""

    def __init__(self, task, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self._task = task  # not a module: its loss reads the batch

    def forward(self, **batch) -> dict:
        loss, losses = self._task.loss(self.net, batch)
        return {"loss": loss, "losses": losses}


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """What :class:`~fastvl.train.loop.Trainer` reads from a model family, for a task."""

    objectives: tuple[str, ...]
    step_inputs: object = None
    name: str | None = None  # recorded in checkpoints: a resumed run must be the same family and task

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def losses(out: dict) -> tuple[torch.Tensor, dict]:
        return out["loss"], out["losses"]


def resolve_model(name: str) -> tuple[str, str]:
    from fastvl.train.families import resolve

    family, variant = resolve(name)
    return family.name, variant


# checkpoints ----------------------------------------------------------------------------------------


def full_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's parameters and buffers as float32 CPU tensors on rank 0 (None elsewhere); under ZeRO-3
    every rank takes part in gathering them."""
    import torch.distributed as dist

    partitioned = any(hasattr(p, "ds_id") for p in net.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                     for k, v in net.state_dict().items()} if rank == 0 else None
        return state
    if rank != 0:
        return None
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in net.state_dict().items()}


def save_task_checkpoint(path: str, *, task: str, model: str, config, task_state: dict,
                         state_dict: dict[str, torch.Tensor], step: int, metrics: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "task": task, "model": model,
                "config": config_to_dict(config), "task_state": task_state, "state_dict": state_dict,
                "step": step, "metrics": metrics}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous best intact


def load_task_checkpoint(path: str) -> dict | None:
    """A fastvl task checkpoint file as saved by fine-tuning, or None for anything else."""
    if not os.path.isfile(path):
        return None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours (e.g. a safetensors file): the caller reads it as weights
        return None
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        return loaded
    return None


def read_evaluations(out_dir: str) -> dict[int, dict]:
    path = os.path.join(out_dir, EVALUATIONS_FILE)
    records = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    records[int(record["step"])] = record
    return records


def evaluation_points(total_steps: int, every: int) -> list[int]:
    return sorted(set(range(every, total_steps, every)) | {total_steps})


# fastvl finetune ------------------------------------------------------------------------------------


def finetune(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import deepspeed
    import torch.distributed as dist

    from fastvl.train import presets
    from fastvl.train.cli import init_distributed, load_config
    from fastvl.train.loop import LOG_FILE, Logger, Trainer, TrainingDiverged

    multitask = bool(getattr(args, "tasks", None))
    try:
        family, variant = resolve_model(args.model)
        if multitask:  # epochs, batch and schedule: the first task's preset (each task keeps its text length)
            from fastvl.finetune.multitask import parse_tasks

            preset = preset_for(family, parse_tasks(args.tasks)[0][0])
        else:
            preset = preset_for(family, args.task)
    except ValueError as error:
        print(f"fastvl finetune: {error}", file=sys.stderr)
        return 2
    from fastvl.train.checkpoint import CheckpointError
    from fastvl.train.locks import OutputDirBusy, clear_stale_build_locks, lock_output_dir

    output_lock = None
    if os.environ.get("RANK", "0") == "0":  # one run per --out, as fastvl pretrain
        try:
            output_lock = lock_output_dir(args.out)
        except (OutputDirBusy, NotADirectoryError) as error:
            print(f"fastvl finetune: {error}", file=sys.stderr)
            return 2
    clear_stale_build_locks()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch is None:
        args.global_batch = preset.global_batch
    if args.micro_batch is None:
        args.micro_batch = max(1, args.global_batch // world)
    config, precision = load_config(args, world)
    try:
        if multitask:
            from fastvl.finetune.multitask import open_multitask

            task, dataset, special = open_multitask(args, family)
        else:
            task_dir = read_task_dir(args.data, task_class(args.task).data_task or args.task)
            dataset, special = open_images(task_dir, args.vocab)
            task = make_task(args, family, dataset, special, task_dir, preset)
        num_train = task.num_train()
    except DataError as error:
        print(f"fastvl finetune: data error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"fastvl finetune: {error}", file=sys.stderr)
        return 2
    model_cfg = model_config(family, variant, dataset, special, args.dropout)
    if multitask:  # one model for every task, a task token per task
        model_cfg = dataclasses.replace(model_cfg, task_specific_tokens=True)
    global_batch = config["train_batch_size"]
    if getattr(model_cfg, "queue_size", 0) % global_batch:  # ALBEF: every step enqueues the global batch
        model_cfg = dataclasses.replace(model_cfg, queue_size=-(-model_cfg.queue_size // global_batch) * global_batch)
    torch.manual_seed(args.seed)  # identical initial heads on every rank
    net = task.make_model(model_cfg)
    init_report = None
    if args.init:
        try:
            state = (convert_original(family, args.init, args.init_config) if args.init_config else
                     read_init_state(args.init))
            init_report = load_pretrained(net, task.init_state(state, net), family, args.init)
        except (ValueError, FileNotFoundError, OSError) as error:  # ConversionError is a ValueError
            print(f"fastvl finetune: {error}", file=sys.stderr)
            return 2
    module = TaskModule(task, net)
    micro = config["train_micro_batch_size_per_gpu"]
    try:
        sampler = task.sampler(config["train_batch_size"], micro, world_size=world, rank=rank, seed=args.seed)
    except ValueError as error:
        print(f"fastvl finetune: {error}", file=sys.stderr)
        return 2
    epochs = args.epochs if args.epochs is not None else preset.epochs
    total_steps = args.max_steps or max(1, int(round(epochs * sampler.steps_per_epoch)))
    every = args.eval_every or sampler.steps_per_epoch
    optimizer_preset = preset.optimizer
    config.setdefault("gradient_clipping", optimizer_preset.gradient_clipping)
    optimizer = presets.make_optimizer(module, optimizer_preset, args.lr)
    scheduler = presets.make_scheduler(optimizer, optimizer_preset, total_steps, args.warmup_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if hasattr(net, "keep_momentum_fp32"):  # ALBEF's momentum encoders stay fp32 (fastvl.train.albef)
        net.keep_momentum_fp32()
    os.makedirs(args.out, exist_ok=True)
    family_view = TaskFamily(task.objectives, task.step_inputs if task.has_step_inputs else None,
                             name=f"{family}/{task.name}")
    del output_lock  # held (by the open file) until the process ends

    def trainer(stop_after: int | None) -> Trainer:
        return Trainer(engine, family_view, sampler, task.collate, out_dir=args.out, total_steps=total_steps,
                       seed=args.seed, precision=precision, log_every=args.log_every, save_every=args.save_every,
                       keep_checkpoints=args.keep_checkpoints, num_workers=args.num_workers,
                       progress=not args.no_progress and sys.stderr.isatty(), stop_after=stop_after,
                       label=f"finetune {args.task}")

    first = trainer(None)
    if not args.no_resume:
        try:
            first.resume()
        except CheckpointError as error:
            print(f"fastvl finetune: {error}", file=sys.stderr)
            return 2
    step = first.start_step
    logger = Logger(os.path.join(args.out, LOG_FILE), rank == 0)
    label = f"{task.name} ({args.tasks}, {args.task_sampling} sampling)" if multitask else args.task
    parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in net.parameters())
    logger.event({"event": "start", "command": "finetune", "task": task.name, "model": args.model,
                  "init": args.init, "init_report": init_report and {k: v if k != "new" else v[:50]
                                                                     for k, v in init_report.items()},
                  "parameters": parameters, "world_size": world, "precision": precision,
                  "zero_stage": config.get("zero_optimization", {}).get("stage", 0), "global_batch": sampler.global_batch,
                  "micro_batch": micro, "grad_accum": sampler.grad_accum, "total_steps": total_steps,
                  "steps_per_epoch": sampler.steps_per_epoch, "eval_every": every, "start_step": step,
                  "train_examples": num_train, "task_state_keys": sorted(task.state()), "config": config,
                  **({"tasks": {k: v for k, v in task.state().items() if k != "states"}} if multitask else {})},
                 f"finetune {label} {args.model}: {parameters / 1e6:.2f}M parameters, {num_train} training examples, "
                 f"{world} rank(s), {precision}, global batch {sampler.global_batch} = {micro} x {sampler.grad_accum} x "
                 f"{world}, steps {step} -> {total_steps}, evaluating every {every} steps"
                 + (f"; --init loaded {init_report['loaded']} tensors, {len(init_report['new'])} new" if init_report else ""))
    logger.close()
    evaluations = read_evaluations(args.out)
    best = max((r[task.metric] for r in evaluations.values()), default=float("-inf"))
    ctx = EvalContext(rank, world, engine.device, first.input_dtype, args.eval_batch)

    def evaluate_at(at: int) -> None:
        nonlocal best
        started = time.perf_counter()
        engine.eval()
        metrics, _ = task.evaluate(net, task.val_split, ctx)
        engine.train()
        record = {"step": at, "epoch": round(at / sampler.steps_per_epoch, 4), "split": task.val_split, **metrics,
                  "seconds": round(time.perf_counter() - started, 2)}
        improved = metrics[task.metric] > best
        if improved:
            best = metrics[task.metric]
            state = full_state_dict(net)
            if rank == 0:
                save_task_checkpoint(os.path.join(args.out, BEST_FILE), task=task.name, model=args.model,
                                     config=model_cfg, task_state=task.state(), state_dict=state, step=at,
                                     metrics=metrics)
        record["best"] = improved
        if rank == 0:
            with open(os.path.join(args.out, EVALUATIONS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        logger = Logger(os.path.join(args.out, LOG_FILE), rank == 0)
        shown = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        logger.event({"step": at, **shown},
                     f"evaluate step {at} ({task.val_split}): " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()
                                                                          if isinstance(v, float))
                     + (" (best so far: saved best.pt)" if improved else ""))
        logger.close()

    points = evaluation_points(total_steps, every)
    if step in points and step not in evaluations:  # killed between the checkpoint and its evaluation
        evaluate_at(step)
    stop_at = total_steps if args.stop_after is None else min(total_steps, args.stop_after)
    for point in points:
        if point <= step or step >= stop_at:
            continue
        segment = trainer(min(point, stop_at))
        segment.start_step = step
        try:
            last = segment.train()
        except TrainingDiverged as error:
            print(f"fastvl finetune: {error}", file=sys.stderr)
            return 3
        reached = int(last.get("step", step))
        if reached < min(point, stop_at):  # SIGTERM: the Trainer checkpointed and stopped
            return 0
        step = reached
        if step == point:
            evaluate_at(point)
    if rank == 0:
        print(f"fine-tuning done at step {step}; best {task.metric} = {best:.2f} "
              f"({os.path.join(args.out, BEST_FILE)})")
    return 0


# fastvl evaluate ------------------------------------------------------------------------------------


def evaluate(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch.distributed as dist

    from fastvl.bench.harness import environment
    from fastvl.finetune import multitask
    from fastvl.train.cli import init_distributed

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        init_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    checkpoint = load_task_checkpoint(args.checkpoint)
    member = checkpoint is not None and multitask.is_multitask_checkpoint(checkpoint)  # scores one of its tasks
    if checkpoint is not None:
        trained = checkpoint["task_state"]["tasks"] if member else [checkpoint["task"]]
        if args.task not in trained:
            print(f"fastvl evaluate: {args.checkpoint} is a {checkpoint['task']!r} checkpoint"
                  f"{' of ' + str(trained) if member else ''}, not {args.task!r}", file=sys.stderr)
            return 2
        model_name = checkpoint["model"]
    elif args.model is None:
        print("fastvl evaluate: --model is required for a checkpoint that is not a fine-tuned fastvl task "
              "checkpoint (e.g. a pretraining checkpoint for zero-shot retrieval)", file=sys.stderr)
        return 2
    else:
        model_name = args.model
    try:
        family, variant = resolve_model(model_name)
        preset = preset_for(family, args.task)
        task_dir = read_task_dir(args.data, task_class(args.task).data_task or args.task)
        dataset, special = open_images(task_dir, args.vocab)
        state = (multitask.member_state(checkpoint, args.task) if member else
                 checkpoint["task_state"] if checkpoint else None)
        task = make_task(args, family, dataset, special, task_dir, preset, state=state,
                         **({} if checkpoint else {"zero_shot": True}))
    except (DataError, ValueError) as error:
        print(f"fastvl evaluate: {error}", file=sys.stderr)
        return 2
    if member:  # the shared model with this task's token
        net = multitask.member_model(checkpoint, args.task, family)
    elif checkpoint:
        net = task.make_model(config_from_dict(family, checkpoint["config"]))
        net.load_state_dict(checkpoint["state_dict"])
    else:
        net = task.make_model(model_config(family, variant, dataset, special))
        try:
            state = (convert_original(family, args.checkpoint, args.checkpoint_config) if args.checkpoint_config
                     else read_init_state(args.checkpoint))
            load_pretrained(net, state, family, args.checkpoint)
        except (ValueError, FileNotFoundError, OSError) as error:
            print(f"fastvl evaluate: {error}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    net.to(device=device, dtype=dtype).eval()
    ctx = EvalContext(rank, world, device, dtype, args.eval_batch)
    started = time.perf_counter()
    try:
        metrics, outputs = task.evaluate(net, args.split, ctx)
    except DataError as error:
        print(f"fastvl evaluate: data error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "joint", None):
        try:
            metrics.update(task.joint(read_json(args.joint), outputs, args.joint))
        except (DataError, ValueError) as error:
            print(f"fastvl evaluate: --joint {args.joint}: {error}", file=sys.stderr)
            return 2
    seconds = time.perf_counter() - started
    if rank == 0:
        report = {"task": args.task, "split": args.split, "model": model_name, "checkpoint": args.checkpoint,
                  "zero_shot": checkpoint is None, "data": args.data, "world_size": world, "precision": args.precision,
                  "metrics": metrics, "seconds": round(seconds, 3), "environment": environment(device)}
        print(json.dumps(metrics, indent=1))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        if args.submission:
            if "results" not in outputs:
                print(f"fastvl evaluate: --submission is not produced by the {args.task} task", file=sys.stderr)
                return 2
            with open(args.submission, "w", encoding="utf-8") as f:
                json.dump(outputs["results"], f)
            print(f"wrote {len(outputs['results'])} answers to {args.submission}")
    return 0
