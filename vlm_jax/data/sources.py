"""Random-access sources of raw image-caption samples.

A source has `__len__` and `__getitem__(i) -> {"image", "text", "key", "source"}` where
"image" is encoded bytes or a uint8 array and "text" a str/bytes caption (or None); a
record that cannot be used raises `BadSample(reason)`. `order` is "permute" when any
record can be read cheaply (subsets come from a global seeded permutation) or "prefix"
for tar shards (subsets are prefixes of a seeded shard order, so a subset only indexes
the shards it needs; see `subsets.Split`).

- `SyntheticSource`: procedural shapes (`synthetic.py`), 10^9 virtual records; it also has
  `get_batch(records)` (many records stacked, rendered in one vectorised call), which the
  pipeline uses to load a whole chunk at once (`pipeline.LoadExample.prepare_batch`).
- `TarSource`: img2dataset / webdataset shards, `{key}.jpg|jpeg|png|webp` + `{key}.txt`
  (+ `{key}.json`). Members are indexed from their headers (no data read, nothing
  extracted, names are only keys) and read in place by offset. A remote shard (a URL) is
  streamed once, sequentially (one open, one pass, as a tar must be read to find its
  headers anyway), into a local shard cache (`data.shard_cache`, else
  $VLM_JAX_SHARD_CACHE, else ~/.cache/vlm_jax/shards; written to a temporary name and
  renamed, so processes and workers share it safely); it is indexed and read there,
  never by one remote range request per member.
- `ArrayRecordSource`: files written by `convert` (record format below).
- `ParquetSource`: an image-bytes column (binary, or a struct with a "bytes" field as in
  Hugging Face datasets) and a caption column.
- `TFDSSource`: any TFDS builder prepared in ArrayRecord format, via `tfds.data_source`.

Paths are local or URLs (gs://, s3://, http(s)://, memory://, ... through fsspec: the
protocol's package, e.g. gcsfs, must be installed) and may hold brace ranges
(`shards/{00000..00099}.tar`), lists (`{a,b}`) and globs.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import glob as _glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import tarfile
import threading
from typing import Any, Iterator

import numpy as np
import fsspec

from vlm_jax.data import synthetic
from vlm_jax.data.errors import BadSample

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("synthetic", "tar", "arrayrecord", "parquet", "tfds")
SYNTHETIC_SIZE = 10**9


# ----------------------------------------------------------------------------- patterns
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> [a/000.tar, a/001.tar, a/002.tar]; `{x,y}` lists too; the
    leftmost group varies slowest (as in bash)."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"bad range {m.group(0)} in {pattern!r}: end before start")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = m.group(1).split(",")
    out = []
    for part in parts:
        out += expand_braces(pattern[:m.start()] + part + pattern[m.end():])
    return out


def expand_pattern(pattern: str, what: str = "data.path") -> list[str]:
    """Files matching a brace/glob pattern (or a comma-free list of them), in order.

    Raises FileNotFoundError naming the pattern when nothing matches.
    """
    if not pattern:
        raise ValueError(f"{what} is empty: give a file pattern, e.g. shards/{{00000..00009}}.tar")
    expanded = os.path.expandvars(os.path.expanduser(pattern))
    if "$" in expanded:
        raise ValueError(f"{what}={pattern!r} uses an unset environment variable; set it "
                         "(e.g. VLM_JAX_DATA=/data) or give the path explicitly")
    files: list[str] = []
    names = expand_braces(expanded)
    missing = [p for p in names if not any(c in p for c in "*?[") and not path_exists(p)]
    if missing:
        raise FileNotFoundError(f"{what}={pattern!r}: {len(missing)} of {len(names)} files do "
                                f"not exist (first: {missing[0]!r})")
    for p in names:
        if any(c in p for c in "*?["):
            if "://" in p:
                fs, _ = fsspec.core.url_to_fs(p)
                files += sorted(fs.unstrip_protocol(x) for x in fs.glob(p))
            else:
                files += sorted(_glob.glob(p))
        else:
            files.append(p)
    files = [f for f in files if not path_is_dir(f)]
    if not files:
        raise FileNotFoundError(f"{what}={pattern!r} matches no files")
    return files


def open_binary(path: str):
    """A seekable binary file object for a local path or an fsspec URL."""
    if "://" in path:
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def path_exists(path: str) -> bool:
    if "://" in path:
        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def path_is_dir(path: str) -> bool:
    if "://" in path:
        fs, p = fsspec.core.url_to_fs(path)
        return fs.isdir(p)
    return os.path.isdir(path)


def is_remote(path: str) -> bool:
    """A URL read through fsspec (gs://, s3://, http(s)://, memory://, file://, ...)."""
    return "://" in path


def default_shard_cache() -> str:
    return os.environ.get("VLM_JAX_SHARD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vlm_jax", "shards")


def fetch_shard(url: str, cache_dir: str = "") -> str:
    """The local copy of a remote shard, streamed sequentially into `cache_dir` (once: a
    complete copy of the same size is reused). Atomic: a temporary file renamed when
    complete, so a crash or a concurrent reader never sees half a shard."""
    cache_dir = cache_dir or default_shard_cache()
    fs, p = fsspec.core.url_to_fs(url)
    size = int(fs.size(p))
    name = hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + os.path.basename(p)
    dst = os.path.join(cache_dir, name)
    if os.path.exists(dst) and os.path.getsize(dst) == size:
        return dst
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{dst}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with fs.open(p, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def file_size(path: str) -> int:
    if "://" in path:
        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p))
    return os.path.getsize(path)


class _Files:
    """Open file handles, one per path, shared by threads (reads are locked or pread)."""

    def __init__(self):
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                if "://" in path:
                    h = open_binary(path)
                else:
                    h = os.open(path, os.O_RDONLY)
                self._handles[path] = h
        if isinstance(h, int):
            return os.pread(h, size, offset)
        with self._lock:
            h.seek(offset)
            return h.read(size)

    def __getstate__(self):
        return {}

    def __setstate__(self, _):
        self.__init__()

    def __del__(self):
        for h in getattr(self, "_handles", {}).values():
            try:
                os.close(h) if isinstance(h, int) else h.close()
            except Exception:  # noqa: BLE001
                pass


# ----------------------------------------------------------------------------- synthetic
@dataclasses.dataclass
class SyntheticSource:
    """Procedural records, `size` of them (default 10^9): `[i]` is
    `synthetic.make_record`, `get_batch(records)` renders many records in one vectorised
    call (`synthetic.make_batch`: the pipeline's chunk path); both give the same records."""
    seed: int = 0
    image_size: int = 64
    caption_noise: float = 0.0
    size: int = SYNTHETIC_SIZE
    with_image: bool = True  # False: captions only (kind "lm" skips rendering)
    # Records are i.i.d. by construction: subsets are prefixes (no global permutation).
    order: str = "prefix"
    errors: tuple = ()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic record {i} out of range [0, {self.size})")
        rec = synthetic.make_record(self.seed, i, self.image_size, self.caption_noise,
                                    with_image=self.with_image)
        rec.pop("clean")
        rec.setdefault("image", None)
        return rec

    def get_batch(self, records) -> dict:
        """Records `records` stacked: {"image": uint8 [n, s, s, 3] (None without images),
        "text": [n] str, "key": [n] str, "source": [n] str}."""
        idx = np.asarray(records, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"synthetic records {idx.min()}..{idx.max()} out of range "
                             f"[0, {self.size})")
        out = synthetic.make_batch(self.seed, idx, self.image_size, self.caption_noise,
                                   with_image=self.with_image)
        out.pop("clean")
        out.setdefault("image", None)
        return out


# ----------------------------------------------------------------------------- tar
@dataclasses.dataclass
class ShardIndex:
    """Samples of one tar shard: key and (offset, size) of image/text/json (-1 = none)."""
    path: str
    keys: list[str]
    image: np.ndarray        # int64 [n, 2]
    image_ext: list[str]
    text: np.ndarray         # int64 [n, 2]
    meta: np.ndarray         # int64 [n, 2]
    truncated: np.ndarray    # bool [n]: a member runs past the end of the file
    error: str = ""          # why indexing stopped early ("" = read to the end)
    local: str = ""          # the local copy members are read from ("" = `path` itself)

    def __len__(self):
        return len(self.keys)


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = name up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


def index_tar(path: str, cache_dir: str = "") -> ShardIndex:
    """Reads the member headers of a tar shard (seeking over the data). A remote shard is
    first streamed into the local shard cache (`fetch_shard`) and indexed there."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    error = ""
    local = ""
    try:
        local = fetch_shard(path, cache_dir) if is_remote(path) else ""
        size = file_size(local or path)
        with open_binary(local or path) as f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
                while True:
                    try:
                        m = tf.next()
                    except tarfile.ReadError as e:
                        error = f"truncated tar ({e})"
                        break
                    if m is None:
                        break
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
            except tarfile.ReadError as e:
                if not groups:
                    raise
                error = f"truncated tar ({e})"
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        return ShardIndex(path, [], np.zeros((0, 2), np.int64), [], np.zeros((0, 2), np.int64),
                          np.zeros((0, 2), np.int64), np.zeros((0,), bool),
                          error=f"unreadable shard ({type(e).__name__}: {e})")
    keys, img, img_ext, txt, meta, trunc = [], [], [], [], [], []
    for key, members in groups.items():
        ext = next((e for e in IMAGE_EXTS if e in members), "")
        if not ext and "txt" not in members:
            continue  # e.g. a lone .json/.parquet side file: not a sample
        keys.append(key)
        img.append(members.get(ext, (-1, -1)) if ext else (-1, -1))
        img_ext.append(ext)
        txt.append(members.get("txt", (-1, -1)))
        meta.append(members.get("json", (-1, -1)))
        trunc.append(any(o + s > size for o, s in members.values()))
    as_arr = lambda x: np.asarray(x, np.int64).reshape(-1, 2)  # noqa: E731
    return ShardIndex(path, keys, as_arr(img), img_ext, as_arr(txt), as_arr(meta),
                      np.asarray(trunc, bool), error, local)


class TarSource:
    """img2dataset/webdataset tar shards; record i is sample i of the shards taken in a
    seeded order (`order="prefix"`). Shards are indexed lazily, as records are needed."""

    order = "prefix"

    def __init__(self, pattern: str, seed: int = 0, shuffle_shards: bool = True,
                 cache_dir: str = ""):
        self.pattern, self.cache_dir = pattern, cache_dir
        self.paths = expand_pattern(pattern)
        perm = np.arange(len(self.paths))
        if shuffle_shards:
            perm = np.random.default_rng(seed).permutation(len(self.paths))
        self.shards = [self.paths[i] for i in perm]
        self._index: list[ShardIndex] = []
        self._starts: list[int] = [0]
        self._files = _Files()
        self._lock = threading.Lock()

    @property
    def errors(self) -> list[tuple[str, str]]:
        """(shard, message) for shards that were unreadable or truncated."""
        return [(s.path, s.error) for s in self._index if s.error]

    def ensure(self, count: int) -> int:
        """Indexes shards until `count` records are known (or all are); returns the number
        of records known."""
        with self._lock:
            while self._starts[-1] < count and len(self._index) < len(self.shards):
                s = index_tar(self.shards[len(self._index)], self.cache_dir)
                if s.error:
                    log.warning("%s: %s", s.path, s.error)
                self._index.append(s)
                self._starts.append(self._starts[-1] + len(s))
            return self._starts[-1]

    def __len__(self) -> int:
        return self.ensure(np.iinfo(np.int64).max)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i >= self._starts[-1]:
            self.ensure(i + 1)
        if not 0 <= i < self._starts[-1]:
            raise IndexError(f"record {i} out of range [0, {self._starts[-1]})")
        si = bisect.bisect_right(self._starts, i) - 1
        s, j = self._index[si], i - self._starts[si]
        key = s.keys[j]
        where = f"key {key!r} in {s.path}"
        if s.truncated[j]:
            raise BadSample("truncated_member", where)
        if s.image[j, 0] < 0:
            raise BadSample("missing_image", where)
        if s.text[j, 0] < 0:
            raise BadSample("missing_caption", where)
        try:
            f = s.local or s.path
            image = self._files.read(f, int(s.image[j, 0]), int(s.image[j, 1]))
            text = self._files.read(f, int(s.text[j, 0]), int(s.text[j, 1]))
        except OSError as e:
            raise BadSample("unreadable_shard", f"{where}: {e}") from None
        return {"image": image, "text": text, "key": key, "source": s.path}


# ----------------------------------------------------------------------------- arrayrecord
_MAGIC = b"VLJ1"


def encode_record(sample: dict) -> bytes:
    """One sample as bytes: magic, u32 header length, JSON header, image bytes.

    The header holds "key", "text", "source" and "image_format"; no pickle anywhere.
    """
    image = sample["image"]
    if isinstance(image, np.ndarray):
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        image, fmt = buf.getvalue(), "png"
    else:
        fmt = sample.get("image_format", "")
    text = sample["text"]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    header = json.dumps({"key": sample["key"], "text": text, "source": sample.get("source", ""),
                         "image_format": fmt}).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + bytes(image)


def decode_record(data: bytes, where: str = "") -> dict:
    if len(data) < 8 or data[:4] != _MAGIC:
        raise BadSample("bad_record", f"{where}: not a vlm_jax record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise BadSample("bad_record", f"{where}: bad header ({e})") from None
    return {"image": data[8 + n:], "text": header.get("text"), "key": header.get("key", ""),
            "source": header.get("source", "")}


class ArrayRecordSource:
    order = "permute"
    errors: tuple = ()

    def __init__(self, pattern: str):
        import grain
        self.pattern = pattern
        self.paths = expand_pattern(pattern)
        try:
            self._ds = grain.sources.ArrayRecordDataSource(self.paths)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"data.path={pattern!r}: cannot open as ArrayRecord ({e}); "
                             "write files with `python -m vlm_jax.data convert`") from e

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        return decode_record(self._ds[int(i)], f"record {i} of {self.pattern}")


# ----------------------------------------------------------------------------- parquet
def _field(row: Any, column: str) -> Any:
    """row["a/b"] -> row["a"]["b"] (lists: the first element)."""
    for part in column.split("/"):
        if isinstance(row, (list, tuple)) and not isinstance(row, (str, bytes)):
            row = row[0] if len(row) else None
        if row is None:
            return None
        if not isinstance(row, dict) or part not in row:
            raise KeyError(part)
        row = row[part]
    return row


@contextlib.contextmanager
def _parquet_file(path: str):
    """A `pq.ParquetFile` whose reads leave no work behind on Arrow's thread pools that
    needs the GIL. Read its row groups with `use_threads=False`.

    Arrow given a Python file object reads it on its IO pool (`pre_buffer`) and its
    buffers wrap Python bytes; a pool thread that drops the last of those after the read
    has returned takes the GIL to do it. If the interpreter is finalizing by then,
    CPython (3.11 here) ends that native thread with pthread_exit, whose unwinding stops at a
    noexcept C++ destructor (arrow::py::PyBuffer) and calls std::terminate: the process
    aborts after its work ("terminate called without an active exception", exit 134).
    So a local file is opened by Arrow itself (no Python object in its reads), and a
    remote one (fsspec, a Python file) with `pre_buffer=False`, which with
    `use_threads=False` does every read and release on the calling thread.
    """
    import pyarrow.parquet as pq
    if is_remote(path):
        with open_binary(path) as f, pq.ParquetFile(f, pre_buffer=False) as pf:
            yield pf
    else:
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            yield pf


class ParquetSource:
    """Parquet files with an image column (bytes, or {"bytes": ...}) and a text column.

    Reads one row group at a time and keeps the last few (an LRU), so sequential reads
    are cheap; for globally shuffled training on big sets convert to ArrayRecord.
    """
    order = "permute"
    errors: tuple = ()

    def __init__(self, pattern: str, image_column: str = "image",
                 text_column: str = "caption", key_column: str = "key", cache: int = 4):
        self.pattern, self.cache = pattern, cache
        self.image_column, self.text_column, self.key_column = (image_column, text_column,
                                                                key_column)
        self.paths = expand_pattern(pattern)
        self._groups: list[tuple[int, int]] = []  # (file, row group)
        self._starts = [0]
        for fi, p in enumerate(self.paths):
            try:
                with _parquet_file(p) as pf:
                    names = set(pf.schema_arrow.names)
                    md = pf.metadata
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{p}: not a readable Parquet file ({e})") from e
            for col, field in ((image_column, "data.image_column"),
                               (text_column, "data.text_column")):
                if col.split("/")[0] not in names:
                    raise ValueError(f"{p}: no column {col!r} ({field}); columns: "
                                     f"{sorted(names)}")
            self._has_key = key_column in names
            for g in range(md.num_row_groups):
                self._groups.append((fi, g))
                self._starts.append(self._starts[-1] + md.row_group(g).num_rows)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def _rows(self, g: int) -> dict:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        fi, rg = self._groups[g]
        cols = [self.image_column.split("/")[0], self.text_column.split("/")[0]]
        if self._has_key:
            cols.append(self.key_column)
        with _parquet_file(self.paths[fi]) as pf:   # (see there: no exit-time abort)
            table = pf.read_row_group(rg, columns=list(dict.fromkeys(cols)), use_threads=False)
        rows = table.to_pydict()
        with self._lock:
            self._cache[g] = rows
            while len(self._cache) > self.cache:
                self._cache.popitem(last=False)
        return rows

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        g = bisect.bisect_right(self._starts, i) - 1
        rows, j = self._rows(g), i - self._starts[g]
        row = {k: v[j] for k, v in rows.items()}
        key = str(row[self.key_column]) if self._has_key else f"{i:012d}"
        image = _field(row, self.image_column)
        if isinstance(image, dict):
            image = image.get("bytes")
        return {"image": image, "text": _field(row, self.text_column), "key": key,
                "source": self.paths[self._groups[g][0]]}


# ----------------------------------------------------------------------------- tfds
def parse_tfds_path(path: str) -> tuple[str, str, str | None]:
    """"name[:split][@data_dir]" -> (name, split, data_dir)."""
    spec, _, data_dir = path.partition("@")
    name, _, split = spec.partition(":")
    if not name:
        raise ValueError(f"data.path={path!r}: give a TFDS builder as name[:split][@data_dir]")
    return name, split or "train", data_dir or None


class TFDSSource:
    """A TFDS builder (prepared in ArrayRecord format) through `tfds.data_source`."""
    order = "permute"
    errors: tuple = ()

    def __init__(self, path: str, image_column: str = "image", text_column: str = "caption"):
        self.path = path
        self.name, self.split, self.data_dir = parse_tfds_path(path)
        self.image_column, self.text_column = image_column, text_column
        self._ds = self._open()

    def _open(self):
        import tensorflow_datasets as tfds
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
            ds = builder.as_data_source(split=self.split)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"data.path={self.path!r}: cannot open TFDS builder {self.name!r} split "
                f"{self.split!r} (data_dir={self.data_dir}): {e}. Prepare it first with "
                "file_format='array_record' (tfds build --file_format=array_record)") from e
        features = set(builder.info.features.keys())
        for col, field in ((self.image_column, "data.image_column"),
                           (self.text_column, "data.text_column")):
            if col.split("/")[0] not in features:
                raise ValueError(f"TFDS {self.name}: no feature {col!r} ({field}); features: "
                                 f"{sorted(features)}")
        return ds

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_ds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ds = self._open()

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        row = self._ds[int(i)]
        image = _field(row, self.image_column)
        text = _field(row, self.text_column)
        if isinstance(text, np.ndarray) and text.dtype == object:
            text = list(text)
        key = row.get("image/id", row.get("id", i)) if isinstance(row, dict) else i
        return {"image": np.asarray(image) if image is not None else None, "text": text,
                "key": str(np.asarray(key).item() if np.ndim(key) == 0 else i),
                "source": f"tfds:{self.name}/{self.split}"}


# ----------------------------------------------------------------------------- factory
def open_source(fmt: str, path: str = "", *, seed: int = 0, image_column: str = "image",
                text_column: str = "caption", image_size: int = 64,
                caption_noise: float = 0.0, shuffle_shards: bool = True,
                with_image: bool = True, shard_cache: str = ""):
    """A source by format name (see FORMATS). Tar shards are taken in a seeded order
    unless `shuffle_shards` is False (then in the order of the pattern); remote ones are
    streamed into `shard_cache` (see `fetch_shard`)."""
    if fmt == "synthetic":
        return SyntheticSource(seed=seed, image_size=image_size, caption_noise=caption_noise,
                               with_image=with_image)
    if fmt == "tar":
        return TarSource(path, seed=seed, shuffle_shards=shuffle_shards, cache_dir=shard_cache)
    if fmt == "arrayrecord":
        return ArrayRecordSource(path)
    if fmt == "parquet":
        return ParquetSource(path, image_column, text_column)
    if fmt == "tfds":
        return TFDSSource(path, image_column, text_column)
    raise ValueError(f"data.source={fmt!r}: use one of {FORMATS}")


def iter_records(source, limit: int | None = None) -> Iterator[tuple[int, dict | BadSample]]:
    """(index, sample or BadSample) in record order; tar sources are indexed as they go."""
    i = 0
    while limit is None or i < limit:
        if isinstance(source, TarSource):
            if i >= source.ensure(i + 1):
                return
        elif i >= len(source):
            return
        try:
            yield i, source[i]
        except BadSample as e:
            yield i, e
        i += 1

