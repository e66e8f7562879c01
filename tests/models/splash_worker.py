"""Runs in a subprocess with 8 virtual CPU devices (XLA_FLAGS set by the test): demo VLM
train steps with `model.attention_impl="splash"` (Pallas splash attention under
shard_map, interpret mode on CPU) on a (2, 2, 2) mesh against the default attention on
one device. Prints one JSON line."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from configs import demo
from vlm_jax.train import sharding, trainer


def losses(shape, impl, kv_heads, n=3):
    c = demo.get_config("run,vit=S,llm=S,n=64,batch=8,feature_cache=0")
    c.model.attention_impl = impl
    c.model.llm.update(heads=4, kv_heads=kv_heads)   # kv_heads 1: fewer than tensor shards
    c.optim.trainable = ("*",)                        # gradients through every attention
    c.mesh.shape = shape
    r = trainer.Run(c, "/nonexistent", devices=jax.devices()[:int(np.prod(shape))])
    tr, fr = r.init_params()
    state = r.init_state(tr)
    r.compile(state, fr, with_eval=False)
    it = r.data.train_iterator(c)
    out = []
    for _ in range(n):
        state, m = r.train_step(state, fr, sharding.global_batch(next(it), r.mesh))
        out.append(float(m["loss"]))
    return out


def kernel_on_mesh() -> dict:
    """splash attention under the (2, 2, 2) mesh (jit, sharded inputs): whether it runs per
    device (shard_map in the program) and its largest difference from the einsum attention
    on one device, values and input gradients, for kv heads that split over tensor (2)
    and that do not (1: repeated per query head)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from vlm_jax.models import layers as L
    c = demo.get_config("run")
    c.mesh.shape = (2, 2, 2)
    mesh = sharding.make_mesh(c.mesh, jax.devices())
    rng = np.random.default_rng(0)
    seg = np.ones((8, 70), np.int32)
    seg[::2, 40:] = 2
    seg[1::2, -9:] = 0
    out = {}
    for kv in (2, 1):
        q, k, v = (jnp.asarray(rng.normal(size=(8, 70, n, 8)), jnp.float32)
                   for n in (4, kv, kv))

        def f(q, k, v, impl):
            mask = L.self_attention_mask(jnp.asarray(seg), True, 70, impl, q.dtype, 8)
            o = L.dot_product_attention(q, k, v, mask, implementation=impl)
            return jnp.sum(jnp.sin(o)), o
        grad = jax.grad(f, argnums=(0, 1, 2), has_aux=True)
        ref_g, ref_o = jax.jit(grad, static_argnums=3)(q, k, v, "einsum")
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_rules(mesh)):
            jaxpr = str(jax.make_jaxpr(grad, static_argnums=3)(q, k, v, "splash"))
            got_g, got_o = jax.jit(grad, static_argnums=3)(q, k, v, "splash")
        out[f"kv{kv}"] = dict(
            shard_mapped="shard_map" in jaxpr,
            max_diff=max(float(jnp.max(jnp.abs(a - b)))
                         for a, b in zip((got_o, *got_g), (ref_o, *ref_g))))
    return out


def main() -> None:
    result = {"kernel": kernel_on_mesh(),
              "train": dict(default_1dev=losses((1, 1, 1), "", 1),
                            splash_222=losses((2, 2, 2), "splash", 1))}
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
