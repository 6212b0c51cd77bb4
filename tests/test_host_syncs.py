"""No op reads tensor values back to the host on its hot path (issue 13): one forward + backward of each
op, after a warm-up call, runs under fastvl.testing.forbid_host_syncs (every host read raises; fastvl
treats the CPU tensors as device tensors meanwhile). Packed attention validates its cu_seqlens once per
tensor: the warm-up call pays that read, the layers after it do not. Not here: the Triton interpreter
(it copies every tensor to the host by design; the GPU suite runs these under CUDA's sync debug mode)
and the packed reference (it loops over the sequences on the host, as the eager baseline does)."""

import pytest
import torch

import fastvl
from fastvl import ops
from fastvl.testing import HostSyncError, forbid_host_syncs


def _t(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def _attention_padded(backend):
    q, k, v = _t(2, 7, 2, 16), _t(2, 5, 2, 16), _t(2, 5, 2, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    return lambda: ops.attention(q, k, v, mask, backend=backend), (q, k, v)


def _attention_packed(backend):
    cu_q, cu_k = torch.tensor([0, 4, 7], dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32)
    q, k, v = _t(7, 2, 16), _t(9, 2, 16), _t(9, 2, 16)
    return lambda: ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend), (q, k, v)


def _co_attention(backend):
    streams = [_t(2, 5, 2, 16) for _ in range(3)] + [_t(2, 4, 2, 16) for _ in range(3)]
    mask_v, mask_t = torch.ones(2, 5, dtype=torch.bool), torch.tensor([[1, 1, 0, 0], [1] * 4], dtype=torch.bool)
    return lambda: ops.co_attention(*streams[:3], mask_v, *streams[3:], mask_t, backend=backend), streams


def _co_attention_packed(backend):
    cu_v, cu_t = torch.tensor([0, 5, 9], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    streams = [_t(9, 2, 16) for _ in range(3)] + [_t(7, 2, 16) for _ in range(3)]
    return (lambda: ops.co_attention(*streams[:3], None, *streams[3:], None, cu_seqlens_v=cu_v, cu_seqlens_t=cu_t,
                                     backend=backend), streams)


def _region_kl(backend):
    logits, targets = _t(9, 13), torch.softmax(torch.randn(9, 13), -1)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    return lambda: ops.region_kl_loss(logits, targets, mask, backend=backend), (logits,)


def _linear_region_kl(backend):
    hidden, weight, bias = _t(9, 8), _t(13, 8), _t(13)
    targets, mask = torch.softmax(torch.randn(9, 13), -1), torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    return lambda: ops.linear_region_kl_loss(hidden, weight, bias, targets, mask, backend=backend), (hidden, weight)


def _linear_cross_entropy(backend):
    hidden, weight = _t(9, 8), _t(13, 8)
    labels = torch.tensor([1, -1, 3, 12, -1, 0, -1, 5, 7])
    return lambda: ops.linear_cross_entropy(hidden, weight, None, labels, backend=backend), (hidden, weight)


def _itc(backend):
    norm = torch.nn.functional.normalize
    feats = [norm(torch.randn(4, 8), dim=-1).requires_grad_() for _ in range(2)]
    queues = [norm(torch.randn(8, 16), dim=0) for _ in range(2)]
    temp = torch.tensor(0.07, requires_grad=True)
    momentum = [norm(torch.randn(4, 8), dim=-1) for _ in range(2)]
    return lambda: ops.itc_loss(*feats, *queues, temp, 0.4, *momentum, backend=backend), (*feats, temp)


def _layer_norm(backend):
    x, res, weight, bias = _t(6, 32), _t(6, 32), _t(32), _t(32)
    return lambda: ops.layer_norm(x, weight, bias, res, backend=backend), (x, res, weight)


def _bias_gelu(backend):
    x, bias = _t(6, 32), _t(32)
    return lambda: ops.bias_gelu(x, bias, backend=backend), (x, bias)


CASES = [
    (_attention_padded, ("reference", "sdpa")),
    (_attention_packed, ("sdpa",)),
    (_co_attention, ("reference", "sdpa")),
    (_co_attention_packed, ("sdpa",)),
    (_region_kl, ("reference", "cpp")),
    (_linear_region_kl, ("reference", "cpp")),
    (_linear_cross_entropy, ("reference", "cpp")),
    (_itc, ("reference", "cpp")),
    (_layer_norm, ("reference",)),
    (_bias_gelu, ("reference",)),
]


@pytest.mark.parametrize("make,backend", [pytest.param(make, b, id=f"{make.__name__[1:]}-{b}")
                                          for make, backends in CASES for b in backends])
def test_a_step_of_each_op_reads_nothing_back(make, backend):
    call, leaves = make(backend)
    call()  # warm-up: first-use work (packed batches: one read of each cu_seqlens)
    with forbid_host_syncs():
        outputs = call()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward([o.sum() for o in outputs])
    assert all(t.grad is not None for t in leaves)


def test_forbid_host_syncs_catches_a_read():
    with forbid_host_syncs(), pytest.raises(HostSyncError, match=r"Tensor.item\(\)"):
        torch.ones(2).sum().item()
    assert torch.ones(2).sum().item() == 2.0  # restored


def test_packed_attention_without_a_known_length_reads_cu_seqlens():
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    q = torch.randn(7, 2, 16)
    with forbid_host_syncs(), pytest.raises(HostSyncError):
        ops.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_out_of_range_labels_on_a_device_make_the_loss_nan_without_a_sync():
    hidden, weight = torch.randn(4, 8), torch.randn(13, 8)
    labels = torch.tensor([1, 13, -1, 2])
    with forbid_host_syncs():
        loss = fastvl.ops.linear_cross_entropy(hidden, weight, None, labels, backend="cpp")
        per_row = fastvl.ops.linear_cross_entropy(hidden, weight, None, labels, reduction="none", backend="reference")
    assert torch.isnan(loss) and torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2, 3]]).all()


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten op run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [_linear_region_kl, _linear_cross_entropy])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_fused_linear_losses_have_fixed_shapes_on_a_device(make, reduction, chunk_rows):
    # nonzero sizes its output from the values (a sync on CUDA, a graph break under torch.compile): on a
    # device the fused losses project every row instead, and still equal the reference.
    hidden, weight, bias = _t(9, 8), _t(13, 8), _t(13)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    if make is _linear_region_kl:
        targets = torch.softmax(torch.randn(9, 13), -1)

        def loss(backend):
            return ops.linear_region_kl_loss(hidden, weight, bias, targets, mask, reduction, chunk_rows=chunk_rows,
                                             backend=backend)
    else:
        labels = torch.where(mask, torch.randint(0, 13, (9,)), -100)

        def loss(backend):
            return ops.linear_cross_entropy(hidden, weight, bias, labels, -100, reduction, chunk_rows=chunk_rows,
                                            backend=backend)
    results = {}
    for backend in ("reference", "cpp"):
        recorder = _AtenOps()
        with forbid_host_syncs(), recorder:
            value = loss(backend)
            grads = torch.autograd.grad(value.sum(), (hidden, weight, bias))
        results[backend] = (value, *grads)
    assert "nonzero" not in recorder.names
    for fused, expected in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
