"""``fastvl data convert``: bottom-up-attention TSV files and original ViLBERT LMDB files -> fastvl shards.

**TSV** (the bottom-up-attention ``generate_tsv.py`` layout): one image per line, tab-separated
fields ``image_id, image_w, image_h, num_boxes, boxes, features`` and optionally ``cls_prob``, or
``objects_id, objects_conf`` (LXMERT's variant). ``boxes`` / ``features`` / ``cls_prob`` are base64 of
little-endian float32 arrays ``[num_boxes, 4]`` (pixels x1 y1 x2 y2) / ``[num_boxes, D]`` /
``[num_boxes, C]``; ``objects_id`` int64, ``objects_conf`` float32 ``[num_boxes]``. Name the columns
with ``--fields`` when a file has no header row (default: the six above, plus ``cls_prob`` when a line
has seven fields). Without ``cls_prob``, the class distribution is rebuilt from the top class and its
confidence (``conf`` on the class, the rest spread evenly), which needs ``--num-classes``.

**LMDB** (ViLBERT's feature files; needs the optional ``lmdb`` and ``msgpack`` packages). The serialisation
is detected from each value's first bytes:

- *msgpack* — the Conceptual Captions pretraining files, written by tensorpack's ``LMDBSerializer``: rows
  under ``b"00000000"``, ``b"00000001"``, ..., the key list under ``__keys__`` (and ``__len__``); each row
  a list ``[features (N, D), cls_prob (N, C), boxes (N, 4) pixels, num_boxes, image_h, image_w, image_id,
  caption]``, arrays in msgpack-numpy's map ``{b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [...],
  b"data": raw bytes}``. Decoding rebuilds numeric (bool/int/float) arrays only and refuses anything
  else (object arrays, whose data msgpack-numpy pickles; structured or text dtypes; extension types), so
  these files convert without ``--trust-pickle``. Without ``__keys__`` every key not starting with
  ``__`` is a row. The row's caption is used unless ``--captions`` gives the image's captions.
- *pickle* — the downstream-task files (``ImageFeaturesH5Reader``): ``b"keys"`` holds the list of image
  ids and each id a dict with ``image_id, image_h, image_w, num_boxes, boxes, features`` (base64 float32
  or arrays) and ``cls_prob``. A pickle can run arbitrary code when loaded: its header (``b"\\x80"`` and
  the protocol) is recognised before anything is unpickled, and conversion refuses unless
  ``--trust-pickle`` is given. These rows carry no caption: pass ``--captions``.

Every row is checked (0 <= N <= 100, arrays of N rows of the right width, a positive image size); a
truncated or corrupt row is a :class:`DataError` naming the file and the key.

Captions come from ``--captions`` (or, for msgpack LMDB rows, the row itself): JSON lines
``{"image_id": ..., "caption": ...}`` or ``image_id<TAB>caption`` lines. An image with several captions becomes one record per caption (features repeated); images
without a caption, captions without an image and images with 0 regions are counted and left out.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from fastvl.data.format import DataError, ImageRecord, ShardWriter

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
MAX_REGIONS = 100  # ViLBERT's task features hold at most 100 boxes (36 for Conceptual Captions)
log = logging.getLogger("fastvl.data")


def read_captions(path: str) -> dict[str, list[str]]:
    """``{image_id: [caption, ...]}`` from JSON lines ``{"image_id": ..., "caption": "..."}`` or
    ``image_id<TAB>caption`` lines; a caption that is not text (``null``, a number) is a :class:`DataError`
    naming the line, never the text "None"."""
    captions: dict[str, list[str]] = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise DataError(f"--captions {path}: cannot read it ({error.strerror or error})") from None
    for line_number, raw in enumerate(lines, 1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("{"):
                row = json.loads(line)
                image_id, caption = row["image_id"], row["caption"]
                if not isinstance(caption, str):
                    raise DataError(f"{where}: caption is {json.dumps(caption)}, expected text (an image without "
                                    "a caption: leave its line out)")
                if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
                    raise DataError(f"{where}: image_id is {json.dumps(image_id)}, expected a string or integer")
                image_id = str(image_id)
            else:
                image_id, caption = line.split("\t", 1)
        except (ValueError, KeyError, TypeError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"{where}: expected a JSON object with image_id and caption or "
                            f"'image_id<TAB>caption' ({error})") from None
        captions.setdefault(image_id.strip(), []).append(caption.strip())
    return captions


def _decode(field: str, value: str, dtype, columns: int | None, rows: int, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise DataError(f"{where}: field {field!r} is not valid base64 ({error})") from error
    itemsize = np.dtype(dtype).itemsize
    if rows == 0 or len(raw) % (itemsize * rows):
        raise DataError(f"{where}: field {field!r} has {len(raw)} bytes, not a whole number of {rows} rows of "
                        f"{np.dtype(dtype).name} (truncated?)")
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    width = array.size // rows
    if columns is not None and width != columns:
        raise DataError(f"{where}: field {field!r} has {width} values per box, expected {columns}")
    return array.reshape(rows, width)


def _distribution(objects_id: np.ndarray, objects_conf: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    if num_classes is None:
        raise DataError(f"{where}: no cls_prob field; rebuilding it from objects_id/objects_conf needs --num-classes")
    if (objects_id < 0).any() or (objects_id >= num_classes).any():
        raise DataError(f"{where}: objects_id outside [0, {num_classes})")
    conf = np.clip(objects_conf.astype(np.float32), 0.0, 1.0)
    dist = np.repeat(((1.0 - conf) / max(num_classes - 1, 1))[:, None], num_classes, axis=1)
    dist[np.arange(len(conf)), objects_id] = conf
    return dist


def read_butd_tsv(path: str, fields: tuple[str, ...] | None = None,
                  num_classes: int | None = None) -> Iterator[dict]:
    """Yields ``{image_id, image_h, image_w, boxes, features, cls_prob}`` per line of a BUTD TSV file,
    with the LMDB path's checks (0 <= num_boxes <= 100, a positive image size, arrays of num_boxes rows)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_number}: not ASCII (base64 fields and numbers are): not a BUTD "
                                "TSV file, or a damaged one") from None
            values = line.rstrip("\r\n").split("\t")
            if line_number == 1 and values[0] == "image_id":  # header row
                fields = tuple(values)
                continue
            names = fields or (BUTD_FIELDS + ("cls_prob",) if len(values) == 7 else BUTD_FIELDS)
            where = f"{path}:{line_number}"
            if len(values) != len(names):
                raise DataError(f"{where}: {len(values)} tab-separated fields, expected {len(names)} "
                                f"({', '.join(names)}); truncated line?")
            row = dict(zip(names, values))
            try:
                image_id = row["image_id"]
                image_w, image_h, num_boxes = int(row["image_w"]), int(row["image_h"]), int(row["num_boxes"])
            except (KeyError, ValueError) as error:
                raise DataError(f"{where}: bad image_id/image_w/image_h/num_boxes ({error})") from error
            where = f"{where} (image_id {image_id!r})"
            if not 0 <= num_boxes <= MAX_REGIONS:
                raise DataError(f"{where}: num_boxes {num_boxes} outside [0, {MAX_REGIONS}]")
            if num_boxes and (image_h <= 0 or image_w <= 0):
                raise DataError(f"{where}: image size {image_h} x {image_w} is not positive")
            if num_boxes == 0:
                yield {"image_id": image_id, "num_boxes": 0, "where": where}
                continue
            boxes = _decode("boxes", row["boxes"], np.float32, 4, num_boxes, where)
            features = _decode("features", row["features"], np.float32, None, num_boxes, where)
            if "cls_prob" in row:
                cls_prob = _decode("cls_prob", row["cls_prob"], np.float32, num_classes, num_boxes, where)
            elif "objects_id" in row and "objects_conf" in row:
                ids = _decode("objects_id", row["objects_id"], np.int64, 1, num_boxes, where)[:, 0]
                conf = _decode("objects_conf", row["objects_conf"], np.float32, 1, num_boxes, where)[:, 0]
                cls_prob = _distribution(ids, conf, num_classes, where)
            else:
                raise DataError(f"{where}: no cls_prob (or objects_id/objects_conf) field: the region KL objective "
                                "needs the detector's class distribution")
            yield {"image_id": image_id, "image_h": image_h, "image_w": image_w, "num_boxes": num_boxes,
                   "boxes": boxes, "features": features, "cls_prob": cls_prob, "where": where}


ROW_FIELDS = ("features", "cls_prob", "boxes", "num_boxes", "image_h", "image_w", "image_id", "caption")
_KEY_LISTS = (b"__keys__", b"keys")  # tensorpack's LMDBSerializer / ViLBERT's ImageFeaturesH5Reader
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: nothing else is rebuilt from an nd-map


class _Refused(Exception):
    """Raised inside the msgpack hooks; turned into a DataError naming file and key."""


def _import_optional(name: str):
    try:
        return __import__(name)
    except ImportError as error:
        raise DataError(f"converting LMDB files needs the optional {name!r} package (pip install lmdb msgpack); "
                        "it is not installed") from error


def _pickle_protocol(raw: bytes) -> int | None:
    """The protocol of a pickle (protocol >= 2 starts with the PROTO opcode b'\\x80' and its number), else None.

    A msgpack value never starts like that: 0x80 is msgpack's empty map, which is a whole value alone."""
    if len(raw) >= 2 and raw[0] == 0x80 and 2 <= raw[1] <= 5:
        return raw[1]
    return None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nd_dtype(descr) -> np.dtype:
    if isinstance(descr, bytes):
        descr = descr.decode("ascii", "replace")
    if not isinstance(descr, str):
        raise _Refused(f"ndarray type {descr!r} is not a plain dtype string (structured arrays are not read)")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError) as error:
        raise _Refused(f"ndarray type {descr!r} is not a numpy dtype ({error})") from error
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"ndarray dtype {descr!r} is not numeric; only bool/int/uint/float arrays are read")
    return dtype


def _nd_hook(obj: dict):
    """msgpack ``object_hook``: rebuilds msgpack-numpy's maps ``{b'nd': True, b'type': '<f4', b'kind': b'',
    b'shape': [...], b'data': raw}`` (and ``b'nd': False`` scalars) for numeric dtypes only; every other
    map is returned as it is. kind b'O' (an object array, whose data msgpack-numpy pickles) and b'V'
    (structured) are refused, as is any non-numeric type."""
    if b"nd" not in obj:
        return obj
    kind = obj.get(b"kind", b"")
    if kind == b"O":
        raise _Refused("object-dtype ndarray (msgpack-numpy stores its data as a Python pickle): refused")
    if kind not in (b"", ""):
        raise _Refused(f"ndarray of kind {kind!r} (structured or object data): refused")
    try:
        descr, data = obj[b"type"], obj[b"data"]
    except KeyError as error:
        raise _Refused(f"ndarray map without {error.args[0]!r}") from error
    dtype = _nd_dtype(descr)
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"ndarray data is {type(data).__name__}, not bytes")
    if obj[b"nd"] is not True:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise _Refused(f"numpy scalar of {dtype.str} has {len(data)} bytes, expected {dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype)[0]
    shape = obj.get(b"shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _Refused(f"ndarray shape {shape!r} is not a list of non-negative integers")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise _Refused(f"ndarray {dtype.str} {list(shape)} needs {expected} bytes of data, has {len(data)} "
                       "(truncated?)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes):
    raise _Refused(f"msgpack extension type {code} is not part of the ViLBERT layout: refused")


class _LMDBValues:
    """Decodes the values of one LMDB: msgpack (safe hooks) or, with ``trust_pickle``, pickle."""

    def __init__(self, path: str, trust_pickle: bool):
        self.path, self.trust_pickle, self._msgpack = path, trust_pickle, None

    def loads(self, raw: bytes, where: str):
        raw = bytes(raw)
        protocol = _pickle_protocol(raw)
        if protocol is not None:
            if not self.trust_pickle:
                raise DataError(f"{where}: the value is a Python pickle (protocol {protocol} header b'\\x80'), which "
                                "can execute code when loaded; nothing was unpickled. Convert it only if you trust "
                                "its origin, with --trust-pickle (ViLBERT's downstream-task LMDBs are pickled; "
                                "the pretraining ones are msgpack and need no flag)")
            import pickle  # only behind --trust-pickle

            try:
                return pickle.loads(raw)
            except Exception as error:  # any failure of a corrupt pickle
                raise DataError(f"{where}: corrupt or truncated pickle ({type(error).__name__}: {error})") from error
        if self._msgpack is None:
            self._msgpack = _import_optional("msgpack")
        try:
            return self._msgpack.unpackb(raw, raw=True, object_hook=_nd_hook, ext_hook=_ext_hook,
                                         strict_map_key=False)
        except _Refused as error:
            raise DataError(f"{where}: {error}") from error
        except Exception as error:  # msgpack raises ValueError subclasses and others
            hint = (" (it ends like a protocol-0/1 pickle, which is not detected: re-save it with protocol >= 2)"
                    if raw.endswith(b".") else "")
            raise DataError(f"{where}: not a valid msgpack value: corrupt or truncated row "
                            f"({type(error).__name__}: {error}){hint}") from error


def _lmdb_keys(txn, values: _LMDBValues, path: str) -> tuple[list[bytes], str | None]:
    """The row keys: the ``__keys__`` (or ``keys``) list, else every key not starting with ``__``."""
    for name in _KEY_LISTS:
        raw = txn.get(name)
        if raw is None:
            continue
        keys = values.loads(raw, f"{path} (key {name.decode()!r})")
        if not isinstance(keys, (list, tuple)):
            raise DataError(f"{path} (key {name.decode()!r}): expected a list of keys, got {type(keys).__name__}")
        return [k if isinstance(k, bytes) else str(k).encode() for k in keys], name.decode()
    with txn.cursor() as cursor:
        return [bytes(k) for k in cursor.iternext(keys=True, values=False) if not bytes(k).startswith(b"__")], None


def _field(item: dict, name: str, where: str):
    if name not in item:
        raise DataError(f"{where}: no {name!r} field" + (": the region KL objective needs the detector "
                                                          "distribution" if name == "cls_prob" else ""))
    return item[name]


def _integer(value, name: str, where: str) -> int:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        number = int(value)
        if isinstance(value, (float, np.floating)) and number != value:
            raise ValueError("not a whole number")
    except (TypeError, ValueError) as error:
        raise DataError(f"{where}: {name} {value!r} is not an integer") from error
    return number


def _regions(value, name: str, columns: int | None, num_boxes: int, where: str) -> np.ndarray:
    if isinstance(value, (bytes, str)):  # ImageFeaturesH5Reader: base64 of float32
        return _decode(name, value, np.float32, columns, num_boxes, where)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise DataError(f"{where}: field {name!r} is not an array ({error})") from error
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{where}: field {name!r} has dtype {array.dtype}, expected numbers")
    if array.ndim == 1 and columns is not None and array.size == num_boxes * columns:
        array = array.reshape(num_boxes, columns)
    if array.ndim != 2 or array.shape[0] != num_boxes or (columns is not None and array.shape[1] != columns):
        expected = f"[{num_boxes}, {columns if columns is not None else 'D'}]"
        raise DataError(f"{where}: field {name!r} has shape {list(array.shape)}, expected {expected} "
                        "(num_boxes rows)")
    return array.astype(np.float32)


def _image(item, key: bytes, where: str) -> dict:
    """Maps one ViLBERT row (the msgpack list layout or the pickled dict layout) to a converter image."""
    if isinstance(item, (list, tuple)):
        if len(item) != len(ROW_FIELDS):
            raise DataError(f"{where}: row has {len(item)} fields, expected {len(ROW_FIELDS)} "
                            f"({', '.join(ROW_FIELDS)})")
        item = dict(zip(ROW_FIELDS, item))
    elif isinstance(item, dict):
        item = {_text(k): v for k, v in item.items()}
    else:
        raise DataError(f"{where}: row is a {type(item).__name__}, expected ViLBERT's list "
                        f"[{', '.join(ROW_FIELDS)}] or a dict")
    num_boxes = _integer(_field(item, "num_boxes", where), "num_boxes", where)
    if not 0 <= num_boxes <= MAX_REGIONS:
        raise DataError(f"{where}: num_boxes {num_boxes} outside [0, {MAX_REGIONS}]")
    image_id = item.get("image_id", key)
    image_id = _text(image_id.reshape(())[()] if isinstance(image_id, np.ndarray) and image_id.size == 1
                     else image_id)
    image = {"image_id": image_id, "num_boxes": num_boxes, "where": where}
    caption = item.get("caption")
    if caption is not None:
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: caption is not UTF-8 ({error})") from error
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption is a {type(caption).__name__}, expected text")
        image["caption"] = caption
    if num_boxes == 0:
        return image
    image_h = _integer(_field(item, "image_h", where), "image_h", where)
    image_w = _integer(_field(item, "image_w", where), "image_w", where)
    if image_h <= 0 or image_w <= 0:
        raise DataError(f"{where}: image size {image_h} x {image_w} is not positive")
    image.update(image_h=image_h, image_w=image_w,
                 features=_regions(_field(item, "features", where), "features", None, num_boxes, where),
                 boxes=_regions(_field(item, "boxes", where), "boxes", 4, num_boxes, where),
                 cls_prob=_regions(_field(item, "cls_prob", where), "cls_prob", None, num_boxes, where))
    return image


def read_vilbert_lmdb(path: str, trust_pickle: bool = False) -> Iterator[dict]:
    """Yields the images of a ViLBERT feature LMDB; the serialisation is detected per value.

    msgpack values (tensorpack's ``LMDBSerializer``: Conceptual Captions pretraining) are decoded with
    hooks that rebuild numeric arrays only, so no flag is needed. Pickled values (``ImageFeaturesH5Reader``:
    downstream tasks) are recognised by their header before anything is unpickled and refused unless
    ``trust_pickle``. Keys come from ``__keys__`` or ``keys``, else from the cursor (``__``-prefixed
    meta entries such as ``__len__`` skipped). Rows may carry a caption (``image["caption"]``)."""
    lmdb = _import_optional("lmdb")
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(path))
    except lmdb.Error as error:
        raise DataError(f"{path}: cannot open as an LMDB ({error})") from error
    values = _LMDBValues(path, trust_pickle)
    with env.begin(write=False) as txn:
        keys, key_list = _lmdb_keys(txn, values, path)
        for key in keys:
            where = f"{path} (key {_text(key)!r})"
            raw = txn.get(key)
            if raw is None:
                raise DataError(f"{where}: listed in {key_list!r} but missing")
            yield _image(values.loads(raw, where), key, where)


def convert(images: Iterator[dict], captions: dict[str, list[str]] | None, out_dir: str, *, shard_size: int = 1024,
            source: str = "") -> dict:
    """Writes images x captions as a fastvl dataset; returns the index plus conversion counts.

    An image's captions are ``captions[image_id]`` when given there, else the caption its row carries
    (``image["caption"]``, ViLBERT's msgpack rows), else it is counted as ``no_caption``."""
    captions = captions or {}
    writer = None
    seen: set[str] = set()
    counts = {"images": 0, "records": 0, "no_caption": 0, "zero_regions": 0}
    for image in images:
        counts["images"] += 1
        image_id = image["image_id"]
        seen.add(image_id)
        if image["num_boxes"] == 0:  # kept out; the dataset would skip it anyway
            counts["zero_regions"] += 1
            log.warning("%s: 0 regions, left out", image["where"])
            continue
        texts = captions.get(image_id) or ([image["caption"]] if image.get("caption") else None)
        if not texts:
            counts["no_caption"] += 1
            continue
        if writer is None:
            writer = ShardWriter(out_dir, feature_dim=image["features"].shape[1],
                                 num_classes=image["cls_prob"].shape[1], shard_size=shard_size, source=source)
        for caption in texts:
            try:
                writer.add(ImageRecord(image_id, caption, image["features"], image["boxes"], image["cls_prob"],
                                       image["image_h"], image["image_w"]))
            except DataError as error:
                raise DataError(f"{image['where']}: {error}") from error
            counts["records"] += 1
    missing = sorted(set(captions) - seen)
    counts["caption_without_image"] = len(missing)
    if missing:
        log.warning("%d captioned images are not in the feature files (left out), e.g. %s", len(missing), missing[:3])
    if writer is None:
        raise DataError("no image had both regions and a caption; nothing written"
                        + (" (the rows carry no captions: pass --captions)" if not captions else ""))
    index = writer.close()
    return {**index, "conversion": counts}
