"""The two Triton attention paths: the short-sequence kernels (every sequence <= 128 rows, one pass,
five-GEMM backward) and the tiled FlashAttention-2 kernels. Both against the float64 reference under
the parity rule, against each other (same dropout stream), the dispatch rule between them, and the
number of compiled variants over ViLBERT's length range."""

import json
import os
import subprocess
import sys

import pytest
import torch
from varlen import prefix_mask

import fastvl
from fastvl.ops import attention_launch
from fastvl.ops.attention_common import pad_packed
from fastvl.ops.attention_op import attention_fwd_op
from fastvl.reference.attention import attention_ref
from fastvl.reference.co_attention import co_attention_ref
from fastvl.testing import check_op

pytestmark = pytest.mark.interpret
PATHS = ("short", "tiled")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Both paths in every dtype (the rule sends fp32 to the tiled kernels; the override tests the
    short kernels' arithmetic in fp32 too)."""
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", request.param)
    return request.param


def randn(generator, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


def test_dispatch_by_longest_sequence_and_dtype(monkeypatch):
    monkeypatch.delenv("FASTVL_ATTENTION_PATH", raising=False)
    path = attention_launch.attention_path
    assert path(1, torch.bfloat16, 64) == path(128, torch.float16, 40) == path(64, torch.bfloat16, 128) == "short"
    assert path(129, torch.bfloat16, 64) == path(65, torch.bfloat16, 128) == path(37, torch.float32, 64) == "tiled"
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "tiled")
    assert path(37, torch.bfloat16, 64) == "tiled"
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "short")
    assert path(37, torch.float32, 64) == "short" and path(129, torch.float16, 64) == "tiled"


# (len_q, len_k, head dim, key lengths, causal, dtype): odd lengths, both key buckets (<= 64, 65-128),
# a fully masked row, head dims that are not powers of two.
ATTENTION_CASES = [
    (23, 37, 64, [37, 0], False, torch.float32),
    (37, 37, 40, [30, 37], True, torch.float16),
    (101, 80, 32, [80, 41], False, torch.float32),
]


@pytest.mark.parametrize("len_q,len_k,head_dim,lengths,causal,dtype", ATTENTION_CASES)
def test_attention_parity(generator, path, len_q, len_k, head_dim, lengths, causal, dtype):
    q = randn(generator, 2, len_q, 2, head_dim, dtype=dtype)
    k, v = (randn(generator, 2, len_k, 2, head_dim, dtype=dtype) for _ in range(2))
    mask = prefix_mask(lengths, len_k, "cpu")
    check_op(lambda q, k, v, m: fastvl.ops.attention(q, k, v, m, causal=causal, backend="triton"),
             lambda q, k, v, m: attention_ref(q, k, v, m, causal=causal), [q, k, v, mask],
             name=f"attention[{path}] {len_q}x{len_k} d{head_dim}")


CO_CASES = [
    (37, 36, 128, [37, 20], [36, 0], torch.float32),  # ViLBERT-base: 36 boxes + image token, 36 tokens
    (101, 23, 64, [101, 50], [23, 9], torch.float16),  # the 128-row key bucket
]


@pytest.mark.parametrize("len_v,len_t,head_dim,lengths_v,lengths_t,dtype", CO_CASES)
def test_co_attention_parity(generator, path, len_v, len_t, head_dim, lengths_v, lengths_t, dtype):
    fused_qkv_v = randn(generator, 2, len_v, 3, 2, head_dim, dtype=dtype)  # views of one projection
    fused_qkv_t = randn(generator, 2, len_t, 3, 2, head_dim, dtype=dtype)
    inputs = [*fused_qkv_v.unbind(2), prefix_mask(lengths_v, len_v, "cpu"), *fused_qkv_t.unbind(2),
              prefix_mask(lengths_t, len_t, "cpu")]
    check_op(lambda *x: fastvl.ops.co_attention(*x, backend="triton"), co_attention_ref, inputs,
             name=f"co_attention[{path}] {len_v}x{len_t} d{head_dim}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_paths_agree_with_the_same_dropout_stream(generator, monkeypatch, dropout_p):
    """Short and tiled draw the same keep-mask, so their outputs and gradients agree to rounding."""
    inputs = [randn(generator, 2, n, 2, 32) for n in (37, 37, 37, 23, 23, 23)]
    masks = prefix_mask([37, 30], 37, "cpu"), prefix_mask([23, 0], 23, "cpu")
    results = []
    for path in PATHS:
        monkeypatch.setenv("FASTVL_ATTENTION_PATH", path)
        leaves = [t.clone().requires_grad_() for t in inputs]
        ctx_v, ctx_t = fastvl.ops.co_attention(*leaves[:3], masks[0], *leaves[3:], masks[1], dropout_p,
                                               backend="triton", dropout_seed=11)
        (ctx_v.square().sum() + ctx_t.sum()).backward()
        results.append([ctx_v, ctx_t] + [t.grad for t in leaves])
    for short, tiled in zip(*results):
        torch.testing.assert_close(short, tiled, rtol=1e-5, atol=1e-5)


def test_packed_short_path_equals_padded(generator):
    lengths = [23, 9]
    cu = torch.tensor([0, 23, 32], dtype=torch.int32)
    q, k, v = (randn(generator, 32, 2, 32) for _ in range(3))
    packed = fastvl.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23,
                                  backend="triton")
    padded = [pad_packed(t, cu, 23)[0] for t in (q, k, v)]
    out = fastvl.ops.attention(*padded, prefix_mask(lengths, 23, "cpu"), backend="triton")
    torch.testing.assert_close(packed[:23], out[0, :23], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[23:], out[1, :9], rtol=1e-5, atol=1e-6)



# Stored dropout keep-mask: written bit-packed by the short forward, read by the short backward.


def _launch_attention(q, k, v, mask, lens, dropout_p, seed, keep, keep_all_in_backward=False):
    out, lse = attention_launch.attention_forward(q, k, v, mask, None, None, *lens, dropout_p, 0.3, False, seed,
                                                  keep=keep)
    if keep_all_in_backward:  # the backward reads the stored mask, it does not redraw it
        keep.fill_(-1)
    grad_out = torch.ones_like(out).mul_(0.5) + out
    return out, attention_launch.attention_backward(grad_out, q, k, v, out, lse, mask, None, None, *lens, dropout_p,
                                                    0.3, False, seed, keep=keep)


@pytest.mark.parametrize("len_q,len_k", [(23, 37), (37, 70)])
def test_stored_keep_mask_equals_the_drawn_one_and_gives_the_same_gradients(generator, monkeypatch, len_q, len_k):
    """The packed mask unpacks to ``dropout_keep_mask`` (zero bits past the keys) and the backward
    reading it gives the regenerating backward's gradients bit for bit (fp16, key bucket 64 and 128)."""
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "short")
    q = randn(generator, 2, len_q, 2, 32, dtype=torch.float16)
    k, v = (randn(generator, 2, len_k, 2, 32, dtype=torch.float16) for _ in range(2))
    mask = prefix_mask([len_k, len_k - 9], len_k, "cpu")
    seed = torch.tensor([7], dtype=torch.int64)
    assert attention_launch.stores_keep_mask(len_k, torch.float16, 32, 0.25)
    keep = attention_launch.new_keep_mask(2, 2, len_q, len_k, q.device).fill_(-1)
    stored = _launch_attention(q, k, v, mask, (len_q, len_k), 0.25, seed, keep)
    drawn = attention_launch.dropout_keep_mask(seed, 2, 2, len_q, len_k, 0.25)
    assert torch.equal(attention_launch.unpack_keep_mask(keep, len_k), drawn)
    assert not attention_launch.unpack_keep_mask(keep, keep.shape[-1] * 32)[..., len_k:].any()
    regenerated = _launch_attention(q, k, v, mask, (len_q, len_k), 0.25, seed, None)
    assert torch.equal(stored[0], regenerated[0])
    for a, b in zip(stored[1], regenerated[1]):
        assert torch.equal(a, b)
    _, kept_all = _launch_attention(q, k, v, mask, (len_q, len_k), 0.25, seed, keep, keep_all_in_backward=True)
    assert not torch.equal(kept_all[0], regenerated[1][0])


def test_co_attention_stored_keep_masks(generator, monkeypatch):
    """Both directions' packed masks (direction 1 with seed + 1) and bit-identical gradients."""
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "short")
    (q_v, k_v, v_v), (q_t, k_t, v_t) = ([randn(generator, 2, n, 2, 32, dtype=torch.float16) for _ in range(3)]
                                        for n in (37, 23))
    mask_v, mask_t = prefix_mask([37, 30], 37, "cpu"), prefix_mask([23, 11], 23, "cpu")
    seed = torch.tensor([5], dtype=torch.int64)

    def run(keep):
        ctx_v, ctx_t, lse_v, lse_t = attention_launch.co_attention_forward(
            q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t, None, None, 37, 23, 0.3, 0.2, seed, keep=keep)
        grads = attention_launch.co_attention_backward(
            ctx_v + 1, ctx_t - 1, q_v, k_v, v_v, q_t, k_t, v_t, ctx_v, ctx_t, lse_v, lse_t, mask_v, mask_t, None,
            None, 37, 23, 0.3, 0.2, seed, keep=keep)
        return ctx_v, ctx_t, *grads

    keep = attention_launch.new_co_keep_masks(2, 2, 37, 23, q_v.device)
    stored = run(keep)
    for packed, (len_q, len_k, offset) in zip(keep, [(37, 23, 0), (23, 37, 1)]):
        drawn = attention_launch.dropout_keep_mask(seed, 2, 2, len_q, len_k, 0.3, seed_offset=offset)
        assert torch.equal(attention_launch.unpack_keep_mask(packed, len_k), drawn)
    for a, b in zip(stored, run(None)):
        assert torch.equal(a, b)



def test_keep_mask_rule(monkeypatch):
    """Stored on the short path with dropout at head dims <= 64; d=128 (its backward would spill) and
    the tiled path regenerate; the environment overrides the head-dim part only."""
    monkeypatch.delenv("FASTVL_ATTENTION_PATH", raising=False)
    monkeypatch.delenv("FASTVL_DROPOUT_MASK", raising=False)
    rule = attention_launch.stores_keep_mask
    assert rule(37, torch.bfloat16, 64, 0.1) and rule(101, torch.float16, 40, 0.1)
    assert not (rule(37, torch.bfloat16, 64, 0.0) or rule(37, torch.bfloat16, 128, 0.1) or
                rule(129, torch.bfloat16, 64, 0.1) or rule(37, torch.float32, 64, 0.1))
    monkeypatch.setenv("FASTVL_DROPOUT_MASK", "store")
    assert rule(37, torch.bfloat16, 128, 0.1) and not rule(129, torch.bfloat16, 64, 0.1)
    monkeypatch.setenv("FASTVL_DROPOUT_MASK", "regenerate")
    assert not rule(37, torch.bfloat16, 64, 0.1)

@pytest.mark.parametrize("fused_qkv", [False, True])
def test_ops_store_the_keep_mask_and_match_regeneration(generator, monkeypatch, fused_qkv):
    """co_attention / attention (training, dropout, short path) store the mask by the launcher rule;
    turning the rule off (the backward redraws it) changes no bit of the outputs or gradients (fp16)."""
    monkeypatch.setenv("FASTVL_ATTENTION_PATH", "short")
    shapes = [(2, 37, 3, 2, 32), (2, 23, 3, 2, 32)] if fused_qkv else [(2, n, 2, 32) for n in (37,) * 3 + (23,) * 3]
    inputs = [randn(generator, *shape, dtype=torch.float16) for shape in shapes]
    masks = prefix_mask([37, 30], 37, "cpu"), prefix_mask([23, 11], 23, "cpu")
    seed = torch.tensor([4], dtype=torch.int64)
    *_, keep = attention_fwd_op(*(inputs[1].unbind(-3) if fused_qkv else inputs[3:]), masks[1], None, None, 23, 23,
                                0.2, 0.3, False, seed)
    assert torch.equal(attention_launch.unpack_keep_mask(keep, 23),
                       attention_launch.dropout_keep_mask(seed, 2, 2, 23, 23, 0.2))
    results = []
    for rule in (attention_launch.stores_keep_mask, lambda *args: False):
        monkeypatch.setattr(attention_launch, "stores_keep_mask", rule)
        leaves = [t.clone().requires_grad_() for t in inputs]
        streams = [t.unbind(-3) for t in leaves] if fused_qkv else [leaves[:3], leaves[3:]]
        ctx_v, ctx_t = fastvl.ops.co_attention(*streams[0], masks[0], *streams[1], masks[1], 0.2, backend="triton",
                                               dropout_seed=3)
        text = fastvl.ops.attention(*streams[1], masks[1], dropout_p=0.2, backend="triton", dropout_seed=4)
        (ctx_v.square().sum() + ctx_t.sum() + text.cos().sum()).backward()
        results.append([ctx_v, ctx_t, text] + [t.grad for t in leaves])
    for stored, regenerated in zip(*results):
        assert torch.equal(stored, regenerated)


COUNT_VARIANTS = """
import json, sys
from fastvl import aot
lengths = [(v, t) for v in range(10, 102, 13) for t in range(16, 81, 16)]
print(json.dumps({k: len(v) for k, v in aot.variants(lengths, dtype=sys.argv[1], head_dim=int(sys.argv[2]),
                                                        dropout=float(sys.argv[3])).items()}))
"""


SHORT = {"attention_fwd_short_kernel", "attention_bwd_short_kernel", "co_attention_fwd_short_kernel",
         "co_attention_bwd_short_kernel"}
TILED = {"attention_fwd_kernel", "attention_bwd_kernel", "co_attention_fwd_kernel", "co_attention_bwd_kernel"}


@pytest.mark.parametrize("path,head_dim,expected", [
    ("auto", 64, {name: 2 for name in SHORT}),  # key buckets 64 and 128
    ("auto", 128, {name: 1 for name in SHORT | TILED}),  # bucket 64 short, longer ones tiled
    ("tiled", 128, {name: 1 for name in TILED}),
])
def test_one_compiled_variant_per_bucket_over_vilbert_lengths(path, head_dim, expected):
    """Triton's own binder (sm_90 backend, no GPU) over 10-101 regions x 16-80 tokens, with dropout:
    lengths and length-derived strides are not specialised, so only the key bucket makes a variant on
    the short path, and nothing does on the tiled one."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_ATTENTION_PATH")}
    if path == "tiled":
        env["FASTVL_ATTENTION_PATH"] = path
    run = subprocess.run([sys.executable, "-c", COUNT_VARIANTS, "bf16", str(head_dim), "0.1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
