"""Decoder-only LM of the Llama family (Llama/Vicuna, Qwen2, InternLM2).

RMSNorm, SwiGLU, RoPE (theta, linear/dynamic/llama3 scaling), grouped-query attention,
optional q/k/v bias (Qwen2), tied or untied embeddings, causal + padding/segment mask,
optional NaViL modality experts (separate q/k/v/o and FFN weights for visual tokens,
shared norms, routed by `visual_mask`).

Param tree: `embedding` [vocab, embed], `layers` (scanned, leading `layers` axis) or
`layers_0..` with `attn_norm`, `attn/{q,k,v,o}` (kernels [heads, kv, embed] and
[embed, heads, kv]: torch's [out, in] layout, see `layers.Linear`), `mlp_norm`,
`mlp/{gate,up,down}`; `final_norm`; `lm_head` [vocab, embed] (like the embedding) unless
tied.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models import losses
from vlm_jax.models.vit import stack_blocks, with_remat

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
    """Grouped-query self-attention with RoPE. `rope` = `layers.rope_tables` (cos, sin) of
    the query positions. With `kv` (the normed inputs of every position) the queries come
    from `x` (a subset of the positions, e.g. those that carry loss) and attend to all of
    `kv` (rotated by `kv_rope`); `mask` rows then belong to the query positions."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, rope, mask, visual_mask=None, kv=None, kv_rope=None,
                 kv_visual_mask=None):
        c = self.cfg
        hd = head_dim(c)
        self_attention = kv is None  # then the causal mask is known to be lower-triangular
        if self_attention:
            kv, kv_rope, kv_visual_mask = x, rope, visual_mask
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, experts=c.experts,
                  expert_impl=c.expert_impl)
        q = L.Linear((c.heads, hd), (L.EMBED, L.HEADS, L.KV), use_bias=c.qkv_bias, name="q",
                     **kw)(x, visual_mask)
        k = L.Linear((c.kv_heads, hd), (L.EMBED, L.KV_HEADS, L.KV), use_bias=c.qkv_bias,
                     name="k", **kw)(kv, kv_visual_mask)
        v = L.Linear((c.kv_heads, hd), (L.EMBED, L.KV_HEADS, L.KV), use_bias=c.qkv_bias,
                     name="v", **kw)(kv, kv_visual_mask)
        q = L.rope_rotate(q, *rope)
        k = L.rope_rotate(k, *kv_rope)
        q = L.constrain(q, (L.BATCH, L.LENGTH, L.HEADS, L.KV))
        k = L.constrain(k, (L.BATCH, L.LENGTH, L.KV_HEADS, L.KV))
        v = L.constrain(v, (L.BATCH, L.LENGTH, L.KV_HEADS, L.KV))
        o = L.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl,
                                    causal=self_attention)
        o = L.constrain(o, (L.BATCH, L.LENGTH, L.HEADS, L.KV))
        return L.Linear(c.width, (L.HEADS, L.KV, L.EMBED), in_axes=2, name="o",
                        **kw)(o, visual_mask)


def take_positions(a, keep):
    """Rows `keep` [B, n] of a [B, T, ...] array (None stays None)."""
    if a is None:
        return None
    return jnp.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 2)), axis=1)


class DecoderBlock(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); x + swiglu(norm(x)). Returns (x, None).

    With `keep` [B, n] (position indices) it returns only those rows [B, n, D]: keys and
    values still come from every position, but the queries, the output projection and the
    MLP run on the n kept rows alone (the last layer of a model whose loss reads n
    positions)."""
    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, rope, mask, visual_mask, keep=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.RMSNorm(eps=c.norm_eps, name="attn_norm", **kw)(x)
        attn = Attention(c, attention_impl=self.attention_impl, name="attn", **kw)
        if keep is None:
            x = x + attn(h, rope, mask, visual_mask)
        else:
            # the queries are a subset of the positions: the dense mask's rows for them
            mask = L.attention_mask(mask.segment_ids, True, x.shape[1]) \
                if mask.dense is None else mask.dense
            if mask is not None:  # query rows of the mask: [B|1, 1, T, S] -> [B, 1, n, S]
                mask = jnp.broadcast_to(mask, (x.shape[0],) + mask.shape[1:])
                mask = jnp.take_along_axis(mask, keep[:, None, :, None], axis=2)
            vq = take_positions(visual_mask, keep)
            x = take_positions(x, keep) + attn(
                take_positions(h, keep), tuple(take_positions(r, keep) for r in rope), mask,
                vq, kv=h, kv_rope=rope, kv_visual_mask=visual_mask)
            visual_mask = vq
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
                           num_broadcast=3, emit=False)
        if c.scan_layers:
            self.layers = cls(name="layers", **blk)
        else:
            self.blocks = [cls(name=f"layers_{i}", **blk) for i in range(c.depth)]
        self.final_norm = L.RMSNorm(eps=c.norm_eps, name="final_norm", **kw)
        if not c.tie_embeddings:
            # [vocab, embed] (torch's layout), drawn as the [embed, vocab] head was
            init = L.out_in_init(L.normal_init(0.02), 1)
            self.lm_head = self.param("lm_head", L.with_axes(init, (L.VOCAB, L.EMBED)),
                                      (c.vocab_size, c.width), self.param_dtype)

    def embed(self, tokens):
        """tokens [B, T] int -> embeddings [B, T, D] in the compute dtype."""
        x = L.embed_lookup(self.embedding, tokens).astype(self.dtype)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))

    def decode(self, x, positions=None, segment_ids=None, visual_mask=None, keep=None):
        """Runs the decoder layers and the final norm: [B, T, D] -> [B, T, D].

        `keep` [B, n] (position indices): return only those positions [B, n, D]; the last
        layer then computes queries, output projection and MLP for them alone (its other
        rows cannot influence these outputs), which saves a layer's worth of work when
        only a few positions carry loss."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = L.rope_tables(positions, inv_freq_for(self.cfg, positions))
        mask = L.self_attention_mask(segment_ids, True, t, self.attention_impl, self.dtype,
                                     head_dim(self.cfg))
        args = (rope, mask, visual_mask)
        if keep is not None and self.is_initializing():  # init creates every layer as usual
            return take_positions(self.decode(x, positions, segment_ids, visual_mask), keep)
        if not self.cfg.scan_layers:
            for i, blk in enumerate(self.blocks):
                last = keep is not None and i == len(self.blocks) - 1
                x, _ = blk(x, *args, keep) if last else blk(x, *args)
        elif keep is None:
            x, _ = self.layers(x, *args)
        else:
            x = self._scan_then_keep(x, args, keep)
        return self.final_norm(x)

    def _scan_then_keep(self, x, args, keep):
        """Scanned layers with `keep`: the first depth-1 layers by `lax.scan` over their
        slice of the stacked params, then the last one on the kept rows (each under the
        config's remat policy, as `stack_blocks` wraps the scanned block)."""
        c = self.cfg
        stacked = nn.meta.unbox(self.variables["params"]["layers"])
        block = DecoderBlock(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype,
                             attention_impl=self.attention_impl, parent=None)

        def run(p, h, *keep_rows):
            return block.apply({"params": p}, h, *args, *keep_rows)[0]
        if c.depth > 1 and c.remat != "none":
            # under remat the loop indexes the stacked params (a constant of the loop)
            # instead of scanning over their [:-1] slice: a slice is a copy of the (often
            # frozen) weights, and autodiff stacked a second one as the loop's residuals.
            # Without remat the weights are residuals of the loop either way, and the
            # slice's loop ran the demo's tiny steps faster on CPU (grid stage 69 vs 89 s)
            def layer(h, i):
                return run(jax.tree.map(lambda a: a[i], stacked), h), None
            x, _ = jax.lax.scan(with_remat(layer, c.remat, scanned=True), x,
                                jnp.arange(c.depth - 1))
        elif c.depth > 1:
            x, _ = jax.lax.scan(lambda h, p: (run(p, h), None), x,
                                jax.tree.map(lambda a: a[:-1], stacked))
        last = with_remat(lambda h, k: run(jax.tree.map(lambda a: a[-1], stacked), h, k),
                          c.remat, scanned=False)
        return last(x, keep)

    def unembedding(self):
        """(unembedding matrix, vocab_major): the embedding if tied, else lm_head; both are
        [V, D] (vocab_major=True: the losses' `tied` layout)."""
        if self.cfg.tie_embeddings:
            return self.embedding, True
        return self.lm_head, True

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
    layer = {"attn/q/kernel": (h, hd, d), "attn/k/kernel": (kv, hd, d),
             "attn/v/kernel": (kv, hd, d), "attn/o/kernel": (d, h, hd),
             "mlp/gate/kernel": (m, d), "mlp/up/kernel": (m, d), "mlp/down/kernel": (d, m),
             "attn_norm/scale": (d,), "mlp_norm/scale": (d,)}
    if cfg.qkv_bias:
        layer.update({"attn/q/bias": (h, hd), "attn/k/bias": (kv, hd), "attn/v/bias": (kv, hd)})
    top = {"embedding": (cfg.vocab_size, d), "final_norm/scale": (d,)}
    if not cfg.tie_embeddings:
        top["lm_head"] = (cfg.vocab_size, d)
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
