"""train.prefetch.DevicePrefetch: read-ahead that checkpoints the consumed position."""
import threading

import grain
import numpy as np
import pytest

from vlm_jax.train.prefetch import DevicePrefetch


class _Counter(grain.DatasetIterator):
    """Batches {"x": [i]} with state {"i": i}; fails at `fail_at` (bad data)."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.i, self.fail_at, self.reads = 0, fail_at, 0

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad batch {self.i}")
        self.i += 1
        self.reads += 1
        return {"x": np.array([self.i - 1])}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def test_state_is_the_consumed_position_not_the_read_ahead():
    inner = _Counter()
    it = DevicePrefetch(inner, lambda b: b["x"] * 10, depth=2)
    assert it.get_state() == {"i": 0}                 # nothing read yet
    local, put = next(it)
    assert local["x"][0] == 0 and put[0] == 0
    for _ in range(3):
        local, put = next(it)
    assert put[0] == 30 and it.get_state() == {"i": 4}
    # the thread reads ahead (up to depth 2 waiting + 1 in hand) ...
    for _ in range(100):
        if inner.reads >= 6:
            break
        threading.Event().wait(0.01)
    assert inner.reads >= 6 and it.get_state() == {"i": 4}   # ... its state stays
    # a checkpoint of that state resumes at exactly the next batch
    again = DevicePrefetch(_Counter(), lambda b: b["x"])
    again.set_state(it.get_state())
    assert next(again)[0]["x"][0] == 4
    # set_state drops the read-ahead
    it.set_state({"i": 1})
    assert it.get_state() == {"i": 1} and next(it)[0]["x"][0] == 1
    it.close()
    again.close()
    assert not [t for t in threading.enumerate() if t.name == "vlm_jax-prefetch"]
    assert inner._closed                # grain's close reaches the wrapped iterator


def test_errors_surface_at_their_batch_and_close_stops_the_thread():
    it = DevicePrefetch(_Counter(fail_at=2), lambda b: b)
    assert next(it)[0]["x"][0] == 0 and next(it)[0]["x"][0] == 1
    with pytest.raises(ValueError, match="bad batch 2"):
        next(it)
    assert it.get_state() == {"i": 2}
    blocked = DevicePrefetch(_Counter(), lambda b: b, depth=1)
    next(blocked)                       # the thread now waits on a full queue
    blocked.close()
    assert not [t for t in threading.enumerate() if t.name == "vlm_jax-prefetch"]
