"""In-process program reuse (vlm_jax.train.program_cache), what makes the grid's warm
worker fast: a second run of equal shapes reuses the compiled init/train/eval programs and
trains exactly as the first; runs that differ only in runtime inputs (lr) share them, a
different architecture does not."""
import json

import jax

from tests.grid.conftest import TINY_GRID
from vlm_jax.grid import expand
from vlm_jax.train import program_cache, trainer


def _losses(workdir):
    return [(m["step"], m["train/loss"]) for m in map(json.loads, open(f"{workdir}/metrics.jsonl"))]


def test_equal_shapes_reuse_compiled_programs(tmp_path):
    cfg = lambda arg: expand.build_config(TINY_GRID, f"run,steps=2,{arg}")  # noqa: E731
    before = program_cache.stats()
    a = trainer.run(cfg("b=x"), str(tmp_path / "a"))
    mid = program_cache.stats()
    b = trainer.run(cfg("b=x"), str(tmp_path / "b"))
    after = program_cache.stats()
    assert after["hits"] - mid["hits"] == 4          # init, opt init, train, eval reused
    assert after["misses"] == mid["misses"]
    assert mid["misses"] - before["misses"] <= 4
    # tiny runs: their steps cannot win back XLA's optimisations, so the compile is fast
    assert a["compile_levels"] == b["compile_levels"] == {"train": "fast", "eval": "fast"}
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a["final/eval_loss"] == b["final/eval_loss"]

    def key(config):
        r = trainer.Run(config, str(tmp_path / "k"))
        return r._program_key("train", r.batch_spec, jax.ShapeDtypeStruct((6,), "float32"))
    base = key(cfg("b=x"))
    assert key(cfg("b=y")) == base                   # lr is a runtime input
    longer = cfg("b=x")
    longer.train.steps = 50                          # so is the schedule length
    assert key(longer) == base
    wide = cfg("b=x")
    wide.model.llm.mlp_dim = 48
    assert key(wide) != base
    clipped = cfg("b=x")
    clipped.optim.clip_norm = 0.5                    # compiled into the step
    assert key(clipped) != base
    # a model passed in (not described by the config) is never shared
    r = trainer.Run(cfg("b=x"), str(tmp_path / "m"), model=trainer.Run(
        cfg("b=x"), str(tmp_path / "n")).model)
    assert r._program_key("train") is None
