"""Serialized programs (vlm_jax.train.program_cache on disk): a new process loads a
program instead of tracing and compiling it; the file name covers the code, versions and
flags (a code change never serves a stale program); a bad file is rebuilt, not fatal."""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from tests.compiled import subprocess_env
from vlm_jax.train import program_cache


# Every build compiles a program JAX's persistent compilation cache (shared by the suite's
# runs on one machine) cannot hold yet: a new constant makes its HLO new. A program the
# persistent cache serves is never written to disk (see the last test), so a tiny program
# that one loaded run compiled slowly enough to be cached made the next run's roundtrip fail.
_SALT = itertools.count(int.from_bytes(os.urandom(3), "little"))


def _build(calls):
    def build():
        calls.append(1)
        salt = float(next(_SALT))
        return jax.jit(lambda x, y: ((x * 2 + y + salt) - salt, {"s": jnp.sum(x)})).lower(
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


def test_disk_dir_is_bounded_lru(tmp_path, monkeypatch):
    """`VLM_JAX_EXECUTABLE_CACHE_MB`: past the bound, the least recently used programs
    (written or loaded longest ago) are removed; a removed one is simply rebuilt."""
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE", str(tmp_path))
    calls = []
    program_cache.clear()
    for i, k in enumerate(("a", "b", "c")):
        program_cache.get_or_build(k, _build(calls))
        path = program_cache._disk_path(k)
        os.utime(path, (1000 + i, 1000 + i))        # written in order a, b, c
    size = os.path.getsize(program_cache._disk_path("a"))
    program_cache.clear()
    program_cache.lookup("a")                        # loaded: now the most recent
    assert program_cache.stats()["disk_hits"] == 1
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE_MB", str(2.5 * size / (1 << 20)))
    removed = program_cache.prune(str(tmp_path))
    assert removed == [program_cache._disk_path("b")]
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(program_cache._disk_path(k)) for k in ("a", "c"))
    program_cache.clear()
    program_cache.get_or_build("b", _build(calls))   # rebuilt, and the bound holds again
    assert calls == [1, 1, 1, 1] and len(os.listdir(tmp_path)) == 2
    monkeypatch.setenv("VLM_JAX_EXECUTABLE_CACHE_MB", "0")   # 0: no bound
    assert program_cache.prune(str(tmp_path), ) == []
    program_cache.clear()


_PERSISTENT_CHILD = r'''
import sys, jax, jax.numpy as jnp
from vlm_jax.train import program_cache
def f(x, y):   # many kernels: XLA:CPU splits them over several object files
    for i in range(12):
        x = jnp.tanh(x @ y + i) * jnp.exp(-x ** 2) + jnp.sin(x[::-1])
    return jnp.sum(x)
x = jnp.ones((64, 64)); y = jnp.ones((64, 64)) / 64
c = program_cache.get_or_build("many-kernels", lambda: jax.jit(f).lower(x, y).compile())
print(float(c(x, y)), program_cache.stats().get("disk_skipped", -1), program_cache.stats()["disk_hits"])
'''


def test_program_served_by_the_persistent_cache_is_not_serialized(tmp_path):
    """jaxlib's XLA:CPU serializes an executable that jax loaded from the persistent
    compilation cache without some of its kernels ("Function ..._fusion not found" when a
    later process runs it): such a program is not written; one XLA compiled is."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(subprocess_env(root), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def child(executables):
        out = subprocess.run([sys.executable, "-c", _PERSISTENT_CHILD], capture_output=True,
                             text=True, env=dict(env, VLM_JAX_EXECUTABLE_CACHE=executables),
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        value, skipped, disk_hits = out.stdout.split()
        return float(value), int(skipped), int(disk_hits)

    exe = str(tmp_path / "exe")
    want, _, _ = child("0")                   # compiled by XLA, into the persistent cache only
    assert child(exe) == (want, 1, 0)         # served by the persistent cache: not written
    assert not os.path.exists(exe) or not os.listdir(exe)
    assert child(exe) == (want, 1, 0)         # so the next process runs it from there again
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla2")   # a compile: written ...
    assert child(exe) == (want, 0, 0) and len(os.listdir(exe)) == 1
    assert child(exe) == (want, 0, 1)         # ... and a new process loads and runs it
