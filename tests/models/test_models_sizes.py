"""Size tables: parameter counts by `jax.eval_shape` (no allocation) vs published sizes."""
import math

import jax
import jax.numpy as jnp
import pytest

from configs.models import llm as llm_sizes
from configs.models import vit as vit_sizes
from vlm_jax.models.llm import LLM
from vlm_jax.models.vit import ViT


def count(module, *args):
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(vit_sizes.PUBLISHED))
def test_vit_param_counts(name):
    c = vit_sizes.get(name)
    n = count(ViT(c), jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32))
    assert abs(n / vit_sizes.PUBLISHED[name] - 1) < 0.02, (name, n)


@pytest.mark.parametrize("name", sorted(llm_sizes.PUBLISHED))
def test_llm_param_counts(name):
    c = llm_sizes.get(name)
    n = count(LLM(c), jax.ShapeDtypeStruct((1, 4), jnp.int32))
    assert n == llm_sizes.PUBLISHED[name], (name, n)


def test_tiny_sizes_build_and_unknown_name():
    for name in ("S", "M", "L"):
        assert count(ViT(vit_sizes.get(name)),
                     jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)) > 0
        assert count(LLM(llm_sizes.get(name)), jax.ShapeDtypeStruct((1, 4), jnp.int32)) > 0
    with pytest.raises(ValueError, match="configs/models/vit.py"):
        vit_sizes.get("B17")


@pytest.mark.parametrize("scan", [True, False])
def test_param_shapes_match_eval_shape(scan):
    import flax.linen as nn
    from vlm_jax.convert.mapping import flatten
    from vlm_jax.models import llm as llm_mod
    from vlm_jax.models import vit as vit_mod
    for c, mod, arg in [
        (llm_sizes.get("S"), llm_mod, jax.ShapeDtypeStruct((1, 4), jnp.int32)),
        (llm_sizes.get("qwen2_0.5b"), llm_mod, jax.ShapeDtypeStruct((1, 4), jnp.int32)),
        (llm_sizes.get("vicuna7b"), llm_mod, jax.ShapeDtypeStruct((1, 4), jnp.int32)),
        (vit_sizes.get("S"), vit_mod, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)),
    ]:
        c.scan_layers, c.depth = scan, 2
        cls = mod.LLM if mod is llm_mod else mod.ViT
        tree = nn.meta.unbox(jax.eval_shape(cls(c).init, jax.random.key(0), arg)["params"])
        assert {k: tuple(v.shape) for k, v in flatten(tree).items()} == mod.param_shapes(c)
