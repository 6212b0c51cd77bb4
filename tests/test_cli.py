import json
import subprocess
import sys


def test_info_json_lists_every_op_with_a_live_backend():
    out = subprocess.run([sys.executable, "-m", "fastvl", "info", "--json"], check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["torch"]
    for op in ("attention", "co_attention", "region_kl_loss", "linear_region_kl_loss", "linear_cross_entropy", "itc_loss"):
        entry = info["ops"][op]
        assert entry["auto"] is not None and entry["backends"]["reference"] == []


def test_info_table():
    out = subprocess.run([sys.executable, "-m", "fastvl", "info"], check=True, capture_output=True, text=True)
    assert "fastvl._C" in out.stdout and "attention:" in out.stdout
