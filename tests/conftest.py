"""Suite-wide test order, for a short wall time under pytest-xdist (tests/run.sh: -n 2).

With -n 2 the suite takes as long as its busier worker; a long test started when the other
worker is nearly done makes that worker idle. So the longest tests go first (longest
processing time first): the tests marked `slow` (multi-process / end-to-end runs), then the
unmarked tests known to be long, both by their CI duration (seconds, `--durations`, 2-core
CI run, the compilation cache fresh); the rest keep their collection order. Only the order
changes: a stale or missing entry costs balance, never a test. The order is the same in
every worker, as xdist requires.
"""
from __future__ import annotations

SLOW_DEFAULT_S = 60.0  # a `slow` test missing from the table

# nodeid prefix -> CI seconds (setup + call), measured before the test-time work of
# 2026-11-26; the unmarked entries are the ones over ~15 s.
CI_SECONDS = {
    "tests/grid/test_grid_demo.py::test_tiny_demo_end_to_end": 111,
    "tests/train/test_train_resume.py::": 100,
    "tests/train/test_train_sharding.py::": 56,
    "tests/models/test_models_vlm.py::test_scanned_equals_unscanned_and_remat": 34,
    "tests/models/test_last_layer_keep.py::": 30,
    "tests/train/test_train_ckpt.py::test_analytic_flops_match_xla": 28,
    "tests/models/test_clip.py::test_training_learns_the_pairing": 14,
    "tests/analysis/test_analysis_cli.py::test_grid_root_fit_optimal_and_combined_report": 21,
    "tests/native/test_native_model.py::test_train_steps_decrease_loss": 12,
    "tests/native/test_native_experts.py::test_chunked_equals_masked_forward_and_grads": 12,
}


def _estimate(item) -> float:
    for prefix, seconds in CI_SECONDS.items():
        if item.nodeid.startswith(prefix):
            return float(seconds)
    return SLOW_DEFAULT_S if item.get_closest_marker("slow") is not None else 0.0


def pytest_collection_modifyitems(session, config, items):
    items[:] = sorted(items, key=lambda item: -_estimate(item))  # stable: ties keep order


def pytest_configure(config):
    # pytest-xdist's `load` hands each worker a contiguous quarter of its share up front,
    # which would give one worker all the long tests sorted first: hand them out one by one
    # (a worker holds two at most), unless --maxschedchunk says otherwise.
    if getattr(config.option, "maxschedchunk", "no xdist") is None:
        config.option.maxschedchunk = 1
