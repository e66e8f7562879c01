"""Fast host copies of strided (mostly transposed) numpy views.

Conversion is dominated by transposing torch-layout [out, in] matrices into our [in, out]
kernels. numpy's plain `dst[...] = src.T` moves one element per strided access and runs at
~130 MB/s. Here both sides are viewed as unsigned integers (bf16 is a custom numpy dtype
with a slower copy loop), the matrix is transposed in 8-byte words (4 bf16 neighbours of
a row move together: 4x fewer strided accesses), in tiles that stay in cache, and a cheap
short-stride pass then unpacks each word's elements into their rows: ~3-4x numpy's speed.
"""
from __future__ import annotations

import mmap

import numpy as np

TILE = 128
POPULATE_MIN_BYTES = 1 << 20
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _as_2d(a: np.ndarray, k: int) -> np.ndarray | None:
    """`a` viewed as [prod(shape[:k]), prod(shape[k:])] without a copy, or None. (Setting
    `.shape` would tell too, but numpy copies the whole array before refusing.)"""
    dims = []
    for lo, hi in ((0, k), (k, a.ndim)):
        axes = [j for j in range(lo, hi) if a.shape[j] != 1]
        for j, nxt in zip(axes, axes[1:]):
            if a.strides[j] != a.strides[nxt] * a.shape[nxt]:
                return None
        dims.append((int(np.prod(a.shape[lo:hi])), a.strides[axes[-1]] if axes else a.itemsize))
    (rows, rs), (cols, cs) = dims
    return np.lib.stride_tricks.as_strided(a, (rows, cols), (rs, cs))


def _raw(a: np.ndarray) -> np.ndarray:
    return a.view(_UINT[a.dtype.itemsize]) if a.dtype.itemsize in _UINT else a


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` (with a cast if the dtypes differ); `dst` must be C-contiguous."""
    if src.shape != dst.shape:
        raise ValueError(f"copy_into: shape {src.shape} != {dst.shape}")
    if dst.dtype == src.dtype:
        dst, src = _raw(dst), _raw(src)
    if src.ndim < 2 or src.flags.c_contiguous or not dst.flags.c_contiguous:
        np.copyto(dst, src, casting="unsafe")
        return
    for k in range(1, src.ndim):
        s2 = _as_2d(src, k)
        if s2 is not None:
            _tiled(_as_2d(dst, k), s2)
            return
    np.copyto(dst, src, casting="unsafe")


def _tiled(dst: np.ndarray, src: np.ndarray) -> None:
    rows, cols = src.shape
    if src.strides[1] == src.itemsize or rows * cols <= TILE * TILE:
        np.copyto(dst, src, casting="unsafe")  # row-contiguous or small: one pass
        return
    if dst.dtype == src.dtype and _packed(dst, src):
        return
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            np.copyto(dst[i:i + TILE, j:j + TILE], src[i:i + TILE, j:j + TILE],
                      casting="unsafe")


def _packed(dst: np.ndarray, src: np.ndarray, block_bytes: int = 1 << 24) -> bool:
    """dst = src (= m.T, m row-contiguous [C, R]) moving k = 8 // itemsize neighbours of a
    row of m as one uint64: transpose words into a temp block, then unpack them. False
    when the layout does not allow it (the caller falls back to element tiles)."""
    k = 8 // src.itemsize
    m = src.T
    if k < 2 or m.strides[1] != m.itemsize or m.shape[1] % k or m.strides[0] % 8:
        return False
    try:
        words = m.view(np.uint64).T              # [R / k, C]
    except ValueError:
        return False
    n, cols = words.shape
    step = max(1, block_bytes // (cols * 8))
    out = dst.reshape(n, k, cols)
    for i in range(0, n, step):
        w = words[i:i + step]
        tmp = np.empty(w.shape, np.uint64)
        _tiled(tmp, w)
        np.copyto(out[i:i + step],
                  tmp.view(dst.dtype).reshape(len(w), cols, k).transpose(0, 2, 1))
    return True


def empty(shape, dtype) -> np.ndarray:
    """`np.empty`, but large arrays get their pages in one `MAP_POPULATE` mmap call instead
    of one page fault per 4 KiB on first write (4x faster on VMs where faults are costly:
    measured 0.28 s vs 1.28 s per 256 MiB). The mapping is freed with the array."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n < POPULATE_MIN_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(shape, dtype)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(mm, dtype).reshape(shape)


def contiguous(a: np.ndarray, dtype=None) -> np.ndarray:
    """`a` as a C-contiguous array of `dtype` (default its own): `a` itself when it already
    is one, else a copy."""
    a = np.asarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.flags.c_contiguous and a.dtype == dtype:
        return a
    out = empty(a.shape, dtype)
    copy_into(out, a)
    return out
