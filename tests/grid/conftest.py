"""Shared helpers of the grid tests."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAKE_GRID = os.path.join(HERE, "fake_grid.py")
FAKE_MAIN = os.path.join(HERE, "fake_main.py")


@pytest.fixture
def fake_launcher():
    from vlm_jax.grid.launchers import LocalLauncher

    def make(root, parallel=2):
        return LocalLauncher(root, parallel, executor="process", trainer=(FAKE_MAIN,))
    return make


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


PY = sys.executable
