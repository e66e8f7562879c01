"""NativeVLM.init: one random draw for every weight, the distributions of flax's
per-parameter init (whose rule the test checks), same tree and logical axes; big models
keep flax's init."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import native as cn
from vlm_jax.models import batch_spec, native
from vlm_jax.models.native import NativeVLM
from vlm_jax.train.trainer import FAST_COMPILE


def _batch(c):
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec(c, 2).items()}


def _kernels(compiled) -> int:
    return len(re.findall(r"^\s*(ROOT )?\S+ = \S+ fusion\(", compiled.as_text(), re.M))


def test_one_draw_init_matches_flax_tree_and_distributions(monkeypatch):
    c = cn.get_config("demo_run,llm=t64,vit=e16")
    model, batch = NativeVLM(c.model), _batch(c)
    rng = jax.random.PRNGKey(3)
    ours_fn = jax.jit(lambda r: model.init(r, batch))
    flax_fn = jax.jit(lambda r: nn.Module.init(model, r, batch))
    # same boxed tree: structure, shapes, dtypes and logical axis names
    a, b = jax.eval_shape(ours_fn, rng), jax.eval_shape(flax_fn, rng)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(
        lambda x: (x.shape, x.dtype), b)
    names = lambda t: [x.names for x in jax.tree.leaves(
        t, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
    assert names(a) == names(b)

    ours_c = ours_fn.lower(rng).compile(FAST_COMPILE)
    flax_c = flax_fn.lower(rng).compile(FAST_COMPILE)
    ours = nn.unbox(ours_c(rng)["params"])
    ref = nn.unbox(flax_c(rng)["params"])
    flat_o = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_r = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    n_leaves, drawn = len(flat_o), []
    for path, x in flat_o:
        y = np.asarray(flat_r[path])
        x = np.asarray(x)
        name = native._leaf_name(path)
        if name in native._ONES + native._ZEROS:
            # flax's init follows the rule too (fails if a layer's initialiser changes)
            want = 1.0 if name in native._ONES else 0.0
            np.testing.assert_array_equal(y, want, err_msg=jax.tree_util.keystr(path))
            np.testing.assert_array_equal(x, want)
        else:
            assert y.std() > 0 and x.std() > 0, jax.tree_util.keystr(path)
            drawn.append((x, y))
    xs = np.concatenate([x.ravel() for x, _ in drawn])
    ys = np.concatenate([y.ravel() for _, y in drawn])
    assert xs.size > 50_000
    for v in (xs, ys):  # both normal(0, INIT_STD)
        assert abs(v.mean()) < 1e-3 and abs(v.std() / native.INIT_STD - 1) < 0.02
    # every leaf its own values (disjoint slices of the draw), not copies
    firsts = {float(x.ravel()[0]) for x, _ in drawn}
    assert len(firsts) == len(drawn)
    # the point: one random draw, a few kernels (flax: a draw and key derivations per
    # parameter, ~10-20 XLA kernels each)
    n_draws = lambda f: len(re.findall(r"name=_normal\b", str(jax.make_jaxpr(f)(rng))))
    assert n_draws(ours_fn) == 1 and n_draws(flax_fn) >= len(drawn)
    assert _kernels(ours_c) < n_leaves + 20

    # above ONE_DRAW_MAX parameters: flax's per-parameter init, unchanged (same program)
    monkeypatch.setattr(native, "ONE_DRAW_MAX", 1000)
    big = jax.jit(lambda r: model.init(r, batch))
    assert str(jax.make_jaxpr(big)(rng)) == str(jax.make_jaxpr(flax_fn)(rng))
