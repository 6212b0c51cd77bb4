"""Ahead-of-time compile report of the Triton kernels for sm_80 and sm_90, on a machine with no GPU.

The attention kernels are compiled exactly as the JIT would build them on a GPU: each case runs the
real launch code (``fastvl.ops.attention_launch``) on small CPU tensors shaped like the workload, with
every kernel's ``run`` replaced by a recorder; the recorded arguments go through Triton's own binder
(the run-time specialisation: integers equal to 1 become constants, pointers and integers divisible
by 16 get divisibility hints, ``do_not_specialize`` honoured) and ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` with the launch's num_warps / num_stages. The row kernels
(layer norm, bias+GELU, cross entropy) are compiled from their hand-written ``AOT_SPECS``; region KL is
captured like the attention kernels.

Per compiled kernel the report records registers, spill bytes and shared memory (from ptxas), CTAs
and warps per SM (from the device limits below), whether the sm_90 PTX uses ``wgmma`` and the widest
global load (128 bits = vectorised). Gates
(exit 1): it compiles; shared memory within the per-block limit; no spill in a forward kernel; backward
spills within ``SPILL_BUDGET``; at least 2 CTAs per SM for the short-sequence cases on sm_90 (on sm_80,
where mma operands live in registers, at least 8 resident warps: the d=128 backward runs one 8-warp CTA
there rather than two 4-warp ones that spill); wgmma on sm_90 where the inner loop is a ``tl.dot``.

``python -m fastvl.aot`` compiles every case (minutes); ``--ci`` only the representative subset the
test suite compiles. Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import math
import os
import pkgutil
import platform
import re
import sys
import time
from collections.abc import Callable

# Per-SM resources (CUDA occupancy calculator): shared memory per SM and per block, 1 KiB reserved
# per CTA, 64K 32-bit registers allocated per warp in units of 256, 64 warps, 32 CTAs.
DEVICE_LIMITS = {
    80: {"smem_per_sm": 164 * 1024, "smem_per_block": 163 * 1024, "regs_per_sm": 65536, "warps_per_sm": 64,
         "ctas_per_sm": 32},
    90: {"smem_per_sm": 228 * 1024, "smem_per_block": 227 * 1024, "regs_per_sm": 65536, "warps_per_sm": 64,
         "ctas_per_sm": 32},
}
SMEM_RESERVED_PER_CTA = 1024
REGISTER_UNIT = 256  # registers per warp are allocated in multiples of this

# Backward spill budget (spill-store bytes per kernel, any configuration and arch): the tiled kernels'
# worst today (bf16 d=128 with dropout on sm_90: ~600 B, 556 B on main), the short kernels' lower.
# Layer norm's backward spills only at hidden size 8192 (16 warps cap it at 128 registers; unchanged).
SPILL_BUDGET = {"attention_bwd": 600, "co_attention_bwd": 600, "attention_bwd_short": 400,
                "co_attention_bwd_short": 400, "layer_norm_bwd": 400}


# Cases: what the launchers are called with ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload: ``run`` calls the launch code on CPU tensors (each launch it makes is recorded).
    ``short``: a short-sequence case taking the short path, gated on >= 2 CTAs per SM. ``ci``:
    compiled by the test suite. ``path="tiled"``: the same shapes forced onto the tiled kernels (the
    comparison with the tiled path, which serves these lengths when the short path is off)."""

    name: str
    run: Callable[[], None]
    short: bool = False
    ci: bool = False
    path: str | None = None  # "tiled": the launchers' FASTVL_ATTENTION_PATH override while capturing


_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_DEVICE = {"name": "cpu"}  # where the cases allocate: "cuda" for --jit (real launches)


def _projections(batch, length, heads, head_dim, dtype, packed=False):
    """q, k, v as views of one fused projection ``[B, L, 3 * H * D]`` (how the models call the op)."""
    import torch

    fused = torch.zeros(batch * length if packed else batch, *(() if packed else (length,)), 3, heads, head_dim,
                        dtype=getattr(torch, _TORCH_DTYPES[dtype]), device=_DEVICE["name"])
    return fused.unbind(-3)


def _mask(batch, length):
    import torch

    mask = torch.ones(batch, length, dtype=torch.bool, device=_DEVICE["name"])
    mask[0, length // 2:] = False
    return mask


def _cu_seqlens(batch, length):
    import torch

    return torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=_DEVICE["name"])


def _attention_case(dtype, head_dim, len_q, len_k, *, mask=True, dropout=0.0, causal=False, packed=False,
                    heads=12, batch=2):
    def run():
        import torch

        from fastvl.ops import attention_launch as launch

        q, _, _ = _projections(batch, len_q, heads, head_dim, dtype, packed)
        _, k, v = _projections(batch, len_k, heads, head_dim, dtype, packed)
        key_mask = _mask(batch, len_k) if mask and not packed else None
        cu_q = _cu_seqlens(batch, len_q) if packed else None
        cu_k = _cu_seqlens(batch, len_k) if packed else None
        seed = launch.draw_seed(dropout, None, q.device)
        keep = launch.stored_keep(launch.forward_keep_mask(batch, heads, head_dim, q.dtype, len_q, len_k, dropout,
                                                           q.device))  # as the attention op stores it
        out, lse = launch.attention_forward(q, k, v, key_mask, cu_q, cu_k, len_q, len_k, dropout, head_dim ** -0.5,
                                            causal, seed, keep=keep)
        launch.attention_backward(torch.empty_like(out), q, k, v, out, lse, key_mask, cu_q, cu_k, len_q, len_k,
                                  dropout, head_dim ** -0.5, causal, seed, keep=keep)

    return run


def _co_attention_case(dtype, head_dim, len_v, len_t, *, dropout=0.0, packed=False, heads=8, batch=2):
    def run():
        import torch

        from fastvl.ops import attention_launch as launch

        q_v, k_v, v_v = _projections(batch, len_v, heads, head_dim, dtype, packed)
        q_t, k_t, v_t = _projections(batch, len_t, heads, head_dim, dtype, packed)
        mask_v = None if packed else _mask(batch, len_v)
        mask_t = None if packed else _mask(batch, len_t)
        cu_v = _cu_seqlens(batch, len_v) if packed else None
        cu_t = _cu_seqlens(batch, len_t) if packed else None
        seed = launch.draw_seed(dropout, None, q_v.device)
        keep = (launch.new_co_keep_masks(batch, heads, len_v, len_t, q_v.device)  # as the co-attention op does
                if launch.stores_keep_mask(max(len_v, len_t), q_v.dtype, head_dim, dropout) else None)
        ctx_v, ctx_t, lse_v, lse_t = launch.co_attention_forward(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, cu_v,
                                                                 cu_t, len_v, len_t, dropout, head_dim ** -0.5, seed,
                                                                 keep=keep)
        launch.co_attention_backward(torch.empty_like(ctx_v), torch.empty_like(ctx_t), q_v, k_v, v_v, q_t, k_t, v_t,
                                     ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, cu_v, cu_t, len_v, len_t, dropout,
                                     head_dim ** -0.5, seed, keep=keep)

    return run


def _region_kl_case(dtype, classes, rows=2368, reduction="mean"):
    def run():
        import torch

        from fastvl.ops import region_kl_op

        device = _DEVICE["name"]
        logits = torch.zeros(rows, classes, dtype=getattr(torch, _TORCH_DTYPES[dtype]), device=device)
        targets = torch.zeros(rows, classes, dtype=torch.float32, device=device)
        selected = torch.zeros(rows, dtype=torch.bool, device=device)
        region_kl_op._region_kl_triton(logits, targets, selected, reduction, torch.empty_like(logits), (rows,),
                                       logits.dtype)

    return run


def _itc_rows_case(dtype, batch=64, queue=65536):
    """The row kernel as ITC runs it: one row per query over [batch | queue] similarities, soft
    cross-entropy out, the gradient written over the similarities, one scale (ALBEF-base's queue)."""
    def run():
        import torch

        from fastvl.ops import region_kl_op

        device = _DEVICE["name"]
        sim = torch.zeros(batch, batch + queue, dtype=getattr(torch, _TORCH_DTYPES[dtype]), device=device)
        targets = torch.zeros(batch, batch + queue, dtype=torch.float32, device=device)
        every_row = torch.ones(batch, dtype=torch.bool, device=device)
        scale = torch.ones(1, dtype=torch.float32, device=device)
        region_kl_op.region_kl_rows("triton", sim, targets, every_row, scale, sim, cross_entropy=True)

    return run


def cases() -> list[Case]:
    """Every block configuration the launchers can pick, each in a workload that picks it. Shapes from
    ViLBERT-base: 37 regions (36 boxes + the image token) and 36 tokens, 8 co-attention heads of 128,
    12 text heads of 64; 101 x 80 for the 128-row key bucket; 300 x 200, 200 and 512 for the tiled path.
    fp16 lowers like bf16 (one packed fp16 case each); dropout (Philox) on the ViLBERT-base shapes."""
    found = []
    for dtype in ("bf16", "fp32"):
        half = dtype == "bf16"
        for head_dim in (64, 128):
            base = (head_dim == 128, head_dim == 64)  # (co-attention, attention) at ViLBERT-base heads
            found.append(Case(f"co_attention_{dtype}_d{head_dim}_v37_t36", _co_attention_case(dtype, head_dim, 37, 36),
                              short=half, ci=half and base[0]))
            found.append(Case(f"attention_{dtype}_d{head_dim}_l36", _attention_case(dtype, head_dim, 36, 36),
                              short=half, ci=half and base[1]))
            found.append(Case(f"co_attention_{dtype}_d{head_dim}_v101_t80",
                              _co_attention_case(dtype, head_dim, 101, 80)))
            found.append(Case(f"attention_{dtype}_d{head_dim}_l101", _attention_case(dtype, head_dim, 101, 101)))
            found.append(Case(f"co_attention_{dtype}_d{head_dim}_v300_t200",
                              _co_attention_case(dtype, head_dim, 300, 200)))
            found.append(Case(f"attention_{dtype}_d{head_dim}_l200", _attention_case(dtype, head_dim, 200, 200)))
            found.append(Case(f"attention_{dtype}_d{head_dim}_l512_causal",
                              _attention_case(dtype, head_dim, 512, 512, causal=True)))
    found.append(Case("co_attention_bf16_dropout_d128_v37_t36", _co_attention_case("bf16", 128, 37, 36, dropout=0.1),
                      short=True))
    found.append(Case("attention_bf16_dropout_d64_l36", _attention_case("bf16", 64, 36, 36, dropout=0.1), short=True))
    for dropout in (0.0, 0.1):  # the tiled kernels at ViLBERT-base shapes, for comparison
        tag = f"bf16{'_dropout' if dropout else ''}"
        found.append(Case(f"co_attention_{tag}_d128_v37_t36_tiled",
                          _co_attention_case("bf16", 128, 37, 36, dropout=dropout), path="tiled"))
        found.append(Case(f"attention_{tag}_d64_l36_tiled", _attention_case("bf16", 64, 36, 36, dropout=dropout),
                          path="tiled"))
    found.append(Case("attention_fp16_d64_l36_packed", _attention_case("fp16", 64, 36, 36, packed=True), short=True))
    found.append(Case("co_attention_fp16_d64_v37_t36_packed", _co_attention_case("fp16", 64, 37, 36, packed=True),
                      short=True))
    for dtype in ("bf16", "fp16", "fp32"):  # ViLBERT's 1601 detector classes, B=64 x 37 regions
        found.append(Case(f"region_kl_{dtype}_c1601", _region_kl_case(dtype, 1601), ci=dtype == "bf16"))
    for dtype in ("bf16", "fp32"):  # ITC's similarity rows (soft cross-entropy), ALBEF-base B=64, Q=65536
        found.append(Case(f"itc_rows_{dtype}_q65536", _itc_rows_case(dtype)))
    return found


# Capturing the launches -----------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


def _jit_kernels() -> list:
    from triton.runtime.jit import JITFunction

    import fastvl.kernels as kernels_pkg

    found = []
    for module_info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"fastvl.kernels.{module_info.name}")
        found += [value for value in vars(module).values() if isinstance(value, JITFunction) and value not in found]
    return found


@contextlib.contextmanager
def recording():
    """Within the block no kernel runs: each ``kernel[grid](...)`` appends a :class:`Launch`."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, tuple(grid), args, kwargs))

        return run

    kernels = _jit_kernels()
    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


def capture(case: Case) -> list[Launch]:
    saved = os.environ.get("FASTVL_ATTENTION_PATH")
    if case.path:
        os.environ["FASTVL_ATTENTION_PATH"] = case.path
    try:
        with recording() as launches:
            case.run()
    finally:
        if case.path:
            os.environ.pop("FASTVL_ATTENTION_PATH")
            if saved is not None:
                os.environ["FASTVL_ATTENTION_PATH"] = saved
    return launches


def jit_source(launch: Launch, arch: int):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments on ``arch``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, specialization


def variants(lengths: list[tuple[int, int]], dtype: str = "bf16", head_dim: int = 128, dropout: float = 0.0,
             arch: int = 90) -> dict[str, set]:
    """Distinct JIT specialisations (what Triton keys its cache on, besides the options) per kernel when
    co-attention and attention run every ``(len_a, len_b)`` pair: one entry per compiled variant."""
    keys: dict[str, set] = {}
    for len_a, len_b in lengths:
        for case in (_co_attention_case(dtype, head_dim, len_a, len_b, dropout=dropout),
                     _attention_case(dtype, head_dim, len_b, len_b, dropout=dropout)):
            for launch in capture(Case("variants", case)):
                _, options, specialization = jit_source(launch, arch)
                key = (str(specialization), options["num_warps"], options["num_stages"])
                keys.setdefault(launch.kernel.__name__, set()).add(key)
    return keys


# Compiling and measuring ----------------------------------------------------------------------------

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_GLOBAL_LOAD = re.compile(r"ld\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")


def widest_global_load(ptx: str) -> int:
    """Bits of the widest global load in the PTX (128 = vectorised 16-byte loads)."""
    return max((int(vec or 1) * int(bits) for vec, bits in _GLOBAL_LOAD.findall(ptx)), default=0)


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> dict:
    """Resident CTAs and warps per SM, and which resource limits them."""
    limits = DEVICE_LIMITS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    bounds = {
        "registers": (limits["regs_per_sm"] // per_warp) // num_warps,
        "shared": limits["smem_per_sm"] // (shared_bytes + SMEM_RESERVED_PER_CTA),
        "warps": limits["warps_per_sm"] // num_warps,
        "ctas": limits["ctas_per_sm"],
    }
    ctas = min(bounds.values())
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limited_by": min(bounds, key=bounds.get)}


def _compile(source, options: dict, arch: int) -> tuple[object, str]:
    """The compiled kernel and ptxas' verbose log (always compiled afresh, so the log exists)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, log.getvalue()


def measure(name: str, source, options: dict, arch: int, uses_dot: bool) -> dict:
    row = {"kernel": name, "function": source.name, "arch": f"sm_{arch}", "num_warps": options["num_warps"],
           "num_stages": options["num_stages"], "ok": False}
    start = time.perf_counter()
    try:
        compiled, log = _compile(source, options, arch)
    except Exception as error:  # reported per kernel
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        return row
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    row.update(registers=int(used.group(1)) if used else None,
               spill_store_bytes=int(spill.group(1)) if spill else 0,
               spill_load_bytes=int(spill.group(2)) if spill else 0,
               shared_bytes=int(compiled.metadata.shared), wgmma="wgmma" in compiled.asm["ptx"],
               widest_load_bits=widest_global_load(compiled.asm["ptx"]),
               seconds=round(time.perf_counter() - start, 2))
    row.update(occupancy(arch, row["registers"] or 255, row["shared_bytes"], row["num_warps"]))
    return row


def gate(row: dict, short: bool, uses_dot: bool) -> list[str]:
    """The problems that fail this row (empty: it passes)."""
    if "error" in row and "registers" not in row:
        return [row["error"]]
    arch = int(row["arch"][3:])
    problems = []
    if row["registers"] is None:
        problems.append("ptxas log carries no register count")
    if row["shared_bytes"] > DEVICE_LIMITS[arch]["smem_per_block"]:
        problems.append(f"shared memory {row['shared_bytes']} B > {row['arch']} per-block limit")
    family = _family(row["function"])
    if "_bwd" in family:
        budget = SPILL_BUDGET.get(family, 0)
        if row["spill_store_bytes"] > budget:
            problems.append(f"backward spills {row['spill_store_bytes']} B > budget {budget} B")
    elif row["spill_store_bytes"]:
        problems.append(f"forward kernel spills {row['spill_store_bytes']} B")
    if short and arch >= 90 and row["ctas_per_sm"] < 2:
        problems.append(f"{row['ctas_per_sm']} CTA/SM (< 2) in a short-sequence case ({row['limited_by']})")
    if short and arch < 90 and row["warps_per_sm"] < 8:  # sm_80: one 8-warp CTA beats two spilling ones
        problems.append(f"{row['warps_per_sm']} warps/SM (< 8) in a short-sequence case ({row['limited_by']})")
    if arch >= 90 and uses_dot and not row["wgmma"]:
        problems.append("tl.dot loop does not lower to wgmma on sm_90")
    return problems


def _family(function: str) -> str:
    """``co_attention_bwd_short_kernel`` -> ``co_attention_bwd_short``."""
    return function.removesuffix("_kernel")


def _path(function: str) -> str:
    """Which kernels a compiled function belongs to: the short or tiled attention path, or a row kernel."""
    return "short" if "_short" in function else ("tiled" if "attention" in function else "row")


def _uses_dot(launch: Launch) -> bool:
    """Attention kernels run tl.dot on tensor cores except in exact fp32 (ieee) mode."""
    return "PRECISION" in launch.kwargs and launch.kwargs["PRECISION"] != "ieee"


def run_case(case: Case, archs: list[int]) -> list[dict]:
    from fastvl.ops import attention_launch

    rows = []
    for arch in archs:  # the launchers may pick per arch: capture for each
        attention_launch.TARGET_CAPABILITY = (arch // 10, arch % 10)
        try:
            launches = capture(case)
        finally:
            attention_launch.TARGET_CAPABILITY = None
        for launch in launches:
            source, options, _ = jit_source(launch, arch)
            row = measure(f"{case.name}:{source.name.removesuffix('_kernel')}", source, options, arch,
                          _uses_dot(launch))
            row.update(case=case.name, short=case.short, path=case.path or _path(source.name),
                       grid=list(launch.grid),
                       constexprs={k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")})
            problems = gate(row, case.short, _uses_dot(launch))
            row["ok"] = not problems
            if problems:
                row["error"] = "; ".join(problems)
            rows.append(row)
    return rows


def run_static_spec(spec, arch: int) -> dict:
    """A row kernel from its hand-written ``AotSpec`` (no launch is captured for it)."""
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    row = measure(spec.name, source, {"num_warps": spec.num_warps, "num_stages": spec.num_stages}, arch,
                  spec.uses_dot)
    row.update(case=spec.name, short=False, static=True)
    problems = gate(row, False, spec.uses_dot)
    row["ok"] = not problems
    if problems:
        row["error"] = "; ".join(problems)
    return row


def static_specs(only: str | None = None) -> list:
    """``AOT_SPECS`` of the kernel modules whose launches are not captured (the row kernels)."""
    import fastvl.kernels as kernels_pkg

    specs = []
    for module_info in pkgutil.iter_modules(kernels_pkg.__path__):
        if module_info.name in ("aot_spec", "attention", "attention_short", "region_kl"):
            continue
        module = importlib.import_module(f"fastvl.kernels.{module_info.name}")
        specs += [spec for spec in getattr(module, "AOT_SPECS", []) if only is None or only in spec.name]
    return specs


def jit_report(selected: list[Case]) -> list[dict]:
    """On a GPU: run the cases for real, then read what Triton's JIT built (its in-memory cache):
    registers and local (spill) memory per thread as the driver reports them, shared memory,
    occupancy -- the ground truth the ahead-of-time report is checked against."""
    import torch

    _DEVICE["name"] = "cuda"
    for case in selected:
        saved = os.environ.get("FASTVL_ATTENTION_PATH")
        if case.path:
            os.environ["FASTVL_ATTENTION_PATH"] = case.path
        try:
            case.run()
        finally:
            os.environ.pop("FASTVL_ATTENTION_PATH", None)
            if saved is not None:
                os.environ["FASTVL_ATTENTION_PATH"] = saved
    torch.cuda.synchronize()
    major, minor = torch.cuda.get_device_capability()
    arch = 90 if major >= 9 else 80
    rows = []
    for kernel in _jit_kernels():
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                compiled._init_handles()
                meta = compiled.metadata
                row = {"kernel": kernel.__name__, "function": kernel.__name__, "arch": f"sm_{major}{minor}",
                       "num_warps": meta.num_warps, "num_stages": meta.num_stages, "registers": compiled.n_regs,
                       "local_bytes": compiled.n_spills, "shared_bytes": int(meta.shared), "jit": True}
                row.update(occupancy(arch, row["registers"], row["shared_bytes"], row["num_warps"]))
                rows.append(row)
    return rows


def environment() -> dict:
    import torch
    import triton

    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "device_limits": DEVICE_LIMITS, "spill_budget": SPILL_BUDGET}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvl.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(DEVICE_LIMITS))
    parser.add_argument("--only", help="compile only cases / kernels whose name contains this")
    parser.add_argument("--ci", action="store_true", help="only the representative subset the tests compile")
    parser.add_argument("--no-row-kernels", action="store_true", help="skip the row kernels' static specs")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--jit", action="store_true",
                        help="on a GPU: launch the cases and report what the JIT built (no gates)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    selected = [case for case in cases() if (not args.ci or case.ci) and (args.only is None or args.only in case.name)]
    if args.jit:
        rows = jit_report(selected)
        for row in rows:
            print(f"{row['arch']} {row['function']:<36} w{row['num_warps']} s{row['num_stages']} regs "
                  f"{row['registers']:>3} local {row['local_bytes']:>4} smem {row['shared_bytes']:>6} "
                  f"{row['ctas_per_sm']} CTA/SM", flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"environment": environment(), "rows": rows}, handle, indent=1)
        return 0 if rows else 1
    rows = []

    def add(row: dict) -> None:  # the JSON is rewritten after every build: a stopped run keeps its rows
        rows.append(row)
        _print(row)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"environment": environment(), "rows": rows}, handle, indent=1)

    for case in selected:
        for row in run_case(case, args.arch):
            add(row)
    if not args.ci and not args.no_row_kernels:
        for spec in static_specs(args.only):
            for arch in args.arch:
                add(run_static_spec(spec, arch))
    failed = [row for row in rows if not row["ok"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed ({len(rows)} kernel builds)")
    return 1 if failed or not rows else 0


def _print(row: dict) -> None:
    status = "ok  " if row["ok"] else "FAIL"
    if "registers" in row:
        detail = (f"regs {row['registers']:>3} spill {row['spill_store_bytes']:>4} B smem {row['shared_bytes']:>6} B "
                  f"{row['ctas_per_sm']:>2} CTA/SM {row['warps_per_sm']:>2} warps/SM wgmma={row['wgmma']:d} "
                  f"ld{row['widest_load_bits']}")
    else:
        detail = ""
    error = f"  <- {row['error']}" if "error" in row else ""
    print(f"{status} {row['arch']} {row['kernel']:<62} w{row['num_warps']} s{row['num_stages']} {detail}{error}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
