"""An in-process LRU of array trees bounded in MB (`BoundedCache`).

What the runs of one process (a grid worker) share besides compiled programs: eval
batches (trainer; native ones in `vlm_jax.data.native`), `init_from` params
(`train.checkpoint.restore_params`) and frozen parts on the mesh (trainer). A module of
its own below `data`, `models` and `train`, so each of them can use it (re-exported as
`vlm_jax.train.program_cache.BoundedCache`).
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable


class BoundedCache:
    """An in-process LRU of array trees (or any values whose leaves have `nbytes`) up to
    `limit_mb` MB; the environment variable `env` overrides the limit (0 = keep nothing).
    Used for what the runs of one process (a grid worker) share besides programs: eval
    batches (trainer), `init_from` params (checkpoint.restore_params)."""

    def __init__(self, env: str, limit_mb: float):
        self.env, self.limit_mb = env, limit_mb
        self._items: "collections.OrderedDict[Any, tuple[Any, int]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def limit(self) -> int:
        return int(float(os.environ.get(self.env, self.limit_mb)) * (1 << 20))

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        return None

    def put(self, key, value) -> None:
        import jax
        size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(value))
        limit = self.limit()
        if size > limit:
            return
        with self._lock:
            self._items[key] = (value, size)
            while sum(v[1] for v in self._items.values()) > limit:
                self._items.popitem(last=False)

    def get_or_load(self, key, load: Callable[[], Any]):
        hit = self.get(key)
        if hit is None:
            hit = load()
            self.put(key, hit)
        return hit

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
