"""linear_region_kl_loss and linear_cross_entropy: the chunked fused backends against the float64
reference (which projects every row), for the loss and the gradients of hidden, weight and bias."""

import pytest
import torch

from fastvl import ops
from fastvl.reference.cross_entropy import linear_cross_entropy_ref
from fastvl.reference.region_kl import linear_region_kl_loss_ref
from fastvl.testing import check_op


def projection(shape, features, classes, *, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, features, generator=generator)
    weight = torch.randn(classes, features, generator=generator) / features ** 0.5
    b = torch.randn(classes, generator=generator) if bias else None
    return [t.to(device, dtype) if t is not None else None for t in (hidden, weight, b)]


def region_targets(shape, classes, mask_kind, seed=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.softmax(torch.randn(*shape, classes, generator=generator) * 2, dim=-1)
    targets = targets * (torch.rand(*shape, classes, generator=generator) > 0.3)  # exact zeros
    targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    rows = torch.rand(*shape, generator=generator)
    mask = {"random": rows < 0.3, "none": torch.zeros(shape, dtype=torch.bool), "one": rows == rows.max(),
            "all": torch.ones(shape, dtype=torch.bool)}[mask_kind]
    return targets.to(device), mask.to(device)


def mlm_labels(shape, vocab, kind, ignore_index, seed=2, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=generator)
    keep = {"random": torch.rand(shape, generator=generator) < 0.15, "none": torch.zeros(shape, dtype=torch.bool),
            "all": torch.ones(shape, dtype=torch.bool)}[kind]
    return torch.where(keep, labels, torch.full_like(labels, ignore_index)).to(device)


def check_region(backend, hidden, weight, bias, targets, mask, reduction="mean", chunk_rows=None):
    inputs = [hidden, weight, bias, targets, mask]
    grads = [True, True, bias is not None, False, False]
    return check_op(
        lambda h, w, b, p, m: ops.linear_region_kl_loss(h, w, b, p, m, reduction, chunk_rows=chunk_rows, backend=backend),
        lambda h, w, b, p, m: linear_region_kl_loss_ref(h, w, b, p, m, reduction), inputs, grad=grads,
        name=f"linear_region_kl[{backend}, {reduction}]")


def check_ce(backend, hidden, weight, bias, labels, ignore_index=-1, reduction="mean", chunk_rows=None):
    return check_op(
        lambda h, w, b: ops.linear_cross_entropy(h, w, b, labels, ignore_index, reduction, chunk_rows=chunk_rows,
                                                 backend=backend),
        lambda h, w, b: linear_cross_entropy_ref(h, w, b, labels, ignore_index, reduction), [hidden, weight, bias],
        grad=[True, True, bias is not None], name=f"linear_cross_entropy[{backend}, {reduction}]")


# Chunk sizes that do not divide the selected row count (and one chunk holding everything).
CASES = [("cpp", (2, 37), 1601, 9), ("cpp", (3, 23), 301, None),
         pytest.param("triton", (2, 7), 1601, 3, marks=pytest.mark.interpret)]


@pytest.mark.parametrize("backend,shape,classes,chunk_rows", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", ["random", "one", "all"])
def test_linear_region_kl_parity(backend, shape, classes, chunk_rows, reduction, mask_kind):
    hidden, weight, bias = projection(shape, 48, classes)
    check_region(backend, hidden, weight, bias, *region_targets(shape, classes, mask_kind), reduction, chunk_rows)


@pytest.mark.parametrize("backend,shape,vocab,chunk_rows", [
    ("cpp", (3, 36), 3001, 7), ("cpp", (5, 23), 517, None),
    pytest.param("triton", (2, 9), 2500, 2, marks=pytest.mark.interpret)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_linear_cross_entropy_parity(backend, shape, vocab, chunk_rows, reduction, ignore_index):
    hidden, weight, bias = projection(shape, 48, vocab)
    labels = mlm_labels(shape, vocab, "random" if backend == "cpp" else "all", ignore_index)
    check_ce(backend, hidden, weight, bias, labels, ignore_index, reduction, chunk_rows)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpret)])
def test_without_bias(backend):
    hidden, weight, _ = projection((2, 5), 16, 301, bias=False)
    check_region(backend, hidden, weight, None, *region_targets((2, 5), 301, "random"), chunk_rows=2)
    check_ce(backend, hidden, weight, None, mlm_labels((2, 5), 301, "all", -1), chunk_rows=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpp(dtype):
    hidden, weight, bias = projection((3, 17), 32, 1601, dtype=dtype)
    check_region("cpp", hidden, weight, bias, *region_targets((3, 17), 1601, "random"), chunk_rows=4)
    check_ce("cpp", hidden, weight, bias, mlm_labels((3, 17), 1601, "random", -1), chunk_rows=4)


@pytest.mark.parametrize("vocab", [30522, 65536])
def test_bert_and_64k_vocab_cpp(vocab):
    hidden, weight, bias = projection((2, 9), 32, vocab)
    check_ce("cpp", hidden, weight, bias, mlm_labels((2, 9), vocab, "random", -1, seed=5), chunk_rows=2)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpret)])
def test_nothing_selected_gives_zero_loss_and_zero_grads(backend):
    hidden, weight, bias = projection((3, 5), 16, 301)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    targets, mask = region_targets((3, 5), 301, "none")
    kl = ops.linear_region_kl_loss(hidden, weight, bias, targets, mask, backend=backend)
    ce = ops.linear_cross_entropy(hidden, weight, bias, mlm_labels((3, 5), 301, "none", -100), -100, backend=backend)
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_torch_compile_fullgraph():
    hidden, weight, bias = projection((3, 11), 16, 301)
    targets, mask = region_targets((3, 11), 301, "random")
    labels = mlm_labels((3, 11), 301, "random", -1)

    def losses(h, w, b):
        return (ops.linear_region_kl_loss(h, w, b, targets, mask, backend="cpp", chunk_rows=4)
                + ops.linear_cross_entropy(h, w, b, labels, backend="cpp", chunk_rows=4))

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    compiled_in = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    losses(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("call,error,message", [
    (lambda: ops.linear_cross_entropy(torch.randn(2, 5, 8), torch.randn(30, 8), None,
                                      torch.full((2, 5), 30)), ValueError, r"labels must be in \[0, V\) = \[0, 30\)"),
    (lambda: ops.linear_cross_entropy(torch.randn(2, 5, 8), torch.randn(30, 8), None,
                                      torch.full((2, 5), -5), ignore_index=-100), ValueError, "found -5"),
    (lambda: ops.linear_cross_entropy(torch.randn(2, 5, 8), torch.randn(30, 8), None,
                                      torch.zeros(2, 4, dtype=torch.int64)), ValueError, "labels must have shape"),
    (lambda: ops.linear_cross_entropy(torch.randn(2, 5, 8), torch.randn(30, 8).half(), None,
                                      torch.zeros(2, 5, dtype=torch.int64)), TypeError, "weight has dtype"),
    (lambda: ops.linear_region_kl_loss(torch.randn(2, 5, 8), torch.randn(7, 8), None, torch.rand(2, 5, 6),
                                       torch.ones(2, 5, dtype=torch.bool)), ValueError, "target_probs must have shape"),
    (lambda: ops.linear_region_kl_loss(torch.randn(2, 5, 8), torch.randn(7, 8), None, torch.rand(2, 5, 7),
                                       torch.ones(2, 5, dtype=torch.bool), chunk_rows=0), ValueError, "chunk_rows"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu(dtype):
    hidden, weight, bias = projection((64, 37), 1024, 1601, dtype=dtype, device="cuda")
    check_region("triton", hidden, weight, bias, *region_targets((64, 37), 1601, "random", device="cuda"),
                 chunk_rows=100)
    hidden, weight, bias = projection((64, 36), 768, 30522, dtype=dtype, device="cuda")
    check_ce("triton", hidden, weight, bias, mlm_labels((64, 36), 30522, "random", -1, device="cuda"), chunk_rows=100)
