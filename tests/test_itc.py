"""ALBEF's ITC with momentum distillation: fused backends against the float64 reference; the queue
update and the ITM hard-negative sampler."""

import pytest
import torch
import torch.nn.functional as F

from fastvl import ops
from fastvl.reference.itc import itc_loss_ref
from fastvl.testing import check_op


def itc_inputs(batch, embed, queue, *, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape, dim=-1):
        return F.normalize(torch.randn(*shape, generator=generator), dim=dim).to(device, dtype)

    img, txt, img_m, txt_m = (unit(batch, embed) for _ in range(4))
    img_queue, txt_queue = unit(embed, queue, dim=0), unit(embed, queue, dim=0)
    temp = torch.tensor(0.07, device=device)
    return [img, txt, img_queue, txt_queue, temp, img_m, txt_m]


def check(backend, inputs, alpha):
    return check_op(
        lambda i, t, iq, tq, temp, im, tm: ops.itc_loss(i, t, iq, tq, temp, alpha, im, tm, backend=backend),
        lambda i, t, iq, tq, temp, im, tm: itc_loss_ref(i, t, iq, tq, temp, alpha, im, tm), inputs,
        grad=[True, True, False, False, True, False, False], name=f"itc[{backend}]")


@pytest.mark.parametrize("backend,batch,embed,queue", [
    ("cpp", 8, 32, 64), ("cpp", 5, 24, 35),
    pytest.param("triton", 6, 16, 30, marks=pytest.mark.interpret)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_parity(backend, batch, embed, queue, alpha):
    check(backend, itc_inputs(batch, embed, queue), alpha)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpp(dtype):
    check("cpp", itc_inputs(8, 32, 64, dtype=dtype), 0.4)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpret)])
def test_gradients_only_where_asked(backend):
    """A float (or frozen) temperature gets no gradient computed; a temperature alone gets its gradient
    (from the feature gradients the op computes internally), equal to the one with the features'."""
    img, txt, img_queue, txt_queue, temp, img_m, txt_m = itc_inputs(5, 16, 27)

    def grads(with_features, temp_value):
        feats = [t.clone().requires_grad_(with_features) for t in (img, txt)]
        loss = ops.itc_loss(*feats, img_queue, txt_queue, temp_value, 0.4, img_m, txt_m, backend=backend)
        loss.backward()
        return [t.grad for t in feats], loss

    temp_alone = temp.clone().requires_grad_()
    (none_img, none_txt), loss_alone = grads(False, temp_alone)
    assert none_img is None and none_txt is None
    temp_both = temp.clone().requires_grad_()
    (grad_img, grad_txt), loss_both = grads(True, temp_both)
    torch.testing.assert_close(temp_alone.grad, temp_both.grad)
    (float_img, float_txt), loss_float = grads(True, 0.07)
    torch.testing.assert_close(float_img, grad_img)
    torch.testing.assert_close(float_txt, grad_txt)
    torch.testing.assert_close(loss_float, loss_both)
    temp64 = temp.double().requires_grad_()
    itc_loss_ref(*(t.double() for t in (img, txt, img_queue, txt_queue)), temp64, 0.4, img_m.double(),
                 txt_m.double()).backward()
    torch.testing.assert_close(temp_alone.grad.double(), temp64.grad, rtol=1e-4, atol=1e-6)


def test_float_temperature_and_compile():
    img, txt, img_queue, txt_queue, _, img_m, txt_m = itc_inputs(8, 32, 64)

    def loss_fn(i, t):
        return ops.itc_loss(i, t, img_queue, txt_queue, 0.05, 0.4, img_m, txt_m, backend="cpp")

    expected = itc_loss_ref(img, txt, img_queue, txt_queue, 0.05, 0.4, img_m, txt_m)
    torch.testing.assert_close(loss_fn(img, txt), expected)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (img, txt)]
    compiled_in = [t.clone().requires_grad_() for t in (img, txt)]
    loss_fn(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_queue_update_wraps_without_host_sync():
    embed, queue, batch = 4, 12, 4
    img_queue, txt_queue = torch.zeros(embed, queue), torch.zeros(embed, queue)
    ptr = torch.tensor([8])
    img_m, txt_m = torch.randn(batch, embed), torch.randn(batch, embed)
    ops.itc_queue_update_(img_queue, txt_queue, ptr, img_m, txt_m)
    torch.testing.assert_close(img_queue[:, 8:12], img_m.t())
    torch.testing.assert_close(txt_queue[:, 8:12], txt_m.t())
    assert ptr.tolist() == [0]
    ops.itc_queue_update_(img_queue, txt_queue, ptr, img_m * 2, txt_m * 2)
    torch.testing.assert_close(img_queue[:, 0:4], 2 * img_m.t())
    assert ptr.tolist() == [4]
    with pytest.raises(ValueError, match="multiple of the batch"):
        ops.itc_queue_update_(torch.zeros(embed, 10), torch.zeros(embed, 10), ptr, img_m, txt_m)


def test_hard_negatives_follow_similarity_and_skip_the_positive():
    batch = 6
    sim = torch.full((batch, batch + 3), -10.0)
    sim[torch.arange(batch), (torch.arange(batch) + 1) % batch] = 10.0  # one strongly similar negative per row
    sim.fill_diagonal_(10.0)  # the positive pair: as similar, and never drawn
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([ops.itm_hard_negatives(sim, sim, generator)[0] for _ in range(100)])
    assert not (draws == torch.arange(batch)).any()
    favourite = (torch.arange(batch) + 1) % batch
    assert (draws == favourite).float().mean() > 0.95


def test_hard_negatives_of_a_non_finite_row_are_uniform_off_the_diagonal():
    batch = 5
    sim = torch.randn(batch, batch)
    sim[2, 1] = float("nan")  # an overflowed fp16 step: the row is drawn uniformly, never the positive
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([ops.itm_hard_negatives(sim, sim, generator)[0] for _ in range(400)])
    assert not (draws == torch.arange(batch)).any()
    counts = torch.bincount(draws[:, 2], minlength=batch)
    assert counts[2] == 0 and (counts[[0, 1, 3, 4]] > 60).all()


@pytest.mark.parametrize("call,message", [
    (lambda: ops.itc_loss(*itc_inputs(4, 8, 16)[:4], torch.tensor(-0.07), 0.4, *itc_inputs(4, 8, 16)[5:]),
     "temp must be > 0"),
    (lambda: ops.itc_loss(*itc_inputs(4, 8, 16)[:4], -0.07, 0.4, *itc_inputs(4, 8, 16)[5:]), "temp must be > 0"),
    (lambda: ops.itc_loss(*itc_inputs(4, 8, 16)[:4], 0.07, 1.5, *itc_inputs(4, 8, 16)[5:]), "alpha must be in"),
    (lambda: ops.itm_hard_negatives(torch.randn(1, 4), torch.randn(1, 4)), "B >= 2"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu(dtype):
    check("triton", itc_inputs(64, 256, 65536, dtype=dtype, device="cuda"), 0.4)
