"""ALBEF weakly supervised grounding: Grad-CAM on the ITM head's cross-attention against an independent
gradient (the chain rule through the attention context), ALBEF's box ranking on hand-made maps, the
attention-map PNGs, and `fastvl finetune / evaluate --task grounding` end to end."""

import json
import os

import numpy as np
import pytest
import torch

from fastvl.data.synth import make_synthetic_dataset
from fastvl.data.synth_task import make_task_set
from fastvl.finetune.tasks.grounding import (
    box_sums,
    check_block,
    default_block,
    gradcam_maps,
    itc_gradcam_maps,
    rank_boxes,
    upsample_map,
)
from fastvl.models.albef import ALBEFConfig


@pytest.fixture(scope="module")
def model():
    from fastvl.finetune.tasks.albef_retrieval import ALBEFRetrieval

    torch.manual_seed(3)
    config = ALBEFConfig.named("tiny", image_res=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ALBEFRetrieval(config).double().eval()


def _inputs(config, generator):
    images = torch.randn(3, 3, config.image_res, config.image_res, generator=generator, dtype=torch.float64)
    ids = torch.randint(5, config.vocab_size, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # a padded expression
    mask[2, 6:] = 0
    ids[0, 0] = ids[1, 0] = ids[2, 0] = config.cls_token_id
    return images, ids, mask


def _reference_cam(model, images, ids, mask, block):
    """The gradient of the ITM positive logit with respect to the cross-attention probabilities by the
    chain rule through the attention context (dL/dP = dL/dcontext . V), then ALBEF's cam in loops."""
    c = model.config
    layer = model.text_encoder.fusion_layers[block - c.fusion_layer].crossattention
    captured = {}

    def keep(_, args):
        args[0].retain_grad()
        captured["context"] = args[0]

    handle = layer.dense.register_forward_pre_hook(keep)
    image_embeds, _ = model.image_features(images)
    image_embeds = image_embeds.detach().requires_grad_(True)
    text = model.text_encoder.encode_text(ids, mask)
    fused, probabilities = model.text_encoder.fuse(text, mask, image_embeds, output_attentions=True)
    handle.remove()
    heads = c.num_attention_heads
    score = model.itm_head(fused[:, 0])[:, 1]
    score.sum().backward()
    d_context = captured["context"].grad.unflatten(-1, (heads, -1))  # [B, Lt, heads, d]
    values = layer.kv(image_embeds).unflatten(-1, (2 * heads, -1)).chunk(2, dim=-2)[1]  # [B, Lk, heads, d]
    grad = torch.einsum("bihd,bjhd->bhij", d_context, values)
    probs = probabilities[block - c.fusion_layer][1].detach()
    batch, _, length, keys = probs.shape
    grid = int(round((keys - 1) ** 0.5))
    cam = torch.zeros(batch, keys - 1, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                if mask[b, i]:
                    cam[b] += probs[b, h, i, 1:] * grad[b, h, i, 1:].clamp(min=0)
    return (cam / (heads * length)).reshape(batch, grid, grid), grad


def test_gradcam_matches_an_independent_gradient(model):
    generator = torch.Generator().manual_seed(0)
    images, ids, mask = _inputs(model.config, generator)
    for block in (2, 3):
        cam, score = gradcam_maps(model, images, ids, mask, block)
        reference, grad = _reference_cam(model, images, ids, mask, block)
        assert cam.shape == (3, 3, 3)  # 24 px / patch 8
        assert float(grad.detach().abs().max()) > 1e-4  # a gradient that is there
        torch.testing.assert_close(cam.double(), reference, rtol=1e-5, atol=1e-9)
        with torch.no_grad():
            expected = model.itm_head(model.text_encoder(ids, mask, model.image_features(images)[0])[:, 0])[:, 1]
        torch.testing.assert_close(score.double(), expected.double(), rtol=1e-5, atol=1e-6)


def _reference_itc_cam(model, images, ids, mask, block):
    """ALBEF_itc's map by hand: the ViT run on its fused attention path (no probabilities asked for),
    the gradient of the ITC similarity with respect to block ``block``'s attention probabilities by the
    chain rule through its context (dL/dP = dL/dcontext . V), the probabilities from q and k, and the
    [CLS] row of probs * relu(grad) averaged over heads in loops."""
    attn = model.visual_encoder.blocks[block].attn
    captured = {}

    def keep_input(_, args):
        captured["x"] = args[0]

    def keep_context(_, args):
        args[0].retain_grad()
        captured["context"] = args[0]

    handles = [attn.qkv.register_forward_pre_hook(keep_input), attn.proj.register_forward_pre_hook(keep_context)]
    tokens = model.visual_encoder(images)
    for handle in handles:
        handle.remove()
    image_feat = torch.nn.functional.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
    text = model.text_encoder.encode_text(ids, mask)
    text_feat = torch.nn.functional.normalize(model.text_proj(text[:, 0]), dim=-1).detach()
    score = (image_feat * text_feat).sum(-1) / model.temp
    score.sum().backward()
    heads = attn.heads
    q, k, v = attn.qkv(captured["x"]).detach().unflatten(-1, (3, heads, -1)).unbind(2)  # [B, N, heads, d]
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5, dim=-1)
    d_context = captured["context"].grad.unflatten(-1, (heads, -1))
    grad = torch.einsum("bihd,bjhd->bhij", d_context, v)
    batch, keys = probs.shape[0], probs.shape[-1]
    grid = int(round((keys - 1) ** 0.5))
    cam = torch.zeros(batch, keys - 1, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            cam[b] += probs[b, h, 0, 1:] * grad[b, h, 0, 1:].clamp(min=0) / heads
    return cam.reshape(batch, grid, grid), grad, score.detach()


def test_itc_gradcam_matches_an_independent_gradient(model):
    images, ids, mask = _inputs(model.config, torch.Generator().manual_seed(4))
    for block in (0, 1):
        model.zero_grad(set_to_none=True)
        cam, score = itc_gradcam_maps(model, images, ids, mask, block)
        reference, grad, expected_score = _reference_itc_cam(model, images, ids, mask, block)
        assert cam.shape == (3, 3, 3)
        assert float(grad[:, :, 0].abs().max()) > 1e-4 and float(reference.max()) > 0
        torch.testing.assert_close(cam.double(), reference, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(score.double(), expected_score, rtol=1e-6, atol=1e-8)
    # a different expression moves the map (the ITC score depends on the text)
    other = ids.roll(1, dims=0), mask.roll(1, dims=0)
    assert not torch.allclose(itc_gradcam_maps(model, images, *other, 1)[0], itc_gradcam_maps(model, images, ids,
                                                                                              mask, 1)[0])


def test_gradcam_leaves_parameter_gradients_alone(model):
    model.zero_grad(set_to_none=True)
    images, ids, mask = _inputs(model.config, torch.Generator().manual_seed(1))
    gradcam_maps(model, images, ids, mask, 3)
    itc_gradcam_maps(model, images, ids, mask, 1)
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_block_choice(model):
    c = model.config
    assert default_block(c) == 3 and default_block(ALBEFConfig.named("base")) == 8
    assert default_block(c, "itc") == 1 and default_block(ALBEFConfig.named("base"), "itc") == 11
    with pytest.raises(ValueError, match=r"--gradcam-block must be a fusion layer .* in \[2, 3\]"):
        check_block(c, 1)
    with pytest.raises(ValueError, match=r"--gradcam-block must be an image-encoder block .* in \[0, 1\]"):
        check_block(c, 2, "itc")
    with pytest.raises(ValueError, match=r"--gradcam must be one of"):
        check_block(c, 2, "itx")


def test_box_sums_match_slicing_and_albef_ranking_on_hand_made_maps():
    generator = torch.Generator().manual_seed(2)
    heat = torch.rand(37, 23, generator=generator, dtype=torch.float64)
    boxes = np.array([[0, 0, 23, 37], [3.7, 2.2, 10.9, 5.5], [20, 30, 10, 10], [-4, -3, 6, 5], [5, 5, 0, 9]])
    expected = [float(heat[max(int(y), 0):int(y + h), max(int(x), 0):int(x + w)].sum()) for x, y, w, h in boxes]
    np.testing.assert_allclose(box_sums(heat, boxes), expected, rtol=1e-12)
    # a uniform map scores sqrt(w h) per box: the largest box wins; a zero-area box is never chosen
    scores = rank_boxes(torch.ones(4, 4), np.array([[0, 0, 10, 10], [0, 0, 40, 20], [5, 5, 0, 0]]), 40, 60)
    np.testing.assert_allclose(scores[:2], [10.0, np.sqrt(800.0)], rtol=1e-9)
    assert scores[2] == -np.inf
    # all the mass in the top-left patch: the box there beats a larger box elsewhere
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0
    scores = rank_boxes(cam, np.array([[0, 0, 15, 10], [20, 20, 40, 20]]), 40, 60)
    assert int(np.argmax(scores)) == 0
    assert upsample_map(cam, 40, 60).shape == (40, 60)


def _synthetic_grounding(root, num_images: int, val_images: int, test_images: int, num_classes: int = 6) -> str:
    """A grounding task set over ``num_images`` synthetic 32 px images of ``num_classes`` classes."""
    images = str(root / "images")
    make_synthetic_dataset(images, num_images, feature_dim=16, num_classes=num_classes, shard_size=64, image_size=32)
    make_task_set("grounding", images, str(root / "grd"), val_images=val_images, test_images=test_images)
    return str(root / "grd")


@pytest.fixture(scope="module")
def grounding_set(tmp_path_factory):
    return _synthetic_grounding(tmp_path_factory.mktemp("grounding"), 48, 8, 8)


def test_attention_map_pngs_and_metrics(grounding_set, tmp_path):
    from PIL import Image

    from fastvl.data.tasks import read_task_dir
    from fastvl.finetune.engine import open_images
    from fastvl.finetune.parallel import EvalContext
    from fastvl.finetune.tasks import task_class
    from fastvl.finetune.tasks.common import model_config

    task_dir = read_task_dir(grounding_set, "grounding")
    dataset, special = open_images(task_dir, None)
    maps = str(tmp_path / "maps")
    task = task_class("grounding")(task_dir, "albef", dataset, special, max_text_len=20, max_regions=36, seed=0,
                                   attention_maps=maps, num_maps=3)
    torch.manual_seed(0)
    net = task.make_model(model_config("albef", "tiny", dataset, special)).eval()
    metrics, outputs = task.evaluate(net, "val", EvalContext(batch_size=5))
    expressions = task.split("val")[0]
    assert metrics["expressions"] == len(expressions) == len(outputs["results"])
    assert 0.0 <= metrics["accuracy"] <= metrics["upper_bound"] and metrics["gradcam_block"] == 3
    names = sorted(os.listdir(maps))
    assert names == sorted(f"val-{e.sent_id}.png" for e in expressions[:3])
    picture = Image.open(os.path.join(maps, names[0]))
    assert picture.size == (2 * 32 * 8, 32 * 8) and picture.text["expression"] in {e.text for e in expressions}
    # a training batch: the expressions' images and their ids (positives of the same image)
    batch = task.collate([(0, 0), (0, 1), (0, 2)])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["image_ids"].tolist()[0] == batch["image_ids"].tolist()[1]


@pytest.mark.slow
def test_grounding_finetune_and_evaluate_end_to_end(grounding_set, tmp_path):
    from test_finetune import FT, _run

    out = str(tmp_path / "run")
    _run("fastvl.finetune", ["--task", "grounding", "--model", "albef-tiny", "--data", grounding_set, "--out", out,
                             "--max-steps", "2", "--eval-every", "2", *FT])
    record = json.loads(open(os.path.join(out, "evaluations.jsonl")).readline())
    assert record["step"] == 2 and record["gradcam_block"] == 3
    maps, report = str(tmp_path / "maps"), str(tmp_path / "m.json")
    assert _evaluate_in_process(["--task", "grounding", "--checkpoint", os.path.join(out, "best.pt"), "--data",
                                 grounding_set, "--split", "val", "--attention-maps", maps, "--num-maps", "2",
                                 "--out", report]) == 0
    assert json.load(open(report))["metrics"]["accuracy"] == pytest.approx(record["accuracy"])
    assert len(os.listdir(maps)) == 2


def _evaluate_in_process(argv):
    import argparse

    from fastvl.finetune.engine import evaluate
    from fastvl.finetune.evaluate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return evaluate(parser.parse_args(argv))

def test_zero_shot_grounding_from_a_pretraining_state_dict_through_fastvl_evaluate(grounding_set, tmp_path):
    """`fastvl evaluate --task grounding` on an ALBEF pretraining state dict (no fine-tuning: the
    pretrained ITM head), in this process, with the Grad-CAM block and the maps from the command line."""
    import argparse

    from fastvl.data.format import RegionDataset
    from fastvl.data.tokenizer import load_tokenizer, special_ids
    from fastvl.finetune.engine import evaluate
    from fastvl.finetune.evaluate import add_arguments
    from fastvl.finetune.tasks.common import model_config
    from fastvl.train.albef import ALBEFPretraining

    images = os.path.join(grounding_set, json.load(open(os.path.join(grounding_set, "task.json")))["images"])
    dataset = RegionDataset(images, load_tokenizer(os.path.join(images, "vocab.txt")))
    torch.manual_seed(0)
    pretrained = ALBEFPretraining(model_config("albef", "tiny", dataset, special_ids(dataset.tokenizer)))
    checkpoint = str(tmp_path / "albef.pt")
    torch.save(pretrained.state_dict(), checkpoint)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    maps, report = str(tmp_path / "maps"), str(tmp_path / "m.json")
    args = parser.parse_args(["--task", "grounding", "--checkpoint", checkpoint, "--model", "albef-tiny", "--data",
                              grounding_set, "--split", "val", "--gradcam-block", "2", "--attention-maps", maps,
                              "--num-maps", "2", "--out", report])
    assert evaluate(args) == 0
    result = json.load(open(report))
    assert result["zero_shot"] and result["metrics"]["gradcam_block"] == 2 and len(os.listdir(maps)) == 2
    args.gradcam_block = 1
    with pytest.raises(ValueError, match=r"--gradcam-block must be a fusion layer .* got 1"):
        evaluate(args)  # raised when the model is built, before anything is scored
    # ALBEF_itc: the image encoder's blocks, by default its last
    args.gradcam, args.gradcam_block = "itc", 2
    with pytest.raises(ValueError, match=r"--gradcam-block must be an image-encoder block .* got 2"):
        evaluate(args)
    args.gradcam_block, args.attention_maps, args.num_maps = None, str(tmp_path / "itc-maps"), 1
    assert evaluate(args) == 0
    metrics = json.load(open(report))["metrics"]
    assert metrics["gradcam"] == "itc" and metrics["gradcam_block"] == 1 and len(os.listdir(args.attention_maps)) == 1
    assert 0.0 <= metrics["accuracy"] <= metrics["upper_bound"]


@pytest.fixture(scope="module")
def learning_set(tmp_path_factory):
    """120 images of 12 classes at 32 px (a 4 x 4 patch grid for albef-tiny); 88 validation expressions.
    12 classes, not 6: the expressions name only a class and left / right / big, so a random ITM negative
    (another image's expression) is often true of the image too -- 36% of them with 6 classes, 20% with 12."""
    return _synthetic_grounding(tmp_path_factory.mktemp("grounding-learning"), 120, 24, 16, num_classes=12)


def _grounding_task(data):
    from fastvl.data.tasks import read_task_dir
    from fastvl.finetune.engine import open_images
    from fastvl.finetune.tasks import task_class

    task_dir = read_task_dir(data, "grounding")
    dataset, special = open_images(task_dir, None)
    return task_class("grounding")(task_dir, "albef", dataset, special, max_text_len=20, max_regions=36, seed=0)


def _class_mask(boxes, height, width, grid):
    """The fraction of each of ``grid x grid`` patches that the ``[x, y, w, h]`` boxes cover (32 px frame)."""
    mask = torch.zeros(32, 32, dtype=torch.float64)
    for x, y, w, h in boxes:
        mask[int(y * 32 / height):int((y + h) * 32 / height) + 1, int(x * 32 / width):int((x + w) * 32 / width) + 1] = 1
    return torch.nn.functional.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]


def test_an_oracle_map_of_the_named_class_grounds_the_synthetic_expressions(learning_set):
    """The synthetic expressions are answerable on albef-tiny's 4 x 4 patch grid: a map that only knows
    where the named class is painted (all its instances, not which one) picks a box with IoU >= 0.5 far
    more often than the text-free rules (measured 52.3% vs 27.3%, the largest proposal; the referred box
    alone: 70.5%)."""
    from fastvl.finetune.metrics import refer_iou

    task = _grounding_task(learning_set)
    expressions, _, _, proposals = task.split("val")
    instances = json.load(open(os.path.join(learning_set, "instances.json")))
    by_image = {}
    for a in instances["annotations"]:
        by_image.setdefault(str(a["image_id"]), []).append(a)
    hits, random_hits, largest_hits = [], [], []
    for e in expressions:
        boxes = proposals[e.image_id]
        ious = np.array([refer_iou(e.box, b) for b in boxes])
        referred = next(a for a in by_image[e.image_id] if np.allclose(a["bbox"], e.box, atol=1e-3))
        named = [a["bbox"] for a in by_image[e.image_id] if a["category_id"] == referred["category_id"]]
        scores = rank_boxes(_class_mask(named, e.image_h, e.image_w, 4), boxes, e.image_h, e.image_w)
        hits.append(ious[int(np.argmax(scores))] >= 0.5)
        random_hits.append(float((ious >= 0.5).mean()))
        largest_hits.append(ious[int(np.argmax(boxes[:, 2] * boxes[:, 3]))] >= 0.5)
    best_rule = 100.0 * max(np.mean(random_hits), np.mean(largest_hits))
    assert 100.0 * np.mean(hits) >= best_rule + 20.0, (np.mean(hits), best_rule)


def _train_grounding(task, steps, lr, batch, seed=0):
    """The task's own collate and loss (ALBEF's retrieval ITC + ITM, every expression of an image a
    positive) in a plain AdamW loop, dropout off, the queue twice the batch (ALBEF: a multiple of it)."""
    import dataclasses

    from fastvl.finetune.tasks.common import model_config

    torch.manual_seed(seed)
    config = dataclasses.replace(model_config("albef", "tiny", task.dataset, task.special, dropout=0.0),
                                 queue_size=2 * batch)
    net = task.make_model(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.02)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        keys = [(0, i) for i in torch.randint(task.num_train(), (batch,), generator=generator).tolist()]
        inputs = task.collate(keys)
        inputs["alpha_scale"] = min(1.0, step / 100)  # ALBEF's distillation ramp over the first "epoch"
        loss, _ = task.loss(net, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def _classes_in(data):
    """image id -> {class index: [x, y, w, h] boxes} from the task set's instances.json."""
    instances = json.load(open(os.path.join(data, "instances.json")))
    by_image = {}
    for a in instances["annotations"]:
        by_image.setdefault(str(a["image_id"]), {}).setdefault(a["category_id"] - 1, []).append(a["bbox"])
    return by_image


def _named_class(text, names):
    return names.index(next(w for w in text.split() if w in names))


def _naming_another_object(task, split, data):
    """Two splits over the expressions of ``split`` whose image shows more than one class: the
    expressions as they are (``split + "-multi"``), and each naming instead the next other class that
    is in the same image ("the dog on the left" -> "the cat on the left", a cat painted there too;
    ``split + "-other"``): the same images, referred boxes and proposals. A map that reads the class word
    moves to the other class's objects; a text-free one scores the same on both."""
    from fastvl.data.synth import CLASS_NAMES
    from fastvl.finetune.tasks.common import tokenize

    expressions, images, pieces, proposals = task.split(split)
    names = list(CLASS_NAMES[:task.dataset.num_classes])
    classes = _classes_in(data)
    keep, swapped = [], []
    for i, e in enumerate(expressions):
        named, shown = _named_class(e.text, names), sorted(classes[e.image_id])
        if len(shown) > 1:
            other = shown[(shown.index(named) + 1) % len(shown)]
            keep.append(i)
            swapped.append(" ".join(names[other] if w == names[named] else w for w in e.text.split()))
    subset = ([expressions[i] for i in keep], [images[i] for i in keep])
    task._splits[split + "-multi"] = (*subset, [pieces[i] for i in keep], proposals)
    task._splits[split + "-other"] = (*subset, tokenize(task.dataset.tokenizer, swapped, "albef"), proposals)
    return split + "-multi", split + "-other"


def _mass_on_named_class(task, net, split, data, block):
    """The mean fraction of the Grad-CAM maps of ``split``'s word pieces that lies on the patches of
    the class its expressions' stored text names (all its instances): the same expressions and class
    for ``-multi`` and ``-other``, only the text the model reads differs."""
    from fastvl.data.synth import CLASS_NAMES
    from fastvl.finetune.tasks.common import pixel_batch, text_batch

    expressions, images, pieces, _ = task.split(split)
    names = list(CLASS_NAMES[:task.dataset.num_classes])
    classes = _classes_in(data)
    batch = text_batch(pieces, task.special, "albef", task.max_text_len)
    maps, _ = gradcam_maps(net, pixel_batch(task.dataset, images), batch["input_ids"], batch["text_mask"], block)
    fractions = []
    for e, cam in zip(expressions, maps.double()):
        on_class = _class_mask(classes[e.image_id][_named_class(e.text, names)], e.image_h, e.image_w, cam.shape[-1])
        fractions.append(float((cam * on_class).sum() / cam.sum().clamp(min=1e-30)))
    return float(np.mean(fractions))


@pytest.mark.slow
def test_tiny_albef_grounding_follows_the_named_object_across_seeds(learning_set):
    """albef-tiny from scratch at its default init (BERT side std 0.1), 300 steps of 24 at lr 1e-3, seeds
    0, 1, 2; Grad-CAM of the ITM score at block 2 and of the ITC similarity at the image encoder's last
    block (ALBEF_itm, ALBEF_itc). Measured, ITM (accuracy on the 88 validation expressions; on the 70
    whose image shows several classes; those 70 naming another class of the same image; the maps' mass
    on the named class with the true / the other text): seed 0: 31.8; 34.3 vs 12.9; 0.23 / 0.15. Seed 1:
    44.3; 44.3 vs 8.6; 0.33 / 0.21. Seed 2: 38.6; 40.0 vs 15.7; 0.33 / 0.20. ITC: seed 0: 35.2; 40.0 vs
    8.6. Seed 1: 28.4; 28.6 vs 17.1. Seed 2: 34.1; 31.4 vs 17.1. Best text-free rule 27.3 (the largest
    proposal). Asserted: ITM per seed >= 2 points above the rules and >= 12 above the other-object text,
    the seeds' means >= 8 and >= 18, mass on the named class >= 1.3x; ITC per seed >= 8 above the
    other-object text and at most 2 below the rules, the means >= 3 above the rules and >= 12 above the
    other-object text (ITC's lead over the rules is the weak part at this init and length: +1.1 on
    seed 1). Block 2, not the default last block (3): at block 3 seed 2 gives 23.9, under the rules."""
    from fastvl.finetune.parallel import EvalContext

    task = _grounding_task(learning_set)
    multi, other = _naming_another_object(task, "val", learning_set)
    assert len(task.split(multi)[0]) == 70
    rows, masses = {"itm": [], "itc": []}, []
    for seed in (0, 1, 2):
        net = _train_grounding(task, 300, lr=1e-3, batch=24, seed=seed)
        for mode, block in (("itm", 2), ("itc", None)):
            task.gradcam, task.gradcam_block = mode, block
            result = task.evaluate(net, "val", EvalContext(batch_size=96))[0]
            assert result["expressions"] == 88 and result["gradcam"] == mode
            accuracy = [task.evaluate(net, split, EvalContext(batch_size=96))[0]["accuracy"]
                        for split in (multi, other)]
            rows[mode].append((result["accuracy"], result["best_trivial_accuracy"], *accuracy))
        masses.append([_mass_on_named_class(task, net, split, learning_set, 2) for split in (multi, other)])
    # per seed: (over the rules, over the other-object text); the seeds' means
    margins = {"itm": ((2.0, 12.0), (8.0, 18.0)), "itc": ((-2.0, 8.0), (3.0, 12.0))}
    for mode, measured in rows.items():
        (seed_rule, seed_other), (mean_rule, mean_other) = margins[mode]
        for full, rule, true_text, other_text in measured:
            assert full >= rule + seed_rule, (mode, measured)
            assert true_text >= other_text + seed_other, (mode, measured)
        assert np.mean([r[0] - r[1] for r in measured]) >= mean_rule, (mode, measured)
        assert np.mean([r[2] - r[3] for r in measured]) >= mean_other, (mode, measured)
    assert all(mass_true >= 1.3 * mass_other for mass_true, mass_other in masses), masses
