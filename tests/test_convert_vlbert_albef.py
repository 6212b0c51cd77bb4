"""VL-BERT and ALBEF converters: state dicts written in the originals' key layouts (random weights) are
loaded, run, and compared with forwards computed independently from those state dicts (float64),
following the originals' definitions (boolean-mask packing, separate q/k/v, additive -10000 masks)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvl.convert import ConversionError, load_state_dict_file
from fastvl.convert.albef import albef_from_original, albef_to_original
from fastvl.convert.vlbert import vlbert_from_original, vlbert_to_original

H, HEADS, INTER, VOCAB, LAYERS = 16, 2, 24, 40, 2


def _rand(generator, *shape, scale=0.3):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _bert_layer_keys(state, prefix, generator, cross_width=None):
    def linear(name, out_dim, in_dim):
        state[f"{prefix}{name}.weight"] = _rand(generator, out_dim, in_dim)
        state[f"{prefix}{name}.bias"] = _rand(generator, out_dim, scale=0.1)

    def norm(name):
        state[f"{prefix}{name}.weight"] = 1 + _rand(generator, H, scale=0.1)
        state[f"{prefix}{name}.bias"] = _rand(generator, H, scale=0.1)

    for part in ("query", "key", "value"):
        linear(f"attention.self.{part}", H, H)
    linear("attention.output.dense", H, H)
    norm("attention.output.LayerNorm")
    if cross_width is not None:
        linear("crossattention.self.query", H, H)
        linear("crossattention.self.key", H, cross_width)
        linear("crossattention.self.value", H, cross_width)
        linear("crossattention.output.dense", H, H)
        norm("crossattention.output.LayerNorm")
    linear("intermediate.dense", INTER, H)
    linear("output.dense", H, INTER)
    norm("output.LayerNorm")


def _layer_norm(state, name, x, eps=1e-12):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _linear(state, name, x):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def _gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attention(q, k, v, additive):
    def heads(t):
        return t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(H // HEADS) + additive[:, None, None, :]
    context = torch.softmax(scores, -1) @ heads(v)
    return context.transpose(1, 2).reshape(q.shape[0], q.shape[1], H)


def _bert_layer(state, p, x, additive, image=None, image_additive=None):
    q, k, v = (_linear(state, f"{p}attention.self.{n}", x) for n in ("query", "key", "value"))
    x = _layer_norm(state, f"{p}attention.output.LayerNorm", _linear(state, f"{p}attention.output.dense",
                                                                      _attention(q, k, v, additive)) + x)
    if image is not None:
        q = _linear(state, f"{p}crossattention.self.query", x)
        k, v = (_linear(state, f"{p}crossattention.self.{n}", image) for n in ("key", "value"))
        x = _layer_norm(state, f"{p}crossattention.output.LayerNorm",
                        _linear(state, f"{p}crossattention.output.dense", _attention(q, k, v, image_additive)) + x)
    inner = _gelu(_linear(state, f"{p}intermediate.dense", x))
    return _layer_norm(state, f"{p}output.LayerNorm", _linear(state, f"{p}output.dense", inner) + x)


# VL-BERT ------------------------------------------------------------------------------------------

FEAT, SIN, CLASSES, MAX_POS = 12, 4, 7, 30
VLBERT_CONFIG = {"NETWORK": {"IMAGE_FINAL_DIM": H, "IMAGE_SEMANTIC": False, "WITH_MLM_LOSS": True,
                             "WITH_MVRC_LOSS": True, "WITH_REL_LOSS": False,
                             "VLBERT": {"with_pooler": False, "input_transform_type": 1, "visual_size": H,
                                        "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                        "intermediate_size": INTER, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                                        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": MAX_POS,
                                        "type_vocab_size": 3, "vocab_size": VOCAB, "initializer_range": 0.02,
                                        "visual_scale_text_init": 0.0, "visual_scale_object_init": 0.0,
                                        "visual_ln": True, "pos_embedding_frozen": False, "sinusoid_dim": SIN}}}


def original_vlbert_state(generator, heads=("mlm", "mvrc")):
    """A ResNetVLBERTForPretraining state dict (precomputed features), keys as the original saves them."""
    s = {}
    for name, rows in (("word_embeddings", VOCAB), ("end_embedding", 1), ("position_embeddings", MAX_POS),
                       ("token_type_embeddings", 3)):
        s[f"vlbert.{name}.weight"] = _rand(generator, rows, H)
    for name in ("embedding_LayerNorm", "visual_ln_text", "visual_ln_object"):
        s[f"vlbert.{name}.weight"] = 1 + _rand(generator, H, scale=0.1)  # non-zero visual scales: a live path
        s[f"vlbert.{name}.bias"] = _rand(generator, H, scale=0.1)
    for i in range(LAYERS):
        _bert_layer_keys(s, f"vlbert.encoder.layer.{i}.", generator)
    s["image_feature_extractor.obj_downsample.1.weight"] = _rand(generator, H, 8 * SIN + FEAT)
    s["image_feature_extractor.obj_downsample.1.bias"] = _rand(generator, H, scale=0.1)
    s["object_linguistic_embeddings.weight"] = _rand(generator, 1, H)
    s["object_mask_visual_embedding.weight"] = _rand(generator, 1, FEAT)
    s["object_mask_word_embedding.weight"] = _rand(generator, 1, H)
    if "mlm" in heads:
        s["vlbert.mlm_head.predictions.bias"] = _rand(generator, VOCAB, scale=0.1)
        s["vlbert.mlm_head.predictions.transform.dense.weight"] = _rand(generator, H, H)
        s["vlbert.mlm_head.predictions.transform.dense.bias"] = _rand(generator, H, scale=0.1)
        s["vlbert.mlm_head.predictions.transform.LayerNorm.weight"] = 1 + _rand(generator, H, scale=0.1)
        s["vlbert.mlm_head.predictions.transform.LayerNorm.bias"] = _rand(generator, H, scale=0.1)
        s["vlbert.mlm_head.predictions.decoder.weight"] = s["vlbert.word_embeddings.weight"]
    if "mvrc" in heads:
        s["vlbert.mvrc_head.transform.dense.weight"] = _rand(generator, H, H)
        s["vlbert.mvrc_head.transform.dense.bias"] = _rand(generator, H, scale=0.1)
        s["vlbert.mvrc_head.region_cls_pred.weight"] = _rand(generator, CLASSES, H)
        s["vlbert.mvrc_head.region_cls_pred.bias"] = _rand(generator, CLASSES, scale=0.1)
    return {f"module.{k}": v for k, v in s.items()}


def vlbert_inputs(generator, batch=3, text=9, regions=6):
    ids = torch.randint(1, VOCAB, (batch, text), generator=generator)
    ids[1, 6:] = 0
    ids[2, 3:] = 0
    features = _rand(generator, batch, regions, FEAT, scale=1.0)
    corner = torch.rand(batch, regions, 2, generator=generator, dtype=torch.float64) * 0.6
    boxes = torch.cat((corner, corner + torch.rand(batch, regions, 2, generator=generator, dtype=torch.float64) * 0.4),
                      -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # region 0: the whole image
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[0, 4:] = False
    region_mask[2, 2:] = False
    boxes[~region_mask] = -1.0  # padded boxes, as the original marks them
    return ids, features, boxes, region_mask


def independent_vlbert(s, ids, features, boxes, region_mask, width=640.0, height=480.0):
    """VL-BERT's forward per the original: pixel boxes, coordinate embedding, boolean-mask packing."""
    s = {k.removeprefix("module."): v for k, v in s.items()}
    batch, text_len = ids.shape
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    px = boxes * scale
    cx, cy = (px[..., 0] + px[..., 2]) / 2 / width * 100, (px[..., 1] + px[..., 3]) / 2 / height * 100
    w, h = (px[..., 2] - px[..., 0]) / width * 100, (px[..., 3] - px[..., 1]) / height * 100
    position = torch.stack((cx, cy, w, h), -1)[..., None] / 1000 ** (torch.arange(SIN, dtype=torch.float64) / SIN)
    coord = torch.cat((position.sin(), position.cos()), -1).flatten(-2)
    obj = torch.relu(_linear(s, "image_feature_extractor.obj_downsample.1", torch.cat((coord, features), -1)))
    obj = obj * region_mask[..., None]
    text_vl = s["vlbert.word_embeddings.weight"][ids] + _layer_norm(s, "vlbert.visual_ln_text", obj[:, :1])
    obj_vl = s["object_linguistic_embeddings.weight"][0] + _layer_norm(s, "vlbert.visual_ln_object", obj)
    text_mask = ids > 0
    lengths = (text_mask.sum(1) + region_mask.sum(1) + 1).tolist()
    length = max(lengths)
    seq = torch.zeros(batch, length, H, dtype=torch.float64)
    mask = torch.zeros(batch, length)
    for b in range(batch):
        rows, pos = [], []
        n = int(text_mask[b].sum())
        rows += [text_vl[b, j] + s["vlbert.token_type_embeddings.weight"][0]
                 for j in range(text_len) if text_mask[b, j]]
        pos += list(range(n))
        objects = [obj_vl[b, r] for r in range(boxes.shape[1]) if region_mask[b, r]]
        rows += [o + s["vlbert.token_type_embeddings.weight"][2] for o in objects] + \
                [s["vlbert.end_embedding.weight"][0] + s["vlbert.token_type_embeddings.weight"][2]]
        pos += [n] * len(objects) + [n + 1]
        seq[b, :len(rows)] = torch.stack(rows) + s["vlbert.position_embeddings.weight"][pos]
        mask[b, :len(rows)] = 1
    x = _layer_norm(s, "vlbert.embedding_LayerNorm", seq)
    additive = (1.0 - mask.double()) * -10000.0
    for i in range(LAYERS):
        x = _bert_layer(s, f"vlbert.encoder.layer.{i}.", x, additive)
    text_out = torch.zeros(batch, text_len, H, dtype=torch.float64)
    obj_out = torch.zeros(batch, boxes.shape[1], H, dtype=torch.float64)
    for b in range(batch):
        n = int(text_mask[b].sum())
        text_out[b, :n] = x[b, :n]
        obj_out[b, region_mask[b]] = x[b, n:n + int(region_mask[b].sum())]
    return text_out, obj_out, s


def test_vlbert_converted_matches_independent_forward(generator):
    state = original_vlbert_state(generator)
    model, report = vlbert_from_original(state, VLBERT_CONFIG, return_report=True, dtype=torch.float64)
    assert report.ok and not report.skipped_known_unused
    ids, features, boxes, region_mask = vlbert_inputs(generator)
    out = model.vlbert(ids, features, boxes, region_mask=region_mask)
    text, objects, s = independent_vlbert(state, ids, features, boxes, region_mask)
    torch.testing.assert_close(out.text, text, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.objects, objects, rtol=1e-9, atol=1e-9)
    # heads: MLM (tied decoder) and masked RoI classification
    t = _layer_norm(s, "vlbert.mlm_head.predictions.transform.LayerNorm",
                    _gelu(_linear(s, "vlbert.mlm_head.predictions.transform.dense", text)))
    mlm = t @ s["vlbert.word_embeddings.weight"].T + s["vlbert.mlm_head.predictions.bias"]
    torch.testing.assert_close(model.mlm_head(out.text, model.vlbert.word_embeddings.weight), mlm)
    scores = torch.softmax(_rand(generator, *region_mask.shape, CLASSES), -1)
    result = model(ids, features, boxes, region_mask=region_mask, masked_regions=torch.zeros_like(region_mask),
                   region_class_scores=scores)
    mvrc = _linear(s, "vlbert.mvrc_head.region_cls_pred", _gelu(_linear(s, "vlbert.mvrc_head.transform.dense",
                                                                        out.objects)))
    torch.testing.assert_close(result.mvrc_logits, mvrc)


def test_vlbert_task_heads_from_original(generator):
    state = original_vlbert_state(generator, heads=())
    for key in [k for k in state if "object_mask" in k]:
        del state[key]
    state["module.final_mlp.0.dense.weight"] = _rand(generator, H, H)
    state["module.final_mlp.0.dense.bias"] = _rand(generator, H)
    state["module.final_mlp.0.LayerNorm.weight"] = 1 + _rand(generator, H, scale=0.1)
    state["module.final_mlp.0.LayerNorm.bias"] = _rand(generator, H)
    state["module.final_mlp.2.weight"] = _rand(generator, 5, H)
    state["module.final_mlp.2.bias"] = _rand(generator, 5)
    state["module.image_feature_extractor.backbone.conv1.weight"] = _rand(generator, 4, 3, 1, 1)  # the detector
    model, report = vlbert_from_original(state, VLBERT_CONFIG["NETWORK"]["VLBERT"], return_report=True,
                                         dtype=torch.float64)
    assert type(model).__name__ == "VLBERTForVQA" and model.num_answers == 5
    assert report.skipped_known_unused == ["image_feature_extractor.backbone.conv1.weight"]
    ids, features, boxes, region_mask = vlbert_inputs(generator)
    slots = torch.tensor([2, 4, 1])
    logits = model(ids, features, boxes, slots, region_mask=region_mask)["logits"]
    text, _, s = independent_vlbert(state, ids, features, boxes, region_mask)
    hidden = text[torch.arange(3), slots]
    expected = _linear(s, "final_mlp.2", _layer_norm(s, "final_mlp.0.LayerNorm",
                                                     _gelu(_linear(s, "final_mlp.0.dense", hidden))))
    torch.testing.assert_close(logits, expected)


def test_vlbert_vcr_layout(generator):
    """VCR checkpoints: TimeDistributed's ``vlbert._module.`` keys, a pooler, ``final_mlp.1``, and the
    auxiliary ``cnn_loss_reg`` head (skipped)."""
    state = {k.replace("module.vlbert.", "module.vlbert._module."): v
             for k, v in original_vlbert_state(generator, heads=()).items() if "object_mask" not in k}
    state["module.vlbert._module.pooler.dense.weight"] = _rand(generator, H, H)
    state["module.vlbert._module.pooler.dense.bias"] = _rand(generator, H)
    state["module.final_mlp.1.weight"], state["module.final_mlp.1.bias"] = _rand(generator, 1, H), _rand(generator, 1)
    state["module.cnn_loss_reg.0.dense.weight"] = _rand(generator, H, H)
    model, report = vlbert_from_original(state, VLBERT_CONFIG["NETWORK"]["VLBERT"], return_report=True,
                                         dtype=torch.float64)
    assert type(model).__name__ == "VLBERTForVCR" and report.skipped_known_unused == ["cnn_loss_reg.0.dense.weight"]
    ids, features, boxes, region_mask = vlbert_inputs(generator)
    logits = model(ids[:, None], features, boxes, region_mask=region_mask)["logits"]
    plain = {k.replace("vlbert._module.", "vlbert."): v for k, v in state.items()}
    text, _, s = independent_vlbert(plain, ids, features, boxes, region_mask)
    expected = _linear(s, "final_mlp.1", torch.tanh(_linear(s, "vlbert.pooler.dense", text[:, 0])))
    torch.testing.assert_close(logits, expected)
    exported = vlbert_to_original(model)
    assert sorted(exported) == sorted(k for k in state if "cnn_loss_reg" not in k)


def test_vlbert_round_trip_is_lossless(generator, tmp_path):
    state = original_vlbert_state(generator)
    path = tmp_path / "vl-bert.model"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_state_dict_file(path)  # weights_only
    model = vlbert_from_original(loaded, VLBERT_CONFIG, dtype=torch.float64)
    exported = vlbert_to_original(model)
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key
    again = vlbert_to_original(vlbert_from_original(exported, VLBERT_CONFIG, dtype=torch.float64))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_vlbert_strict_errors_name_the_keys(generator):
    state = original_vlbert_state(generator)
    broken = dict(state)
    del broken["module.vlbert.encoder.layer.1.attention.self.key.bias"]
    broken["module.vlbert.surprise.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"layer\.1\.attention\.self\.key\.bias(.|\n)*surprise"):
        vlbert_from_original(broken, VLBERT_CONFIG)
    model, report = vlbert_from_original(broken, VLBERT_CONFIG, strict=False, return_report=True)
    assert not report.ok and report.unused_in_checkpoint == ["vlbert.surprise.weight"]
    end_to_end = {k: v for k, v in state.items() if "object_mask_visual" not in k}
    end_to_end["module.image_feature_extractor.backbone.conv1.weight"] = torch.zeros(2, 3, 1, 1)
    model = vlbert_from_original(end_to_end, VLBERT_CONFIG)
    assert not model.object_mask_visual_embedding.weight.any()
    untied = dict(state)
    untied["module.vlbert.mlm_head.predictions.decoder.weight"] = state["module.vlbert.word_embeddings.weight"] + 1
    with pytest.raises(ConversionError, match="tied"):
        vlbert_from_original(untied, VLBERT_CONFIG)
    with pytest.raises(ValueError, match="unknown VL-BERT config keys"):
        vlbert_from_original(state, {**VLBERT_CONFIG["NETWORK"]["VLBERT"], "hidden_sise": 3})


# ALBEF --------------------------------------------------------------------------------------------

IMAGE, PATCH, VW, EMBED, QUEUE, FUSION = 16, 8, 12, 6, 8, 1
ALBEF_CONFIG = {"image_res": IMAGE, "embed_dim": EMBED, "queue_size": QUEUE, "momentum": 0.995, "temp": 0.07,
                "alpha": 0.4, "mlm_probability": 0.15, "vision_width": VW, "patch_size": PATCH, "vision_depth": 2,
                "vision_heads": 2,
                "bert_config": {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
                                "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": H,
                                "initializer_range": 0.02, "intermediate_size": INTER, "layer_norm_eps": 1e-12,
                                "max_position_embeddings": 20, "model_type": "bert", "num_attention_heads": HEADS,
                                "num_hidden_layers": LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
                                "vocab_size": VOCAB, "fusion_layer": FUSION, "encoder_width": VW}}


def _vit_keys(s, p, generator):
    n = (IMAGE // PATCH) ** 2
    s[f"{p}cls_token"] = _rand(generator, 1, 1, VW)
    s[f"{p}pos_embed"] = _rand(generator, 1, n + 1, VW)
    s[f"{p}patch_embed.proj.weight"] = _rand(generator, VW, 3, PATCH, PATCH, scale=0.1)
    s[f"{p}patch_embed.proj.bias"] = _rand(generator, VW, scale=0.1)
    for i in range(2):
        for name, shape in (("norm1", None), ("attn.qkv", (3 * VW, VW)), ("attn.proj", (VW, VW)), ("norm2", None),
                            ("mlp.fc1", (4 * VW, VW)), ("mlp.fc2", (VW, 4 * VW))):
            rows = shape[0] if shape else VW
            s[f"{p}blocks.{i}.{name}.weight"] = _rand(generator, *shape) if shape else 1 + _rand(generator, VW,
                                                                                                   scale=0.1)
            s[f"{p}blocks.{i}.{name}.bias"] = _rand(generator, rows, scale=0.1)
    s[f"{p}norm.weight"] = 1 + _rand(generator, VW, scale=0.1)
    s[f"{p}norm.bias"] = _rand(generator, VW, scale=0.1)


def original_albef_state(generator):
    """ALBEF's pretraining checkpoint layout (``model`` of ALBEF_4M.pth), random weights."""
    s = {}
    _vit_keys(s, "visual_encoder.", generator)
    t = "text_encoder.bert."
    s[f"{t}embeddings.word_embeddings.weight"] = _rand(generator, VOCAB, H)
    s[f"{t}embeddings.position_embeddings.weight"] = _rand(generator, 20, H)
    s[f"{t}embeddings.token_type_embeddings.weight"] = _rand(generator, 2, H)
    s[f"{t}embeddings.LayerNorm.weight"] = 1 + _rand(generator, H, scale=0.1)
    s[f"{t}embeddings.LayerNorm.bias"] = _rand(generator, H, scale=0.1)
    s[f"{t}embeddings.position_ids"] = torch.arange(20)[None]
    for i in range(LAYERS):
        _bert_layer_keys(s, f"{t}encoder.layer.{i}.", generator, cross_width=VW if i >= FUSION else None)
    c = "text_encoder.cls.predictions."
    s[f"{c}bias"] = _rand(generator, VOCAB, scale=0.1)
    s[f"{c}transform.dense.weight"] = _rand(generator, H, H)
    s[f"{c}transform.dense.bias"] = _rand(generator, H, scale=0.1)
    s[f"{c}transform.LayerNorm.weight"] = 1 + _rand(generator, H, scale=0.1)
    s[f"{c}transform.LayerNorm.bias"] = _rand(generator, H, scale=0.1)
    s[f"{c}decoder.weight"] = s[f"{t}embeddings.word_embeddings.weight"]
    s[f"{c}decoder.bias"] = s[f"{c}bias"]
    s["vision_proj.weight"], s["vision_proj.bias"] = _rand(generator, EMBED, VW), _rand(generator, EMBED)
    s["text_proj.weight"], s["text_proj.bias"] = _rand(generator, EMBED, H), _rand(generator, EMBED)
    s["itm_head.weight"], s["itm_head.bias"] = _rand(generator, 2, H), _rand(generator, 2)
    s["temp"] = torch.tensor(0.07, dtype=torch.float64)
    for key in [k for k in s if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))]:
        head, rest = key.split(".", 1)
        s[f"{head}_m.{rest}"] = s[key] + 0.01
    s["text_encoder_m.cls.predictions.decoder.weight"] = s["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    s["text_encoder_m.cls.predictions.decoder.bias"] = s["text_encoder_m.cls.predictions.bias"]
    s["image_queue"] = F.normalize(_rand(generator, EMBED, QUEUE), dim=0)
    s["text_queue"] = F.normalize(_rand(generator, EMBED, QUEUE), dim=0)
    s["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return s


def independent_vit(s, p, images):
    x = F.conv2d(images, s[f"{p}patch_embed.proj.weight"], s[f"{p}patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat((s[f"{p}cls_token"].expand(images.shape[0], -1, -1), x.flatten(2).transpose(1, 2)), 1)
    x = x + s[f"{p}pos_embed"]
    for i in range(2):
        b = f"{p}blocks.{i}."
        hidden = _layer_norm(s, b + "norm1", x, 1e-6)
        qkv = _linear(s, b + "attn.qkv", hidden).view(x.shape[0], x.shape[1], 3, 2, VW // 2).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(VW // 2), -1)
        x = x + _linear(s, b + "attn.proj", (probs @ qkv[2]).transpose(1, 2).reshape(x.shape))
        x = x + _linear(s, b + "mlp.fc2", _gelu(_linear(s, b + "mlp.fc1", _layer_norm(s, b + "norm2", x, 1e-6))))
    return _layer_norm(s, f"{p}norm", x, 1e-6)


def independent_albef_text(s, ids, mask, image=None, t="text_encoder.bert."):
    x = s[f"{t}embeddings.word_embeddings.weight"][ids] + s[f"{t}embeddings.position_embeddings.weight"][
        : ids.shape[1]] + s[f"{t}embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(s, f"{t}embeddings.LayerNorm", x)
    additive = (1.0 - mask.double()) * -10000.0
    layers = range(FUSION) if image is None else range(LAYERS)
    image_additive = torch.zeros(ids.shape[0], image.shape[1], dtype=torch.float64) if image is not None else None
    for i in layers:
        x = _bert_layer(s, f"{t}encoder.layer.{i}.", x, additive, image if i >= FUSION else None, image_additive)
    return x


def test_albef_converted_matches_independent_forward(generator):
    state = original_albef_state(generator)
    model, report = albef_from_original(state, ALBEF_CONFIG, return_report=True, dtype=torch.float64)
    assert report.ok and report.skipped_known_unused == ["text_encoder.bert.embeddings.position_ids",
                                                         "text_encoder_m.bert.embeddings.position_ids"]
    assert (model.config.image_res, model.config.queue_size) == (IMAGE, QUEUE)
    images = _rand(generator, 3, 3, IMAGE, IMAGE, scale=1.0)
    ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    ids[1, 4:] = 0
    mask = ids != 0
    image_tokens, image_feat = model.image_features(images)
    expected_tokens = independent_vit(state, "visual_encoder.", images)
    torch.testing.assert_close(image_tokens, expected_tokens)
    torch.testing.assert_close(image_feat, F.normalize(_linear(state, "vision_proj", expected_tokens[:, 0]), dim=-1))
    text, text_feat = model.text_features(ids, mask)
    expected_text = independent_albef_text(state, ids, mask)
    torch.testing.assert_close(text[mask], expected_text[mask])
    torch.testing.assert_close(text_feat, F.normalize(_linear(state, "text_proj", expected_text[:, 0]), dim=-1))
    fused = independent_albef_text(state, ids, mask, expected_tokens)
    itm = _linear(state, "itm_head", fused[:, 0])
    ours = model.itm_head(model.text_encoder(ids, mask, image_tokens)[:, 0])
    torch.testing.assert_close(ours, itm)
    c = "text_encoder.cls.predictions."
    mlm = _layer_norm(state, f"{c}transform.LayerNorm", _gelu(_linear(state, f"{c}transform.dense", fused)))
    mlm = mlm @ state["text_encoder.bert.embeddings.word_embeddings.weight"].T + state[f"{c}bias"]
    torch.testing.assert_close(model.text_encoder.mlm_logits(model.text_encoder(ids, mask, image_tokens))[mask],
                               mlm[mask])
    tokens_m = independent_vit(state, "visual_encoder_m.", images)
    torch.testing.assert_close(model.image_features(images, momentum=True)[0], tokens_m)


def test_albef_round_trips_and_finetuned_layouts(generator, tmp_path):
    state = original_albef_state(generator)
    path = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": state, "config": {"lr": 1e-4}}, path)
    model = albef_from_original(load_state_dict_file(path), ALBEF_CONFIG, dtype=torch.float64)
    exported = albef_to_original(model)
    assert sorted(exported) == sorted(k for k in state if not k.endswith("position_ids"))
    assert all(torch.equal(exported[k], state[k].to(exported[k].dtype)) for k in exported)
    # ALBEF's retrieval checkpoints: BertModel keys (no "bert.", no MLM head) and an idx_queue
    retrieval = {k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
                 for k, v in state.items() if ".cls." not in k}
    retrieval["idx_queue"] = torch.full((1, QUEUE), -100)
    model, report = albef_from_original(retrieval, ALBEF_CONFIG, return_report=True)
    assert model.text_encoder.mlm_head is None and "idx_queue" in report.skipped_known_unused
    assert sorted(albef_to_original(model)) == sorted(k for k in retrieval if k != "idx_queue"
                                                      and not k.endswith("position_ids"))


def test_albef_nlvr2_alternates_images_and_shares_cross_kv(generator):
    config = {**ALBEF_CONFIG, "bert_config": {**ALBEF_CONFIG["bert_config"]}}
    state = original_albef_state(generator)
    nlvr = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()
            if k.startswith(("visual_encoder.", "text_encoder.bert.")) and "position_ids" not in k}
    # two fusion layers per original one (18 = 6 + 2 x 6 in the base model); pairs share key/value
    for i in range(FUSION, LAYERS):
        for j in (FUSION + 2 * (i - FUSION), FUSION + 2 * (i - FUSION) + 1):
            for key in [k for k in state if k.startswith(f"text_encoder.bert.encoder.layer.{i}.")]:
                nlvr[key.replace(f"text_encoder.bert.encoder.layer.{i}.", f"text_encoder.encoder.layer.{j}.")] = \
                    state[key] + (0.05 * j if "crossattention.self.key" not in key and "value" not in key else 0)
    nlvr["cls_head.0.weight"], nlvr["cls_head.0.bias"] = _rand(generator, H, H), _rand(generator, H)
    nlvr["cls_head.2.weight"], nlvr["cls_head.2.bias"] = _rand(generator, 2, H), _rand(generator, 2)
    model = albef_from_original(nlvr, config, dtype=torch.float64)
    assert type(model).__name__ == "ALBEFClassifier" and model.num_images == 2
    layers = model.text_encoder.fusion_layers
    assert layers[0].crossattention.kv is layers[1].crossattention.kv
    images = [_rand(generator, 2, 3, IMAGE, IMAGE, scale=1.0) for _ in range(2)]
    ids = torch.randint(3, VOCAB, (2, 5), generator=generator)
    logits = model(tuple(images), ids)["logits"]
    tokens = [independent_vit(nlvr, "visual_encoder.", im) for im in images]
    x = independent_albef_text({k.replace("text_encoder.", "text_encoder.bert.", 1): v for k, v in nlvr.items()},
                               ids, torch.ones_like(ids), None)
    zeros = torch.zeros(2, tokens[0].shape[1], dtype=torch.float64)
    for j in range(FUSION, FUSION + 2 * (LAYERS - FUSION)):
        x = _bert_layer(nlvr, f"text_encoder.encoder.layer.{j}.", x, torch.zeros(2, 5, dtype=torch.float64),
                        tokens[(j - FUSION) % 2], zeros)
    expected = _linear(nlvr, "cls_head.2", torch.relu(_linear(nlvr, "cls_head.0", x[:, 0])))
    torch.testing.assert_close(logits, expected)
    assert sorted(albef_to_original(model)) == sorted(nlvr)


def test_albef_strict_errors(generator):
    state = original_albef_state(generator)
    del state["visual_encoder.blocks.1.attn.qkv.bias"]
    state["text_encoder.bert.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(H, H)
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.qkv\.bias(.|\n)*layer\.0\.crossattention"):
        albef_from_original(state, ALBEF_CONFIG)
    with pytest.raises(ValueError, match="unknown ALBEF config keys"):
        albef_from_original(original_albef_state(generator), {**ALBEF_CONFIG, "imag_res": 3})


def test_fastvl_convert_cli(generator, tmp_path, capsys):
    import json

    try:
        import yaml
    except ImportError:
        yaml = None

    from safetensors.torch import load_file

    from fastvl.cli import main

    for name, state, config, container in (("vlbert", original_vlbert_state(generator), VLBERT_CONFIG, "state_dict"),
                                            ("albef", original_albef_state(generator), ALBEF_CONFIG, "model")):
        checkpoint, config_path = tmp_path / f"{name}.pth", tmp_path / f"{name}.json"
        torch.save({container: state}, checkpoint)
        config_path.write_text(json.dumps(config))
        if name == "vlbert" and yaml is not None:  # the originals ship YAML configs
            config_path = tmp_path / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(config))
        output = tmp_path / "out" / f"{name}.safetensors"
        assert main(["convert", name, str(checkpoint), "--config", str(config_path), "-o", str(output)]) == 0
        converted = load_file(str(output))
        convert = vlbert_from_original if name == "vlbert" else albef_from_original
        expected = convert(state, config).state_dict()
        assert sorted(converted) == sorted(expected)
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
        back = tmp_path / f"{name}-original.pth"
        assert main(["convert", name, str(output), "--to-original", "-o", str(back)]) == 0
        restored = load_state_dict_file(back)
        assert sorted(restored) == sorted(k for k in state if not k.endswith("position_ids"))
        assert all(torch.equal(restored[k], state[k].float()) for k in restored)
    assert "known-unused weights skipped (2)" in capsys.readouterr().out


def test_albef_position_grid_resized_for_another_resolution(generator):
    state = original_albef_state(generator)
    model = albef_from_original(state, ALBEF_CONFIG, image_res=3 * PATCH, dtype=torch.float64)
    assert model.config.image_res == 3 * PATCH and model.visual_encoder.pos_embed.shape == (1, 10, VW)
    assert torch.equal(model.visual_encoder.pos_embed[:, 0], state["visual_encoder.pos_embed"][:, 0])
    images = _rand(generator, 2, 3, 3 * PATCH, 3 * PATCH, scale=1.0)
    assert model.image_features(images)[0].shape == (2, 10, VW)
