"""A small real flax VLM and a Grain data source for the trainer's unit tests.

Not a mock: the model is a genuine (tiny) vision -> projector -> LM network built from
`vlm_jax.models.layers`, with logical axis names on every param, and the data are Grain
datasets whose iterator state is checkpointed like the real pipeline's. Sizes are chosen
so that every named dimension divides meshes up to (2, 2, 2) / (1, 4, 2).
"""
from __future__ import annotations

import flax.linen as nn
import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from vlm_jax.models import layers as L

IMG, PATCH, VOCAB, TEXT = 8, 4, 64, 12
N_IMG_TOK = (IMG // PATCH) ** 2


class TinyProjector(nn.Module):
    width: int
    mlp: int

    @nn.compact
    def __call__(self, f):
        h = jax.nn.gelu(L.Linear(self.mlp, (L.EMBED, L.MLP), use_bias=True, name="linear_0")(f))
        return L.Linear(self.width, (L.MLP, L.EMBED), use_bias=True, name="linear_1")(h)


class TinyLM(nn.Module):
    width: int
    mlp: int
    heads: int

    @nn.compact
    def __call__(self, img_emb, tokens):
        emb = self.param("embedding", L.with_axes(L.normal_init(0.5), (L.VOCAB, L.EMBED)),
                         (VOCAB, self.width), jnp.float32)
        h = jnp.concatenate([img_emb, jnp.take(emb, tokens, axis=0)], axis=1)
        h = L.constrain(h, (L.BATCH, L.LENGTH, L.EMBED))
        hd = self.width // self.heads
        q = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="q")(h)
        k = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="k")(h)
        v = L.Linear((self.heads, hd), (L.EMBED, L.HEADS, L.KV), name="v")(h)
        mask = L.attention_mask(None, causal=True, q_len=h.shape[1])
        a = L.dot_product_attention(q, k, v, mask=mask)
        h = h + L.Linear(self.width, (L.HEADS, L.KV, L.EMBED), in_axes=2, name="o")(a)
        h = h + L.SwiGLU(self.mlp, name="mlp")(L.RMSNorm(name="norm")(h))
        return L.Linear(VOCAB, (L.EMBED, L.VOCAB), name="lm_head")(h)


class TinyVLM(nn.Module):
    """vision (patch Linear) -> projector (2-layer GELU MLP) -> one-block LM."""
    width: int = 32
    mlp: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, batch, deterministic=True):
        pix = batch["pixels"]
        b = pix.shape[0]
        g = IMG // PATCH
        x = pix.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, PATCH * PATCH * 3)
        feats = nn.tanh(L.Linear(self.width, (None, L.EMBED), name="vision")(x))
        img = TinyProjector(self.width, self.mlp, name="projector")(feats)
        logits = TinyLM(self.width, self.mlp, self.heads, name="llm")(
            img, batch["tokens"])[:, N_IMG_TOK:]
        loss_sum, n = L.next_token_loss(logits, batch["targets"], batch["loss_mask"])
        return {"loss_sum": loss_sum, "num_tokens": n}


def batch_spec(config, batch_size):
    s = jax.ShapeDtypeStruct
    return {"pixels": s((batch_size, IMG, IMG, 3), jnp.float32),
            "tokens": s((batch_size, TEXT), jnp.int32),
            "targets": s((batch_size, TEXT), jnp.int32),
            "loss_mask": s((batch_size, TEXT), jnp.float32),
            "segment_ids": s((batch_size, TEXT), jnp.int32),
            "valid": s((batch_size,), jnp.float32)}


def example(i: int) -> dict:
    """Deterministic example i: the caption's tokens depend on the image (learnable);
    caption length varies, so the number of loss tokens differs between examples."""
    rng = np.random.default_rng(i)
    cls = i % 5
    pix = (rng.normal(size=(IMG, IMG, 3)) * 0.1 + cls * 0.3).astype(np.float32)
    n = 4 + i % (TEXT - 4)
    toks = np.zeros(TEXT + 1, np.int32)
    toks[:n + 1] = (np.arange(n + 1) * (cls + 1) + cls) % (VOCAB - 1) + 1
    mask = np.zeros(TEXT, np.float32)
    mask[:n] = 1
    return {"pixels": pix, "tokens": toks[:-1], "targets": toks[1:], "loss_mask": mask,
            "segment_ids": (np.arange(TEXT) < n + 1).astype(np.int32),
            "valid": np.float32(1.0)}


class Data:
    """train_iterator / eval_batches with the pipeline's contract (docs/contracts.md)."""

    def __init__(self, n_train=64, n_eval=13, nan_after: int | None = None):
        self.n_train, self.n_eval, self.nan_after = n_train, n_eval, nan_after

    def train_iterator(self, config, process_index=0, process_count=1):
        b = config.train.batch_size
        per = b // process_count
        nan_after = self.nan_after

        def global_batch(step):
            idx = [(step * b + j) % self.n_train for j in range(b)]
            ex = [example(i) for i in idx[process_index * per:(process_index + 1) * per]]
            out = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
            if nan_after is not None and step >= nan_after:
                out["pixels"] = out["pixels"] * np.float32("nan")
            return out

        ds = gp.MapDataset.range(10 ** 9).map(global_batch)
        return iter(ds.to_iter_dataset())

    def eval_batches(self, config, process_index=0, process_count=1):
        b = config.train.eval_batch_size or config.train.batch_size
        per = b // process_count
        for start in range(0, self.n_eval, b):
            rows = []
            for j in range(process_index * per, (process_index + 1) * per):
                i = start + j
                if i < self.n_eval:
                    rows.append(example(10_000 + i))
                else:  # padding example of the last batch
                    e = example(10_000)
                    e["loss_mask"] = np.zeros_like(e["loss_mask"])
                    e["valid"] = np.float32(0.0)
                    rows.append(e)
            yield {k: np.stack([e[k] for e in rows]) for k in rows[0]}


def config(**train):
    c = common.base_config()
    c.model.kind = "vlm"
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.log_every_steps = 1
    c.train.checkpoint_every_secs = 0.0
    c.train.progress = False
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 1
    c.optim.trainable = ("projector",)
    c.mesh.shape = (-1, 1, 1)
    for k, v in train.items():
        c.train[k] = v
    return c


def run(c, workdir, data=None):
    from vlm_jax.train import trainer
    return trainer.run(c, workdir, model=TinyVLM(), batch_spec=batch_spec, data=data or Data())
