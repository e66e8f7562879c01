"""A table-driven mapping between a checkpoint's tensors and a params tree.

An `Entry` ties one or more checkpoint keys to one or more param paths with a pair of
numpy transforms (checkpoint -> ours, ours -> checkpoint). Layer entries name the
unscanned path (`layers_3/...`); with a scanned model they land in slice 3 of the stacked
`layers/...` leaf. `load` streams tensor by tensor into preallocated leaves (peak memory
about one copy of the weights); `export` walks the same table backwards, so a round trip
is bit-exact. With our kernels in torch's layout every transform is a reshape (or a
row-block split), so `load` is a contiguous copy per tensor.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from vlm_jax.convert.arrays import copy_into, empty, prefault
from vlm_jax.convert.safetensors_io import ConversionError, Reader

_LAYER = re.compile(r"^layers_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: tuple[str, ...]
    ours: tuple[str, ...]                     # "/"-joined param paths
    to_ours: Callable[..., Sequence[np.ndarray]]
    to_hf: Callable[..., Sequence[np.ndarray]]
    # to_ours is a reshape of its one tensor into one destination: `load` may read the
    # stored bytes straight into the destination instead of mapping the file.
    plain: bool = False


def one(hf: str, ours: str, to_ours=None, to_hf=None) -> Entry:
    """A one-to-one entry (identity transforms by default; `reshape` transforms, such as
    `heads`', keep it `plain`)."""
    f = to_ours or (lambda a: a)
    g = to_hf or (lambda a: a)
    plain = to_ours is None or getattr(to_ours, "reshape_only", False)
    return Entry((hf,), (ours,), lambda a: (f(a),), lambda a: (g(a),), plain)


def reshape(fn):
    """Marks a transform as a pure reshape of its input (a view of all of it)."""
    fn.reshape_only = True
    return fn


# Common transforms. Our kernels are in torch's [out..., in...] layout (`layers.Linear`),
# so every transform is a reshape: a view of the checkpoint tensor, which `load` copies
# once, contiguously, straight into its destination.
def heads(n: int):
    """Split the leading axis into n heads: [n*h, ...] -> [n, h, ...] (q/k/v kernels
    [heads, kv, embed] and their biases) and back."""
    @reshape
    def fwd(a):
        return a.reshape((n, -1) + a.shape[1:])

    def back(a):
        return a.reshape((-1,) + a.shape[2:])
    return fwd, back


def heads_last(n: int):
    """[d, n*h] -> [d, n, h] (output projection kernels [embed, heads, kv]) and back."""
    @reshape
    def fwd(a):
        return a.reshape(a.shape[0], n, -1)

    def back(a):
        return a.reshape(a.shape[0], -1)
    return fwd, back


def _locate(path: str, scanned: bool) -> tuple[str, int | None]:
    """Unscanned path -> (leaf path in this layout, layer index or None)."""
    parts = path.split("/")
    for j, p in enumerate(parts):
        m = _LAYER.match(p)
        if m and scanned:
            return "/".join(parts[:j] + ["layers"] + parts[j + 1:]), int(m.group(1))
    return path, None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def default_threads() -> int:
    """Copy threads for `load`: the cores this process may run on (at most 8: beyond
    that the copies are bound by memory bandwidth)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def load(reader: Reader, entries: list[Entry], shapes: dict[str, tuple[int, ...]],
         scanned: bool, dtype=None, ignore: Callable[[str], bool] = lambda k: False,
         what: str = "checkpoint", threads: int | None = None, read: bool = True) -> dict:
    """Reads `entries` from `reader` into a params tree of the given leaf `shapes`.

    dtype: target dtype (None = each tensor's stored dtype). Keys not covered by an entry
    and not `ignore`d are an error (an "extra key"), as are missing keys and shapes that
    do not match the model config: all checked, and every leaf allocated, before any
    weight is read. Then `threads` workers (default: the usable cores) each map one
    entry's tensors, copy them into their leaves and unmap them (at most `threads`
    tensors are mapped at a time; the result does not depend on `threads`). A `plain`
    entry whose stored dtype is the target's is instead read from the file straight into
    its destination (`Reader.read`: one copy, no mapping); `read=False` maps those too.
    """
    used = {k for e in entries for k in e.hf}
    extra = sorted(k for k in reader.keys() if k not in used and not ignore(k))
    if extra:
        raise ConversionError(
            f"{reader.file_of(extra[0])}: {len(extra)} unexpected tensor(s) for this {what} config, e.g. "
            f"{extra[:5]} (wrong architecture or config.json does not match the weights)")
    for e in entries:
        for k in e.hf:
            if k not in reader:
                raise ConversionError(f"{reader.file_of(k)}: missing tensor {k!r} needed by the "
                                      f"{what} config (is it the right checkpoint?)")
    leaves: dict[str, np.ndarray] = {}
    jobs = [(e, _targets(reader, e, leaves, shapes, scanned, dtype, what)) for e in entries]
    for leaf in shapes:
        if leaf not in leaves:
            raise ConversionError(f"{reader.source}: no tensor provides param {leaf!r}")
    run = functools.partial(_copy_entry, reader, read and hasattr(reader, "read_into"))
    threads = default_threads() if threads is None else max(1, int(threads))
    if threads == 1:
        for job in jobs:
            run(job)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads, "vlm_jax-convert") as pool:
            futures = [pool.submit(run, job) for job in jobs]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return unflatten(leaves)


def _shadow(reader, key: str) -> np.ndarray:
    """A stand-in for tensor `key` with its shape and dtype and no data (all strides 0):
    the transforms give the shapes and dtypes of their results without reading a byte."""
    return np.broadcast_to(np.zeros((), reader.dtype(key)), reader.shape(key))


def _targets(reader, e: Entry, leaves, shapes, scanned, dtype, what) -> list[np.ndarray]:
    """The destinations (a leaf, or one layer's slice of it) of one entry's arrays,
    checked against the config's shapes; leaves are allocated on first use."""
    out = []
    for path, a in zip(e.ours, e.to_ours(*(_shadow(reader, k) for k in e.hf)), strict=True):
        leaf, layer = _locate(path, scanned)
        if leaf not in shapes:
            raise ConversionError(f"{reader.file_of(e.hf[0])}: tensor {e.hf[0]!r} maps to "
                                  f"param {leaf!r}, which the {what} config does not have")
        full = tuple(shapes[leaf])
        want = full[1:] if layer is not None else full
        if not _fits(tuple(a.shape), want):
            raise ConversionError(
                f"{reader.file_of(e.hf[0])}: tensor {e.hf[0]!r} of shape "
                f"{reader.shape(e.hf[0])} gives param {path!r} of shape {tuple(a.shape)}, "
                f"but the {what} config expects {want}")
        if leaf not in leaves:
            leaves[leaf] = empty(full, dtype or a.dtype)
        out.append(leaves[leaf] if layer is None else leaves[leaf][layer])
    return out


def _fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A transform's result fits its destination: the same shape, or the destination's
    leading axis split in two (InternLM2's q heads as [kv_heads, group, ...])."""
    return got == want or (len(got) == len(want) + 1 and got[2:] == want[1:]
                           and got[0] * got[1] == want[0])


def _copy_entry(reader, read: bool, job: tuple[Entry, list[np.ndarray]]) -> None:
    e, targets = job
    if read and e.plain and targets[0].dtype == reader.dtype(e.hf[0]):
        prefault(targets[0])
        reader.read_into(e.hf[0], targets[0])
        return
    with contextlib.ExitStack() as stack:   # the mappings close once copied from
        _copy_all(targets, e.to_ours(*[stack.enter_context(reader.mapped(k)) for k in e.hf]))


def _copy_all(targets, arrays) -> None:
    """(A call of its own: no view of a mapping outlives it, so the mapping can close.)"""
    for dst, a in zip(targets, arrays, strict=True):
        prefault(dst)
        copy_into(dst.reshape(a.shape), a)   # a contiguous leaf slice: reshapes are views


def export(params: dict, entries: list[Entry], scanned: bool
           ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (checkpoint key, array) for every entry from a params tree, lazily; arrays
    are views where the transforms allow (the writer makes each contiguous in turn)."""
    flat = flatten(params)
    for e in entries:
        arrays = []
        for path in e.ours:
            leaf, layer = _locate(path, scanned)
            if leaf not in flat:
                raise ConversionError(f"params have no {leaf!r} (needed for {e.hf[0]!r})")
            a = flat[leaf] if layer is None else flat[leaf][layer]
            arrays.append(np.asarray(a))
        yield from zip(e.hf, e.to_hf(*arrays))
