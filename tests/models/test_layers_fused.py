"""The step-speed rewrites of layers.py / losses.py equal the plain formulations they
replace: the SwiGLU gate's one-pass backward, multi-axis kernels contracted as one 2-D
matmul (and compiled without copying the kernel), the fused loss over the whole sequence."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers as L
from vlm_jax.models import losses


def _normal(shape, seed, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_silu_mul_value_and_grads_equal_autodiff(dtype):
    g, u, w = (_normal((3, 5, 7), s, jnp.float32, 4.0) for s in range(3))  # saturates too
    ref = lambda g, u: jnp.sum((jax.nn.silu(g) * u).astype(jnp.float32) * w)
    new = lambda g, u: jnp.sum(L.silu_mul(g, u).astype(jnp.float32) * w)
    v_ref, g_ref = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(g, u)   # fp32 truth
    gd, ud = g.astype(dtype), u.astype(dtype)
    v_new, g_new = jax.jit(jax.value_and_grad(new, argnums=(0, 1)))(gd, ud)
    if dtype == jnp.float32:
        np.testing.assert_allclose(v_new, v_ref, rtol=1e-6)
        for a, b in zip(g_new, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        return
    # bf16 operands: the backward's math runs in fp32, so its gradients are at least as
    # close to the fp32 truth as autodiff's bf16 ones.
    _, g_auto = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(gd, ud)
    for a, auto, b in zip(g_new, g_auto, g_ref):
        assert a.dtype == dtype
        err = np.abs(np.float32(a) - np.float32(b)).max()
        assert err <= np.abs(np.float32(auto) - np.float32(b)).max() + 1e-6
        assert err <= 1e-2 * np.abs(np.float32(b)).max()


def _dot_general(x, k, n_in):
    """x's last n_in axes against the last n_in axes of an [out..., in...] kernel."""
    return jax.lax.dot_general(x, k, ((tuple(range(x.ndim - n_in, x.ndim)),
                                       tuple(range(k.ndim - n_in, k.ndim))), ((), ())))


@pytest.mark.parametrize("kshape,n_in", [((4, 3, 6), 1), ((6, 4, 3), 2), ((5, 6), 1)])
def test_linear_contract_equals_dot_general(kshape, n_in):
    x = _normal((2, 3) + kshape[len(kshape) - n_in:], 0)
    k = _normal(kshape, 1)
    f = lambda fn: jax.jit(jax.value_and_grad(
        lambda x, k: jnp.sum(jnp.sin(fn(x, k, n_in))), argnums=(0, 1)))(x, k)
    (v_ref, g_ref), (v, g) = f(_dot_general), f(L._contract)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    for a, b in zip(g, g_ref):   # fp32 sums in another order: atol for cancellations
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kshape,n_in", [((6, 4, 3), 2), ((5, 6), 1)])
def test_bf16_contract_accumulates_in_fp32(kshape, n_in):
    """On CPU a bf16 x bf16 contraction (value and both gradients) runs as dots with bf16
    operands and fp32 results, rounded once: as close to the fp32 result as one bf16
    rounding, and no dot of the program has a bf16 result or fp32 operands."""
    assert L.cpu_bf16_accumulate(jnp.bfloat16, jnp.bfloat16)   # the suite runs on CPU
    assert not L.cpu_bf16_accumulate(jnp.float32, jnp.bfloat16)
    x = _normal((2, 64) + kshape[len(kshape) - n_in:], 0)
    k = _normal(kshape, 1)
    loss = lambda fn, dt: jax.value_and_grad(   # noqa: E731
        lambda x, k: jnp.sum(jnp.sin(fn(x.astype(dt), k.astype(dt), n_in).astype(jnp.float32))),
        argnums=(0, 1))
    v_ref, g_ref = jax.jit(loss(_dot_general, jnp.float32))(x, k)
    # the inputs rounded to bf16 first: what is left is the dots' own rounding
    xb, kb = x.astype(jnp.bfloat16).astype(jnp.float32), k.astype(jnp.bfloat16).astype(jnp.float32)
    v_rb, g_rb = jax.jit(loss(_dot_general, jnp.float32))(xb, kb)
    f = jax.jit(loss(L._contract, jnp.bfloat16))
    v, g = f(x, k)
    np.testing.assert_allclose(v, v_rb, rtol=2e-2)
    for a, b in zip(g, g_rb):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) < 2e-2 * scale
    assert abs(float(v_rb) - float(v_ref)) < 5e-2 * abs(float(v_ref)) + 1e-3
    hlo = f.lower(x, k).compile().as_text()
    types = dict(re.findall(r"%?([\w.\-]+) = (\w+)\[", hlo))
    types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[^=]*? dot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo)
    assert len(dots) >= 3, hlo                          # forward, dx, dw
    for out, a, b in dots:
        assert (out, types[a], types[b]) == ("f32", "bf16", "bf16"), (out, a, b)


def test_multi_axis_kernel_is_not_copied_in_backward():
    """The input gradient of an attention output projection (kernel [embed, heads, kv])
    must read the kernel in place: no copy/transpose of it in the compiled program."""
    x, k = _normal((4, 16, 8, 32), 0), _normal((64, 8, 32), 1)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(L._contract(x, k, 2) ** 2)))
    hlo = grad.lower(x, k).compile().as_text()
    kernel = re.search(r"%(\S+) = f32\[64,8,32\]\{2,1,0\} parameter\(1\)", hlo).group(1)
    for line in hlo.splitlines():
        if re.search(rf"= \S+ (copy|transpose|fusion)\(%{re.escape(kernel)}\)", line):
            assert "dot" in line or "ynn" in line or "custom" in line, line


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_over_whole_sequence_equals_naive(tied):
    b, t, e, v = 2, 6, 8, 50
    h = _normal((b, t, e), 0)
    w = _normal((v, e) if tied else (e, v), 1, scale=0.3)
    tg = jnp.asarray(np.random.default_rng(2).integers(0, v, (b, t)), jnp.int32)
    m = jnp.asarray(np.random.default_rng(3).random((b, t)) > 0.3, jnp.float32)
    fused = lambda h, w: losses.next_token_loss_from_hidden(h, w, tg, m, chunk=0, tied=tied)[0]
    naive = lambda h, w: losses.naive_next_token_loss(h, w, tg, m, tied=tied)[0]
    (lf, gf), (ln, gn) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
                          for f in (fused, naive))
    np.testing.assert_allclose(lf, ln, rtol=1e-6)
    for a, b_ in zip(gf, gn):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    # loss_chunk < 0 selects the unfused reference itself (benchmarks/plan.py's baseline)
    ref = jax.jit(lambda h, w: losses.next_token_loss_from_hidden(h, w, tg, m, chunk=-1,
                                                                  tied=tied)[0])
    assert "while" not in ref.lower(h, w).as_text() and float(ref(h, w)) == float(ln)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_tables_equal_rotate_half_formula(dtype):
    """RoPE from the per-step cos/sin tables (halves swapped by a reverse) equals
    transformers' x * cos + rotate_half(x) * sin computed per call, values and grads."""
    x = _normal((2, 5, 3, 8), 0).astype(dtype)
    pos = jnp.asarray(np.random.default_rng(1).integers(0, 1000, (2, 5)), jnp.int32)
    inv = L.rope_inv_freq(8, 10000.0)

    def ref(x):
        emb = pos.astype(jnp.float32)[..., None] * inv
        emb = jnp.concatenate([emb, emb], axis=-1)[:, :, None, :]
        x32 = x.astype(jnp.float32)
        return (x32 * jnp.cos(emb) + L.rotate_half(x32) * jnp.sin(emb)).astype(x.dtype)
    cos, sin = L.rope_tables(pos, inv)
    assert cos.shape == sin.shape == (2, 5, 1, 8)
    w = _normal(x.shape, 2)
    f = lambda fn: jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(fn(x).astype(jnp.float32) * w)))(x)
    (v_ref, g_ref), (v, g) = f(ref), f(lambda x: L.rope_rotate(x, cos, sin))
    np.testing.assert_array_equal(L.apply_rope(x, pos, inv), L.rope_rotate(x, cos, sin))
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    np.testing.assert_allclose(np.float32(g), np.float32(g_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_value_and_grads_equal_autodiff(dtype):
    x = _normal((3, 4, 16), 0, dtype, scale=3.0)
    scale = _normal((16,), 1) + 1.0
    w = _normal((3, 4, 16), 2)

    def ref(x, s):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (s.astype(dtype) * y.astype(dtype)).astype(dtype)
    f = lambda fn: jax.jit(jax.value_and_grad(
        lambda x, s: jnp.sum(fn(x, s).astype(jnp.float32) * w), argnums=(0, 1)))(x, scale)
    (v_ref, g_ref), (v, g) = f(ref), f(lambda x, s: L.rms_norm(x, s, 1e-6, dtype))
    np.testing.assert_array_equal(L.rms_norm(x, scale, 1e-6, dtype), ref(x, scale))
    if dtype == jnp.float32:
        np.testing.assert_allclose(v, v_ref, rtol=1e-6)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        return
    # bf16: the one-pass backward runs in fp32, at least as close to the fp32 truth
    x32 = x.astype(jnp.float32)
    _, g_true = jax.jit(jax.value_and_grad(
        lambda x, s: jnp.sum(L.rms_norm(x, s, 1e-6, jnp.float32) * w), argnums=(0, 1)))(
            x32, scale)
    for a, auto, t in zip(g, g_ref, g_true):
        assert a.dtype == auto.dtype
        err = np.abs(np.float32(a) - np.float32(t)).max()
        assert err <= np.abs(np.float32(auto) - np.float32(t)).max() + 1e-6


def _entry_ops(hlo: str):
    """(name, output dims, ops of its fused computation) of each entry instruction."""
    entry = hlo[hlo.rindex("ENTRY"):]
    out = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\S+)\(", line)
        if not m or m.group(3) in ("parameter", "bitcast", "constant"):
            continue
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        ops = [m.group(3)]
        calls = re.search(r"calls=%([\w.\-]+)", line)
        if calls:
            body = hlo[hlo.index("%" + calls.group(1) + " "):]
            ops = re.findall(r"= \S+ (\w[\w\-]*)\(", body[:body.index("\n}")])
        out.append((m.group(1), dims, ops))
    return out


def test_swiglu_and_attention_elementwise_passes_on_cpu():
    """XLA CPU program structure the step's speed relies on: the SwiGLU gate costs one
    elementwise pass over [tokens, mlp] forward and two backward (nothing shared written
    for the backward), and the attention's mask and softmax statistics ride on the score
    matmul's fusion (no separate pass over the [B, N, T, S] scores in the forward)."""
    x, wg, wu, wd = _normal((64, 32), 0), _normal((32, 96), 1), _normal((32, 96), 2), \
        _normal((96, 32), 3)
    loss = lambda x, wg, wu, wd: jnp.sum(jnp.square(L.silu_mul(x @ wg, x @ wu) @ wd))
    ops = _entry_ops(jax.jit(jax.grad(loss)).lower(x, wg, wu, wd).compile().as_text())
    wide = [o for _, d, o in ops if d == (64, 96) and "dot" not in o]
    assert len(wide) == 3, wide

    b, t, n, h = 2, 24, 4, 8
    q, k, v = (_normal((b, t, n, h), s) for s in range(3))
    mask = L.attention_mask(jnp.ones((b, t), jnp.int32), causal=True, q_len=t)
    fwd = jax.jit(lambda q, k, v: L.einsum_attention(q, k, v, mask))
    ops = _entry_ops(fwd.lower(q, k, v).compile().as_text())
    scores = [(nm, o) for nm, d, o in ops if int(np.prod(d)) == b * n * t * t]
    assert scores and all("dot" in o for _, o in scores), scores


def test_dots_remat_saves_the_cpu_bf16_matmuls():
    """The "dots" remat policies save the bf16 matmuls' outputs on CPU as they save dot
    outputs elsewhere (the custom VJP hides the dot itself from them), and a plan traced for
    an accelerator sees the plain dots."""
    from vlm_jax.models.vit import remat_policy
    x = _normal((4, 16, 32), 0, jnp.bfloat16)
    w1, w2 = _normal((64, 32), 1, jnp.bfloat16), _normal((32, 64), 2, jnp.bfloat16)

    def block(x, w1, w2):
        return jnp.sum(L._contract(jax.nn.silu(L._contract(x, w1, 1)), w2, 1)
                       .astype(jnp.float32))

    def saved(remat):   # the residuals the vjp keeps, less its inputs (as grid.plan)
        f = jax.checkpoint(block, policy=remat_policy(remat))
        jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(f, *a))(x, w1, w2).jaxpr
        return [v.aval.shape for v in jaxpr.outvars[1:]
                if not isinstance(v, jax.extend.core.Literal) and v not in jaxpr.invars]
    for platform in ("cpu", "gpu"):
        with L.matmul_platform(platform):
            assert L.cpu_bf16_accumulate(jnp.bfloat16) == (platform == "cpu")
            assert saved("full") == []
            # the first matmul's output (the silu's input; the second's feeds a sum)
            assert saved("dots") == [(4, 16, 64)], platform
            assert saved("dots_all") == [(4, 16, 64)], platform
