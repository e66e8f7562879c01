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


def shard_mapped() -> bool:
    """splash attention under a multi-device mesh runs each device's shard (shard_map)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from vlm_jax.models import layers as L
    c = demo.get_config("run")
    c.mesh.shape = (2, 2, 2)
    mesh = sharding.make_mesh(c.mesh, jax.devices())
    q = jnp.ones((8, 70, 4, 8))
    k = jnp.ones((8, 70, 2, 8))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_rules(mesh)):
        jaxpr = jax.make_jaxpr(lambda a, b: L.dot_product_attention(
            a, b, b, L.AttentionMask(causal=True), implementation="splash"))(q, k)
    return "shard_map" in str(jaxpr)


def main() -> None:
    result = {"shard_mapped": shard_mapped()}
    for kv in (2, 1):
        ref = losses((1, 1, 1), "", kv)
        got = losses((2, 2, 2), "splash", kv)
        result[f"kv{kv}"] = dict(default_1dev=ref, splash_222=got)
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
