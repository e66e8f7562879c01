"""layers.dot_product_attention: the einsum attention (default) against jax.nn's XLA path:
values and gradients, grouped-query heads, segment/causal/per-head masks, bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers as L


def _inputs(b=2, t=9, s=9, n=4, kv=2, h=8, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q, w = (jnp.asarray(r.normal(size=(b, t, n, h)), dtype) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(b, s, kv, h)), dtype) for _ in range(2))
    return q, k, v, w


def _value_and_grads(impl, q, k, v, w, mask):
    def f(q, k, v):
        o = L.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32)), o
    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


def _masks(b, t, n):
    seg = np.ones((b, t), np.int32)
    seg[0, -3:] = 2          # two packed segments in row 0
    seg[1, -2:] = 0          # padding at the end of row 1
    causal_seg = L.attention_mask(jnp.asarray(seg), causal=True, q_len=t)      # [B, 1, T, T]
    per_head = np.random.default_rng(1).random((b, n, t, t)) > 0.3
    per_head |= np.eye(t, dtype=bool)[None, None]      # every row attends somewhere
    return {"none": None, "causal": L.attention_mask(None, True, t),
            "segments": causal_seg, "per_head": jnp.asarray(per_head)}


@pytest.mark.parametrize("mask_name,kv", [("none", 4), ("causal", 1), ("segments", 2),
                                          ("per_head", 2)])
def test_einsum_attention_matches_jax_nn(mask_name, kv):
    q, k, v, w = _inputs(kv=kv)
    mask = _masks(q.shape[0], q.shape[1], q.shape[2])[mask_name]
    o_ref, g_ref = _value_and_grads("xla", q, k, v, w, mask)
    o, g = _value_and_grads("", q, k, v, w, mask)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(g, g_ref):
        assert a.shape == b_.shape
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_einsum_attention_cross_lengths_and_bf16():
    q, k, v, w = _inputs(t=5, s=11, kv=2, dtype=jnp.bfloat16)
    o_ref, g_ref = _value_and_grads("xla", q, k, v, w, None)
    o, g = _value_and_grads("einsum", q, k, v, w, None)
    assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
    np.testing.assert_allclose(np.float32(o), np.float32(o_ref), atol=3e-2)
    for a, b_ in zip(g, g_ref):
        np.testing.assert_allclose(np.float32(a), np.float32(b_), atol=6e-2)


def test_attention_errors():
    q, k, v, _ = _inputs(n=4, kv=2)
    with pytest.raises(ValueError, match="attention_impl=.flash9.: use one of"):
        L.dot_product_attention(q, k, v, implementation="flash9")
    with pytest.raises(ValueError, match="not a multiple"):
        L.dot_product_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="mask of shape"):
        L.dot_product_attention(q, k, v, mask=jnp.ones((2, 2, 9, 9), bool))


@pytest.mark.parametrize("blocks", [2, 4])
def test_causal_blocks_equal_full_attention(blocks):
    """`causal=True` (T >= n * CAUSAL_SPLIT_MIN_ROWS: n query blocks, each against the keys
    up to its end) equals the unsplit einsum attention and jax.nn, values and grads."""
    t = blocks * L.CAUSAL_SPLIT_MIN_ROWS + 3
    spans = L.causal_blocks(t)
    assert len(spans) == blocks and spans[0][0] == 0 and spans[-1][1] == t
    assert all(a[1] == b[0] and b[1] - b[0] >= L.CAUSAL_SPLIT_MIN_ROWS
               for a, b in zip(spans, spans[1:]))
    q, k, v, w = _inputs(t=t, s=t, n=2, kv=1, h=4)        # grouped-query heads
    mask = _masks(q.shape[0], t, q.shape[2])["segments"]  # causal + packed + padding

    def run(causal, impl="einsum"):
        def f(q, k, v):
            o = L.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                        causal=causal)
            return jnp.sum(o * w), o
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        return fn(q, k, v), fn.lower(q, k, v).as_text()
    ((_, o), g), hlo = run(True)
    ((_, o_full), g_full), hlo_full = run(False)
    (_, o_ref), g_ref = run(False, "xla")[0]
    assert hlo.count("dot_general") > hlo_full.count("dot_general")   # it did split
    # the blocks' gradients are assembled (concatenate / sums), not zero-padded per block
    assert "stablehlo.pad" not in hlo and "stablehlo.concatenate" in hlo
    for a, b_, c in zip((o,) + g, (o_full,) + g_full, (o_ref,) + g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
