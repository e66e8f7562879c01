"""CLIP vision transformer (OpenAI CLIP and OpenCLIP flavours).

Pre-LN ViT: patch embedding (no bias) + class token + learned position embeddings
(bicubically interpolated, exactly like transformers' `interpolate_pos_encoding`, when the
input resolution differs from `cfg.image_size`), `ln_pre`, `depth` residual blocks
(LayerNorm -> MHA -> LayerNorm -> GELU MLP), `ln_post` (used only by `pooled`).

`__call__` returns every hidden state [L+1, B, tokens, D] (index 0 = embeddings after
`ln_pre`, the same tensors as transformers' `output_hidden_states`); `features` runs only
the layers the configured `feature_layer` needs and selects patch / CLS+patch tokens.

With `cfg.scan_layers` the blocks run under `nn.scan` (params stacked on a leading
`layers` axis) with the remat policy `cfg.remat`; otherwise they are `layers_0..`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers as L
from vlm_jax.models.counts import num_feature_tokens, num_patches  # noqa: F401 (re-exported)

Dtype = Any


# --------------------------------------------------------------------------- pixels
# CLIP's per-channel RGB mean/std (vlm_jax.data.transforms.CLIP_MEAN/STD, the same values).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(pixels):
    """Integer RGB pixels (uint8 0..255, what the data pipeline ships) -> float32
    (x/255 - mean) / std on device; float pixels are taken as already normalised."""
    if not jnp.issubdtype(pixels.dtype, jnp.integer):
        return pixels
    scale = np.asarray(PIXEL_STD, np.float32) * 255.0
    return (pixels.astype(jnp.float32) - np.asarray(PIXEL_MEAN, np.float32) * 255.0) / scale


# --------------------------------------------------------------------------- helpers
def remat_policy(name: str):
    """Maps the config's `remat` string to a `jax.checkpoint` policy (None = no remat)."""
    if name in ("none", "", None):
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    # the dots policies also save the named outputs of the CPU's bf16 matmuls, whose dots
    # a custom VJP hides from them (`layers.BF16_MATMUL`)
    named = jax.checkpoint_policies.save_only_these_names(L.BF16_MATMUL)
    if name == "dots":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, named)
    if name == "dots_all":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots, named)
    raise ValueError(f"unknown remat policy {name!r}; use none, full or dots")


def with_remat(block, remat: str, scanned: bool):
    """`block` under the remat policy named `remat` (returned as is for "none"): a flax
    module class through `nn.remat`, a function of arrays through `jax.checkpoint`.
    `scanned`: it runs as a scan body, where loop boundaries already keep XLA from
    merging the recomputation with the forward pass (no CSE barriers needed)."""
    policy = remat_policy(remat)
    if policy is None:
        return block
    if isinstance(block, type) and issubclass(block, nn.Module):
        return nn.remat(block, policy=policy, prevent_cse=not scanned)
    return jax.checkpoint(block, policy=policy, prevent_cse=not scanned)


def stack_blocks(block_cls, *, depth: int, scan: bool, remat: str, num_broadcast: int,
                 emit: bool):
    """Returns (module class, is_scanned) for a stack of `depth` blocks.

    Blocks have the signature `block(x, *broadcast) -> (x, y)`. Under scan, `y` are the
    per-layer outputs stacked on axis 0 (only when `emit`).
    """
    cls = with_remat(block_cls, remat, scanned=scan)
    if not scan:
        return cls
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * num_broadcast, length=depth,
                   metadata_params={nn.PARTITION_NAME: L.LAYERS})


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's bicubic convolution coefficients for the 4 taps around fraction t."""
    def c1(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def c2(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.stack([c2(t + 1), c1(t), c1(1 - t), c2(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False) along one axis (float64; no antialiasing, clamped borders)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(src)
    w = _cubic_weights(src - i0)
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(i0.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m


def interpolate_pos_embed(pos: jax.Array, grid_in: int, grid_out: tuple[int, int],
                          class_token: bool) -> jax.Array:
    """Resizes learned position embeddings [1?+g*g, D] to a (h, w) patch grid."""
    if class_token:
        cls, patch = pos[:1], pos[1:]
    else:
        cls, patch = None, pos
    d = pos.shape[-1]
    if (grid_in, grid_in) == tuple(grid_out):
        return pos
    patch = patch.reshape(grid_in, grid_in, d).astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(grid_in, grid_out[0]), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(grid_in, grid_out[1]), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("hi,ijd->hjd", mh, patch, precision=hp)
    out = jnp.einsum("wj,hjd->hwd", mw, out, precision=hp)
    out = out.reshape(grid_out[0] * grid_out[1], d).astype(pos.dtype)
    return out if cls is None else jnp.concatenate([cls, out], axis=0)


# --------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Multi-head self-attention with biases (CLIP). q/k/v kernels [heads, kv, embed], o
    [embed, heads, kv] (torch layout, `layers.Linear`)."""
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        d = x.shape[-1]
        hd = d // self.heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        q = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="q", **kw)(x)
        k = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="k", **kw)(x)
        v = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="v", **kw)(x)
        q = L.constrain(q, (L.BATCH, L.LENGTH, L.HEADS, L.KV))
        o = L.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        return L.Linear(d, (L.HEADS, L.KV, L.EMBED), in_axes=2, name="o", **kw)(o)


class ViTBlock(nn.Module):
    """Pre-LN residual block. Returns (x, x) so a scan can emit every hidden state."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.LayerNorm(eps=c.norm_eps, name="ln1", **kw)(x)
        x = x + Attention(c.heads, attention_impl=self.attention_impl, name="attn", **kw)(h, mask)
        h = L.LayerNorm(eps=c.norm_eps, name="ln2", **kw)(x)
        x = x + L.GeluMLP(c.mlp_dim, act=c.act, name="mlp", **kw)(h)
        x = L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))
        return x, x


class ViT(nn.Module):
    """CLIP ViT over normalised NHWC pixels. See the module docstring."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        c = self.cfg
        if c.get("variant", "clip") != "clip":
            raise ValueError(f"vit.ViT implements variant 'clip', got {c.variant!r} "
                             "(the native ViT lives in vlm_jax.models.native)")
        if c.image_size % c.patch_size:
            raise ValueError(f"vision.image_size {c.image_size} is not a multiple of "
                             f"patch_size {c.patch_size}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p = c.width, c.patch_size
        self.patch_embed = L.Linear(d, (None, None, None, L.EMBED), in_axes=3, name="patch_embed",
                                    **kw)
        if c.class_token:
            self.class_embed = self.param("class_embed", L.with_axes(L.normal_init(d ** -0.5),
                                                                     (L.EMBED,)),
                                          (d,), self.param_dtype)
        g = c.image_size // p
        self.pos_embed = self.param("pos_embed", L.with_axes(L.normal_init(d ** -0.5),
                                                             (None, L.EMBED)),
                                    (g * g + int(c.class_token), d), self.param_dtype)
        if c.pre_norm:
            self.ln_pre = L.LayerNorm(eps=c.norm_eps, name="ln_pre", **kw)
        self.ln_post = L.LayerNorm(eps=c.norm_eps, name="ln_post", **kw)
        blk = dict(cfg=c, attention_impl=self.attention_impl, **kw)
        if c.scan_layers:
            cls = stack_blocks(ViTBlock, depth=c.depth, scan=True, remat=c.remat,
                               num_broadcast=1, emit=True)
            self.layers = cls(name="layers", **blk)
        else:
            cls = stack_blocks(ViTBlock, depth=c.depth, scan=False, remat=c.remat,
                               num_broadcast=1, emit=True)
            self.blocks = [cls(name=f"layers_{i}", **blk) for i in range(c.depth)]

    # -- pieces
    def embed(self, pixels):
        """pixels [B, H, W, 3] (uint8, or float normalised) -> [B, tokens, D] (patches +
        CLS + positions, after ln_pre)."""
        c = self.cfg
        b, h, w, ch = pixels.shape
        p = c.patch_size
        if h % p or w % p or ch != 3:
            raise ValueError(f"pixels of shape {pixels.shape}: need [B, H, W, 3] with H, W "
                             f"multiples of patch_size {p}")
        gh, gw = h // p, w // p
        x = normalize_pixels(pixels).astype(self.dtype)
        # Patches as [B, gh, gw, 3, p, p]: the kernel [D, 3, p, p] is torch's conv weight.
        x = x.reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 5, 2, 4)
        x = self.patch_embed(x).reshape(b, gh * gw, c.width)
        if c.class_token:
            cls = jnp.broadcast_to(self.class_embed.astype(self.dtype), (b, 1, c.width))
            x = jnp.concatenate([cls, x], axis=1)
        pos = interpolate_pos_embed(self.pos_embed, c.image_size // p, (gh, gw), c.class_token)
        x = x + pos.astype(self.dtype)[None]
        if c.pre_norm:
            x = self.ln_pre(x)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))

    def _run(self, x, num_layers: int):
        """Runs the first `num_layers` blocks; returns the hidden states [k+1, B, T, D]."""
        c = self.cfg
        if not 0 <= num_layers <= c.depth:
            raise ValueError(f"num_layers {num_layers} not in [0, {c.depth}]")
        if not c.scan_layers:
            hs = [x]
            # At init every block runs, so the param tree does not depend on feature_layer.
            n = c.depth if self.is_initializing() else num_layers
            for blk in self.blocks[:n]:
                x, _ = blk(x, None)
                hs.append(x)
            return jnp.stack(hs[:num_layers + 1])
        if num_layers == c.depth or self.is_initializing():
            _, ys = self.layers(x, None)
            ys = ys[:num_layers]
        elif num_layers == 0:
            ys = x[None][:0]
        else:
            ys = _partial_scan(self, x, num_layers)
        return jnp.concatenate([x[None], ys], axis=0)

    def __call__(self, pixels, num_layers: int | None = None):
        """pixels [B, H, W, 3] -> hidden states [num_layers+1, B, tokens, D]."""
        k = self.cfg.depth if num_layers is None else num_layers
        hs = self._run(self.embed(pixels), k)
        if self.is_initializing():
            self.ln_post(hs[-1, :, 0])  # creates ln_post's params (used by `pooled`)
        return hs

    def feature_index(self) -> int:
        """The index into the hidden states [0, L] that `feature_layer` selects."""
        n = self.cfg.depth + 1
        i = self.cfg.feature_layer
        if not -n <= i < n:
            raise ValueError(f"vision.feature_layer {i} out of range for depth {self.cfg.depth}")
        return i % n

    def features(self, pixels):
        """pixels -> the projector's input features [B, K, D] (runs only needed layers)."""
        idx = self.feature_index()
        x = self._run(self.embed(pixels), idx)[idx]
        if self.is_initializing():
            self.ln_post(x[:, 0])  # same param tree as `__call__` (checkpoints carry ln_post)
        sel = self.cfg.feature_select
        if sel == "patch":
            return x[:, 1:] if self.cfg.class_token else x
        if sel == "cls_patch":
            return x
        raise ValueError(f"vision.feature_select must be 'patch' or 'cls_patch', got {sel!r}")

    def pooled(self, pixels):
        """CLS token of the last layer after ln_post (transformers' pooler_output)."""
        x = self._run(self.embed(pixels), self.cfg.depth)[-1]
        return self.ln_post(x[:, 0])


def _partial_scan(vit: ViT, x, k: int):
    """Runs the first k of the stacked (scanned) blocks with `jax.lax.scan` over the params
    sliced along the layers axis; returns their outputs [k, B, T, D]."""
    c = vit.cfg
    stacked = nn.meta.unbox(vit.variables["params"]["layers"])
    stacked = jax.tree.map(lambda a: a[:k], stacked)
    block = ViTBlock(cfg=c, dtype=vit.dtype, param_dtype=vit.param_dtype,
                     attention_impl=vit.attention_impl, parent=None)

    def body(h, p):
        h, _ = block.apply({"params": p}, h, None)
        return h, h
    _, ys = jax.lax.scan(with_remat(body, c.remat, scanned=True), x, stacked)
    return ys


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """"/"-joined param path -> shape, without tracing (checked against `jax.eval_shape`)."""
    from vlm_jax.models.llm import with_layers
    d, h, m, p = cfg.width, cfg.heads, cfg.mlp_dim, cfg.patch_size
    hd = d // h
    top = {"patch_embed/kernel": (d, 3, p, p),
           "pos_embed": (num_patches(cfg) + int(cfg.class_token), d),
           "ln_post/scale": (d,), "ln_post/bias": (d,)}
    if cfg.class_token:
        top["class_embed"] = (d,)
    if cfg.pre_norm:
        top.update({"ln_pre/scale": (d,), "ln_pre/bias": (d,)})
    layer = {"ln1/scale": (d,), "ln1/bias": (d,), "ln2/scale": (d,), "ln2/bias": (d,),
             "attn/o/kernel": (d, h, hd), "attn/o/bias": (d,),
             "mlp/fc1/kernel": (m, d), "mlp/fc1/bias": (m,), "mlp/fc2/kernel": (d, m),
             "mlp/fc2/bias": (d,)}
    for n in "qkv":
        layer.update({f"attn/{n}/kernel": (h, hd, d), f"attn/{n}/bias": (h, hd)})
    return with_layers(top, layer, cfg.depth, cfg.scan_layers)
