"""``fastvl pretrain`` (one process, or one per device under a launcher) and
``deepspeed [--num_gpus N | --hostfile H] -m fastvl.train ...`` (the same arguments).

The DeepSpeed JSON config (``--deepspeed``, default ``fastvl/configs/zero2.json``) decides ZeRO
stage, precision, batch sizes and clipping; ``--global-batch``, ``--micro-batch``, ``--zero-stage``,
``--precision`` and ``--clip`` override it. Without an ``optimizer`` / ``scheduler`` section the
model family's preset (AdamW with decoupled weight decay, warm-up then decay) is used; with one,
DeepSpeed builds what the config says.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import json
import logging
import os
import socket
import sys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """The DeepSpeed options `fastvl pretrain` and `fastvl finetune` share (read by :func:`load_config`)."""
    parser.add_argument("--deepspeed", dest="ds_config", default=os.path.join(CONFIG_DIR, "zero2.json"),
                        help="DeepSpeed JSON config (see fastvl/configs/)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="override zero_optimization.stage")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="override the config's precision")
    parser.add_argument("--clip", type=float, help="override gradient_clipping")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvl.train.families import model_names
    from fastvl.train.presets import PRESETS

    parser.add_argument("--model", default="vilbert-tiny", choices=model_names(), help="model family and size")
    parser.add_argument("--data", required=True, help="dataset directory (fastvl data synth / convert), or for "
                        "ALBEF an {image, caption} .json / .jsonl file as ALBEF's (then --vocab is required)")
    parser.add_argument("--image-root", default="", help="ALBEF image files: joined to relative image paths")
    parser.add_argument("--image-res", type=int, help="ALBEF image files: training resolution (default 256)")
    parser.add_argument("--vocab", help="WordPiece vocab.txt (default: DATA/vocab.txt)")
    parser.add_argument("--out", default="runs/pretrain", help="log.jsonl and checkpoints/ go here")
    add_deepspeed_arguments(parser)
    parser.add_argument("--global-batch", type=int, help="override train_batch_size (all ranks, all micro-steps)")
    parser.add_argument("--micro-batch", type=int, help="override train_micro_batch_size_per_gpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="optimizer/schedule preset (default: the family's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    parser.add_argument("--warmup-steps", type=int, help="warm-up steps (default: the preset's)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=10.0, help="training length in epochs (default 10)")
    length.add_argument("--max-steps", type=int, help="training length in optimizer steps")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this global step; the "
                        "schedule still spans the whole run, so a later call resumes it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-text-len", type=int, help="tokens per caption (default: the family's, 36; ALBEF 25)")
    parser.add_argument("--max-regions", type=int, default=36, help="real regions per image (plus IMG)")
    parser.add_argument("--packed", action="store_true", help="collate packed cu_seqlens batches")
    parser.add_argument("--objective", type=int, choices=(0, 1, 2), help="ViLBERT: vilbert-multi-task's objective "
                        "setting (0 = all losses on all pairs, the paper's and the default; 1 = no masked-word/region "
                        "labels on misaligned pairs; 2 = no misaligned pairs, no alignment loss)")
    parser.add_argument("--dropout", type=float, help="override the model's dropout probabilities")
    parser.add_argument("--init-text-from", metavar="CKPT", help="initialise the text stream from a Hugging Face "
                        "BERT checkpoint (.safetensors or .bin, loaded weights_only; its vocab.txt must be --vocab)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations in "
                        "the backward pass (less memory, ~30%% more compute)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (forward, losses and "
                        "backward): mode 'reduce-overhead' on CUDA (CUDA graphs: least host time per step), the "
                        "default mode elsewhere; the first steps pay the compilation")
    parser.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if OUT/checkpoints has one")
    parser.add_argument("--trust-checkpoint", action="store_true", help="resume from checkpoint files that need "
                        "full pickle (can run code: only for folders your own runs wrote); by default every file is "
                        "loaded weights_only with DeepSpeed's few types allowed, and others are refused")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    parser.add_argument("--strict-data", action="store_true", help="fail on records that would be skipped")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace, world_size: int) -> tuple[dict, str]:
    """The DeepSpeed config with the command line's overrides applied, and its precision."""
    with open(args.ds_config, encoding="utf-8") as f:
        config = json.load(f)
    config = copy.deepcopy(config)
    if args.global_batch is not None or args.micro_batch is not None:
        global_batch = args.global_batch or config.get("train_batch_size")
        micro = args.micro_batch or config.get("train_micro_batch_size_per_gpu")
        if global_batch is None or micro is None:
            raise ValueError("give both --global-batch and --micro-batch, or set both in the config")
        config["train_batch_size"], config["train_micro_batch_size_per_gpu"] = global_batch, micro
        config.pop("gradient_accumulation_steps", None)
    if "train_batch_size" not in config:
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                      * config.get("gradient_accumulation_steps", 1) * world_size)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.clip is not None:
        config["gradient_clipping"] = args.clip
    precision = ("bf16" if config.get("bf16", {}).get("enabled") else
                 "fp16" if config.get("fp16", {}).get("enabled") else "fp32")
    if args.precision is not None:
        precision = args.precision
        config.setdefault("bf16", {})["enabled"] = precision == "bf16"
        config.setdefault("fp16", {})["enabled"] = precision == "fp16"
    if precision == "fp16":
        config["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
    config.setdefault("steps_per_print", 10**9)  # fastvl logs itself
    return config, precision


def compile_mode(device_type: str) -> str:
    """``--compile``'s torch.compile mode: CUDA graphs on CUDA (a VL step is host-bound: many tiny
    kernels), inductor's default elsewhere."""
    return "reduce-overhead" if device_type == "cuda" else "default"


def init_distributed() -> None:
    """Joins the launcher's process group; a plain single process becomes rank 0 of 1."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False)


@contextlib.contextmanager
def leaves_process_group():
    """Leaves the process group a command joined when it ends, so that the group's communication threads
    stop before the interpreter does (a rank exiting with them alive can abort with "terminate called
    without an active exception" after its work is done). A group that existed before is left alone."""
    import torch.distributed as dist

    joined_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class UsageError(Exception):
    """A run that cannot start or continue as asked (arguments, data, checkpoint, a busy or full output
    folder): ``run`` prints the message and exits 2."""


@dataclasses.dataclass
class Run:
    """A built run: the trainer over its DeepSpeed engine, and what the start record reports."""

    trainer: object  # fastvl.train.loop.Trainer
    model_name: str
    config: dict
    precision: str
    total_steps: int
    records: int
    skipped_records: dict
    parameters: int
    output_lock: object  # fastvl.train.locks.OutputLock on rank 0, else None

    def log_start(self) -> None:
        trainer, sampler = self.trainer, self.trainer.sampler
        stage = self.config.get("zero_optimization", {}).get("stage", 0)
        trainer.logger.event(
            {"event": "start", "model": self.model_name, "parameters": self.parameters,
             "world_size": trainer.world_size, "precision": self.precision, "zero_stage": stage,
             "global_batch": sampler.global_batch, "micro_batch": sampler.micro_batch,
             "grad_accum": sampler.grad_accum, "total_steps": self.total_steps, "start_step": trainer.start_step,
             "records": self.records, "skipped_records": self.skipped_records, "config": self.config},
            f"pretrain {self.model_name}: {self.parameters / 1e6:.1f}M parameters, {trainer.world_size} rank(s), "
            f"{self.precision}, ZeRO {stage}, global batch {sampler.global_batch} = {sampler.micro_batch} x "
            f"{sampler.grad_accum} x {trainer.world_size}, {self.records} records "
            f"({sum(self.skipped_records.values())} skipped), steps {trainer.start_step} -> {self.total_steps}")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def build(args: argparse.Namespace) -> Run:
    """Everything before the first step: the output folder's lock, the process group, config, data,
    collator, model, DeepSpeed engine and trainer. Raises :class:`UsageError` for what the user can fix."""
    from fastvl.train.locks import OutputDirBusy, clear_stale_build_locks, lock_output_dir

    output_lock = None
    if _is_rank_zero():  # first, before the process group: a refused second run's other ranks write nothing
        try:
            output_lock = lock_output_dir(args.out)
        except (OutputDirBusy, NotADirectoryError) as error:
            raise UsageError(str(error)) from None
    import deepspeed
    import torch
    import torch.distributed as dist

    from fastvl.convert.common import ConversionError
    from fastvl.data.format import VOCAB_FILE, DataError
    from fastvl.data.sampler import GlobalBatchSampler
    from fastvl.data.tokenizer import load_tokenizer, special_ids
    from fastvl.profiling import nvtx_layer_ranges
    from fastvl.train import families, presets
    from fastvl.train.loop import Trainer

    clear_stale_build_locks()  # DeepSpeed builds / loads its CPU shared-memory op below
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    family, variant = families.resolve(args.model)
    try:
        config, precision = load_config(args, world_size)
    except OSError as error:
        raise UsageError(f"--deepspeed {args.ds_config}: {error.strerror or error}") from None
    except ValueError as error:  # bad JSON or contradictory batch options
        raise UsageError(f"--deepspeed {args.ds_config}: {error}") from None
    try:
        tokenizer = load_tokenizer(args.vocab or os.path.join(args.data, VOCAB_FILE))
        dataset = families.open_dataset(family, args.data, tokenizer, strict=args.strict_data,
                                        image_root=args.image_root, image_res=args.image_res, seed=args.seed)
    except DataError as error:
        raise UsageError(f"data error: {error}") from None
    micro = config["train_micro_batch_size_per_gpu"]
    try:
        sampler = GlobalBatchSampler(len(dataset), config["train_batch_size"], micro, world_size=world_size,
                                     rank=rank, seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    total_steps = args.max_steps or max(1, int(args.epochs * sampler.steps_per_epoch))
    try:
        collator = family.make_collator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), seed=args.seed,
                                        packed=args.packed, max_text_len=args.max_text_len or family.max_text_len,
                                        max_regions=args.max_regions, objective=args.objective)
    except DataError as error:  # e.g. a model that reads pixels on a set without them
        raise UsageError(f"data error: {error}") from None
    except ValueError as error:  # an option the family cannot honour (e.g. --packed for ALBEF)
        raise UsageError(str(error)) from None
    options = families.ModelOptions(vocab_size=tokenizer.get_vocab_size(), num_classes=dataset.num_classes,
                                    feature_dim=dataset.feature_dim, dropout=args.dropout,
                                    activation_checkpointing=args.activation_checkpointing,
                                    image_size=dataset.pixel_size, global_batch=sampler.global_batch,
                                    special=special_ids(tokenizer))
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    try:
        model = family.make_model(variant, options)
    except ValueError as error:  # a dataset the model cannot read (e.g. non-square pixels for ALBEF)
        raise UsageError(str(error)) from None
    if args.init_text_from:
        if family.init_text is None:
            raise UsageError(f"--init-text-from is not supported for {family.name}")
        try:
            family.init_text(model, args.init_text_from)  # a resumed checkpoint overrides it
        except (ConversionError, FileNotFoundError) as error:
            raise UsageError(f"--init-text-from {args.init_text_from}: {error}") from None
        if rank == 0:
            print(f"text stream initialised from {args.init_text_from}")
    preset = presets.PRESETS[args.preset or family.preset]
    config.setdefault("gradient_clipping", preset.gradient_clipping)
    nvtx_layer_ranges(model)  # on CUDA: one NVTX range per layer forward (data/forward/backward/step too)
    optimizer = scheduler = None
    if "optimizer" not in config:
        optimizer = presets.make_optimizer(model, preset, args.lr)
    if "scheduler" not in config:
        if optimizer is None:
            raise UsageError(f"--deepspeed {args.ds_config}: a config with an 'optimizer' section needs a "
                             "'scheduler' section too")
        scheduler = presets.make_scheduler(optimizer, preset, total_steps, args.warmup_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           model_parameters=None if optimizer else
                                           presets.param_groups(model, preset.weight_decay))
    if family.after_initialize is not None:
        family.after_initialize(engine.module)
    if args.compile:
        mode = compile_mode(torch.device(engine.device).type)
        engine.compile(compile_kwargs={"mode": mode})
        if rank == 0:
            print(f"model compiled with torch.compile (mode {mode!r}); the first steps compile it")
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(engine, family, sampler, collator, out_dir=args.out, total_steps=total_steps, seed=args.seed,
                      precision=precision, log_every=args.log_every, save_every=args.save_every,
                      keep_checkpoints=args.keep_checkpoints, num_workers=args.num_workers,
                      progress=not args.no_progress and sys.stderr.isatty(), stop_after=args.stop_after)
    parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return Run(trainer, args.model, config, precision, total_steps, len(dataset), dataset.skipped, parameters,
               output_lock)


def run(args: argparse.Namespace) -> int:
    """``fastvl pretrain``: build, resume, train. Exit 0 done, 2 with a message for what the user can
    fix (see :class:`UsageError`), 3 when the loss diverged."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from fastvl.data.format import DataError
    from fastvl.train.checkpoint import CheckpointError
    from fastvl.train.loop import TrainingDiverged

    try:
        built = build(args)
        trainer = built.trainer
        if not args.no_resume:
            trainer.resume(trust=args.trust_checkpoint)
        built.log_start()
        if trainer.start_step >= built.total_steps:
            print(f"nothing to do: the checkpoint in {args.out} is at step {trainer.start_step} of {built.total_steps}")
            return 0
        trainer.train()
    except (UsageError, CheckpointError) as error:
        print(f"fastvl pretrain: {error}", file=sys.stderr)
        return 2
    except DataError as error:  # a shard found damaged while training reads it
        print(f"fastvl pretrain: data error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"fastvl pretrain: {error}", file=sys.stderr)
        return 3
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"fastvl pretrain: no space left on device ({error.filename or args.out}); free space and run the "
              "same command again to resume", file=sys.stderr)
        return 2
    return 0
