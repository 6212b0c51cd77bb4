"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, on a machine with no GPU.

``python -m fastvl.aot`` imports every module of ``fastvl.kernels``, compiles each ``AOT_SPECS``
entry with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and checks: it
compiles, its shared memory fits the architecture's per-block limit, and kernels whose inner loop is
a ``tl.dot`` use ``wgmma`` in their sm_90 PTX. Prints a table, optionally writes JSON, exits 1 on any
failure. Must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def collect_specs(only: str | None = None) -> list:
    import fastvl.kernels as kernels_pkg  # noqa: PLC0415

    specs = []
    for module_info in pkgutil.iter_modules(kernels_pkg.__path__):
        if module_info.name == "aot_spec":
            continue
        module = importlib.import_module(f"fastvl.kernels.{module_info.name}")
        for spec in getattr(module, "AOT_SPECS", []):
            if only is None or only in spec.name:
                specs.append(spec)
    return specs


def compile_spec(spec, arch: int) -> dict:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    row = {"kernel": spec.name, "arch": f"sm_{arch}", "num_warps": spec.num_warps, "num_stages": spec.num_stages,
           "constexprs": {k: v for k, v in spec.constexprs.items()}, "ok": False}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as error:  # noqa: BLE001 - reported per kernel
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        return row
    ptx = compiled.asm["ptx"]
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["wgmma"] = "wgmma" in ptx
    row["seconds"] = round(time.perf_counter() - start, 2)
    problems = []
    if row["shared_bytes"] > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"shared memory {row['shared_bytes']} B > sm_{arch} limit {SHARED_MEMORY_LIMIT[arch]} B")
    if arch >= 90 and spec.uses_dot and not row["wgmma"]:
        problems.append("tl.dot loop does not lower to wgmma on sm_90")
    if problems:
        row["error"] = "; ".join(problems)
    else:
        row["ok"] = True
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvl.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--only", help="compile only kernels whose name contains this")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    specs = collect_specs(args.only)
    rows = [compile_spec(spec, arch) for spec in specs for arch in args.arch]
    for row in rows:
        status = "ok " if row["ok"] else "FAIL"
        detail = row.get("error", f"smem {row.get('shared_bytes', 0):>6} B  wgmma={row.get('wgmma')}")
        print(f"{status} {row['arch']} {row['kernel']:<48} w{row['num_warps']} s{row['num_stages']}  {detail}")
    failed = [row for row in rows if not row["ok"]]
    print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed ({len(specs)} configurations x {len(args.arch)} archs)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
