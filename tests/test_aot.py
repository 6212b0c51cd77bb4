"""The compile report (``python -m fastvl.aot``): the kernels compiled exactly as the JIT launches
them, for sm_80 and sm_90, with no GPU. CI compiles the representative subset (``--ci``: the
ViLBERT-base co-attention and text attention, region KL; about a minute) and checks the committed
full report (``benchmarks/results/compile-report-*.json``, regenerated with ``python -m fastvl.aot
--json ...``) against the gates and the current case list. Gates: no spill in a forward kernel,
backward spills within ``SPILL_BUDGET``, at least 2 CTAs per SM on the short-sequence cases (sm_90; 8
warps per SM on sm_80), shared
memory within the per-block limit, wgmma on sm_90 where a tl.dot runs on tensor cores."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
NO_INTERPRETER = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_ATTENTION_PATH")}


def _python(code: str, *args: str, timeout: int = 600) -> str:
    run = subprocess.run([sys.executable, "-c", code, *args], env=NO_INTERPRETER, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


def committed_report() -> dict:
    reports = sorted(RESULTS.glob("compile-report-*.json"))
    assert reports, f"no compile report in {RESULTS}"
    return json.loads(reports[-1].read_text())


def test_committed_report_passes_the_gates_and_covers_every_case():
    report = committed_report()
    rows = report["rows"]
    failed = [(row["arch"], row["kernel"], row.get("error")) for row in rows if not row["ok"]]
    assert not failed, failed
    names = set(json.loads(_python("import json; from fastvl import aot; print(json.dumps([c.name for c in "
                                   "aot.cases()]))")))
    reported = {row["case"] for row in rows}
    assert names <= reported, f"cases missing from the committed report (regenerate it): {names - reported}"
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        if "registers" not in row:
            continue
        assert row["registers"] and row["ctas_per_sm"] >= 1
        if not row["function"].endswith("bwd_kernel") and not row["function"].endswith("bwd_short_kernel"):
            assert row["spill_store_bytes"] == 0, row["kernel"]
        if row.get("short"):
            assert row["ctas_per_sm"] >= 2 if row["arch"] == "sm_90" else row["warps_per_sm"] >= 8, row["kernel"]


def test_gates_fail_what_they_should():
    from fastvl import aot

    row = {"kernel": "x", "function": "co_attention_fwd_short_kernel", "arch": "sm_90", "registers": 128,
           "spill_store_bytes": 8, "shared_bytes": 240 * 1024, "wgmma": False, "ctas_per_sm": 1,
           "limited_by": "shared"}
    problems = "; ".join(aot.gate(row, short=True, uses_dot=True))
    for expected in ("forward kernel spills", "per-block limit", "CTA/SM", "wgmma"):
        assert expected in problems
    backward = dict(row, function="co_attention_bwd_short_kernel",
                    spill_store_bytes=aot.SPILL_BUDGET["co_attention_bwd_short"],
                    shared_bytes=1024, wgmma=True, ctas_per_sm=2)
    assert aot.gate(backward, short=True, uses_dot=True) == []
    backward["spill_store_bytes"] += 1
    assert "budget" in "; ".join(aot.gate(backward, short=True, uses_dot=True))


def test_occupancy_from_device_limits():
    from fastvl import aot

    # 255 registers x 8 warps: 8 warps fit the 64K register file -> 1 CTA; 32 KB smem x 4 warps x 128
    # registers: registers allow 4 CTAs of 4 warps, sm_90's 228 KB allow 6.
    assert aot.occupancy(90, 255, 1024, 8)["ctas_per_sm"] == 1
    assert aot.occupancy(90, 128, 32768, 4) == {"ctas_per_sm": 4, "warps_per_sm": 16, "limited_by": "registers"}
    assert aot.occupancy(80, 64, 128 * 1024, 4)["limited_by"] == "shared"


@pytest.mark.slow
def test_ci_subset_compiles_within_the_gates(tmp_path):
    """sm_90 and sm_80 builds of the ViLBERT-base co-attention (d=128) and text attention (d=64) on
    the short path, and region KL at 1601 classes, as the JIT would build them."""
    report = tmp_path / "ci.json"
    run = subprocess.run([sys.executable, "-m", "fastvl.aot", "--ci", "--json", str(report)], env=NO_INTERPRETER,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(report.read_text())["rows"]
    assert {row["function"] for row in rows} >= {"co_attention_fwd_short_kernel", "co_attention_bwd_short_kernel",
                                                 "attention_fwd_short_kernel", "attention_bwd_short_kernel",
                                                 "region_kl_kernel", "region_kl_reduce_kernel"}
    assert all(row["ok"] for row in rows)


COVERAGE = """
import json
from fastvl import aot
def keys(case):
    found = set()
    for launch in aot.capture(case):
        kw = launch.kwargs
        if "BLOCK_D" in kw:
            dtype = "fp32" if str(launch.args[0].dtype) == "torch.float32" else "half"
            found.add((launch.kernel.__name__, dtype, kw.get("BLOCK_M"), kw["BLOCK_N"], kw["BLOCK_D"],
                       kw["num_warps"], kw["num_stages"]))
    return found
covered = set().union(*(keys(case) for case in aot.cases()))
wanted = set()
for dtype in ("bf16", "fp16", "fp32"):
    for head_dim in (16, 40, 64, 80, 128):
        for lengths in ((10, 16), (37, 36), (64, 64), (65, 20), (101, 80), (129, 36), (300, 200)):
            wanted |= keys(aot.Case("sweep", aot._co_attention_case(dtype, head_dim, *lengths)))
        for length, causal in ((23, False), (77, True), (200, False), (511, False), (600, True)):
            wanted |= keys(aot.Case("sweep", aot._attention_case(dtype, head_dim, length, length, causal=causal)))
print(json.dumps(sorted(map(list, wanted - covered))))
"""


def test_report_cases_cover_every_launch_configuration():
    """Sweeping dtypes, head dims and lengths through the real launchers picks no block configuration
    that the report's cases do not compile (fp16 lowers like bf16)."""
    missing = json.loads(_python(COVERAGE))
    assert not missing, missing
