"""``fastvl parity`` at tiny size on CPU: a valid JSON report with every layer and op checked and timed,
and a planted error (one layer's weight perturbed in the fused copy only) flagged at that layer and no
other."""

import json

import pytest
import torch

from fastvl.bench import parity


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: threads only add contention on a shared CI box
    yield
    torch.set_num_threads(threads)


def test_layer_modules_open_containers_and_lists():
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining

    names = list(parity.layer_modules(ViLBERTForPretraining(ViLBERTConfig.named("tiny"))))
    assert {"bert.embeddings", "bert.v_embeddings", "bert.layer.0", "bert.layer.3", "bert.v_layer.1",
            "bert.c_layer.0", "bert.c_layer.1", "cls.predictions.transform"} <= set(names)
    assert not any(name in ("bert", "bert.layer", "cls", "cls.predictions") for name in names)


@pytest.mark.parametrize("layer", ["bert.v_layer.1", "bert.c_layer.0"])
def test_planted_error_is_flagged_at_that_layer_only(layer, one_thread):
    report = parity.run_parity("vilbert-tiny", torch.float32, torch.device("cpu"), perturb=layer, time_layers=False)
    assert report["flagged_layers"] == [layer]
    assert report["flagged_ops"] == []
    flagged = next(entry for entry in report["layers"] if entry["name"] == layer)
    assert not flagged["forward"]["ok"] and flagged["forward"]["fused_error"] > 10 * flagged["forward"]["allowed"]


def test_parity_cli_writes_a_clean_report(tmp_path, capsys, one_thread):
    from fastvl.cli import main

    out = tmp_path / "parity.json"
    assert main(["parity", "--model", "vilbert-tiny", "--dtype", "fp32", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"env", "model", "dtype", "layers", "ops", "end_to_end", "flagged_layers", "flagged_ops"} <= report.keys()
    assert report["dtype"] == "float32" and report["flagged_layers"] == [] and report["flagged_ops"] == []
    assert len(report["layers"]) >= 10
    for entry in report["layers"]:
        assert entry["ok"] and entry["forward"]["allowed"] > 0
        for key in ("fused_fwd_ms", "reference_fwd_ms", "fused_fwd_bwd_ms", "reference_fwd_bwd_ms"):
            assert entry[key] > 0
    ops = {entry["op"] for entry in report["ops"]}
    assert {"attention", "co_attention", "linear_cross_entropy", "linear_region_kl_loss"} <= ops
    assert all(entry["forward"] is not None for entry in report["ops"])
    assert report["end_to_end"]["param_grads"]["ok"] and report["end_to_end"]["loss.mlm"]["ok"]
    assert "flagged: none" in capsys.readouterr().out
