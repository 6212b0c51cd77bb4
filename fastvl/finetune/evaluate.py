"""``fastvl evaluate``: a task's metrics on a split, printed and written as JSON with the environment.

``--checkpoint`` is a fine-tuned fastvl task checkpoint (``best.pt``), or for zero-shot retrieval a
pretraining checkpoint (a DeepSpeed directory of ``fastvl pretrain`` or a fastvl state dict; ``--model``
names it). One process, or under a launcher (``deepspeed --num_gpus N --module fastvl.finetune.evaluate``
or ``torchrun``): each rank scores its share and the metrics are those of one process. For VQA
``--submission FILE`` writes the answers as the official evaluation server takes them; for VCR it writes
the predictions per question, ``--joint FILE`` combines a Q->A and a QA->R model's into Q->AR, and
``--leaderboard CSV`` (QA->R, with ``--joint``) writes the VCR leaderboard's submission file.
"""

from __future__ import annotations

import argparse
import sys

from fastvl.finetune.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvl.train.families import model_names

    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--checkpoint", required=True, help="best.pt of `fastvl finetune`, or a pretraining "
                        "checkpoint (zero-shot retrieval)")
    parser.add_argument("--model", choices=model_names(), help="the model of a pretraining checkpoint (zero-shot)")
    parser.add_argument("--checkpoint-config", metavar="CONFIG", help="--checkpoint is an original release with this "
                        "JSON or YAML config (e.g. ALBEF's mscoco.pth and its Retrieval_coco.yaml), converted on the fly")
    parser.add_argument("--data", required=True, help="task directory (task.json)")
    parser.add_argument("--split", default="val", help="split to score (val, test, ...)")
    parser.add_argument("--out", help="write the metrics JSON (with the environment) here")
    parser.add_argument("--submission", help="write the task's predictions (VQA: [{question_id, answer}], the "
                        "official result format; VCR: a record per question)")
    parser.add_argument("--joint", metavar="PREDICTIONS", help="VCR: the other sub-task's --submission file on the "
                        "same split; adds the joint Q->AR accuracy (answer and rationale both right)")
    parser.add_argument("--leaderboard", metavar="CSV", help="vcr_qa2r with --joint Q->A predictions: score the "
                        "rationales given each of the 4 answers and write the VCR leaderboard's CSV (answer "
                        "probabilities, rationale probabilities conditioned on each answer) here")
    parser.add_argument("--vocab", help="WordPiece vocab.txt (default: the image set's vocab.txt)")
    parser.add_argument("--eval-batch", type=int, default=64, help="examples (or pairs) per forward")
    parser.add_argument("--max-text-len", type=int, help="text tokens (default: the preset's)")
    parser.add_argument("--max-regions", type=int, default=36)
    parser.add_argument("--k-test", type=int, help="ALBEF retrieval: ITM re-ranks the top k ITC candidates")
    parser.add_argument("--boxes", choices=("detected", "gt"), help="refcoco: regions of the detected proposals "
                        "(default; training adds task.json's gt_images) or of the ground-truth boxes")
    parser.add_argument("--trust-pickle", action="store_true", help="refcoco / grounding: read REFER's refs(unc).p "
                        "(a pickle: only for a file you trust; or convert it to JSON with python -m fastvl.data.refer)")
    parser.add_argument("--gradcam", choices=("itm", "itc"), help="grounding: Grad-CAM of the ITM score on the "
                        "fusion's cross-attention (default; ALBEF_itm) or of the ITC similarity on the image encoder's "
                        "self-attention (ALBEF_itc)")
    parser.add_argument("--gradcam-block", type=int, help="grounding: the layer Grad-CAM reads: with itm a text-encoder "
                        "fusion layer (ALBEF: 8; default min(8, last layer)), with itc an image-encoder block "
                        "(default the last)")
    parser.add_argument("--attention-maps", metavar="DIR", help="grounding: write the Grad-CAM maps of the first "
                        "--num-maps examples as PNG images here")
    parser.add_argument("--num-maps", type=int, default=8, help="grounding: how many examples --attention-maps draws")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1 ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from fastvl.finetune.engine import evaluate

    if getattr(args, "leaderboard", None) and not (args.task == "vcr_qa2r" and args.joint):
        print("fastvl evaluate: --leaderboard is written by `--task vcr_qa2r` with the vcr_q2a predictions as --joint "
              "(their --submission file)", file=sys.stderr)
        return 2
    from fastvl.train.cli import leaves_process_group

    with leaves_process_group():
        return evaluate(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastvl.finetune.evaluate", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
