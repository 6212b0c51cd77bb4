"""The fused ops' two paths (fastvl.ops.eager_path): eager calls run their launches under a plain
autograd.Function, without the torch.library custom op (whose dispatch costs more host time than the
launches at VL shapes); torch.compile traces the custom op, one node per call. Both give the
reference's values (the op test modules check parity in depth; here, that the paths agree)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvl import ops


class _Namespaces(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).requires_grad_()


def _layer_norm():
    x, res, weight, bias = _t(5, 32), _t(5, 32), _t(32), _t(32)
    return lambda backend: ops.layer_norm(x, weight, bias, res, backend=backend), (x, res, weight, bias), "triton"


def _bias_gelu():
    x, bias = _t(5, 40), _t(40)
    return lambda backend: ops.bias_gelu(x, bias, backend=backend), (x, bias), "triton"


def _region_kl():
    logits, targets = _t(7, 19), torch.softmax(torch.randn(7, 19), -1)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    return lambda backend: ops.region_kl_loss(logits, targets, mask, backend=backend), (logits,), "cpp"


def _linear_cross_entropy():
    hidden, weight, bias = _t(7, 8), _t(19, 8), _t(19)
    labels = torch.tensor([1, -1, 3, 18, -1, 0, 5])
    return (lambda backend: ops.linear_cross_entropy(hidden, weight, bias, labels, backend=backend),
            (hidden, weight, bias), "cpp")


def _itc():
    norm = torch.nn.functional.normalize
    feats = [norm(torch.randn(4, 8), dim=-1).requires_grad_() for _ in range(2)]
    queues = [norm(torch.randn(8, 12), dim=0) for _ in range(2)]
    momentum = [norm(torch.randn(4, 8), dim=-1) for _ in range(2)]
    return lambda backend: ops.itc_loss(*feats, *queues, 0.07, 0.4, *momentum, backend=backend), feats, "cpp"


def _mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length - 4:] = False
    return mask


def _attention(fused_qkv):
    def make():
        if fused_qkv:  # the three head groups of one projection: the qkv custom op
            qkv = _t(2, 17, 3, 2, 16)
            inputs, leaves = qkv.unbind(-3), (qkv,)
        else:
            inputs = leaves = (_t(2, 17, 2, 16), _t(2, 19, 2, 16), _t(2, 19, 2, 16))
        mask = _mask(2, inputs[1].shape[1])
        return lambda backend: ops.attention(*inputs, mask, backend=backend), leaves, "triton"

    return make


def _co_attention(fused_qkv):
    def make():
        if fused_qkv:
            qkv_v, qkv_t = _t(2, 17, 3, 2, 16), _t(2, 23, 3, 2, 16)
            stream_v, stream_t, leaves = qkv_v.unbind(-3), qkv_t.unbind(-3), (qkv_v, qkv_t)
        else:
            stream_v, stream_t = [_t(2, 17, 2, 16) for _ in range(3)], [_t(2, 23, 2, 16) for _ in range(3)]
            leaves = (*stream_v, *stream_t)
        masks = _mask(2, 17), _mask(2, 23)

        def call(backend):
            ctx_v, ctx_t = ops.co_attention(*stream_v, masks[0], *stream_t, masks[1], backend=backend)
            return torch.cat((ctx_v.flatten(), 2 * ctx_t.flatten()))

        return call, leaves, "triton"

    return make


CASES = [pytest.param(_layer_norm, marks=pytest.mark.interpret), pytest.param(_bias_gelu, marks=pytest.mark.interpret),
         _region_kl, _linear_cross_entropy, _itc] + [
    pytest.param(make(fused), id=f"{make.__name__[1:]}{'_qkv' if fused else ''}", marks=pytest.mark.interpret)
    for make in (_attention, _co_attention) for fused in (False, True)]


@pytest.mark.parametrize("make", CASES)
def test_eager_calls_skip_the_custom_op_and_compiled_graphs_hold_it(make):
    call, leaves, fused = make()
    recorder = _Namespaces()
    with recorder:
        eager = call(fused)
        eager_grads = torch.autograd.grad(eager.sum(), leaves)
    assert "fastvl" not in recorder.seen and "aten" in recorder.seen

    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()  # every case compiles this same lambda: keep each under the recompile limit
    compiled = torch.compile(lambda: call(fused), fullgraph=True, backend=capture)
    compiled_value = compiled()
    assert any("fastvl" in str(node.target) for graph in graphs for node in graph.graph.nodes)
    compiled_grads = torch.autograd.grad(compiled_value.sum(), leaves)
    torch.testing.assert_close(compiled_value, eager)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
    reference = call("reference")
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
