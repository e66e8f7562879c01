"""Attention kernels (`vlm_jax.models.attention`): which one "" picks on each backend, and
Pallas splash attention (the TPU path, here in Pallas' interpret mode) against the einsum
attention: values and gradients for causal / bidirectional, packed segments, padding,
grouped-query heads and lengths that are not a multiple of the kernel block; the models
with `attention_impl="splash"` against the default."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import attention as A
from vlm_jax.models import layers as L
from tests.compiled import subprocess_env
from tests.models.test_models_vlm import init, make_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backend,dtype,head_dim,cap,want", [
    ("cpu", jnp.bfloat16, 64, None, "einsum"),
    ("tpu", jnp.float32, 64, None, "splash"),
    ("gpu", jnp.bfloat16, 128, 8.0, "cudnn"),
    ("gpu", jnp.float16, 64, 9.0, "cudnn"),
    ("gpu", jnp.float32, 64, 9.0, "xla"),       # cuDNN flash: bf16/fp16 only
    ("gpu", jnp.bfloat16, 192, 8.0, "xla"),     # head dim > 128 before Hopper
    ("gpu", jnp.bfloat16, 192, 9.0, "cudnn"),
    ("gpu", jnp.bfloat16, 60, 9.0, "xla"),      # not a multiple of 8
    ("gpu", jnp.bfloat16, 64, None, "xla"),     # no CUDA device (e.g. ROCm)
])
def test_default_impl_by_backend(backend, dtype, head_dim, cap, want):
    assert A.resolve("", dtype, head_dim, backend=backend, capability=cap) == want
    assert A.resolve("einsum", dtype, head_dim, backend=backend, capability=cap) == "einsum"


def test_dense_mask_only_where_read():
    assert A.needs_dense_mask("einsum", jnp.float32, 64)
    assert A.needs_dense_mask("xla", jnp.float32, 64)
    assert not A.needs_dense_mask("splash", jnp.float32, 64)
    assert not A.needs_dense_mask("cudnn", jnp.bfloat16, 64)   # its bias branch builds it
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        A.resolve("flash", jnp.float32, 64)


@pytest.mark.parametrize("rows,want", [
    ([[1, 1, 1, 1], [1, 1, 0, 0]], True),       # one sample + right padding: cuDNN lengths
    ([[3, 3, 3, 0], [3, 3, 3, 3]], True),       # any one id
    ([[1, 1, 2, 2], [1, 1, 1, 0]], False),      # packed samples: the bias path
    ([[0, 1, 1, 1], [1, 1, 1, 1]], False),      # left padding
    ([[1, 0, 1, 0], [1, 1, 1, 1]], False),      # holes
])
def test_cudnn_padding_only_batches(rows, want):
    """Which batches cuDNN runs with sequence lengths (no mask tensor) vs a bias."""
    seg = jnp.asarray(rows, jnp.int32)
    ok, n = jax.jit(A.right_padded)(seg)
    assert bool(ok) == want
    np.testing.assert_array_equal(n, (np.asarray(rows) > 0).sum(1))


def _inputs(b, t, n, kv, h, seed=0):
    r = np.random.default_rng(seed)
    q, w = (jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
    return q, k, v, w


def _value_and_grads(impl, q, k, v, w, segments, causal):
    def f(q, k, v):
        mask = L.self_attention_mask(segments, causal, q.shape[1], impl, q.dtype, q.shape[-1])
        o = L.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(o * w), o
    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


@pytest.mark.parametrize("t,causal,segmented,kv", [
    (128, True, False, 2),    # one block, no padding, grouped-query heads
    (70, True, True, 1),      # padded to 128; packed segments + padding tail; MQA
    (200, False, True, 4),    # bidirectional within segments (the native ViT's), padded
    (96, False, False, 2),    # full attention (the CLIP ViT's)
])
def test_splash_equals_einsum(t, causal, segmented, kv):
    q, k, v, w = _inputs(2, t, 4, kv, 16)
    seg = None
    if segmented:
        s = np.ones((2, t), np.int32)
        s[0, t // 3:] = 2         # two packed samples in row 0
        s[1, -5:] = 0             # padding at the end of row 1
        seg = jnp.asarray(s)
    o_ref, g_ref = _value_and_grads("einsum", q, k, v, w, seg, causal)
    o, g = _value_and_grads("splash", q, k, v, w, seg, causal)
    assert o.shape == q.shape
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=2e-5)
    for a, b_ in zip(g, g_ref):
        assert a.shape == b_.shape
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=5e-5)


def test_llm_with_splash_equals_default():
    """A VLM (CLIP ViT + Llama LLM, scanned layers, the last layer on the loss positions:
    a query subset, which falls back to the dense path) with `attention_impl="splash"`:
    the same loss and gradients as the default (einsum on CPU), padding in one row."""
    c = tiny_config("vlm", scan=True)
    batch = make_batch(c, b=2)
    batch["segment_ids"][1, -3:] = 0
    batch["loss_mask"][1, -3:] = 0
    m, params = init(c, batch)
    c.model.attention_impl = "splash"
    from vlm_jax import models
    ms = models.build_model(c.model)

    def grads(model):
        return jax.jit(jax.value_and_grad(
            lambda p: model.apply({"params": p}, batch)["loss_sum"]))(params)
    (a, ga), (b, gb) = grads(m), grads(ms)
    assert float(a) > 0
    np.testing.assert_allclose(b, a, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6), ga, gb)
    hlo = jax.jit(lambda p: ms.apply({"params": p}, batch)["loss_sum"]).lower(params).as_text()
    assert "splash" in hlo or "pallas" in hlo.lower()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_splash_training_on_a_mesh_equals_one_device():
    """Splash attention on 8 virtual devices, mesh (data, fsdp, tensor) = (2, 2, 2): the
    kernel runs per device under shard_map (batch over data x fsdp, heads over tensor;
    with 1 kv head, fewer than the tensor shards, k/v are repeated per query head), its
    values and gradients equal the einsum attention's on one device, and demo VLM train
    steps with `attention_impl="splash"` (1 kv head) have the default's losses."""
    env = subprocess_env(ROOT, devices=8)
    p = subprocess.run([sys.executable, "-m", "tests.models.splash_worker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1100)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    # no activation XLA can only reshard by replicating it (the token-embedding lookup in
    # the fsdp-sharded table did: `layers.embed_lookup`)
    assert "Involuntary full rematerialization" not in p.stderr, p.stderr[-3000:]
    for kv, r in result["kernel"].items():
        assert r["shard_mapped"] and r["max_diff"] < 1e-4, (kv, r)
    r = result["train"]
    assert len(r["splash_222"]) == 3 and r["default_1dev"][-1] < r["default_1dev"][0]
    np.testing.assert_allclose(r["splash_222"], r["default_1dev"], rtol=2e-5)


def test_einsum_remat_equals_einsum():
    """`einsum_remat` (the probabilities recomputed in the backward pass, as a flash
    kernel does): the same values and gradients, and no [T, T] buffer saved between the
    forward and the backward pass."""
    q, k, v, w = _inputs(2, 80, 4, 2, 16)
    seg = jnp.asarray(np.r_[[1] * 50 + [2] * 30, [1] * 75 + [0] * 5].reshape(2, 80))
    o_ref, g_ref = _value_and_grads("einsum", q, k, v, w, seg, True)
    o, g = _value_and_grads("einsum_remat", q, k, v, w, seg, True)
    np.testing.assert_allclose(o, o_ref, rtol=1e-6, atol=1e-6)
    for a, b_ in zip(g, g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)

    def saved(impl):
        mask = L.self_attention_mask(seg, True, 80, impl, q.dtype, 16)
        f = lambda q, k, v: L.dot_product_attention(q, k, v, mask, impl)  # noqa: E731
        vjp = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], q, k, v)   # its residuals
        return [x.shape for x in jax.tree.leaves(vjp)]
    # per-head [T, S] buffers (the mask, [B, 1, T, S], is an input either way)
    def square(shapes):
        return [s for s in shapes if len(s) >= 4 and s[-1] == 80 and s[1] > 1]
    assert square(saved("einsum"))            # the probabilities
    assert not square(saved("einsum_remat")), saved("einsum_remat")


def test_cudnn_refused_runs_xla_attention(caplog):
    """`attention_impl="cudnn"` where jax refuses cuDNN (here: no GPU) runs XLA's attention
    with a warning naming the reason: the same values and gradients as the default."""
    q, k, v, w = _inputs(2, 40, 4, 2, 16)
    s = np.ones((2, 40), np.int32)
    s[1, -6:] = 0
    for seg in (None, jnp.asarray(s)):
        o_ref, g_ref = _value_and_grads("einsum", q, k, v, w, seg, True)
        with caplog.at_level("WARNING"):
            o, g = _value_and_grads("cudnn", q, k, v, w, seg, True)
        np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=2e-5)
        for a, b_ in zip(g, g_ref):
            np.testing.assert_allclose(a, b_, rtol=1e-4, atol=5e-5)
    assert "cuDNN refused" in caplog.text and "using XLA's attention" in caplog.text


def test_cudnn_branches_mask_like_einsum(monkeypatch):
    """The cuDNN path picks lengths (right padding) or a bias built from the segment ids
    (packed) per batch with `lax.cond`: both branches give the einsum attention's values
    and gradients on the real rows. jax refuses cuDNN off GPU, so its call is stood in for
    by a custom VJP with cuDNN's interface (sequence lengths or a bias) computing XLA's
    attention: this checks our branches, not cuDNN (`benchmarks/gpu_step.py --check`
    compares the real kernel with fp32 einsum on a GPU)."""
    real = jax.nn.dot_product_attention

    def attend(q, k, v, aux, kind, causal):
        t = q.shape[1]
        if kind == "lengths":    # cuDNN's padding mask: no tensor kept, only the lengths
            seg = (jnp.arange(t)[None] < aux[:, None]).astype(jnp.int32)
            aux = jnp.where(A._segment_mask(seg), 0.0, -1e9).astype(q.dtype)
        return real(q, k, v, bias=aux, is_causal=causal, implementation="xla")

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def flash(q, k, v, aux, kind, causal):
        return attend(q, k, v, aux, kind, causal)

    def fwd(q, k, v, aux, kind, causal):
        out = attend(q, k, v, aux, kind, causal)
        return out, (q, k, v, aux, out)     # what jax's cuDNN VJP keeps

    def bwd(kind, causal, res, g):
        q, k, v, aux, _ = res
        grads = jax.vjp(lambda q, k, v: attend(q, k, v, aux, kind, causal), q, k, v)[1](g)
        zero = np.zeros(aux.shape, jax.dtypes.float0) if kind == "lengths" else \
            jnp.zeros_like(aux)
        return (*grads, zero)
    flash.defvjp(fwd, bwd)

    def stand_in(q, k, v, mask=None, is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, implementation=None):
        assert implementation == "cudnn"
        if query_seq_lengths is not None:
            return flash(q, k, v, query_seq_lengths, "lengths", is_causal)
        return flash(q, k, v, jnp.where(mask, 0.0, -1e9).astype(q.dtype), "bias", is_causal)
    monkeypatch.setattr(A.jax.nn, "dot_product_attention", stand_in)
    q, k, v, w = _inputs(2, 64, 4, 2, 16)
    padded = np.ones((2, 64), np.int32)
    padded[1, 50:] = 0
    packed = padded.copy()
    packed[0, 30:] = 2
    for s in (padded, packed):
        seg = jnp.asarray(s)
        valid = (s > 0)[:, :, None, None]

        def f(q, k, v, impl):
            o = A._cudnn_attention(q, k, v, True, seg) if impl == "cudnn" else \
                L.dot_product_attention(q, k, v, L.self_attention_mask(
                    seg, True, 64, "einsum", q.dtype, 16), implementation="einsum")
            o = jnp.where(valid, o, 0.0)
            return jnp.sum(o * w), o
        (_, o), g = jax.jit(jax.value_and_grad(lambda *x: f(*x, "cudnn"), argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
        (_, o_ref), g_ref = jax.jit(jax.value_and_grad(lambda *x: f(*x, "einsum"),
                                                       argnums=(0, 1, 2), has_aux=True))(q, k, v)
        np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=2e-5)
        for a, b_ in zip(g, g_ref):
            np.testing.assert_allclose(a, b_, rtol=1e-4, atol=5e-5)
