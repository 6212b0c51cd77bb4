"""fastvl.ops.co_attention: both directions fused in one launch (forward and backward), against the
float64 BertBiAttention reference under the parity rule; padded and packed forms, dropout replay."""

import pytest
import torch
from varlen import cu_seqlens, pack, prefix_mask

import fastvl
from fastvl.ops.co_attention_op import CO_ATTENTION
from fastvl.reference.co_attention import co_attention_ref, varlen_co_attention_ref
from fastvl.testing import assert_parity, check_op

co_attention = fastvl.ops.co_attention

INTERPRET, GPU = pytest.mark.interpret, pytest.mark.gpu
DEVICES = [pytest.param("cpu", marks=INTERPRET, id="interp"), pytest.param("cuda", marks=GPU, id="gpu")]


def spread(cases):
    """Each case on the GPU in every dtype; on the interpreter in one dtype (fp32, fp16 alternating:
    the interpreter's bf16 tl.dot is wrong)."""
    params = []
    for i, case in enumerate(cases):
        tag = "-".join(map(str, case))
        params += [pytest.param("cuda", dtype, *case, marks=GPU, id=f"gpu-{str(dtype)[6:]}-{tag}")
                   for dtype in (torch.float16, torch.bfloat16, torch.float32)]
        dtype = (torch.float32, torch.float16)[i % 2]
        params.append(pytest.param("cpu", dtype, *case, marks=INTERPRET, id=f"interp-{str(dtype)[6:]}-{tag}"))
    return params


def streams(generator, batch, len_v, len_t, heads, head_dim, dtype, device):
    """(q_v, k_v, v_v, q_t, k_t, v_t) with fresh random values."""
    shapes = [(batch, len_v, heads, head_dim)] * 3 + [(batch, len_t, heads, head_dim)] * 3
    return [torch.randn(*s, generator=generator).to(device=device, dtype=dtype) for s in shapes]


def fused(**kwargs):
    def run(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t):
        return co_attention(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, backend="triton", **kwargs)

    return run


def reference(**kwargs):
    def run(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t):
        return co_attention_ref(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, **kwargs)

    return run


# (Lv regions, Lt tokens, head dim, image lengths or None, text lengths or None); a 0 length is a
# fully masked row (its queries in the other direction get zeros).
CASES = [
    (37, 23, 64, [37, 20], [23, 9]),  # ViLBERT-like ragged batch
    (37, 23, 128, [30, 11], [0, 23]),  # a text row with no real token
    (37, 23, 32, None, None),
    (37, 1, 64, [37, 5], [1, 1]),  # one text token
    (20, 36, 40, [20, 0], [36, 17]),  # an image row with no real region, non-power-of-two head dim
]


@pytest.mark.parametrize("device,dtype,len_v,len_t,head_dim,lengths_v,lengths_t", spread(CASES))
def test_parity_both_directions(generator, device, dtype, len_v, len_t, head_dim, lengths_v, lengths_t):
    inputs = streams(generator, 2, len_v, len_t, 2, head_dim, dtype, device)
    mask_v = None if lengths_v is None else prefix_mask(lengths_v, len_v, device)
    mask_t = None if lengths_t is None else prefix_mask(lengths_t, len_t, device)
    q_v, k_v, v_v, q_t, k_t, v_t = inputs
    results = check_op(fused(), reference(), [q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t],
                       name=f"co_attention {len_v}x{len_t} d{head_dim}")
    assert len(results) == 8  # ctx_v, ctx_t and all six gradients were compared


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_are_zero_with_zero_gradient(generator, device):
    inputs = [t.requires_grad_() for t in streams(generator, 2, 37, 23, 1, 64, torch.float32, device)]
    mask_v, mask_t = prefix_mask([37, 0], 37, device), prefix_mask([0, 23], 23, device)
    ctx_v, ctx_t = co_attention(*inputs[:3], mask_v, *inputs[3:], mask_t, backend="triton")
    (ctx_v.sum() + ctx_t.sum()).backward()
    assert not ctx_v[0].any() and not ctx_t[1].any()  # image queries of row 0 see no text, and vice versa
    q_v, k_v, v_v, q_t, k_t, v_t = (t.grad for t in inputs)
    assert not q_v[0].any() and not q_t[1].any()
    assert not k_t[0].any() and not v_t[0].any() and not k_v[1].any() and not v_v[1].any()
    assert all(torch.isfinite(t.grad).all() for t in inputs)


@pytest.mark.parametrize("device,dtype,dropout_p", spread([(0.0,), (0.3,)]))
def test_packed_equals_padded(generator, device, dtype, dropout_p):
    # Each stream has its own lengths: the packed form must not reuse one stream's mask for the other.
    lengths_v, lengths_t = [37, 10, 21], [5, 23, 1]
    padded = streams(generator, 3, 37, 23, 1, 64, dtype, device)
    lengths = [lengths_v] * 3 + [lengths_t] * 3
    packed = [pack(t, n) for t, n in zip(padded, lengths)]
    mask_v, mask_t = prefix_mask(lengths_v, 37, device), prefix_mask(lengths_t, 23, device)
    cu_v, cu_t = cu_seqlens(lengths_v, device), cu_seqlens(lengths_t, device)
    for t in padded + packed:
        t.requires_grad_()
    pad_v, pad_t = co_attention(*padded[:3], mask_v, *padded[3:], mask_t, dropout_p, backend="triton", dropout_seed=9)
    packed_v, packed_t = co_attention(*packed[:3], None, *packed[3:], None, dropout_p, cu_seqlens_v=cu_v,
                                      cu_seqlens_t=cu_t, max_seqlen_v=37, max_seqlen_t=23, backend="triton",
                                      dropout_seed=9)
    grad_v = torch.randn(pad_v.shape, generator=generator).to(device, dtype) * mask_v[:, :, None, None]
    grad_t = torch.randn(pad_t.shape, generator=generator).to(device, dtype) * mask_t[:, :, None, None]
    ((pad_v * grad_v).sum() + (pad_t * grad_t).sum()).backward()
    ((packed_v * pack(grad_v, lengths_v)).sum() + (packed_t * pack(grad_t, lengths_t)).sum()).backward()
    torch.testing.assert_close(packed_v, pack(pad_v, lengths_v), rtol=0, atol=0)
    torch.testing.assert_close(packed_t, pack(pad_t, lengths_t), rtol=0, atol=0)
    for p_in, pad_in, n in zip(packed, padded, lengths):
        torch.testing.assert_close(p_in.grad, pack(pad_in.grad, n), rtol=0, atol=0)
    if dropout_p == 0.0:
        check_op(lambda *x: co_attention(*x[:3], None, *x[3:], None, cu_seqlens_v=cu_v, cu_seqlens_t=cu_t,
                                         backend="triton"),
                 lambda *x: varlen_co_attention_ref(*x[:3], cu_v, *x[3:], cu_t), [t.detach() for t in packed],
                 name="packed co_attention")


@pytest.mark.parametrize("device,dtype,dropout_p", spread([(0.1,), (0.4,)]))
def test_dropout_keep_masks_replay_through_reference(generator, device, dtype, dropout_p):
    inputs = streams(generator, 2, 37, 23, 1, 64, dtype, device)
    mask_v, mask_t = prefix_mask([37, 12], 37, device), prefix_mask([23, 4], 23, device)
    seed = 77
    keep_v = fastvl.ops.dropout_keep_mask(seed, 2, 1, 37, 23, dropout_p, device=device)  # image queries
    keep_t = fastvl.ops.dropout_keep_mask(seed, 2, 1, 23, 37, dropout_p, device=device, seed_offset=1)
    q_v, k_v, v_v, q_t, k_t, v_t = inputs
    check_op(fused(dropout_p=dropout_p, dropout_seed=seed),
             reference(dropout_p=dropout_p, dropout_masks=(keep_v, keep_t)),
             [q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t], name="co_attention dropout")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_same_seed_same_output(generator, device):
    inputs = streams(generator, 1, 37, 23, 1, 64, torch.float32, device)
    run = lambda seed: co_attention(*inputs[:3], None, *inputs[3:], None, 0.3, backend="triton",  # noqa: E731
                                    dropout_seed=seed)
    first = run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, run(4)))
    assert not any(torch.equal(a, b) for a, b in zip(first, run(5)))


@pytest.mark.parametrize("device", DEVICES)
def test_equals_two_attention_calls(generator, device):
    q_v, k_v, v_v, q_t, k_t, v_t = streams(generator, 2, 37, 23, 1, 64, torch.float32, device)
    mask_v, mask_t = prefix_mask([30, 37], 37, device), prefix_mask([23, 7], 23, device)
    ctx_v, ctx_t = co_attention(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, backend="triton")
    torch.testing.assert_close(ctx_v, fastvl.ops.attention(q_v, k_t, v_t, mask_t, backend="triton"))
    torch.testing.assert_close(ctx_t, fastvl.ops.attention(q_t, k_v, v_v, mask_v, backend="triton"))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_beyond_real_positions_does_not_leak(generator, device):
    inputs = streams(generator, 2, 37, 23, 1, 64, torch.float32, device)
    mask_v, mask_t = prefix_mask([30, 11], 37, device), prefix_mask([23, 6], 23, device)
    poisoned = list(inputs)
    for i, mask in ((1, mask_v), (2, mask_v), (4, mask_t), (5, mask_t)):  # keys and values past each end
        poisoned[i] = inputs[i].masked_fill(~mask[:, :, None, None], float("nan"))
    results = []
    for tensors in (inputs, poisoned):
        leaves = [t.clone().requires_grad_() for t in tensors]
        ctx_v, ctx_t = co_attention(*leaves[:3], mask_v, *leaves[3:], mask_t, backend="triton")
        (ctx_v.sum() + ctx_t.sum()).backward()
        results.append([ctx_v, ctx_t] + [t.grad for t in leaves])
    for clean, dirty in zip(*results):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_projection_views_and_bitwise_backward(generator, device):
    image = torch.randn(2, 37, 3, 1, 64, generator=generator).to(device=device, dtype=torch.float16)
    text = torch.randn(2, 23, 3, 1, 64, generator=generator).to(device=device, dtype=torch.float16)
    leaves = [t.requires_grad_() for t in (image, text)]
    mask_v, mask_t = prefix_mask([37, 30], 37, device), prefix_mask([9, 23], 23, device)
    ctx_v, ctx_t = co_attention(*image.unbind(2), mask_v, *text.unbind(2), mask_t, 0.1, backend="triton",
                                dropout_seed=1, deterministic=True)
    contiguous = co_attention(*(t.contiguous() for t in image.unbind(2)), mask_v,
                              *(t.contiguous() for t in text.unbind(2)), mask_t, 0.1, backend="triton", dropout_seed=1)
    assert torch.equal(ctx_v, contiguous[0]) and torch.equal(ctx_t, contiguous[1])
    grads = [torch.randn_like(ctx_v), torch.randn_like(ctx_t)]
    first = torch.autograd.grad((ctx_v, ctx_t), leaves, grads, retain_graph=True)
    again = torch.autograd.grad((ctx_v, ctx_t), leaves, grads, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_projections_get_their_gradients_in_one_buffer_each(generator, device):
    """Each stream's q, k, v as head groups of its fused projection (ViLBERT's v_qkv / t_qkv): the one
    backward launch writes each projection's gradient in its layout, equal to separate tensors'."""
    from test_attention import AtenOps

    image = torch.randn(2, 37, 3 * 2 * 32, generator=generator).to(device).requires_grad_()
    text = torch.randn(2, 23, 3 * 2 * 32, generator=generator).to(device).requires_grad_()
    mask_v, mask_t = prefix_mask([37, 30], 37, device), prefix_mask([9, 23], 23, device)
    upstream = [torch.randn(2, n, 2, 32, generator=generator).to(device) for n in (37, 23)]

    def gradients(separate):
        image.grad = text.grad = None
        views = [t.unflatten(-1, (6, 32)).chunk(3, dim=-2) for t in (image * 1.0, text * 1.0)]
        if separate:
            views = [[t.clone() for t in stream] for stream in views]
        out = co_attention(*views[0], mask_v, *views[1], mask_t, backend="triton")
        with AtenOps() as ops:
            torch.autograd.backward(out, upstream)
        return image.grad, text.grad, ops.names

    *fused_grads, fused_ops = gradients(False)
    *separate_grads, separate_ops = gradients(True)
    assert separate_ops.count("cat") == 2 and "cat" not in fused_ops
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, separate_grads))


@pytest.mark.slow  # the first torch.compile of a process pays for dynamo's start-up
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(generator, device):
    inputs = [t.requires_grad_() for t in streams(generator, 2, 37, 23, 1, 64, torch.float32, device)]
    mask_v, mask_t = prefix_mask([37, 20], 37, device), prefix_mask([23, 9], 23, device)

    def layer(q_v, k_v, v_v, q_t, k_t, v_t, p):
        ctx_v, ctx_t = co_attention(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, p, backend="triton")
        return ctx_v.sum() + 2 * ctx_t.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(*inputs, 0.0)
    torch.testing.assert_close(out, layer(*inputs, 0.0))
    for a, b in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(layer(*inputs, 0.0), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_torch_backends_packed(generator, backend):
    lengths_v, lengths_t = [4, 7], [3, 1]
    shapes = [(11, 2, 16)] * 3 + [(4, 2, 16)] * 3
    x = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
    cu_v, cu_t = cu_seqlens(lengths_v, "cpu"), cu_seqlens(lengths_t, "cpu")
    ctx_v, ctx_t = co_attention(*x[:3], None, *x[3:], None, cu_seqlens_v=cu_v, cu_seqlens_t=cu_t, backend=backend)
    exact_v, exact_t = varlen_co_attention_ref(*x[:3], cu_v, *x[3:], cu_t)
    assert_parity("ctx_v", ctx_v, ctx_v, exact_v)
    assert_parity("ctx_t", ctx_t, ctx_t, exact_t)


def test_auto_picks_triton_only_on_cuda():
    features = dict(dtype=torch.bfloat16, head_dim=128, dropout=True, packed=False)
    assert CO_ATTENTION.select(None, torch.device("cpu"), **features).name == "sdpa"
    if torch.cuda.is_available():
        assert CO_ATTENTION.select(None, torch.device("cuda"), **features).name == "triton"


def _t(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("call,error,message", [
    (lambda: co_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), None, _t(3, 2, 8), _t(3, 2, 8), _t(3, 2, 8), None,
                          cu_seqlens_v=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     "needs both cu_seqlens_v and cu_seqlens_t"),
    (lambda: co_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), torch.ones(1, 5, dtype=torch.bool), _t(3, 2, 8),
                          _t(3, 2, 8), _t(3, 2, 8), None, cu_seqlens_v=torch.tensor([0, 5], dtype=torch.int32),
                          cu_seqlens_t=torch.tensor([0, 3], dtype=torch.int32)),
     ValueError, "must be None in the packed"),
    (lambda: co_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), None, _t(3, 2, 8), _t(3, 2, 8), _t(3, 2, 8), None,
                          cu_seqlens_v=torch.tensor([0, 4], dtype=torch.int32),
                          cu_seqlens_t=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     r"cu_seqlens_v\[-1\] = 4 must equal the packed length 5"),
    (lambda: co_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), None, _t(3, 2, 8), _t(3, 2, 8), _t(3, 2, 8), None,
                          cu_seqlens_v=torch.tensor([0, 2, 5], dtype=torch.int32),
                          cu_seqlens_t=torch.tensor([0, 3], dtype=torch.int32)),
     ValueError, r"must both be \[B \+ 1\]"),
    (lambda: co_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), None, _t(3, 4, 8), _t(3, 4, 8), _t(3, 4, 8), None,
                          cu_seqlens_v=torch.tensor([0, 5], dtype=torch.int32),
                          cu_seqlens_t=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "q_t must have shape"),
    (lambda: co_attention(_t(2, 5, 2, 8), _t(2, 5, 2, 8), _t(2, 5, 2, 8), None, _t(2, 3, 2, 8), _t(2, 3, 2, 8),
                          _t(2, 3, 2, 8), torch.ones(2, 3, dtype=torch.int64)), TypeError, "mask_t must be bool"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("regions", [37, 101])
def test_vilbert_shapes_on_gpu(generator, dtype, regions):
    """The compiled kernels at ViLBERT's co-attention shape (8 heads of 128, 36 tokens), with dropout
    replayed through the reference."""
    inputs = streams(generator, 8, regions, 36, 8, 128, dtype, "cuda")
    lengths_v = torch.randint(10, regions + 1, (8,), generator=generator)
    lengths_t = torch.randint(1, 37, (8,), generator=generator)
    mask_v, mask_t = prefix_mask(lengths_v.tolist(), regions, "cuda"), prefix_mask(lengths_t.tolist(), 36, "cuda")
    keep_v = fastvl.ops.dropout_keep_mask(5, 8, 8, regions, 36, 0.1, device="cuda")
    keep_t = fastvl.ops.dropout_keep_mask(5, 8, 8, 36, regions, 0.1, device="cuda", seed_offset=1)
    q_v, k_v, v_v, q_t, k_t, v_t = inputs
    check_op(fused(dropout_p=0.1, dropout_seed=5), reference(dropout_p=0.1, dropout_masks=(keep_v, keep_t)),
             [q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t], name=f"co_attention vilbert {regions}")


@pytest.mark.parametrize("device", DEVICES)
def test_directions_draw_independent_dropout(device):
    keep_v = fastvl.ops.dropout_keep_mask(8, 2, 2, 30, 30, 0.5, device=device)
    keep_t = fastvl.ops.dropout_keep_mask(8, 2, 2, 30, 30, 0.5, device=device, seed_offset=1)
    assert not torch.equal(keep_v, keep_t)
    assert abs((keep_v == keep_t).float().mean().item() - 0.5) < 0.05  # uncorrelated: agree half the time
