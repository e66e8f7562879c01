"""In-process reuse of compiled programs across runs of equal shapes.

A process that trains several runs (the grid's warm worker, a sweep, a test session) often
trains runs whose init, train and eval programs are identical: the runs of a data-size
sweep, the clean/noisy runs of a grid, runs that differ only in lr or steps (the schedule
is a runtime input). The persistent compilation cache skips XLA's compile for them, but
each run still traces, lowers and reloads every program (seconds per run for the tiny demo
models, most of such a run's time). `get_or_build(key, build)` keeps the compiled
executables in memory instead, keyed by everything that decides a program.

The trainer builds the key (`vlm_jax.train.trainer.Run`): the model config (without
`init_from`, which changes values, not programs), the optimizer fields compiled into the
step (not lr / schedule, runtime inputs), gradient accumulation, the mesh and logical
rules, and the signature (tree structure, shapes, dtypes, shardings) of every argument.
It uses the cache only for models it built from the config itself.

`VLM_JAX_PROGRAM_CACHE=0` turns it off; at most `MAX_ENTRIES` programs are kept (LRU).

On disk too (`executable_dir()`): every program built here is also serialized
(`jax.experimental.serialize_executable`; abstract values are pickled) next to the
persistent compilation cache, in `<JAX_COMPILATION_CACHE_DIR>_executables/`, so a new
process (a fresh grid worker, a second grid sharing the cache) loads it instead of
tracing, lowering and compiling it. The file name is the program key hashed with
`fingerprint()`: jax/jaxlib/flax/optax versions, the backend and its devices, XLA_FLAGS
and a hash of every vlm_jax source file, so a code change (a new kernel layout, a new
loss) never loads a stale program. `VLM_JAX_EXECUTABLE_CACHE` sets the directory
("0": off); it keeps at most `VLM_JAX_EXECUTABLE_CACHE_MB` (default 2048) MB, the least
recently used files removed first (`prune`, after each write). A file that fails to load
is rebuilt and rewritten; writes are atomic. A program that
jax's persistent compilation cache served is not written (XLA:CPU would serialize it
without some of its kernels; see `get_or_build`).

`stats()` also counts, for every program this process compiles through jax (ours or not),
the persistent compilation cache's hits and misses (`JAX_COMPILATION_CACHE_DIR`) and the
seconds XLA spent compiling (`xla_compile_s`: cache misses and programs not cached), from
jax's monitoring events; the grid worker records them per job (ROOT/timings.jsonl).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
from typing import Any, Callable

import jax

from vlm_jax.bounded_cache import BoundedCache  # noqa: F401 - the trainer's, checkpoint's

log = logging.getLogger("vlm_jax.train")

MAX_ENTRIES = 48
DEFAULT_DISK_MB = 2048   # serialized programs kept on disk (LRU by mtime; `prune`)

_lock = threading.Lock()
_programs: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_stats = {"hits": 0, "misses": 0, "disk_hits": 0, "disk_writes": 0, "disk_errors": 0,
          "disk_skipped": 0}
# persistent-compilation-cache hits of the calling thread (see `get_or_build`)
_thread = threading.local()
# jax monitoring events -> counters of the persistent compilation cache and XLA compiles
_XLA_EVENTS = {"/jax/compilation_cache/cache_hits": "persistent_hits",
               "/jax/compilation_cache/cache_misses": "persistent_misses"}
_XLA_DURATIONS = {"/jax/core/compile/backend_compile_duration": "xla_compile_s",
                  "/jax/compilation_cache/cache_retrieval_time_sec": "persistent_load_s",
                  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s"}
# duration events also counted (number of traces / lowerings, any function, ours or not)
_XLA_COUNTS = {"/jax/core/compile/jaxpr_trace_duration": "traces",
               "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowerings"}
_xla = ({k: 0 for k in _XLA_EVENTS.values()} | {k: 0.0 for k in _XLA_DURATIONS.values()}
        | {k: 0 for k in _XLA_COUNTS.values()})


def _on_event(event: str, **_) -> None:
    name = _XLA_EVENTS.get(event)
    if name:
        with _lock:
            _xla[name] += 1
        if name == "persistent_hits":
            _thread.persistent_hits = getattr(_thread, "persistent_hits", 0) + 1


def _on_duration(event: str, seconds: float, **_) -> None:
    name = _XLA_DURATIONS.get(event)
    if name:
        with _lock:
            _xla[name] += float(seconds)
            if event in _XLA_COUNTS:
                _xla[_XLA_COUNTS[event]] += 1


from jax._src import monitoring as _monitoring  # noqa: E402 - jax's own event hooks

_monitoring.register_event_listener(_on_event)
_monitoring.register_event_duration_secs_listener(_on_duration)


def enabled() -> bool:
    return os.environ.get("VLM_JAX_PROGRAM_CACHE", "1") not in ("0", "false", "False", "")


def signature(tree) -> list:
    """Tree structure + (shape, dtype, sharding) of every leaf (arrays or abstract)."""
    leaves, treedef = jax.tree.flatten(tree)
    return [str(treedef)] + [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x))),
                              str(getattr(x, "sharding", ""))) for x in leaves]


def make_key(*parts) -> str:
    """A digest of JSON-able parts (anything else by `str`)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- on disk
def executable_dir() -> str | None:
    """Where built programs are serialized: `VLM_JAX_EXECUTABLE_CACHE`, else next to jax's
    persistent compilation cache dir (its name + "_executables"; not inside it, which jax
    manages); None: not on disk."""
    env = os.environ.get("VLM_JAX_EXECUTABLE_CACHE")
    if env is not None:
        return None if env in ("", "0", "false", "False") else env
    base = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return os.path.normpath(base) + "_executables" if base else None


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 of every .py file of the vlm_jax package (paths and contents), read once
    when this module is imported (with the trainer, before any program is built), so a
    source edited later in a running process's checkout does not relabel its programs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(d, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()


def fingerprint() -> str:
    """Everything besides the program key that decides a serialized program."""
    import flax
    import jaxlib
    import optax
    dev = jax.devices()
    return make_key(jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__,
                    sys.version_info[:2], dev[0].platform, dev[0].client.platform_version,
                    [(d.id, d.device_kind) for d in dev], os.environ.get("XLA_FLAGS", ""),
                    jax.config.jax_default_prng_impl, jax.config.jax_enable_x64, code_hash())


def _dump(value) -> bytes:
    if isinstance(value, jax.stages.Compiled):
        from jax.experimental import serialize_executable
        return pickle.dumps(("compiled", serialize_executable.serialize(value)))
    return pickle.dumps(("value", value))


def _load(blob: bytes):
    kind, payload = pickle.loads(blob)
    if kind == "compiled":
        from jax.experimental import serialize_executable
        return serialize_executable.deserialize_and_load(*payload)
    return payload


def _disk_path(key: str) -> str | None:
    d = executable_dir()
    return os.path.join(d, make_key(key, fingerprint()) + ".pkl") if d else None


def _read(path: str | None):
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            program = _load(f.read())
        os.utime(path)   # recently used: the last one `prune` removes
        return program
    except Exception as e:  # noqa: BLE001 - a bad file is rebuilt and rewritten
        log.warning("program cache: %s does not load (%s: %s); rebuilding it", path,
                    type(e).__name__, e)
        with _lock:
            _stats["disk_errors"] += 1
        return None


def _write(path: str | None, value) -> None:
    if path is None:
        return
    try:
        blob = _dump(value)
    except Exception as e:  # noqa: BLE001 - not serializable: kept in memory only
        log.debug("program cache: not serializable (%s: %s)", type(e).__name__, e)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        with _lock:
            _stats["disk_writes"] += 1
    except OSError as e:
        log.warning("program cache: cannot write %s (%s)", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)
        return
    prune(os.path.dirname(path))


def max_disk_bytes() -> int:
    """Size bound of the serialized-program dir: `VLM_JAX_EXECUTABLE_CACHE_MB` (default
    2048; 0 = no bound)."""
    return int(float(os.environ.get("VLM_JAX_EXECUTABLE_CACHE_MB", DEFAULT_DISK_MB)) * (1 << 20))


def prune(directory: str, limit: int | None = None) -> list[str]:
    """Removes the least recently used programs (`.pkl` by mtime: written or loaded) of
    `directory` until it holds at most `limit` bytes (default `max_disk_bytes()`); returns
    the removed paths. Safe while other processes use the dir: a removed file is rebuilt
    by whoever needs it next, a file being written is a `.tmp` (never removed here)."""
    limit = max_disk_bytes() if limit is None else int(limit)
    if limit <= 0:
        return []
    files = []
    with os.scandir(directory) as it:
        for e in it:
            if e.name.endswith(".pkl"):
                try:
                    st = e.stat()
                except OSError:
                    continue
                files.append((st.st_mtime_ns, st.st_size, e.path))
    total = sum(f[1] for f in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
        total -= size
    return removed


def lookup(key: str | None, count: bool = True) -> Any:
    """The program stored under `key` in memory or on disk, else None (nothing built)."""
    if key is None or not enabled():
        return None
    with _lock:
        if key in _programs:
            _programs.move_to_end(key)
            _stats["hits"] += count
            return _programs[key]
    program = _read(_disk_path(key))
    if program is not None:
        _keep(key, program, "disk_hits", count)
    return program


def _keep(key: str, program, counter: str, count: bool) -> None:
    with _lock:
        _stats[counter] += count
        _programs[key] = program
        while len(_programs) > MAX_ENTRIES:
            _programs.popitem(last=False)


def get_or_build(key: str | None, build: Callable[[], Any], count: bool = True) -> Any:
    """The program stored under `key` (in memory, else on disk), else `build()` (stored
    in both). key=None: just build. count=False: not a program (e.g. the abstract params
    of a model), not in the hit / miss counts of `stats()`."""
    if key is None or not enabled():
        return build()
    program = lookup(key, count)
    if program is None:
        hits = getattr(_thread, "persistent_hits", 0)
        program = build()
        if getattr(_thread, "persistent_hits", 0) == hits:
            _write(_disk_path(key), program)
        else:
            # XLA:CPU (jaxlib 0.10) drops kernels when an executable that jax loaded from
            # its persistent compilation cache is serialized again: the file would load
            # and then fail at run time ("Function ..._fusion not found"). Only programs
            # XLA compiled in this process are written; the next process gets this one
            # from the persistent cache again.
            with _lock:
                _stats["disk_skipped"] += 1
        _keep(key, program, "misses", count)
    return program


def stats() -> dict:
    """Programs reused from memory (`hits`), loaded from disk (`disk_hits`), built
    (`misses`) here, entries kept, files written / unreadable / not written because the
    persistent cache served the program (`disk_skipped`), and the persistent cache /
    XLA / tracing counters (module docstring)."""
    with _lock:
        return dict(_stats, entries=len(_programs), **_xla)


def clear() -> None:
    with _lock:
        _programs.clear()
        _stats.update(hits=0, misses=0, disk_hits=0, disk_writes=0, disk_errors=0,
                      disk_skipped=0)


code_hash()  # the sources this process runs (see code_hash)
