"""``return_probs=True`` of fastvl.ops.attention and fastvl.ops.co_attention (what the layers'
``output_attentions`` runs): dispatched to the backends that materialise the probabilities, parity of
the ``eager`` backend with the float64 reference (outputs, probabilities, and gradients arriving
through both), clear errors from the backends that cannot return them."""

import pytest
import torch

import fastvl
from fastvl import dispatch
from fastvl.dispatch import BackendUnavailableError
from fastvl.reference.attention import attention_ref
from fastvl.testing import check_op

attention, co_attention = fastvl.ops.attention, fastvl.ops.co_attention

CASES = [  # (len_q, len_k, mask, causal)
    (23, 37, "holes", False),
    (37, 23, "fully_masked_row", False),
    (37, 37, "prefix", True),
    (1, 17, None, False),
]


def randn(generator, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


def key_mask(name, batch, length):
    n, b = torch.arange(length)[None, :], torch.arange(batch)[:, None]
    if name is None:
        return None
    if name == "prefix":
        return n < length - 3 * b - 2  # odd real lengths per row
    if name == "holes":
        return (n * 7 + b) % 5 != 0
    return (b == 0) & (n < length)  # batch 1 has no real key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("len_q,len_k,mask_name,causal", CASES)
def test_eager_probabilities_match_the_reference(generator, dtype, len_q, len_k, mask_name, causal):
    q = randn(generator, 2, len_q, 3, 16, dtype=dtype)
    k, v = randn(generator, 2, len_k, 3, 16, dtype=dtype), randn(generator, 2, len_k, 3, 16, dtype=dtype)
    mask = key_mask(mask_name, 2, len_k)

    def eager(q, k, v, mask):
        return attention(q, k, v, mask, causal=causal, return_probs=True, backend="eager")

    def reference(q, k, v, mask):
        return attention_ref(q, k, v, mask, causal=causal, return_probs=True)

    # both outputs compared, and the gradient of q, k, v under upstream gradients into output AND probs
    results = check_op(eager, reference, [q, k, v, mask], name=f"attention probs {dtype}")
    assert len(results) == 5
    if dtype == torch.float32:
        assert all(r.fused_error <= 1e-5 * max(r.scale, 1.0) for r in results), results


def test_auto_dispatches_probabilities_to_eager_and_they_keep_their_gradient(generator):
    q, k, v = (randn(generator, 2, 23, 2, 8, dtype=torch.float64).requires_grad_() for _ in range(3))
    mask = key_mask("fully_masked_row", 2, 23)
    seen = []
    with dispatch.listen(lambda event, impl: seen.append((event.op, event.backend, event.features["probs"]))):
        out, probs = attention(q, k, v, mask, return_probs=True)
    assert seen == [("attention", "eager", True)]
    probs.retain_grad()  # what Grad-CAM does with the cross-attention map
    score = (out * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum()
    score.backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_probs = attention_ref(*leaves, mask, return_probs=True)
    ref_probs.retain_grad()
    (ref_out * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(probs, ref_probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs.grad, ref_probs.grad, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip((q, k, v), leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert not probs[1].any() and not out[1].any() and not q.grad[1].any()  # the row with no real key
    assert not probs[0][..., ~mask[0]].any()  # padded keys get no probability


def test_probabilities_are_the_ones_the_values_are_averaged_with_under_dropout(generator):
    q, k, v = (randn(generator, 2, 9, 2, 8, dtype=torch.float64) for _ in range(3))
    out, probs = attention(q, k, v, key_mask("prefix", 2, 9), dropout_p=0.5, return_probs=True)
    assert (probs == 0).any() and probs.max() > 1.0  # dropped and rescaled
    torch.testing.assert_close(out, torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_backends_without_probabilities_say_so(generator, backend):
    q = randn(generator, 1, 5, 2, 16)
    with pytest.raises(BackendUnavailableError, match=f"{backend}: returns no attention probabilities"):
        attention(q, q, q, return_probs=True, backend=backend)
    with pytest.raises(BackendUnavailableError, match=f"{backend}: returns no attention probabilities"):
        co_attention(q, q, q, None, q, q, q, None, return_probs=True, backend=backend)
    with pytest.raises(BackendUnavailableError, match="eager: only for return_probs=True"):
        attention(q, q, q, backend="eager")


def test_bad_return_probs(generator):
    q = randn(generator, 5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="return_probs=True needs the padded form"):
        attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, return_probs=True)
    with pytest.raises(ValueError, match="return_probs=True needs the padded form"):
        co_attention(q, q, q, None, q, q, q, None, cu_seqlens_v=cu, cu_seqlens_t=cu, return_probs=True)
    with pytest.raises(TypeError, match="return_probs must be a bool"):
        attention(q[None], q[None], q[None], return_probs=1)


@pytest.mark.parametrize("backend", ["eager", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_co_attention_probabilities_match_two_reference_calls(generator, backend, dtype):
    len_v, len_t = 37, 23
    image = [randn(generator, 2, len_v, 2, 16, dtype=dtype) for _ in range(3)]
    text = [randn(generator, 2, len_t, 2, 16, dtype=dtype) for _ in range(3)]
    mask_v, mask_t = key_mask("holes", 2, len_v), key_mask("fully_masked_row", 2, len_t)

    def fused(q_v, k_v, v_v, q_t, k_t, v_t):
        ctx_v, ctx_t, (probs_v, probs_t) = co_attention(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t,
                                                        return_probs=True, backend=backend)
        return ctx_v, ctx_t, probs_v, probs_t

    def reference(q_v, k_v, v_v, q_t, k_t, v_t):
        ctx_v, probs_v = attention_ref(q_v, k_t, v_t, mask_t, return_probs=True)
        ctx_t, probs_t = attention_ref(q_t, k_v, v_v, mask_v, return_probs=True)
        return ctx_v, ctx_t, probs_v, probs_t

    results = check_op(fused, reference, [*image, *text], name=f"co-attention probs {backend}")
    assert len(results) == 4 + 6
    ctx_v, _, (probs_v, probs_t) = co_attention(*image, mask_v, *text, mask_t, return_probs=True, backend=backend)
    assert probs_v.shape == (2, 2, len_v, len_t) and probs_t.shape == (2, 2, len_t, len_v)
    assert not probs_v[1].any() and not ctx_v[1].any()  # image queries of batch 1 see no real text key
