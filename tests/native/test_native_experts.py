"""Modality experts: text-only = dense LLM, efficient routing = masked reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vlm_jax.models import experts, layers
from tests.compiled import fast, run_fast
from vlm_jax.models.llm import LLM


def _llm_cfg(experts_on: bool, impl: str = "masked"):
    c = common.llm_config()
    c.update(dict(vocab_size=50, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
                  experts=experts_on, expert_impl=impl, scan_layers=True))
    return c


def _inputs(b=2, t=24, seed=0, frac=0.5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (b, t)).astype(np.int32)
    vm = rng.random((b, t)) < frac
    seg = np.ones((b, t), np.int32)
    seg[1, t - 5:] = 0  # some padding
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return ids, pos, seg, vm


def _init(cfg, ids, pos, seg, vm):
    init = lambda *a: LLM(cfg).init(jax.random.PRNGKey(0), *a[:3], visual_mask=a[3])  # noqa: E731
    return nn.unbox(run_fast(init, ids, pos, seg, vm)["params"])  # one cheap compile


def _apply(cfg, params, ids, pos, seg, vm=None):
    """The LLM's output, compiled (one program instead of op-by-op dispatch)."""
    return run_fast(lambda p, *a: LLM(cfg).apply({"params": p}, *a[:3], visual_mask=a[3]),
                    params, ids, pos, seg, vm)


def _text_part(params):
    """The dense LLM's params: the expert tree without visual_* leaves."""
    if not isinstance(params, dict):
        return params
    return {k: _text_part(v) for k, v in params.items() if not k.startswith("visual_")}


def _perturb_visual(params, seed=1, scale=0.05):
    """Visual weights made distinct from the text ones (noise of a few times the init's
    0.02 std: routing mistakes change outputs by O(1), while the model stays well
    conditioned; std-1 noise made fp32 rounding differ by more than 1e-4 relative). NumPy
    noise: no per-shape random program to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + scale * rng.normal(size=x.shape).astype(x.dtype)
        if "visual_" in jax.tree_util.keystr(p) else x, params)


@pytest.mark.parametrize("impl", ["masked", "chunked:8"])
def test_text_only_ignores_visual_experts_and_equals_dense(impl):
    ids, pos, seg, _ = _inputs()
    none = np.zeros(ids.shape, bool)
    cfg = _llm_cfg(True, impl)
    params = _init(cfg, ids, pos, seg, none)
    f = fast(lambda p, vm: LLM(cfg).apply({"params": p}, ids, pos, seg, visual_mask=vm),
             params, none)
    out = f(params, none)
    out2 = f(_perturb_visual(params), none)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    dense = _apply(_llm_cfg(False), _text_part(params), ids, pos, seg)
    np.testing.assert_allclose(out, dense, atol=1e-5, rtol=1e-5)
    # With visual tokens the visual weights do matter (the test above can fail).
    _, _, _, vm = _inputs()
    assert not np.allclose(f(params, vm), f(_perturb_visual(params), vm), atol=1e-3)


def test_chunked_equals_masked_forward_and_grads():
    ids, pos, seg, vm = _inputs(t=40, frac=0.5)
    params = _init(_llm_cfg(True), ids, pos, seg, vm)
    params = _perturb_visual(params)  # distinct visual weights

    def loss(p, impl):
        y = LLM(_llm_cfg(True, impl)).apply({"params": p}, ids, pos, seg, visual_mask=vm)
        return jnp.sum(jnp.sin(y)), y

    (lm, ym), gm = run_fast(jax.value_and_grad(lambda p: loss(p, "masked"), has_aux=True), params)
    (lc, yc), gc = run_fast(jax.value_and_grad(lambda p: loss(p, "chunked:16"), has_aux=True),
                            params)
    np.testing.assert_allclose(yc, ym, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lc, lm, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gm)):
        # fp32 sums in another order (routing groups tokens); a routing bug is O(1)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frac,chunk", [(0.0, 7), (1.0, 64), (0.3, 1), (0.3, 7)])
def test_route_chunked_edge_cases(frac, chunk):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 11, 5)), jnp.float32)
    vm = jnp.asarray(rng.random((3, 11)) < frac)
    wt, wv = (jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(2))
    calls = []

    def text_fn(z):
        calls.append(z.shape)
        return z @ wt

    want = jnp.where(vm[..., None], x @ wv, x @ wt)
    got = jax.jit(lambda x, vm: experts.route_chunked(x, vm, text_fn, lambda z: z @ wv,
                                                      chunk=chunk))(x, vm)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The experts run on chunk-sized blocks, never on all tokens at once.
    assert all(s[0] == min(chunk, 33) for s in calls)


def test_routing_plan_buckets_are_pure():
    vm = jnp.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], bool)
    dest, kind, n_chunks = experts.routing_plan(vm, 3)
    dest, kind = np.asarray(dest), np.asarray(kind)
    assert len(set(dest.tolist())) == 10 and dest.max() < n_chunks * 3
    for i, d in enumerate(dest):  # every token lands in a chunk of its own modality
        assert kind[d // 3] == (2 if vm[i] else 1)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="expert_impl"):
        experts.route(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), bool), lambda z: z,
                      lambda z: z, impl="grouped")


def test_visual_experts_start_from_text_weights():
    ids, pos, seg, vm = _inputs()
    params = _init(_llm_cfg(True), ids, pos, seg, vm)
    copied = experts.init_visual_experts(params)
    q = copied["layers"]["attn"]["q"]
    np.testing.assert_array_equal(q["visual_kernel"], q["kernel"])
    # Then a mixed input gives the dense model's outputs (both experts are the same).
    dense = _apply(_llm_cfg(False), _text_part(params), ids, pos, seg)
    out = _apply(_llm_cfg(True), copied, ids, pos, seg, vm)
    np.testing.assert_allclose(out, dense, atol=1e-5)
    # A text-only pretrained tree is completed for the expert model.
    filled = experts.fill_visual_experts(_text_part(params), params)
    assert jax.tree.structure(filled) == jax.tree.structure(params)
    np.testing.assert_array_equal(filled["layers"]["mlp"]["down"]["visual_kernel"],
                                  params["layers"]["mlp"]["down"]["kernel"])


def test_chunked_routing_keeps_no_weight_copy_per_chunk():
    """The backward pass of the chunked routing needs each chunk's input (for dW) and the
    weights (for dx), not a copy of the chosen expert's weights per chunk: before the scan
    body was checkpointed, autodiff kept [n_chunks, out, in] of every routed kernel (for
    NaViL at 4096 tokens a device, 17 copies of each expert matrix per layer: `grid plan`
    on 256 v5p said 131 GiB a device, 35 GiB after)."""
    from jax._src.ad_checkpoint import saved_residuals
    d, f, b, t, chunk = 48, 320, 2, 512, 64
    r = np.random.default_rng(0)
    wt, wv = (jnp.asarray(r.normal(size=(f, d)), jnp.float32) * 0.05 for _ in range(2))
    x = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
    vm = jnp.asarray(np.arange(t)[None].repeat(b, 0) < 200)
    cot = jnp.asarray(r.normal(size=(b, t, f)), jnp.float32)

    def loss(w, x):    # linear in the output: what is kept is the routing's alone
        y = experts.route_chunked(x, vm, lambda h: h @ w[0].T, lambda h: h @ w[1].T, chunk)
        return jnp.sum(y * cot)
    kept = [a for a, why in saved_residuals(loss, (wt, wv), x)
            if "argument" not in why and "constant" not in why]
    n_chunks = -(-b * t // chunk) + 1
    assert not [a for a in kept if tuple(a.shape[-2:]) in ((d, f), (f, d))], kept
    # the inputs, in chunks (and the scatter's buffer): activations, not weights
    assert sum(a.size for a in kept if a.dtype == jnp.float32) <= 2 * n_chunks * chunk * d

    def ref(w, x):     # the gradients are the masked reference's
        y = layers.route_experts(x, vm, lambda h: h @ w[0].T, lambda h: h @ w[1].T, "masked")
        return jnp.sum(y * cot)
    for g, g_ref in zip(jax.grad(loss)((wt, wv), x), jax.grad(ref)((wt, wv), x)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
