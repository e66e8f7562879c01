"""Contrastive (kind "clip") model: losses against NumPy references, padding masking, and
real optimisation steps that lower the loss on a learnable pairing task."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tests.compiled import fast, run_fast
from vlm_jax.models import clip


def _init(model, batch):
    return run_fast(model.init, jax.random.key(0), batch)["params"]


def _config(loss="clip", class_token=True):
    c = common.base_config()
    c.model.kind = "clip"
    v = c.model.vision
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim = 16, 8, 32, 2, 4, 64
    v.class_token = class_token
    c.model.llm.vocab_size = 50
    c.model.clip.update(loss=loss, embed_dim=16, text_width=32, text_depth=2, text_heads=4,
                        text_max_len=12)
    c.data.seq_len = 8
    return c


def _batch(b=4, seed=0, t=8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t + 1, size=b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {"pixels": rng.integers(0, 256, size=(b, 16, 16, 3)).astype(np.uint8),  # raw RGB
            "tokens": (rng.integers(1, 50, size=(b, t)) * seg).astype(np.int32),
            "segment_ids": seg, "valid": np.ones((b,), np.float32)}


def _np_clip(img, txt, scale):
    logits = scale * img @ txt.T
    def lsm(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))
    d = np.arange(len(img))
    return -0.5 * (lsm(logits)[d, d] + lsm(logits.T)[d, d])


def _np_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits)), axis=1)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_losses_match_numpy_reference():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(5, 8)))
    valid = jnp.ones(5)
    per, _ = clip.clip_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, valid)
    np.testing.assert_allclose(per, _np_clip(img, txt, 10.0), rtol=1e-5, atol=1e-5)
    per, _ = clip.siglip_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -3.0, valid)
    np.testing.assert_allclose(per, _np_siglip(img, txt, 10.0, -3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_padding_examples_do_not_change_the_loss(loss):
    c = _config(loss)
    model = clip.CLIPModel(c.model)
    b = _batch(4)
    params = _init(model, b)
    assert set(params) == {"vision", "text", "head"}
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    out = run_fast(apply, params, b)
    # Append two padding examples (valid = 0): per-example losses of the real ones and
    # the sums must not move.
    pad = _batch(2, seed=7)
    pad["valid"] = np.zeros(2, np.float32)
    both = {k: np.concatenate([b[k], pad[k]]) for k in b}
    out2 = run_fast(apply, params, both)
    assert float(out2["num_tokens"]) == 4.0
    np.testing.assert_allclose(out2["loss_sum"], out["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(out2["accuracy"], out["accuracy"], rtol=1e-6)


def test_batch_spec_matches_a_real_batch_and_rejects_long_text():
    c = _config()
    spec = clip.batch_spec(c, 4)
    b = _batch(4)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == \
        {k: (v.shape, v.dtype) for k, v in b.items()}
    c.data.seq_len = 13
    with pytest.raises(ValueError, match="text_max_len"):
        clip.batch_spec(c, 4)


@pytest.mark.parametrize("loss,class_token", [("clip", True), ("siglip", False)])
def test_training_learns_the_pairing(loss, class_token):
    """Each image (a fixed random pattern) comes with its own caption token: after a few
    AdamW steps the model pairs each image with its caption far better than chance."""
    c = _config(loss, class_token)
    model = clip.CLIPModel(c.model)
    rng = np.random.default_rng(0)
    b = 8
    ids = rng.permutation(np.arange(1, 50))[:b]
    pixels = rng.normal(size=(b, 16, 16, 3)).astype(np.float32)
    seg = np.zeros((b, 8), np.int32)
    seg[:, :2] = 1
    tokens = np.zeros((b, 8), np.int32)
    tokens[:, 0], tokens[:, 1] = ids, 1
    batch = {"pixels": pixels, "tokens": tokens, "segment_ids": seg,
             "valid": np.ones(b, np.float32)}
    params = _init(model, batch)
    tx = optax.adamw(1e-3, weight_decay=0.0)
    opt = tx.init(params)

    def loss_fn(p):
        out = model.apply({"params": p}, batch)
        return out["loss_sum"] / out["num_tokens"], out

    def step(p, o):
        (l, out), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l, out["accuracy"]

    step = fast(step, params, opt)
    first = None
    for _ in range(60):
        params, opt, l, acc = step(params, opt)
        first = float(l) if first is None else first
    assert float(l) < 0.5 * first, (first, float(l))
    assert float(acc) >= 0.75
    if loss == "clip":
        assert first == pytest.approx(math.log(b), rel=0.3)
