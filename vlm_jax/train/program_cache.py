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

`stats()` also counts, for every program this process compiles through jax (ours or not),
the persistent compilation cache's hits and misses (`JAX_COMPILATION_CACHE_DIR`) and the
seconds XLA spent compiling (`xla_compile_s`: cache misses and programs not cached), from
jax's monitoring events; the grid worker records them per job (ROOT/timings.jsonl).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from typing import Any, Callable

import jax

MAX_ENTRIES = 48

_lock = threading.Lock()
_programs: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_stats = {"hits": 0, "misses": 0}
# jax monitoring events -> counters of the persistent compilation cache and XLA compiles
_XLA_EVENTS = {"/jax/compilation_cache/cache_hits": "persistent_hits",
               "/jax/compilation_cache/cache_misses": "persistent_misses"}
_XLA_DURATIONS = {"/jax/core/compile/backend_compile_duration": "xla_compile_s",
                  "/jax/compilation_cache/cache_retrieval_time_sec": "persistent_load_s"}
_xla = {k: 0 for k in _XLA_EVENTS.values()} | {k: 0.0 for k in _XLA_DURATIONS.values()}


def _on_event(event: str, **_) -> None:
    name = _XLA_EVENTS.get(event)
    if name:
        with _lock:
            _xla[name] += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    name = _XLA_DURATIONS.get(event)
    if name:
        with _lock:
            _xla[name] += float(seconds)


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


def get_or_build(key: str | None, build: Callable[[], Any], count: bool = True) -> Any:
    """The program stored under `key`, else `build()` (stored). key=None: just build.
    count=False: not a program (e.g. the abstract params of a model), not in `stats()`."""
    if key is None or not enabled():
        return build()
    with _lock:
        if key in _programs:
            _programs.move_to_end(key)
            _stats["hits"] += count
            return _programs[key]
    program = build()
    with _lock:
        _stats["misses"] += count
        _programs[key] = program
        while len(_programs) > MAX_ENTRIES:
            _programs.popitem(last=False)
    return program


def stats() -> dict:
    """Programs reused (`hits`) / built (`misses`) here, entries kept, and the persistent
    cache / XLA counters (module docstring)."""
    with _lock:
        return dict(_stats, entries=len(_programs), **_xla)


def clear() -> None:
    with _lock:
        _programs.clear()
        _stats.update(hits=0, misses=0)
