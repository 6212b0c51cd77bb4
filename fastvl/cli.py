"""The ``fastvl`` command (also ``python -m fastvl``).

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args) -> int``,
and are imported only when named, so ``fastvl info`` stays fast and works without the training extras.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("fastvl.info", "versions, device, built extension parts and the live backends of every op"),
    "pretrain": ("fastvl.train.cli", "pretrain ViLBERT / VL-BERT / ALBEF (under DeepSpeed when configured)"),
    "finetune": ("fastvl.finetune.cli", "fine-tune a task model (VQA, retrieval, RefCOCO+, VCR, NLVR2, SNLI-VE, grounding; multi-task) from a pretraining checkpoint"),
    "evaluate": ("fastvl.finetune.evaluate", "score a task checkpoint on a split (metrics JSON, submission files)"),
    "data": ("fastvl.data.cli", "build, convert or synthesise region-feature datasets"),
    "convert": ("fastvl.convert.cli", "convert original ViLBERT / VL-BERT / ALBEF / HF BERT checkpoints"),
    "bench": ("fastvl.bench.cli", "throughput and memory benchmarks, fused vs reference"),
    "parity": ("fastvl.bench.parity", "layer-by-layer numerical parity of fused vs reference"),
    "embed": ("fastvl.embed", "pooled ALBEF text / image / joint embeddings of a dataset (.npy)"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl", description="fastvl: fused vision-and-language transformers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    available = _available_commands()
    for name, (module_name, help_text) in available.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # import only the module of the command that runs
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
