"""Shape-aware dispatch: lengths (power-of-two buckets), dtype, mask, dropout and whether a backward
follows are features; auto reads the calibration table, then the op's rule. On CPU, auto never picks
a path slower than the reference in the committed benchmarks."""

import json
import os
from pathlib import Path

import pytest
import torch

import fastvl
from fastvl import dispatch
from fastvl.bench import calibrate, ops

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COMMITTED = [RESULTS / "2026-11-22-cpu-amd-epyc" / "ops.json", RESULTS / "2026-12-01-cpu-host" / "ops.json"]
CUDA = torch.device("cuda")
FEATURES = dict(dtype=torch.float16, head_dim=64, has_mask=True, dropout=False, packed=False, causal=False,
                grad=True)


def test_length_buckets():
    assert [dispatch.length_bucket(n) for n in (1, 2, 3, 36, 37, 64, 65, 101)] == [1, 2, 4, 64, 64, 64, 128, 128]
    assert dispatch.length_bucket(None) is None


def test_features_carry_lengths_and_the_backward():
    seen = []
    q = torch.randn(2, 37, 2, 16, requires_grad=True)
    with dispatch.listen(lambda event, impl: seen.append(event.features)):
        fastvl.ops.attention(q, q[:, :23], q[:, :23])
        with torch.no_grad():
            fastvl.ops.attention(q, q, q, torch.ones(2, 37, dtype=torch.bool))
    assert (seen[0]["len_q"], seen[0]["len_k"], seen[0]["grad"], seen[0]["has_mask"]) == (64, 32, True, False)
    assert (seen[1]["len_k"], seen[1]["grad"], seen[1]["has_mask"]) == (64, False, True)


@pytest.mark.parametrize("features,expected", [
    (dict(len_q=64, len_k=64), "triton"),  # short, 16 bits: Triton
    (dict(len_q=64, len_k=512), "sdpa"),  # long: SDPA
    (dict(len_q=64, len_k=64, dtype=torch.float32), "sdpa"),  # float32: SDPA
    (dict(len_q=512, len_k=512, seeded=True), "triton"),  # only Triton honours a seed
])
def test_the_rule_on_cuda(features, expected):
    backend, why = fastvl.ops.attention_op.ATTENTION.auto(CUDA, {**FEATURES, **features})
    assert backend.name == expected and why


def test_co_attention_rule_on_cuda():
    op = fastvl.ops.co_attention_op.CO_ATTENTION
    features = dict(dtype=torch.float16, head_dim=128, has_mask=True, dropout=True, packed=False, grad=True)
    assert op.auto(CUDA, {**features, "len_v": 64, "len_t": 64})[0].name == "triton"
    assert op.auto(CUDA, {**features, "len_v": 256, "len_t": 64})[0].name == "sdpa"


def test_a_table_entry_decides_and_an_unusable_one_falls_back(tmp_path, monkeypatch):
    op = fastvl.ops.attention_op.ATTENTION
    features = {**FEATURES, "dtype": torch.float32, "len_q": 16, "len_k": 16}
    key = dispatch.table_key(op, features)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"schema": 1, "device": "cpu", "source": "test",
                                "entries": {"attention": {key: "reference"}}}))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    backend, why = op.auto(torch.device("cpu"), features)
    assert backend.name == "reference" and "calibration table" in why
    assert op.auto(torch.device("cpu"), {**features, "len_q": 32})[0].name == "sdpa"  # no entry: order
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": 1, "device": "cpu", "entries": {"attention": {key: "flash_attn"}}}))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(other))
    assert op.auto(torch.device("cpu"), features)[0].name == "sdpa"  # flash_attn cannot run on CPU


def _committed_times():
    """{(op, case name, params json): {backend: {pass: ms}}} of the committed CPU benchmarks."""
    times = {}
    for path in COMMITTED:
        document = json.loads(path.read_text())
        for row in document["rows"]:
            params = {k: v for k, v in row["params"].items() if k != "pass"}
            key = (row["op"], row["name"], json.dumps(params, sort_keys=True), document["env"]["size"])
            times.setdefault(key, {}).setdefault(row["variant"], {})[row["params"]["pass"]] = row["median_ms"]
    return times


def test_auto_on_cpu_is_never_slower_than_the_reference_in_the_committed_benchmarks():
    assert dispatch.TABLE_ENV not in os.environ, "the packaged table is what this test checks"
    checked = 0
    for (op_name, name, params, size), times in _committed_times().items():
        case = next(c for c in ops.cases(size) if c.name == name and json.dumps(c.params, sort_keys=True) == params)
        features = calibrate.features_of(case, torch.device("cpu"), torch.float32)
        chosen = dispatch.registered_ops()[op_name].auto(torch.device("cpu"), features)[0].name
        assert chosen in times, f"{name} {params}: auto picks {chosen}, which the benchmark did not measure"
        # the cases' inputs require grad: a training step, judged by its forward + backward (a fused loss
        # that computes its gradient in the forward is slower on a forward whose backward never runs)
        assert features["grad"] if "grad" in features else True
        kind = "fwd+bwd"
        assert times[chosen][kind] <= times["reference"][kind], f"{name} {params} {kind}: auto picks {chosen}"
        checked += 1
    assert checked >= 18  # every case of the committed CPU op benchmarks


def test_calibrate_measures_and_writes_a_table(tmp_path):
    from fastvl.cli import main

    assert main(["bench", "calibrate", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "dispatch-cpu.json").read_text())
    assert table["device"] == "cpu" and set(table["entries"]) == {"attention", "co_attention"}
    assert all(b in ("sdpa", "reference") for entries in table["entries"].values() for b in entries.values())
