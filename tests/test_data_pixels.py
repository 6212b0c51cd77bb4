"""Pixels in the fastvl dataset format: writing, memory-mapped reading, the synthetic renderer, and the
errors for truncated / corrupt / missing pixel arrays and for pixel-less sets where pixels are needed."""

import json
import os
import shutil

import numpy as np
import pytest

from fastvl.cli import main as fastvl_main
from fastvl.data.format import DataError, ImageRecord, RegionDataset, ShardWriter, write_dataset
from fastvl.data.synth import CLASS_NAMES, class_textures, make_synthetic_dataset, render_image
from fastvl.data.tokenizer import load_tokenizer

SIZE = 24


@pytest.fixture(scope="module")
def pixel_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("pixels")
    make_synthetic_dataset(str(out), 40, feature_dim=8, num_classes=8, shard_size=16, image_size=SIZE)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(pixel_set):
    return load_tokenizer(os.path.join(pixel_set, "vocab.txt"))


def _records(rng, count, size=(6, 10)):
    return [ImageRecord(f"img{i}", f"a caption number {i}", rng.normal(size=(3, 4)).astype(np.float32),
                        rng.uniform(0, 9, (3, 4)).astype(np.float32), rng.dirichlet(np.ones(5), 3), 30, 40,
                        rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for i in range(count)]


def test_pixels_round_trip_memory_mapped(tmp_path, tokenizer):
    records = _records(np.random.default_rng(0), 5)
    index = write_dataset(str(tmp_path), records, feature_dim=4, num_classes=5, shard_size=2, pixels=(6, 10))
    assert index["version"] == 1 and index["pixels"] == [6, 10]
    assert json.load(open(tmp_path / "index.json"))["pixels"] == [6, 10]
    dataset = RegionDataset(str(tmp_path), tokenizer)
    assert dataset.pixel_size == (6, 10) and dataset.require_pixels("test") == (6, 10)
    for i, record in enumerate(records):
        pixels = dataset[i].pixels
        assert pixels.dtype == np.uint8 and pixels.shape == (6, 10, 3)
        np.testing.assert_array_equal(pixels, record.pixels)
        assert isinstance(pixels.base, np.memmap) or isinstance(pixels, np.memmap)
    # a set without pixels (as every set written before them) reads as before: no pixels anywhere
    plain = [ImageRecord(r.image_id, r.caption, r.features, r.boxes, r.cls_prob, r.image_h, r.image_w) for r in records]
    write_dataset(str(tmp_path / "plain"), plain, feature_dim=4, num_classes=5, shard_size=2)
    assert "pixels" not in json.load(open(tmp_path / "plain" / "index.json"))
    dataset = RegionDataset(str(tmp_path / "plain"), tokenizer)
    assert dataset.pixel_size is None and dataset[0].pixels is None
    assert not os.path.exists(tmp_path / "plain" / "shard-00000" / "pixels.npy")


def test_writer_rejects_missing_or_misshapen_pixels(tmp_path):
    rng = np.random.default_rng(1)
    record = _records(rng, 1)[0]
    with ShardWriter(str(tmp_path / "a"), feature_dim=4, num_classes=5, pixels=(6, 10)) as writer:
        with pytest.raises(DataError, match=r"record 'img0': pixels must be uint8 \[6, 10, 3\].*got none"):
            writer.add(ImageRecord(record.image_id, record.caption, record.features, record.boxes, record.cls_prob,
                                   30, 40))
        with pytest.raises(DataError, match=r"record 'img0': pixels must be uint8 \[6, 10, 3\].*got float32"):
            writer.add(ImageRecord(record.image_id, record.caption, record.features, record.boxes, record.cls_prob,
                                   30, 40, record.pixels.astype(np.float32)))
        writer.add(record)
    with ShardWriter(str(tmp_path / "b"), feature_dim=4, num_classes=5) as writer, \
            pytest.raises(DataError, match="record 'img0': has pixels, but the writer was opened without"):
        writer.add(record)


def test_synth_renders_each_region_in_its_class_texture(pixel_set, tokenizer, tmp_path):
    dataset = RegionDataset(pixel_set, tokenizer)
    assert dataset.pixel_size == (SIZE, SIZE)
    textures = class_textures(8, SIZE, seed=0)
    assert len({tuple(textures[c, 0, 0]) for c in range(8)}) == 8  # every class its own colour
    for i in range(0, 40, 3):
        example = dataset[i]
        classes = example.cls_prob.astype(np.float32).argmax(1)
        # the smallest region is painted last: its whole box shows its class's texture
        scale = np.array([SIZE / example.image_w, SIZE / example.image_h] * 2)
        corners = np.clip(np.floor(example.boxes.astype(np.float64) * scale), 0, SIZE - 1).astype(int)
        corners[:, 2:] = np.maximum(corners[:, 2:], corners[:, :2] + 1)
        smallest = np.argmin((corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1]))
        x1, y1, x2, y2 = corners[smallest]
        np.testing.assert_array_equal(example.pixels[y1:y2, x1:x2], textures[classes[smallest], y1:y2, x1:x2])
        # and the classes the caption names are on the image
        words = tokenizer.decode(example.token_ids.tolist()).split()
        named = {CLASS_NAMES.index(w if w in CLASS_NAMES else w[:-1]) for w in words
                 if w in CLASS_NAMES or w[:-1] in CLASS_NAMES}
        colours = {tuple(p) for p in example.pixels.reshape(-1, 3)}
        for c in named:
            assert tuple(textures[c, 0, 0]) in colours or tuple(textures[c, 1, 1]) in colours, (i, CLASS_NAMES[c])


def test_synth_pixels_leave_the_region_data_unchanged(pixel_set, tmp_path):
    """Drawing the images uses its own random stream: features, boxes, captions and vocabulary are
    byte-identical to the set made without pixels, and the same seed gives the same pixels."""
    make_synthetic_dataset(str(tmp_path / "plain"), 40, feature_dim=8, num_classes=8, shard_size=16)
    make_synthetic_dataset(str(tmp_path / "again"), 40, feature_dim=8, num_classes=8, shard_size=16, image_size=SIZE)
    for folder, _, names in os.walk(pixel_set):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), pixel_set)
            data = open(os.path.join(pixel_set, relative), "rb").read()
            assert data == open(tmp_path / "again" / relative, "rb").read(), relative
            if name not in ("pixels.npy", "index.json"):
                assert data == open(tmp_path / "plain" / relative, "rb").read(), relative


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_or_corrupt_pixels_name_file_and_record(pixel_set, tokenizer, tmp_path):
    root = _copy(pixel_set, tmp_path / "truncated")
    path = os.path.join(root, "shard-00001", "pixels.npy")
    header = os.path.getsize(path) - 16 * SIZE * SIZE * 3
    with open(path, "r+b") as f:
        f.truncate(header + 5 * SIZE * SIZE * 3 + 7)  # 5 whole images and part of the 6th
    with pytest.raises(DataError, match=r"shard-00001/pixels\.npy: corrupt or truncated .*holds 5 of 16 images: "
                                        r"record 5 \(line 6 of captions\.jsonl, image_id 'synth-000021'\)"):
        RegionDataset(root, tokenizer)

    root = _copy(pixel_set, tmp_path / "corrupt")
    path = os.path.join(root, "shard-00002", "pixels.npy")
    with open(path, "r+b") as f:
        f.write(b"not an npy header")
    with pytest.raises(DataError, match=r"shard-00002/pixels\.npy: corrupt or truncated"):
        RegionDataset(root, tokenizer)

    root = _copy(pixel_set, tmp_path / "shape")
    np.save(os.path.join(root, "shard-00000", "pixels.npy"), np.zeros((16, SIZE, SIZE + 1, 3), np.uint8))
    with pytest.raises(DataError, match=r"shard-00000/pixels\.npy: expected uint8 \[16, 24, 24, 3\].*"
                                        r"got uint8 \[16, 24, 25, 3\]"):
        RegionDataset(root, tokenizer)

    root = _copy(pixel_set, tmp_path / "missing")
    os.remove(os.path.join(root, "shard-00000", "pixels.npy"))
    with pytest.raises(DataError, match=r"shard-00000/pixels\.npy: missing \(index\.json says the set has pixels\)"):
        RegionDataset(root, tokenizer)

    root = _copy(pixel_set, tmp_path / "index")
    index = json.load(open(os.path.join(root, "index.json")))
    json.dump({**index, "pixels": [SIZE]}, open(os.path.join(root, "index.json"), "w"))
    with pytest.raises(DataError, match=r"index\.json: 'pixels' must be \[height, width\]"):
        RegionDataset(root, tokenizer)


def test_pixels_required_on_a_set_without_them(tmp_path, tokenizer):
    write_dataset(str(tmp_path), [ImageRecord("r0", "a dog", np.ones((2, 4), np.float32),
                                              np.tile([[0, 0, 5, 5]], (2, 1)).astype(np.float32),
                                              np.full((2, 3), 1 / 3), 10, 10)], feature_dim=4, num_classes=3)
    dataset = RegionDataset(str(tmp_path), tokenizer)
    with pytest.raises(DataError, match=r"index\.json: this dataset has no images .*ALBEF trains on image pixels.*"
                                        r"fastvl data synth --image-size N"):
        dataset.require_pixels("ALBEF")


def test_data_cli_synth_with_image_size(tmp_path, capsys):
    out = str(tmp_path / "set")
    assert fastvl_main(["data", "synth", "--out", out, "--num-images", "12", "--feature-dim", "8", "--num-classes",
                        "4", "--image-size", "16"]) == 0
    assert "with 16 x 16 pixels" in capsys.readouterr().out
    assert fastvl_main(["data", "inspect", out]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pixels"] == [16, 16]
    assert np.load(os.path.join(out, "shard-00000", "pixels.npy")).shape == (12, 16, 16, 3)


def test_a_box_reaching_the_edges_paints_every_pixel():
    textures = class_textures(2, 8, seed=0)
    image = render_image(np.array([1]), np.array([[0.0, 0.0, 640.0, 480.0]]), 480, 640, textures,
                         np.random.default_rng(1))
    np.testing.assert_array_equal(image, textures[1])
    corner = render_image(np.array([0]), np.array([[600.0, 450.0, 640.0, 480.0]]), 480, 640, textures,
                          np.random.default_rng(1))
    np.testing.assert_array_equal(corner[-1, -1], textures[0, -1, -1])
