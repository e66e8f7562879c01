"""In-process program reuse (vlm_jax.train.program_cache), what makes the grid's warm
worker fast: a second run of equal shapes reuses the compiled init/train/eval programs and
trains exactly as the first (and evaluates the same cached eval batches); runs that differ
only in runtime inputs (lr) share them, a different architecture does not."""
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
    # the eval batches too: built once, the second run evaluates the same device arrays;
    # another train subset size shares them, another eval split size does not; a data module passed in is never shared
    ra, rb = (trainer.Run(cfg("b=x"), str(tmp_path / n)) for n in ("ea", "eb"))
    assert ra._eval_key() == rb._eval_key() is not None
    assert ra.eval_batches() is rb.eval_batches()
    other = cfg("b=x")
    other.data.eval_n = 4
    assert trainer.Run(other, str(tmp_path / "ec"))._eval_key() != ra._eval_key()
    smaller = cfg("b=x")                             # another train subset: same eval split
    smaller.data.n = 64
    assert trainer.Run(smaller, str(tmp_path / "ee"))._eval_key() == ra._eval_key()
    own = trainer.Run(cfg("b=x"), str(tmp_path / "ed"), data=ra.data)
    assert own._eval_key() is None and own.eval_batches() is not ra.eval_batches()

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


def test_frozen_init_from_parts_are_shared_trainable_ones_are_not(tmp_path):
    """A frozen `init_from` part is placed on the mesh once per process (the train step
    never donates it); a trainable one is rebuilt for every run (its state is donated)."""
    from configs import demo
    vit = str(tmp_path / "vit")
    trainer.run(demo.get_config("clip_run,vit=S,steps=1,batch=4,eval_n=4"), vit)

    def vlm(name):
        c = demo.get_config("run,vit=S,llm=S,n=8,batch=4,eval_n=4,feature_cache=0")
        c.model.vision.init_from = vit
        return trainer.Run(c, str(tmp_path / name))
    (_, fa), (_, fb) = vlm("a").init_params(), vlm("b").init_params()
    assert jax.tree.leaves(fa["vision"])[0] is jax.tree.leaves(fb["vision"])[0]
    pre = str(tmp_path / "pre")
    trainer.run(expand.build_config(TINY_GRID, "run,steps=1"), pre)

    def lm(name):   # all params trainable
        c = expand.build_config(TINY_GRID, "run,steps=1")
        c.model.llm.init_from = pre
        return trainer.Run(c, str(tmp_path / name))
    (ta, _), (tb, _) = lm("c").init_params(), lm("d").init_params()
    x, y = jax.tree.leaves(ta["llm"])[0], jax.tree.leaves(tb["llm"])[0]
    assert x is not y and bool((x == y).all())
