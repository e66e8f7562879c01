"""benchmarks/step_profile.py: the HLO FLOP parser and the concurrency-aware attribution."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location(
        "step_profile", os.path.join(_ROOT, "benchmarks", "step_profile.py"))
    mod = importlib.util.module_from_spec(spec)
    # it imports benchmarks/step.py, which sets the benchmark's compile env vars
    # (VLM_JAX_FAST_COMPILE_MAX_FLOPS, VLM_JAX_EXECUTABLE_CACHE): not for this process's
    # other tests
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


def test_dot_flops_from_hlo_equal_xla_cost_analysis():
    sp = _module()
    a = jnp.ones((64, 96), jnp.float32)
    b = jnp.ones((96, 80), jnp.float32)
    c = jnp.ones((4, 80, 32), jnp.float32)

    def f(a, b, c):  # a 2-D dot and a batched one, named, with an elementwise op between
        with jax.named_scope("mlp"):
            h = jnp.tanh(a @ b)
        with jax.named_scope("attn"):
            return jnp.einsum("qk,bkh->bqh", h, c)
    compiled = jax.jit(f).lower(a, b, c).compile()
    kernels = sp.hlo_kernels(compiled.as_text())
    total = sum(gf for _, gf in kernels.values())
    want = (2 * 64 * 96 * 80 + 2 * 4 * 64 * 80 * 32) / 1e9
    np.testing.assert_allclose(total, want, rtol=1e-6)
    parts = {sp.part_of(op) for op, gf in kernels.values() if gf > 0}
    assert parts == {"mlp", "attn_core"}, kernels


def test_attribution_splits_concurrent_kernels():
    sp = _module()
    # a runs 0..10, b runs 5..15 alongside it: 5 alone + 5 shared each; two steps
    events = [("a", 0, 10_000_000), ("b", 5_000_000, 10_000_000)]
    ms = sp.attributed_ms(events, n_steps=2)
    assert ms == {"a": 3.75, "b": 3.75}
    assert sp.part_of("jit(train_step)/vision.features/layers_0/mlp/fc1") == "vit"
    assert sp.part_of("x/llm.decode/layers_1/attn/q/dot_general") == "attn_proj"
    assert sp.part_of("x/llm.decode/layers_1/attn/reduce_max") == "attn_core"
    assert sp.part_of("x/llm.loss/while/body") == "loss"
