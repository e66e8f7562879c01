"""Contrastive image-text model (CLIP / SigLIP losses) for pretraining vision encoders.

The demo pretrains its tiny ViTs with this before freezing them under a projector, and the
same module trains real ViTs: the vision tower is `vit.ViT` (so the pretrained `vision`
params drop straight into a VLM), the text tower is CLIP's causal pre-LN transformer pooled
at the last non-padding token.

Batch (docs/contracts.md, kind "clip"): `pixels` [B,H,W,3], `tokens` [B,T],
`segment_ids` [B,T] (0 = padding), `valid` [B] (0 = padding example of an eval batch).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models.vit import Attention, ViT


class TextBlock(nn.Module):
    """CLIP text layer: pre-LN residual block over the ViT's biased attention."""
    heads: int
    mlp_dim: int
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.LayerNorm(name="ln_1", **kw)(x)
        x = x + Attention(self.heads, name="attn", **kw)(h, mask)
        h = L.LayerNorm(name="ln_2", **kw)(x)
        return x + L.GeluMLP(self.mlp_dim, act="gelu", name="mlp", **kw)(h)


class TextEncoder(nn.Module):
    """CLIP text tower: token + learned position embeddings, causal pre-LN blocks, final LN,
    pooled at the last non-padding token."""
    vocab_size: int
    width: int
    depth: int
    heads: int
    max_len: int
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, segment_ids):
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"text length {t} exceeds model.clip.text_max_len={self.max_len}")
        emb = self.param("token_embedding", L.with_axes(L.normal_init(0.02), (L.VOCAB, L.EMBED)),
                         (self.vocab_size, self.width), self.param_dtype)
        pos = self.param("position_embedding", L.with_axes(L.normal_init(0.01), (None, L.EMBED)),
                         (self.max_len, self.width), self.param_dtype)
        x = (L.embed_lookup(emb, tokens) + pos[None, :t]).astype(self.dtype)
        x = L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))
        mask = L.self_attention_mask(segment_ids, True, t, None, self.dtype,
                                     self.width // self.heads)
        for i in range(self.depth):
            x = TextBlock(self.heads, 4 * self.width, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"layers_{i}")(x, mask)
        x = L.LayerNorm(name="ln_final", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        last = jnp.maximum(jnp.sum(segment_ids > 0, axis=1) - 1, 0)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


def clip_loss(img, txt, scale, valid):
    """Symmetric InfoNCE over the batch; padding examples are neither anchors nor negatives.
    Returns per-example losses [B] and top-1 image->text accuracy per example."""
    logits = scale * img @ txt.T
    neg = jnp.where(valid[None, :] > 0, 0.0, -1e9)
    li = jax.nn.log_softmax(logits + neg, axis=1)
    lt = jax.nn.log_softmax(logits.T + neg, axis=1)
    diag = jnp.arange(img.shape[0])
    per = -0.5 * (li[diag, diag] + lt[diag, diag])
    acc = (jnp.argmax(logits + neg, axis=1) == diag).astype(jnp.float32)
    return per, acc


def siglip_loss(img, txt, scale, bias, valid):
    """SigLIP pairwise sigmoid loss, summed over each example's row (as in the paper)."""
    logits = scale * img @ txt.T + bias
    labels = 2.0 * jnp.eye(img.shape[0]) - 1.0
    pair = -jax.nn.log_sigmoid(labels * logits) * valid[None, :]
    acc = (jnp.argmax(jnp.where(valid[None, :] > 0, logits, -1e9), axis=1)
           == jnp.arange(img.shape[0])).astype(jnp.float32)
    return jnp.sum(pair, axis=1), acc


class CLIPModel(nn.Module):
    """Model kind "clip". Params: {"vision": ViT, "text": TextEncoder, "head": projections
    and the logit scale (and bias for SigLIP)}."""
    cfg: object  # config.model

    @nn.nowrap
    def init_rules(self) -> tuple:
        """`vlm_jax.models.fast_init` rules beyond its defaults (normal(0.02), ones for
        scales, zeros for biases): the ViT's class / position embeddings are
        normal(width^-1/2), the text positions normal(0.01), the logit scale / bias
        constants of the loss."""
        siglip = self.cfg.clip.loss == "siglip"
        return (
            (r"(^|/)vision/(class_embed|pos_embed)$", ("normal", lambda shape: shape[-1] ** -0.5)),
            (r"(^|/)text/position_embedding$", ("normal", 0.01)),
            (r"(^|/)head/logit_scale$", ("constant", math.log(10.0) if siglip
                                     else float(self.cfg.clip.init_logit_scale))),
            (r"(^|/)head/logit_bias$", ("constant", -10.0)),
        )

    def setup(self):
        m = self.cfg
        c = m.clip
        dt, pdt = L.dtype_of(m.dtype), L.dtype_of(m.param_dtype)
        self.vision = ViT(cfg=m.vision, dtype=dt, param_dtype=pdt)
        self.text = TextEncoder(vocab_size=m.llm.vocab_size, width=c.text_width,
                                depth=c.text_depth, heads=c.text_heads, max_len=c.text_max_len,
                                dtype=dt, param_dtype=pdt)
        self.head = ContrastiveHead(c.embed_dim, c.loss, c.init_logit_scale, dtype=dt,
                                    param_dtype=pdt)

    def image_embedding(self, pixels):
        """The image's pooled vector: CLIP's `ln_post(CLS)` of the last layer, or the mean
        of the last layer's tokens for encoders without a class token."""
        if self.cfg.vision.class_token:
            return self.vision.pooled(pixels)
        return self.vision.ln_post(jnp.mean(self.vision(pixels)[-1], axis=1))

    def __call__(self, batch, deterministic=True):
        img = self.image_embedding(batch["pixels"])
        txt = self.text(batch["tokens"], batch["segment_ids"])
        valid = batch.get("valid")
        if valid is None:
            valid = jnp.ones((img.shape[0],), jnp.float32)
        valid = valid.astype(jnp.float32)
        per, acc = self.head(img, txt, valid)
        # The contrastive loss is per example: "tokens" here are the valid examples, so
        # loss_sum / num_tokens is the mean over examples and eval sums stay exact.
        return {"loss_sum": jnp.sum(per * valid), "num_tokens": jnp.sum(valid),
                "accuracy": jnp.sum(acc * valid) / jnp.maximum(jnp.sum(valid), 1.0)}


def batch_spec(config, batch_size: int) -> dict:
    """Shapes/dtypes of a kind-"clip" batch (docs/contracts.md)."""
    v = config.model.vision
    t = config.data.seq_len
    if t > config.model.clip.text_max_len:
        raise ValueError(f"data.seq_len={t} exceeds model.clip.text_max_len="
                         f"{config.model.clip.text_max_len}")
    s = jax.ShapeDtypeStruct
    return {"pixels": s((batch_size, v.image_size, v.image_size, 3), jnp.uint8),
            "tokens": s((batch_size, t), jnp.int32),
            "segment_ids": s((batch_size, t), jnp.int32),
            "valid": s((batch_size,), jnp.float32)}


class ContrastiveHead(nn.Module):
    embed_dim: int
    loss: str = "clip"
    init_logit_scale: float = math.log(1 / 0.07)
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, img, txt, valid):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        img = L.Linear(self.embed_dim, (L.EMBED, None), name="vision_proj", **kw)(img)
        txt = L.Linear(self.embed_dim, (L.EMBED, None), name="text_proj", **kw)(txt)
        img = img.astype(jnp.float32)
        txt = txt.astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True).clip(1e-6)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True).clip(1e-6)
        if self.loss == "clip":
            t = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale), ())
            return clip_loss(img, txt, jnp.exp(jnp.minimum(t, math.log(100.0))), valid)
        if self.loss == "siglip":
            t = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), ())
            b = self.param("logit_bias", nn.initializers.constant(-10.0), ())
            return siglip_loss(img, txt, jnp.exp(t), b, valid)
        raise ValueError(f"model.clip.loss={self.loss!r}: use 'clip' or 'siglip'")
