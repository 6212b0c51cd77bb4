"""fastvl's on-disk region-feature format: writing shards and memory-mapping them back.

The layout is documented in :mod:`fastvl.data` (the package docstring). Nothing here unpickles:
arrays load with ``np.load(..., allow_pickle=False, mmap_mode="r")`` and captions are JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

FORMAT_NAME = "fastvl-regions"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VOCAB_FILE = "vocab.txt"
CAPTIONS_FILE = "captions.jsonl"
PIXELS_FILE = "pixels.npy"  # optional: uint8 [n, H, W, 3] when index.json has "pixels": [H, W]

# array name -> (dtype it is written with, rank, description of its shape)
ARRAYS = {
    "features": (np.float16, 2, "[R, D]"),
    "boxes": (np.float32, 2, "[R, 4]"),
    "cls_prob": (np.float16, 2, "[R, C]"),
    "num_regions": (np.int32, 1, "[n]"),
    "image_size": (np.int32, 2, "[n, 2]"),
}

log = logging.getLogger("fastvl.data")


class DataError(ValueError):
    """A dataset file is missing, corrupt, truncated or inconsistent; the message names file and record."""


@dataclasses.dataclass
class ImageRecord:
    """One image-caption pair as it is written to a shard.

    features ``[N, D]`` (BUTD pooled RoI features), boxes ``[N, 4]`` pixel ``x1, y1, x2, y2``,
    cls_prob ``[N, C]`` the detector's class distribution, image_h / image_w in pixels, caption text;
    optionally the image itself, ``pixels`` uint8 ``[H, W, 3]`` (RGB) at the dataset's fixed size.
    """

    image_id: str
    caption: str
    features: np.ndarray
    boxes: np.ndarray
    cls_prob: np.ndarray
    image_h: int
    image_w: int
    pixels: np.ndarray | None = None


@dataclasses.dataclass
class Example:
    """One record as the dataset serves it (arrays are read-only memory-mapped views)."""

    index: int
    image_id: str
    token_ids: np.ndarray  # int32 word pieces of the caption, without [CLS]/[SEP]
    features: np.ndarray
    boxes: np.ndarray
    cls_prob: np.ndarray
    image_h: int
    image_w: int
    pixels: np.ndarray | None = None  # uint8 [H, W, 3] when the dataset has pixels


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: features and cls_prob are stored in float16
CLS_PROB_TOLERANCE = 1e-2  # |row sum - 1| allowed (detector softmax in float32, float16 storage)


def region_problem(features: np.ndarray, boxes: np.ndarray, cls_prob: np.ndarray) -> str | None:
    """What makes one image's regions unfit to train on, or None: non-finite features or boxes,
    features beyond float16's range (they would be stored as inf), ``cls_prob`` rows that are not
    probability distributions (negative entries, logits, rows not summing to 1)."""
    features = np.asarray(features, dtype=np.float32)
    for name, array in (("features", features), ("boxes", np.asarray(boxes, dtype=np.float32)),
                        ("cls_prob", np.asarray(cls_prob, dtype=np.float32))):
        bad = ~np.isfinite(array)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            return f"{name} holds NaN or Inf (region {row})"
    if features.size and np.abs(features).max() > FLOAT16_MAX:
        row = int(np.argwhere(np.abs(features) > FLOAT16_MAX)[0][0])
        return (f"features reach {float(np.abs(features).max()):.4g} (region {row}), beyond float16's range "
                f"({FLOAT16_MAX:g}) in which they are stored: they would become inf. Scale the features down")
    probabilities = np.asarray(cls_prob, dtype=np.float64)
    if probabilities.size:
        sums = probabilities.sum(axis=1)
        bad_rows = np.flatnonzero((probabilities < -1e-6).any(axis=1) | (np.abs(sums - 1) > CLS_PROB_TOLERANCE))
        if bad_rows.size:
            row = int(bad_rows[0])
            return (f"cls_prob row {row} is not a probability distribution (min {probabilities[row].min():.4g}, "
                    f"sum {sums[row]:.4g}; {bad_rows.size} of {len(sums)} rows): pass the detector's softmax "
                    "output, not logits or scores")
    return None


class ShardWriter:
    """Writes image records into ``out_dir`` as shards of ``shard_size`` images plus ``index.json``.

    Use as a context manager (or call :meth:`close`); the index is written last, so a directory
    without ``index.json`` is an unfinished conversion. ``pixels=(H, W)``: every record carries its
    image as uint8 ``[H, W, 3]``, written to ``pixels.npy`` per shard.
    """

    def __init__(self, out_dir: str, *, feature_dim: int, num_classes: int, shard_size: int = 1024,
                 source: str = "", pixels: tuple[int, int] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if pixels is not None and (len(pixels) != 2 or min(pixels) < 1):
            raise ValueError(f"pixels must be (height, width) >= 1, got {pixels}")
        self.pixels = None if pixels is None else (int(pixels[0]), int(pixels[1]))
        self.out_dir = out_dir
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.shard_size = shard_size
        self.source = source
        self.shards: list[dict] = []
        self._pending: list[ImageRecord] = []
        os.makedirs(out_dir, exist_ok=True)
        stale = os.path.join(out_dir, INDEX_FILE)
        if os.path.exists(stale):
            os.remove(stale)

    def add(self, record: ImageRecord) -> None:
        n = record.features.shape[0]
        where = f"record {record.image_id!r}"
        if record.features.ndim != 2 or record.features.shape[1] != self.feature_dim:
            raise DataError(f"{where}: features must be [N, {self.feature_dim}], got {list(record.features.shape)}")
        if record.boxes.shape != (n, 4):
            raise DataError(f"{where}: boxes must be [N, 4] = [{n}, 4], got {list(record.boxes.shape)}")
        if record.cls_prob.shape != (n, self.num_classes):
            raise DataError(f"{where}: cls_prob must be [N, C] = [{n}, {self.num_classes}], "
                            f"got {list(record.cls_prob.shape)}")
        if not isinstance(record.caption, str):
            raise DataError(f"{where}: caption is {type(record.caption).__name__} {record.caption!r}, expected text")
        if not (isinstance(record.image_h, (int, np.integer)) and isinstance(record.image_w, (int, np.integer))
                and record.image_h > 0 and record.image_w > 0):
            raise DataError(f"{where}: image size {record.image_h!r} x {record.image_w!r} is not positive integers")
        problem = region_problem(record.features, record.boxes, record.cls_prob)
        if problem:
            raise DataError(f"{where}: {problem}")
        if self.pixels is None and record.pixels is not None:
            raise DataError(f"{where}: has pixels, but the writer was opened without pixels=(H, W)")
        if self.pixels is not None:
            expected = [*self.pixels, 3]
            if record.pixels is None or record.pixels.dtype != np.uint8 or list(record.pixels.shape) != expected:
                got = "none" if record.pixels is None else f"{record.pixels.dtype} {list(record.pixels.shape)}"
                raise DataError(f"{where}: pixels must be uint8 {expected} (RGB at the dataset's size), got {got}")
        self._pending.append(record)
        if len(self._pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.shards):05d}"
        shard_dir = os.path.join(self.out_dir, name)
        os.makedirs(shard_dir, exist_ok=True)
        records, self._pending = self._pending, []
        arrays = {
            "features": np.concatenate([r.features for r in records]),
            "boxes": np.concatenate([r.boxes for r in records]),
            "cls_prob": np.concatenate([r.cls_prob for r in records]),
            "num_regions": np.array([r.features.shape[0] for r in records]),
            "image_size": np.array([[r.image_h, r.image_w] for r in records]).reshape(-1, 2),
        }
        for key, (dtype, _, _) in ARRAYS.items():
            np.save(os.path.join(shard_dir, f"{key}.npy"), np.ascontiguousarray(arrays[key], dtype=dtype))
        if self.pixels is not None:
            np.save(os.path.join(shard_dir, PIXELS_FILE), np.stack([r.pixels for r in records]))
        with open(os.path.join(shard_dir, CAPTIONS_FILE), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"image_id": str(r.image_id), "caption": r.caption}, ensure_ascii=False) + "\n")
        self.shards.append({"name": name, "num_images": len(records), "num_regions": int(arrays["num_regions"].sum())})

    def close(self) -> dict:
        self._flush()
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "feature_dim": self.feature_dim,
                 "num_classes": self.num_classes, "num_images": sum(s["num_images"] for s in self.shards),
                 "source": self.source, "shards": self.shards}
        if self.pixels is not None:
            index["pixels"] = list(self.pixels)
        with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def write_dataset(out_dir: str, records: Iterable[ImageRecord], *, feature_dim: int, num_classes: int,
                  shard_size: int = 1024, source: str = "", pixels: tuple[int, int] | None = None) -> dict:
    with ShardWriter(out_dir, feature_dim=feature_dim, num_classes=num_classes, shard_size=shard_size,
                     source=source, pixels=pixels) as writer:
        for record in records:
            writer.add(record)
    return writer.close()


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {data_dir!r} is not a fastvl dataset (make one with "
                        "`fastvl data synth` or `fastvl data convert`)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON index ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: 'format' must be {FORMAT_NAME!r}")
    if index.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {index.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("feature_dim", "num_classes"):
        if not (isinstance(index.get(key), int) and index[key] >= 1):
            raise DataError(f"{path}: {key!r} must be a positive integer, got {index.get(key)!r}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: 'shards' must be a list of {{name, num_images, num_regions}}, got "
                        f"{type(shards).__name__}")
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise DataError(f"{path}: shards[{number}] must be an object, got {type(shard).__name__}")
        name = shard.get("name")
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise DataError(f"{path}: shards[{number}] name {name!r} must be a folder name inside the dataset "
                            "(no path separators or '..')")
        for key in ("num_images", "num_regions"):
            if not (isinstance(shard.get(key), int) and shard[key] >= 0):
                raise DataError(f"{path}: shards[{number}] ({name}) {key!r} must be a non-negative integer, "
                                f"got {shard.get(key)!r}")
    pixels = index.get("pixels")
    if pixels is not None and not (isinstance(pixels, list) and len(pixels) == 2
                                   and all(isinstance(v, int) and v >= 1 for v in pixels)):
        raise DataError(f"{path}: 'pixels' must be [height, width] (positive integers), got {pixels!r}")
    return index


class _Shard:
    """One shard's arrays, memory-mapped on first use in each process (never pickled with the data)."""

    def __init__(self, shard_dir: str, entry: dict, feature_dim: int, num_classes: int,
                 pixels: tuple[int, int] | None = None):
        self.dir = shard_dir
        self.num_images = int(entry["num_images"])
        self.num_regions_total = int(entry["num_regions"])
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.pixels = pixels
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # DataLoader workers map the files themselves
        return state

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._open()
        return self._arrays

    def _open(self) -> dict[str, np.ndarray]:
        arrays = {}
        for key, (_, ndim, shape) in ARRAYS.items():
            path = os.path.join(self.dir, f"{key}.npy")
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise DataError(f"{path}: corrupt or truncated .npy file ({error})") from error
            if array.ndim != ndim or array.dtype.kind not in "fiu":
                raise DataError(f"{path}: expected a numeric array {shape}, got {array.dtype} {list(array.shape)}")
            arrays[key] = array
        n, total = self.num_images, self.num_regions_total
        expected = {"features": (total, self.feature_dim), "boxes": (total, 4), "cls_prob": (total, self.num_classes),
                    "num_regions": (n,), "image_size": (n, 2)}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise DataError(f"{os.path.join(self.dir, key + '.npy')}: shape {list(arrays[key].shape)} does not "
                                f"match the index ({list(shape)} = {ARRAYS[key][2]})")
        counts = np.asarray(arrays["num_regions"], dtype=np.int64)
        if (counts < 0).any() or int(counts.sum()) != total:
            raise DataError(f"{os.path.join(self.dir, 'num_regions.npy')}: region counts sum to {int(counts.sum())}, "
                            f"the shard has {total} regions")
        arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)])
        if self.pixels is not None:
            arrays["pixels"] = self._open_pixels()
        return arrays

    def _open_pixels(self) -> np.ndarray:
        path = os.path.join(self.dir, PIXELS_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (index.json says the set has pixels)")
        expected = (self.num_images, *self.pixels, 3)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"{path}: corrupt or truncated .npy file ({error}){self._first_missing(path)}") from error
        if array.dtype != np.uint8 or array.shape != expected:
            raise DataError(f"{path}: expected uint8 {list(expected)} = [n, H, W, 3] from the index, got "
                            f"{array.dtype} {list(array.shape)}")
        return array

    def _first_missing(self, path: str) -> str:
        """For a truncated pixel file with a readable header: the first record whose image is cut off."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                fmt = np.lib.format
                header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = header(f)
                data_start = f.tell()
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            complete = (os.path.getsize(path) - data_start) // max(row_bytes, 1)
            if not 0 <= complete < min(shape[0], self.num_images):
                return ""
            image_id = self.captions()[complete][0]
        except (ValueError, OSError, EOFError, DataError, IndexError, TypeError):
            return ""
        return (f"; it holds {complete} of {shape[0]} images: record {complete} (line {complete + 1} of "
                f"{CAPTIONS_FILE}, image_id {image_id!r}) onwards is cut off")

    def captions(self) -> list[tuple[str, str]]:
        path = os.path.join(self.dir, CAPTIONS_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing")
        out = []
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not UTF-8 text ({error.reason} at byte {error.start} "
                                    "of the line)") from None
                try:
                    row = json.loads(line)
                    image_id, caption = str(row["image_id"]), row["caption"]
                    if not isinstance(caption, str):
                        raise TypeError("caption is not a string")
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataError(f"{path}:{line_number}: bad caption record ({error}); expected "
                                    '{"image_id": ..., "caption": "..."}') from error
                out.append((image_id, caption))
        if len(out) != self.num_images:
            raise DataError(f"{path}: {len(out)} captions for {self.num_images} images (truncated?)")
        return out


class RegionDataset:
    """The records of a fastvl dataset directory, memory-mapped.

    Captions are tokenised once at open (``tokenizer`` from :mod:`fastvl.data.tokenizer`). Records that
    cannot train are skipped and counted in ``self.skipped`` (``{"zero_regions": k, "empty_caption": k}``,
    logged once): an image with 0 regions or a caption with no word pieces. ``strict=True`` turns
    a skip into a :class:`DataError` naming the file and the record. Corrupt, truncated or
    inconsistent files always raise :class:`DataError`.
    """

    def __init__(self, data_dir: str, tokenizer, *, strict: bool = False):
        self.dir = data_dir
        self.index = read_index(data_dir)
        self.feature_dim = int(self.index["feature_dim"])
        self.num_classes = int(self.index["num_classes"])
        pixels = self.index.get("pixels")
        self.pixel_size: tuple[int, int] | None = None if pixels is None else (pixels[0], pixels[1])  # (H, W)
        self.tokenizer = tokenizer
        self.shards = [_Shard(os.path.join(data_dir, e["name"]), e, self.feature_dim, self.num_classes,
                              self.pixel_size) for e in self.index["shards"]]
        self.skipped = {"zero_regions": 0, "empty_caption": 0}
        self._where: list[tuple[int, int]] = []  # dataset index -> (shard, row)
        self.image_ids: list[str] = []
        self.token_ids: list[np.ndarray] = []
        examples_of_skips = []
        for shard_number, shard in enumerate(self.shards):
            counts = shard.arrays()["num_regions"]
            captions = shard.captions()
            encoded = tokenizer.encode_batch([c for _, c in captions], add_special_tokens=False)
            for row, ((image_id, _), encoding) in enumerate(zip(captions, encoded)):
                reason = "zero_regions" if counts[row] == 0 else "empty_caption" if not encoding.ids else None
                if reason is not None:
                    where = f"{os.path.join(shard.dir, CAPTIONS_FILE)}:{row + 1} (image_id {image_id!r})"
                    if strict:
                        raise DataError(f"{where}: " + ("image has 0 regions" if reason == "zero_regions"
                                                       else "caption has no word pieces"))
                    self.skipped[reason] += 1
                    if len(examples_of_skips) < 3:
                        examples_of_skips.append(f"{where} [{reason}]")
                    continue
                self._where.append((shard_number, row))
                self.image_ids.append(image_id)
                self.token_ids.append(np.asarray(encoding.ids, dtype=np.int32))
        if not self._where:
            raise DataError(f"{data_dir}: no usable records (skipped: {self.skipped})")
        if sum(self.skipped.values()):
            log.warning("fastvl.data: skipped %s records of %s (%s), e.g. %s", sum(self.skipped.values()), data_dir,
                        ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v), "; ".join(examples_of_skips))

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: int) -> Example:
        shard_number, row = self._where[index]
        arrays = self.shards[shard_number].arrays()
        start, stop = int(arrays["offsets"][row]), int(arrays["offsets"][row + 1])
        image_h, image_w = (int(v) for v in arrays["image_size"][row])
        return Example(index=index, image_id=self.image_ids[index], token_ids=self.token_ids[index],
                       features=arrays["features"][start:stop], boxes=arrays["boxes"][start:stop],
                       cls_prob=arrays["cls_prob"][start:stop], image_h=image_h, image_w=image_w,
                       pixels=arrays["pixels"][row] if self.pixel_size is not None else None)

    def caption_texts(self) -> list[str]:
        """The raw caption of every usable record, in dataset order (read again from the shards), for
        collators that tokenise captions their own way."""
        texts = [shard.captions() for shard in self.shards]
        return [texts[shard][row][1] for shard, row in self._where]

    def require_pixels(self, who: str) -> tuple[int, int]:
        """``(H, W)`` of the set's images; :class:`DataError` naming ``index.json`` if it has none."""
        if self.pixel_size is None:
            raise DataError(f"{os.path.join(self.dir, INDEX_FILE)}: this dataset has no images (no 'pixels' entry); "
                            f"{who} trains on image pixels. Write a set with them: `fastvl data synth --image-size N`")
        return self.pixel_size

    def find_bad_records(self, limit: int = 20) -> tuple[int, list[str]]:
        """Scans every region of every shard (skipped records too) for what training cannot use:
        NaN/Inf features or boxes (in float16, also features that overflowed its range), ``cls_prob`` rows
        that are not distributions. Returns the number of bad records and up to ``limit`` of them, each
        named by shard, caption line and image_id."""
        count, found = 0, []
        for shard in self.shards:
            arrays, captions = shard.arrays(), shard.captions()
            offsets = arrays["offsets"]
            bad = np.zeros(len(arrays["features"]), dtype=np.int8)  # per region: 0 fine, else a reason below
            reasons = ("", "features NaN/Inf", "boxes NaN/Inf", "cls_prob not a distribution")
            for start in range(0, len(bad), 65536):
                stop = min(start + 65536, len(bad))
                probabilities = np.asarray(arrays["cls_prob"][start:stop], dtype=np.float32)
                not_distribution = ((probabilities < 0).any(axis=1) | ~np.isfinite(probabilities).all(axis=1)
                                    | (np.abs(probabilities.sum(axis=1) - 1) > CLS_PROB_TOLERANCE))
                chunk = bad[start:stop]
                chunk[not_distribution] = 3
                chunk[~np.isfinite(np.asarray(arrays["boxes"][start:stop])).all(axis=1)] = 2
                chunk[~np.isfinite(np.asarray(arrays["features"][start:stop])).all(axis=1)] = 1
            regions = np.flatnonzero(bad)
            rows = np.unique(np.searchsorted(offsets, regions, side="right") - 1)
            count += len(rows)
            for row in rows[: max(0, limit - len(found))]:
                first = int(regions[np.searchsorted(regions, offsets[row])])
                found.append(f"{os.path.join(shard.dir, CAPTIONS_FILE)}:{row + 1} (image_id {captions[row][0]!r}): "
                             f"{reasons[bad[first]]} (region {first - int(offsets[row])})")
        return count, found

    def caption_lengths(self) -> Sequence[int]:
        return [len(t) for t in self.token_ids]
