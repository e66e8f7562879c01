"""Streaming safetensors reader/writer (single files and sharded checkpoints).

Reads one tensor at a time straight from the file into a numpy buffer (no whole-file
load, no torch), so converting a checkpoint holds about one copy of the weights. Handles
bf16/fp16/fp8 through `ml_dtypes` (numpy has no bfloat16). The format: 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (plus
optional "__metadata__"), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the file and the key."""


def read_header(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2 ** 20:
                raise ConversionError(f"{path}: not a safetensors file (header size {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        info["base"] = 8 + n
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype "
                                  f"{info['dtype']}")
    return header


class Reader:
    """All tensors of a checkpoint: one `.safetensors` file, or a directory holding
    `model.safetensors` or a sharded `model.safetensors.index.json` (any `*.safetensors`
    files otherwise)."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, tuple[str, dict]] = {}
        files = _files(path)
        index = os.path.join(path, INDEX)
        # What error messages name: the one weights file, or the shard index.
        self.source = files[0] if len(files) == 1 else index if os.path.exists(index) else path
        for f in files:
            for name, info in read_header(f).items():
                self._where[name] = (f, info)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> str:
        return self._where[key][0] if key in self._where else self.source

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info(key)["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(DTYPES[self._info(key)["dtype"]])

    def _info(self, key):
        try:
            return self._where[key][1]
        except KeyError:
            raise ConversionError(f"{self.source}: missing tensor {key!r}") from None

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `key` in its stored dtype (read into `out` when given)."""
        f, info = self._where.get(key, (None, None))
        if f is None:
            raise ConversionError(f"{self.source}: missing tensor {key!r}")
        dt = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        if end - start != dt.itemsize * int(np.prod(shape)):
            raise ConversionError(f"{f}: tensor {key!r} byte size does not match its shape")
        if out is None:
            out = np.empty(shape, dt)
        elif out.shape != shape or out.dtype != dt or not out.flags.c_contiguous:
            raise ValueError(f"read({key!r}): out must be a contiguous {dt} array {shape}")
        with open(f, "rb", buffering=0) as fh:
            fh.seek(info["base"] + start)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise ConversionError(f"{f}: file truncated inside tensor {key!r}")
                got += n
        return out


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such file or directory")
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{index}: shard files missing: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(os.path.join(path, SINGLE)):
        return [os.path.join(path, SINGLE)]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{path}: no model.safetensors, {INDEX} or *.safetensors "
                              "file (convert .bin checkpoints with transformers first)")
    return [os.path.join(path, f) for f in files]


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]] | dict,
          metadata: dict | None = None) -> None:
    """Writes a safetensors file, streaming tensor by tensor, atomically (temp + rename).

    `tensors` may be a dict or an iterable of (name, array); an iterable is consumed twice
    only through its shapes (a first pass needs names, dtypes and shapes), so pass a
    callable-free dict of lazily computed arrays only when memory allows."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header, off = {}, 0
    for name, a in items:
        dt = NAMES.get(np.dtype(a.dtype))
        if dt is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        n = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for _, a in items:
                fh.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def iter_tensors(reader: Reader) -> Iterator[tuple[str, np.ndarray]]:
    for k in reader.keys():
        yield k, reader.read(k)
