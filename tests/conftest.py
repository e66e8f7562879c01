"""Suite-wide test ordering for a short wall time under pytest-xdist (tests/run.sh).

`tests/run.sh` runs `pytest -n N --dist loadgroup`: tests marked
`pytest.mark.xdist_group(name)` run on one worker (so a module fixture that starts a
multi-minute subprocess, e.g. tests/train/test_train_sharding.py's, runs once, not once per
worker), and xdist sends the groups (biggest first) before single tests. Here the single
tests marked `slow` (multi-process / end-to-end runs) are moved to the front, in their
collection order: the longest work starts first and the two workers end together instead of
one of them starting a two-minute test when the other is nearly done. The order within the
slow and within the other tests is kept (a stable partition), so it is the same in every
worker, as xdist requires.
"""
from __future__ import annotations


def pytest_collection_modifyitems(session, config, items):
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)
