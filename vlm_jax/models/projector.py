"""Vision -> LLM projectors (connectors).

- `linear`: one Linear (LLaVA-1).
- `mlp{N}x_gelu`: Linear, then (GELU, Linear) N-1 times (LLaVA-1.5: `mlp2x_gelu`).
- `pixel_shuffle`: NaViL's connector: pixel shuffle by `shuffle_ratio` (0.5 merges 2x2
  patches into one token of 4x the width), then LayerNorm -> Linear -> GELU -> Linear.

Params: `linear_0..linear_{N-1}` (kernel [out, in], torch layout, + bias); pixel_shuffle
adds `norm`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models.counts import num_linear, num_output_tokens  # noqa: F401 (re-exported)

Dtype = Any
def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """[B, K, C] tokens on a square grid -> [B, K*r^2, C/r^2] (InternVL/NaViL pixel shuffle:
    ratio 0.5 merges each 2x2 block of neighbouring tokens into one token)."""
    b, k, c = x.shape
    g = math.isqrt(k)
    if g * g != k:
        raise ValueError(f"pixel_shuffle needs a square token grid, got {k} tokens")
    s = round(1 / ratio)
    if abs(1 / ratio - s) > 1e-6 or g % s:
        raise ValueError(f"shuffle_ratio {ratio} must be 1/n with n dividing the grid {g}")
    x = x.reshape(b, g // s, s, g // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (g // s) * (g // s), s * s * c)


class Projector(nn.Module):
    """features [B, K, Dv] -> [B, K', out_dim]."""
    cfg: Any
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n = num_linear(self.cfg.type)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        if self.cfg.type == "pixel_shuffle":
            x = pixel_shuffle(x, self.cfg.shuffle_ratio)
            x = L.LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = x.astype(self.dtype)
        for i in range(n):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = L.Linear(self.out_dim, (L.EMBED, L.MLP) if i == 0 else (L.MLP, L.EMBED),
                         name=f"linear_{i}", **kw)(x)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))
