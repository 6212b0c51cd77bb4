"""Backend selection: per call, per scope, per environment, auto, and the errors that list reasons."""

import pytest
import torch

import fastvl
from fastvl.dispatch import BackendUnavailableError, Op


def _q(*shape):
    return torch.randn(*shape)


def test_auto_prefers_sdpa_on_cpu():
    assert fastvl.ops.attention.__module__ == "fastvl.ops.attention_op"
    from fastvl.ops.attention_op import ATTENTION

    assert ATTENTION.select(None, torch.device("cpu"), dtype=torch.float32, head_dim=64, dropout=False,
                            packed=False).name == "sdpa"


def test_choice_precedence(monkeypatch):
    from fastvl.ops.attention_op import ATTENTION

    select = lambda backend=None: ATTENTION.select(backend, torch.device("cpu"), dtype=torch.float32,  # noqa: E731
                                                   head_dim=64, dropout=False, packed=False).name
    monkeypatch.setenv("FASTVL_BACKEND", "reference")
    assert select() == "reference"
    with fastvl.use_backend(attention="sdpa"):
        assert select() == "sdpa"
        assert select("reference") == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "attention=sdpa,region_kl_loss=reference")
    with fastvl.use_backend("reference"):
        assert select() == "reference"
    assert select() == "sdpa"
    monkeypatch.setenv("FASTVL_BACKEND", "cpp")  # global choice an op lacks: auto for that op
    assert select() == "sdpa"


def test_unknown_or_unusable_backend_lists_reasons():
    toy = Op("toy")
    toy.register("fast", available=lambda: ["package 'fastpkg' is not installed"])(lambda x: x)
    toy.register("cuda_only", supports=lambda device, **_: [] if device.type == "cuda" else ["needs CUDA"])(lambda x: x)
    toy.register("reference")(lambda x: x)
    cpu = torch.device("cpu")
    assert toy.select(None, cpu).name == "reference"
    with pytest.raises(BackendUnavailableError, match=r"(?s)fast: package 'fastpkg' is not installed.*cuda_only: needs CUDA"):
        toy.select("fast", cpu)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        toy.select("nope", cpu)


def test_per_call_backend_reaches_the_op():
    q = _q(1, 3, 2, 8)
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        fastvl.ops.attention(q, q, q, backend="does_not_exist")
    torch.testing.assert_close(fastvl.ops.attention(q, q, q, backend="sdpa"),
                               fastvl.ops.attention(q, q, q, backend="reference"))
