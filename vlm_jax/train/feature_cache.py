"""Frozen-feature cache: compute a frozen encoder's projector inputs once, reuse them.

When the vision encoder is frozen (the compositional study trains only the projector), its
features for a record never change. With `train.feature_cache=True` a run computes the
features of every record it will read (its train subset and its eval split) once, stores
them under a key that identifies everything they depend on, and trains on batches where
`pixels` is replaced by `features` [b, K, Dv] (the VLM then skips its vision tower).

Reuse: the store is keyed by *record index* of the data source, so every subset of a
source is served by the same store: caching the largest (nested) subset serves all smaller
ones, every LLM size, every seed and the eval split; a run computes only the records the
store does not hold yet (a new shard). The key hashes (`cache_key`):
- the encoder config (`model.vision` without execution-only fields like `scan_layers`,
  `remat`), the compute / param / frozen dtypes;
- the identity of `model.vision.init_from` (every file's path, size and mtime; a random
  init is identified by `train.seed`);
- the data source identity (resolved `data` fields that decide a record's image: source,
  path, image column, seed, resize mode; not the dataset's name nor its caption noise:
  a clean and a noisy-caption variant of one source share the store) and the resolution;
so any change lands in a new key (a new directory) and never reads stale features.

Layout: `DIR/<key>/meta.json` (the key's fields, feature shape and dtype) and one
directory per shard `DIR/<key>/shard-<id>/{ids.npy, features.npy, bad.npy, bad_reasons.npy}`
(bad: records whose image the pipeline skipped, with its skip reason), written to a
temporary directory and renamed into place (atomic: a crash leaves no partial shard).
`features.npy` is memory-mapped when read. DIR is `train.feature_cache_dir`, or
`feature_cache/` next to the run's workdir (so the runs of one grid stage share it).

Trainer hook: `attach(run, frozen) -> frozen` (after params exist, before compiling):
checks the encoder is frozen, fills the store, swaps the run's data source for
`CachedData` and its batch specs (`pixels` -> `features`), and drops the vision params
from the frozen tree the step receives (unless `train.save_frozen`). The pipeline marks
each row's record index in the batch metadata `_records` (-1 for padding rows).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Iterable

import grain
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("vlm_jax.feature_cache")

# 2: encoders with [out, in] kernels (layers.Linear), new inits; 3: bad_reasons.npy
FORMAT_VERSION = 3
# model.vision fields that change how the encoder runs, not what it computes.
_EXEC_ONLY = ("init_from", "scan_layers", "remat")
# resolved data fields that decide the image of a record index (`pipeline.source_for`
# opens the source from these; `name` only names them and `caption_noise` changes captions,
# never images: the clean and noisy variants of a source share one store).
_DATA_FIELDS = ("source", "path", "image_column", "seed", "resize")
# numpy has no bfloat16: such features are stored as their bits.
_BITS = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


class FeatureCacheError(ValueError):
    """A run that cannot use the feature cache (message names the field to change)."""


# ----------------------------------------------------------------------------- config
def enabled(config) -> bool:
    return bool(config.train.get("feature_cache", False))


def cache_dir(config, workdir: str) -> str:
    d = config.train.get("feature_cache_dir", "") or ""
    if d:
        return os.path.abspath(d)
    return os.path.join(os.path.dirname(os.path.abspath(workdir)), "feature_cache")


def path_identity(path: str, max_files: int = 20000) -> str:
    """A hash of every file under `path` (relative path, size, mtime): changes when a
    checkpoint is added, rewritten or replaced."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FeatureCacheError(f"model.vision.init_from={path!r} does not exist")
    h = hashlib.sha256()
    files = []
    if os.path.isfile(path):
        files.append(("", os.stat(path)))
    else:
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                files.append((os.path.relpath(p, path), os.stat(p)))
                if len(files) > max_files:
                    raise FeatureCacheError(f"model.vision.init_from={path!r} holds more than "
                                            f"{max_files} files; point it at the checkpoint")
    for rel, st in files:
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{path}@{h.hexdigest()[:16]}"


def _data_config(config):
    try:
        from vlm_jax.data import pipeline
        return pipeline.data_config(config)
    except ImportError:  # pragma: no cover - the pipeline is part of the package
        return config.data


def key_fields(config) -> dict:
    """Everything the cached features depend on (see the module docstring)."""
    m = config.model
    vision = {k: v for k, v in m.vision.to_dict().items() if k not in _EXEC_ONLY}
    src = m.vision.get("init_from", "") or ""
    init = path_identity(src) if src else f"random:train.seed={int(config.train.seed)}"
    d = _data_config(config)
    data = {k: d.get(k, None) for k in _DATA_FIELDS}
    if d.get("source") == "synthetic":  # procedural records: the generator decides them
        from vlm_jax.data import synthetic
        data["generator"] = synthetic.GENERATOR_VERSION
    return {"version": FORMAT_VERSION, "kind": m.kind, "vision": vision, "init_from": init,
            "dtype": m.get("dtype", "float32"), "param_dtype": m.get("param_dtype", "float32"),
            "frozen_dtype": m.get("frozen_dtype", "float32"), "data": data}


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()
                          ).hexdigest()[:24]


def cache_key(config) -> str:
    """The store directory name of `config`'s features."""
    return _hash(key_fields(config))


# ----------------------------------------------------------------------------- the store
@dataclasses.dataclass
class _Shard:
    ids: np.ndarray
    features: np.ndarray  # memory-mapped


class FeatureStore:
    """Features of record indices under one key: `DIR/<key>/`. Readers memory-map the
    shards; `add` writes one new shard atomically. Safe for concurrent writers (two runs
    that compute the same records write two shards; either serves)."""

    def __init__(self, root: str, key: str, fields: dict | None = None):
        self.path = os.path.join(root, key)
        self.key = key
        self.fields = fields or {}
        self.meta: dict | None = None
        self._shards: list[_Shard] = []
        self._bad = np.zeros((0,), np.int64)
        self._bad_reasons = np.zeros((0,), str)
        self.reload()

    # -- reading
    def reload(self) -> None:
        meta = os.path.join(self.path, "meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                self.meta = json.load(f)
        self._shards, bad, reasons = [], [], []
        if os.path.isdir(self.path):
            for name in sorted(os.listdir(self.path)):
                p = os.path.join(self.path, name)
                if not name.startswith("shard-") or not os.path.isdir(p):
                    continue
                ids = np.load(os.path.join(p, "ids.npy"))
                feats = np.load(os.path.join(p, "features.npy"), mmap_mode="r")
                if len(ids):
                    self._shards.append(_Shard(ids, feats))
                bad.append(np.load(os.path.join(p, "bad.npy")))
                reasons.append(np.load(os.path.join(p, "bad_reasons.npy")))
        self._bad, first = (np.unique(np.concatenate(bad), return_index=True) if bad
                            else (np.zeros((0,), np.int64), np.zeros((0,), np.int64)))
        self._bad_reasons = (np.concatenate(reasons).astype(str)[first] if bad
                             else np.zeros((0,), str))
        if self._shards:
            all_ids = np.concatenate([s.ids for s in self._shards])
            which = np.concatenate([np.full(len(s.ids), i, np.int32)
                                    for i, s in enumerate(self._shards)])
            rows = np.concatenate([np.arange(len(s.ids), dtype=np.int64) for s in self._shards])
            order = np.argsort(all_ids, kind="stable")
            self._ids, self._which, self._rows = all_ids[order], which[order], rows[order]
        else:
            self._ids = np.zeros((0,), np.int64)
            self._which = np.zeros((0,), np.int32)
            self._rows = np.zeros((0,), np.int64)

    @property
    def dtype(self):
        return jnp.dtype(self.meta["dtype"]) if self.meta else None

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        return tuple(self.meta["shape"]) if self.meta else None

    def missing(self, records: np.ndarray) -> np.ndarray:
        """The records that have neither features nor a bad-sample mark."""
        records = np.unique(np.asarray(records, np.int64))
        known = np.isin(records, self._ids) | np.isin(records, self._bad)
        return records[~known]

    def __len__(self) -> int:
        return len(np.unique(self._ids))

    def bad_records(self):
        """The records marked bad (their image could not be used), with their reasons: what
        the pipeline skips when it reads these records without images."""
        from vlm_jax.data.pipeline import BadRecords
        return BadRecords(self._bad, self._bad_reasons)

    def gather(self, records: np.ndarray) -> np.ndarray:
        """Features [len(records), K, D] in the stored dtype; record -1 gives zeros."""
        records = np.asarray(records, np.int64)
        shape = self.feature_shape
        out = np.zeros((len(records),) + tuple(shape), _BITS[self.meta["dtype"]])
        want = records >= 0
        pos = np.searchsorted(self._ids, records[want])
        ok = (pos < len(self._ids)) & (self._ids[np.minimum(pos, len(self._ids) - 1)]
                                       == records[want]) if len(self._ids) else \
            np.zeros(pos.shape, bool)
        if not ok.all():
            lost = records[want][~ok][:5]
            raise FeatureCacheError(f"feature cache {self.path} has no features for records "
                                    f"{lost.tolist()}; delete the directory to rebuild it")
        idx = np.nonzero(want)[0]
        which, rows = self._which[pos], self._rows[pos]
        for s in np.unique(which):
            sel = which == s
            order = np.argsort(rows[sel])  # ascending reads from the memory map
            out[idx[sel][order]] = self._shards[s].features[rows[sel][order]]
        if self.meta["dtype"] == "bfloat16":
            return out.view(jnp.bfloat16)
        return out

    # -- writing
    def _write_meta(self, shape, dtype: str) -> None:
        meta = {"key": self.key, "fields": self.fields, "shape": list(shape), "dtype": dtype,
                "created": time.time()}
        if self.meta is not None:
            if list(self.meta["shape"]) != list(shape) or self.meta["dtype"] != dtype:
                raise FeatureCacheError(
                    f"feature cache {self.path} holds {self.meta['dtype']} features of shape "
                    f"{self.meta['shape']}, not {dtype} {list(shape)}; delete it")
            return
        os.makedirs(self.path, exist_ok=True)
        tmp = os.path.join(self.path, f".meta-{uuid.uuid4().hex}.json")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, os.path.join(self.path, "meta.json"))
        self.meta = meta

    def add(self, ids: np.ndarray, features: np.ndarray, bad: dict[int, str] | None = None
            ) -> str:
        """Writes one shard atomically (temp directory + rename); returns its path.
        bad: records whose image could not be used -> the pipeline's skip reason."""
        ids = np.asarray(ids, np.int64)
        bad = dict(sorted((bad or {}).items()))
        reasons = np.asarray(list(bad.values()), str)
        bad = np.asarray(list(bad), np.int64)
        if len(ids) != len(features):
            raise ValueError(f"{len(ids)} ids for {len(features)} feature rows")
        dtype = jnp.dtype(features.dtype).name
        if dtype not in _BITS:
            raise FeatureCacheError(f"features of dtype {dtype}: use one of {sorted(_BITS)}")
        self._write_meta(features.shape[1:], dtype)
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = os.path.join(self.path, f".tmp-{name}")
        os.makedirs(tmp)
        try:
            np.save(os.path.join(tmp, "ids.npy"), ids)
            np.save(os.path.join(tmp, "features.npy"),
                    np.asarray(features).view(_BITS[dtype]))
            np.save(os.path.join(tmp, "bad.npy"), bad)
            np.save(os.path.join(tmp, "bad_reasons.npy"), reasons)
            os.replace(tmp, os.path.join(self.path, name))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.reload()
        return os.path.join(self.path, name)


# ----------------------------------------------------------------------------- computing
def needed_records(config) -> np.ndarray:
    """Every record a run can read: its train subset and its eval split."""
    from vlm_jax.data import pipeline
    split = pipeline.split_for(pipeline._resolved(config))
    parts = [split.train_records()]
    if split.eval_n:
        parts.append(split.eval_records())
    return np.unique(np.concatenate(parts))


def _image_batches(config, records: np.ndarray, batch: int):
    """Yields (records, pixels [b, H, W, 3] uint8, {bad record: reason}) per chunk, with the
    pipeline's own loading/decoding/resizing (the ViT normalises, as in training)."""
    from vlm_jax.data import pipeline
    from vlm_jax.data import transforms as T
    cfg = pipeline._resolved(config)
    size = int(cfg.model.vision.image_size)
    src = pipeline.source_for(cfg)
    ts = [T.DecodeImage(draft_size=size), T.ResizeImage(size, cfg.data.get("resize", "crop"))]
    load = pipeline.LoadExample(src, ts, with_image=True)
    if hasattr(src, "get_batch") and all(hasattr(t, "map_batch") for t in ts):
        # sources that read many records at once (synthetic): a few array ops per chunk;
        # a chunk holding a bad sample goes record by record (which names and skips it)
        for start in range(0, len(records), batch):
            chunk = np.asarray(records[start:start + batch], np.int64)
            try:
                out = src.get_batch(chunk)
                for t in ts:
                    out = t.map_batch(out)
                yield chunk, np.asarray(out["image"]), {}
            except T.BadSample:
                yield _split_bad(chunk, [load.map((i, int(r))) for i, r in enumerate(chunk)])
        return
    ds = grain.MapDataset.source([(i, int(r)) for i, r in enumerate(records)]).map(load)
    it = iter(ds.to_iter_dataset(pipeline._read_options(cfg, batch)))
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        yield _split_bad(chunk, [next(it) for _ in chunk])


def _split_bad(records, examples) -> tuple[np.ndarray, np.ndarray | None, dict[int, str]]:
    """(good records, their pixels or None, {bad record: reason}) of loaded `examples`."""
    from vlm_jax.data import pipeline
    good, images, bad = [], [], {}
    for r, ex in zip(records, examples):
        if isinstance(ex, pipeline._Bad):
            bad[int(r)] = ex.reason
        else:
            good.append(int(r))
            images.append(ex["image"])
    return np.asarray(good, np.int64), (np.stack(images) if images else None), bad


def feature_fn(model_cfg):
    """(vision params, pixels) -> features [b, K, Dv], exactly as the VLM computes them."""
    from vlm_jax.models.lm import compute_dtypes
    from vlm_jax.models.vit import ViT
    dt, pdt, impl = compute_dtypes(model_cfg)
    vit = ViT(model_cfg.vision, dtype=dt, param_dtype=pdt, attention_impl=impl)
    return lambda params, pixels: vit.apply({"params": params}, pixels, method=ViT.features)


def fill(store: FeatureStore, config, vision_params, records: np.ndarray, *, mesh=None,
         ctx=None, batch_size: int = 0) -> dict:
    """Computes the features of the `records` the store lacks and adds them as one shard.

    Runs under `ctx` (the trainer's mesh + logical rules) with batches sharded over the
    mesh's data axes; in a multi-process job every process computes its part of each
    batch and process 0 writes. Returns {"computed", "reused", "bad", "seconds"}.
    """
    t0 = time.time()
    todo = store.missing(records)
    stats = {"computed": 0, "reused": int(len(np.unique(records)) - len(todo)), "bad": 0,
             "seconds": 0.0}
    if len(todo) == 0:
        return stats
    from vlm_jax.train import sharding
    b = int(batch_size or config.train.get("eval_batch_size", 0) or config.train.batch_size)
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh)
        b = max(dp, -(-b // dp) * dp)
    fn = jax.jit(feature_fn(config.model))
    pi, pc = jax.process_index(), jax.process_count()
    ids_all, feats_all, bad_all = [], [], {}
    log.info("feature cache: computing %d records (%d cached) into %s", len(todo),
             stats["reused"], store.path)
    with (ctx if ctx is not None else _null()):
        for good, pixels, bad in _image_batches(config, todo, b):
            bad_all.update(bad)
            if pixels is None:
                continue
            n = len(good)
            pad = np.zeros((b,) + pixels.shape[1:], pixels.dtype)
            pad[:n] = pixels
            if mesh is not None:
                per = b // pc
                gb = sharding.global_batch({"pixels": pad[pi * per:(pi + 1) * per]}, mesh)
                out = fn(vision_params, gb["pixels"])
                if pc > 1:
                    from jax.experimental import multihost_utils
                    out = multihost_utils.process_allgather(out, tiled=True)
            else:
                out = fn(vision_params, pad)
            out = np.asarray(jax.device_get(out))[:n]
            ids_all.append(good)
            feats_all.append(out)
    if pi == 0 and (ids_all or bad_all):
        if ids_all:
            ids, feats = np.concatenate(ids_all), np.concatenate(feats_all)
        else:
            shape = store.feature_shape or (0, 0)
            ids, feats = np.zeros((0,), np.int64), np.zeros((0,) + tuple(shape), np.float32)
        store.add(ids, feats, bad_all)
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"feature_cache:{store.key}")
    store.reload()
    stats.update(computed=int(sum(len(i) for i in ids_all)), bad=len(bad_all),
                 seconds=time.time() - t0)
    return stats


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- data
def swap_features(batch: dict, store: FeatureStore) -> dict:
    """A batch with `pixels` replaced by the cached `features` of its `_records`."""
    if "_records" not in batch:
        raise FeatureCacheError("batch has no `_records` metadata: the data pipeline must "
                                "mark each row's record index for train.feature_cache")
    out = {k: v for k, v in batch.items() if k != "pixels"}
    out["features"] = store.gather(batch["_records"])
    return out


class _CachedIterator(grain.DatasetIterator):
    """Wraps the pipeline's checkpointable train iterator (a grain DatasetIterator, so
    grain's checkpoint handler saves it); its state is the wrapped one's."""

    def __init__(self, it, store: FeatureStore):
        super().__init__(it)
        self._store = store

    def __next__(self) -> dict:
        return swap_features(next(self._parents[0]), self._store)

    def get_state(self):
        return self._parents[0].get_state()

    def set_state(self, state) -> None:
        self._parents[0].set_state(state)


class _CachedEval:
    def __init__(self, batches, store: FeatureStore):
        self._batches, self._store = batches, store

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for b in self._batches:
            yield swap_features(b, self._store)


class CachedData:
    """The trainer's data module (`train_iterator`, `eval_batches`) with features in
    place of pixels. A base module whose functions take `no_images` (the pipeline) reads
    no images at all (the cache's bad marks stand for the image checks); another one's
    pixels are read and dropped."""

    def __init__(self, base, store: FeatureStore):
        self.base, self.store = base, store

    def _kw(self, fn) -> dict:
        import inspect
        try:
            takes = "no_images" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes = False
        return {"no_images": self.store.bad_records()} if takes else {}

    def train_iterator(self, config, process_index: int = 0, process_count: int = 1):
        fn = self.base.train_iterator
        return _CachedIterator(fn(config, process_index, process_count, **self._kw(fn)),
                               self.store)

    def eval_batches(self, config, process_index: int = 0, process_count: int = 1):
        fn = self.base.eval_batches
        return _CachedEval(fn(config, process_index, process_count, **self._kw(fn)),
                           self.store)


def feature_spec(spec: dict, store: FeatureStore) -> dict:
    """A batch spec with `pixels` [b, H, W, 3] replaced by `features` [b, K, Dv]."""
    out = {k: v for k, v in spec.items() if k != "pixels"}
    b = spec["pixels"].shape[0]
    out["features"] = jax.ShapeDtypeStruct((b,) + tuple(store.feature_shape), store.dtype)
    return out


# ----------------------------------------------------------------------------- trainer hook
def check_usable(config, trainable_components: Iterable[str]) -> None:
    if config.model.kind != "vlm":
        raise FeatureCacheError(f"train.feature_cache=True needs model.kind='vlm' (a frozen "
                                f"encoder feeding a projector), got {config.model.kind!r}; "
                                "set train.feature_cache=False")
    if "vision" in set(trainable_components):
        raise FeatureCacheError(f"train.feature_cache=True needs a frozen vision encoder, but "
                                f"optim.trainable={tuple(config.optim.trainable)} matches "
                                "vision params; freeze it or set train.feature_cache=False")
    if config.model.vision.get("variant", "clip") != "clip":
        raise FeatureCacheError("train.feature_cache=True supports the CLIP ViT "
                                "(model.vision.variant='clip') only")


def open_store(config, workdir: str) -> FeatureStore:
    fields = key_fields(config)
    return FeatureStore(cache_dir(config, workdir), _hash(fields), fields)


def attach(run, frozen: dict) -> dict:
    """Trainer hook (see the module docstring). `run` is a `trainer.Run` whose params
    exist; returns the frozen params the compiled steps take. Sets `run.data`,
    `run.batch_spec`, `run.eval_spec` and `run.feature_cache_info`."""
    config = run.config
    check_usable(config, getattr(run, "trainable_components", ()))
    if "vision" not in frozen:
        raise FeatureCacheError("train.feature_cache=True: the model has no frozen 'vision' "
                                "params")
    store = open_store(config, run.workdir)
    records = needed_records(config)
    stats = fill(store, config, frozen["vision"], records, mesh=run.mesh, ctx=run.ctx(),
                 batch_size=getattr(run, "eval_bs", 0))
    log.info("feature cache %s: %s", store.path, stats)
    run.data = CachedData(run.data, store)
    run.batch_spec = feature_spec(run.batch_spec, store)
    run.eval_spec = feature_spec(run.eval_spec, store)
    run.feature_cache_info = dict(stats, path=store.path, key=store.key, records=len(store))
    if config.train.get("save_frozen", False):
        return frozen
    return {k: v for k, v in frozen.items() if k != "vision"}
