"""The benchmark harness and ``fastvl bench`` at tiny sizes on CPU: valid JSON (keys, positive numbers),
PNG files that exist, peak memory that counts what it should."""

import json
import statistics

import pytest
import torch

from fastvl.bench import harness


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert row[key] > 0, f"{row['name']}/{row['variant']}: {key} = {row[key]}"


def test_timing_quantiles_are_ordered_and_positive():
    x = torch.randn(64, 64)
    timing = harness.time_fn(lambda: x @ x, "cpu", warmup_ms=1, rep_ms=5)
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_cpu_peak_memory_counts_live_tensors_not_inputs():
    x = torch.randn(1024, 256)  # 1 MiB, allocated before the call: not counted

    def two_live_copies():
        a = x * 2  # 1 MiB
        b = a + 1  # 1 MiB, both alive
        del a
        return b.view(-1)  # a view allocates nothing

    peak = harness.peak_memory(two_live_copies, "cpu")
    assert peak == 2 * x.numel() * 4


def test_cpu_peak_memory_sees_backward():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(128, 512)
    peak = harness.peak_memory(lambda: (x @ w).square().sum().backward(), "cpu")
    assert peak >= w.numel() * 4  # at least the weight's gradient


def test_floors_and_peaks():
    peak = harness.Peak(tflops=100.0, gbps=1000.0, source="nominal")
    floors = harness.floors_us(2e9, 1e9, peak)
    assert floors == pytest.approx({"flop_floor_us": 20.0, "byte_floor_us": 1000.0})
    assert "20.0 us" in harness.describe_floors(2e9, 1e9, peak)
    assert harness.nominal_peaks("NVIDIA H100 80GB HBM3")[1] == 3350.0
    assert harness.nominal_peaks("NVIDIA H200")[1] == 4800.0
    assert harness.nominal_peaks("NVIDIA A100-SXM4-80GB")[0]["bfloat16"] == 312.0
    assert harness.nominal_peaks("cpu") is None
    assert harness.measured_bandwidth_gbps("cpu", megabytes=16) > 0


def test_results_json_ratios_table_and_plot(tmp_path):
    results = harness.Results("unit", "cpu", quick=True)
    a, b = torch.randn(96, 96), torch.randn(96, 96)
    for n in (32, 96):
        results.measure(lambda: a[:n] @ b, name="matmul", variant="fast", params={"n": n}, flops=2 * n * 96 * 96,
                        nbytes=4 * (n * 96 * 2 + 96 * 96))
        results.measure(lambda: (a[:n, :, None] * b[None]).sum(1), name="matmul", variant="slow", params={"n": n},
                        flops=2 * n * 96 * 96)
    path = results.save(tmp_path / "unit.json", baselines=["slow"])
    document = json.loads(path.read_text())
    assert {"schema", "suite", "env", "rows", "ratios"} <= document.keys()
    assert {"device", "date", "git_commit", "torch", "triton", "fastvl"} <= document["env"].keys()
    assert len(document["rows"]) == 4 and len(document["ratios"]) == 2
    for row in document["rows"]:
        _positive(row, "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops", "pct_peak_tflops", "flop_floor_us")
    for ratio in document["ratios"]:
        _positive(ratio, "speedup", "memory_ratio")
    assert "x vs slow" in results.table(["slow"])
    env, rows = harness.load_rows(path)  # plots are drawn from saved rows
    png = harness.plot(rows, tmp_path / "unit.png", x="n", title="matmul", env=env)
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_fastvl_bench_ops_quick_writes_json_and_png(tmp_path, capsys):
    from fastvl.cli import main

    assert main(["bench", "ops", "--quick", "--out", str(tmp_path), "--only", "co_attention", "region_kl_loss"]) == 0
    document = json.loads((tmp_path / "ops.json").read_text())
    assert document["suite"] == "ops" and document["env"]["size"] == "tiny"
    variants = {(row["op"], row["variant"]) for row in document["rows"]}
    assert {("co_attention", "reference"), ("co_attention", "sdpa"), ("region_kl_loss", "reference")} <= variants
    for row in document["rows"]:
        _positive(row, "median_ms", "p20_ms", "p80_ms", "peak_mem_mb")
        assert row["params"]["pass"] in ("fwd", "fwd+bwd")
    assert any(r["variant"] == "sdpa" and r["name"] == "co_attention" for r in document["ratios"])
    assert (tmp_path / "ops-co_attention.png").stat().st_size > 1000
    assert (tmp_path / "ops-region_kl_loss.png").stat().st_size > 1000
    assert "x vs reference" in capsys.readouterr().out


@pytest.mark.slow
def test_fastvl_bench_model_vilbert_tiny(tmp_path, capsys):
    from fastvl.cli import main

    assert main(["bench", "model", "--model", "vilbert-tiny", "--quick", "--threads", "1", "--batch", "1", "2",
                 "--steps", "2", "--warmup", "1", "--memory-cap-gb", "0.04", "--max-batch-limit", "4",
                 "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "model-vilbert-tiny.json").read_text())
    assert document["env"]["model"] == "vilbert-tiny" and document["env"]["precision"] == "fp32"
    assert {(row["variant"], row["params"]["batch"]) for row in document["rows"]} == {
        ("fused", 1), ("fused", 2), ("reference", 1), ("reference", 2)}
    for row in document["rows"]:
        _positive(row, "median_ms", "forward_ms", "backward_ms", "optimizer_ms", "samples_per_s", "tokens_per_s",
                  "peak_mem_mb")
        assert row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"] == pytest.approx(row["median_ms"], rel=0.5)
    assert {r["variant"] for r in document["ratios"]} == {"fused"}
    assert set(document["max_batch"]) == {"fused", "reference"}
    assert all(1 <= size <= 4 for size in document["max_batch"].values())
    for y in ("samples_per_s", "peak_mem_mb", "speedup"):
        assert (tmp_path / f"model-vilbert-tiny-{y}.png").stat().st_size > 1000
    assert "largest batch that fits" in capsys.readouterr().out


def test_packed_workload_gives_the_padded_losses_and_bench_model_times_both(tmp_path):
    from fastvl.bench.workloads import WORKLOADS
    from fastvl.cli import main

    spec = WORKLOADS["vilbert-tiny"]()
    model = spec.build().eval()
    padded = spec.make_batch(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    packed = spec.packed().make_batch(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert packed["input_ids"].shape[0] == int(padded["text_mask"].sum()) and "text_mask" not in packed
    loss_padded, losses_padded = spec.losses(model(**padded))
    loss_packed, losses_packed = spec.losses(model(**packed))
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert losses_packed.keys() == losses_padded.keys()
    with pytest.raises(ValueError, match="no packed batches"):
        WORKLOADS["albef-tiny"]().packed()

    assert main(["bench", "model", "--model", "vilbert-tiny", "--quick", "--threads", "1", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--packed", "--no-max-batch", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "model-vilbert-tiny.json").read_text())
    assert {row["variant"] for row in document["rows"]} == {"fused", "fused+packed", "reference", "reference+packed"}


def test_fastvl_bench_profile_saves_top_ops(tmp_path):
    from fastvl.cli import main

    assert main(["bench", "profile", "--model", "vilbert-tiny", "--quick", "--threads", "1", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "profile-vilbert-tiny.json").read_text())
    assert document["env"]["model"] == "vilbert-tiny" and document["total_us"] > 0
    assert 5 <= len(document["top"]) <= 30
    assert all(item["self_us"] > 0 and item["calls"] > 0 for item in document["top"])
    assert document["top"][0]["self_us"] >= document["top"][-1]["self_us"]
    assert "Self CPU" in (tmp_path / "profile-vilbert-tiny.txt").read_text()
    layers = document["forward_us_per_layer"]
    assert {"bert.layer.0", "bert.c_layer.1"} <= layers.keys() and all(us > 0 for us in layers.values())
    assert not any(item["name"] in layers or item["name"].startswith("op ") for item in document["top"])


def _update_readme_module():
    import importlib.util

    path = harness.REPO_ROOT / "benchmarks" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_readme_prefers_the_newest_gpu_run_and_says_when_there_is_none(tmp_path):
    update_readme = _update_readme_module()
    x = torch.randn(32, 32)

    def run_folder(name: str, device_type: str, date: str) -> None:
        results = harness.Results("ops", "cpu", quick=True)
        results.env.update(device_type=device_type, date=date, device=f"{device_type} box")
        for variant in ("auto", "reference"):
            results.measure(lambda: x @ x, name="matmul", variant=variant, params={"n": 32, "pass": "fwd+bwd"},
                            flops=2 * 32**3, memory=False)
        results.save(tmp_path / "results" / name / "ops.json", baselines=["reference"])

    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    run_folder("2026-01-01-cpu", "cpu", "2026-01-01T00:00:00+00:00")
    assert update_readme.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n") and "No GPU results yet" in text and "| matmul | n=32 | auto" in text
    assert update_readme.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 0

    run_folder("2026-02-01-nvidia-h100", "cuda", "2026-02-01T00:00:00+00:00")
    assert update_readme.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 1
    update_readme.main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert "No GPU results yet" not in text and "**cuda box**" in text and text.count(update_readme.START) == 1


@pytest.mark.gpu
def test_gpu_timing_memory_and_peaks():
    x = torch.randn(1024, 1024, device="cuda")
    timing = harness.time_fn(lambda: x @ x, "cuda", warmup_ms=5, rep_ms=20)
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert harness.peak_memory(lambda: torch.empty(8 * 2**20, dtype=torch.uint8, device="cuda"), "cuda") >= 8 * 2**20
    peak = harness.device_peak("cuda", torch.bfloat16)
    assert peak.tflops > 0 and peak.gbps > 0
    assert harness.measured_bandwidth_gbps("cuda", megabytes=256) > 100


@pytest.mark.gpu
def test_gpu_bench_model_profile_and_parity_tiny(tmp_path):
    from fastvl.cli import main

    assert main(["bench", "model", "--model", "vilbert-tiny", "--device", "cuda", "--quick", "--batch", "4",
                 "--max-batch-limit", "64", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "model-vilbert-tiny.json").read_text())
    assert document["env"]["device_type"] == "cuda" and all(v >= 4 for v in document["max_batch"].values())
    assert main(["bench", "profile", "--model", "vilbert-tiny", "--device", "cuda", "--quick", "--out",
                 str(tmp_path)]) == 0
    profile = json.loads((tmp_path / "profile-vilbert-tiny.json").read_text())
    assert profile["top"] and profile["measure"].startswith("self device time")
    assert main(["parity", "--model", "vilbert-tiny", "--device", "cuda", "--dtype", "bf16", "--quick", "--out",
                 str(tmp_path / "parity.json")]) == 0


def test_a_failing_variant_is_reported_and_the_rest_still_measured(monkeypatch):
    import fastvl.ops
    from fastvl.bench import ops

    real = fastvl.ops.itc_loss

    def broken_reference(*args, backend=None, **kwargs):
        if backend == "reference":
            raise RuntimeError("planted failure")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(fastvl.ops, "itc_loss", broken_reference)
    results = harness.Results("ops", "cpu", quick=True)
    notes, failures = ops.run(results, "tiny", torch.float32, only=["itc_loss"])
    assert len(failures) == 2 and all("planted failure" in f and "reference" in f for f in failures)
    variants = {row["variant"] for row in results.rows}
    assert "auto" in variants and "reference" not in variants


@pytest.mark.slow
def test_fastvl_bench_host_counts_launches_and_host_time(tmp_path):
    """`fastvl bench host`: per op, host microseconds with Triton launches stubbed against the eager path,
    launches counted (Triton kernels + non-view aten ops), and a training step's launches fused vs reference."""
    from fastvl.cli import main

    assert main(["bench", "host", "--quick", "--threads", "1", "--model", "vilbert-tiny", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "host.json").read_text())
    rows = {(r["name"], r["variant"], r["pass"], json.dumps(r["params"])): r for r in document["rows"]}
    assert {r["op"] for r in document["rows"]} >= {"attention", "co_attention", "region_kl_loss", "layer_norm"}
    co = [r for r in rows.values() if r["op"] == "co_attention" and r["variant"].startswith("triton")]
    assert co and all(r["triton_launches"] == (1 if r["pass"] == "fwd" else 2) for r in co)  # one kernel each way
    assert all(r["host_us"] > 0 for r in rows.values())
    reference = {(r["name"], r["pass"], json.dumps(r["params"])): r["launches"] for r in rows.values()
                 if r["variant"] == "reference"}
    assert all(r["launches"] < reference[(r["name"], r["pass"], json.dumps(r["params"]))] for r in co)
    step = document["step"]
    assert step["fused"]["triton"] > 0 and step["reference"]["triton"] == 0
    assert step["reference"]["launches"] > step["fused"]["launches"] and step["optimizer_launches"] > 0


@pytest.mark.slow
def test_compiled_reference_baseline_times_the_reference_under_torch_compile():
    from fastvl.bench import ops

    case = next(c for c in ops.cases("tiny") if c.op == "bias_gelu")
    torch.manual_seed(0)  # the upstream gradient is drawn from it
    fn, grad_inputs = ops.prepare(case, ops.COMPILED_REFERENCE, "fwd+bwd", torch.device("cpu"), torch.float32)
    fn()
    compiled_grads = [t.grad.clone() for t in grad_inputs]
    torch.manual_seed(0)
    fn, grad_inputs = ops.prepare(case, "reference", "fwd+bwd", torch.device("cpu"), torch.float32)
    fn()
    for a, b in zip(compiled_grads, (t.grad for t in grad_inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_regressions_flag_only_a_clearly_slower_choice():
    from fastvl.bench.ops import auto_regressions

    def row(variant, median, spread=0.1, **extra):
        return {"name": "op", "params": {"N": 1, "pass": "fwd"}, "variant": variant, "median_ms": median,
                "p20_ms": median - spread, "p80_ms": median + spread, **extra}

    clear = [row("auto", 2.0, chose="torch"), row("torch", 2.0), row("reference", 1.0)]
    assert auto_regressions(clear) == ["op {'N': 1, 'pass': 'fwd'}: auto picks torch (2.000 ms), "
                                       "reference takes 1.000 ms"]
    overlapping = [row("auto", 1.1, chose="torch"), row("torch", 1.1, spread=0.2), row("reference", 1.0, spread=0.2)]
    assert auto_regressions(overlapping) == []
    assert auto_regressions([row("auto", 2.0, chose="reference"), row("reference", 2.0), row("torch", 3.0)]) == []


def test_round_order_rotates_and_reverses():
    orders = [harness.round_order(["a", "b", "c"], r) for r in range(6)]
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert orders[3:] == [["c", "b", "a"], ["a", "c", "b"], ["b", "a", "c"]]
    for position in range(3):  # every variant runs first, middle and last equally often
        assert sorted(order[position] for order in orders) == ["a", "a", "b", "b", "c", "c"]


def test_median_ci_holds_the_order_statistics_of_the_binomial():
    assert harness.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, 1.0, 5.0)  # n=5: only the range covers 95%
    values = list(range(20))  # n=20: P(Binomial(20, 1/2) <= 5) = 0.021, <= 6: 0.058
    assert harness.median_ci(values) == (9.5, 6, 13)


def test_paired_speedup_cancels_load_that_hits_both_variants():
    load = [1.0, 3.0, 1.5, 6.0, 1.0, 2.0, 4.0, 1.2, 1.1, 5.0]  # the machine's slowdown per round
    fast, slow = [1.0 * x for x in load], [1.25 * x for x in load]
    paired = harness.paired_speedup(slow, fast)
    assert paired["speedup"] == pytest.approx(1.25) and paired["verdict"] == "faster"
    assert harness.paired_speedup(fast, slow)["verdict"] == "slower"
    jitter = [1.0, 1.01, 0.99, 1.005, 0.995, 1.0, 1.01, 0.99, 1.0, 1.0]
    assert harness.paired_speedup(fast, [f * j for f, j in zip(fast, jitter)])["verdict"] == "within noise"
    # the ratio of the two medians would be ~1.25 too here, but not when load differs between two timings
    assert harness.Timing.of(slow).median_ms / harness.Timing.of(fast).median_ms == pytest.approx(1.25)


def test_compare_interleaves_and_auto_shares_the_timing_of_its_backend():
    calls = []
    results = harness.Results("unit", "cpu")
    budget = harness.Budget(budget_ms=5.0, warmup_ms=0.0, min_rounds=8, max_rounds=8)
    x = torch.randn(64, 64)
    variants = {"reference": lambda: calls.append("reference") or x @ x,
                "sdpa": lambda: calls.append("sdpa") or (x @ x, x @ x)}
    rows = results.compare(variants, name="op", params={"pass": "fwd"}, baseline="reference", budget=budget,
                           memory=False)
    timed = calls[-16:]
    assert [timed[i:i + 2] for i in range(0, 16, 2)].count(["reference", "sdpa"]) == 4  # alternating order
    assert all(r["rounds"] == 8 == len(r["rounds_ms"]) and r["load_before"] for r in rows)
    sdpa = next(r for r in rows if r["variant"] == "sdpa")
    assert sdpa["vs_baseline"]["baseline"] == "reference"
    auto = results.same_as(sdpa, "auto", chose="sdpa")
    by_variant = {r["variant"]: r for r in results.ratios("sdpa")}
    assert by_variant["auto"]["speedup"] == 1.0 and by_variant["auto"]["method"] == "same code path"
    assert by_variant["reference"]["method"] == "paired rounds" and "ci95" in by_variant["reference"]
    vs_reference = {r["variant"]: r for r in results.ratios("reference")}
    assert vs_reference["auto"]["speedup"] == vs_reference["sdpa"]["speedup"]  # one path, one number
    assert auto["median_ms"] == sdpa["median_ms"] and "(same path)" in results.table(["sdpa"])
    noise = results.to_json()["env"]["noise"]
    assert noise["rounds"] == [8, 8] and noise["median_spread_pct"] >= 0


def test_clearly_faster_uses_the_rounds_where_there_are_some():
    from fastvl.bench.ops import clearly_faster

    load = [1.0, 3.0, 1.5, 6.0, 1.0, 2.0, 4.0, 1.2, 1.1, 5.0]

    def row(variant, factor, comparison=1):
        times = [factor * x for x in load]
        return {"variant": variant, "median_ms": statistics.median(times), "p20_ms": min(times),
                "p80_ms": max(times), "rounds_ms": times, "comparison": comparison}

    # p20-p80 of either overlaps the other's (the load swings 6x), the paired rounds still separate them
    assert clearly_faster(row("a", 1.0), row("b", 1.2)) and not clearly_faster(row("b", 1.2), row("a", 1.0))
    assert not clearly_faster(row("a", 1.0), row("b", 1.2, comparison=2))  # not timed together: overlap


def test_budget_defaults_per_device_and_override():
    assert harness.Budget.of() == harness.Budget() and harness.Budget.of(device="cuda") == harness.Budget.gpu()
    assert harness.Budget.of(quick=True, device="cuda") == harness.Budget.quick()
    assert harness.Budget.of(budget_ms=123.0).budget_ms == 123.0 and harness.Budget.of(budget_ms=1).min_rounds == 10
