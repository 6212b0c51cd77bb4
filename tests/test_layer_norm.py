"""fastvl.ops.layer_norm (residual + dropout + LayerNorm) against the float64 reference."""

import pytest
import torch

import fastvl
from fastvl.ops.layer_norm_op import _layer_norm_fwd
from fastvl.reference.layer_norm import layer_norm_ref
from fastvl.testing import check_op


def _inputs(generator, shape, residual=True, bias=True):
    hidden = shape[-1]
    x = torch.randn(*shape, generator=generator) * 2 + 0.5
    weight = torch.randn(hidden, generator=generator)
    return (x, torch.randn(*shape, generator=generator) if residual else None, weight,
            torch.randn(hidden, generator=generator) if bias else None)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("shape,residual,bias", [((2, 23, 48), True, True), ((37, 130), False, True),
                                                  ((5, 64), True, False), ((1, 1, 768), True, True)])
def test_forward_backward_parity(generator, backend, shape, residual, bias):
    x, res, weight, b = _inputs(generator, shape, residual, bias)
    inputs = [t for t in (x, res, weight, b) if t is not None]

    def split(args):
        args = list(args)
        return args.pop(0), (args.pop(0) if residual else None), args.pop(0), (args.pop(0) if bias else None)

    def fused(*args):
        x_, r_, w_, b_ = split(args)
        return fastvl.ops.layer_norm(x_, w_, b_, r_, eps=1e-5, backend=backend)

    def reference(*args):
        x_, r_, w_, b_ = split(args)
        return layer_norm_ref(x_, w_, b_, r_, eps=1e-5)

    check_op(fused, reference, inputs, name=f"layer_norm[{backend}]")


@pytest.mark.interpret
def test_triton_dropout_replays_its_keep_mask(generator):
    x, res, weight, bias = _inputs(generator, (3, 7, 40))
    seed = torch.tensor([2024])
    keep = _layer_norm_fwd(x, res, weight, bias, seed, 0.25, 1e-12)[2].view(x.shape).bool()
    assert 0.6 < keep.float().mean() < 0.9
    check_op(lambda *a: _layer_norm_fwd(a[0], a[1], a[2], a[3], seed, 0.25, 1e-12)[0],
             lambda *a: layer_norm_ref(a[0], a[2], a[3], a[1], 0.25, dropout_mask=keep), [x, res, weight, bias],
             name="layer_norm dropout")
    again = _layer_norm_fwd(x, res, weight, bias, seed, 0.25, 1e-12)[2].view(x.shape).bool()
    assert torch.equal(keep, again)


@pytest.mark.interpret
def test_triton_float16_parity(generator):
    x, res, weight, bias = (t.half() for t in _inputs(generator, (9, 96)))
    check_op(lambda *a: fastvl.ops.layer_norm(a[0], a[2], a[3], a[1], backend="triton"),
             lambda *a: layer_norm_ref(a[0], a[2], a[3], a[1]), [x, res, weight, bias], name="layer_norm fp16")


def test_auto_uses_reference_on_cpu_and_matches_torch(generator):
    x, res, weight, bias = _inputs(generator, (4, 32))
    assert fastvl.ops.layer_norm.__module__ == "fastvl.ops.layer_norm_op"
    from fastvl.dispatch import op

    assert op("layer_norm").select(None, x.device, dtype=x.dtype, hidden=32, dropout=False).name == "reference"
    expected = torch.nn.functional.layer_norm(x + res, (32,), weight, bias, 1e-12)
    torch.testing.assert_close(fastvl.ops.layer_norm(x, weight, bias, res), expected)


def test_bad_inputs(generator):
    x, res, weight, bias = _inputs(generator, (4, 32))
    with pytest.raises(ValueError, match="weight"):
        fastvl.ops.layer_norm(x, weight[:16], bias)
    with pytest.raises(ValueError, match="residual"):
        fastvl.ops.layer_norm(x, weight, bias, res[:2])
    with pytest.raises(TypeError, match="residual"):
        fastvl.ops.layer_norm(x, weight, bias, res.long())
    with pytest.raises(ValueError, match="dropout_p"):
        fastvl.ops.layer_norm(x, weight, bias, dropout_p=1.0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_low_precision_sublayer_on_float32_residual_stream(generator, backend):
    # under autocast a bf16 sub-layer output meets the float32 residual stream: the result is float32
    x, res, weight, bias = _inputs(generator, (5, 48))
    x = x.bfloat16().requires_grad_(True)
    res.requires_grad_(True)
    out = fastvl.ops.layer_norm(x, weight, bias, res, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer_norm_ref(x.detach().double(), weight, bias, res.detach()).float())
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and res.grad.dtype == torch.float32


@pytest.mark.interpret
def test_compiles_without_graph_breaks(generator):
    x, res, weight, bias = _inputs(generator, (6, 48))
    x.requires_grad_(True)

    def block(x_, r_):
        with fastvl.use_backend(layer_norm="triton"):
            return fastvl.ops.layer_norm(x_ * 2, weight, bias, r_)

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    out = compiled(x, res)
    out.sum().backward()
    torch.testing.assert_close(out, layer_norm_ref(x.detach() * 2, weight, bias, res))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [768, 1024, 3000])
def test_gpu_parity(dtype, hidden):
    generator = torch.Generator().manual_seed(hidden)
    x, res, weight, bias = (t.cuda() for t in _inputs(generator, (4, 37, hidden)))
    x, res = x.to(dtype), res.to(dtype)
    check_op(lambda *a: fastvl.ops.layer_norm(a[0], a[2], a[3], a[1]), lambda *a: layer_norm_ref(a[0], a[2], a[3], a[1]),
             [x, res, weight, bias], name=f"layer_norm {dtype}")


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_dropout_keeps_1_minus_p():
    from fastvl.dispatch import op

    x = torch.randn(64, 1024, device="cuda")
    assert op("layer_norm").select(None, x.device, dtype=x.dtype, hidden=1024, dropout=True).name == "triton"
    seed = torch.tensor([7], device="cuda")
    keep = _layer_norm_fwd(x, None, torch.ones(1024, device="cuda"), None, seed, 0.1, 1e-12)[2]
    assert abs(keep.float().mean().item() - 0.9) < 0.01


@pytest.mark.interpret
def test_custom_op_registration(generator):
    x, res, weight, bias = (t.requires_grad_(True) for t in _inputs(generator, (2, 40)))
    for args in ((x, res, weight, bias, None, 0.0, 1e-12), (x, None, weight, bias, torch.tensor([3]), 0.2, 1e-12)):
        results = torch.library.opcheck(_layer_norm_fwd, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_unavailable_backends_say_why(generator):
    import importlib.util

    from fastvl import BackendUnavailableError

    x, res, weight, bias = _inputs(generator, (2, 16))
    if importlib.util.find_spec("apex") is None:
        with pytest.raises(BackendUnavailableError, match="apex.*not installed"):
            fastvl.ops.layer_norm(x, weight, bias, res, backend="apex")
    with pytest.raises(BackendUnavailableError, match="float64"):
        fastvl.ops.layer_norm(x.double(), weight, bias, res.double(), backend="triton")


@pytest.mark.interpret
@pytest.mark.parametrize("residual", [False, True])
def test_triton_non_contiguous_inputs_and_inference(generator, residual):
    # the fused path passes contiguous rows to the kernels: transposed views are copied, in the forward
    # and (x saved as given when no sum is stored) in the backward; under no_grad nothing is kept
    x = (torch.randn(40, 23, generator=generator) * 2).t().requires_grad_(True)
    res = torch.randn(40, 23, generator=generator).t().requires_grad_(True) if residual else None
    weight, bias = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    out = fastvl.ops.layer_norm(x, weight, bias, res, eps=1e-5, backend="triton")
    expected = layer_norm_ref(x.detach().double(), weight.double(), bias.double(),
                              res.detach().double() if residual else None, eps=1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(23, 40, generator=generator)
    out.backward(grad)
    x_ref = x.detach().double().requires_grad_(True)
    res_ref = res.detach().double().requires_grad_(True) if residual else None
    layer_norm_ref(x_ref, weight.double(), bias.double(), res_ref, eps=1e-5).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    if residual:
        torch.testing.assert_close(res.grad.double(), res_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        again = fastvl.ops.layer_norm(x, weight, bias, res, eps=1e-5, backend="triton")
    assert again.grad_fn is None
    torch.testing.assert_close(again, out.detach())
