"""Fast host copies of strided (mostly transposed) numpy views.

Conversion is dominated by transposing torch-layout [out, in] matrices into our [in, out]
kernels. numpy's plain `dst[...] = src.T` moves one element per strided access and runs at
~130 MB/s. Here the matrix is transposed in 16- (else 8-) byte words: 8 bf16 neighbours of
a source row move as one complex128 (numpy copies a same-dtype array as raw bytes, so any
bit pattern survives), one tile of source rows at a time into a small scratch that stays
in cache; a short-stride pass then unpacks each word's elements into their destination
rows (casting there when the dtypes differ): ~1.4 ns per bf16 element in all, on one
core. Every np.copyto call releases the GIL, and so does `prefault` (the kernel zeroing
the destination's pages, about as costly as the copy), so independent copies run in
parallel on a thread pool (`mapping.load`).
"""
from __future__ import annotations

import ctypes
import errno
import mmap

import numpy as np

TILE = 128
BLOCK_BYTES = 1 << 19        # scratch per tile (fits L2)
COLS = 512                   # rows of the source matrix per tile (runs of the destination)
MMAP_MIN_BYTES = 1 << 20
WORDS = (np.dtype(np.complex128), np.dtype(np.uint64))
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
            _copy_2d(_as_2d(dst, k), s2)
            return
    np.copyto(dst, src, casting="unsafe")


def _copy_2d(dst: np.ndarray, src: np.ndarray) -> None:
    rows, cols = src.shape
    if src.strides[1] == src.itemsize or rows * cols <= TILE * TILE:
        np.copyto(dst, src, casting="unsafe")  # row-contiguous or small: one pass
        return
    if _transpose_words(dst, src):
        return
    for i in range(0, rows, TILE):             # any other strides: cache-sized tiles
        for j in range(0, cols, TILE):
            np.copyto(dst[i:i + TILE, j:j + TILE], src[i:i + TILE, j:j + TILE],
                      casting="unsafe")


def _transpose_words(dst: np.ndarray, src: np.ndarray) -> bool:
    """dst[R, C] = src (= m.T, m [C, R] with contiguous rows) in words of k = w / itemsize
    elements of a row of m. Per tile of tc rows of m and tn words: words [tc, tn] ->
    scratch [tn, tc] (a strided pass over rows that stay in cache), then scratch
    [tn, tc, k] -> dst[tile rows, tile cols] viewed as [tn, k, tc] (runs of tc elements).
    False when the layout allows no word size (the caller falls back to element tiles)."""
    m = src.T
    cols, rows = m.shape                       # dst is [rows, cols]
    if m.strides[1] != m.itemsize:
        return False
    for wdt in WORDS:
        k = wdt.itemsize // m.itemsize
        if k >= 2 and rows % k == 0:
            try:
                words = m.view(wdt)            # [cols, rows / k]
                break
            except ValueError:
                continue
    else:
        return False
    n = rows // k
    tc = min(cols, COLS)                       # rows of m per block
    tn = min(n, max(1, BLOCK_BYTES // (tc * wdt.itemsize)))   # words per row of m
    scratch = np.empty((tn, tc), wdt)
    out = dst.reshape(n, k, cols)
    for j in range(0, cols, tc):
        e = min(cols, j + tc)
        for a in range(0, n, tn):
            b = min(n, a + tn)
            t = scratch[:b - a, :e - j]
            np.copyto(t, words[j:e, a:b].T)
            np.copyto(out[a:b, :, j:e],
                      t.view(m.dtype).reshape(b - a, e - j, k).transpose(0, 2, 1),
                      casting="unsafe")
    return True


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised array like `np.empty`, but large ones (>= 1 MiB) are a private
    anonymous mmap of 4 KiB pages that the copy threads fault in (`prefault`), in
    parallel; MAP_POPULATE would do it serially, in the allocating thread. (numpy's own
    large arrays ask for transparent huge pages, whose zeroing measured 2-4x slower per
    byte on this kind of VM: 0.47 vs 0.11-0.15 s of system time per 256 MiB, and ~3.0 vs
    ~1.1 s in a 2 GB load.) The mapping is freed with the array."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n < MMAP_MIN_BYTES:
        return np.empty(shape, dtype)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype).reshape(shape)


_MADV_POPULATE_WRITE = 23     # Linux >= 5.14
_madvise = None


def prefault(a: np.ndarray) -> None:
    """Faults in the pages under contiguous `a` with one madvise(MADV_POPULATE_WRITE)
    call instead of one page fault per 4 KiB on first write (the contents are
    unchanged). ctypes releases the GIL, so threads prefault in parallel. A no-op where
    the kernel or platform has no such call."""
    global _madvise
    if a.nbytes < MMAP_MIN_BYTES or not a.flags.c_contiguous or _madvise is False:
        return
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _madvise = False
            return
    page = mmap.PAGESIZE
    start = a.ctypes.data // page * page
    if _madvise(start, a.ctypes.data + a.nbytes - start, _MADV_POPULATE_WRITE) != 0:
        if ctypes.get_errno() == errno.EINVAL:   # a kernel without it: plain faults
            _madvise = False


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
