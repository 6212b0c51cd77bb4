"""``fastvl bench calibrate``: measures every backend of the shape-aware ops (attention, co_attention,
bias_gelu) at the op benchmark's shapes on this device and writes the table ``auto`` reads (see
``fastvl.dispatch``: the table decides where it has an entry, the op's rule elsewhere).

The benchmark's inputs require grad (a training step), so a shape's entry is the backend with the
fastest forward+backward among those not slower than the reference's (the reference itself when none
is), and ``auto`` never picks a training path slower than the reference at a measured shape. (A
forward-only timing with grad-requiring inputs is half a step: fused losses compute their gradient
there.) ``--from ops.json`` builds the table from a saved ``fastvl bench ops`` run instead of
measuring. ``--install`` also writes it where ``auto`` finds it by default
(``fastvl/configs/dispatch-<device>.json``); otherwise point ``FASTVL_DISPATCH_TABLE`` at the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastvl.ops
from fastvl import dispatch
from fastvl.bench import harness, ops

REFERENCE = "reference"


def features_of(case: ops.Case, device: torch.device, dtype: torch.dtype) -> dict:
    """The dispatch features a case's inputs have (as the op computes them), read through a listener."""
    args, kwargs, _ = case.make(device, dtype, torch.Generator().manual_seed(0))
    seen = []
    with dispatch.listen(lambda event, impl: seen.append(event)):
        getattr(fastvl.ops, case.op)(*args, **kwargs, backend=REFERENCE)
    return seen[0].features


def best_backend(times: dict[str, dict[str, float]]) -> str:
    """{backend: {pass: ms}} -> the entry (see the module docstring)."""
    kind = "fwd+bwd" if all("fwd+bwd" in t for t in times.values()) else "fwd"
    reference = times.get(REFERENCE, {}).get(kind, float("inf"))
    qualified = [b for b, t in times.items() if t[kind] <= reference] or [REFERENCE]
    return min(qualified, key=lambda b: times[b][kind])


def table_from_rows(rows: list[dict], size: str, device: torch.device, dtype: torch.dtype, source: str) -> dict:
    """A table from benchmark rows (``fastvl bench ops`` JSON rows of this device)."""
    by_case: dict[tuple, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["variant"] == "auto":
            continue
        params = {k: v for k, v in row["params"].items() if k != "pass"}
        key = (row["name"], json.dumps(params, sort_keys=True))
        by_case.setdefault(key, {}).setdefault(row["variant"], {})[row["params"]["pass"]] = row["median_ms"]
    entries: dict[str, dict[str, str]] = {}
    for case in ops.cases(size):
        op = dispatch.registered_ops()[case.op]
        times = by_case.get((case.name, json.dumps(case.params, sort_keys=True)))
        if not op.table_key or not times:
            continue
        key = dispatch.table_key(op, features_of(case, device, dtype))
        entries.setdefault(case.op, {})[key] = best_backend(times)
    return {"schema": 1, "device": dispatch.device_kind(device), "source": source, "entries": entries}


def measure(device: torch.device, dtype: torch.dtype, size: str, quick: bool) -> list[dict]:
    """Rows of every backend of the shape-aware ops at the benchmark's shapes (as ``fastvl bench ops``)."""
    shape_aware = [name for name, op in dispatch.registered_ops().items() if op.table_key]
    results = harness.Results("calibrate", device, quick=quick)
    notes, failures = ops.run(results, size, dtype, only=shape_aware)
    for line in notes + failures:
        print(f"note: {line}")
    return results.rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="build the table from a saved `fastvl bench ops` JSON instead of measuring")
    parser.add_argument("--size", choices=tuple(ops.SIZES), default=None,
                        help="shapes (default: paper on GPU, small on CPU, tiny with --quick; --from: the run's)")
    parser.add_argument("--install", action="store_true",
                        help="also write the table where auto reads it by default (fastvl/configs)")


def run(args: argparse.Namespace, device: torch.device, out_dir: Path) -> int:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.source is not None:
        document = json.loads(args.source.read_text())
        size = args.size or document["env"].get("size", "small")
        dtype = getattr(torch, document["rows"][0]["dtype"]) if document["rows"] else dtype
        rows = [r for r in document["rows"] if r["dtype"] == str(dtype).removeprefix("torch.")]
        source = f"{args.source.name} ({document['env'].get('device')}, {document['env'].get('date', '')[:10]})"
    else:
        size = args.size or ("tiny" if args.quick else "paper" if device.type == "cuda" else "small")
        rows = measure(device, dtype, size, args.quick)
        source = f"fastvl bench calibrate on {harness.environment(device)['device']}"
    table = table_from_rows(rows, size, device, dtype, source)
    paths = [harness.write_json(out_dir / dispatch.default_table_path(table["device"]).name, table)]
    if args.install:
        paths.append(harness.write_json(dispatch.default_table_path(table["device"]), table))
    for op_name, entries in table["entries"].items():
        for key, backend in entries.items():
            print(f"{op_name:<14} {key:<90} -> {backend}")
    for path in paths:
        print(f"wrote {path}")
    return 0
