"""Shared helpers of the grid tests: the tiny real grid, a launcher whose runs share one
compilation cache per test process (the tiny runs all compile to the same programs)."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_GRID = os.path.join(HERE, "tiny_grid.py")
PY = sys.executable


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
    """One persistent compilation cache per test process (xdist workers get their own)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def cache_env(cache_dir: str) -> dict:
    return {"JAX_COMPILATION_CACHE_DIR": cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture
def launcher(jax_cache_dir):
    """make(root, parallel=2): the local launcher with warm workers and the shared cache."""
    from vlm_jax.grid.launchers import LocalLauncher

    def make(root, parallel=2, executor="worker"):
        return LocalLauncher(root, parallel, executor=executor,
                             extra_env=cache_env(jax_cache_dir))
    return make


def cli_env(cache_dir: str | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    if cache_dir:
        env.update(cache_env(cache_dir))
    return env
