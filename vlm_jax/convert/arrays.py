"""Host buffers and copies for conversion.

Our kernels are stored in torch's [out, in] layout (`layers.Linear`), so converting a
checkpoint moves no element out of order: each tensor is read (`Reader.read_into`) or
copied (`copy_into`) contiguously into its destination, at memory speed. The
destinations are anonymous mappings (`empty`) that the copy threads fault in in parallel
(`prefault`); every call here releases the GIL, so independent tensors load in parallel
on a thread pool (`mapping.load`).
"""
from __future__ import annotations

import ctypes
import errno
import mmap

import numpy as np

MMAP_MIN_BYTES = 1 << 20
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _raw(a: np.ndarray) -> np.ndarray:
    return a.view(_UINT[a.dtype.itemsize]) if a.dtype.itemsize in _UINT else a


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` (with a cast if the dtypes differ). Same dtypes are copied as raw
    bits (unsigned views), so every bit pattern (NaN payloads of bf16/fp8) survives."""
    if src.shape != dst.shape:
        raise ValueError(f"copy_into: shape {src.shape} != {dst.shape}")
    if dst.dtype == src.dtype:
        dst, src = _raw(dst), _raw(src)
    np.copyto(dst, src, casting="unsafe")


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
