"""``fastvl bench``: throughput and memory benchmarks, fused vs reference.

``fastvl bench ops [--quick]``
    The op-level suite (:mod:`fastvl.bench.ops`: every op of ``fastvl.ops`` with every backend here) and
    every ``benchmarks/bench_*.py`` module of the checkout (see ``_run_module`` for the two conventions).
``fastvl bench model --model vilbert-base``
    Whole-model pretraining steps (forward + backward + optimizer), fused backends vs
    ``backend="reference"``, with the largest batch that fits (:mod:`fastvl.bench.model`).
``fastvl bench profile --model vilbert-base``
    torch.profiler over one fused training step; saves the top kernels by time.
``fastvl bench host [--model vilbert-base]``
    Host microseconds per op call (Triton launches stubbed) against the eager path, and device launches
    per op and per training step, fused vs reference (:mod:`fastvl.bench.host`).
``fastvl bench calibrate [--from ops.json] [--install]``
    Every backend of the shape-aware ops per shape: the dispatch table ``auto`` reads
    (:mod:`fastvl.bench.calibrate`).

The backends of one shape are timed interleaved, round by round, and compared per round (paired
speed-ups with a 95% interval; "~" in the table: within noise); see :mod:`fastvl.bench.harness`.
Both print a table and write JSON (device, versions, commit, date) and PNG plots under ``--out``
(default ``benchmarks/results/<date>-<device>/``). Sizes default to the papers' on GPU and small on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from pathlib import Path

import torch

from fastvl.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BENCHMARKS_DIR = harness.REPO_ROOT / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    ops = modes.add_parser("ops", help="op-level suite: every op and backend, plus benchmarks/bench_*.py")
    model = modes.add_parser("model", help="model-level training throughput, fused vs reference")
    profile = modes.add_parser("profile", help="torch.profiler of one fused training step: the top kernels")
    calibrate = modes.add_parser("calibrate", help="measure every backend per shape: the table auto reads")
    host = modes.add_parser("host", help="host us per op call and launches per op and training step")
    retrieval = modes.add_parser("retrieval", help="retrieval evaluation pairs/s, fused vs reference, text cache")
    for sub in (ops, model, profile, calibrate, host, retrieval):
        sub.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        sub.add_argument("--out", type=Path, default=None,
                         help="result folder (default: benchmarks/results/<date>-<device>/)")
        sub.add_argument("--quick", action="store_true", help="tiny shapes and short timing budgets (CI)")
        sub.add_argument("--no-plots", action="store_true", help="JSON and table only")
        sub.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
        sub.add_argument("--note", default=None, help="a remark stored with the results (e.g. machine load)")
    ops.add_argument("--size", choices=("tiny", "small", "paper"), default=None,
                     help="shapes (default: paper on GPU, small on CPU, tiny with --quick)")
    ops.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    ops.add_argument("--only", nargs="*", default=(),
                     help="run only these ops / benchmark names (prefixes) / benchmarks/bench_<suite>.py suites")
    ops.add_argument("--builtin-only", action="store_true", help="skip the benchmarks/bench_*.py modules")
    ops.add_argument("--compiled-reference", action="store_true",
                     help="also time torch.compile(reference) per op (compiling every case takes minutes)")
    for sub in (ops, calibrate):
        sub.add_argument("--budget-ms", type=float, default=None,
                         help="timed milliseconds per shape, all backends together (interleaved rounds; "
                              "default 4000 on CPU, 300 on GPU, 60 with --quick)")

    from fastvl.bench import calibrate as calibrate_bench
    from fastvl.bench import host as host_bench
    from fastvl.bench import model as model_bench

    model_bench.add_arguments(model)
    model_bench.add_arguments(profile)
    calibrate_bench.add_arguments(calibrate)
    host_bench.add_arguments(host)
    from fastvl.bench import retrieval as retrieval_bench

    retrieval_bench.add_arguments(retrieval)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else harness.default_device()
    out_dir = args.out or harness.results_dir(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        if args.mode == "ops":
            return run_ops(args, device, out_dir)
        if args.mode == "calibrate":
            from fastvl.bench import calibrate

            return calibrate.run(args, device, out_dir)
        if args.mode == "host":
            from fastvl.bench import host

            return host.run(args, device, out_dir)
        if args.mode == "retrieval":
            from fastvl.bench import retrieval as retrieval_bench

            return retrieval_bench.run(args, device, out_dir)
        from fastvl.bench import model as model_bench

        if args.mode == "profile":
            model_bench.profile_step(args, device, out_dir)
            return 0
        return model_bench.run(args, device, out_dir)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def run_ops(args: argparse.Namespace, device: torch.device, out_dir: Path) -> int:
    from fastvl.bench import ops

    size = args.size or ("tiny" if args.quick else "paper" if device.type == "cuda" else "small")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = harness.Results("ops", device, quick=args.quick, note=args.note)
    results.env["size"] = size
    notes, results.failures = ops.run(results, size, dtype, only=args.only, compiled_reference=args.compiled_reference,
                                      budget=harness.Budget.of(args.quick, args.budget_ms, device))
    _report(results, out_dir / "ops.json", ["reference"], notes + results.failures)
    if not args.no_plots:
        for path in ops.plot_speedups(results, out_dir):
            print(f"wrote {path}")
    failed = list(results.failures)
    if failed and failed[-1].startswith(ops.INTERRUPTED):
        return 1
    if not args.builtin_only:
        for module_path in sorted(BENCHMARKS_DIR.glob("bench_*.py")):
            try:
                _run_module(module_path, args, device, out_dir, size, dtype)
            except Exception:  # one broken module must not cost the others' numbers
                traceback.print_exc()
                failed.append(f"{module_path.name} (traceback above)")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


def _run_module(path: Path, args: argparse.Namespace, device: torch.device, out_dir: Path, size: str,
                dtype: torch.dtype) -> None:
    """Runs a ``benchmarks/bench_<area>.py`` module: its ``run(results, size, dtype)`` (and ``plot(results,
    out_dir)`` if it has one) into ``<out>/<area>.json``; or else its ``main(argv)`` with ``--device``,
    ``--out`` and ``--quick`` (the module then writes its own JSON and PNGs into ``<out>``)."""
    suite = path.stem.removeprefix("bench_")
    if args.only and suite not in args.only:
        return
    spec = importlib.util.spec_from_file_location(f"fastvl_benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "run"):
        if not hasattr(module, "main"):
            print(f"skipping {path.name}: it defines neither run(results, size, dtype) nor main(argv)",
                  file=sys.stderr)
            return
        print(f"\n== {path.name} ==")
        module.main(["--device", str(device), "--out", str(out_dir)] + (["--quick"] if args.quick else []))
        return
    results = harness.Results(suite, device, quick=args.quick, note=args.note)
    results.env["size"] = size
    notes = module.run(results, size, dtype) or []
    _report(results, out_dir / f"{suite}.json", getattr(module, "BASELINES", ["reference"]), notes)
    if not args.no_plots and hasattr(module, "plot"):
        for plot_path in module.plot(results, out_dir) or []:
            print(f"wrote {plot_path}")


def _report(results: harness.Results, path: Path, baselines: list[str], notes: list[str]) -> None:
    print(f"\n== {results.suite} on {results.env['device']} (torch {results.env['torch']}, "
          f"commit {(results.env['git_commit'] or 'unknown')[:12]}) ==")
    print(results.table(baselines))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {results.save(path, baselines)}")
