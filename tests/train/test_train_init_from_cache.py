"""checkpoint.restore_params keeps what it read (init_from of many runs from one pretrained
workdir): the same checkpoint is read once, a newer checkpoint is read again, and
VLM_JAX_INIT_FROM_CACHE_MB=0 turns the cache off."""
import numpy as np

from tests.grid.conftest import TINY_GRID
from vlm_jax.grid import expand
from vlm_jax.train import checkpoint as ckpt, trainer


def test_restore_params_cache(tmp_path, monkeypatch):
    wd = str(tmp_path / "pre")
    c = expand.build_config(TINY_GRID, "run,steps=2")
    trainer.run(c, wd)
    calls = []
    real = ckpt._restore_host
    monkeypatch.setattr(ckpt, "_restore_host", lambda *a: calls.append(a[1:]) or real(*a))
    a = ckpt.restore_params(wd, "llm")
    b = ckpt.restore_params(wd, "llm")
    assert len(calls) == 1 and a is b                # read once
    # another step of the same workdir is another checkpoint: read
    c2 = expand.build_config(TINY_GRID, "run,steps=4")
    c2.train.checkpoint_every_steps = 0
    wd2 = str(tmp_path / "longer")
    trainer.run(c2, wd2)
    calls.clear()
    x = ckpt.restore_params(wd2, "llm")
    assert len(calls) == 1 and x is not a
    leaves = lambda t: [np.asarray(v) for v in __import__("jax").tree.leaves(t)]  # noqa: E731
    assert any(not np.array_equal(p, q) for p, q in zip(leaves(x), leaves(a)))
    # off: every call reads
    monkeypatch.setenv("VLM_JAX_INIT_FROM_CACHE_MB", "0")
    ckpt._params_cache.clear()
    calls.clear()
    y = ckpt.restore_params(wd, "llm")
    z = ckpt.restore_params(wd, "llm")
    assert len(calls) == 2 and y is not z
    assert all(np.array_equal(p, q) for p, q in zip(leaves(y), leaves(a)))
