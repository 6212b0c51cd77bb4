"""ViLBERT: wiring against an independent forward, execution order, fused vs reference parity of every
output and parameter gradient, the losses' defined values, task heads, bad inputs, torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from model_parity import check_model_parity
from test_nn_layers import _bert_layer, _connection_layer, _ln

from fastvl import use_backend
from fastvl.models.vilbert import (
    ViLBERTConfig,
    ViLBERTForPretraining,
    ViLBERTForTasks,
    multiple_choice_loss,
    region_loss,
    vqa_loss,
)

SMALL = dict(vocab_size=50, v_feature_size=20, v_target_size=11, max_regions=40)
TRITON_LAYERS = pytest.param({"layer_norm": "triton", "bias_gelu": "triton"}, marks=pytest.mark.interpret,
                              id="triton-interpreter")


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _batch(generator, batch=2, text_len=23, regions=37, config=None):
    config = config or ViLBERTConfig.named("tiny", **SMALL)
    text_mask = torch.arange(text_len)[None] < torch.tensor([text_len, 11, 5, 17][:batch])[:, None]
    region_mask = torch.arange(regions)[None] < torch.tensor([regions, 9, 20, 3][:batch])[:, None]
    boxes = torch.rand(batch, regions, 4, generator=generator).sort(-1).values
    loc = torch.stack([boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3],
                       (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])], -1)
    loc[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    mlm = torch.full((batch, text_len), -1)
    mlm[:, 1:4] = torch.randint(0, config.vocab_size, (batch, 3), generator=generator)
    region_labels = torch.rand(batch, regions, generator=generator) < 0.3
    region_labels[:, 0] = False
    region_labels &= region_mask
    return dict(
        input_ids=torch.randint(0, config.vocab_size, (batch, text_len), generator=generator),
        token_type_ids=torch.randint(0, 2, (batch, text_len), generator=generator), text_mask=text_mask,
        region_feats=torch.randn(batch, regions, config.v_feature_size, generator=generator), region_loc=loc,
        region_mask=region_mask, mlm_labels=mlm,
        region_targets=torch.softmax(torch.randn(batch, regions, config.v_target_size, generator=generator) * 2, -1),
        region_labels=region_labels, is_next=torch.randint(0, 2, (batch,), generator=generator))


def _independent_forward(model, b):
    """The original BertModel + BertPreTrainingHeads, written out for the tiny (2-layer) wiring:
    text 0-1, co 0 (raw region embeddings), text 2, visual 0, co 1, visual 1, text 3."""
    bert = model.bert
    emb = bert.embeddings
    positions = torch.arange(b["input_ids"].shape[1])
    text = _ln(emb.word_embeddings(b["input_ids"]) + emb.position_embeddings(positions)
               + emb.token_type_embeddings(b["token_type_ids"]), emb.norm)
    vemb = bert.v_embeddings
    image = _ln(F.linear(b["region_feats"], vemb.image_embeddings.weight, vemb.image_embeddings.bias)
                + F.linear(b["region_loc"], vemb.image_location_embeddings.weight, vemb.image_location_embeddings.bias),
                vemb.norm)
    tm, vm = b["text_mask"], b["region_mask"]
    text = _bert_layer(bert.layer[1], _bert_layer(bert.layer[0], text, tm), tm)
    image, text = _connection_layer(bert.c_layer[0], image, vm, text, tm)
    text = _bert_layer(bert.layer[2], text, tm)
    image = _bert_layer(bert.v_layer[0], image, vm)
    image, text = _connection_layer(bert.c_layer[1], image, vm, text, tm)
    image = _bert_layer(bert.v_layer[1], image, vm)
    text = _bert_layer(bert.layer[3], text, tm)
    pooled = torch.relu(bert.t_pooler(text[:, 0])) * torch.relu(bert.v_pooler(image[:, 0]))

    def transform(t, head):
        h = F.linear(t, head.dense.weight, head.dense.bias)
        return _ln(h * 0.5 * (1 + torch.erf(h / math.sqrt(2))), head.norm)

    heads = model.cls
    scores_t = transform(text, heads.predictions.transform) @ emb.word_embeddings.weight.T + heads.predictions.decoder.bias
    region_decoder = heads.image_predictions.decoder
    scores_v = F.linear(transform(image, heads.image_predictions.transform), region_decoder.weight, region_decoder.bias)
    mlm = F.cross_entropy(scores_t.flatten(0, 1), b["mlm_labels"].flatten(), ignore_index=-1)
    kl = F.kl_div(F.log_softmax(scores_v[:, 1:], 2), b["region_targets"][:, 1:], reduction="none")
    region = (kl * b["region_labels"][:, 1:, None]).sum() / b["region_labels"][:, 1:].sum()
    align = F.cross_entropy(heads.bi_seq_relationship(pooled), b["is_next"])
    return scores_t, scores_v, mlm, region, align


def test_matches_independent_forward(generator):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL))).double()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in _batch(generator).items()}
    out = model(**batch, return_scores=True)
    scores_t, scores_v, mlm, region, align = _independent_forward(model, batch)
    for got, want in ((out.prediction_scores_t, scores_t), (out.prediction_scores_v, scores_v),
                      (out.losses["mlm"], mlm), (out.losses["region"], region), (out.losses["align"], align),
                      (out.loss, mlm + region + align)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,expected", [
    ("base", "t0 t1 t2 t3 t4 t5 c0 t6 v0 c1 t7 v1 c2 t8 v2 c3 t9 v3 c4 t10 v4 c5 v5 t11"),
    ("2-layer", "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 c0 t10 v0 c1 v1 t11"),
])
def test_execution_order(generator, name, expected):
    config = ViLBERTConfig.named(name, hidden_size=16, num_attention_heads=2, intermediate_size=16, v_hidden_size=16,
                                 v_num_attention_heads=2, v_intermediate_size=16, bi_hidden_size=16,
                                 bi_num_attention_heads=2, **SMALL)
    model = ViLBERTForPretraining(config).eval()
    calls = []
    for prefix, layers in (("t", model.bert.layer), ("v", model.bert.v_layer), ("c", model.bert.c_layer)):
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, tag=f"{prefix}{index}": calls.append(tag))
    b = _batch(generator, batch=1, text_len=5, regions=4, config=config)
    model(b["input_ids"], b["token_type_ids"], b["text_mask"], b["region_feats"], b["region_loc"], b["region_mask"])
    assert " ".join(calls) == expected


@pytest.mark.parametrize("fused", [None, TRITON_LAYERS])
def test_fused_vs_reference_parity(generator, fused):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    # the interpreter runs every Triton program in Python: smaller (still odd, padded) shapes there
    batch = _batch(generator, text_len=9, regions=7) if fused else _batch(generator)

    def run(m, *values):
        out = m(**dict(zip(batch, values)), return_scores=True)
        return [out.loss, out.losses["mlm"], out.losses["region"], out.losses["align"], out.prediction_scores_t,
                out.prediction_scores_v, out.encoder["pooled_t"], out.encoder["pooled_v"]]

    check_model_parity(model, run, list(batch.values()), name="vilbert", fused=fused)


def test_reference_backend_option_matches_scope(generator):
    config = ViLBERTConfig.named("tiny", **SMALL)
    model = _perturb(ViLBERTForPretraining(config, backend="reference"))
    batch = _batch(generator)
    from fastvl import use_backend

    plain = _perturb(ViLBERTForPretraining(config))
    plain.load_state_dict(model.state_dict())
    with use_backend("reference"):
        want = plain(**batch).loss
    assert torch.equal(model(**batch).loss, want)


def test_nothing_masked_gives_zero_losses_and_zero_gradient(generator):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    batch = _batch(generator)
    batch["mlm_labels"].fill_(-1)
    batch["region_labels"].zero_()
    out = model(**batch)
    assert out.losses["mlm"].item() == 0.0 and out.losses["region"].item() == 0.0
    (out.losses["mlm"] + out.losses["region"]).backward()
    assert not model.cls.image_predictions.decoder.weight.grad.any()
    assert not model.cls.predictions.decoder.bias.grad.any()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    assert torch.isfinite(out.loss)


def test_img_token_is_never_scored(generator):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    batch = _batch(generator)
    batch["region_labels"].zero_()
    batch["region_labels"][:, 0] = True  # only the IMG slot "masked": excluded, so nothing is scored
    assert model(**batch).losses["region"].item() == 0.0


def test_fixed_layers_get_no_gradient(generator):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", fixed_t_layer=2, **SMALL))).train()
    model(**_batch(generator)).loss.backward()
    assert all(p.grad is None for p in model.bert.layer[:2].parameters())
    assert all(p.grad is not None for p in model.bert.layer[2].parameters())


def test_task_token_and_sum_fusion(generator):
    config = ViLBERTConfig.named("tiny", task_specific_tokens=True, fusion_method="sum", **SMALL)
    model = _perturb(ViLBERTForPretraining(config))
    batch = _batch(generator)
    out = model(**batch, task_ids=torch.tensor([[3], [7]]), return_scores=True)
    assert out.prediction_scores_t.shape == (2, 24, config.vocab_size)  # [CLS] task tokens...
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch)


def test_task_heads_and_losses(generator):
    config = ViLBERTConfig.named("tiny", **SMALL)
    batch = _batch(generator, batch=4)
    inputs = [batch[k] for k in ("input_ids", "token_type_ids", "text_mask", "region_feats", "region_loc",
                                 "region_mask")]
    model = _perturb(ViLBERTForTasks(config))
    out = model(*inputs)
    assert out.vqa.shape == (4, 3129) and out.gqa.shape == (4, 1533) and out.snli_ve.shape == (4, 3)
    assert out.nlvr2.shape == (2, 2) and out.option_score.shape == (4, 1) and out.alignment_scores.shape == (4, 2)
    assert out.region_score.shape == (4, 37) and (out.region_score[~batch["region_mask"]] < -5000).all()
    soft = torch.rand(4, 3129, generator=generator)
    expected = F.binary_cross_entropy_with_logits(out.vqa, soft, reduction="sum") / 4
    torch.testing.assert_close(vqa_loss(out.vqa, soft), expected)
    mc = multiple_choice_loss(out.option_score, torch.tensor([3]), 4)
    torch.testing.assert_close(mc, -torch.log_softmax(out.option_score.view(1, 4), -1)[0, 3])
    iou = torch.rand(4, 37, generator=generator)
    loss = region_loss(out.region_score, iou, batch["region_mask"])
    assert torch.isfinite(loss)
    beta = ViLBERTForTasks(config, release="beta")
    assert not hasattr(beta, "vil_tri_prediction") and beta(*inputs).vqa.shape == (4, 3129)


def test_bad_inputs(generator):
    config = ViLBERTConfig.named("tiny", **SMALL)
    model = ViLBERTForPretraining(config)
    batch = _batch(generator)
    cases = [
        ("region_feats", torch.randn(2, 37, 21), r"region_feats must have shape \[B, Lv, 20\]"),
        ("region_loc", batch["region_loc"] * 1.5 + 0.01, r"region_loc.*\[0, 1\]"),
        ("region_loc", batch["region_loc"] - 0.5, r"region_loc.*outside"),
        ("region_feats", torch.randn(3, 37, 20), "batch size"),
        ("region_feats", torch.randn(2, 41, 20), "max_regions"),
        ("input_ids", torch.zeros(2, 65, dtype=torch.long), "max_position_embeddings"),
        ("region_targets", torch.rand(2, 37, 12), "region_targets"),
        ("mlm_labels", torch.zeros(2, 22, dtype=torch.long), "mlm_labels"),
    ]
    for key, value, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**batch, key: value})
    with pytest.raises(ValueError, match="fusion_method"):
        ViLBERTConfig.named("tiny", fusion_method="concat")
    with pytest.raises(ValueError, match="same length"):
        ViLBERTConfig(v_biattention_id=[0, 1], t_biattention_id=[11])
    with pytest.raises(ValueError, match="unknown ViLBERT config"):
        ViLBERTConfig.named("huge")


def test_original_json_keys_are_accepted():
    original = {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
                "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12,
                "type_vocab_size": 2, "vocab_size": 30522, "v_feature_size": 2048, "v_target_size": 1601,
                "v_hidden_size": 1024, "v_num_hidden_layers": 6, "v_num_attention_heads": 8,
                "v_intermediate_size": 1024, "bi_hidden_size": 1024, "bi_num_attention_heads": 8,
                "bi_intermediate_size": 1024, "bi_attention_type": 1, "v_attention_probs_dropout_prob": 0.1,
                "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1, "v_initializer_range": 0.02,
                "v_biattention_id": [0, 1, 2, 3, 4, 5], "t_biattention_id": [6, 7, 8, 9, 10, 11],
                "pooling_method": "mul", "fast_mode": False, "fixed_v_layer": 0, "fixed_t_layer": 0,
                "in_batch_pairs": False, "fusion_method": "mul", "intra_gate": False, "with_coattention": True,
                "dynamic_attention": False, "visual_target": 0, "objective": 0}
    assert ViLBERTConfig.from_original(original) == ViLBERTConfig.named("base")
    with pytest.raises(ValueError, match=r"unknown ViLBERT config keys \['num_labels'\]"):
        ViLBERTConfig.from_original({**original, "num_labels": 3})
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        assert ViLBERTConfig.from_original({**original, "num_labels": 3}, strict=False) == ViLBERTConfig.named("base")


@pytest.mark.slow
def test_compile_fullgraph(generator):
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL), validate_values=False))
    batch = _batch(generator)
    compiled = torch.compile(lambda **b: model(**b).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**batch), model(**batch).loss)


def test_autocast_bf16_checkpointing_and_attentions(generator):
    from fastvl.nn import set_gradient_checkpointing

    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    batch = _batch(generator)
    exact = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch)
    assert abs(low.loss.item() - exact.item()) < 0.05 * abs(exact.item())
    low.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    def grads():
        model.zero_grad()
        torch.manual_seed(3)  # dropout on: checkpointing must replay it
        model(**batch).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    plain = grads()
    set_gradient_checkpointing(model)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
    model.eval()
    encoded = model.bert(*(batch[k] for k in ("input_ids", "token_type_ids", "text_mask", "region_feats",
                                              "region_loc", "region_mask")), output_attentions=True)
    probs = encoded["attentions"]
    assert len(probs["t"]) == 4 and len(probs["v"]) == 2 and len(probs["c"]) == 2
    assert probs["c"][0][0].shape == (2, 2, 37, 23) and probs["t"][0].shape == (2, 4, 23, 23)


def _zero3_worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL), validate_values=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.eval()
    batch = torch.load(os.path.join(out_dir, "batch.pt"), weights_only=True)
    loss = engine(**batch).loss
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "state": state}, os.path.join(out_dir, "zero3.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_partitioned_model_matches_plain_run(generator, tmp_path):
    """Under ZeRO-3 every weight is partitioned; the fused losses read the tied decoder and region
    classifier inside their modules' forward, so loss and gradients equal the plain run."""
    import socket

    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    torch.save(_batch(generator), tmp_path / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_zero3_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    result = torch.load(tmp_path / "zero3.pt", weights_only=True)
    model = ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)).eval()
    model.load_state_dict(result["state"])
    loss = model(**torch.load(tmp_path / "batch.pt", weights_only=True)).loss
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach())
    for name, param in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], param.grad, msg=name, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_vs_reference_parity(dtype):
    """On CUDA every op takes its fused backend (Triton); the eager reference runs in the same dtype
    on the same device, the exact run in float64 on the CPU; losses and every gradient obey the rule."""
    import copy

    from fastvl import use_backend
    from fastvl.testing import assert_parity

    generator = torch.Generator().manual_seed(5)
    base = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    batch = _batch(generator)
    fused, eager, exact = (copy.deepcopy(base).to("cuda", dtype), copy.deepcopy(base).to("cuda", dtype),
                           copy.deepcopy(base).double())

    def run(model, device, run_dtype):
        inputs = {k: (v.to(device, run_dtype) if v.is_floating_point() and k != "region_targets" else v.to(device))
                  for k, v in batch.items()}
        out = model(**inputs)
        out.loss.backward()
        return [out.loss, *out.losses.values()]

    fused_out = run(fused, "cuda", dtype)
    with use_backend("reference"):
        eager_out = run(eager, "cuda", dtype)
        exact_out = run(exact, "cpu", torch.float64)
    for name, f, e, x in zip(("loss", "mlm", "region", "align"), fused_out, eager_out, exact_out):
        assert_parity(f"vilbert {dtype} {name}", f.cpu(), e.cpu(), x)  # the floor follows f's dtype
    for (name, f), (_, e), (_, x) in zip(fused.named_parameters(), eager.named_parameters(), exact.named_parameters()):
        assert_parity(f"vilbert {dtype} grad {name}", f.grad.cpu(), e.grad.cpu(), x.grad)


def test_zero_one_masks_and_the_original_keyword_names(generator):
    """The original scripts' call (0 / 1 integer masks, image_label 1 / -1, its keyword names) gives the
    outputs of fastvl's own form; other integers are refused naming the argument."""
    config = ViLBERTConfig.named("tiny", **SMALL)
    model = _perturb(ViLBERTForPretraining(config))
    tasks = _perturb(ViLBERTForTasks(config, num_labels=5)).eval()
    b = _batch(generator)
    ours = model(**b)
    image_label = torch.where(b["region_labels"], 1, -1)
    original = model(b["input_ids"], image_feat=b["region_feats"], image_loc=b["region_loc"],
                     token_type_ids=b["token_type_ids"], attention_mask=b["text_mask"].long(),
                     image_attention_mask=b["region_mask"].long(), masked_lm_labels=b["mlm_labels"],
                     image_label=image_label, image_target=b["region_targets"], next_sentence_label=b["is_next"])
    for name in ("mlm", "region", "align"):
        torch.testing.assert_close(original.losses[name], ours.losses[name], rtol=0, atol=0)
    inputs = {k: b[k] for k in ("input_ids", "token_type_ids", "region_feats", "region_loc")}
    expected = tasks(**inputs, text_mask=b["text_mask"], region_mask=b["region_mask"]).vqa
    got = tasks(**inputs, text_mask=b["text_mask"].int(), region_mask=b["region_mask"].to(torch.uint8)).vqa
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_mask must be bool or hold 0 / 1"):
        tasks(**inputs, text_mask=b["text_mask"].long() * 2, region_mask=b["region_mask"])
    with pytest.raises(ValueError, match="region_labels must hold 1"):
        model(**{**b, "region_labels": image_label * 2})
    with pytest.raises(TypeError, match="attention_mask .* text_mask are the same input"):
        model(**b, attention_mask=b["text_mask"].long())
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_mask'"):
        model(**b, image_mask=b["region_mask"])


def _packed(b):
    """The padded batch ``b`` as fastvl.data packs it: real rows only, cu_seqlens per stream."""
    tm, vm = b["text_mask"], b["region_mask"]
    lengths_t, lengths_v = tm.sum(1), vm.sum(1)
    cu = lambda n: torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)])  # noqa: E731
    packed = {k: b[k][tm] for k in ("input_ids", "token_type_ids", "mlm_labels")}
    packed.update({k: b[k][vm] for k in ("region_feats", "region_loc", "region_targets", "region_labels")})
    return {**packed, "is_next": b["is_next"], "cu_seqlens_text": cu(lengths_t), "cu_seqlens_regions": cu(lengths_v),
            "max_seqlen_text": int(lengths_t.max()), "max_seqlen_regions": int(lengths_v.max())}


@pytest.mark.parametrize("fused", [None, TRITON_LAYERS])
def test_packed_batches_run_end_to_end_with_the_padded_losses(generator, fused, monkeypatch):
    """Packed rows through embeddings, every layer and co-attention, and the heads: the padded form's
    losses and parameter gradients, with every co-attention call on cu_seqlens (no padding)."""
    import fastvl.nn.layers as layers

    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL)))
    b = _batch(generator, batch=3, text_len=13, regions=21)
    with use_backend(**(fused or {})):
        padded = model(**b)
        torch.autograd.backward(list(padded.losses.values()))
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        calls = []
        co_attention = layers.co_attention

        def spy(*args, **kwargs):
            calls.append(kwargs.get("cu_seqlens_v") is not None and args[3] is None)
            return co_attention(*args, **kwargs)

        monkeypatch.setattr(layers, "co_attention", spy)
        packed = model(**_packed(b))
        torch.autograd.backward(list(packed.losses.values()))
    assert len(calls) == model.config.num_co_attention_layers and all(calls)
    assert packed.encoder["sequence_t"].shape == (int(b["text_mask"].sum()), model.config.hidden_size)
    for name in ("mlm", "region", "align"):
        torch.testing.assert_close(packed.losses[name], padded.losses[name], rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="needs cu_seqlens_text, cu_seqlens_regions"):
        model(**{k: v for k, v in _packed(b).items() if k != "max_seqlen_regions"})


def test_every_dropout_comes_from_the_config(generator):
    """With the config's dropout probabilities at 0, training mode computes what eval mode does (the
    alignment head's dropout was a hard-coded 0.1)."""
    zero = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, v_hidden_dropout_prob=0.0,
                v_attention_probs_dropout_prob=0.0)
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL, **zero)))
    b = _batch(generator)
    expected = model.eval()(**b).alignment_scores
    torch.manual_seed(0)
    torch.testing.assert_close(model.train()(**b).alignment_scores, expected)
