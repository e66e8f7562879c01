"""The Grain pipeline of a run: source -> subset/epoch order -> transforms -> batches.

Train stream (endless). Global position p of the stream is example p mod n of epoch
p // n of the train subset (`subsets.Split`). Step s covers positions [s*B, (s+1)*B);
process i of P reads the block [s*B + i*b, s*B + (i+1)*b) (b = B // P), so the P
per-process batches concatenated are exactly the one-process batch. One Grain element is
one step's chunk of b samples (so worker processes ship whole chunks, not samples):

    MapDataset.range(step) -> [(position, record)] * b -> load + decode + resize + tokenise
      -> to_iter_dataset (data.num_threads) [-> mp_prefetch (data.num_workers processes)]
      -> _Assemble (main process: drop + count bad samples, pack, stack, normalise)

A chunk is loaded sample by sample, or, when the source reads many records at once
(`get_batch`: the synthetic source) and the image transforms have `map_batch`, with a
few array calls for the whole chunk (`LoadExample.prepare_batch`): the same rows (tests
compare the two), without per-sample Python; a bad sample in such a chunk sends the
chunk down the per-sample path, which names and skips it.

A bad sample travels as a `_Bad(reason)` marker instead of being filtered out inside the
workers, so the output is identical for any number of workers; `_Assemble` drops it,
counts it (and takes the next samples in order to fill the batch) and stops the run with
`BadDataError` above `data.max_bad_fraction`.

Without images (`train_iterator(..., no_images=BadRecords)`, what the frozen-feature cache
reads): the source is opened without images and no image is decoded or resized; the
records the image path found bad (the cache's marks, with their reasons) are bad here
too, so every batch is the image path's batch without `pixels` (same rows, `valid`,
`_records`, skip counters, iterator state).

Batch metadata (keys starting with "_", never for the model): `_skipped/<reason>` and
`_seen` (samples read, good + bad), `_truncated` (captions cut to fit), all cumulative
since the start of the run (they live in the iterator state), and `_epoch` (epochs of
the train subset consumed, fractional).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Iterator

import grain
import ml_collections as mlc
import numpy as np

from vlm_jax.data import sources as S
from vlm_jax.data import transforms as T
from vlm_jax.data.errors import BadDataError, BadSample
from vlm_jax.data.subsets import Split, parse_size
from vlm_jax.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

KINDS = ("vlm", "lm", "clip")
BAD_CHECK_MIN_SEEN = 100   # judge the bad fraction only after this many samples
_ENDLESS = 2**62
MIN_SHM_BYTES = 1 << 18  # worker -> main: smaller arrays are pickled (cheaper than a segment)


@dataclasses.dataclass(frozen=True)
class _Bad:
    reason: str
    position: int = -1


class BadRecords:
    """Record indices known to be bad samples, with their reasons (sorted arrays: cheap
    to look up and to pickle into worker processes)."""

    def __init__(self, records=(), reasons=()):
        records = np.asarray(records, np.int64).reshape(-1)
        reasons = np.asarray(reasons, str).reshape(-1)
        if len(records) != len(reasons):
            raise ValueError(f"{len(records)} bad records for {len(reasons)} reasons")
        order = np.argsort(records, kind="stable")
        self.records, self.reasons = records[order], reasons[order]

    def __len__(self) -> int:
        return len(self.records)

    def _positions(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into the sorted arrays, whether each record is there)."""
        if not len(self.records):
            return np.zeros(np.shape(records), np.int64), np.zeros(np.shape(records), bool)
        pos = np.minimum(np.searchsorted(self.records, records), len(self.records) - 1)
        return pos, self.records[pos] == records

    def reason(self, record: int) -> str | None:
        """The reason `record` is bad, or None."""
        pos, hit = self._positions(np.asarray([record], np.int64))
        return str(self.reasons[pos[0]]) if hit[0] else None

    def any_of(self, records) -> bool:
        return bool(len(self.records)) and bool(
            self._positions(np.asarray(records, np.int64))[1].any())


# ----------------------------------------------------------------------------- config
def data_config(config) -> mlc.ConfigDict:
    """`config.data` with its named dataset resolved (configs/datasets.py)."""
    from configs import datasets
    return datasets.resolve(config.data)


def num_image_tokens(config) -> int:
    """Image tokens per example of kind "vlm" (encoder features after the projector)."""
    from vlm_jax.models import projector, vit
    return projector.num_output_tokens(config.model.projector,
                                       vit.num_feature_tokens(config.model.vision))


def sequence_spec(config) -> T.SequenceSpec:
    kind = config.model.kind
    d = config.data
    if kind == "vlm":
        return T.SequenceSpec("vlm", d.seq_len, num_image_tokens(config), d.template,
                              int(config.model.image_token_id))
    if kind == "lm":
        return T.SequenceSpec("lm", d.seq_len)
    if kind == "clip":
        return T.SequenceSpec("clip", min(d.seq_len, int(config.model.clip.text_max_len)))
    raise ValueError(f"model.kind={kind!r} has no data pipeline; use one of {KINDS + ('native',)}")


def source_for(config, with_image: bool | None = None):
    """The random-access source of `config.data` (after resolving `data.name`).

    `len(src)` and `src[i] -> {"image", "text", "key", "source"}` (raises BadSample).
    with_image: read images (default: unless model.kind is "lm").
    """
    d = data_config(config)
    size = int(config.model.vision.image_size) if "vision" in config.model else 64
    return S.open_source(d.source, d.path, seed=d.seed, image_column=d.image_column,
                         text_column=d.text_column, image_size=size if size <= 256 else 64,
                         caption_noise=float(d.caption_noise),
                         with_image=(config.model.get("kind") != "lm" if with_image is None
                                     else bool(with_image)),
                         shard_cache=str(d.get("shard_cache", "") or ""))


def split_for(config, source=None) -> Split:
    """Eval split + train subset of the run (record indices of `source_for(config)`)."""
    d = data_config(config)
    src = source if source is not None else source_for(config)
    what = f"data.source={d.source!r} path={d.path!r}"
    order = getattr(src, "order", "permute")
    total = None
    if hasattr(src, "ensure"):  # lazily indexed (tar): index only what the subsets need
        n, ev = parse_size(d.n), max(parse_size(d.eval_n), 0) if d.eval_n else 0
        total = None if n < 0 else src.ensure(n + ev)
    total = len(src) if total is None else total
    return Split.create(total, d.n, d.eval_n, d.seed, config.train.seed, what, order)


def data_info(config) -> dict:
    """Sizes a trainer reports: subset sizes, epochs the steps ask for, tokens per row."""
    spec = sequence_spec(config)
    split = split_for(config)
    examples = int(config.train.steps) * int(config.train.batch_size)
    return {"data_size": split.n, "eval_size": split.eval_n, "epochs": examples / split.n,
            "num_image_tokens": spec.num_image_tokens, "seq_len": spec.length}


# ----------------------------------------------------------------------------- per sample
class LoadExample(grain.transforms.Map):
    """(position, record) -> transformed example, or `_Bad` for an unusable sample."""

    def __init__(self, source, transforms: list, with_image: bool = True,
                 keep_key: bool = False, bad: BadRecords | None = None):
        self.source, self.transforms, self.keep_key = source, transforms, keep_key
        self.bad = bad if bad is not None and len(bad) else None  # known bad records
        self.keys = _EXAMPLE_KEYS | ({"image"} if with_image else set())
        last = transforms[-1] if transforms else None
        # A final TokenizeCaption builds token rows; `prepare` stops before that step.
        self.tokenize = last if isinstance(last, T.TokenizeCaption) else None

    def prepare(self, item):
        """(position, record) -> `_Bad`, or (example without its token rows, caption);
        the caption is None without a final TokenizeCaption (the example is complete)."""
        position, record = item
        if record < 0:
            return _Bad("", position)  # padding of the eval split
        reason = self.bad.reason(record) if self.bad is not None else None
        if reason is not None:
            log.info("skipping record %d: %s (found when its image was read)", record, reason)
            return _Bad(reason, position)
        key, shard = "?", "?"
        text = None
        try:
            sample = self.source[record]
            key, shard = sample.get("key", "?"), sample.get("source", "?")
            for t in (self.transforms[:-1] if self.tokenize else self.transforms):
                sample = t.map(sample)
            if self.tokenize:
                sample, text = self.tokenize.caption(sample)
        except BadSample as e:
            log.info("skipping sample %s of %s (record %d): %s", key, shard, record, e)
            return _Bad(e.reason, position)
        out = {k: v for k, v in sample.items() if k in self.keys}
        out["_position"] = position
        out["_record"] = record
        if self.keep_key:
            out["_key"] = key
        return out, text

    def map(self, item):
        prepared = self.prepare(item)
        if isinstance(prepared, _Bad):
            return prepared
        out, text = prepared
        if text is not None:
            out.update({k: v[0] for k, v in self.tokenize.build([text]).items()})
        return out

    def batchable(self) -> bool:
        """Whether `prepare_batch` applies: the source reads many records in one call
        (`get_batch`) and every transform before the tokenizer has `map_batch`."""
        ts = self.transforms[:-1] if self.tokenize else self.transforms
        return (hasattr(self.source, "get_batch") and self.tokenize is not None
                and all(hasattr(t, "map_batch") for t in ts))

    def prepare_batch(self, items) -> dict | None:
        """`LoadChunk.map` of a whole chunk ((position, record) pairs: a list or an int
        array [b, 2]) with array ops (see `batchable`): the rows
        `prepare` + `build` would give, or None when a sample is bad (the per-sample path
        then names and skips it)."""
        positions, records = np.asarray(items, np.int64).reshape(-1, 2).T
        good = records >= 0  # (negative: padding of the eval split)
        if self.bad is not None and self.bad.any_of(records[good]):
            return None
        try:
            batch = self.source.get_batch(records[good])
            for t in self.transforms[:-1]:
                batch = t.map_batch(batch)
            texts = T.caption_texts(batch["text"])
        except BadSample:
            return None
        rows = {}
        if good.any():
            rows = {k: v for k, v in batch.items() if k in self.keys}
            rows["_position"], rows["_record"] = positions[good], records[good]
            if self.keep_key:
                rows["_key"] = np.asarray(batch["key"])
            rows.update(self.tokenize.build(texts))
        return {"rows": rows, "order": _chunk_order(
            [None if ok else _Bad("", p) for p, ok in zip(positions.tolist(), good.tolist())])}


def _chunk_order(bad: list) -> list:
    """A chunk's order (`unpack_chunk`): per sample, its index among the chunk's good rows,
    or its `_Bad` marker (`bad`: the marker, or None for a good sample)."""
    order, k = [], 0
    for b in bad:
        order.append(k if b is None else b)
        k += b is None
    return order


class LoadChunk(grain.transforms.Map):
    """A list of (position, record) -> the `LoadExample` results, collated: the good
    examples stacked key by key, their token rows built together (a worker process then
    ships a few big arrays instead of many small ones) plus the order with `_Bad` markers.
    `unpack_chunk` restores the list. Sources that read many records at once (synthetic)
    take `LoadExample.prepare_batch`: the same chunk from a few array ops."""

    def __init__(self, load: LoadExample):
        self.load = load
        self.batched = load.batchable()

    def map(self, items):
        if self.batched:
            chunk = self.load.prepare_batch(items)
            if chunk is not None:
                return chunk
        prepared = [self.load.prepare(item) for item in items]
        good = [p for p in prepared if not isinstance(p, _Bad)]
        order = _chunk_order([p if isinstance(p, _Bad) else None for p in prepared])
        rows = {}
        if good:
            rows = {key: np.stack([np.asarray(ex[key]) for ex, _ in good]) for key in good[0][0]}
            if self.load.tokenize:
                rows.update(self.load.tokenize.build([text for _, text in good]))
        return {"rows": rows, "order": order}


def unpack_chunk(chunk: dict) -> list:
    rows = chunk["rows"]
    return [i if isinstance(i, _Bad) else {k: v[i] for k, v in rows.items()}
            for i in chunk["order"]]


_EXAMPLE_KEYS = frozenset(("tokens", "targets", "loss_mask", "positions",
                           "segment_ids", "visual_mask", "_truncated"))


def example_transforms(config, tokenizer=None, images: bool = True) -> list:
    """The MapTransforms that turn a raw sample into one example of `config.model.kind`
    (images=False: without its image)."""
    spec = sequence_spec(config)
    d = config.data
    tok = tokenizer if tokenizer is not None else load_tokenizer(d.tokenizer)
    ts = []
    if spec.kind in ("vlm", "clip") and images:
        size = int(config.model.vision.image_size)
        ts += [T.DecodeImage(draft_size=size, as_pil=True),
               T.ResizeImage(size, d.get("resize", "crop"))]
    ts.append(T.TokenizeCaption(tok, spec))
    return ts


def _blank(spec: T.SequenceSpec, image_size: int, pad_id: int) -> dict:
    t = spec.length
    ex = {"tokens": np.full((t,), pad_id, np.int32), "segment_ids": np.zeros((t,), np.int32)}
    if spec.kind != "clip":
        ex.update(targets=np.full((t,), pad_id, np.int32), loss_mask=np.zeros((t,), np.float32),
                  positions=np.zeros((t,), np.int32))
    if spec.kind == "vlm":
        ex["visual_mask"] = np.zeros((t,), bool)
    if spec.kind in ("vlm", "clip") and image_size > 0:
        ex["image"] = np.zeros((image_size, image_size, 3), np.uint8)
    ex["_record"] = np.int64(-1)
    return ex


def _stack(rows: list[dict], valid: np.ndarray) -> dict:
    return _finish({k: np.stack([r[k] for r in rows]) for k in rows[0]
                    if not k.startswith("_") or k == "_record"}, valid)


def _finish(stacked: dict, valid: np.ndarray) -> dict:
    """Stacked example fields -> a batch: `image` becomes `pixels` (uint8, normalised by
    the model on device), `_record` becomes `_records` (record index of each row, -1 for
    blank/padding rows, for the frozen-feature cache)."""
    batch = {k: v for k, v in stacked.items() if not k.startswith("_")}
    if "image" in batch:
        batch["pixels"] = batch.pop("image")
    batch["valid"] = valid.astype(np.float32)
    records = stacked.get("_record")
    batch["_records"] = (np.asarray(records, np.int64) if records is not None
                         else np.full((len(valid),), -1, np.int64))
    return batch


# ----------------------------------------------------------------------------- assembly
class _Assemble(grain.IterDataset):
    """Main-process tail of the train pipeline (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, spec: T.SequenceSpec,
                 pad_id: int, packing: bool, max_bad_fraction: float, n: int,
                 shard_errors: dict[str, int]):
        super().__init__(parent)
        self.batch_size, self.spec, self.pad_id, self.packing = batch_size, spec, pad_id, packing
        self.max_bad_fraction, self.n, self.shard_errors = max_bad_fraction, n, shard_errors

    def __iter__(self):
        return _AssembleIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"_Assemble(batch_size={self.batch_size}, packing={self.packing})"


class _AssembleIterator(grain.DatasetIterator):
    """Reads chunks (lists of examples / `_Bad` markers) and emits batches.

    State = the parent's state before the current chunk + how many of its items were
    consumed + the cumulative counters; restoring re-reads that chunk and skips them.
    """

    def __init__(self, parent: grain.DatasetIterator, ds: _Assemble):
        super().__init__(parent)
        self._ds = ds
        self._counts: collections.Counter = collections.Counter(ds.shard_errors)
        self._seen = 0
        self._truncated = 0
        self._last_position = -1
        self._chunk: list | None = None
        self._pos = 0
        self._chunk_state = None
        self._skip = 0  # items of the first chunk already consumed (after set_state)

    # -- state
    def get_state(self) -> dict:
        partial = self._chunk is not None and self._pos < len(self._chunk)
        return {"parent": self._chunk_state if partial else self._parents[0].get_state(),
                "skip": self._pos if partial else 0, "counts": dict(self._counts),
                "seen": self._seen, "truncated": self._truncated,
                "last_position": self._last_position}

    def set_state(self, state: dict) -> None:
        self._parents[0].set_state(state["parent"])
        self._counts = collections.Counter(state["counts"])
        self._seen = int(state["seen"])
        self._truncated = int(state["truncated"])
        self._last_position = int(state["last_position"])
        self._chunk, self._pos, self._chunk_state = None, 0, None
        self._skip = int(state.get("skip", 0))

    # -- reading
    def _peek_good(self) -> dict:
        """The next usable example, without consuming it (bad ones on the way are)."""
        while True:
            while self._chunk is None or self._pos >= len(self._chunk):
                self._chunk_state = self._parents[0].get_state()
                self._chunk = unpack_chunk(next(self._parents[0]))
                self._pos, self._skip = self._skip, 0
            ex = self._chunk[self._pos]
            if not isinstance(ex, _Bad):
                return ex
            self._pos += 1
            self._seen += 1
            self._counts[ex.reason] += 1
            self._last_position = max(self._last_position, ex.position)
            self._check_bad()

    def _take(self) -> dict:
        ex = self._peek_good()
        self._pos += 1
        self._seen += 1
        self._truncated += int(ex.get("_truncated", 0))
        self._advance(int(ex["_position"]))
        return ex

    def _advance(self, position: int) -> None:
        """Stream position `position` was consumed (logs when a new epoch starts)."""
        if position // self._ds.n > self._last_position // self._ds.n and position >= self._ds.n:
            log.info("data: the train subset (n=%d) is exhausted; epoch %d starts",
                     self._ds.n, position // self._ds.n + 1)
        self._last_position = max(self._last_position, position)

    def _check_bad(self) -> None:
        bad = sum(self._counts.values())
        limit = self._ds.max_bad_fraction
        if self._seen >= BAD_CHECK_MIN_SEEN and bad > limit * self._seen:
            counts = dict(self._counts)
            raise BadDataError(
                f"{bad} of {self._seen} samples read were bad ({bad / self._seen:.1%} > "
                f"data.max_bad_fraction={limit:g}); by reason: {counts}. Check the data "
                "(python -m vlm_jax.data stats ...) or raise data.max_bad_fraction",
                counts, self._seen)

    def _packed_row(self) -> dict:
        length = self._ds.spec.length
        row: list[dict] = []
        used = 0
        while used < length:
            n = T.example_length(self._peek_good())
            if row and used + n > length:
                break  # it starts the next row
            row.append(self._take())
            used += n
        return T.pack_rows(row, length, self._ds.pad_id)

    def _whole_chunk(self) -> dict | None:
        """Fast path: when no chunk is half-read, the next chunk is read and, if it is
        exactly one batch of good examples, returned as stacked arrays (no unpacking or
        re-stacking: the worker's shared-memory arrays become the batch). Otherwise the
        chunk is kept for `_take` and None returned."""
        if self._ds.packing or self._skip or (self._chunk is not None
                                               and self._pos < len(self._chunk)):
            return None
        state = self._parents[0].get_state()
        chunk = next(self._parents[0])
        order = chunk["order"]
        if len(order) != self._ds.batch_size or any(isinstance(i, _Bad) for i in order):
            self._chunk_state, self._chunk, self._pos = state, unpack_chunk(chunk), 0
            return None
        self._chunk, self._pos, self._chunk_state = None, 0, None
        rows = chunk["rows"]
        self._seen += len(order)
        self._truncated += int(np.sum(rows["_truncated"]))
        self._advance(int(np.max(rows["_position"])))
        return rows

    def __next__(self) -> dict:
        b = self._ds.batch_size
        rows = self._whole_chunk()
        if rows is not None:
            batch = _finish(rows, np.ones((b,), np.float32))
        elif self._ds.packing:
            batch = _stack([self._packed_row() for _ in range(b)], np.ones((b,), np.float32))
        else:
            batch = _stack([self._take() for _ in range(b)], np.ones((b,), np.float32))
        batch.update(metadata(self._counts, self._seen, self._truncated))
        batch["_epoch"] = np.float64((self._last_position + 1) / self._ds.n)
        return batch


def metadata(counts: dict, seen: int, truncated: int) -> dict:
    out = {f"_skipped/{r}": np.int64(counts.get(r, 0)) for r in T.REASONS}
    for r, c in counts.items():
        if r and r not in T.REASONS:
            out[f"_skipped/{r}"] = np.int64(c)
    out["_seen"] = np.int64(seen)
    out["_truncated"] = np.int64(truncated)
    return out


def _shard_error_counts(source) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for path, err in getattr(source, "errors", ()):
        reason = "unreadable_shard" if err.startswith("unreadable") else "truncated_shard"
        log.warning("data: %s: %s", path, err)
        counts[reason] += 1
    return dict(counts)


def _per_process(batch_size: int, process_count: int, what: str) -> int:
    if batch_size % process_count:
        raise ValueError(f"{what}={batch_size} is not divisible by the {process_count} "
                         "processes; choose a multiple")
    return batch_size // process_count


def _threads(d) -> int:
    """Grain read threads per process (`data.num_threads`)."""
    return max(1, int(d.get("num_threads", 4)))


def _chunk_read_options(d) -> grain.ReadOptions:
    """Threads loading chunks (one Grain element = one batch of samples) in a process."""
    threads = _threads(d)
    return grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=max(threads, int(d.prefetch)))


def _read_options(config, per_batch: int) -> grain.ReadOptions:
    """One Grain element per example (feature cache, native): prefetch two batches."""
    return grain.ReadOptions(num_threads=_threads(config.data),
                             prefetch_buffer_size=max(2 * per_batch, 16))


def _absl_flags_ready() -> None:
    """Grain's worker processes read absl flags; outside `absl.app` (tests, notebooks,
    the stats CLI) nothing parsed them, so use their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _loader(config, tok, no_images: BadRecords | None):
    """(source, LoadChunk) of a train or eval stream, with or without images."""
    images = no_images is None and sequence_spec(config).kind != "lm"
    src = source_for(config, with_image=images)
    load = LoadExample(src, example_transforms(config, tok, images=images), images,
                       bad=no_images)
    return src, LoadChunk(load)


def _maybe_native(config):
    if config.model.kind == "native":
        from vlm_jax.data import native  # helper F's module, imported only when used
        return native
    return None


# ----------------------------------------------------------------------------- public API
def train_iterator(config, process_index: int = 0, process_count: int = 1,
                   no_images: BadRecords | None = None):
    """Endless, checkpointable (get_state/set_state) iterator of per-process batches.
    no_images: read no images (batches without `pixels`); these records are bad samples
    (see the module docstring)."""
    native = _maybe_native(config)
    if native is not None:
        if no_images is not None:
            raise ValueError("no_images: the native pipeline always reads images")
        return native.train_iterator(config, process_index, process_count)
    config = _resolved(config)
    d = config.data
    spec = sequence_spec(config)
    global_b = int(config.train.batch_size)
    b = _per_process(global_b, process_count, "train.batch_size")
    if d.packing and spec.kind != "lm":
        raise ValueError(f"data.packing=True needs model.kind='lm' (got {spec.kind!r}): "
                         "one image per row leaves nothing to pack")
    tok = load_tokenizer(d.tokenizer)
    src, load = _loader(config, tok, no_images)
    split = split_for(config, src)
    offset = process_index * b

    def locate(step: int):  # this process's (position, record) pairs of one step, [b, 2]
        first = step * global_b + offset
        return np.stack([np.arange(first, first + b, dtype=np.int64),
                         split.train_records_at(first, b)], 1)

    # One element per step and process (a chunk of b samples): workers ship whole chunks.
    ds = grain.MapDataset.range(0, _ENDLESS).map(locate)
    ds = ds.map(load)
    it = ds.to_iter_dataset(_chunk_read_options(d))
    if int(d.num_workers) > 0:
        _absl_flags_ready()
        # Small arrays (tokens, masks) travel pickled with the chunk; only big ones (pixels)
        # get a shared-memory segment each (create + map + unlink cost more than a copy).
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(d.num_workers), per_worker_buffer_size=max(2, int(d.prefetch))))
    return iter(_Assemble(it, batch_size=b, spec=spec, pad_id=tok.pad_id,
                          packing=bool(d.packing), max_bad_fraction=float(d.max_bad_fraction),
                          n=split.n, shard_errors=_shard_error_counts(src)))


class EvalBatches:
    """The eval split once, in fixed-size per-process batches (re-iterable, has len).

    The split is padded to a whole number of global batches; padding rows and bad samples
    are blank rows with `valid`=0 and `loss_mask`=0 (every process runs the same number
    of steps). Each batch carries `_skipped/<reason>` counts of bad eval samples so far.
    """

    def __init__(self, config, process_index: int = 0, process_count: int = 1,
                 no_images: BadRecords | None = None):
        config = _resolved(config)
        self.config = config
        self.spec = sequence_spec(config)
        self.global_b = int(config.train.eval_batch_size or config.train.batch_size)
        self.b = _per_process(self.global_b, process_count, "train.eval_batch_size")
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.source, self._load = _loader(config, self.tokenizer, no_images)
        self.split = split_for(config, self.source)
        self.num_batches = math.ceil(self.split.eval_n / self.global_b)
        self.offset = process_index * self.b
        size = (int(config.model.vision.image_size)
                if self.spec.kind != "lm" and no_images is None else 0)
        self._blank = _blank(self.spec, size, self.tokenizer.pad_id)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        b, split = self.b, self.split

        def locate(step: int):  # this process's (position, record) pairs of one batch
            first = step * self.global_b + self.offset
            return [(p, split.eval_record(p) if p < split.eval_n else -1)
                    for p in range(first, first + b)]

        # One Grain element per batch, as in training (rows built together).
        ds = grain.MapDataset.range(0, self.num_batches).map(locate).map(self._load)
        it = iter(ds.to_iter_dataset(_chunk_read_options(self.config.data)))
        counts: collections.Counter = collections.Counter()
        seen = 0
        for _ in range(self.num_batches):
            rows, valid = [], np.zeros((b,), np.float32)
            for r, ex in enumerate(unpack_chunk(next(it))):
                if isinstance(ex, _Bad):
                    if ex.reason:
                        counts[ex.reason] += 1
                        seen += 1
                    rows.append(self._blank)
                else:
                    seen += 1
                    rows.append(ex)
                    valid[r] = 1.0
            batch = _stack(rows, valid)
            batch.update(metadata(counts, seen, 0))
            yield batch


def eval_batches(config, process_index: int = 0, process_count: int = 1,
                 no_images: BadRecords | None = None):
    """The whole eval split once; the last batch padded (valid=0, loss_mask=0).
    no_images: as in `train_iterator`."""
    native = _maybe_native(config)
    if native is not None:
        if no_images is not None:
            raise ValueError("no_images: the native pipeline always reads images")
        return native.eval_batches(config, process_index, process_count)
    return EvalBatches(config, process_index, process_count, no_images)


def _resolved(config):
    """A copy of `config` whose `data` has the named dataset filled in."""
    out = mlc.ConfigDict(config.to_dict())
    out.data = data_config(config)
    return out


def record_positions(config, steps: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
    """Record indices this process reads in the first `steps` steps, [steps, b] (for the
    frozen-feature cache; bad samples among them are skipped by the pipeline)."""
    config = _resolved(config)
    split = split_for(config)
    global_b = int(config.train.batch_size)
    b = _per_process(global_b, process_count, "train.batch_size")
    out = np.empty((steps, b), np.int64)
    for s in range(steps):
        out[s] = split.train_records_at(s * global_b + process_index * b, b)
    return out

