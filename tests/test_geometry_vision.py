"""VL-BERT's box geometry embedding and ALBEF's ViT: formulas, parity, bad input."""

import math

import pytest
import torch
from model_parity import check_model_parity

from fastvl.nn import set_gradient_checkpointing
from fastvl.nn.geometry import VisualFeatureEmbedding, box_geometry_embedding
from fastvl.nn.vision import VisionTransformer, resize_pos_embed


def _pixel_geometry_loop(box_px, width, height, dim):
    """VL-BERT's definition on one pixel box, element by element."""
    x1, y1, x2, y2 = box_px
    coords = [(x1 + x2) / 2 / width * 100, (y1 + y2) / 2 / height * 100, (x2 - x1) / width * 100,
              (y2 - y1) / height * 100]
    values = []
    for p in coords:
        values += [math.sin(p / 1000 ** (i / dim)) for i in range(dim)]
        values += [math.cos(p / 1000 ** (i / dim)) for i in range(dim)]
    return torch.tensor(values, dtype=torch.float64)


def test_geometry_matches_pixel_definition():
    width, height, dim = 640.0, 427.0, 16
    boxes_px = [(12.5, 30.0, 200.0, 411.0), (0.0, 0.0, 639.0, 426.0), (320.0, 100.0, 320.0, 100.0)]
    normalised = torch.tensor([[x1 / width, y1 / height, x2 / width, y2 / height]
                               for x1, y1, x2, y2 in boxes_px], dtype=torch.float64)
    got = box_geometry_embedding(normalised, dim)
    assert got.shape == (3, 8 * dim)
    for row, box in zip(got, boxes_px):
        torch.testing.assert_close(row, _pixel_geometry_loop(box, width, height, dim), rtol=1e-12, atol=1e-12)


def test_visual_feature_embedding_is_geometry_then_feature(generator):
    embed = VisualFeatureEmbedding(feature_dim=24, hidden_size=12, sinusoid_dim=8).eval().double()
    features = torch.randn(2, 5, 24, generator=generator, dtype=torch.float64)
    corner = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) * 0.5
    boxes = torch.cat((corner, corner + 0.4), -1)
    expected = torch.relu(torch.cat((box_geometry_embedding(boxes, 8), features), -1) @ embed.proj.weight.T
                          + embed.proj.bias)
    torch.testing.assert_close(embed(features, boxes), expected)


def test_visual_feature_embedding_parity(generator):
    embed = VisualFeatureEmbedding(feature_dim=32, hidden_size=16, sinusoid_dim=8).eval()
    corner = torch.rand(3, 37, 2, generator=generator) * 0.6
    boxes = torch.cat((corner, corner + torch.rand(3, 37, 2, generator=generator) * 0.4), -1)
    check_model_parity(embed, lambda m, f, b: m(f, b), [torch.randn(3, 37, 32, generator=generator), boxes],
                       name="visual_feature_embedding")


@pytest.mark.parametrize("bad,message", [
    (lambda f, b: (f[..., :-1], b), "RoI features of width 32"),
    (lambda f, b: (f, b * 2), "outside \\[0, 1\\]"),
    (lambda f, b: (f, b[..., [2, 3, 0, 1]]), "x2 < x1"),
    (lambda f, b: (f, b[:1]), "boxes must have shape"),
    (lambda f, b: (f, b.clone().fill_(float("nan"))), "non-finite"),
])
def test_visual_feature_embedding_bad_input(generator, bad, message):
    embed = VisualFeatureEmbedding(feature_dim=32, hidden_size=16, sinusoid_dim=8)
    corner = torch.rand(2, 4, 2, generator=generator) * 0.5
    features, boxes = torch.randn(2, 4, 32, generator=generator), torch.cat((corner, corner + 0.1), -1)
    with pytest.raises(ValueError, match=message):
        embed(*bad(features, boxes))


def test_box_check_reads_only_valid_regions(generator):
    embed = VisualFeatureEmbedding(feature_dim=8, hidden_size=4, sinusoid_dim=4)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [-1.0, -1.0, -1.0, -1.0]]])  # padded region marked -1
    valid = torch.tensor([[True, False]])
    assert embed(torch.randn(1, 2, 8, generator=generator), boxes, valid).shape == (1, 2, 4)


def _tiny_vit():
    return VisionTransformer(image_size=32, patch_size=8, dim=32, depth=2, heads=2).eval()  # head dim 16


def _independent_vit(vit, images):
    """The original ViT written from its definition, with per-head loops and explicit LayerNorms."""
    d = vit.cls_token.shape[-1]
    patches = torch.nn.functional.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8)
    x = torch.cat((vit.cls_token.expand(images.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)), 1)
    x = x + vit.pos_embed

    def layer_norm(t, norm):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    for block in vit.blocks:
        h = layer_norm(x, block.norm1)
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
        heads = block.attn.heads
        hd = d // heads
        outs = []
        for head in range(heads):
            q, k, v = (qkv[..., part * d + head * hd: part * d + (head + 1) * hd] for part in range(3))
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v)
        x = x + torch.cat(outs, -1) @ block.attn.proj.weight.T + block.attn.proj.bias
        h = layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return layer_norm(x, vit.norm)


def test_vit_matches_independent_definition(generator):
    vit = _tiny_vit().double()
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(vit(images), _independent_vit(vit, images), rtol=1e-10, atol=1e-10)
    out, probs = vit(images, return_attention=True)
    torch.testing.assert_close(out, vit(images))
    assert len(probs) == 2 and probs[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 17, dtype=torch.float64))


TRITON_LAYERS = pytest.param({"layer_norm": "triton", "bias_gelu": "triton", "attention": "triton"},
                              marks=pytest.mark.interpret, id="triton-interpreter")


@pytest.mark.parametrize("fused", [None, TRITON_LAYERS])
def test_vit_parity_and_checkpointing(generator, fused):
    vit = _tiny_vit()
    images = torch.randn(3, 3, 32, 32, generator=generator)
    check_model_parity(vit, lambda m, x: m(x), [images], name="vit", fused=fused)
    reference = vit(images)
    set_gradient_checkpointing(vit.train())
    assert all(block.gradient_checkpointing for block in vit.blocks)
    images.requires_grad_(True)
    out = vit(images)
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert images.grad is not None and vit.blocks[0].attn.qkv.weight.grad is not None


def test_vit_bad_images():
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 32, 32\]"):
        _tiny_vit()(torch.randn(1, 3, 16, 16))


def test_resize_pos_embed_keeps_cls_and_grid(generator):
    pos = torch.randn(1, 1 + 16, 8, generator=generator)
    same = resize_pos_embed(pos, 16)
    assert same is pos
    bigger = resize_pos_embed(pos, 36)
    assert bigger.shape == (1, 37, 8) and torch.equal(bigger[:, 0], pos[:, 0])
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos, 20)
