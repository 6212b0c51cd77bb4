"""fastvl.ops.attention: the Triton kernels (interpreter on CPU, compiled on GPU) against the float64
reference under the parity rule, forward and dq/dk/dv, plus the torch and optional backends."""

import math

import pytest
import torch
from varlen import cu_seqlens, pack, prefix_mask

import fastvl
from fastvl.dispatch import BackendUnavailableError
from fastvl.ops.attention_op import ATTENTION
from fastvl.reference.attention import attention_ref, varlen_attention_ref
from fastvl.testing import RELATIVE_FLOOR, assert_parity, check_op

attention = fastvl.ops.attention

INTERPRET, GPU = pytest.mark.interpret, pytest.mark.gpu
# (device, dtype): the interpreter runs fp32 and fp16 (its bf16 tl.dot is wrong); the GPU runs all three.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=INTERPRET, id="interp-fp32"),
    pytest.param("cpu", torch.float16, marks=INTERPRET, id="interp-fp16"),
    pytest.param("cuda", torch.float16, marks=GPU, id="gpu-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=GPU, id="gpu-bf16"),
    pytest.param("cuda", torch.float32, marks=GPU, id="gpu-fp32"),
]
DEVICES = [pytest.param("cpu", marks=INTERPRET, id="interp"), pytest.param("cuda", marks=GPU, id="gpu")]


def randn(generator, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def qkv(generator, batch, len_q, len_k, heads, head_dim, dtype, device):
    return (randn(generator, batch, len_q, heads, head_dim, dtype=dtype, device=device),
            randn(generator, batch, len_k, heads, head_dim, dtype=dtype, device=device),
            randn(generator, batch, len_k, heads, head_dim, dtype=dtype, device=device))


def triton(**kwargs):
    return lambda q, k, v, mask=None: attention(q, k, v, mask, backend="triton", **kwargs)


# Masks as predicates over (batch, key position), each turned into a dense bool mask [B, Lk].
MASKS = {
    "none": None,
    "prefix": lambda b, n, length: n < length - 3 * b - 2,  # odd real lengths per row
    "holes": lambda b, n, length: (n * 7 + b) % 5 != 0,  # non-prefix padding
    "fully_masked_row": lambda b, n, length: (b == 0) & (n < length),  # batch 1 has no real key
}


def dense_mask(name, batch, length, device):
    predicate = MASKS[name]
    if predicate is None:
        return None
    positions = torch.arange(length)[None, :]
    rows = torch.arange(batch)[:, None]
    return predicate(rows, positions, length).to(device)


def head_dim_params():
    """Every (dtype, head dim) on the GPU; on the interpreter each head dim once, dtypes alternating."""
    params = [pytest.param("cuda", dtype, d, marks=GPU, id=f"gpu-{str(dtype)[6:]}-d{d}")
              for dtype in (torch.float16, torch.bfloat16, torch.float32) for d in (32, 64, 128, 40)]
    for dtype, d in ((torch.float32, 32), (torch.float16, 64), (torch.float32, 128), (torch.float16, 40)):
        params.append(pytest.param("cpu", dtype, d, marks=INTERPRET, id=f"interp-{str(dtype)[6:]}-d{d}"))
    return params


@pytest.mark.parametrize("device,dtype,head_dim", head_dim_params())
def test_parity_head_dims(generator, device, dtype, head_dim):
    q, k, v = qkv(generator, 2, 37, 23, 2, head_dim, dtype, device)
    mask = dense_mask("prefix", 2, 23, device)
    check_op(triton(), attention_ref, [q, k, v, mask], name=f"attention d{head_dim}")


SHAPE_CASES = [  # (len_q, len_k, mask, causal)
    (23, 37, "holes", False),
    (37, 23, "fully_masked_row", False),
    (1, 23, "prefix", False),
    (23, 1, "none", False),
    (23, 23, "none", True),
    (37, 23, "prefix", True),  # bottom-right causal with Lq > Lk: the first rows see no key
]


def spread(cases, interp_dtypes=(torch.float32, torch.float16)):
    """Each case on the GPU in every dtype; on the interpreter in one dtype, alternating."""
    params = []
    for i, case in enumerate(cases):
        tag = "-".join(map(str, case))
        params += [pytest.param("cuda", dtype, *case, marks=GPU, id=f"gpu-{str(dtype)[6:]}-{tag}")
                   for dtype in (torch.float16, torch.bfloat16, torch.float32)]
        dtype = interp_dtypes[i % len(interp_dtypes)]
        params.append(pytest.param("cpu", dtype, *case, marks=INTERPRET, id=f"interp-{str(dtype)[6:]}-{tag}"))
    return params


@pytest.mark.parametrize("device,dtype,len_q,len_k,mask_name,causal", spread(SHAPE_CASES))
def test_parity_shapes_and_masks(generator, device, dtype, len_q, len_k, mask_name, causal):
    q, k, v = qkv(generator, 2, len_q, len_k, 2, 32, dtype, device)
    mask = dense_mask(mask_name, 2, len_k, device)
    # With one key, dk is exactly 0 (dO.v - rowsum(O * dO) cancels): its rounding scales with |dO.v| ~ sqrt(D).
    floor = RELATIVE_FLOOR[dtype] * math.sqrt(32) if len_k == 1 else None
    check_op(triton(causal=causal), lambda q, k, v, m: attention_ref(q, k, v, m, causal=causal), [q, k, v, mask],
             name=f"attention {len_q}x{len_k} {mask_name} causal={causal}", floor=floor)


@pytest.mark.interpret
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_tiled_backward_delta_reading_per_arch(generator, monkeypatch, capability):
    """The causal tiled backward reads rowsum(O * dO) as the target's ``delta_chunk`` says (d=64 on
    sm_80: from the dO tile in registers; sm_90: in one 64-column chunk): both within the parity rule."""
    from fastvl.ops import attention_launch

    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "tiled")
    monkeypatch.setattr(attention_launch, "TARGET_CAPABILITY", capability)
    assert attention_launch.kernels().delta_chunk("fp16", 64, capability[0], True) == (64 if capability[0] >= 9 else 0)
    q, k, v = qkv(generator, 2, 37, 23, 2, 64, torch.float16, "cpu")
    mask = dense_mask("prefix", 2, 23, "cpu")
    check_op(triton(causal=True), lambda q, k, v, m: attention_ref(q, k, v, m, causal=True), [q, k, v, mask],
             name=f"causal tiled backward sm_{capability[0]}{capability[1]}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_fully_masked_rows_are_zero_with_zero_gradient(generator, device, dtype):
    q, k, v = (t.requires_grad_() for t in qkv(generator, 2, 5, 19, 2, 32, dtype, device))
    mask = dense_mask("fully_masked_row", 2, 19, device)
    out = attention(q, k, v, mask, backend="triton")
    out.backward(torch.ones_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all() and not grad[1].any()


@pytest.mark.parametrize("device,dtype,dropout_p", spread([(0.0,), (0.3,)]))
def test_packed_equals_padded(generator, device, dtype, dropout_p):
    lengths_q, lengths_k = [37, 1, 20], [9, 23, 0]  # an empty key sequence -> zeros
    heads, head_dim = 2, 32
    padded = [randn(generator, 3, n, heads, head_dim, dtype=dtype, device=device) for n in (37, 23, 23)]
    mask = prefix_mask(lengths_k, 23, device)
    packed = [pack(padded[0], lengths_q), pack(padded[1], lengths_k), pack(padded[2], lengths_k)]
    for t in padded + packed:
        t.requires_grad_()
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    out_pad = attention(*padded, mask, dropout_p, backend="triton", dropout_seed=7)
    out_packed = attention(*packed, dropout_p=dropout_p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=37,
                           max_seqlen_k=23, backend="triton", dropout_seed=7)
    real_q = prefix_mask(lengths_q, 37, device)[:, :, None, None]  # a loss ignores padded query rows
    grad = randn(generator, *out_pad.shape, dtype=dtype, device=device) * real_q
    (out_pad * grad).sum().backward()
    (out_packed * pack(grad, lengths_q)).sum().backward()
    torch.testing.assert_close(out_packed, pack(out_pad, lengths_q), rtol=0, atol=0)
    torch.testing.assert_close(packed[0].grad, pack(padded[0].grad, lengths_q), rtol=0, atol=0)
    for i in (1, 2):
        torch.testing.assert_close(packed[i].grad, pack(padded[i].grad, lengths_k), rtol=0, atol=0)
    if dropout_p == 0.0:
        check_op(lambda q, k, v: attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton"),
                 lambda q, k, v: varlen_attention_ref(q, k, v, cu_q, cu_k), [t.detach() for t in packed],
                 name="packed attention")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_dropout_keep_mask_replays_through_reference(generator, device, dtype):
    q, k, v = qkv(generator, 2, 23, 37, 2, 32, dtype, device)
    mask = dense_mask("prefix", 2, 37, device)
    p, seed = 0.25, 1234
    keep = fastvl.ops.dropout_keep_mask(seed, 2, 2, 23, 37, p, device=device)
    check_op(lambda q, k, v, m: attention(q, k, v, m, p, backend="triton", dropout_seed=seed),
             lambda q, k, v, m: attention_ref(q, k, v, m, p, dropout_mask=keep), [q, k, v, mask], name="dropout")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seed_determinism_and_keep_rate(generator, device):
    q, k, v = qkv(generator, 2, 23, 37, 2, 32, torch.float32, device)
    first = attention(q, k, v, None, 0.4, backend="triton", dropout_seed=5)
    assert torch.equal(first, attention(q, k, v, None, 0.4, backend="triton", dropout_seed=5))
    assert not torch.equal(first, attention(q, k, v, None, 0.4, backend="triton", dropout_seed=6))
    torch.manual_seed(11)  # no seed given: drawn from torch's generator, so manual_seed reproduces it
    drawn = attention(q, k, v, None, 0.4, backend="triton")
    torch.manual_seed(11)
    assert torch.equal(drawn, attention(q, k, v, None, 0.4, backend="triton"))
    for p in (0.1, 0.5):
        keep = fastvl.ops.dropout_keep_mask(3, 2, 4, 37, 64, p, device=device)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])  # own draws


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_nan_beyond_real_keys_does_not_leak(generator, device, dtype):
    q, k, v = qkv(generator, 2, 23, 37, 2, 32, dtype, device)
    mask = dense_mask("holes", 2, 37, device)
    poisoned_k, poisoned_v = (t.masked_fill(~mask[:, :, None, None], float("nan")) for t in (k, v))
    results = []
    for kk, vv in ((k, v), (poisoned_k, poisoned_v)):
        inputs = [t.clone().requires_grad_() for t in (q, kk, vv)]
        out = attention(*inputs, mask, backend="triton")
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in inputs])
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_views_need_no_copy(generator, device):
    qkv_proj = randn(generator, 2, 23, 3, 2, 32, device=device)  # a fused projection's output
    q, k, v = qkv_proj.unbind(2)
    assert not q.is_contiguous()
    views = attention(q, k, v, backend="triton")
    torch.testing.assert_close(views, attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    check_op(triton(), attention_ref, [q, k, v], name="strided views")


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_fused_projection_gets_its_gradient_in_one_buffer(generator, device, packed):
    """q, k, v as head groups of one fused projection: the backward writes the projection's gradient in
    its own layout (no concatenation of dq, dk, dv), equal to the gradient through separate tensors."""
    lengths = [23, 17]
    proj = randn(generator, sum(lengths) if packed else 2, *([] if packed else [23]), 3 * 2 * 32,
                 device=device).requires_grad_()
    grad = randn(generator, *proj.shape[:-1], 2, 32, device=device)
    extra = dict(cu_seqlens_q=cu_seqlens(lengths, device), max_seqlen_q=23) if packed else {}
    extra = {**extra, "cu_seqlens_k": extra["cu_seqlens_q"], "max_seqlen_k": 23} if packed else extra
    mask = None if packed else dense_mask("prefix", 2, 23, device)

    def gradient(separate):
        proj.grad = None
        q, k, v = (proj * 1.0).unflatten(-1, (3 * 2, 32)).chunk(3, dim=-2)
        if separate:
            q, k, v = q.clone(), k.clone(), v.clone()
        out = attention(q, k, v, mask, backend="triton", **extra)
        with AtenOps() as ops:
            torch.autograd.backward(out, grad)
        return proj.grad, ops.names

    fused, fused_ops = gradient(False)
    separate, separate_ops = gradient(True)
    assert "cat" in separate_ops and "cat" not in fused_ops and "stack" not in fused_ops
    assert torch.equal(fused, separate)


def test_fused_projection_is_recognised_only_when_exact(generator):
    from fastvl.ops.attention_launch import fused_projection

    proj = randn(generator, 2, 5, 3, 2, 4).requires_grad_()
    q, k, v = proj.unbind(2)
    assert fused_projection(q, k, v)._base is proj and fused_projection(q, k, v).shape == proj.shape
    flat = (proj * 1.0).flatten(-3)
    q, k, v = flat.unflatten(-1, (6, 4)).chunk(3, dim=-2)
    assert fused_projection(q, k, v).shape == (2, 5, 3, 2, 4)
    assert fused_projection(k, q, v) is None  # not in the projection's order
    assert fused_projection(q, k, k) is None
    assert fused_projection(*flat.unflatten(-1, (8, 3))[..., :6, :].chunk(3, dim=-2)) is None  # part of it
    assert fused_projection(*(t.clone() for t in (q, k, v))) is None


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_repeatable(generator, device):
    q, k, v = (t.requires_grad_() for t in qkv(generator, 2, 37, 23, 2, 32, torch.float16, device))
    mask = dense_mask("prefix", 2, 23, device)
    out = attention(q, k, v, mask, 0.2, backend="triton", dropout_seed=3, deterministic=True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.slow  # the first torch.compile of a process pays for dynamo's start-up
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(generator, device):
    q, k, v = (t.requires_grad_() for t in qkv(generator, 2, 23, 37, 2, 32, torch.float32, device))
    mask = dense_mask("prefix", 2, 37, device)

    def layer(q, k, v, mask, p):
        return attention(q * 2.0, k, v, mask, p, backend="triton").sum(dim=-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(q, k, v, mask, 0.0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(out, layer(q, k, v, mask, 0.0))
    for a, b in zip(grads, torch.autograd.grad(layer(q, k, v, mask, 0.0).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    assert not torch.equal(compiled(q, k, v, mask, 0.5), compiled(q, k, v, mask, 0.5))  # seed not baked in


def test_auto_picks_triton_only_on_cuda():
    select = ATTENTION.select
    features = dict(dtype=torch.float16, head_dim=64, dropout=False, packed=False)
    assert select(None, torch.device("cpu"), **features).name == "sdpa"
    if torch.cuda.is_available():
        assert select(None, torch.device("cuda"), **features).name == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rejects_what_it_cannot_run(generator, device):
    q = randn(generator, 1, 4, 2, 160, device=device)
    with pytest.raises(BackendUnavailableError, match="triton: head dim 160 > 128"):
        attention(q, q, q, backend="triton")
    q = randn(generator, 1, 4, 2, 32, dtype=torch.float64, device=device)
    with pytest.raises(BackendUnavailableError, match="triton: dtype torch.float64"):
        attention(q, q, q, backend="triton")
    with pytest.raises(BackendUnavailableError, match="sdpa: dropout_seed is honoured by the triton backend only"):
        attention(q, q, q, dropout_p=0.1, dropout_seed=1, backend="sdpa")


@pytest.mark.parametrize("call,error,message", [
    (lambda q: attention(q, q, q, cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     "needs both cu_seqlens_q and cu_seqlens_k"),
    (lambda q: attention(q, q, q, torch.ones(5, 2, dtype=torch.bool), cu_seqlens_q=torch.tensor([0, 5]),
                         cu_seqlens_k=torch.tensor([0, 5])), ValueError, "key_padding_mask must be None in the packed"),
    (lambda q: attention(q, q, q, cu_seqlens_q=torch.tensor([0, 2, 5]), cu_seqlens_k=torch.tensor([0, 5])),
     ValueError, r"must both be \[B \+ 1\]"),
])
def test_bad_packed_input(generator, call, error, message):
    with pytest.raises(error, match=message):
        call(randn(generator, 5, 2, 8))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_torch_backends_packed_and_padded_agree(generator, backend):
    lengths_q, lengths_k = [5, 1, 7], [4, 6, 3]
    q = randn(generator, sum(lengths_q), 2, 16, dtype=torch.float64)
    k, v = (randn(generator, sum(lengths_k), 2, 16, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lengths_q, "cpu"), cu_seqlens(lengths_k, "cpu")
    out = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert_parity(backend, out, out, varlen_attention_ref(q, k, v, cu_q, cu_k))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xformers", "flash_attn"])
def test_optional_backends(generator, backend):
    pytest.importorskip(backend)
    q, k, v = qkv(generator, 2, 37, 23, 4, 64, torch.float16, "cuda")
    check_op(lambda q, k, v: attention(q, k, v, backend=backend), attention_ref, [q, k, v], name=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,causal", [(64, False), (128, True)])
def test_long_sequences_on_gpu(generator, dtype, head_dim, causal):
    """The long-sequence configuration (128-row query blocks) and many key blocks, compiled."""
    q, k, v = qkv(generator, 2, 1024, 1100, 4, head_dim, dtype, "cuda")
    check_op(triton(causal=causal), lambda q, k, v: attention_ref(q, k, v, causal=causal), [q, k, v],
             name=f"attention long d{head_dim}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES[:1] + DEVICE_DTYPES[2:])
def test_packed_causal_aligns_per_sequence(generator, device, dtype):
    """Packed causal attention aligns each sequence's mask to its own bottom-right corner."""
    lengths_q, lengths_k = [5, 19, 1], [9, 17, 4]
    q = randn(generator, sum(lengths_q), 2, 64, dtype=dtype, device=device)
    k, v = (randn(generator, sum(lengths_k), 2, 64, dtype=dtype, device=device) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    check_op(lambda q, k, v: attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton"),
             lambda q, k, v: varlen_attention_ref(q, k, v, cu_q, cu_k, causal=True), [q, k, v], name="packed causal")
