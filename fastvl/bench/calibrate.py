"""``fastvl bench calibrate``: measures every backend of the shape-aware ops (attention, co_attention)
at the op benchmark's shapes on this device and writes the table ``auto`` reads (see ``fastvl.dispatch``:
the table decides where it has an entry, the op's rule elsewhere).

The benchmark's inputs require grad (a training step), so only forward+backward is timed, the backends
of one shape interleaved (:func:`fastvl.bench.harness.interleaved`). A shape's entry is the first of
(the rule's choice, the reference, the rest fastest first) that no other backend beats beyond noise
(:func:`fastvl.bench.ops.clearly_faster`: the paired speed-up's 95% interval above 1 and more than the
tie margin). So where backends tie the entry is the rule's choice and does not flip between runs, and
``auto`` never picks a training path measured slower than another. Each entry's evidence (paired
speed-ups, ties) is stored next to the entries. ``--from ops.json`` builds the table from a saved
``fastvl bench ops`` run instead of measuring; ``--compare table.json`` reports how many entries agree
with another table (run calibration twice before installing one). ``--install`` also writes it where
``auto`` finds it by default (``fastvl/configs/dispatch-<device>.json``); otherwise point
``FASTVL_DISPATCH_TABLE`` at the file.
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


def rule_choice(op: dispatch.Op, device: torch.device, features: dict) -> str:
    """What ``auto`` picks without a table: the op's rule, else registration order (first usable)."""
    features = {**features, "device": device}
    names = [name for name, _ in (op.rule(**features) if op.rule else [])] + list(op.backends)
    for name in names:
        backend = op.backends.get(name)
        if backend is not None and device.type in backend.auto_devices and not backend.reasons(features):
            return name
    return REFERENCE


def best_backend(rows: dict[str, dict], rule: str) -> tuple[str, dict]:
    """{backend: its fwd+bwd row of one shape} -> (the entry, its evidence); see the module docstring."""
    fastest_first = sorted(rows, key=lambda b: rows[b]["median_ms"])
    preference = list(dict.fromkeys([rule, REFERENCE, *fastest_first]))
    beaten = {b: [o for o in rows if o != b and ops.clearly_faster(rows[o], rows[b])] for b in preference if b in rows}
    choice = next((b for b, by in beaten.items() if not by), fastest_first[0])
    reference = rows.get(REFERENCE)
    evidence = {"rule": rule, "why": ("no backend beats it beyond noise" if not beaten[choice] else
                                      "every backend beaten by another: the fastest median"),
                "ms": {b: round(r["median_ms"], 4) for b, r in rows.items()}}
    if choice != rule and rule in beaten:
        evidence["why"] = f"the rule's {rule} is beaten beyond noise by {', '.join(beaten[rule])}"
    if reference is not None:
        evidence["vs_reference"] = {b: harness.speedup(r, reference) for b, r in rows.items() if b != REFERENCE}
    return choice, evidence


def table_from_rows(rows: list[dict], size: str, device: torch.device, dtype: torch.dtype, source: str) -> dict:
    """A table from benchmark rows (``fastvl bench ops`` JSON rows of this device)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["variant"] == "auto" or row["params"].get("pass") != "fwd+bwd":
            continue
        params = {k: v for k, v in row["params"].items() if k != "pass"}
        by_case.setdefault((row["name"], json.dumps(params, sort_keys=True)), {})[row["variant"]] = row
    entries: dict[str, dict[str, str]] = {}
    evidence: dict[str, dict[str, dict]] = {}
    for case in ops.cases(size):
        op = dispatch.registered_ops()[case.op]
        measured = by_case.get((case.name, json.dumps(case.params, sort_keys=True)))
        if not op.table_key or not measured:
            continue
        features = features_of(case, device, dtype)
        key = dispatch.table_key(op, features)
        choice, why = best_backend(measured, rule_choice(op, device, features))
        entries.setdefault(case.op, {})[key] = choice
        evidence.setdefault(case.op, {})[key] = {"case": f"{case.name} {case.params}", **why}
    return {"schema": 1, "device": dispatch.device_kind(device), "source": source, "entries": entries,
            "evidence": evidence}


def agreement(table: dict, other: dict) -> tuple[int, int, list[str]]:
    """(entries with the same backend, entries in both, the keys that differ) of two tables."""
    same, both, differ = 0, 0, []
    for op_name, entries in table.get("entries", {}).items():
        for key, backend in entries.items():
            theirs = other.get("entries", {}).get(op_name, {}).get(key)
            if theirs is None:
                continue
            both += 1
            same += theirs == backend
            if theirs != backend:
                differ.append(f"{op_name} {key}: {backend} vs {theirs}")
    return same, both, differ


def measure(device: torch.device, dtype: torch.dtype, size: str, quick: bool,
            budget: harness.Budget | None = None) -> tuple[list[dict], dict]:
    """(forward+backward rows of every backend of the shape-aware ops at the benchmark's shapes, the run's
    environment)."""
    shape_aware = [name for name, op in dispatch.registered_ops().items() if op.table_key]
    results = harness.Results("calibrate", device, quick=quick)
    notes, failures = ops.run(results, size, dtype, only=shape_aware, passes=("fwd+bwd",), memory=False,
                             budget=budget)
    for line in notes + failures:
        print(f"note: {line}")
    return results.rows, results.to_json()["env"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="build the table from a saved `fastvl bench ops` JSON instead of measuring")
    parser.add_argument("--size", choices=tuple(ops.SIZES), default=None,
                        help="shapes (default: paper on GPU, small on CPU, tiny with --quick; --from: the run's)")
    parser.add_argument("--install", action="store_true",
                        help="also write the table where auto reads it by default (fastvl/configs)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="report how many entries agree with this table (e.g. an earlier calibration)")


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
        rows, env = measure(device, dtype, size, args.quick, harness.Budget.of(args.quick, args.budget_ms, device))
        source = f"fastvl bench calibrate on {env['device']}, {env['date'][:10]}"
    table = table_from_rows(rows, size, device, dtype, source)
    if args.source is None:
        table["env"] = env  # load, spread and rounds of the run the table comes from
    paths = [harness.write_json(out_dir / dispatch.default_table_path(table["device"]).name, table)]
    if args.install:
        paths.append(harness.write_json(dispatch.default_table_path(table["device"]), table))
    for op_name, entries in table["entries"].items():
        for key, backend in entries.items():
            print(f"{op_name:<14} {key:<90} -> {backend}")
    for path in paths:
        print(f"wrote {path}")
    if args.compare is not None:
        same, both, differ = agreement(table, json.loads(args.compare.read_text()))
        print(f"agreement with {args.compare}: {same} of {both} entries")
        for line in differ:
            print(f"  differs: {line}")
    return 0
