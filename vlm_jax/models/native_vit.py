"""NaViL's native vision encoder: the LLM's layer type, bidirectional, with 2D RoPE.

Each block is pre-norm RMSNorm -> multi-head self-attention (no biases) -> RMSNorm ->
SwiGLU, exactly the decoder layer of the LLM but without the causal mask. Positions are
2D: half of the rotary dimensions of every head rotate with the patch row, the other half
with the patch column, so attention scores depend only on relative (row, column) offsets.

The encoder works on packed patch sequences so that images of any resolution share one
static shape: `patches` [B, P, p*p*3] are flattened 16x16 patches of all images of a row,
`patch_rows`/`patch_cols` [B, P] their grid positions and `patch_segment_ids` [B, P]
which image each patch belongs to (0 = padding). A patch attends only to the patches of
its own image. The patch order inside an image does not matter to the encoder (positions
are explicit); `vlm_jax.data.native` lays patches out in 2x2 blocks so that the pixel
shuffle of the connector is a reshape.

Size: N ~= 12 * depth * width^2 when mlp_dim = 8/3 * width (4 w^2 attention + 3 w mlp_dim
SwiGLU per layer); `vit_params(cfg)` counts exactly.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import (BATCH, EMBED, HEADS, KV, LENGTH, Linear, RMSNorm, SwiGLU,
                                   apply_rope, constrain, dot_product_attention, dtype_of,
                                   rope_inv_freq, self_attention_mask)
from vlm_jax.models.vit import stack_blocks


def _check_head_dim(h: int) -> None:
    if h % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {h}")


def rope_2d(x: jax.Array, rows: jax.Array, cols: jax.Array, theta: float) -> jax.Array:
    """2D rotary embedding. x: [B, P, N, H] with H % 4 == 0; rows/cols: [B, P].

    The first H/2 dimensions of every head rotate with `rows`, the last H/2 with `cols`
    (each half with the 1D transformers convention over H/2 dimensions). The reference of
    `rope_2d_tables` + `rope_2d_rotate`, which the encoder uses.
    """
    h = x.shape[-1]
    _check_head_dim(h)
    inv = rope_inv_freq(h // 2, theta)
    xr, xc = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([apply_rope(xr, rows, inv), apply_rope(xc, cols, inv)], axis=-1)


def rope_2d_tables(rows: jax.Array, cols: jax.Array, head_dim: int, theta: float):
    """(cos, signed sin) fp32 [B, P, 1, H] of `rope_2d` for `rope_2d_rotate`: computed
    once per forward pass and shared by every layer's queries and keys (and their
    backward passes), instead of sin/cos and split/concatenate in each of them. Over the
    four quarters of a head (rows: first half, cols: second half) the sin table carries
    rotate_half's signs: [-sin_r, sin_r, -sin_c, sin_c]."""
    _check_head_dim(head_dim)
    inv = rope_inv_freq(head_dim // 2, theta)
    fr = rows.astype(jnp.float32)[..., None] * inv   # [B, P, H/4]
    fc = cols.astype(jnp.float32)[..., None] * inv
    cr, sr, cc, sc = jnp.cos(fr), jnp.sin(fr), jnp.cos(fc), jnp.sin(fc)
    cos = jnp.concatenate([cr, cr, cc, cc], axis=-1)[:, :, None, :]
    sin = jnp.concatenate([-sr, sr, -sc, sc], axis=-1)[:, :, None, :]
    return cos, sin


def rope_2d_rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, P, N, H] rotated by `rope_2d_tables`: x * cos + swap(x) * sin, where swap
    exchanges the two quarters of each half (rotate_half within the row and the column
    half; a reverse that fuses into the elementwise pass)."""
    h = x.shape[-1]
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(x.shape[:-1] + (2, 2, h // 4)), axis=-2).reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


class NativeAttention(nn.Module):
    """Bidirectional multi-head attention with 2D RoPE and no biases."""
    width: int
    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """x [B, P, width]; cos/sin: `rope_2d_tables` of the patch positions."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear((self.heads, self.head_dim), (EMBED, HEADS, KV), name="q", **kw)(x)
        k = Linear((self.heads, self.head_dim), (EMBED, HEADS, KV), name="k", **kw)(x)
        v = Linear((self.heads, self.head_dim), (EMBED, HEADS, KV), name="v", **kw)(x)
        q = rope_2d_rotate(q, cos, sin)
        k = rope_2d_rotate(k, cos, sin)
        o = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl or None)
        o = constrain(o, (BATCH, LENGTH, HEADS, KV))
        return Linear(self.width, (HEADS, KV, EMBED), in_axes=2, name="o", **kw)(o)


class NativeBlock(nn.Module):
    """One encoder layer: x + attn(norm(x)); x + swiglu(norm(x)). Returns (x, None) (the
    block signature of `vit.stack_blocks`)."""
    cfg: dict
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = c.get("head_dim", 0) or c["width"] // c["heads"]
        h = RMSNorm(c["norm_eps"], name="attn_norm", **kw)(x)
        x = x + NativeAttention(c["width"], c["heads"], head_dim,
                                attention_impl=self.attention_impl, name="attn", **kw)(
                                    h, cos, sin, mask)
        h = RMSNorm(c["norm_eps"], name="mlp_norm", **kw)(x)
        x = x + SwiGLU(c["mlp_dim"], name="mlp", **kw)(h)
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class NativeViT(nn.Module):
    """The native encoder. `cfg` is `config.model.vision` (variant "native").

    __call__(patches [B, P, p*p*3], rows [B, P], cols [B, P], segment_ids [B, P]) ->
    hidden [B, P, width] after the final RMSNorm. Padding patches (segment 0) attend only
    to padding and their outputs are meaningless; callers mask them.
    """
    cfg: dict
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, patches, rows, cols, segment_ids):
        c = self.cfg
        width, depth = int(c["width"]), int(c["depth"])
        head_dim = c.get("head_dim", 0) or width // c["heads"]
        if head_dim * c["heads"] != width and not c.get("head_dim", 0):
            raise ValueError(f"model.vision: width {width} is not divisible by heads "
                             f"{c['heads']}; set head_dim")
        p = int(c["patch_size"])
        if patches.shape[-1] != p * p * 3:
            raise ValueError(f"patches have {patches.shape[-1]} values, expected "
                             f"patch_size^2*3 = {p * p * 3} (model.vision.patch_size={p})")
        x = Linear(width, (None, EMBED), name="patch_embed", dtype=self.dtype,
                   param_dtype=self.param_dtype)(patches)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        # built once per forward pass and shared by every layer
        mask = self_attention_mask(segment_ids, False, x.shape[1], self.attention_impl,
                                   self.dtype, head_dim)
        cos, sin = rope_2d_tables(rows, cols, head_dim, float(c.get("rope_theta", 10000.0)))
        scan = bool(c.get("scan_layers", True))
        cls = stack_blocks(NativeBlock, depth=depth, scan=scan, remat=c.get("remat", "none"),
                           num_broadcast=3, emit=False)
        blk = dict(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype,
                   attention_impl=self.attention_impl)
        if scan:
            x, _ = cls(name="layers", **blk)(x, cos, sin, mask)
        else:
            for i in range(depth):
                x, _ = cls(name=f"layers_{i}", **blk)(x, cos, sin, mask)
        return RMSNorm(c["norm_eps"], name="final_norm", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)


def vit_params(cfg) -> int:
    """Exact parameter count of a NativeViT config (no allocation)."""
    w, d, m = int(cfg["width"]), int(cfg["depth"]), int(cfg["mlp_dim"])
    heads = int(cfg["heads"])
    hd = int(cfg.get("head_dim", 0) or w // heads)
    p = int(cfg["patch_size"])
    per_layer = 4 * w * heads * hd + 3 * w * m + 2 * w
    return p * p * 3 * w + d * per_layer + w


def build_native_vit(cfg, dtype="float32", param_dtype="float32", attention_impl=""):
    """NativeViT from `config.model.vision` and dtype names."""
    return NativeViT(dict(cfg), dtype_of(dtype), dtype_of(param_dtype), attention_impl or None)
