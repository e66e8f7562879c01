"""Read-ahead of train batches onto the devices while the current step runs.

`DevicePrefetch(it, put)` wraps the run's checkpointable batch iterator (a Grain
`DatasetIterator`): a background thread reads the next batch (`next(it)`: loading,
decoding, packing, feature gathering) and puts it on the mesh (`put(local) -> global
arrays`, `sharding.global_batch`) while the main thread waits on the step in flight, as
big_vision's and flax's prefetch-to-device do. The main thread gets `(local, global)`.

Checkpoint state: `get_state()` is the wrapped iterator's state right after the last batch
`next()` returned, never one read ahead, so a checkpoint (or a WSD branch point kept in
memory) resumes at exactly the next batch; `set_state()` drops what was read ahead. The
wrapper is a `DatasetIterator` itself, so grain's checkpoint handler saves it as before.
An exception of the wrapped iterator (bad data, end of data) is raised by the `next()`
that would have returned that batch.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import grain

_POLL_S = 0.1   # how often a thread blocked on a full queue checks for `close()`


class DevicePrefetch(grain.DatasetIterator):
    """`depth` batches read ahead of the consumer (see the module docstring)."""

    def __init__(self, it, put: Callable[[dict], Any], depth: int = 1):
        super().__init__(it if isinstance(it, grain.DatasetIterator) else ())
        self._it, self._put, self._depth = it, put, max(1, int(depth))
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._state = None   # the wrapped state after the last batch returned (None: ask it)

    def _start(self) -> None:
        if self._state is None:
            self._state = self._it.get_state()
        self._queue, self._stop = queue.Queue(maxsize=self._depth), threading.Event()
        self._thread = threading.Thread(target=self._read, args=(self._queue, self._stop),
                                        name="vlm_jax-prefetch", daemon=True)
        self._thread.start()

    def _read(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                local = next(self._it)
                item = (local, self._put(local), self._it.get_state(), None)
            except BaseException as e:  # noqa: BLE001 -- raised again by the consumer
                item = (None, None, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    def __next__(self) -> tuple[dict, Any]:
        if self._thread is None:
            self._start()
        local, batch, state, err = self._queue.get()
        if err is not None:
            self._thread.join()
            self._thread = None
            raise err
        self._state = state
        return local, batch

    def get_state(self):
        return self._state if self._state is not None else self._it.get_state()

    def set_state(self, state) -> None:
        self._stop_reading()
        self._it.set_state(state)
        self._state = None

    def _stop_reading(self) -> None:
        """Stops the read-ahead thread (what it read ahead is dropped)."""
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stops the thread and closes the wrapped iterator (grain's `close`)."""
        self._stop_reading()
        super().close()
