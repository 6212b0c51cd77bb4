"""``fastvl data convert --lmdb``: ViLBERT's msgpack LMDBs (pretraining) convert safely; pickled ones
(downstream tasks) only behind --trust-pickle, detected before anything is unpickled."""

import os
import pickle
import sys

import numpy as np
import pytest

from fastvl.cli import main as fastvl_main
from fastvl.data import convert
from fastvl.data.format import DataError, RegionDataset
from fastvl.data.tokenizer import closed_vocab, load_tokenizer

lmdb = pytest.importorskip("lmdb")
msgpack = pytest.importorskip("msgpack")

D, C = 16, 6  # feature width and detector classes, small for speed


def _nd(value):
    """msgpack ``default`` in msgpack-numpy's layout (written here, not imported)."""
    if isinstance(value, np.ndarray):
        return {b"nd": True, b"type": value.dtype.str, b"kind": b"", b"shape": list(value.shape),
                b"data": value.tobytes()}
    if isinstance(value, np.generic):
        return {b"nd": False, b"type": value.dtype.str, b"data": value.tobytes()}
    raise TypeError(f"cannot encode {type(value)}")


def _packb(value) -> bytes:
    return msgpack.packb(value, default=_nd, use_bin_type=True)


def _write_lmdb(path, entries: dict) -> str:
    env = lmdb.open(str(path), map_size=1 << 26, subdir=True)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()
    return str(path)


def _rows(seed, counts, first_id=0):
    """ViLBERT's pretraining rows: [features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption]."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(counts):
        features = rng.standard_normal((n, D)).astype(np.float32)
        cls_prob = rng.dirichlet(np.ones(C), n).astype(np.float32)
        x1y1 = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(10, 200, (n, 2))], 1).astype(np.float32)
        rows.append([features, cls_prob, boxes, np.int64(n), 480, 640, f"cc{first_id + i}",
                     f"a photo of thing {first_id + i}"])
    return rows


def _tensorpack_lmdb(path, rows, with_key_list=True):
    """tensorpack's LMDBSerializer layout: rows under b'00000000'..., the key list under __keys__, __len__."""
    entries = {f"{i:08d}".encode(): _packb(row) for i, row in enumerate(rows)}
    if with_key_list:
        entries[b"__keys__"] = _packb(sorted(entries))
    entries[b"__len__"] = _packb(len(rows))
    return _write_lmdb(path, entries)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("pickle.loads was called")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def test_msgpack_lmdb_converts_without_trust_pickle(tmp_path, no_unpickling, capsys):
    rows_a, rows_b = _rows(0, [3, 5]), _rows(1, [2], first_id=2)
    keyed = _tensorpack_lmdb(tmp_path / "a.lmdb", rows_a)
    unkeyed = _tensorpack_lmdb(tmp_path / "b.lmdb", rows_b, with_key_list=False)  # keys from the cursor
    vocab = closed_vocab([row[7] for row in rows_a + rows_b], str(tmp_path / "vocab.txt"))
    out = tmp_path / "out"
    code = fastvl_main(["data", "convert", keyed, unkeyed, "--lmdb", "--out", str(out), "--vocab", vocab])
    assert code == 0, capsys.readouterr().out
    assert '"records": 3' in capsys.readouterr().out
    dataset = RegionDataset(str(out), load_tokenizer(str(out / "vocab.txt")))
    assert dataset.image_ids == ["cc0", "cc1", "cc2"]
    assert (dataset.feature_dim, dataset.num_classes) == (D, C)
    assert [caption for _, caption in dataset.shards[0].captions()] == [row[7] for row in rows_a + rows_b]
    for got, row in zip((dataset[i] for i in range(3)), rows_a + rows_b):
        features, cls_prob, boxes = row[:3]
        assert got.features.shape == (int(row[3]), D) and (got.image_h, got.image_w) == (480, 640)
        np.testing.assert_allclose(got.features, features, rtol=1e-3, atol=1e-3)  # stored as float16
        np.testing.assert_array_equal(got.boxes, boxes)
        np.testing.assert_allclose(got.cls_prob, cls_prob, atol=1e-3)
        assert got.token_ids.tolist() == dataset.tokenizer.encode(row[7], add_special_tokens=False).ids


def test_captions_file_overrides_row_captions(tmp_path, no_unpickling):
    path = _tensorpack_lmdb(tmp_path / "a.lmdb", _rows(0, [2, 1]))
    images = list(convert.read_vilbert_lmdb(path))
    assert [(i["image_id"], i["caption"]) for i in images] == [("cc0", "a photo of thing 0"),
                                                             ("cc1", "a photo of thing 1")]
    index = convert.convert(iter(images), {"cc1": ["one", "two"]}, str(tmp_path / "out"))
    assert index["conversion"]["records"] == 3  # cc0 keeps its own caption, cc1 gets the file's two


@pytest.mark.parametrize("nd_map, message", [
    ({b"kind": b"O", b"type": "|O", b"data": pickle.dumps([1.0])}, "object-dtype ndarray"),
    ({b"type": "|O", b"data": b"\0" * 8}, "not numeric"),
    ({b"type": "<U4", b"data": b"\0" * 16}, "not numeric"),
    ({b"kind": b"V", b"type": [["a", "<f4"]], b"data": b"\0" * 4}, "structured"),
    ({b"type": "<f4", b"data": b"\0" * 7}, "truncated"),
])
def test_unsafe_or_broken_nd_maps_are_refused(tmp_path, no_unpickling, nd_map, message):
    row = _rows(0, [1])[0]
    bad = {b"nd": True, b"kind": b"", b"shape": [1, 1], **nd_map}
    entries = {b"00000000": msgpack.packb([bad, *row[1:]], default=_nd, use_bin_type=True)}
    path = _write_lmdb(tmp_path / "bad.lmdb", entries)
    with pytest.raises(DataError, match=rf"bad\.lmdb \(key '00000000'\): .*{message}"):
        list(convert.read_vilbert_lmdb(path))


def _pickled_lmdb(path):
    """ViLBERT's ImageFeaturesH5Reader layout: pickled b'keys' list and dicts with base64 / array fields."""
    rows = _rows(3, [2, 3])
    entries = {b"keys": pickle.dumps([b"1000", b"1001"])}
    for image_id, (features, cls_prob, boxes, n, h, w, *_) in zip(("1000", "1001"), rows):
        entries[image_id.encode()] = pickle.dumps({"image_id": image_id, "image_h": h, "image_w": w,
                                                   "num_boxes": int(n), "features": features, "boxes": boxes,
                                                   "cls_prob": cls_prob})
    return _write_lmdb(path, entries), rows


def test_pickled_lmdb_needs_trust_pickle_and_is_not_unpickled_without(tmp_path, monkeypatch, capsys):
    path, rows = _pickled_lmdb(tmp_path / "task.lmdb")
    captions = tmp_path / "captions.tsv"
    captions.write_text("1000\ttwo dogs\n1001\ta red car\n")
    out = tmp_path / "out"
    argv = ["data", "convert", path, "--lmdb", "--captions", str(captions), "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(pickle, "loads", lambda *_: pytest.fail("unpickled without --trust-pickle"))
        with pytest.raises(DataError, match=r"task\.lmdb \(key 'keys'\): the value is a Python pickle \(protocol "
                                            r"\d header b'\\x80'\).*nothing was unpickled.*--trust-pickle"):
            list(convert.read_vilbert_lmdb(path))
        assert fastvl_main(argv) == 2
        assert "--trust-pickle" in capsys.readouterr().out and not out.exists()
    assert fastvl_main([*argv, "--trust-pickle"]) == 0
    images = list(convert.read_vilbert_lmdb(path, trust_pickle=True))
    assert [i["image_id"] for i in images] == ["1000", "1001"] and "caption" not in images[0]
    np.testing.assert_array_equal(images[1]["features"], rows[1][0])
    np.testing.assert_array_equal(images[1]["boxes"], rows[1][2])


def test_corrupt_rows_name_file_and_key(tmp_path, no_unpickling):
    rows = _rows(0, [2, 2, 2])
    entries = {f"{i:08d}".encode(): _packb(row) for i, row in enumerate(rows)}
    entries[b"__keys__"] = _packb(sorted(entries))
    entries[b"00000001"] = entries[b"00000001"][:-40]  # truncated
    path = _write_lmdb(tmp_path / "c.lmdb", entries)
    with pytest.raises(DataError, match=r"c\.lmdb \(key '00000001'\): not a valid msgpack value: corrupt or truncated"):
        list(convert.read_vilbert_lmdb(path))

    def check(row, pattern, name):
        entries = {b"00000000": _packb(row)}
        with pytest.raises(DataError, match=rf"{name}\.lmdb \(key '00000000'\): {pattern}"):
            list(convert.read_vilbert_lmdb(_write_lmdb(tmp_path / f"{name}.lmdb", entries)))

    row = rows[0]
    check(row[:7], "row has 7 fields, expected 8", "short")
    check([row[0], row[1], row[2], np.int64(3), *row[4:]], r"field 'features' has shape \[2, 16\], expected "
          r"\[3, D\]", "count")
    check([row[0], row[1], row[2][:, :3], *row[3:]], r"field 'boxes' has shape \[2, 3\]", "boxes")
    check([*row[:3], 101, *row[4:]], r"num_boxes 101 outside \[0, 100\]", "many")
    check([*row[:4], 0, *row[5:]], "image size 0 x 640", "size")
    entries = {b"__keys__": _packb([b"00000000", b"00000009"]), b"00000000": _packb(row)}
    with pytest.raises(DataError, match=r"k\.lmdb \(key '00000009'\): listed in '__keys__' but missing"):
        list(convert.read_vilbert_lmdb(_write_lmdb(tmp_path / "k.lmdb", entries)))
    with pytest.raises(DataError, match=r"cannot open as an LMDB"):
        list(convert.read_vilbert_lmdb(str(tmp_path / "nothing")))


def test_zero_region_rows_are_counted_and_left_out(tmp_path, no_unpickling):
    rows = _rows(0, [2, 1])
    rows[1] = [np.zeros((0, D), np.float32), np.zeros((0, C), np.float32), np.zeros((0, 4), np.float32), 0,
               480, 640, "cc1", "empty"]
    path = _tensorpack_lmdb(tmp_path / "z.lmdb", rows)
    index = convert.convert(convert.read_vilbert_lmdb(path), None, str(tmp_path / "out"))
    assert index["conversion"]["zero_regions"] == 1 and index["conversion"]["records"] == 1


def test_missing_optional_packages_are_named(tmp_path, monkeypatch):
    path = _tensorpack_lmdb(tmp_path / "a.lmdb", _rows(0, [1]))
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(DataError, match=r"'msgpack' package \(pip install lmdb msgpack\)"):
        list(convert.read_vilbert_lmdb(path))
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(DataError, match=r"'lmdb' package \(pip install lmdb msgpack\)"):
        list(convert.read_vilbert_lmdb(path))


def test_tsv_still_needs_captions(tmp_path, capsys):
    (tmp_path / "f.tsv").write_text("")
    assert fastvl_main(["data", "convert", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "out")]) == 2
    assert "--captions is required for TSV" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "f.tsv")
