"""VLM / LM: registry, batch_spec, splicing, loss masking, scan == unscanned, remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vlm_jax import models
from vlm_jax.convert.layout import stack_layers, unstack_layers
from vlm_jax.models import vlm as vlm_mod
from vlm_jax.train.trainer import FAST_COMPILE


def tiny_config(kind="vlm", scan=True, remat="none"):
    c = common.base_config()
    c.model.kind = kind
    c.model.vision.update(image_size=32, patch_size=8, width=32, depth=3, heads=4, mlp_dim=64,
                          scan_layers=scan, remat=remat)
    c.model.llm.update(vocab_size=101, width=48, depth=2, heads=4, kv_heads=2, mlp_dim=96,
                       scan_layers=scan, remat=remat)
    c.data.seq_len = 8
    return c


def make_batch(c, b=2, seed=0):
    spec = models.batch_spec(c, b)
    rng = np.random.default_rng(seed)
    t = spec["tokens"].shape[1]
    k = t - c.data.seq_len
    tokens = rng.integers(1, c.model.llm.vocab_size, (b, t)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32), "valid": np.ones((b,), np.float32)}
    lm = np.ones((b, t), np.float32)
    lm[:, -1] = 0
    if "visual_mask" in spec:
        vm = np.zeros((b, t), bool)
        vm[:, 1:1 + k] = True          # <bos> <image>*k caption...
        tokens[vm] = c.model.image_token_id
        lm[:, :k] = 0                   # only caption tokens count
        batch["visual_mask"] = vm
        batch["pixels"] = rng.integers(0, 256, spec["pixels"].shape).astype(np.uint8)  # raw RGB
    batch["loss_mask"] = lm
    assert set(batch) == set(spec)
    for key, s in spec.items():
        assert batch[key].shape == s.shape and batch[key].dtype == s.dtype, key
    return batch


def init(c, batch):
    """Random params; the init program runs once, so it is compiled without optimisations
    (the trainer does the same: 5x faster to compile)."""
    m = models.build_model(c.model)
    rng = jax.random.key(0)
    params = jax.jit(m.init).lower(rng, batch).compile(FAST_COMPILE)(rng, batch)
    return m, nn.meta.unbox(params)["params"]


def run(m, params, batch, method=None):
    """Jitted apply (eager flax scans are slow)."""
    f = jax.jit(lambda p, b: m.apply({"params": p}, b, method=method))
    return f(params, batch)


def test_registry_kinds_and_errors():
    c = tiny_config()
    assert type(models.build_model(c.model)).__name__ == "VLM"
    c.model.kind = "lm"
    assert type(models.build_model(c.model)).__name__ == "LM"
    c.model.kind = "nope"
    with pytest.raises(ValueError, match="model.kind"):
        models.build_model(c.model)


def test_vlm_loss_counts_caption_tokens_only():
    c = tiny_config()
    batch = make_batch(c)
    m, params = init(c, batch)
    assert set(params) == {"vision", "projector", "llm"}
    out = run(m, params, batch)
    assert out["num_tokens"] == batch["loss_mask"].sum()
    logits = run(m, params, batch, method="logits")
    assert logits.shape == batch["tokens"].shape + (c.model.llm.vocab_size,)
    lse = jax.nn.logsumexp(logits, -1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    ref = jnp.sum((lse - picked) * batch["loss_mask"])
    np.testing.assert_allclose(out["loss_sum"], ref, rtol=1e-5)
    # The loss only unembeds the T-K+1 positions that can carry loss: still exact when
    # all of them do (every text position and the last image position).
    full = np.ones_like(batch["loss_mask"])
    full[:, 1:batch["visual_mask"][0].sum()] = 0  # image positions but the last
    assert full.sum(1).max() == batch["tokens"].shape[1] - batch["visual_mask"][0].sum() + 1
    out_full = run(m, params, dict(batch, loss_mask=full))
    np.testing.assert_allclose(out_full["loss_sum"], jnp.sum((lse - picked) * full), rtol=1e-5)
    assert out_full["num_tokens"] == full.sum()
    # A padding example (valid = 0) contributes nothing.
    b2 = dict(batch, valid=np.array([1, 0], np.float32))
    out2 = run(m, params, b2)
    assert out2["num_tokens"] == batch["loss_mask"][0].sum()


def test_vlm_features_path_equals_pixels_path():
    c = tiny_config()
    batch = make_batch(c)
    m, params = init(c, batch)
    feats = m.apply({"params": params}, batch["pixels"],
                    method=lambda mod, px: mod.vision.features(px))
    assert feats.shape == (2, 16, 32)
    b2 = {k: v for k, v in batch.items() if k != "pixels"}
    b2["features"] = feats
    a = run(m, params, batch)
    b = run(m, params, b2)
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-6)


def test_splice_places_image_tokens_in_order():
    emb = jnp.zeros((1, 6, 2))
    img = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 3, 2)
    vm = jnp.array([[False, True, True, True, False, False]])
    out = vlm_mod.splice(emb, img, vm)
    np.testing.assert_array_equal(out[0, 1:4], img[0])
    np.testing.assert_array_equal(out[0, [0, 4, 5]], 0)


REMAT = {"vlm": "full", "lm": "dots"}


@pytest.mark.parametrize("kind", ["vlm", "lm"])
def test_scanned_equals_unscanned_and_remat(kind):
    c = tiny_config(kind, scan=True)
    batch = make_batch(c)
    m, params = init(c, batch)
    ref = run(m, params, batch, method="logits")
    cu = tiny_config(kind, scan=False)
    mu = models.build_model(cu.model)
    pu = unstack_layers(params)
    init_u = nn.meta.unbox(jax.eval_shape(mu.init, jax.random.key(0), batch))["params"]
    assert jax.tree.map(jnp.shape, pu) == jax.tree.map(jnp.shape, init_u)
    got = run(mu, pu, batch, method="logits")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    back = stack_layers(pu)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))
    # Remat changes memory, not math: same gradients (one policy per kind keeps it fast).
    mr = models.build_model(tiny_config(kind, scan=True, remat=REMAT[kind]).model)
    g = jax.jit(jax.grad(lambda p: mr.apply({"params": p}, batch)["loss_sum"]))(params)
    g0 = jax.jit(jax.grad(lambda p: m.apply({"params": p}, batch)["loss_sum"]))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, g0)


def test_chunked_loss_matches_naive():
    c = tiny_config("vlm")
    batch = make_batch(c)
    m, params = init(c, batch)
    a = run(m, params, batch)
    c.model.llm.loss_chunk = 5
    m2 = models.build_model(c.model)
    b = run(m2, params, batch)
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
    c.model.llm.tie_embeddings = True
    _, pt = init(c, batch)
    assert "lm_head" not in pt["llm"]


def test_logical_axes_on_every_param():
    c = tiny_config()
    batch = make_batch(c)
    m = models.build_model(c.model)
    boxed = jax.eval_shape(m.init, jax.random.key(0), batch)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape)


def test_batch_spec_vlm_length():
    c = tiny_config()
    spec = models.batch_spec(c, 3)
    assert spec["tokens"].shape == (3, 16 + 8)
    assert spec["pixels"].shape == (3, 32, 32, 3)
    c.model.vision.feature_select = "cls_patch"
    assert models.batch_spec(c, 3)["tokens"].shape == (3, 17 + 8)
