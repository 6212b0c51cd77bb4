"""ALBEF: fused-vs-reference parity of the pretraining losses (outputs and every parameter gradient),
momentum / queue / temperature updates, MLM masking and its guard, retrieval re-ranking, the
classifiers, configs and bad input."""

import pytest
import torch
import torch.nn.functional as F
from model_parity import check_model_parity

from fastvl.models.albef import ALBEF, ALBEFClassifier, ALBEFConfig, mlm_distillation_loss

CONFIG = ALBEFConfig.named("tiny")


def randomise(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "temp":
                continue
            base = 1.0 if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=generator) * (0.1 if base else 0.3))
    return model.eval()


def batch(generator, size=4, length=9):
    images = torch.randn(size, 3, CONFIG.image_res, CONFIG.image_res, generator=generator)
    ids = torch.randint(3, CONFIG.vocab_size, (size, length), generator=generator)
    ids[:, 0] = CONFIG.cls_token_id
    ids[1, 6:] = CONFIG.pad_token_id
    ids[-1, 3:] = CONFIG.pad_token_id
    return images, ids


def _run(model, images, ids, negatives, masked, labels):
    out = model(images, ids, itm_negatives=negatives, mlm_inputs=(masked, labels), update=False)
    return {**out.losses, "itm_logits": out.itm_logits}


def _parity_inputs(model, generator):
    images, ids = batch(generator)
    masked, labels = model.mask_tokens(ids, generator, probability=0.4)
    labels[0, 1] = ids[0, 1]  # at least one prediction
    return [images, ids, (torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])), masked, labels]


def test_pretraining_parity_fused_vs_reference(generator):
    model = randomise(ALBEF(CONFIG), generator)
    results = check_model_parity(model, _run, _parity_inputs(model, generator), name="albef")
    names = " ".join(r.name for r in results)
    assert "grad temp" in names and "visual_encoder.blocks.0.attn.qkv.weight" in names
    assert "visual_encoder_m" not in names  # momentum copies take no gradient


@pytest.mark.interpret
@pytest.mark.slow
def test_pretraining_parity_triton_interpreter(generator):
    """Every op with a Triton kernel on that path (head dim 16: the kernels' smallest)."""
    config = ALBEFConfig.named("tiny", num_attention_heads=2, vision_heads=2, image_res=16)
    model = randomise(ALBEF(config), generator)
    images, ids = batch(generator, size=2, length=5)
    masked, labels = model.mask_tokens(ids, generator, probability=0.5)
    labels[0, 1] = ids[0, 1]
    negatives = (torch.tensor([1, 0]), torch.tensor([1, 0]))
    check_model_parity(model, _run, [images[..., :16, :16], ids, negatives, masked, labels], name="albef-triton",
                       fused={"layer_norm": "triton", "bias_gelu": "triton", "attention": "triton",
                              "itc_loss": "triton"})


def test_step_updates_momentum_queues_and_temperature(generator):
    model = randomise(ALBEF(CONFIG), generator)
    with torch.no_grad():
        model.temp.fill_(0.9)
    images, ids = batch(generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(images, ids, update=True, generator=generator)
    assert model.temp.item() == pytest.approx(0.5)  # clamped to [0.001, 0.5]
    m = CONFIG.momentum
    name = "visual_encoder.blocks.1.mlp.fc1.weight"
    torch.testing.assert_close(model.state_dict()[name.replace("encoder.", "encoder_m.", 1)],
                               m * before[name.replace("encoder.", "encoder_m.", 1)] + (1 - m) * before[name])
    assert model.queue_ptr.tolist() == [4]
    with torch.no_grad():  # the queue's first columns hold this step's momentum features
        _, image_feat_m = model.image_features(images, momentum=True)
        _, text_feat_m = model.text_features(ids, ids != 0, momentum=True)
    torch.testing.assert_close(model.image_queue[:, :4], image_feat_m.t())
    torch.testing.assert_close(model.text_queue[:, :4], text_feat_m.t())
    torch.testing.assert_close(model.image_queue[:, 4:], before["image_queue"][:, 4:])


def test_mlm_masking_follows_albef(generator):
    model = ALBEF(CONFIG)
    ids = torch.randint(3, CONFIG.vocab_size, (64, 25), generator=generator)
    ids[:, 0] = CONFIG.cls_token_id
    ids[:, 20:] = CONFIG.pad_token_id
    masked, labels = model.mask_tokens(ids, generator)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 20:].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert 0.10 < chosen[:, 1:20].float().mean() < 0.20
    replaced = (masked == CONFIG.mask_token_id) & chosen
    assert 0.7 < replaced.sum() / chosen.sum() < 0.9


def test_mlm_with_nothing_masked_is_zero_with_zero_gradient(generator):
    model = randomise(ALBEF(CONFIG), generator)
    images, ids = batch(generator)
    out = model(images, ids, itm_negatives=(torch.tensor([1, 0, 3, 2]), torch.tensor([1, 0, 3, 2])),
                mlm_inputs=(ids, torch.full_like(ids, -100)), update=False)
    assert out.losses["mlm"].item() == 0.0
    out.losses["mlm"].backward()
    for name, p in model.named_parameters():
        assert p.grad is None or not p.grad.any(), name


def test_mlm_distillation_loss_formula(generator):
    logits = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[1, 4] = 3, 7
    soft = torch.softmax(torch.randn(2, 5, 11, generator=generator, dtype=torch.float64), -1)
    chosen = labels != -100
    hard = F.cross_entropy(logits[chosen], labels[chosen])
    distil = -(soft[chosen] * F.log_softmax(logits[chosen], -1)).sum(-1).mean()
    torch.testing.assert_close(mlm_distillation_loss(logits, labels, soft, 0.4), 0.6 * hard + 0.4 * distil)


def test_retrieval_reranks_top_k_by_itm(generator):
    model = randomise(ALBEF(CONFIG), generator)
    images, ids = batch(generator, size=3)
    texts = torch.cat((ids, ids[:2].flip(1)))  # 5 texts
    texts[3:, 0] = CONFIG.cls_token_id
    i2t, t2i = model.retrieval_scores(images, texts, k=2, chunk=3)
    assert i2t.shape == (3, 5) and t2i.shape == (5, 3)
    assert ((i2t != -100).sum(1) == 2).all() and ((t2i != -100).sum(1) == 2).all()
    with torch.no_grad():
        image_tokens, image_feat = model.image_features(images)
        _, text_feat = model.text_features(texts, texts != 0)
        top = (image_feat @ text_feat.t())[1].topk(2).indices
        for t in top.tolist():
            fused = model.text_encoder(texts[t:t + 1], texts[t:t + 1] != 0, image_tokens[1:2])
            torch.testing.assert_close(i2t[1, t], model.itm_head(fused[:, 0])[0, 1])


def test_classifiers_snli_ve_and_nlvr2(generator):
    images, ids = batch(generator, size=2)
    ve = randomise(ALBEFClassifier(CONFIG, num_classes=3), generator)
    out = ve(images, ids, labels=torch.tensor([0, 2]))
    assert out["logits"].shape == (2, 3)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], torch.tensor([0, 2])))
    nlvr = randomise(ALBEFClassifier(CONFIG, num_classes=2, num_images=2), generator)
    assert len(nlvr.text_encoder.fusion_layers) == 2 * (CONFIG.num_hidden_layers - CONFIG.fusion_layer)
    other = torch.randn(images.shape, generator=generator)
    swapped = nlvr((other, images), ids)["logits"]
    assert not torch.allclose(nlvr((images, other), ids)["logits"], swapped)  # the two images play different roles
    check_model_parity(nlvr, lambda m, a, b, t: m((a, b), t)["logits"], [images, other, ids], name="nlvr2")


def test_configs():
    pretrain = {"image_res": 256, "embed_dim": 256, "batch_size_train": 64, "temp": 0.07, "mlm_probability": 0.15,
                "queue_size": 65536, "momentum": 0.995, "alpha": 0.4, "vision_width": 768,
                "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
                "bert_config": {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
                                "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
                                "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
                                "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
                                "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
                                "vocab_size": 30522, "fusion_layer": 6, "encoder_width": 768}}
    assert ALBEFConfig.from_original(pretrain) == ALBEFConfig.named("base")
    with pytest.raises(ValueError, match="unknown ALBEF config keys"):
        ALBEFConfig.from_original({**pretrain, "queue_sise": 3})


@pytest.mark.parametrize("change,message", [
    (lambda im, ids: (im[..., :16, :16], ids), r"images must have shape \[B, 3, 32, 32\]"),
    (lambda im, ids: (im, ids[:3]), "batch size"),
    (lambda im, ids: (im[:1], ids[:1]), "at least 2"),
    (lambda im, ids: (im, torch.ones(4, 40, dtype=torch.long)), "max_position_embeddings"),
])
def test_bad_input(generator, change, message):
    model = ALBEF(CONFIG)
    images, ids = change(*batch(generator))
    with pytest.raises(ValueError, match=message):
        model(images, ids, update=False)


def test_integer_attention_mask_as_albef_passes_it(generator):
    model = randomise(ALBEF(CONFIG), generator)
    images, ids = batch(generator)
    args = dict(itm_negatives=(torch.tensor([1, 0, 3, 2]), torch.tensor([1, 0, 3, 2])), mlm=False, update=False)
    as_bool = model(images, ids, ids != 0, **args)
    as_long = model(images, ids, (ids != 0).long(), **args)
    torch.testing.assert_close(as_long.loss, as_bool.loss)
    with pytest.raises(TypeError, match="attention_mask"):
        model(images, ids, (ids != 0).float(), **args)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)])
def test_autocast_losses_and_gradients(generator, device, dtype):
    """Under autocast the losses stay near the float32 ones and every gradient is finite."""
    model = randomise(ALBEF(CONFIG), generator)
    args = _parity_inputs(model, generator)
    expected = _run(model, *args)
    model = model.to(device)
    moved = [a.to(device) if isinstance(a, torch.Tensor) else tuple(t.to(device) for t in a) for a in args]
    with torch.autocast(device, dtype):
        out = _run(model, *moved)
    sum(out[k].float() for k in ("itc", "itm", "mlm")).backward()
    for key in ("itc", "itm", "mlm"):
        torch.testing.assert_close(out[key].float().cpu(), expected[key], rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_itc_and_itm_losses_follow_albef(generator):
    """The wiring: ITC against momentum features + queues with distillation targets, ITM over the B
    positive pairs then (text, hard negative image) and (hard negative text, image), written out."""
    model = randomise(ALBEF(CONFIG), generator).double()
    images, ids = batch(generator)
    images = images.double()
    neg_text, neg_image = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])
    out = model(images, ids, itm_negatives=(neg_text, neg_image), mlm=False, update=False, alpha=0.3)
    mask = ids != 0
    with torch.no_grad():
        image_tokens, image_feat = model.image_features(images)
        text_states, text_feat = model.text_features(ids, mask)
        _, image_m = model.image_features(images, momentum=True)
        _, text_m = model.text_features(ids, mask, momentum=True)
        all_text = torch.cat((text_m.t(), model.text_queue), 1)
        all_image = torch.cat((image_m.t(), model.image_queue), 1)
        one_hot = torch.eye(4, all_text.shape[1], dtype=torch.float64)

        def soft_ce(sim, sim_m):
            targets = 0.3 * torch.softmax(sim_m, 1) + 0.7 * one_hot
            return -(F.log_softmax(sim, 1) * targets).sum(1).mean()

        temp = model.temp
        itc = (soft_ce(image_feat @ all_text / temp, image_m @ all_text / temp)
               + soft_ce(text_feat @ all_image / temp, text_m @ all_image / temp)) / 2
        pairs = [(b, b, 1) for b in range(4)] + [(b, int(neg_image[b]), 0) for b in range(4)] + \
                [(int(neg_text[b]), b, 0) for b in range(4)]
        logits = torch.stack([model.itm_head(model.text_encoder.fuse(text_states[t:t + 1], mask[t:t + 1],
                                                                     image_tokens[i:i + 1])[0, 0])
                              for t, i, _ in pairs])
        itm = F.cross_entropy(logits, torch.tensor([label for _, _, label in pairs]))
    torch.testing.assert_close(out.losses["itc"], itc)
    torch.testing.assert_close(out.itm_logits, logits)
    torch.testing.assert_close(out.losses["itm"], itm)
    assert "mlm" not in out.losses


def test_mlm_on_predicted_rows_equals_all_rows(generator, monkeypatch):
    """Eager runs project only the predicted rows; under torch.compile every row is projected."""
    model = randomise(ALBEF(CONFIG), generator)
    args = _parity_inputs(model, generator)
    rows_only = _run(model, *args)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    every_row = _run(model, *args)
    for key in rows_only:
        torch.testing.assert_close(every_row[key], rows_only[key])


@pytest.mark.slow
def test_traces_without_graph_breaks(generator):
    """``torch.compile(fullgraph=True)`` accepts the whole pretraining step (dynamo only: eager backend)."""
    model = randomise(ALBEF(CONFIG), generator)
    args = _parity_inputs(model, generator)
    compiled = torch.compile(lambda *a: _run(model, *a), backend="eager", fullgraph=True)
    out, expected = compiled(*args), _run(model, *args)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key])


def test_attention_maps_on_request(generator):
    model = randomise(ALBEF(CONFIG), generator)
    images, ids = batch(generator)
    mask = ids != 0
    tokens = model.visual_encoder(images)
    text, text_probs = model.text_encoder.encode_text(ids, mask, output_attentions=True)
    fused, fusion_probs = model.text_encoder.fuse(text, mask, tokens, output_attentions=True)
    torch.testing.assert_close(fused, model.text_encoder(ids, mask, tokens))
    assert len(text_probs) == CONFIG.fusion_layer and text_probs[0].shape == (4, 4, 9, 9)
    cross = fusion_probs[-1][1]
    assert cross.shape == (4, 4, 9, tokens.shape[1])
    torch.testing.assert_close(cross.sum(-1), torch.ones(4, 4, 9))
    assert not text_probs[0][3, :, :, 3:].any()  # padded keys get no weight


def test_loads_a_deepspeed_consolidated_state_dict_with_temp_as_a_vector():
    source = ALBEF(CONFIG)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["temp"] = torch.tensor([0.05])  # zero_to_fp32's shape for the trainer's [1] temperature
    model = ALBEF(CONFIG)
    model.load_state_dict(state)
    assert model.temp.shape == () and model.temp.item() == pytest.approx(0.05)


def test_zero_one_masks_in_every_text_entry_point(generator):
    model = randomise(ALBEF(CONFIG), generator).eval()
    _, ids = batch(generator)
    mask = ids != 0
    for call in (lambda m: model.text_features(ids, m)[1], lambda m: model.text_encoder.encode_text(ids, m)):
        torch.testing.assert_close(call(mask.long()), call(mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match="attention_mask must be bool or hold 0 / 1"):
            call(mask.long() - 1)
