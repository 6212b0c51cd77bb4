"""Bad input to every public op raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

from fastvl import ops


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


ATTENTION_CASES = [
    (lambda: ops.attention(t(2, 5, 4), t(2, 5, 4), t(2, 5, 4)), ValueError, r"q must have shape \[B, Lq, H, D\]"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 3, 8), t(2, 6, 3, 8)), ValueError, r"k must have shape .*H=4, D=8"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(3, 6, 4, 8), t(3, 6, 4, 8)), ValueError, "same batch size"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 16)), ValueError, "v must have shape"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), torch.ones(2, 5, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \[B, L\] = \[2, 6\]"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), torch.ones(2, 6, dtype=torch.int64)),
     TypeError, "key_padding_mask must be bool"),
    (lambda: ops.attention(torch.ones(2, 5, 4, 8, dtype=torch.int64), t(2, 6, 4, 8), t(2, 6, 4, 8)),
     TypeError, "q must have a dtype in"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8, dtype=torch.float16), t(2, 6, 4, 8)), TypeError,
     "k has dtype"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), dropout_p=1.5), ValueError, "dropout_p"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "never decrease"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0, 4, 6], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 6 must equal the packed length 7"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0.0, 7.0]),
                           cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), TypeError, "cu_seqlens_q must be an int32"),
]

CO_ATTENTION_CASES = [
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), None, t(2, 3, 2, 8), t(2, 3, 2, 8),
                              t(2, 3, 2, 8), None), ValueError, r"q_t must have shape \[B, Lt, H, D\]"),
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), torch.ones(2, 3, dtype=torch.bool),
                              t(2, 3, 4, 8), t(2, 3, 4, 8), t(2, 3, 4, 8), None), ValueError, "mask_v must have shape"),
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), None, t(3, 3, 4, 8), t(3, 3, 4, 8),
                              t(3, 3, 4, 8), None), ValueError, "q_t must have shape"),
]

LOSS_CASES = [
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)), ValueError,
     "target_probs must have shape"),
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 7), torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "region_mask must have shape"),
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 7), torch.ones(2, 5, dtype=torch.bool), reduction="avg"),
     ValueError, "reduction must be one of"),
    (lambda: ops.linear_region_kl_loss(t(2, 5, 8), t(7, 9), None, t(2, 5, 7), torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "weight must have shape"),
    (lambda: ops.linear_cross_entropy(t(2, 5, 8), t(30, 8), t(29), torch.zeros(2, 5, dtype=torch.int64)),
     ValueError, "bias must have shape"),
    (lambda: ops.linear_cross_entropy(t(2, 5, 8), t(30, 8), None, torch.zeros(2, 5)), TypeError, "labels must have a dtype"),
    (lambda: ops.itc_loss(t(4, 8), t(4, 8), t(8, 16), t(8, 16), -0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     "temp must be > 0"),
    (lambda: ops.itc_loss(t(4, 8), t(4, 8), t(16, 8), t(16, 8), 0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     r"img_queue must have shape \[E, Q\]"),
    (lambda: ops.itc_loss(t(4, 8), t(3, 8), t(8, 16), t(8, 16), 0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     "txt_feat must have shape"),
]


@pytest.mark.parametrize("call,error,message", ATTENTION_CASES + CO_ATTENTION_CASES + LOSS_CASES)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_additive_mask_is_converted():
    q = t(2, 3, 2, 8)
    k = t(2, 4, 2, 8)
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    additive = (1.0 - keep.float())[:, None, None, :] * -10000.0
    torch.testing.assert_close(ops.attention(q, k, k, additive), ops.attention(q, k, k, keep))


# Faults found by issue 11 (each failed or gave a misleading error before) ------------------------------

CU = torch.tensor([0, 4, 7], dtype=torch.int32)  # lengths 4, 3
CU_K = torch.tensor([0, 5, 9], dtype=torch.int32)  # lengths 5, 4
PACKED_BACKENDS = ["reference", "sdpa", pytest.param("triton", marks=pytest.mark.interpret)]


def _packed_attention(backend, **lengths):
    return ops.attention(t(7, 2, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=CU.clone(), cu_seqlens_k=CU_K.clone(),
                         backend=backend, **lengths)


def _packed_co_attention(backend, **lengths):
    v, x = (t(9, 2, 16) for _ in range(3)), (t(7, 2, 16) for _ in range(3))
    return ops.co_attention(*v, None, *x, None, cu_seqlens_v=CU_K.clone(), cu_seqlens_t=CU.clone(), backend=backend,
                            **lengths)


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
@pytest.mark.parametrize("call,lengths,message", [
    (_packed_attention, dict(max_seqlen_q=3), r"max_seqlen_q = 3 is below the longest sequence of cu_seqlens_q \(4\)"),
    (_packed_attention, dict(max_seqlen_k=4), r"max_seqlen_k = 4 is below the longest sequence of cu_seqlens_k \(5\)"),
    (_packed_attention, dict(max_seqlen_q=0), r"max_seqlen_q must be >= 1"),
    (_packed_attention, dict(max_seqlen_k=-2), r"max_seqlen_k must be >= 1"),
    (_packed_attention, dict(max_seqlen_q=4.0), r"max_seqlen_q must be an int"),
    (_packed_co_attention, dict(max_seqlen_v=4), r"max_seqlen_v = 4 is below the longest sequence of cu_seqlens_v"),
    (_packed_co_attention, dict(max_seqlen_t=0), r"max_seqlen_t must be >= 1"),
])
def test_packed_max_seqlen_below_the_longest_sequence_is_refused(backend, call, lengths, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(backend, **lengths)


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
def test_packed_max_seqlen_at_or_above_the_longest_sequence_runs(backend):
    exact = _packed_attention("reference")
    torch.manual_seed(0)
    out = _packed_attention(backend, max_seqlen_q=4, max_seqlen_k=9)
    torch.manual_seed(0)
    torch.testing.assert_close(out, _packed_attention("reference", max_seqlen_q=4, max_seqlen_k=9))
    assert out.shape == exact.shape


def test_cu_seqlens_changed_in_place_is_validated_again():
    cu = CU.clone()
    q, k = t(7, 2, 16), t(7, 2, 16)
    ops.attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu)
    cu[1] = 9  # now decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and never decrease"):
        ops.attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.interpret
@pytest.mark.parametrize("call", [
    lambda: ops.attention(t(1, 16, 1, 16, dtype=torch.bfloat16), t(1, 16, 1, 16, dtype=torch.bfloat16),
                          t(1, 16, 1, 16, dtype=torch.bfloat16), backend="triton"),
    lambda: ops.co_attention(*(t(1, 16, 1, 16, dtype=torch.bfloat16) for _ in range(3)), None,
                             *(t(1, 16, 1, 16, dtype=torch.bfloat16) for _ in range(3)), None, backend="triton"),
])
def test_bfloat16_triton_is_refused_under_the_interpreter(call):
    from fastvl.dispatch import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"bfloat16 under TRITON_INTERPRET=1 .*tl.dot"):
        call()


def test_auto_never_picks_interpreted_bfloat16_triton():
    q = t(1, 16, 1, 16, dtype=torch.bfloat16)
    assert ops.attention(q, q, q).dtype == torch.bfloat16  # falls back to sdpa on the CPU


FUSED_LOSS_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.parametrize("backend", FUSED_LOSS_BACKENDS)
def test_linear_region_kl_with_no_regions_is_zero(backend):
    hidden, weight = t(0, 16).requires_grad_(), t(7, 16).requires_grad_()
    loss = ops.linear_region_kl_loss(hidden, weight, None, torch.full((0, 7), 1 / 7), torch.zeros(0, dtype=torch.bool),
                                     backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", FUSED_LOSS_BACKENDS)
@pytest.mark.parametrize("call,error,message", [
    (lambda b: ops.region_kl_loss(t(5, 0), t(5, 0), torch.ones(5, dtype=torch.bool), backend=b), ValueError,
     r"logits must have shape \[\.\.\., C\] with C >= 1"),
    (lambda b: ops.linear_region_kl_loss(t(5, 8), t(0, 8), None, t(5, 0), torch.ones(5, dtype=torch.bool), backend=b),
     ValueError, r"weight must have shape \[C, K\] with C >= 1"),
    (lambda b: ops.itc_loss(t(4, 8, dtype=torch.float16), t(4, 8), t(8, 16), t(8, 16), 0.07, 0.4, t(4, 8), t(4, 8),
                            backend=b), TypeError, "txt_feat has dtype torch.float32 but img_feat has torch.float16"),
    (lambda b: ops.itc_loss(t(4, 8), t(4, 8), t(8, 16, dtype=torch.float16), t(8, 16), 0.07, 0.4, t(4, 8), t(4, 8),
                            backend=b), TypeError, "img_queue has dtype"),
    (lambda b: ops.itc_loss(t(0, 8), t(0, 8), t(8, 16), t(8, 16), 0.07, 0.4, t(0, 8), t(0, 8), backend=b), ValueError,
     "itc_loss needs a batch B >= 1"),
    (lambda b: ops.itc_loss(t(4, 8), t(4, 8), t(8, 16), t(8, 16), "0.07", 0.4, t(4, 8), t(4, 8), backend=b),
     TypeError, "temp must be a float > 0 or a one-element tensor, got str"),
    (lambda b: ops.attention(t(2, 5, 2, 0), t(2, 5, 2, 0), t(2, 5, 2, 0), backend=b.replace("cpp", "sdpa")),
     ValueError, "head dim D >= 1"),
])
def test_degenerate_shapes_and_types_get_clear_errors(backend, call, error, message):
    with pytest.raises(error, match=message):
        call(backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("slot", ["k", "v"])
def test_inf_in_a_padded_key_slot_stays_out_of_the_sample(backend, slot):
    q, k, v = (t(2, 5, 2, 16).requires_grad_() for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    poisoned = {"k": k, "v": v}
    poisoned[slot] = poisoned[slot].detach().clone()
    poisoned[slot][0, 3] = float("inf")
    poisoned[slot].requires_grad_()
    out = ops.attention(q, poisoned["k"], poisoned["v"], mask, backend=backend)
    clean = ops.attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, clean)
    grads = torch.autograd.grad(out.sum(), (q, poisoned["k"], poisoned["v"]))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[1 if slot == "k" else 2][0, 3]) == 0


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_inf_in_a_padded_slot_of_the_co_attention_stays_out(backend):
    streams = [t(2, 5, 2, 16) for _ in range(3)] + [t(2, 4, 2, 16) for _ in range(3)]
    mask_v = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    mask_t = torch.tensor([[1, 1, 0, 0], [1] * 4], dtype=torch.bool)
    clean = ops.co_attention(*streams[:3], mask_v, *streams[3:], mask_t, backend="reference")
    streams[1][0, 4] = streams[2][0, 3] = streams[4][0, 2] = float("inf")
    for got, want in zip(ops.co_attention(*streams[:3], mask_v, *streams[3:], mask_t, backend=backend), clean):
        torch.testing.assert_close(got, want)


def test_packed_sdpa_keeps_another_sequence_inf_out():
    q, k = t(7, 2, 16), t(9, 2, 16)
    cu_k = torch.tensor([0, 3, 9], dtype=torch.int32)
    k[4] = float("inf")  # a key of sequence 1, read again (then zeroed) as padding of the shorter sequence 0
    out = ops.attention(q, k, t(9, 2, 16), cu_seqlens_q=CU, cu_seqlens_k=cu_k, backend="sdpa")
    assert torch.isfinite(out[:4]).all()
