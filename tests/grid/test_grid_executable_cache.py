"""Serialized programs (vlm_jax.train.program_cache on disk): a new process loads a
program instead of tracing and compiling it; the file name covers the code, versions and
flags (a code change never serves a stale program); a bad file is rebuilt, not fatal."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.train import program_cache


def _build(calls):
    def build():
        calls.append(1)
        return jax.jit(lambda x, y: (x * 2 + y, {"s": jnp.sum(x)})).lower(
            jnp.ones((3,)), jnp.ones((3,))).compile()
    return build


def test_disk_roundtrip_code_key_and_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE", str(tmp_path))
    calls = []
    program_cache.clear()
    a = program_cache.get_or_build("k1", _build(calls))
    files = os.listdir(tmp_path)
    assert calls == [1] and len(files) == 1 and files[0].endswith(".pkl")
    program_cache.clear()                      # as a new process: memory empty
    b = program_cache.get_or_build("k1", _build(calls))
    assert calls == [1] and program_cache.stats()["disk_hits"] == 1
    x = jnp.arange(3.0)
    for got, want in zip(jax.tree.leaves(b(x, x)), jax.tree.leaves(a(x, x))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # other code (e.g. a new kernel layout): another file, built again
    program_cache.clear()
    monkeypatch.setattr(program_cache, "code_hash", lambda: "other code")
    program_cache.get_or_build("k1", _build(calls))
    assert calls == [1, 1] and len(os.listdir(tmp_path)) == 2
    # a truncated file: a warning, rebuilt and rewritten atomically
    path = os.path.join(tmp_path, files[0])
    monkeypatch.undo()
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE", str(tmp_path))
    with open(path, "r+b") as f:
        f.truncate(100)
    program_cache.clear()
    c = program_cache.get_or_build("k1", _build(calls))
    assert calls == [1, 1, 1] and program_cache.stats()["disk_errors"] == 1
    assert float(c(x, x)[1]["s"]) == 3.0
    program_cache.clear()
    program_cache.get_or_build("k1", _build(calls))
    assert calls == [1, 1, 1] and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # off: nothing on disk
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE", "0")
    assert program_cache.executable_dir() is None
    program_cache.clear()
