"""Optimizer, schedules, freeze masks, gradient accumulation, NaN guard, eval exactness."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests.train import tiny
from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import optim, step as step_lib, trainer


def test_schedules():
    c = tiny.config().optim
    c.lr, c.warmup_steps, c.min_lr_ratio = 1.0, 10, 0.0
    for kind in ("cosine", "linear", "constant", "wsd"):
        c.schedule = kind
        s = optim.make_schedule(c, 100)
        assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6   # linear warmup
        assert abs(float(s(10)) - 1.0) < 1e-6
        end = float(s(100))
        assert end == pytest.approx(1.0 if kind == "constant" else 0.0, abs=1e-6), kind
    c.schedule, c.decay_frac = "wsd", 0.2
    s = optim.make_schedule(c, 100)
    assert float(s(79)) == pytest.approx(1.0) and float(s(90)) == pytest.approx(0.5)
    c.schedule = "cosine"
    assert float(optim.make_schedule(c, 100)(55)) == pytest.approx(0.5, abs=1e-6)
    c.schedule = "exp"
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedule(c, 100)


def _setup(trainable, frozen_dtype="float32", grad_accum=1, **optim_kw):
    c = tiny.config(grad_accum=grad_accum, eval_batch_size=4)
    c.optim.trainable = trainable
    c.optim.update(optim_kw)
    c.model.frozen_dtype = frozen_dtype
    r = trainer.Run(c, "/nonexistent-not-written", model=tiny.TinyVLM(),
                    batch_spec=tiny.batch_spec, data=tiny.Data())
    tr, fr = r.init_params()
    state = r.init_state(tr)
    r.compile(state, fr)
    return r, state, fr


@pytest.fixture(scope="module")
def proj():
    """Projector-only training, fp32 (shared: every setup costs a compilation)."""
    return _setup(("projector",))


def _batches(r, n):
    it = r.data.train_iterator(r.config)
    from vlm_jax.train import sharding
    return [sharding.global_batch(next(it), r.mesh) for _ in range(n)]


def test_freeze_projector_only(proj):
    r, state, frozen = proj
    state = jax.tree.map(jnp.copy, state)  # the step donates its state
    assert set(state["params"]) == {"projector"}
    assert set(frozen) == {"vision", "llm"}
    # no optimizer state for frozen params: every opt-state array is a projector leaf's size
    n_tr = optim.count_params(state["params"])
    mu = state["opt_state"][1][0].mu
    assert optim.count_params(mu) == n_tr
    frozen0 = jax.tree.map(np.asarray, frozen)
    p0 = jax.tree.map(np.asarray, state["params"])
    for b in _batches(r, 3):
        state, m = r.train_step(state, frozen, b)
    assert bool(m["finite"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, frozen0)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], p0)
    assert all(jax.tree.leaves(changed))


def test_frozen_weights_get_no_gradients_and_bf16_storage():
    """Compiled FLOPs: training only the projector skips the frozen weights' gradients."""
    r_all, s_all, f_all = _setup(("",))
    r_pr, s_pr, f_pr = _setup(("projector",), frozen_dtype="bfloat16")
    fl_all = r_all.train_step.cost_analysis()["flops"]
    fl_pr = r_pr.train_step.cost_analysis()["flops"]
    assert fl_pr < 0.85 * fl_all, (fl_pr, fl_all)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(f_pr))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s_pr["params"]))
    b = _batches(r_pr, 1)[0]
    s_pr, m = r_pr.train_step(s_pr, f_pr, b)
    assert np.isfinite(float(m["loss"]))


def test_grad_accum_matches_full_batch(proj):
    r1, s1, f1 = proj
    s1 = jax.tree.map(jnp.copy, s1)
    r2, s2, f2 = _setup(("projector",), grad_accum=4)
    for b in _batches(r1, 3):
        s1, m1 = r1.train_step(s1, f1, b)
        s2, m2 = r2.train_step(s2, f2, b)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["num_tokens"]), float(m2["num_tokens"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-4, atol=2e-6),
                 s1["params"], s2["params"])


def test_trainable_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="optim.trainable"):
        _setup(("no_such_module",))


def test_eval_loss_is_exact_token_weighted_mean(proj):
    """13 eval examples in batches of 4 (last one padded) == one pass per example."""
    r, state, frozen = proj
    got = r.evaluate(state["params"], frozen)["eval/loss"]
    apply = jax.jit(tiny.TinyVLM().apply)
    params = optim.merge_params(jax.device_get(state["params"]), jax.device_get(frozen))
    tot, cnt = 0.0, 0.0
    for i in range(13):
        e = {k: np.asarray(v)[None] for k, v in tiny.example(10_000 + i).items()}
        out = apply({"params": params}, e)
        tot += float(out["loss_sum"])
        cnt += float(out["num_tokens"])
    assert cnt > 0 and got == pytest.approx(tot / cnt, rel=1e-6)
    # ... and differs from the mean of batch means (the batches hold unequal token counts)
    sums = [(float(np.sum(b["loss_mask"])), b) for b in r.data.eval_batches(r.config)]
    assert len(sums) == 4 and len({s for s, _ in sums}) > 1


def test_nonfinite_guard_skips_and_stops(tmp_path):
    c = tiny.config(steps=10, max_nonfinite=3, checkpoint_every_steps=2)
    with pytest.raises(trainer.NonFiniteError, match="max_nonfinite"):
        tiny.run(c, str(tmp_path), data=tiny.Data(nan_after=4))
    mgr = ckpt.make_manager(str(tmp_path), read_only=True)
    assert mgr.latest_step() == 4  # the last good checkpoint, nothing after the NaNs
    mgr.close()
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["train/skipped_steps"] for l in lines] == [0, 0, 0, 0, 1, 2]
    assert not os.path.exists(tmp_path / "result.json")


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd", "wsd:1-sqrt"])
@pytest.mark.parametrize("warm", [0, 7])
def test_runtime_schedule_equals_compiled_schedule(kind, warm):
    """The trainer passes the schedule as numbers (one XLA program serves every run of the
    same shapes); its values must be those of the optax schedule at every step."""
    c = common.base_config().optim
    kind, _, shape = kind.partition(":")
    c.update(schedule=kind, lr=3e-3, warmup_steps=warm, warmup_frac=0.0, min_lr_ratio=0.1,
             decay_frac=0.2, decay_shape=shape or "linear")
    total = 53
    ref = optim.make_schedule(c, total)
    hp = optim.schedule_params(c, total)
    f = jax.jit(lambda s, h: optim.traced_schedule(s, h))
    for s in range(total + 3):
        assert float(f(s, hp)) == pytest.approx(float(ref(s)), rel=1e-5, abs=1e-9), s


def test_flat_optimizer_equals_per_leaf_update():
    """optim.flatten: AdamW over one fp32 vector of every trainable leaf (the default on
    one device) updates like the per-leaf chain up to fp32 rounding, with weight decay,
    clipping (active: clip_norm below the gradient norm) and the runtime schedule; its
    state is two vectors instead of two trees, and its program is smaller."""
    kw = dict(weight_decay=0.1, clip_norm=0.05, warmup_steps=2)
    r_leaf, s_leaf, f_leaf = _setup(("",), flatten="off", **kw)
    r_flat, s_flat, f_flat = _setup(("",), flatten="auto", **kw)
    assert r_flat.flat_optimizer and not r_leaf.flat_optimizer
    mu = s_flat["opt_state"][1][0].mu
    assert mu.shape == (optim.count_params(s_flat["params"]),) and mu.dtype == jnp.float32
    assert len(jax.tree.leaves(s_leaf["opt_state"])) > len(jax.tree.leaves(s_flat["opt_state"]))
    p0 = jax.tree.map(np.asarray, s_leaf["params"])            # the step donates its state
    for b in _batches(r_leaf, 4):
        s_leaf, m_leaf = r_leaf.train_step(s_leaf, f_leaf, b)
        s_flat, m_flat = r_flat.train_step(s_flat, f_flat, b)
        assert float(m_leaf["grad_norm"]) > 0.05                 # the clip is active
        np.testing.assert_allclose(float(m_flat["loss"]), float(m_leaf["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m_flat["grad_norm"]), float(m_leaf["grad_norm"]),
                                   rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6),
                 s_flat["params"], s_leaf["params"])
    np.testing.assert_allclose(np.asarray(s_flat["opt_state"][1][0].nu),
                               np.asarray(optim.ravel(s_leaf["opt_state"][1][0].nu)),
                               rtol=1e-5, atol=1e-12)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         s_flat["params"], p0)
    assert max(jax.tree.leaves(moved)) > 1e-4                   # the steps did something


def test_flatten_modes():
    c = common.base_config().optim
    x = jnp.zeros((3,))
    assert optim.use_flat(c, {"a": x})                          # auto, replicated
    c.flatten = "off"
    assert not optim.use_flat(c, {"a": x})
    c.flatten = "yes"
    with pytest.raises(ValueError, match="optim.flatten='yes'"):
        optim.use_flat(c, {"a": x})
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((4,), jnp.bfloat16)}
    back = optim.unravel(tree, optim.ravel(tree))
    assert back["b"].dtype == jnp.bfloat16 and optim.ravel(tree).dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_wsd_1_sqrt_decay_shape():
    """wsd with decay_shape 1-sqrt: lr x (1 - sqrt(x)) at fraction x of the decay (min_lr 0),
    constant before it; a wrong shape is a clear error."""
    c = common.base_config().optim
    c.update(schedule="wsd", lr=1.0, warmup_steps=0, warmup_frac=0.0, min_lr_ratio=0.0,
             decay_frac=0.25, decay_shape="1-sqrt")
    f = optim.make_schedule(c, 100)
    assert float(f(10)) == 1.0 and float(f(75)) == 1.0
    assert float(f(75 + 4)) == pytest.approx(1 - (4 / 25) ** 0.5)   # 0.6, linear: 0.84
    assert float(f(100)) == pytest.approx(0.0, abs=1e-7)
    c.decay_shape = "cosine"
    with pytest.raises(ValueError, match="optim.decay_shape='cosine'"):
        optim.schedule_params(c, 100)
