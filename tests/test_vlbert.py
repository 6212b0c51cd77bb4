"""VL-BERT: packing, fused-vs-reference parity (outputs and every parameter gradient), heads, guards,
configs and bad input."""

import pytest
import torch
import torch.nn.functional as F
from model_parity import check_model_parity

from fastvl.models.vlbert import VLBERTConfig, VLBERTForPretraining, VLBERTForRefCOCO, VLBERTForVCR, VLBERTForVQA

CONFIG = VLBERTConfig.named("tiny")


def randomise(model, generator):
    """Random values everywhere (BERT's init leaves biases 0 and the visual scales 0: dead paths)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if "norm" in name or "ln" in name else 0.3)
                    + (1.0 if name.endswith(("norm.weight", "ln_text.weight", "ln_object.weight")) else 0.0))
    return model.eval()


def inputs(generator, batch=3, text=23, regions=37):
    ids = torch.randint(1, CONFIG.vocab_size, (batch, text), generator=generator)
    ids[-1, 4:] = 0
    ids[0, text - 2:] = 0
    features = torch.randn(batch, regions, CONFIG.visual_feature_dim, generator=generator)
    corner = torch.rand(batch, regions, 2, generator=generator) * 0.5
    boxes = torch.cat((corner, corner + torch.rand(batch, regions, 2, generator=generator) * 0.5), -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[0, regions - 3:] = False
    region_mask[-1, 2:] = False
    boxes[~region_mask] = -1.0
    features[~region_mask] = float("nan")  # padded regions must never be read
    return ids, features, boxes, region_mask


def test_packing_positions_segments_and_end(generator):
    model = VLBERTForPretraining(CONFIG).eval()
    ids, features, boxes, region_mask = inputs(generator, batch=2, text=6, regions=4)
    ids[0, 4:] = 0
    ids[1] = 1
    region_mask[0] = torch.tensor([True, True, False, True])  # a hole: objects are compacted
    region_mask[1] = True
    boxes = boxes.clamp(min=0)
    out = model.vlbert(ids, features.nan_to_num(), boxes, region_mask=region_mask,
                       token_type_ids=torch.ones_like(ids), output_attentions=True)
    assert out.sequence.shape == (2, 6 + 4 + 1, CONFIG.hidden_size)
    assert out.attention_mask.sum(1).tolist() == [4 + 3 + 1, 6 + 4 + 1]
    assert out.attention_mask[0, 8:].logical_not().all()  # padding only at the tail
    assert not torch.isnan(out.sequence[out.attention_mask]).any()
    assert len(out.attentions) == CONFIG.num_hidden_layers
    assert torch.equal(out.objects[0, 2], torch.zeros(CONFIG.hidden_size))  # the padded region
    # The zero-initialised visual scales: at init the visual features do not reach the embeddings.
    assert not model.vlbert.visual_ln_text.weight.any() and not model.vlbert.visual_ln_object.weight.any()


def test_packing_matches_an_explicit_sequence(generator):
    """The packed embedding (before the encoder) equals one built token by token."""
    model = randomise(VLBERTForPretraining(CONFIG), generator).vlbert
    ids, features, boxes, region_mask = inputs(generator, batch=2, text=5, regions=3)
    ids[1, 2:] = 0
    region_mask[:] = True
    region_mask[1, 1] = False
    features, boxes = features.nan_to_num(), boxes.clamp(min=0)
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    captured = {}
    model.encoder.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model(ids, features, boxes, region_mask=region_mask, token_type_ids=types)
    safe = torch.where(region_mask[..., None], features, 0.0)
    reps = model.visual(safe, torch.where(region_mask[..., None], boxes, 0.0)) * region_mask[..., None]
    for b in range(2):
        n = int((ids[b] > 0).sum())
        rows, positions, segments = [], [], []
        for j in range(n):
            rows.append(model.word_embeddings.weight[ids[b, j]] + model.visual_ln_text(reps[b, 0]))
            positions.append(j)
            segments.append(int(types[b, j]))
        for r in range(3):
            if region_mask[b, r]:
                rows.append(model.object_linguistic_embeddings.weight[0] + model.visual_ln_object(reps[b, r]))
                positions.append(n)
                segments.append(2)
        rows.append(model.end_embedding.weight[0])
        positions.append(n + 1)
        segments.append(2)
        expected = model.embedding_norm(torch.stack(rows) + model.position_embeddings.weight[positions]
                                        + model.token_type_embeddings.weight[segments])
        torch.testing.assert_close(captured["x"][b, :len(rows)], expected)


def _as_dict(out):
    """A pretraining output's tensors by name (for the parity helper and loops over them)."""
    return {**out.losses, "loss": out.loss, "mvrc_logits": out.mvrc_logits}


def _pretraining_run(model, ids, features, boxes, region_mask, labels, masked, scores):
    return _as_dict(model(ids, features, boxes, region_mask=region_mask, mlm_labels=labels, masked_regions=masked,
                          region_class_scores=scores))


def _pretraining_inputs(generator):
    ids, features, boxes, region_mask = inputs(generator)
    labels = torch.full(ids.shape, -1)
    labels[0, [1, 5, 20]] = torch.tensor([3, 7, 9])
    labels[2, 2] = 11  # row 1 has nothing to predict
    masked = (torch.rand(region_mask.shape, generator=generator) < 0.3) & region_mask
    scores = torch.softmax(torch.randn(*region_mask.shape, CONFIG.visual_region_classes, generator=generator), -1)
    return [ids, features, boxes, region_mask, labels, masked, scores]


def test_pretraining_parity_fused_vs_reference(generator):
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    results = check_model_parity(model, _pretraining_run, _pretraining_inputs(generator), name="vlbert")
    assert len(results) > 40


@pytest.mark.interpret
def test_pretraining_parity_triton_interpreter(generator):
    """Every op with a Triton kernel on that path (head dim 16: the kernels' smallest)."""
    model = randomise(VLBERTForPretraining(VLBERTConfig.named("tiny", num_attention_heads=2)), generator)
    args = _pretraining_inputs(generator)
    small = [args[0][:, :9], *(a[:, :6] for a in args[1:4]), args[4][:, :9], args[5][:, :6], args[6][:, :6]]
    check_model_parity(model, _pretraining_run, small, name="vlbert-triton",
                       fused={"layer_norm": "triton", "bias_gelu": "triton", "attention": "triton",
                              "linear_cross_entropy": "triton"})


def test_mlm_with_nothing_masked_is_zero_with_zero_gradient(generator):
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    ids, features, boxes, region_mask = inputs(generator)
    out = model(ids, features, boxes, region_mask=region_mask, mlm_labels=torch.full(ids.shape, -1),
                masked_regions=torch.zeros_like(region_mask),
                region_class_scores=torch.full((*region_mask.shape, CONFIG.visual_region_classes), 0.1))
    assert out.losses["mlm"].item() == 0.0 and out.losses["mvrc"].item() == 0.0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()), name


def test_mvrc_is_soft_cross_entropy_over_masked_real_regions(generator):
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    ids, features, boxes, region_mask, _, masked, scores = _pretraining_inputs(generator)
    out = model(ids, features, boxes, region_mask=region_mask, masked_regions=masked, region_class_scores=scores)
    logits = out.mvrc_logits[masked]
    expected = -(scores[masked] * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(out.losses["mvrc"], expected)


def test_kept_masked_regions_are_predicted_from_their_own_input(generator):
    """replaced_regions: only those inputs become the mask embeddings; the loss covers all masked ones."""
    model = randomise(VLBERTForPretraining(CONFIG), generator).eval()
    ids, features, boxes, region_mask, _, masked, scores = _pretraining_inputs(generator)
    kept = masked & (torch.rand(masked.shape, generator=generator) < 0.5)
    assert kept.any() and (masked & ~kept).any()
    out = model(ids, features, boxes, region_mask=region_mask, masked_regions=masked, region_class_scores=scores,
                replaced_regions=masked & ~kept)
    # the same inputs with the kept regions' features perturbed: their logits change, so they were seen
    moved = torch.where(kept[..., None], features + 1.0, features)
    other = model(ids, moved, boxes, region_mask=region_mask, masked_regions=masked, region_class_scores=scores,
                  replaced_regions=masked & ~kept)
    assert not torch.allclose(out.mvrc_logits[kept], other.mvrc_logits[kept])
    # replacing every masked region hides those features: perturbing them changes nothing there
    hidden = model(ids, features, boxes, region_mask=region_mask, masked_regions=masked, region_class_scores=scores)
    hidden_moved = model(ids, moved, boxes, region_mask=region_mask, masked_regions=masked,
                         region_class_scores=scores)
    torch.testing.assert_close(hidden.mvrc_logits, hidden_moved.mvrc_logits)
    logits = out.mvrc_logits[masked]
    torch.testing.assert_close(out.losses["mvrc"], -(scores[masked] * F.log_softmax(logits, -1)).sum(-1).mean())


def test_task_heads(generator):
    ids, features, boxes, region_mask = inputs(generator, batch=2, text=7, regions=5)
    vqa = randomise(VLBERTForVQA(CONFIG, num_answers=9), generator)
    scores = torch.rand(2, 9, generator=generator)
    out = vqa(ids, features, boxes, torch.tensor([3, 1]), region_mask=region_mask, answer_scores=scores)
    torch.testing.assert_close(out["loss"], F.binary_cross_entropy_with_logits(out["logits"], scores) * 9)

    vcr = randomise(VLBERTForVCR(CONFIG), generator)
    options = torch.randint(1, CONFIG.vocab_size, (2, 4, 7), generator=generator)
    out = vcr(options, features, boxes, region_mask=region_mask, labels=torch.tensor([2, 0]))
    assert out["logits"].shape == (2, 4)
    single = vcr.vlbert(options[1, 3:4], features[1:], boxes[1:], region_mask=region_mask[1:]).pooled
    torch.testing.assert_close(out["logits"][1, 3], vcr.classifier(single)[0, 0])
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], torch.tensor([2, 0])))

    ref = randomise(VLBERTForRefCOCO(CONFIG), generator)
    ious = torch.rand(2, 5, generator=generator)
    out = ref(ids, features, boxes, region_mask=region_mask, ious=ious)
    real = out["logits"][region_mask]
    torch.testing.assert_close(out["loss"], F.binary_cross_entropy_with_logits(real, (ious[region_mask] > 0.5).float()))
    assert (out["logits"][~region_mask] == -10000.0).all()


def test_named_and_original_configs():
    released = {"with_pooler": False, "input_transform_type": 1, "visual_size": 768, "hidden_size": 768,
                "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
                "type_vocab_size": 3, "vocab_size": 30522, "initializer_range": 0.02, "visual_scale_text_init": 0.0,
                "visual_scale_object_init": 0.0, "visual_ln": True, "pos_embedding_frozen": False}
    yaml = {"NETWORK": {"IMAGE_FINAL_DIM": 768, "WITH_REL_LOSS": False, "WITH_MLM_LOSS": True,
                        "WITH_MVRC_LOSS": True, "VLBERT": released}}
    assert VLBERTConfig.from_original(yaml) == VLBERTConfig.named("base")
    assert VLBERTConfig.named("large").num_hidden_layers == 24
    with pytest.raises(ValueError, match="word_embedding_frozen"):
        VLBERTConfig.from_original({**released, "word_embedding_frozen": True})
    with pytest.raises(ValueError, match="with_pooler"):
        VLBERTForPretraining(VLBERTConfig.named("tiny", with_rel_head=True))


@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, "features": a["features"][..., :-1]}, ValueError, "RoI features of width 24"),
    (lambda a: {**a, "boxes": a["boxes"] * 3}, ValueError, r"outside \[0, 1\]"),
    (lambda a: {**a, "ids": a["ids"][:1]}, ValueError, "batch size"),
    (lambda a: {**a, "ids": torch.ones(2, 39, dtype=torch.long)}, ValueError, "max_position_embeddings"),
    (lambda a: {**a, "region_mask": a["region_mask"].long() * 2}, ValueError, "region_mask must be bool or hold 0 / 1"),
    (lambda a: {**a, "region_mask": a["region_mask"].float()}, TypeError, "region_mask must have a dtype"),
    (lambda a: {**a, "boxes": a["boxes"][:, :2]}, ValueError, "boxes must have shape"),
    (lambda a: {**a, "masked_regions": a["region_mask"]}, ValueError, "mask_visual_embedding"),
])
def test_bad_input(generator, change, error, message):
    model = VLBERTForPretraining(CONFIG)
    ids, features, boxes, region_mask = inputs(generator, batch=2, text=5, regions=4)
    args = change({"ids": ids, "features": features, "boxes": boxes, "region_mask": region_mask})
    with pytest.raises(error, match=message):
        model.vlbert(args["ids"], args["features"], args["boxes"], region_mask=args["region_mask"],
                     masked_regions=args.get("masked_regions"))


def test_traces_without_graph_breaks(generator):
    """``torch.compile(fullgraph=True)`` accepts the whole pretraining step (dynamo only: eager backend)."""
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    args = _pretraining_inputs(generator)
    args[1] = args[1].nan_to_num()
    compiled = torch.compile(lambda *a: _pretraining_run(model, *a), backend="eager", fullgraph=True)
    out, expected = compiled(*args), _pretraining_run(model, *args)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key])


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)])
def test_autocast_losses_and_gradients(generator, device, dtype):
    """Under autocast the losses stay near the float32 ones and every gradient is finite."""
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    args = _pretraining_inputs(generator)
    expected = _pretraining_run(model, *args)
    model = model.to(device)
    with torch.autocast(device, dtype):
        out = _pretraining_run(model, *(a.to(device) for a in args))
    out["loss"].float().backward()
    for key in ("mlm", "mvrc"):
        torch.testing.assert_close(out[key].float().cpu(), expected[key], rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unpadded_encoder_gives_the_same_results(generator):
    model = randomise(VLBERTForPretraining(CONFIG), generator)
    args = _pretraining_inputs(generator)
    padded = _pretraining_run(model, *args)
    ids, features, boxes, region_mask, labels, masked, scores = args
    unpadded = _as_dict(model(ids, features, boxes, region_mask=region_mask, mlm_labels=labels,
                              masked_regions=masked, region_class_scores=scores, unpad=True))
    for key in padded:
        torch.testing.assert_close(unpadded[key], padded[key])
    grads = torch.autograd.grad(unpadded["loss"], list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(padded["loss"], list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_scalar_visual_scales_and_visual_projection(generator):
    """``visual_ln: false`` (scalar scales) and visual_size != hidden_size (the 1x1 projections)."""
    from fastvl.convert.vlbert import vlbert_from_original, vlbert_to_original

    config = VLBERTConfig.named("tiny", visual_ln=False, visual_size=20, visual_scale_text_init=0.5)
    model = randomise(VLBERTForPretraining(config), generator)
    assert model.vlbert.visual_1x1_text.in_features == 20 and model.vlbert.visual_scale_text.dim() == 0
    ids, features, boxes, region_mask = inputs(generator, batch=2, text=5, regions=4)
    out = model.vlbert(ids, features, boxes, region_mask=region_mask)
    assert torch.isfinite(out.text).all()
    back = vlbert_from_original(vlbert_to_original(model), {**{k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "sinusoid_dim", "visual_ln")}})
    torch.testing.assert_close(back.vlbert(ids, features, boxes, region_mask=region_mask).text, out.text)


def test_vqa_text_layout():
    ids, types, slots = VLBERTForVQA.prepare_text(torch.tensor([[7, 8, 9], [5, 0, 0]]))
    assert ids.tolist() == [[101, 7, 8, 9, 102, 103, 102], [101, 5, 102, 103, 102, 0, 0]]
    assert types.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0]]
    assert slots.tolist() == [5, 3]


def test_activation_checkpointing_gives_the_same_gradients(generator):
    from fastvl.nn import set_gradient_checkpointing

    config = VLBERTConfig.named("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomise(VLBERTForPretraining(config), generator).train()
    model.vlbert.visual.dropout.p = 0.0
    args = _pretraining_inputs(generator)
    expected = torch.autograd.grad(_pretraining_run(model, *args)["loss"], list(model.parameters()))
    set_gradient_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.vlbert.encoder.layers)
    got = torch.autograd.grad(_pretraining_run(model, *args)["loss"], list(model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_zero_one_integer_masks(generator):
    model = VLBERTForPretraining(CONFIG).eval()
    ids, features, boxes, region_mask = inputs(generator)
    masked = torch.zeros_like(region_mask)
    masked[:, 1] = True
    scores = torch.softmax(torch.randn(*region_mask.shape, CONFIG.visual_region_classes, generator=generator), -1)

    def run(convert):
        out = model(ids, features, boxes, text_mask=convert(ids != 0), region_mask=convert(region_mask),
                    masked_regions=convert(masked), region_class_scores=scores)
        return out.losses["mvrc"]

    torch.testing.assert_close(run(lambda m: m.long()), run(lambda m: m), rtol=0, atol=0)


def test_packed_batches_run_end_to_end_with_the_padded_losses(generator):
    """Packed text / region rows (fastvl.data's --packed layout): VL-BERT's sequence is built on the ragged
    rows and the encoder runs on them; losses, logits and gradients equal the padded form's."""
    model = randomise(VLBERTForPretraining(CONFIG), generator).eval()
    ids, features, boxes, region_mask, labels, masked, scores = _pretraining_inputs(generator)
    text_mask = ids != 0
    padded = model(ids, features, boxes, text_mask=text_mask, region_mask=region_mask, mlm_labels=labels,
                   masked_regions=masked, region_class_scores=scores)
    expected = torch.autograd.grad(padded.loss, list(model.parameters()), allow_unused=True)

    def cu(mask):
        return torch.cat([torch.zeros(1, dtype=torch.int32), mask.sum(1).cumsum(0).to(torch.int32)])

    packed = model(ids[text_mask], features[region_mask], boxes[region_mask], mlm_labels=labels[text_mask],
                   token_type_ids=torch.zeros_like(ids[text_mask]), masked_regions=masked[region_mask],
                   region_class_scores=scores[region_mask], cu_seqlens_text=cu(text_mask),
                   cu_seqlens_regions=cu(region_mask), max_seqlen_text=int(text_mask.sum(1).max()),
                   max_seqlen_regions=int(region_mask.sum(1).max()))
    for name in ("mlm", "mvrc"):
        torch.testing.assert_close(packed.losses[name], padded.losses[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.mvrc_logits, padded.mvrc_logits[region_mask], rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(packed.loss, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), got, expected):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="takes no text_mask"):
        model.vlbert(ids[text_mask], features[region_mask], boxes[region_mask], text_mask=text_mask,
                     cu_seqlens_text=cu(text_mask), cu_seqlens_regions=cu(region_mask), max_seqlen_text=9,
                     max_seqlen_regions=9)
