"""fastvl.ops.bias_gelu (bias + erf GELU) against the float64 reference."""

import math

import pytest
import torch

import fastvl
from fastvl.reference.bias_gelu import bias_gelu_ref
from fastvl.testing import check_op


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("shape,with_bias", [((2, 23, 150), True), ((37, 64), False), ((1, 300), True)])
def test_forward_backward_parity(generator, backend, shape, with_bias):
    x = torch.randn(*shape, generator=generator) * 3
    inputs = [x, torch.randn(shape[-1], generator=generator)] if with_bias else [x]
    check_op(lambda *a: fastvl.ops.bias_gelu(*a, backend=backend), bias_gelu_ref, inputs, name=f"bias_gelu[{backend}]")


@pytest.mark.interpret
def test_triton_float16_parity(generator):
    x = (torch.randn(19, 200, generator=generator) * 3).half()
    bias = torch.randn(200, generator=generator).half()
    check_op(lambda *a: fastvl.ops.bias_gelu(*a, backend="triton"), bias_gelu_ref, [x, bias], name="bias_gelu fp16")


def test_reference_is_the_erf_form(generator):
    h = torch.randn(1000, generator=generator, dtype=torch.float64) * 4
    exact = torch.tensor([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in h.tolist()], dtype=torch.float64)
    torch.testing.assert_close(bias_gelu_ref(h), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fastvl.ops.bias_gelu(h[:-1].view(3, 333), h[-333:]),
                               torch.nn.functional.gelu(h[:-1].view(3, 333) + h[-333:]))


def test_bad_inputs(generator):
    x = torch.randn(4, 8, generator=generator)
    with pytest.raises(ValueError, match="bias"):
        fastvl.ops.bias_gelu(x, torch.randn(7))
    with pytest.raises(TypeError, match="x"):
        fastvl.ops.bias_gelu(torch.ones(4, 8, dtype=torch.long))


@pytest.mark.interpret
def test_compiles_without_graph_breaks(generator):
    x = torch.randn(5, 130, generator=generator, requires_grad=True)
    bias = torch.randn(130, generator=generator, requires_grad=True)
    compiled = torch.compile(lambda a, b: fastvl.ops.bias_gelu(a, b, backend="triton") * 2, fullgraph=True,
                             backend="eager")
    out = compiled(x, bias)
    out.sum().backward()
    torch.testing.assert_close(out, bias_gelu_ref(x.detach(), bias.detach()) * 2)
    assert x.grad is not None and bias.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_parity(dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 37, 3072, generator=generator) * 3).to(dtype).cuda()
    bias = torch.randn(3072, generator=generator).to(dtype).cuda()
    check_op(fastvl.ops.bias_gelu, bias_gelu_ref, [x, bias], name=f"bias_gelu {dtype}")


@pytest.mark.interpret
def test_custom_op_registration(generator):
    from fastvl.ops.bias_gelu_op import _bias_gelu_fwd

    x = torch.randn(2, 3, 40, generator=generator, requires_grad=True)
    bias = torch.randn(40, generator=generator, requires_grad=True)
    for args in ((x, bias), (x, None)):
        results = torch.library.opcheck(_bias_gelu_fwd, args)
        assert set(results.values()) == {"SUCCESS"}, results
