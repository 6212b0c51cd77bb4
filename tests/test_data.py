"""fastvl.data: the shard format, synthetic set, conversion, error handling, masking rules, sampler."""

import base64
import copy
import dataclasses
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from fastvl.cli import main as fastvl_main
from fastvl.data import convert
from fastvl.data.collate import IMG_LOCATION, ViLBERTCollator, box_iou, pack, pad, region_locations, unpack
from fastvl.data.format import DataError, ImageRecord, RegionDataset, write_dataset
from fastvl.data.sampler import GlobalBatchSampler
from fastvl.data.synth import make_synthetic_dataset
from fastvl.data.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(str(out), 96, feature_dim=64, shard_size=40)
    return str(out)


@pytest.fixture(scope="module")
def dataset(synth_dir):
    return RegionDataset(synth_dir, load_tokenizer(os.path.join(synth_dir, "vocab.txt")))


def _collator(dataset, **kwargs):
    tokenizer = dataset.tokenizer
    return ViLBERTCollator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), **kwargs)


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


# format and synthetic set ----------------------------------------------------------------------------


def test_synth_is_deterministic_and_readable(synth_dir, tmp_path, dataset):
    make_synthetic_dataset(str(tmp_path), 96, feature_dim=64, shard_size=40)
    assert _files(str(tmp_path)) == _files(synth_dir)
    index = json.load(open(os.path.join(synth_dir, "index.json")))
    assert [s["num_images"] for s in index["shards"]] == [40, 40, 16]
    assert len(dataset) == 96 and dataset.skipped == {"zero_regions": 0, "empty_caption": 0}
    example = dataset[57]
    assert example.features.dtype == np.float16 and example.features.shape[1] == 64
    assert 10 <= example.features.shape[0] <= 24
    np.testing.assert_allclose(example.cls_prob.astype(np.float32).sum(1), 1.0, atol=1e-2)
    assert isinstance(example.features, np.memmap) or isinstance(example.features.base, np.memmap)


def test_synth_captions_name_region_classes(dataset):
    from fastvl.data.synth import CLASS_NAMES

    vocab = dataset.tokenizer
    for i in range(0, 96, 7):
        example = dataset[i]
        classes = {CLASS_NAMES[c] for c in example.cls_prob.astype(np.float32).argmax(1)}
        words = set(re.findall("[a-z]+", vocab.decode(example.token_ids.tolist())))
        named = {w if w in CLASS_NAMES else w[:-1] for w in words} & set(CLASS_NAMES)  # "dogs" -> "dog"
        assert named and named <= classes


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    records = [ImageRecord(f"img{i}", f"a caption number {i}", rng.normal(size=(n, 8)).astype(np.float32),
                           rng.uniform(0, 50, (n, 4)).astype(np.float32), rng.dirichlet(np.ones(5), n), 60, 80)
               for i, n in enumerate([3, 1, 7])]
    write_dataset(str(tmp_path), records, feature_dim=8, num_classes=5, shard_size=2)
    from fastvl.data.tokenizer import train_vocab

    train_vocab([r.caption for r in records], str(tmp_path / "vocab.txt"), 100)
    dataset = RegionDataset(str(tmp_path), load_tokenizer(str(tmp_path / "vocab.txt")))
    for i, record in enumerate(records):
        got = dataset[i]
        assert got.image_id == record.image_id and (got.image_h, got.image_w) == (60, 80)
        np.testing.assert_allclose(got.features, record.features, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got.boxes, record.boxes)
        np.testing.assert_allclose(got.cls_prob, record.cls_prob, atol=1e-3)


# conversion ------------------------------------------------------------------------------------------


def _b64(array, dtype=np.float32):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def _butd_tsv(path, images, with_cls_prob=True):
    """Writes images in the bottom-up-attention generate_tsv.py layout (+ cls_prob or objects_id/conf)."""
    with open(path, "w") as f:
        for image_id, (features, boxes, cls_prob) in images.items():
            fields = [image_id, "640", "480", str(len(features)), _b64(boxes), _b64(features)]
            if with_cls_prob:
                fields.append(_b64(cls_prob))
            else:
                fields += [_b64(cls_prob.argmax(1), np.int64), _b64(cls_prob.max(1))]
            f.write("\t".join(fields) + "\n")


def _images(rng, counts, dim=16, classes=6):
    return {f"{1000 + i}": (rng.normal(size=(n, dim)).astype(np.float32), rng.uniform(0, 400, (n, 4)),
                            rng.dirichlet(np.ones(classes), n).astype(np.float32)) for i, n in enumerate(counts)}


def test_convert_butd_tsv(tmp_path, synth_dir):
    rng = np.random.default_rng(1)
    images = _images(rng, [4, 2, 5])
    tsv = tmp_path / "features.tsv"
    _butd_tsv(tsv, images)
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image_id": "1000", "caption": "a dog"}\n{"image_id": "1000", "caption": "two cats"}\n'
                        "1002\ta bird near a tree\n")
    out = tmp_path / "converted"
    code = fastvl_main(["data", "convert", str(tsv), "--captions", str(captions), "--out", str(out),
                        "--vocab", os.path.join(synth_dir, "vocab.txt")])
    assert code == 0
    dataset = RegionDataset(str(out), load_tokenizer(str(out / "vocab.txt")))
    assert dataset.image_ids == ["1000", "1000", "1002"]
    features, boxes, cls_prob = images["1002"]
    got = dataset[2]
    np.testing.assert_allclose(got.features, features, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got.boxes, boxes, rtol=1e-6)
    np.testing.assert_allclose(got.cls_prob, cls_prob, atol=1e-3)
    assert (got.image_h, got.image_w) == (480, 640)


def test_convert_tsv_objects_conf_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    images = _images(rng, [3])
    tsv = tmp_path / "f.tsv"
    _butd_tsv(tsv, images, with_cls_prob=False)
    fields = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "objects_id", "objects_conf")
    rows = list(convert.read_butd_tsv(str(tsv), fields, num_classes=6))
    features, _, cls_prob = images["1000"]
    np.testing.assert_allclose(rows[0]["cls_prob"].sum(1), 1.0, rtol=1e-6)
    assert (rows[0]["cls_prob"].argmax(1) == cls_prob.argmax(1)).all()
    with pytest.raises(DataError, match="--num-classes"):
        list(convert.read_butd_tsv(str(tsv), fields))
    # a truncated features field names file, line and image
    line = tsv.read_text().split("\t")
    line[5] = _b64(features)[:-12]
    tsv.write_text("\t".join(line))
    with pytest.raises(DataError, match=r"f\.tsv:1 \(image_id '1000'\): field 'features'"):
        list(convert.read_butd_tsv(str(tsv), fields, num_classes=6))
    tsv.write_text("1000\t640\t480\n")
    with pytest.raises(DataError, match=r"f\.tsv:1: 3 tab-separated fields"):
        list(convert.read_butd_tsv(str(tsv)))


def test_convert_lmdb_path_that_is_not_an_lmdb(tmp_path):
    """(msgpack LMDBs need no --trust-pickle: the pickle / msgpack cases are in tests/test_data_lmdb.py.)"""
    try:
        import lmdb  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="'lmdb' package"):
            next(convert.read_vilbert_lmdb(str(tmp_path), trust_pickle=True))
    else:
        with pytest.raises(DataError, match="cannot open as an LMDB"):
            next(convert.read_vilbert_lmdb(str(tmp_path)))


# errors and skips ------------------------------------------------------------------------------------


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_or_corrupt_shard(synth_dir, tmp_path):
    tokenizer = load_tokenizer(os.path.join(synth_dir, "vocab.txt"))
    root = _copy(synth_dir, tmp_path / "a")
    path = os.path.join(root, "shard-00001", "features.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=r"shard-00001/features\.npy: corrupt or truncated"):
        RegionDataset(root, tokenizer)
    root = _copy(synth_dir, tmp_path / "b")
    with open(os.path.join(root, "shard-00000", "captions.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"shard-00000/captions\.jsonl:41: bad caption record"):
        RegionDataset(root, tokenizer)
    root = _copy(synth_dir, tmp_path / "c")
    np.save(os.path.join(root, "shard-00002", "boxes.npy"), np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match=r"shard-00002/boxes\.npy: shape \[3, 4\] does not match"):
        RegionDataset(root, tokenizer)
    with pytest.raises(DataError, match="index.json: missing"):
        RegionDataset(str(tmp_path), tokenizer)


def test_bad_records_are_skipped_and_counted_or_strict(tmp_path, synth_dir, caplog):
    rng = np.random.default_rng(3)

    def record(i, n, caption):
        return ImageRecord(f"r{i}", caption, rng.normal(size=(n, 8)).astype(np.float32),
                           np.tile([[0, 0, 10, 10]], (n, 1)).astype(np.float32), np.full((n, 3), 1 / 3), 20, 20)

    records = [record(0, 2, "a dog"), record(1, 0, "a cat"), record(2, 3, "   "), record(3, 1, "two dogs")]
    write_dataset(str(tmp_path), records, feature_dim=8, num_classes=3)
    tokenizer = load_tokenizer(os.path.join(synth_dir, "vocab.txt"))
    with caplog.at_level("WARNING", logger="fastvl.data"):
        dataset = RegionDataset(str(tmp_path), tokenizer)
    assert len(dataset) == 2 and dataset.image_ids == ["r0", "r3"]
    assert dataset.skipped == {"zero_regions": 1, "empty_caption": 1}
    assert "skipped 2 records" in caplog.text and "captions.jsonl:2 (image_id 'r1')" in caplog.text
    with pytest.raises(DataError, match=r"captions\.jsonl:2 \(image_id 'r1'\): image has 0 regions"):
        RegionDataset(str(tmp_path), tokenizer, strict=True)


# collation -------------------------------------------------------------------------------------------


class _Replaced:
    """A dataset serving ``example`` at ``index`` and ``dataset``'s records elsewhere."""

    def __init__(self, dataset, index, example):
        self.dataset, self.index, self.example, self.token_ids = dataset, index, example, dataset.token_ids

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.example if index == self.index else self.dataset[index]


def test_img_region_never_carries_a_masked_region(dataset):
    """vilbert-multi-task's IMG feature: the sum after zeroing over the regions overlapping no masked one;
    a zeroed region's feature does not reach it, whatever that feature is."""
    collator = _collator(dataset, seed=3)
    checked = 0
    for index in range(len(dataset)):
        sample = collator.sample(0, index)
        zeroed = sample["region_replaced"][1:]
        if not zeroed.any():
            continue
        example = dataset[index]
        poisoned = np.array(example.features, dtype=np.float32)
        poisoned[zeroed] = 1e4  # a masked region's feature, made unmistakable
        poisoned_collator = copy.copy(collator)
        poisoned_collator.dataset = _Replaced(dataset, index, dataclasses.replace(example, features=poisoned))
        again = poisoned_collator.sample(0, index)
        np.testing.assert_array_equal(again["region_replaced"], sample["region_replaced"])
        np.testing.assert_array_equal(again["region_feats"][0], sample["region_feats"][0])
        assert np.abs(sample["region_feats"][0]).max() < 1e3
        # the count: real regions overlapping no selected one (a selected region overlaps itself)
        selected = sample["region_labels"][1:]
        free = ~(box_iou(np.asarray(example.boxes, np.float64)[selected], example.boxes) > 0.4).any(0)
        assert free.sum() <= len(free) - selected.sum()
        np.testing.assert_allclose(sample["region_feats"][0] * max(1, free.sum()), sample["region_feats"][1:].sum(0),
                                   rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked > 10


def test_box_iou_matches_the_pixel_convention():
    a = np.array([[0, 0, 9, 9], [5, 5, 14, 14]], np.float64)  # 10 x 10 pixels each, 5 x 5 overlap
    np.testing.assert_allclose(box_iou(a, a), [[1, 25 / 175], [25 / 175, 1]])


def test_masking_rules_statistically(dataset):
    """Word and region masking rates, 80/10/10 and 90/10 splits, negatives, IMG region, labels."""
    collator = _collator(dataset, seed=7)
    special = collator.special
    words = selected = to_mask = kept = regions = regions_selected = zeroed = negatives = 0
    samples = 1200
    for n in range(samples):
        index = n % len(dataset)
        sample = collator.sample(n // len(dataset), index)
        ids, labels = sample["input_ids"], sample["mlm_labels"]
        assert ids[0] == special.cls and ids[-1] == special.sep and labels[0] == labels[-1] == -1
        chosen = labels >= 0
        original = dataset.token_ids[index] if sample["is_next"] == 0 else None
        if original is not None:
            np.testing.assert_array_equal(labels[chosen], original[chosen[1:-1]])
            np.testing.assert_array_equal(ids[1:-1][~chosen[1:-1]], original[~chosen[1:-1]])
        words += len(ids) - 2
        selected += chosen.sum()
        to_mask += (ids[chosen] == special.mask).sum()
        kept += (ids[chosen] == labels[chosen]).sum()
        negatives += int(sample["is_next"])
        example = dataset[index]
        feats, label = sample["region_feats"], sample["region_labels"]
        real = np.asarray(example.features, dtype=np.float32)
        overlapped = (box_iou(np.asarray(example.boxes, np.float64)[label[1:]], example.boxes) > 0.4).any(0)
        np.testing.assert_allclose(feats[0], feats[1:].sum(0) / max(1, (~overlapped).sum()), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sample["region_loc"][0], IMG_LOCATION)
        assert not label[0] and (sample["region_targets"][0] == 0).all()
        np.testing.assert_allclose(sample["region_targets"][1:], example.cls_prob, rtol=1e-6)
        is_zero = (feats[1:] == 0).all(1)
        assert not (is_zero & ~label[1:]).any()  # only selected regions are zeroed
        np.testing.assert_array_equal(sample["region_replaced"][1:], is_zero)
        np.testing.assert_array_equal(feats[1:][~is_zero], real[~is_zero])
        regions += len(real)
        regions_selected += label.sum()
        zeroed += is_zero.sum()

    def within(count, trials, p):  # 5 standard deviations of a binomial
        assert abs(count - trials * p) < 5 * np.sqrt(trials * p * (1 - p)) + 1, (count, trials, p)

    within(selected, words, 0.15)
    within(to_mask, selected, 0.8)
    vocab = collator.vocab_size
    within(kept, selected, 0.1 + 0.1 / vocab)  # kept, plus a random id that equals the original
    within(regions_selected, regions, 0.15)
    within(zeroed, regions_selected, 0.9)
    within(negatives, samples, 0.5)


def test_negative_captions_come_from_other_records(dataset):
    collator = _collator(dataset, seed=1, word_mask_prob=0.0, negative_prob=1.0)
    for index in range(20):
        ids = collator.sample(0, index)["input_ids"][1:-1]
        assert not np.array_equal(ids, dataset.token_ids[index][: len(ids)])


def test_sample_depends_only_on_seed_epoch_index(dataset):
    collator = _collator(dataset, seed=3)
    a = collator([(0, 5), (0, 9), (1, 5)])
    b = collator([(0, 9)])
    c = _collator(dataset, seed=3)([(1, 5), (0, 5)])
    lt = b["text_mask"][0].sum()
    torch.testing.assert_close(a["input_ids"][1, :lt], b["input_ids"][0, :lt])
    torch.testing.assert_close(a["region_feats"][2], c["region_feats"][0][: a["region_feats"].shape[1]])
    assert not torch.equal(a["mlm_labels"][0], a["mlm_labels"][2]) or not torch.equal(
        a["region_labels"][0], a["region_labels"][2])


def test_padding_packing_and_truncation(dataset):
    collator = _collator(dataset, seed=0, max_text_len=6, max_regions=5)
    samples = [collator.sample(0, i) for i in (3, 4, 11)]
    assert all(len(s["input_ids"]) <= 6 and len(s["region_feats"]) == 6 for s in samples)
    padded = pad(samples, pad_to_multiple_of=8)
    assert padded["input_ids"].shape[1] == 8 and padded["region_feats"].shape[1] == 8
    assert padded["text_mask"].sum() == sum(len(s["input_ids"]) for s in samples)
    assert (padded["mlm_labels"][~padded["text_mask"]] == -1).all()
    assert not padded["region_labels"][~padded["region_mask"]].any()
    packed = pack(samples)
    assert packed["cu_seqlens_text"].dtype == torch.int32
    assert packed["cu_seqlens_regions"].tolist() == [0, 6, 12, 18]
    assert packed["num_tokens"] == padded["num_tokens"]
    exact = pad(samples)
    for key, value in unpack(packed).items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, exact[key], rtol=0, atol=0)


def test_region_locations():
    loc = region_locations(np.array([[10, 20, 110, 70]]), image_h=100, image_w=200)
    np.testing.assert_allclose(loc, [[0.05, 0.2, 0.55, 0.7, 0.5 * 0.5]], rtol=1e-6)


# sampler ---------------------------------------------------------------------------------------------


def test_sampler_splits_global_batches_the_same_way_for_any_layout():
    def micro_batches(world, micro):
        out = []
        for step in range(5):
            for rank in range(world):
                sampler = GlobalBatchSampler(100, 16, micro, world_size=world, rank=rank, seed=4)
                out += [(mb.global_step, mb.chunk, tuple(mb.keys)) for mb in sampler.micro_batches(*sampler.position(step))]
        return sorted(out)

    single = micro_batches(1, 4)
    assert micro_batches(2, 4) == single and micro_batches(4, 4) == single
    assert [len(m[2]) for m in single] == [4] * 20


def test_sampler_epochs_resume_and_errors():
    sampler = GlobalBatchSampler(50, 8, 2, world_size=2, rank=1, seed=9)
    assert sampler.steps_per_epoch == 6 and sampler.grad_accum == 2
    full = list(sampler.iterate(0, 14))
    resumed = list(sampler.iterate(5, 14))
    assert [mb.keys for mb in full[10:]] == [mb.keys for mb in resumed]
    both_ranks = [k for r in range(2) for mb in GlobalBatchSampler(50, 8, 2, world_size=2, rank=r, seed=9).iterate(0, 6)
                  for k in mb.keys]
    assert len(set(both_ranks)) == 48 and {e for e, _ in both_ranks} == {0}
    assert full[-1].epoch == 2 and full[-1].step == 1
    with pytest.raises(ValueError, match="multiple of micro batch"):
        GlobalBatchSampler(50, 10, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8, 8)
    with pytest.raises(ValueError, match="seed=1"):
        sampler.check_resumable({"seed": 1})


def test_data_cli_synth_and_inspect(tmp_path, capsys):
    assert fastvl_main(["data", "synth", "--out", str(tmp_path), "--num-images", "12", "--feature-dim", "16"]) == 0
    assert fastvl_main(["data", "inspect", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["records"] == 12 and report["feature_dim"] == 16
    assert fastvl_main(["data", "inspect", str(tmp_path / "missing")]) == 2


def test_worker_processes_collate_the_same_batches(dataset):
    """Shards are re-mapped in each DataLoader worker (never pickled with their data); same batches."""
    import pickle

    from fastvl.train.loop import _Collate, _Identity, _MicroBatches

    assert len(pickle.dumps(dataset.shards[0])) < 2000
    sampler = GlobalBatchSampler(len(dataset), 8, 4, seed=5)
    collator = _collator(dataset, seed=5)

    def batches(workers):
        loader = torch.utils.data.DataLoader(_Identity(), batch_sampler=_MicroBatches(sampler, 2, 5),
                                             collate_fn=_Collate(collator), num_workers=workers)
        return [batch for _, batch in loader]  # (MicroBatch, its collated batch), as the Trainer reads them

    for a, b in zip(batches(0), batches(2), strict=True):
        assert a["keys"] == b["keys"]
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key


def test_convert_vilbert_lmdb_rows_with_trust_pickle(tmp_path, monkeypatch):
    """ViLBERT's ImageFeaturesH5Reader layout, read through a stand-in for the optional lmdb package."""
    import pickle
    import types

    rng = np.random.default_rng(4)
    images = _images(rng, [3, 2])
    rows = {b"keys": pickle.dumps([b"1000", b"1001"])}
    for image_id, (features, boxes, cls_prob) in images.items():
        rows[image_id.encode()] = pickle.dumps({
            "image_id": image_id, "image_h": 480, "image_w": 640, "num_boxes": len(features),
            "boxes": _b64(boxes), "features": _b64(features), "cls_prob": cls_prob})

    class Transaction:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def get(self, key):
            return rows.get(key)

    fake_lmdb = types.SimpleNamespace(open=lambda path, **_: types.SimpleNamespace(begin=lambda write: Transaction()))
    monkeypatch.setitem(sys.modules, "lmdb", fake_lmdb)
    read = list(convert.read_vilbert_lmdb(str(tmp_path), trust_pickle=True))
    assert [r["image_id"] for r in read] == ["1000", "1001"]
    features, boxes, cls_prob = images["1001"]
    np.testing.assert_array_equal(read[1]["features"], features)
    np.testing.assert_allclose(read[1]["boxes"], boxes, rtol=1e-6)
    np.testing.assert_array_equal(read[1]["cls_prob"], cls_prob)
    index = convert.convert(iter(read), {"1001": ["two birds"]}, str(tmp_path / "out"))
    assert index["conversion"] == {"images": 2, "records": 1, "no_caption": 1, "zero_regions": 0,
                                   "caption_without_image": 0}
    del rows[b"1001"]
    with pytest.raises(DataError, match="listed in 'keys' but missing"):
        list(convert.read_vilbert_lmdb(str(tmp_path), trust_pickle=True))


def test_vlbert_whole_word_masking_and_regions(tmp_path):
    """VL-BERT's rules: a word's pieces are masked together (15% of words), 15% of real regions
    labelled with unchanged features, region 0 the whole image, no caption swapping."""
    from fastvl.data.collate import VLBERTCollator
    from fastvl.data.tokenizer import closed_vocab

    rng = np.random.default_rng(6)
    captions = ["an unbelievably colourful kaleidoscope", "two extraordinarily photogenic hippopotamuses"] * 20
    records = [ImageRecord(f"r{i}", c, rng.normal(size=(12, 8)).astype(np.float32),
                           np.tile([[0, 0, 10, 10]], (12, 1)).astype(np.float32), np.full((12, 3), 1 / 3), 20, 20)
               for i, c in enumerate(captions)]
    write_dataset(str(tmp_path), records, feature_dim=8, num_classes=3)
    closed_vocab(["a b c d e f g h i j k l m n o p q r s t u v w x y z an two"], str(tmp_path / "vocab.txt"))
    dataset = RegionDataset(str(tmp_path), load_tokenizer(str(tmp_path / "vocab.txt")))
    collator = VLBERTCollator(dataset, special_ids(dataset.tokenizer), dataset.tokenizer.get_vocab_size(), seed=1)
    assert collator.continuation[dataset.token_ids[0]].sum() > 10  # long words are many pieces
    words = selected_words = regions = selected_regions = replaced_regions = 0
    for index in range(2000):
        sample = collator.sample(index // len(dataset), index % len(dataset))
        assert sample["is_next"] == 0
        pieces = dataset.token_ids[index % len(dataset)][: collator.max_text_len - 2]
        original = np.concatenate([[collator.special.cls], pieces, [collator.special.sep]])
        starts = ~collator.continuation[original]
        word_of_piece = np.cumsum(starts) - 1
        labelled = sample["mlm_labels"] >= 0
        for w in range(word_of_piece[-1] + 1):
            in_word = labelled[word_of_piece == w]
            assert in_word.all() or not in_word.any()  # whole words only
        assert not labelled[0] and not labelled[-1]
        np.testing.assert_array_equal(sample["mlm_labels"][labelled], original[labelled])
        words += word_of_piece[-1] - 1
        selected_words += len({w for w, lab in zip(word_of_piece, labelled) if lab})
        example = dataset[index % len(dataset)]
        np.testing.assert_array_equal(sample["region_feats"][1:], np.asarray(example.features, np.float32))
        assert not sample["region_labels"][0]
        assert not (sample["region_replaced"] & ~sample["region_labels"]).any()  # only masked ones are replaced
        regions += len(sample["region_labels"]) - 1
        selected_regions += sample["region_labels"].sum()
        replaced_regions += sample["region_replaced"].sum()
    assert abs(selected_words / words - 0.15) < 0.02 and abs(selected_regions / regions - 0.15) < 0.015
    assert abs(replaced_regions / selected_regions - 0.9) < 0.02  # VL-BERT keeps 10% of the masked regions


def test_objective_settings_follow_vilbert_multi_task(dataset):
    """--objective 1: misaligned pairs carry no word / region labels (inputs masked all the same);
    2: no misaligned pair and no is_next; 0: labels on every pair."""
    keys = [(0, i) for i in range(40)]
    plain, one, two = (_collator(dataset, seed=5, objective=o)(keys) for o in (0, 1, 2))
    misaligned = plain["is_next"] == 1
    assert misaligned.any() and (plain["mlm_labels"][misaligned] >= 0).any()
    torch.testing.assert_close(one["is_next"], plain["is_next"])
    torch.testing.assert_close(one["input_ids"], plain["input_ids"])  # the same inputs, masked as before
    torch.testing.assert_close(one["region_feats"], plain["region_feats"])
    assert (one["mlm_labels"][misaligned] == -1).all() and not one["region_labels"][misaligned].any()
    torch.testing.assert_close(one["mlm_labels"][~misaligned], plain["mlm_labels"][~misaligned])
    torch.testing.assert_close(one["region_labels"][~misaligned], plain["region_labels"][~misaligned])
    assert "is_next" not in two
    for row, (_, index) in enumerate(keys):  # every caption is the image's own
        length = len(dataset.token_ids[index][:34])
        assert two["text_mask"][row].sum() == length + 2
    with pytest.raises(ValueError, match="objective must be one of"):
        _collator(dataset, objective=3)
