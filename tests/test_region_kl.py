"""region_kl_loss: fused backends (cpp on the CPU, Triton under the interpreter or on a GPU) against the
float64 reference under the parity rule, for forward and gradient."""

import pytest
import torch

from fastvl import dispatch, ops
from fastvl.reference.region_kl import region_kl_loss_ref
from fastvl.testing import check_op

INTERPRET_BACKEND = pytest.param("triton", marks=pytest.mark.interpret)
FUSED_CPU = ["cpp", INTERPRET_BACKEND]


def make_inputs(shape, classes, mask_kind, *, dtype=torch.float32, target_dtype=None, scale=1.0, zeros=False,
                seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, classes, generator=generator) * scale
    targets = torch.softmax(torch.randn(*shape, classes, generator=generator) * 2, dim=-1)
    if zeros:  # detector distributions with exact zeros (0 log 0 = 0)
        targets = targets * (torch.rand(*shape, classes, generator=generator) > 0.5)
        targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    rows = torch.rand(*shape, generator=generator)
    mask = {"random": rows < 0.4, "none": torch.zeros(shape, dtype=torch.bool),
            "one": (rows == rows.max()), "all": torch.ones(shape, dtype=torch.bool)}[mask_kind]
    return (logits.to(device, dtype), targets.to(device, target_dtype or dtype), mask.to(device))


def check(backend, inputs, reduction="mean"):
    return check_op(lambda x, p, m: ops.region_kl_loss(x, p, m, reduction, backend=backend),
                    lambda x, p, m: region_kl_loss_ref(x, p, m, reduction), inputs, grad=[True, False, False],
                    name=f"region_kl[{backend}, {reduction}]")


# (backend, leading shape, classes): odd sizes, 1601 (ViLBERT) and a row longer than the largest Triton
# block (4500 > 4096: two blocks). The interpreter gets few rows.
PARITY_CASES = [("cpp", (3, 37), 1601), ("cpp", (23,), 37), ("cpp", (2, 5), 4500),
                pytest.param("triton", (7,), 1601, marks=pytest.mark.interpret),
                pytest.param("triton", (2, 3), 37, marks=pytest.mark.interpret),
                pytest.param("triton", (3,), 4500, marks=pytest.mark.interpret)]


@pytest.mark.parametrize("backend,shape,classes", PARITY_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", ["random", "one", "all"])
def test_parity_fp32(backend, shape, classes, reduction, mask_kind):
    check(backend, make_inputs(shape, classes, mask_kind), reduction)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("dtype,target_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_parity_half_precision(backend, dtype, target_dtype):
    check(backend, make_inputs((3, 5), 1601, "random", dtype=dtype, target_dtype=target_dtype))


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_targets_with_exact_zeros(backend):
    check(backend, make_inputs((3, 7), 301, "random", zeros=True), "sum")


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_large_logits_do_not_overflow(backend):
    inputs = make_inputs((2, 5), 1601, "random", scale=1e4)
    results = check(backend, inputs)
    assert all(not r.has_nan for r in results)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nothing_masked_gives_zero_loss_and_zero_grad(backend, dtype):
    logits, targets, mask = make_inputs((3, 5), 1601, "none", dtype=dtype)
    logits.requires_grad_(True)
    loss = ops.region_kl_loss(logits, targets, mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_32k_classes_cpp():
    check("cpp", make_inputs((3,), 32000, "all"))


def test_strided_logits_cpp():
    logits, targets, mask = make_inputs((6, 5), 1601, "random")
    padded = torch.randn(6, 5, 1700)
    padded[..., :1601] = logits
    check("cpp", (padded[..., :1601], targets, mask), "none")


def test_auto_picks_cpp_on_cpu():
    from fastvl.ops.region_kl_op import REGION_KL

    chosen = REGION_KL.select(None, torch.device("cpu"), dtype=torch.float32, target_dtype=torch.float32, classes=1601)
    assert chosen.name == "cpp"


def test_torch_compile_fullgraph():
    logits, targets, mask = make_inputs((3, 37), 1601, "random")

    def loss_fn(x, p, m):
        return ops.region_kl_loss(x, p, m, backend="cpp") * 2

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    compiled(x1, targets, mask).backward()
    loss_fn(x2, targets, mask).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("call,message", [
    (lambda: ops.region_kl_loss(torch.randn(2, 5, 7), torch.rand(2, 7), torch.ones(2, 5, dtype=torch.bool)),
     r"target_probs must have shape"),
    (lambda: ops.region_kl_loss(torch.randn(2, 5, 7), torch.rand(2, 5, 7), torch.ones(5, dtype=torch.bool)),
     r"region_mask must have shape"),
    (lambda: ops.region_kl_loss(torch.randn(2, 5, 7), torch.rand(2, 5, 7), torch.ones(2, 5), reduction="avg"),
     r"reduction must be one of"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cpp_rejects_float64_with_reasons():
    logits, targets, mask = make_inputs((2, 3), 11, "all", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cpp.*dtype torch.float64"):
        ops.region_kl_loss(logits, targets, mask, backend="cpp")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [1601, 32000])
def test_gpu_backends(backend, dtype, classes):
    unavailable = dispatch.op("region_kl_loss").backends[backend].unavailable()
    if unavailable:  # e.g. fastvl._C built without nvcc: `fastvl info` says why
        pytest.skip(f"{backend} backend unavailable: {'; '.join(unavailable)}")
    check(backend, make_inputs((64, 37), classes, "random", dtype=dtype, device="cuda"))
    check(backend, make_inputs((8, 37), classes, "random", dtype=dtype, scale=1e4, device="cuda"), "none")
    check(backend, make_inputs((4, 37), classes, "none", dtype=dtype, device="cuda"))


def test_second_backward_through_one_forward_is_refused():
    logits, targets, mask = make_inputs((2, 5), 301, "all")
    logits.requires_grad_(True)
    loss = ops.region_kl_loss(logits, targets, mask, backend="cpp")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
