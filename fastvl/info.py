"""``fastvl info``: versions, device, what the C++/CUDA extension contains, for each op which
backends can run here (and why the others cannot), and for the shape-aware ops auto's choice per
shape with the reason (calibration table entry, rule, or registration order)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch

from fastvl import _ext
from fastvl.dispatch import BackendUnavailableError, registered_ops

# Shapes `fastvl info` asks auto about: lengths (power-of-two buckets) x dtypes, padded with a mask,
# training (a backward follows), no dropout; head dims as ViLBERT's text (64) and image (128) streams.
CHOICE_LENGTHS = (16, 64, 128, 512)
CHOICE_DTYPES = (torch.float32, torch.bfloat16)
CHOICE_FEATURES = {
    "attention": lambda n, dtype: dict(dtype=dtype, head_dim=64, len_q=n, len_k=n, has_mask=True, dropout=False,
                                       packed=False, causal=False, grad=True),
    "co_attention": lambda n, dtype: dict(dtype=dtype, head_dim=128, len_v=n, len_t=64, has_mask=True, dropout=False,
                                          packed=False, grad=True),
}


def choices(device: torch.device) -> dict[str, list[dict]]:
    """{op: [{"shape", "dtype", "backend", "why"}]}: auto's choice for typical shapes of each shape-aware op."""
    out = {}
    for name, make in CHOICE_FEATURES.items():
        op = registered_ops()[name]
        rows = []
        for dtype in CHOICE_DTYPES:
            for n in CHOICE_LENGTHS:
                features = make(n, dtype)
                try:
                    backend, why = op.auto(device, features)
                    chosen = backend.name
                except BackendUnavailableError:
                    chosen, why = None, "no backend can run these inputs"
                shape = ", ".join(f"{k}={v}" for k, v in features.items() if k.startswith(("len_", "head_dim")))
                rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": chosen,
                             "why": why})
        out[name] = rows
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import fastvl.ops  # noqa: F401 - registers the ops

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
    info["choices"] = choices(device)
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
    print("\nauto's choice per shape (training, padded with a mask):")
    for op_name, rows in info["choices"].items():
        for row in rows:
            print(f"  {op_name:<13} {row['dtype']:<9} {row['shape']:<36} -> {row['backend'] or '-':<10} {row['why']}")
    return 0
