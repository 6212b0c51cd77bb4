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


def test_listeners_see_each_dispatch_and_may_wrap_it():
    q = _q(1, 3, 2, 8)
    seen, wrapped = [], []

    def observe(event, impl):
        seen.append(event)

    def wrap(event, impl):
        def run(*args, **kwargs):
            wrapped.append(event.op)
            return impl(*args, **kwargs)

        return run

    with fastvl.dispatch.listen(observe), fastvl.dispatch.listen(wrap):
        out = fastvl.ops.attention(q, q, q, backend="reference")
        fastvl.ops.bias_gelu(torch.randn(2, 4), torch.randn(4))
    assert [(e.op, e.device.type) for e in seen] == [("attention", "cpu"), ("bias_gelu", "cpu")]
    assert seen[0].backend == "reference" and seen[0].features["head_dim"] == 8 and "device" not in seen[0].features
    assert wrapped == ["attention", "bias_gelu"]
    torch.testing.assert_close(out, fastvl.ops.attention(q, q, q, backend="reference"))
    fastvl.ops.attention(q, q, q)
    assert len(seen) == 2 and len(wrapped) == 2  # gone after the block
