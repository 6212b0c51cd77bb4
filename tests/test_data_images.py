"""ALBEF's image-file datasets: annotation files, Pillow decoding in the collator, seeded augmentation,
missing / corrupt images, and a pretraining step on the collated batch."""

import json
import os

import numpy as np
import pytest
import torch

from fastvl.data.collate_albef import ALBEFCollator
from fastvl.data.format import DataError
from fastvl.data.images import ImageCaptionDataset, random_resized_crop_box
from fastvl.data.tokenizer import load_tokenizer, special_ids, train_vocab

Image = pytest.importorskip("PIL.Image")
CAPTIONS = ["a red square on a grey field", "two blue stripes", "a green circle", "a yellow dot near the corner"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for number, caption in enumerate(CAPTIONS):
        pixels = rng.integers(0, 256, size=(40 + 7 * number, 56, 3), dtype=np.uint8)
        name = f"img{number}.{'png' if number % 2 else 'jpg'}"
        Image.fromarray(pixels).save(root / name)
        records.append({"image": name, "caption": caption})
    records[1]["caption"] = [CAPTIONS[1], "stripes of blue"]  # a list: one pair per caption
    (root / "train.json").write_text(json.dumps(records))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (root / "missing.json").write_text(json.dumps([*records, {"image": "gone.jpg", "caption": "lost"}]))
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "broken.json").write_text(json.dumps([{"image": "broken.jpg", "caption": "broken"}]))
    vocab = str(root / "vocab.txt")
    tokenizer = load_tokenizer(train_vocab(CAPTIONS + ["stripes of blue"], vocab, vocab_size=200))
    return str(root), tokenizer


def _dataset(files, name="train.json", **kwargs):
    root, tokenizer = files
    return ImageCaptionDataset(os.path.join(root, name), tokenizer, image_root=root, image_res=32, **kwargs)


def test_json_and_jsonl_give_the_same_pairs(files):
    plain, lines = _dataset(files), _dataset(files, "train.jsonl")
    assert len(plain) == len(lines) == 5 and plain.captions == lines.captions and plain.images == lines.images
    assert plain.captions[1:3] == [CAPTIONS[1], "stripes of blue"] and plain.images[1] == plain.images[2]


def test_augmentation_is_seeded_per_sample_and_epoch(files):
    dataset = _dataset(files, seed=3)
    first = dataset.image(0, 2)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    np.testing.assert_array_equal(dataset.image(0, 2), first)  # a resumed run sees the same image
    np.testing.assert_array_equal(_dataset(files, seed=3).image(0, 2), first)
    assert not np.array_equal(dataset.image(1, 2), first)  # another epoch, another crop
    assert not np.array_equal(_dataset(files, seed=4).image(0, 2), first)
    plain = _dataset(files, augment=False).image(0, 2)
    source = Image.open(dataset.images[2]).convert("RGB").resize((32, 32), Image.BICUBIC)
    np.testing.assert_array_equal(plain, np.asarray(source))


def test_random_resized_crop_box_follows_torchvision_bounds():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(200, 120, rng)
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 120
        w, h = right - left, bottom - top
        areas.append(w * h / (200 * 120))
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or (w, h) in ((200, 120), (160, 120))
    assert 0.19 <= min(areas) < 0.25 and 0.79 <= max(areas) <= 1.0  # the scale range (0.2, 1), clipped by the frame


def test_missing_images_are_skipped_and_counted_or_refused(files):
    dataset = _dataset(files, "missing.json")
    assert len(dataset) == 5 and dataset.skipped == {"missing_image": 1, "empty_caption": 0}
    with pytest.raises(DataError, match="gone.jpg not found"):
        _dataset(files, "missing.json", strict=True)


def test_a_corrupt_image_is_an_error_naming_the_file(files):
    dataset = _dataset(files, "broken.json")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode"):
        dataset.image(0, 0)


def test_collated_batch_trains_albef(files):
    from fastvl.models.albef import ALBEF, ALBEFConfig

    dataset = _dataset(files)
    tokenizer = dataset.tokenizer
    collator = ALBEFCollator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), seed=1)
    loader = torch.utils.data.DataLoader([(0, i) for i in range(5)], batch_size=5, collate_fn=collator,
                                         num_workers=1)  # decoding runs in the worker
    batch = next(iter(loader))
    assert batch["images"].shape == (5, 3, 32, 32)
    again = collator([(0, i) for i in range(5)])
    torch.testing.assert_close(batch["images"], again["images"])
    special = special_ids(tokenizer)
    config = ALBEFConfig.named("tiny", vocab_size=tokenizer.get_vocab_size(), pad_token_id=special.pad,
                               cls_token_id=special.cls, mask_token_id=special.mask)
    out = ALBEF(config)(batch["images"], batch["input_ids"], batch["attention_mask"],
                        mlm_inputs=(batch["mlm_input_ids"], batch["mlm_labels"]), update=False)
    assert set(out.losses) == {"itc", "itm", "mlm"} and torch.isfinite(out.loss)


@pytest.mark.slow
def test_pretrain_cli_trains_albef_on_image_files(files, tmp_path):
    """`fastvl pretrain --model albef-tiny --data train.json`: two steps on decoded, augmented images."""
    import subprocess

    from test_train import _command, _env, _losses

    root, _ = files
    out = tmp_path / "run"
    done = subprocess.run(_command(["--model", "albef-tiny", "--data", os.path.join(root, "train.json"), "--vocab",
                                    os.path.join(root, "vocab.txt"), "--image-root", root, "--image-res", "32",
                                    "--out", str(out), "--global-batch", "4", "--micro-batch", "2", "--max-steps", "2",
                                    "--log-every", "1", "--no-progress", "--num-workers", "1"]),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(_losses(str(out))) == 2
    wrong = subprocess.run(_command(["--model", "vilbert-tiny", "--data", os.path.join(root, "train.json"), "--vocab",
                                     os.path.join(root, "vocab.txt"), "--out", str(tmp_path / "x"), "--no-progress"]),
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "image-caption files train ALBEF" in wrong.stderr


def test_embed_writes_pooled_text_image_and_joint_embeddings(files, tmp_path):
    """`fastvl embed`: every pair's ITC projections and fusion [CLS] state, as the model computes them."""
    import dataclasses

    from safetensors.torch import save_file

    from fastvl.cli import main
    from fastvl.data.collate_albef import albef_caption, normalise_images
    from fastvl.models.albef import ALBEF, ALBEFConfig

    root, tokenizer = files
    special = special_ids(tokenizer)
    config = ALBEFConfig.named("tiny", vocab_size=tokenizer.get_vocab_size(), pad_token_id=special.pad,
                               cls_token_id=special.cls, mask_token_id=special.mask)
    torch.manual_seed(0)
    model = ALBEF(config).eval()
    checkpoint = str(tmp_path / "albef.safetensors")
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, checkpoint)
    with open(checkpoint + ".json", "w") as handle:
        json.dump({"class": "fastvl.models.albef.ALBEF", "config": dataclasses.asdict(config)}, handle)
    out = str(tmp_path / "embeddings.npy")
    assert main(["embed", "--checkpoint", checkpoint, "--data", os.path.join(root, "train.jsonl"), "--vocab",
                 os.path.join(root, "vocab.txt"), "--image-root", root, "--out", out, "--batch-size", "2",
                 "--no-progress"]) == 0
    rows = np.load(out)  # a structured array: no pickle
    assert rows.shape == (5,) and rows["joint"].shape == (5, config.hidden_size)
    dataset = _dataset(files, "train.jsonl", augment=False)
    index = 2
    ids = torch.tensor([[special.cls, *tokenizer.encode(albef_caption(dataset.captions[index]),
                                                        add_special_tokens=False).ids]])
    image = Image.open(dataset.images[index]).convert("RGB").resize((config.image_res,) * 2, Image.BICUBIC)
    images = normalise_images(np.asarray(image)[None])
    with torch.no_grad():
        tokens, image_feat = model.image_features(images)
        states, text_feat = model.text_features(ids, None)
        joint = model.text_encoder.fuse(states, None, tokens)[:, 0]
    np.testing.assert_allclose(rows["image"][index], image_feat[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["text"][index], text_feat[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["joint"][index], joint[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows["text"], axis=1), 1.0, rtol=1e-5)
    assert main(["embed", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", root, "--out", out]) == 2
