"""``fastvl convert``: original checkpoints -> fastvl (and back to the original layout).

    fastvl convert vilbert pytorch_model.bin --config bert_base_6layer_6conect.json -o vilbert.safetensors
    fastvl convert vlbert  vl-bert_base.model --config vlbert.json -o vlbert.safetensors
    fastvl convert albef   ALBEF.pth --config albef.json -o albef.safetensors
    fastvl convert hf-bert bert-base-uncased.bin --config bert_base_6layer_6conect.json -o init.safetensors
    fastvl convert vilbert vilbert.safetensors --to-original -o pytorch_model.bin

The output is a safetensors file of the fastvl state dict plus ``<output>.json`` naming the model class
and its config (``--to-original`` reads that pair back). Checkpoints load with ``weights_only=True``
(safetensors as is); ``--allow-pickle`` unpickles, for files you trust only. Conversion is strict
unless ``--no-strict``: every missing or unused key is printed by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys

import torch

from fastvl.convert.common import ConversionError, load_state_dict_file

# name -> (module, function from the original layout)
CONVERTERS = {
    "vilbert": ("fastvl.convert.vilbert", "vilbert_from_original"),
    "vlbert": ("fastvl.convert.vlbert", "vlbert_from_original"),
    "albef": ("fastvl.convert.albef", "albef_from_original"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=[*CONVERTERS, "hf-bert"],
                        help="source format; hf-bert initialises a ViLBERT text stream from Hugging Face BERT")
    parser.add_argument("checkpoint", help="the checkpoint file (.bin / .pth / .pt / .safetensors)")
    parser.add_argument("--config", help="the original config, JSON or YAML (for hf-bert: the ViLBERT config to build)")
    parser.add_argument("-o", "--output", required=True, help="output file (.safetensors; .bin with --to-original)")
    parser.add_argument("--to-original", action="store_true",
                        help="vilbert / vlbert / albef: convert a fastvl checkpoint written by this command back to the "
                             "original layout")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle checkpoints that weights_only=True refuses (only for files you trust)")
    parser.add_argument("--no-strict", action="store_true", help="load what matches and report the rest")


class UsageError(Exception):
    """An argument the command cannot use (a missing or unreadable config, an unwritable output)."""


def _read_json(path: str | None, what: str) -> dict:
    if path is None:
        raise UsageError(f"--config is required ({what})")
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith((".yaml", ".yml")):  # VL-BERT's and ALBEF's configs are YAML
                try:
                    import yaml
                except ImportError:
                    raise UsageError(f"reading {path} needs PyYAML (pip install pyyaml), or pass the config as "
                                     "JSON") from None
                try:
                    config = yaml.safe_load(handle)
                except yaml.YAMLError as error:
                    raise UsageError(f"{path}: not valid YAML ({error})") from None
            else:
                try:
                    config = json.load(handle)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}: not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON/YAML object of config fields, got {type(config).__name__}")
    return config


def _check_writable(output: str) -> None:
    folder = os.path.dirname(os.path.abspath(output))
    existing = folder
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UsageError(f"-o {output}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)
    if os.path.isdir(output):
        raise UsageError(f"-o {output} is a folder; name the output file")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"-o {output}: {existing} is not writable")


def _save_fastvl(model: torch.nn.Module, output: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # tied weights: own copies
    save_file(state, output)
    config = model.config if hasattr(model, "config") else None
    sidecar = {"class": f"{type(model).__module__}.{type(model).__name__}",
               "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
               "release": getattr(model, "release", None)}
    vqa = getattr(model, "vil_prediction", None)
    if vqa is not None:
        sidecar["num_labels"] = vqa.out.out_features
    with open(output + ".json", "w") as handle:
        json.dump(sidecar, handle, indent=1)


def _to_original(args) -> int:
    if args.model in ("vlbert", "albef"):  # rebuilt from the sidecar by the model's own converter module
        module = importlib.import_module(f"fastvl.convert.{args.model}")
        sidecar = _read_json(args.checkpoint + ".json", "the .json written next to the fastvl checkpoint")
        model = getattr(module, f"{args.model}_from_fastvl")(
            load_state_dict_file(args.checkpoint, allow_pickle=args.allow_pickle), sidecar)
        return _write_original(getattr(module, f"{args.model}_to_original")(model), args.output,
                               {"vlbert": "VL-BERT", "albef": "ALBEF"}[args.model])
    from fastvl.convert.vilbert import vilbert_to_original
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks

    if args.model != "vilbert":
        raise UsageError("--to-original supports vilbert, vlbert and albef")
    sidecar = _read_json(args.checkpoint + ".json", "the .json written next to the fastvl checkpoint")
    config = ViLBERTConfig(**sidecar["config"])
    if sidecar["class"].endswith("ViLBERTForTasks"):
        model = ViLBERTForTasks(config, num_labels=sidecar.get("num_labels", 3129), release=sidecar["release"])
    else:
        model = ViLBERTForPretraining(config)
    model.load_state_dict(load_state_dict_file(args.checkpoint, allow_pickle=args.allow_pickle))
    return _write_original(vilbert_to_original(model), args.output, "ViLBERT")


def _write_original(state: dict, output: str, name: str) -> int:
    if output.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, output)
    else:
        torch.save(state, output)
    print(f"wrote {len(state)} tensors in the original {name} layout to {output}")
    return 0


def run(args) -> int:
    """Exit 0 converted, 1 the checkpoint does not match (every key named), 2 an argument or file the
    command cannot use, or a non-strict conversion that left problems (reported)."""
    try:
        _check_writable(args.output)
        if args.to_original:
            return _to_original(args)
        return _convert(args)
    except UsageError as error:
        print(f"fastvl convert: {error}", file=sys.stderr)
        return 2
    except (ConversionError, FileNotFoundError) as error:
        print(f"fastvl convert: {error}", file=sys.stderr)
        return 1
    except (TypeError, ValueError, KeyError) as error:  # a config field the model rejects
        print(f"fastvl convert: --config {args.config}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


def _convert(args) -> int:
    try:
        state = load_state_dict_file(args.checkpoint, allow_pickle=args.allow_pickle)
        if args.model == "hf-bert":
            from fastvl.convert.hf_bert import text_stream_from_hf_bert
            from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining

            model = ViLBERTForPretraining(ViLBERTConfig.from_original(_read_json(args.config, "the ViLBERT config"), strict=False))
            report = text_stream_from_hf_bert(model, state, strict=not args.no_strict)
        else:
            module_name, function = CONVERTERS[args.model]
            convert = getattr(importlib.import_module(module_name), function)
            model, report = convert(state, _read_json(args.config, "the original config"),
                                    strict=not args.no_strict, return_report=True)
    except ConversionError as error:
        print(f"fastvl convert: {error}", file=sys.stderr)
        return 1
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    _save_fastvl(model, args.output)
    print(f"wrote {type(model).__name__} to {args.output} (+ {os.path.basename(args.output)}.json)")
    return 0 if report.ok else 2
