"""Chunked next-token loss: exact value/gradients vs the naive loss, and lower memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers, losses


def _inputs(b=2, t=13, e=16, v=50, tied=False, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(k[0], (b, t, e), jnp.float32)
    w = jax.random.normal(k[1], (v, e) if tied else (e, v), jnp.float32) * 0.3
    targets = jax.random.randint(k[2], (b, t), 0, v)
    mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)
    return hidden, w, targets, mask


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_value_and_grads_equal_naive(tied, chunk):
    hidden, w, targets, mask = _inputs(tied=tied)

    def naive(h, w):
        logits = h @ (w.T if tied else w)
        return layers.next_token_loss(logits, targets, mask)

    def chunked(h, w):
        return losses.chunked_next_token_loss(h, w, targets, mask, chunk, tied=tied)

    (ls_n, n_n), (ls_c, n_c) = naive(hidden, w), jax.jit(chunked)(hidden, w)
    np.testing.assert_allclose(ls_c, ls_n, rtol=1e-5, atol=1e-5)
    assert float(n_c) == float(n_n) == float(mask.sum())

    def mean(fn):
        return lambda h, w: (lambda s, n: s / n)(*fn(h, w))

    gn = jax.jit(jax.grad(mean(naive), argnums=(0, 1)))(hidden, w)
    gc = jax.jit(jax.grad(mean(chunked), argnums=(0, 1)))(hidden, w)
    for a, b in zip(gc, gn):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_only_wrt_hidden_and_masked_tokens_get_zero():
    hidden, w, targets, mask = _inputs(t=8)
    f = lambda h: losses.chunked_next_token_loss(h, w, targets, mask, 3)[0]
    g = jax.jit(jax.grad(f))(hidden)
    gn = jax.jit(jax.grad(lambda h: layers.next_token_loss(h @ w, targets, mask)[0]))(hidden)
    np.testing.assert_allclose(g, gn, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)


def test_bf16_close_to_fp32():
    hidden, w, targets, mask = _inputs(t=16, v=64)
    ref = jax.jit(losses.naive_next_token_loss)(hidden, w, targets, mask)[0]
    out = jax.jit(lambda h: losses.chunked_next_token_loss(h, w, targets, mask, 4)[0])(
        hidden.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=2e-2)
    g = jax.jit(jax.grad(lambda h: losses.chunked_next_token_loss(h, w, targets, mask, 4)[0]))(
        hidden.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_dispatch_and_errors():
    hidden, w, targets, mask = _inputs()
    a = losses.next_token_loss_from_hidden(hidden, w, targets, mask, chunk=0)
    b = losses.next_token_loss_from_hidden(hidden, w, targets, mask, chunk=4)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    with pytest.raises(ValueError, match="tied=True"):
        losses.chunked_next_token_loss(hidden, w.T, targets, mask, 4)
    with pytest.raises(ValueError, match="loss_chunk"):
        losses.chunked_next_token_loss(hidden, w, targets, mask, 0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        losses.chunked_next_token_loss(hidden, w, targets[:, :3], mask, 4)


def _temp_bytes(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("backend gives no memory analysis")
    return mem.temp_size_in_bytes


def test_memory_far_below_naive_for_large_vocab():
    b, t, e, v = 2, 512, 64, 32000
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, e), jnp.float32), sds((e, v), jnp.float32),
            sds((b, t), jnp.int32), sds((b, t), jnp.float32))

    def grad_of(loss_fn):
        def f(h, w, tg, m):
            return jax.grad(lambda h, w: loss_fn(h, w, tg, m)[0], argnums=(0, 1))(h, w)
        return f

    naive = _temp_bytes(grad_of(losses.naive_next_token_loss), *args)
    chunked = _temp_bytes(grad_of(lambda h, w, tg, m: losses.chunked_next_token_loss(
        h, w, tg, m, 32)), *args)
    logits_bytes = b * t * v * 4
    assert naive >= logits_bytes            # the naive loss holds at least one [B,T,V] fp32
    assert chunked < 0.25 * naive, (chunked, naive)
    assert chunked < logits_bytes / 2
