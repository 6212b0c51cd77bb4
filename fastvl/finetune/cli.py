"""``fastvl finetune`` (one process, or one per device under a launcher) and
``deepspeed [--num_gpus N] --module fastvl.finetune ...`` (the same arguments).

Fine-tunes a task model from a pretraining checkpoint (``--init``: a fastvl checkpoint file, or the
DeepSpeed checkpoint directory of ``fastvl pretrain``) on a task directory (``--data``: ``task.json``
with the annotation files and the image set; ``fastvl data synth-task`` writes one). The DeepSpeed
config, precision, ZeRO stage and batch overrides are ``fastvl pretrain``'s; epochs, batch and
learning-rate schedule default to the paper preset of the (family, task) (:mod:`fastvl.finetune.presets`).
``--tasks vqa=DIR_A,retrieval=DIR_B`` trains one ViLBERT on several tasks with task tokens, 12-in-1 style
(:mod:`fastvl.finetune.multitask`; ``--task-sampling`` picks each step's task).
"""

from __future__ import annotations

import argparse

from fastvl.finetune.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvl.train.cli import add_deepspeed_arguments
    from fastvl.train.families import model_names

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=sorted(TASKS), help="the task to fine-tune on (with --data)")
    which.add_argument("--tasks", metavar="NAME=DIR,...", help="multi-task training (ViLBERT, 12-in-1 style): "
                       "one model with task tokens on several task directories, e.g. vqa=DIR_A,retrieval=DIR_B")
    parser.add_argument("--task-sampling", default="round-robin", choices=("round-robin", "proportional"),
                        help="--tasks: which task each optimizer step trains (round-robin, or drawn in proportion "
                        "to the tasks' training examples)")
    parser.add_argument("--model", default="vilbert-tiny", choices=model_names(), help="model family and size")
    parser.add_argument("--init", metavar="CKPT", help="pretrained weights: a fastvl checkpoint file or the DeepSpeed "
                        "checkpoint directory of `fastvl pretrain` (loaded weights_only); without it the encoder "
                        "starts from random weights")
    parser.add_argument("--init-config", metavar="CONFIG", help="--init is an original release (ViLBERT / VL-BERT / "
                        "ALBEF checkpoint) with this JSON or YAML config: converted on the fly (fastvl convert's rules)")
    parser.add_argument("--data", help="task directory (task.json; `fastvl data synth-task`); with --task")
    parser.add_argument("--vocab", help="WordPiece vocab.txt (default: the image set's vocab.txt)")
    parser.add_argument("--out", default="runs/finetune", help="log.jsonl, evaluations.jsonl, best.pt, checkpoints/")
    add_deepspeed_arguments(parser)
    parser.add_argument("--global-batch", type=int, help="samples per optimizer step, all ranks (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, help="samples per forward per rank (default: global / ranks)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    parser.add_argument("--warmup-steps", type=int, help="warm-up steps (default: the preset's)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="training length in epochs (default: the preset's)")
    length.add_argument("--max-steps", type=int, help="training length in optimizer steps")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this global step")
    parser.add_argument("--eval-every", type=int, help="evaluate on the validation split every N steps "
                        "(default: every epoch) and at the end")
    parser.add_argument("--eval-batch", type=int, default=64, help="examples per evaluation forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-text-len", type=int, help="text tokens (default: the preset's)")
    parser.add_argument("--max-regions", type=int, default=36, help="real regions per image (plus IMG)")
    parser.add_argument("--min-answer-count", type=int, default=9, help="VQA: answers that are the top answer of "
                        "fewer training questions are left out of the answer list (without task.json 'answers')")
    parser.add_argument("--k-test", type=int, help="ALBEF retrieval: ITM re-ranks each query's top k ITC candidates "
                        "(default 128; ALBEF uses 256 on COCO)")
    parser.add_argument("--boxes", choices=("detected", "gt"), help="refcoco: regions of the detected proposals "
                        "(default; training adds task.json's gt_images) or of the ground-truth boxes")
    parser.add_argument("--trust-pickle", action="store_true", help="refcoco / grounding: read REFER's refs(unc).p "
                        "(or convert it to JSON with python -m fastvl.data.refer); retrieval: a .pkl hard_negatives "
                        "file. A pickle can run code: only for a file you trust")
    add_gradcam_options(parser)
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, help="nlvr2 / snli_ve, ALBEF: momentum "
                        "distillation (ALBEF's distill: True, the default; --no-distill trains with plain "
                        "cross-entropy)")
    parser.add_argument("--object-loss-weight", type=float, help="vcr_q2a / vcr_qa2r, VL-BERT: weight of the "
                        "auxiliary object classification loss on the regions' final states (the original's "
                        "CNN_LOSS_WEIGHT; default 1.0, 0 turns it off)")
    parser.add_argument("--answer-loss", choices=("softmax", "sigmoid"), help="vcr_q2a / vcr_qa2r: softmax "
                        "cross-entropy over the 4 options (default) or each option's sigmoid (VL-BERT's "
                        "CLASSIFIER_SIGMOID)")
    parser.add_argument("--dropout", type=float, help="override the model's dropout probabilities")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at every "
                        "evaluation point)")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if OUT/checkpoints has one")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import sys

    from fastvl.finetune.engine import finetune
    from fastvl.train.cli import leaves_process_group

    if (args.data is None) == (args.tasks is None):
        print("fastvl finetune: --task takes --data DIR; --tasks NAME=DIR,... names the directories itself",
              file=sys.stderr)
        return 2
    with leaves_process_group():
        return finetune(args)


def add_gradcam_options(parser: argparse.ArgumentParser) -> None:
    """The grounding task's Grad-CAM options (``fastvl finetune`` and ``fastvl evaluate``)."""
    parser.add_argument("--gradcam", choices=("itm", "itc"), help="grounding: Grad-CAM of the ITM score on the "
                        "fusion's cross-attention (default; ALBEF_itm) or of the ITC similarity on the image encoder's "
                        "self-attention (ALBEF_itc)")
    parser.add_argument("--gradcam-block", type=int, help="grounding: the layer Grad-CAM reads: with itm a text-encoder "
                        "fusion layer (ALBEF: 8; default min(8, last layer)), with itc an image-encoder block "
                        "(default the last)")
