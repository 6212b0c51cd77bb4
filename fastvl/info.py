"""``fastvl info``: versions, device, what the C++/CUDA extension contains, and for each op which
backends can run here (and why the others cannot)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch

from fastvl import _ext
from fastvl.dispatch import registered_ops


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import fastvl.ops  # noqa: F401,PLC0415 - registers the ops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "fastvl": _version("fastvl"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "xformers": _version("xformers"),
        "flash_attn": _version("flash-attn"),
        "apex": _version("apex"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "extension": _ext.build_info(),
        "ops": {},
    }
    for name, op in sorted(registered_ops().items()):
        table = op.table(device, dtype=torch.float32, **op.probe)
        auto = next((b for b, reasons in table.items() if not reasons and device.type in op.backends[b].auto_devices),
                    None)
        info["ops"][name] = {"auto": auto, "backends": table}
    return info



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for key in ("fastvl", "python", "torch", "torch_cuda", "triton", "deepspeed", "xformers", "flash_attn", "apex",
                "device"):
        print(f"{key:<12} {info[key] if info[key] is not None else '-'}")
    ext = info["extension"]
    parts = ", ".join(ext["ops"]) or "none"
    print(f"{'fastvl._C':<12} {'built' if ext['built'] else 'NOT BUILT'}"
          + (f" (cuda={ext['cuda']}, openmp={ext['openmp']}; ops: {parts})" if ext["built"] else ""))
    print("\nbackends on this device (* = auto's choice for typical fp32 inputs):")
    for op_name, entry in info["ops"].items():
        table = entry["backends"]
        usable = [name + ("*" if name == entry["auto"] else "") for name, reasons in table.items() if not reasons]
        print(f"  {op_name}: " + ", ".join(usable))
        for name, reasons in table.items():
            if reasons:
                print(f"      {name}: not here ({'; '.join(reasons)})")
    return 0
