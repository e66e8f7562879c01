"""fast_init: one draw + host placement gives flax's init distributions for every leaf
(whose own values the test checks against the rules), NativeVLM's `init` values bit for
bit, values independent of the parts asked for, leaves on the shardings asked for."""
import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import native as cn
from tests.compiled import fast
from vlm_jax.models import batch_spec, build_model, fast_init
from vlm_jax.train import program_cache, sharding
from vlm_jax.train.trainer import FAST_COMPILE


def _clip(loss):
    c = common.base_config()
    c.model.kind = "clip"
    v = c.model.vision
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim = 16, 8, 32, 2, 4, 64
    c.model.llm.vocab_size = 50
    c.model.clip.update(loss=loss, embed_dim=16, text_width=32, text_depth=1, text_heads=4,
                        text_max_len=12)
    c.data.seq_len = 8
    return c


def _lm():
    c = common.base_config()
    c.model.kind = "lm"
    c.model.llm.update(vocab_size=64, width=32, depth=2, heads=2, kv_heads=2, mlp_dim=64,
                       scan_layers=False, tie_embeddings=False)
    c.data.seq_len = 8
    return c


CONFIGS = {
    "native": lambda: cn.get_config("demo_run,llm=t64,vit=e16"),
    "clip": lambda: _clip("clip"),
    "siglip": lambda: _clip("siglip"),
    "lm": _lm,
}


def _setup(kind):
    c = CONFIGS[kind]()
    model = build_model(c.model)
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec(c, 2).items()}
    rng = jax.random.PRNGKey(5)
    flax_init = lambda r: nn.Module.init(model, r, batch)["params"]   # per-parameter draws
    boxed = jax.eval_shape(flax_init, rng)
    return model, batch, rng, flax_init, boxed


def _normal_ok(values: np.ndarray, std: float, what: str) -> None:
    """values ~ normal(0, std): mean and std within 4 standard errors."""
    n = values.size
    assert abs(values.mean()) < 4 * std / np.sqrt(n) + 1e-7, what
    assert abs(values.std() / std - 1) < 4 / np.sqrt(2 * n), (what, values.std(), std)


def _check_rules(plan, tree, what):
    leaves = jax.tree.leaves(nn.unbox(tree))
    assert len(leaves) == len(plan.leaves)
    groups = collections.defaultdict(list)
    for leaf, x in zip(plan.leaves, leaves):
        x = np.asarray(x, np.float32)
        assert x.shape == leaf.shape, leaf.name
        if leaf.kind == "constant":
            np.testing.assert_array_equal(x, np.float32(leaf.value), err_msg=f"{what} {leaf.name}")
        else:
            assert x.std() > 0, f"{what} {leaf.name}"
            groups[leaf.value].append(x.ravel())
    for std, xs in groups.items():
        _normal_ok(np.concatenate(xs), std, f"{what} std {std}")
    return groups


# native: tests/native/test_native_init.py checks flax's init against the rules, and the
# plan's values are its init's (test_native_values_are_its_init_bit_for_bit)
@pytest.mark.parametrize("kind", ["clip", "siglip", "lm"])
def test_plan_follows_flax_init_rules(kind):
    model, batch, rng, flax_init, boxed = _setup(kind)
    plan = fast_init.plan(model, boxed)
    assert plan is not None
    # flax's own init follows the rules (fails when a layer's initialiser changes)
    ref = fast(flax_init, rng)(rng)
    _check_rules(plan, ref, "flax")
    # ours: same tree, shapes, dtypes; the rules' distributions; every leaf its own draw
    ours = plan.values(plan.draw(rng))
    ref = nn.unbox(ref)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), ours) == jax.tree.map(
        lambda x: (x.shape, x.dtype), ref)
    groups = _check_rules(plan, ours, "fast_init")
    firsts = [float(x[0]) for xs in groups.values() for x in xs]
    assert len(set(firsts)) == len(firsts)
    # the only program: one draw of the normal leaves' size
    assert plan.size == sum(int(np.prod(l.shape)) for l in plan.leaves if l.kind == "normal")
    n_draws = len(re.findall(r"name=_normal\b", str(jax.make_jaxpr(plan.draw)(rng))))
    assert n_draws == 1


def test_native_values_are_its_init_bit_for_bit():
    model, batch, rng, _, boxed = _setup("native")
    plan = fast_init.plan(model, boxed)
    # both at the trainer's init level (XLA's level changes the draw's last bits)
    ours = plan.values(plan.draw.lower(rng).compile(FAST_COMPILE)(rng))
    via_init = nn.unbox(fast(lambda r: model.init(r, batch)["params"], rng)(rng))
    jax.tree.map(np.testing.assert_array_equal, ours, via_init)


def test_parts_and_shardings():
    model, batch, rng, _, boxed = _setup("native")
    plan = fast_init.plan(model, boxed)
    flat = plan.draw(rng)
    full = plan.values(flat)
    # the trainer's mesh and param shardings (from the boxed tree's logical axes)
    c = CONFIGS["native"]()
    mesh = sharding.make_mesh(c.mesh)
    want = nn.unbox(sharding.tree_shardings(boxed, mesh))
    shard = {"vision": want["vision"]}
    # under the trainer's mesh + logical rules: placing the leaves compiles nothing (no
    # per-shape identity programs from flax's unbox constraints)
    lowerings = program_cache.stats()["lowerings"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_rules(mesh)):
        part = plan.values(flat, parts=["vision"], shardings=shard)
    assert program_cache.stats()["lowerings"] == lowerings
    assert list(part) == ["vision"]
    jax.tree.map(np.testing.assert_array_equal, part["vision"], full["vision"])
    assert jax.tree.map(lambda x: x.sharding, part) == shard


def test_no_plan_without_rules_or_over_the_size_bound(monkeypatch):
    model, _, _, _, boxed = _setup("lm")
    assert fast_init.plan(model, boxed) is not None
    monkeypatch.setattr(fast_init, "MAX_PARAMS", 1000)
    assert fast_init.plan(model, boxed) is None

    class NoRules(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)
    assert fast_init.plan(NoRules(), {"Dense_0": {"kernel": jax.ShapeDtypeStruct(
        (3, 2), jnp.float32)}}) is None


def test_bf16_leaves_are_the_rounded_fp32_draw():
    p = fast_init.layout({"w": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16),
                          "norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.bfloat16)}})
    flat = p.draw(jax.random.PRNGKey(0))
    out = p.values(flat)
    assert out["w"].dtype == jnp.bfloat16 and out["norm"]["scale"].dtype == jnp.bfloat16
    want = (jnp.asarray(flat)[:32] * np.float32(0.02)).reshape(4, 8).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(out["norm"]["scale"], np.float32), 1.0)
