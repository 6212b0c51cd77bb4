"""ViLBERT / HF BERT converters: state dicts written in the original key layout (from the documented
layout, random weights) load strictly, and the converted model matches a forward computed directly
on the original keys; strict reports; round trips; safe loading; the CLI."""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from fastvl.cli import main as fastvl_main
from fastvl.convert import (
    ConversionError,
    load_state_dict_file,
    text_stream_from_hf_bert,
    vilbert_from_original,
    vilbert_to_original,
)
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks

CONFIG = {  # an original-style JSON config (tiny sizes, the original's keys)
    "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 24,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 32, "type_vocab_size": 2, "initializer_range": 0.02, "v_feature_size": 12,
    "v_target_size": 7, "v_hidden_size": 8, "v_num_hidden_layers": 2, "v_num_attention_heads": 2,
    "v_intermediate_size": 20, "bi_hidden_size": 12, "bi_num_attention_heads": 2, "bi_intermediate_size": 12,
    "bi_attention_type": 1, "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1, "v_initializer_range": 0.02, "v_biattention_id": [0, 1],
    "t_biattention_id": [1, 2], "pooling_method": "mul", "fusion_method": "mul", "with_coattention": True,
    "fixed_t_layer": 0, "fixed_v_layer": 0, "fast_mode": False, "in_batch_pairs": False, "dynamic_attention": False,
    "visual_target": 0,
}


def _linear(sd, name, out_dim, in_dim, g, bias=True):
    sd[f"{name}.weight"] = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64) / math.sqrt(in_dim)
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_dim, generator=g, dtype=torch.float64) * 0.1


def _norm(sd, name, dim, g, gamma_beta=False):
    w, b = ("gamma", "beta") if gamma_beta else ("weight", "bias")
    sd[f"{name}.{w}"] = 1 + 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)
    sd[f"{name}.{b}"] = 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)


def _bert_layer_keys(sd, prefix, hidden, inter, g):
    for p in ("query", "key", "value"):
        _linear(sd, f"{prefix}.attention.self.{p}", hidden, hidden, g)
    _linear(sd, f"{prefix}.attention.output.dense", hidden, hidden, g)
    _norm(sd, f"{prefix}.attention.output.LayerNorm", hidden, g)
    _linear(sd, f"{prefix}.intermediate.dense", inter, hidden, g)
    _linear(sd, f"{prefix}.output.dense", hidden, inter, g)
    _norm(sd, f"{prefix}.output.LayerNorm", hidden, g)


def original_state_dict(g, tasks=None, gamma_beta=False):
    """BertForMultiModalPreTraining (tasks=None) or VILBertForVLTasks ("multi-task" / "beta") keys."""
    c = CONFIG
    h, vh, bi, v = c["hidden_size"], c["v_hidden_size"], c["bi_hidden_size"], c["vocab_size"]
    sd = {}
    sd["bert.embeddings.word_embeddings.weight"] = torch.randn(v, h, generator=g, dtype=torch.float64)
    sd["bert.embeddings.position_embeddings.weight"] = torch.randn(32, h, generator=g, dtype=torch.float64)
    sd["bert.embeddings.token_type_embeddings.weight"] = torch.randn(2, h, generator=g, dtype=torch.float64)
    _norm(sd, "bert.embeddings.LayerNorm", h, g, gamma_beta)
    _linear(sd, "bert.v_embeddings.image_embeddings", vh, c["v_feature_size"], g)
    _linear(sd, "bert.v_embeddings.image_location_embeddings", vh, 5, g)
    _norm(sd, "bert.v_embeddings.LayerNorm", vh, g, gamma_beta)
    for i in range(c["num_hidden_layers"]):
        _bert_layer_keys(sd, f"bert.encoder.layer.{i}", h, c["intermediate_size"], g)
    for i in range(c["v_num_hidden_layers"]):
        _bert_layer_keys(sd, f"bert.encoder.v_layer.{i}", vh, c["v_intermediate_size"], g)
    for i in range(len(c["v_biattention_id"])):
        p = f"bert.encoder.c_layer.{i}"
        for name in ("query", "key", "value"):
            _linear(sd, f"{p}.biattention.{name}1", bi, vh, g)
            _linear(sd, f"{p}.biattention.{name}2", bi, h, g)
        _linear(sd, f"{p}.biOutput.dense1", vh, bi, g)
        _norm(sd, f"{p}.biOutput.LayerNorm1", vh, g)
        _linear(sd, f"{p}.biOutput.q_dense1", vh, bi, g)  # defined, never used by the original forward
        _linear(sd, f"{p}.biOutput.dense2", h, bi, g)
        _norm(sd, f"{p}.biOutput.LayerNorm2", h, g)
        _linear(sd, f"{p}.biOutput.q_dense2", h, bi, g)
        for s, dim, inter in (("v", vh, c["v_intermediate_size"]), ("t", h, c["intermediate_size"])):
            _linear(sd, f"{p}.{s}_intermediate.dense", inter, dim, g)
            _linear(sd, f"{p}.{s}_output.dense", dim, inter, g)
            _norm(sd, f"{p}.{s}_output.LayerNorm", dim, g)
    _linear(sd, "bert.t_pooler.dense", bi, h, g)
    _linear(sd, "bert.v_pooler.dense", bi, vh, g)
    _linear(sd, "cls.predictions.transform.dense", h, h, g)
    _norm(sd, "cls.predictions.transform.LayerNorm", h, g)
    sd["cls.predictions.bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    _linear(sd, "cls.bi_seq_relationship", 2, bi, g)
    _linear(sd, "cls.imagePredictions.transform.dense", vh, vh, g)
    _norm(sd, "cls.imagePredictions.transform.LayerNorm", vh, g)
    _linear(sd, "cls.imagePredictions.decoder", c["v_target_size"], vh, g)
    if tasks == "multi-task":
        for head, in_dim, out_dim in (("vil_prediction", bi, 3129), ("vil_prediction_gqa", bi, 1533),
                                      ("vil_binary_prediction", 2 * bi, 2)):
            _linear(sd, f"{head}.logit_fc.0", 2 * bi, in_dim, g)
            _norm(sd, f"{head}.logit_fc.2", 2 * bi, g)
            _linear(sd, f"{head}.logit_fc.3", out_dim, 2 * bi, g)
        _linear(sd, "vil_tri_prediction", 3, bi, g)
    if tasks == "beta":
        for index, (out_dim, in_dim) in ((0, (2 * bi, bi)), (3, (10, 2 * bi))):
            sd[f"vil_prediction.main.{index}.weight_v"] = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
            sd[f"vil_prediction.main.{index}.weight_g"] = torch.tensor(2.0 + index, dtype=torch.float64)
            sd[f"vil_prediction.main.{index}.bias"] = torch.randn(out_dim, generator=g, dtype=torch.float64) * 0.1
    if tasks is not None:
        _linear(sd, "vil_logit", 1, bi, g)
        _linear(sd, "vision_logit", 1, vh, g)
        _linear(sd, "linguisic_logit", 1, h, g)
    # float32-representable values: the converted (float32) model then holds exactly these weights
    return {k: v.float().double() if v.is_floating_point() else v for k, v in sd.items()}


# The original forward, computed directly on the original keys ------------------------------------


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-12)


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attend(q, k, v, mask, heads):
    b, lq, dim = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, dim // heads).permute(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads) + (1.0 - mask[:, None, None].double()) * -10000.0
    return (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, lq, dim)


def _layer(sd, p, x, mask, heads):
    ctx = _attend(_lin(sd, f"{p}.attention.self.query", x), _lin(sd, f"{p}.attention.self.key", x),
                  _lin(sd, f"{p}.attention.self.value", x), mask, heads)
    x = _ln(sd, f"{p}.attention.output.LayerNorm", _lin(sd, f"{p}.attention.output.dense", ctx) + x)
    return _ln(sd, f"{p}.output.LayerNorm", _lin(sd, f"{p}.output.dense", _gelu(_lin(sd, f"{p}.intermediate.dense", x))) + x)


def original_forward(sd, b):
    c = CONFIG
    tm, vm = b["text_mask"], b["region_mask"]
    length = b["input_ids"].shape[1]
    text = _ln(sd, "bert.embeddings.LayerNorm", sd["bert.embeddings.word_embeddings.weight"][b["input_ids"]]
               + sd["bert.embeddings.position_embeddings.weight"][:length]
               + sd["bert.embeddings.token_type_embeddings.weight"][b["token_type_ids"]])
    image = _ln(sd, "bert.v_embeddings.LayerNorm", _lin(sd, "bert.v_embeddings.image_embeddings", b["region_feats"])
                + _lin(sd, "bert.v_embeddings.image_location_embeddings", b["region_loc"]))
    t_start = v_start = 0
    for count, (v_end, t_end) in enumerate(zip(c["v_biattention_id"], c["t_biattention_id"])):
        for i in range(t_start, t_end):
            text = _layer(sd, f"bert.encoder.layer.{i}", text, tm, c["num_attention_heads"])
        for i in range(v_start, v_end):
            image = _layer(sd, f"bert.encoder.v_layer.{i}", image, vm, c["v_num_attention_heads"])
        p, heads = f"bert.encoder.c_layer.{count}", c["bi_num_attention_heads"]
        att = f"{p}.biattention"
        context1 = _attend(_lin(sd, f"{att}.query2", text), _lin(sd, f"{att}.key1", image),
                           _lin(sd, f"{att}.value1", image), vm, heads)
        context2 = _attend(_lin(sd, f"{att}.query1", image), _lin(sd, f"{att}.key2", text),
                           _lin(sd, f"{att}.value2", text), tm, heads)
        image_att = _ln(sd, f"{p}.biOutput.LayerNorm1", _lin(sd, f"{p}.biOutput.dense1", context2) + image)
        text_att = _ln(sd, f"{p}.biOutput.LayerNorm2", _lin(sd, f"{p}.biOutput.dense2", context1) + text)
        image = _ln(sd, f"{p}.v_output.LayerNorm", _lin(sd, f"{p}.v_output.dense",
                                                         _gelu(_lin(sd, f"{p}.v_intermediate.dense", image_att))) + image_att)
        text = _ln(sd, f"{p}.t_output.LayerNorm", _lin(sd, f"{p}.t_output.dense",
                                                        _gelu(_lin(sd, f"{p}.t_intermediate.dense", text_att))) + text_att)
        v_start, t_start = v_end, t_end
    for i in range(v_start, c["v_num_hidden_layers"]):
        image = _layer(sd, f"bert.encoder.v_layer.{i}", image, vm, c["v_num_attention_heads"])
    for i in range(t_start, c["num_hidden_layers"]):
        text = _layer(sd, f"bert.encoder.layer.{i}", text, tm, c["num_attention_heads"])
    pooled = torch.relu(_lin(sd, "bert.t_pooler.dense", text[:, 0])) * torch.relu(_lin(sd, "bert.v_pooler.dense", image[:, 0]))
    scores_t = _lin(sd, "cls.predictions.decoder",
                    _ln(sd, "cls.predictions.transform.LayerNorm", _gelu(_lin(sd, "cls.predictions.transform.dense", text))))
    scores_t = scores_t + sd["cls.predictions.bias"]
    scores_v = _lin(sd, "cls.imagePredictions.decoder", _ln(sd, "cls.imagePredictions.transform.LayerNorm",
                                                            _gelu(_lin(sd, "cls.imagePredictions.transform.dense", image))))
    return {"text": text, "image": image, "pooled": pooled, "scores_t": scores_t, "scores_v": scores_v,
            "align": _lin(sd, "cls.bi_seq_relationship", pooled)}


def _batch(g, batch=2, text_len=9, regions=7):
    return dict(input_ids=torch.randint(0, CONFIG["vocab_size"], (batch, text_len), generator=g),
                token_type_ids=torch.randint(0, 2, (batch, text_len), generator=g),
                text_mask=torch.arange(text_len)[None] < torch.tensor([text_len, 4])[:, None],
                region_feats=torch.randn(batch, regions, CONFIG["v_feature_size"], generator=g, dtype=torch.float64),
                region_loc=torch.rand(batch, regions, 5, generator=g, dtype=torch.float64),
                region_mask=torch.arange(regions)[None] < torch.tensor([regions, 3])[:, None])


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gamma_beta", [False, True])
def test_pretraining_layout_loads_and_matches_original_forward(generator, gamma_beta):
    sd = original_state_dict(generator, gamma_beta=gamma_beta)
    model, report = vilbert_from_original(sd, CONFIG, return_report=True)
    assert isinstance(model, ViLBERTForPretraining) and report.ok
    assert report.skipped_known_unused == sorted(k for k in sd if ".q_dense" in k)
    model = model.double()
    sd = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in sd.items()}
    batch = _batch(generator)
    out = model(**batch, return_scores=True)
    want = original_forward(sd, batch)
    _close(out.encoder["sequence_t"], want["text"])
    _close(out.encoder["sequence_v"], want["image"])
    _close(out.prediction_scores_t, want["scores_t"])
    _close(out.prediction_scores_v, want["scores_v"])
    _close(out.alignment_scores, want["align"])


@pytest.mark.parametrize("release", ["multi-task", "beta"])
def test_task_layouts_load_and_match(generator, release):
    sd = original_state_dict(generator, tasks=release)
    model = vilbert_from_original(sd, CONFIG).double()
    assert isinstance(model, ViLBERTForTasks) and model.release == release
    batch = _batch(generator)
    out = model(**batch)
    pooled = original_forward(sd, batch)["pooled"]
    if release == "beta":
        def wn(i):
            v = sd[f"vil_prediction.main.{i}.weight_v"]
            return sd[f"vil_prediction.main.{i}.weight_g"] * v / v.norm()
        hidden = torch.relu(F.linear(pooled, wn(0), sd["vil_prediction.main.0.bias"]))
        vqa = F.linear(hidden, wn(3), sd["vil_prediction.main.3.bias"])
        assert out.vqa.shape == (2, 10)
        torch.testing.assert_close(out.vqa, vqa, rtol=1e-6, atol=1e-7)  # the folded weight is rounded to float32
    else:
        hidden = _ln(sd, "vil_prediction.logit_fc.2", _gelu(_lin(sd, "vil_prediction.logit_fc.0", pooled)))
        vqa = _lin(sd, "vil_prediction.logit_fc.3", hidden)
        _close(out.snli_ve, _lin(sd, "vil_tri_prediction", pooled))
        _close(out.vqa, vqa)
    _close(out.option_score, _lin(sd, "vil_logit", pooled))


@pytest.mark.parametrize("kind", [None, "multi-task", "beta"])
def test_round_trip_is_lossless(generator, kind):
    sd = original_state_dict(generator, tasks=kind)
    sd = {k: v.float() for k, v in sd.items()}
    model = vilbert_from_original(sd, CONFIG)
    exported = vilbert_to_original(model)
    assert set(exported) == {k for k in sd if ".q_dense" not in k}
    again = vilbert_from_original(exported, CONFIG)
    for name, tensor in model.state_dict().items():
        if kind == "beta" and name.startswith("vil_prediction."):  # weight norm refactored: float rounding
            torch.testing.assert_close(again.state_dict()[name], tensor)
        else:
            assert torch.equal(again.state_dict()[name], tensor), name
    if kind != "beta":
        for key, value in exported.items():
            assert torch.equal(value, sd[key]), key


def test_strict_report_names_every_key(generator):
    sd = original_state_dict(generator)
    del sd["bert.encoder.layer.1.attention.self.key.bias"]
    sd["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(2)
    sd["bert.t_pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError) as error:
        vilbert_from_original(sd, CONFIG)
    message = str(error.value)
    for name in ("bert.encoder.layer.1.attention.self.key.bias", "bert.encoder.layer.7.output.dense.weight",
                 "bert.t_pooler.weight"):
        assert name in message
    model, report = vilbert_from_original(sd, CONFIG, strict=False, return_report=True)
    assert not report.ok and report.unused_in_checkpoint == ["bert.encoder.layer.7.output.dense.weight"]
    untied = original_state_dict(generator)
    untied["cls.predictions.decoder.weight"] = untied["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="ties"):
        vilbert_from_original(untied, CONFIG)


def _hf_bert_state(generator, prefix="bert."):
    c = CONFIG
    sd = {f"{prefix}embeddings.word_embeddings.weight": torch.randn(c["vocab_size"], 16, generator=generator),
          f"{prefix}embeddings.position_embeddings.weight": torch.randn(32, 16, generator=generator),
          f"{prefix}embeddings.token_type_embeddings.weight": torch.randn(2, 16, generator=generator),
          f"{prefix}embeddings.position_ids": torch.arange(32)[None]}
    _norm(sd, f"{prefix}embeddings.LayerNorm", 16, generator, gamma_beta=True)
    for i in range(c["num_hidden_layers"]):
        _bert_layer_keys(sd, f"{prefix}encoder.layer.{i}", 16, 24, generator)
    _linear(sd, f"{prefix}pooler.dense", 16, 16, generator)
    return {k: v.float() for k, v in sd.items()}


def test_hf_bert_initialises_the_text_stream(generator):
    model = ViLBERTForPretraining(ViLBERTConfig.from_original(CONFIG))
    visual_before = model.bert.v_layer[0].attention.qkv.weight.clone()
    hf = _hf_bert_state(generator)
    report = text_stream_from_hf_bert(model, hf)
    assert report.ok and "pooler.dense.weight" in report.skipped_known_unused
    q, k, v = (hf[f"bert.encoder.layer.2.attention.self.{p}.weight"] for p in ("query", "key", "value"))
    assert torch.equal(model.bert.layer[2].attention.qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(model.bert.embeddings.norm.weight, hf["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(model.bert.v_layer[0].attention.qkv.weight, visual_before)
    pretraining = dict(hf)  # BertForPreTraining: also the MLM head (decoder tied) and the NSP head
    _linear(pretraining, "cls.predictions.transform.dense", 16, 16, generator)
    _norm(pretraining, "cls.predictions.transform.LayerNorm", 16, generator)
    pretraining["cls.predictions.bias"] = torch.randn(CONFIG["vocab_size"], generator=generator)
    pretraining["cls.predictions.decoder.weight"] = hf["bert.embeddings.word_embeddings.weight"]
    _linear(pretraining, "cls.seq_relationship", 2, 16, generator)
    pretraining = {k: v.float() for k, v in pretraining.items()}
    assert text_stream_from_hf_bert(model, pretraining).ok
    assert torch.equal(model.cls.predictions.transform.norm.weight, pretraining["cls.predictions.transform.LayerNorm.weight"])
    assert torch.equal(model.cls.predictions.decoder.bias, pretraining["cls.predictions.bias"])
    plain = _hf_bert_state(generator, prefix="")  # BertModel layout, no bert. prefix
    assert text_stream_from_hf_bert(model, plain).ok
    plain["encoder.layer.3.output.dense.weight"] = torch.zeros(16, 24)  # a 4th layer: the stream has 3
    with pytest.raises(ConversionError, match="encoder.layer.3.output.dense.weight"):
        text_stream_from_hf_bert(model, plain)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_load_safely(generator, tmp_path):
    sd = {k: v.float() for k, v in original_state_dict(generator).items()}
    path = tmp_path / "model.bin"
    torch.save({"state_dict": sd}, path)
    assert load_state_dict_file(path).keys() == sd.keys()
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as handle:
        pickle.dump({"weights": _Payload()}, handle, protocol=2)
    with pytest.raises(ConversionError, match="allow_pickle"):
        load_state_dict_file(evil)
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "model.safetensors")
    loaded = load_state_dict_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_cli_converts_and_exports(generator, tmp_path, capsys):
    sd = {k: v.float().contiguous() for k, v in original_state_dict(generator, tasks="multi-task").items()}
    source, config = tmp_path / "vilbert.bin", tmp_path / "config.json"
    torch.save(sd, source)
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / "out" / "fastvl.safetensors"
    assert fastvl_main(["convert", "vilbert", str(source), "--config", str(config), "-o", str(out)]) == 0
    assert "known-unused weights skipped (8)" in capsys.readouterr().out
    back = tmp_path / "back.bin"
    assert fastvl_main(["convert", "vilbert", str(out), "--to-original", "-o", str(back)]) == 0
    exported = torch.load(back, weights_only=True)
    assert all(torch.equal(exported[k], sd[k]) for k in exported) and len(exported) == len(sd) - 8
    del sd["vil_logit.bias"]
    torch.save(sd, source)
    assert fastvl_main(["convert", "vilbert", str(source), "--config", str(config), "-o", str(out)]) == 1
    assert "vil_logit.bias" in capsys.readouterr().err
