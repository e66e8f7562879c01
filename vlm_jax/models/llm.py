"""Decoder-only LM of the Llama family (Llama/Vicuna, Qwen2, InternLM2).

RMSNorm, SwiGLU, RoPE (theta, linear/dynamic/llama3 scaling), grouped-query attention,
optional q/k/v bias (Qwen2), tied or untied embeddings, causal + padding/segment mask,
optional NaViL modality experts (separate q/k/v/o and FFN weights for visual tokens,
shared norms, routed by `visual_mask`).

Param tree: `embedding` [vocab, embed], `layers` (scanned, leading `layers` axis) or
`layers_0..` with `attn_norm`, `attn/{q,k,v,o}` (kernels [embed, heads, kv] and
[heads, kv, embed]), `mlp_norm`, `mlp/{gate,up,down}`; `final_norm`; `lm_head`
[embed, vocab] unless tied.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models import losses
from vlm_jax.models.vit import stack_blocks

Dtype = Any


def head_dim(cfg) -> int:
    return cfg.head_dim or cfg.width // cfg.heads


def rope_scaling_dict(cfg) -> dict | None:
    """The config's rope scaling as a plain dict (None for the default rope)."""
    rs = cfg.get("rope_scaling")
    if rs is None:
        return None
    rs = rs.to_dict() if hasattr(rs, "to_dict") else dict(rs)
    if (rs.get("rope_type") or rs.get("type") or "default") == "default":
        return None
    return rs


def inv_freq_for(cfg, positions: jax.Array | None) -> jax.Array:
    """RoPE inverse frequencies; "dynamic" scaling uses max(positions) + 1 as seq_len."""
    scaling = rope_scaling_dict(cfg)
    seq_len = None
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "dynamic":
        seq_len = jnp.max(positions) + 1
    return L.rope_inv_freq(head_dim(cfg), cfg.rope_theta, scaling, seq_len)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, inv_freq, mask, visual_mask=None):
        c = self.cfg
        hd = head_dim(c)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, experts=c.experts,
                  expert_impl=c.expert_impl)
        q = L.Linear((c.heads, hd), (L.EMBED, L.HEADS, L.KV), use_bias=c.qkv_bias, name="q",
                     **kw)(x, visual_mask)
        k = L.Linear((c.kv_heads, hd), (L.EMBED, L.KV_HEADS, L.KV), use_bias=c.qkv_bias,
                     name="k", **kw)(x, visual_mask)
        v = L.Linear((c.kv_heads, hd), (L.EMBED, L.KV_HEADS, L.KV), use_bias=c.qkv_bias,
                     name="v", **kw)(x, visual_mask)
        q = L.apply_rope(q, positions, inv_freq)
        k = L.apply_rope(k, positions, inv_freq)
        q = L.constrain(q, (L.BATCH, L.LENGTH, L.HEADS, L.KV))
        k = L.constrain(k, (L.BATCH, L.LENGTH, L.KV_HEADS, L.KV))
        v = L.constrain(v, (L.BATCH, L.LENGTH, L.KV_HEADS, L.KV))
        o = L.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        o = L.constrain(o, (L.BATCH, L.LENGTH, L.HEADS, L.KV))
        return L.Linear(c.width, (L.HEADS, L.KV, L.EMBED), in_axes=2, name="o",
                        **kw)(o, visual_mask)


class DecoderBlock(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); x + swiglu(norm(x)). Returns (x, None)."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, inv_freq, mask, visual_mask):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.RMSNorm(eps=c.norm_eps, name="attn_norm", **kw)(x)
        x = x + Attention(c, attention_impl=self.attention_impl, name="attn", **kw)(
            h, positions, inv_freq, mask, visual_mask)
        h = L.RMSNorm(eps=c.norm_eps, name="mlp_norm", **kw)(x)
        x = x + L.SwiGLU(c.mlp_dim, experts=c.experts, expert_impl=c.expert_impl, name="mlp",
                         **kw)(h, visual_mask)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED)), None


class LLM(nn.Module):
    """Decoder LM. `__call__(input_ids, positions, segment_ids, inputs_embeds, visual_mask)
    -> logits [B, T, V]`; `embed`, `decode`, `logits` are its three stages."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        c = self.cfg
        if c.width % c.heads and not c.head_dim:
            raise ValueError(f"llm.width {c.width} is not divisible by heads {c.heads}; "
                             "set llm.head_dim")
        if c.heads % c.kv_heads:
            raise ValueError(f"llm.heads {c.heads} is not a multiple of kv_heads {c.kv_heads}")
        if c.act != "silu":
            raise ValueError(f"llm.act {c.act!r}: the Llama-family LLM uses silu (SwiGLU)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = self.param("embedding", L.with_axes(L.normal_init(0.02),
                                                             (L.VOCAB, L.EMBED)),
                                    (c.vocab_size, c.width), self.param_dtype)
        blk = dict(cfg=c, attention_impl=self.attention_impl, **kw)
        cls = stack_blocks(DecoderBlock, depth=c.depth, scan=c.scan_layers, remat=c.remat,
                           num_broadcast=4, emit=False)
        if c.scan_layers:
            self.layers = cls(name="layers", **blk)
        else:
            self.blocks = [cls(name=f"layers_{i}", **blk) for i in range(c.depth)]
        self.final_norm = L.RMSNorm(eps=c.norm_eps, name="final_norm", **kw)
        if not c.tie_embeddings:
            self.lm_head = self.param("lm_head", L.with_axes(L.normal_init(0.02),
                                                             (L.EMBED, L.VOCAB)),
                                      (c.width, c.vocab_size), self.param_dtype)

    def embed(self, tokens):
        """tokens [B, T] int -> embeddings [B, T, D] in the compute dtype."""
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))

    def decode(self, x, positions=None, segment_ids=None, visual_mask=None):
        """Runs the decoder layers and the final norm: [B, T, D] -> [B, T, D]."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = inv_freq_for(self.cfg, positions)
        mask = L.attention_mask(segment_ids, causal=True, q_len=t)
        if self.cfg.scan_layers:
            x, _ = self.layers(x, positions, inv_freq, mask, visual_mask)
        else:
            for blk in self.blocks:
                x, _ = blk(x, positions, inv_freq, mask, visual_mask)
        return self.final_norm(x)

    def unembedding(self):
        """(unembedding matrix, tied): the embedding [V, D] if tied, else lm_head [D, V]."""
        if self.cfg.tie_embeddings:
            return self.embedding, True
        return self.lm_head, False

    def logits(self, hidden):
        """[B, T, D] -> logits [B, T, V] in the compute dtype (tied: hidden @ embedding.T)."""
        w, tied = self.unembedding()
        spec = "btd,vd->btv" if tied else "btd,dv->btv"
        y = jnp.einsum(spec, hidden, w.astype(self.dtype))
        return L.constrain(y, (L.BATCH, L.LENGTH, L.VOCAB))

    def loss(self, hidden, targets, loss_mask):
        """(loss_sum, num_tokens) of next-token prediction from final hidden states, with
        the fused chunked cross-entropy when `cfg.loss_chunk` > 0."""
        w, tied = self.unembedding()
        return losses.next_token_loss_from_hidden(hidden, w, targets, loss_mask,
                                                  chunk=int(self.cfg.get("loss_chunk", 0)),
                                                  tied=tied)

    def __call__(self, input_ids=None, positions=None, segment_ids=None, inputs_embeds=None,
                 visual_mask=None):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("LLM needs input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids)
        elif self.is_initializing() and input_ids is not None:
            self.embed(input_ids)
        h = self.decode(inputs_embeds, positions, segment_ids, visual_mask)
        return self.logits(h)


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """"/"-joined param path -> shape, without tracing the model (conversion uses it to
    validate checkpoints; a test checks it against `jax.eval_shape` of `LLM.init`)."""
    if cfg.experts:
        raise ValueError("param_shapes: modality experts are not part of pretrained checkpoints")
    d, hd, h, kv, m = cfg.width, head_dim(cfg), cfg.heads, cfg.kv_heads, cfg.mlp_dim
    layer = {"attn/q/kernel": (d, h, hd), "attn/k/kernel": (d, kv, hd),
             "attn/v/kernel": (d, kv, hd), "attn/o/kernel": (h, hd, d),
             "mlp/gate/kernel": (d, m), "mlp/up/kernel": (d, m), "mlp/down/kernel": (m, d),
             "attn_norm/scale": (d,), "mlp_norm/scale": (d,)}
    if cfg.qkv_bias:
        layer.update({"attn/q/bias": (h, hd), "attn/k/bias": (kv, hd), "attn/v/bias": (kv, hd)})
    top = {"embedding": (cfg.vocab_size, d), "final_norm/scale": (d,)}
    if not cfg.tie_embeddings:
        top["lm_head"] = (d, cfg.vocab_size)
    return with_layers(top, layer, cfg.depth, cfg.scan_layers)


def with_layers(top: dict, layer: dict, depth: int, scanned: bool) -> dict:
    """Adds per-layer shapes as `layers/...` [depth, ...] or `layers_{i}/...`."""
    out = dict(top)
    for k, s in layer.items():
        if scanned:
            out[f"layers/{k}"] = (depth,) + tuple(s)
        else:
            out.update({f"layers_{i}/{k}": tuple(s) for i in range(depth)})
    return out
