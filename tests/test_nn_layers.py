"""fastvl.nn layers: fused vs reference parity (outputs and every parameter gradient, float64 rule),
independent definitions of BERT's layer and ViLBERT's co-attention, packed batches, attention
probabilities, activation checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F
from model_parity import check_model_parity

from fastvl.nn import (
    CoAttentionLayer,
    CrossAttentionLayer,
    RegionEmbeddings,
    TextEmbeddings,
    TransformerEncoder,
    TransformerLayer,
    init_bert_weights,
    set_gradient_checkpointing,
)

TRITON_LAYERS = pytest.param({"layer_norm": "triton", "bias_gelu": "triton"}, marks=pytest.mark.interpret,
                              id="triton-interpreter")
FUSED = [None, TRITON_LAYERS]


def _init(module, seed=0):
    torch.manual_seed(seed)
    module.apply(lambda m: init_bert_weights(m, 0.2))
    for p in module.parameters():  # non-trivial LayerNorm scales and biases too
        p.data.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _mask(batch, length, generator, full_row=None):
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (batch,), generator=generator)[:, None]
    if full_row is not None:
        mask[full_row] = False
    return mask


# Independent eager definitions, written from the original modules' forward ----------------------


def _ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _heads_attention(q, k, v, key_mask, heads):
    b, lq, hidden = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, hidden // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hidden // heads)
    scores = scores + (1.0 - key_mask[:, None, None, :].to(scores.dtype)) * -10000.0
    return (torch.softmax(scores, -1) @ split(v)).transpose(1, 2).reshape(b, lq, hidden)


def _ffn(x, ffn):
    h = F.linear(x, ffn.intermediate.weight, ffn.intermediate.bias)
    h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return _ln(F.linear(h, ffn.output.weight, ffn.output.bias) + x, ffn.norm)


def _bert_layer(layer, x, mask):
    att = layer.attention
    q, k, v = F.linear(x, att.qkv.weight, att.qkv.bias).chunk(3, dim=-1)
    ctx = _heads_attention(q, k, v, mask, att.num_heads)
    return _ffn(_ln(F.linear(ctx, att.dense.weight, att.dense.bias) + x, att.norm), layer.ffn)


def _connection_layer(layer, image, image_mask, text, text_mask):
    q1, k1, v1 = F.linear(image, layer.v_qkv.weight, layer.v_qkv.bias).chunk(3, dim=-1)
    q2, k2, v2 = F.linear(text, layer.t_qkv.weight, layer.t_qkv.bias).chunk(3, dim=-1)
    context1 = _heads_attention(q2, k1, v1, image_mask, layer.bi_num_heads)  # text queries over image
    context2 = _heads_attention(q1, k2, v2, text_mask, layer.bi_num_heads)  # image queries over text
    image = _ln(F.linear(context2, layer.dense1.weight, layer.dense1.bias) + image, layer.norm1)
    text = _ln(F.linear(context1, layer.dense2.weight, layer.dense2.bias) + text, layer.norm2)
    return _ffn(image, layer.v_ffn), _ffn(text, layer.t_ffn)


def test_bert_layer_matches_independent_definition(generator):
    layer = _init(TransformerLayer(32, 4, 48)).double()
    x = torch.randn(3, 23, 32, generator=generator, dtype=torch.float64)
    mask = _mask(3, 23, generator)
    torch.testing.assert_close(layer(x, mask), _bert_layer(layer, x, mask), rtol=1e-10, atol=1e-10)
    additive = (1.0 - mask.double())[:, None, None, :] * -10000.0  # the original's mask form
    torch.testing.assert_close(layer(x, additive), layer(x, mask), rtol=1e-12, atol=1e-12)


def test_co_attention_layer_matches_independent_definition(generator):
    layer = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40)).double()
    image, text = (torch.randn(2, n, d, generator=generator, dtype=torch.float64) for n, d in ((37, 24), (23, 32)))
    image_mask, text_mask = _mask(2, 37, generator), _mask(2, 23, generator)
    got = layer(image, image_mask, text, text_mask)
    want = _connection_layer(layer, image, image_mask, text, text_mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", FUSED)
def test_encoder_parity(generator, fused):
    encoder = _init(TransformerEncoder(2, 32, 4, 48))
    x = torch.randn(3, 23, 32, generator=generator)
    check_model_parity(encoder, lambda m, h, k: m(h, k), [x, _mask(3, 23, generator, full_row=2)], name="encoder",
                       fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_co_attention_layer_parity(generator, fused):
    layer = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40))
    image, text = torch.randn(2, 37, 24, generator=generator), torch.randn(2, 23, 32, generator=generator)
    check_model_parity(layer, lambda m, *a: m(*a), [image, _mask(2, 37, generator), text, _mask(2, 23, generator)],
                       name="co-attention", fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_cross_attention_layer_parity(generator, fused):
    layer = _init(CrossAttentionLayer(32, 4, 48, encoder_hidden_size=24))
    text, image = torch.randn(2, 23, 32, generator=generator), torch.randn(2, 17, 24, generator=generator)
    check_model_parity(layer, lambda m, *a: m(*a), [text, _mask(2, 23, generator), image, _mask(2, 17, generator)],
                       name="cross-attention", fused=fused)


def test_embeddings_parity(generator):
    text = _init(TextEmbeddings(50, 32, 40, 2))
    ids, types = torch.randint(0, 50, (2, 23), generator=generator), torch.randint(0, 2, (2, 23), generator=generator)
    check_model_parity(text, lambda m, i, t: m(i, t), [ids, types], name="text embeddings")
    regions = _init(RegionEmbeddings(20, 24))
    feats, locs = torch.randn(2, 37, 20, generator=generator), torch.rand(2, 37, 5, generator=generator)
    check_model_parity(regions, lambda m, f, l_: m(f, l_), [feats, locs], name="region embeddings")
    expected = _ln(F.linear(feats, regions.image_embeddings.weight, regions.image_embeddings.bias)
                   + F.linear(locs, regions.image_location_embeddings.weight, regions.image_location_embeddings.bias),
                   regions.norm)
    torch.testing.assert_close(regions(feats, locs), expected)


def test_packed_equals_padded(generator):
    layer = _init(CrossAttentionLayer(32, 4, 48, encoder_hidden_size=24))
    lengths, image_lengths = [5, 23, 1], [7, 3, 17]
    text, image = torch.randn(3, 23, 32, generator=generator), torch.randn(3, 17, 24, generator=generator)
    text_mask = torch.arange(23)[None] < torch.tensor(lengths)[:, None]
    image_mask = torch.arange(17)[None] < torch.tensor(image_lengths)[:, None]
    padded = layer(text, text_mask, image, image_mask)
    cu = torch.tensor([0, 5, 28, 29], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 27], dtype=torch.int32)
    packed = layer(text[text_mask], None, image[image_mask], None, cu_seqlens=cu, max_seqlen=23, cu_seqlens_k=cu_k,
                   max_seqlen_k=17)
    torch.testing.assert_close(packed, padded[text_mask], rtol=1e-5, atol=1e-5)
    co = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40))
    padded_image, padded_text = co(image, image_mask, text, text_mask)
    packed_image, packed_text = co(image[image_mask], None, text[text_mask], None, cu_seqlens_v=cu_k, max_seqlen_v=17,
                                   cu_seqlens_t=cu, max_seqlen_t=23)
    torch.testing.assert_close(packed_image, padded_image[image_mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_text, padded_text[text_mask], rtol=1e-5, atol=1e-5)
    bert = _init(TransformerLayer(32, 4, 48))
    torch.testing.assert_close(bert(text[text_mask], cu_seqlens=cu, max_seqlen=23), bert(text, text_mask)[text_mask],
                               rtol=1e-5, atol=1e-5)


def test_attention_probabilities_on_request(generator):
    encoder = _init(TransformerEncoder(2, 32, 4, 48))
    x, mask = torch.randn(2, 9, 32, generator=generator), _mask(2, 9, generator, full_row=1)
    out, probs = encoder(x, mask, output_attentions=True)
    torch.testing.assert_close(out, encoder(x, mask))
    assert len(probs) == 2 and probs[0].shape == (2, 4, 9, 9)
    assert not probs[0][0][..., ~mask[0]].any() and not probs[0][1].any()  # padded keys, a fully masked row
    co = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40))
    image, text = torch.randn(2, 5, 24, generator=generator), torch.randn(2, 9, 32, generator=generator)
    image_out, text_out, (probs_v, probs_t) = co(image, None, text, mask, output_attentions=True)
    assert probs_v.shape == (2, 2, 5, 9) and probs_t.shape == (2, 2, 9, 5)
    torch.testing.assert_close((image_out, text_out), co(image, None, text, mask))
    with pytest.raises(ValueError, match="output_attentions"):
        encoder(x[mask], cu_seqlens=torch.tensor([0, int(mask[0].sum()), int(mask.sum())], dtype=torch.int32),
                max_seqlen=9, output_attentions=True)


def test_attention_probabilities_go_through_dispatch_and_keep_their_gradient(generator):
    from fastvl import dispatch, use_backend
    from fastvl.dispatch import BackendUnavailableError
    from fastvl.nn import CrossAttention
    from fastvl.nn.vision import ViTAttention

    cross = _init(CrossAttention(32, 4, encoder_hidden_size=24))
    text, image = torch.randn(2, 9, 32, generator=generator), torch.randn(2, 7, 24, generator=generator)
    image_mask = _mask(2, 7, generator)

    def grad_cam(backend):  # ALBEF's Grad-CAM: keep the cross-attention map's gradient, back-propagate a score
        cross.zero_grad()
        with use_backend(attention=backend or "auto"):
            out, probs = cross(text, image, image_mask, output_attentions=True)
        probs.retain_grad()
        out[:, 0].sum().backward()
        return out, probs, probs.grad, cross.query.weight.grad.clone()

    seen = []
    def attention_calls(event, impl):
        if "attention" in event.op:
            seen.append((event.op, event.backend))

    with dispatch.listen(attention_calls):
        auto = grad_cam(None)
        image_out, text_out, _ = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40))(image, image_mask, text, None,
                                                                             output_attentions=True)
        _init(ViTAttention(24, 4))(image, return_probs=True)
    assert seen == [("attention", "eager"), ("co_attention", "eager"), ("attention", "eager")]
    for mine, reference in zip(auto, grad_cam("reference")):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    assert auto[2].abs().sum() > 0
    with use_backend(attention="sdpa"), pytest.raises(BackendUnavailableError, match="returns no attention probab"):
        cross(text, image, image_mask, output_attentions=True)


def test_gradient_checkpointing_gives_the_same_gradients(generator):
    layer = _init(CoAttentionLayer(32, 24, 16, 2, 48, 40)).train()
    image, text = torch.randn(2, 5, 24, generator=generator), torch.randn(2, 9, 32, generator=generator)

    def grads():
        layer.zero_grad()
        torch.manual_seed(7)  # dropout is on: checkpointing must replay it
        image_out, text_out = layer(image, None, text, None)
        (image_out.square().sum() + text_out.sum()).backward()
        return [p.grad.clone() for p in layer.parameters()]

    plain = grads()
    set_gradient_checkpointing(layer)
    assert layer.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_bad_inputs(generator):
    with pytest.raises(ValueError, match="divisible"):
        TransformerLayer(30, 4, 48)
    regions = RegionEmbeddings(20, 24)
    with pytest.raises(ValueError, match=r"region_feats must have shape \[B, Lv, 20\]"):
        regions(torch.randn(2, 5, 21), torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="region_loc"):
        regions(torch.randn(2, 5, 20), torch.rand(2, 4, 5))
    text = TextEmbeddings(50, 32, 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text(torch.zeros(1, 9, dtype=torch.long))
    co = CoAttentionLayer(32, 24, 16, 2, 48, 40)
    with pytest.raises(ValueError, match="share B"):
        co(torch.randn(2, 5, 24), None, torch.randn(3, 9, 32), None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual_grad", [True, False])
def test_linear_sharing_input_is_linear_with_one_backward_launch_fewer(generator, bias, residual_grad):
    from fastvl.bench.host import LaunchCounter
    from fastvl.nn.common import linear_sharing_input

    x = torch.randn(3, 7, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(24, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    grad_y = torch.randn(3, 7, 24, dtype=torch.float64, generator=generator)
    grad_r = torch.randn(3, 7, 16, dtype=torch.float64, generator=generator)
    inputs = [t for t in (x, weight, b) if t is not None]
    launches = []
    for shared in (True, False):
        y, residual = linear_sharing_input(x, weight, b) if shared else (F.linear(x, weight, b), x)
        loss = (y * grad_y).sum() + ((residual * grad_r).sum() if residual_grad else 0)
        counter = LaunchCounter()
        with counter:
            grads = torch.autograd.grad(loss, inputs)
        launches.append((counter.total, grads, y))
    (fused_count, fused, fused_y), (plain_count, plain, plain_y) = launches
    torch.testing.assert_close(fused_y, plain_y, rtol=0, atol=0)
    for a, e in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # no add of the residual's gradient; the loss's own ops count the same on both sides
    assert fused_count == plain_count - (1 if residual_grad else 0)
