"""NaViL native VLM: native ViT -> pixel-shuffle connector -> LLM with modality experts.

    patches [b, P, p*p*3] --NativeViT--> [b, P, w] --pixel shuffle 0.5--> [b, P/4, 4w]
        --LayerNorm(4w) -> Linear -> GELU -> Linear--> [b, P/4, D]
    tokens [b, T] --embed--> [b, T, D]; the `visual_mask` positions take the connector
    outputs in order --LLM (experts routed by visual_mask, causal within segment_ids)-->
    next-token loss on `loss_mask`.

Everything trains end to end. Batches are those of `vlm_jax.data.native` (packed: several
variable-resolution samples per row; the ViT attends within its image via
`patch_segment_ids`, the LLM causally within its sample via `segment_ids`). Patches come
in 2x2-block order, so the pixel shuffle is a reshape, and the i-th visual position of a
row takes the i-th shuffled token of that row.

Param tree: {"vision": NativeViT, "projector": {norm, linear_0, linear_1}, "llm": LLM}.
The visual experts of the LLM start as copies of its text weights: `init_params` does it
for fresh params, `init_visual_experts` after loading a pretrained (text-only) LLM.

`NativeVLM.init` of a small model (<= ONE_DRAW_MAX parameters: the CPU demo's) draws every
weight from ONE random stream (`one_draw_init`): the same distributions as the layers' own
initialisers (normal(0.02) weights, ones for norm scales, zeros for biases; checked
against flax's per-parameter init in tests/native), but one threefry draw instead of a
key derivation and a draw per parameter, so its init program compiles ~60 small kernels
instead of ~10-20 per parameter (benchmarks/native.py `init`). Bigger models keep flax's
per-parameter init (no transient flat copy of all weights; each draw shards like its
parameter). The layout is `fast_init`'s (`init_rules`: its defaults), whose host-side
path (the draw alone as a program, the leaves cut on the host) gives the same values
without the ~60 per-leaf copy kernels.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import fast_init
from vlm_jax.models import layers as L
from vlm_jax.models.experts import init_visual_experts
from vlm_jax.models.native_vit import NativeViT

Dtype = Any


def shuffle_tokens(x: jax.Array, merge: int = 2) -> jax.Array:
    """Pixel shuffle of block-ordered patch features: [b, P, w] -> [b, P/m^2, m^2 w]."""
    b, p, w = x.shape
    k = merge * merge
    if p % k:
        raise ValueError(f"pixel shuffle: {p} patches per row is not a multiple of {k} "
                         "(data.native.max_patches must be a multiple of 4)")
    return x.reshape(b, p // k, k * w)


class Connector(nn.Module):
    """NaViL connector: pixel shuffle (ratio 1/merge) then LayerNorm(m^2 w) -> Linear ->
    GELU -> Linear. Param names follow `projector.Projector` ("pixel_shuffle")."""
    out_dim: int
    merge: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = shuffle_tokens(x, self.merge)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = L.LayerNorm(name="norm", **kw)(x)
        x = L.Linear(self.out_dim, (L.EMBED, L.MLP), use_bias=True, name="linear_0", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        x = L.Linear(self.out_dim, (L.MLP, L.EMBED), use_bias=True, name="linear_1", **kw)(x)
        return L.constrain(x, (L.BATCH, L.LENGTH, L.EMBED))


def merge_visual(text_embeds, visual_tokens, visual_mask):
    """Puts the i-th visual token of each row at the row's i-th `visual_mask` position.

    text_embeds [b, T, D], visual_tokens [b, K, D], visual_mask [b, T] (at most K set)."""
    vm = visual_mask.astype(bool)
    idx = jnp.clip(jnp.cumsum(vm.astype(jnp.int32), axis=1) - 1, 0,
                   visual_tokens.shape[1] - 1)
    picked = jnp.take_along_axis(visual_tokens, idx[..., None], axis=1)
    return jnp.where(vm[..., None], picked.astype(text_embeds.dtype), text_embeds)


# Initial values by param name (every initialiser of the native model's layers): norm
# scales are ones, biases zeros, every other weight (kernels, embeddings, lm_head) normal
# with this std (`layers.normal_init()`, the default of Linear and the LLM's embeddings):
# `fast_init`'s default rules, which `NativeVLM.init_rules` leaves as they are.
INIT_STD = fast_init.DEFAULT_STD
ONE_DRAW_MAX = fast_init.MAX_PARAMS   # parameters; above it, flax's per-parameter init
_ONES = ("scale",)
_ZEROS = ("bias", "visual_bias")


def _leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def one_draw_init(abstract, rng):
    """Values for an abstract variables tree (`jax.eval_shape` of `Module.init`, boxed or
    not): ones / zeros / normal(INIT_STD) by param name, the normal ones sliced from a
    single draw of `rng` (distinct parameters get disjoint slices: independent). The
    layout of `fast_init.layout` (bit for bit what the trainer's host-side init gives)."""
    p = fast_init.layout(abstract, NativeVLM.init_rules())
    if p is None:
        raise ValueError(f"one_draw_init: more than {fast_init.MAX_PARAMS} parameters")
    return fast_init.traced_values(p, rng)


class NativeVLM(nn.Module):
    """`cfg` is `config.model` (kind "native"): `vision` (variant "native"), `llm`
    (experts, expert_impl), `projector` (shuffle_ratio), dtypes, `attention_impl`."""
    cfg: Any

    @nn.nowrap
    def init(self, rngs, *args, method=None, **kwargs):
        """`nn.Module.init` (same tree, shapes, dtypes and logical-axis boxes) with the
        values of `one_draw_init` up to ONE_DRAW_MAX parameters; flax's init unchanged
        above it or with `method`."""
        def flax_init(r):
            return nn.Module.init(self, r, *args, method=method, **kwargs)
        if method is not None:
            return flax_init(rngs)
        abstract = jax.eval_shape(flax_init, rngs)
        if sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)) > ONE_DRAW_MAX:
            return flax_init(rngs)
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        return one_draw_init(abstract, key)

    @staticmethod
    def init_rules() -> tuple:
        """`fast_init` rules: its defaults (normal(0.02), ones for scales, zeros for
        biases) are every initialiser of the native model's layers."""
        return ()

    def setup(self):
        c = self.cfg
        dtype = L.dtype_of(c.dtype)
        pdtype = L.dtype_of(c.param_dtype)
        impl = c.get("attention_impl", "") or None
        if c.vision.get("variant", "native") != "native":
            raise ValueError(f"model.kind 'native' needs model.vision.variant='native', got "
                             f"{c.vision.variant!r}")
        ratio = float(c.projector.shuffle_ratio)
        merge = int(round(1 / ratio))
        if abs(merge * ratio - 1) > 1e-6:
            raise ValueError(f"model.projector.shuffle_ratio={ratio}: must be 1/n (NaViL: 0.5)")
        from vlm_jax.models.llm import LLM
        self.vision = NativeViT(c.vision.to_dict() if hasattr(c.vision, "to_dict")
                                else dict(c.vision), dtype, pdtype, impl)
        self.projector = Connector(c.llm.width, merge, dtype, pdtype)
        self.llm = LLM(c.llm, dtype, pdtype, impl)

    def hidden(self, batch):
        """Final LLM hidden states [b, T, D] of a native batch."""
        feats = self.vision(batch["patches"], batch["patch_rows"], batch["patch_cols"],
                            batch["patch_segment_ids"])
        vis = self.projector(feats)
        x = self.llm.embed(batch["tokens"])
        x = merge_visual(x, vis, batch["visual_mask"])
        vm = batch["visual_mask"] if self.cfg.llm.experts else None
        return self.llm.decode(x, batch["positions"], batch["segment_ids"], vm)

    def logits(self, batch):
        """Logits [b, T, V] of a native batch."""
        return self.llm.logits(self.hidden(batch))

    def token_losses(self, batch):
        """Per-token cross-entropy [b, T] (0 outside loss_mask)."""
        lg = self.logits(batch).astype(jnp.float32)
        lse = jax.nn.logsumexp(lg, axis=-1)
        picked = jnp.take_along_axis(lg, batch["targets"][..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
        return (lse - picked) * self._mask(batch)

    def reference_loss(self, batch):
        """(loss_sum, num_tokens) by autodiff-able logits + `layers.next_token_loss`: the
        reference of `__call__`'s fused loss (tests, benchmarks/native_compile.py)."""
        return L.next_token_loss(self.logits(batch), batch["targets"], self._mask(batch))

    @staticmethod
    def _mask(batch):
        m = batch["loss_mask"].astype(jnp.float32)
        if "valid" in batch:
            m = m * batch["valid"].astype(jnp.float32)[:, None]
        return m

    def __call__(self, batch, deterministic: bool = True):
        """Token loss sum and count: the LLM's fused cross-entropy (`LLM.loss`, the math of
        `layers.next_token_loss` on `logits`, which `reference_loss` computes), whose
        backward pass is one hand-written pass instead of autodiff's over [b, T, V]."""
        del deterministic  # no dropout
        m = self._mask(batch)
        loss_sum, num = self.llm.loss(self.hidden(batch), batch["targets"], m)
        return {"loss_sum": loss_sum, "num_tokens": num,
                "visual_tokens": jnp.sum(batch["visual_mask"].astype(jnp.float32))}


def batch_spec(config, batch_size: int):
    """Shapes/dtypes of a native batch (delegated to by `vlm_jax.models.batch_spec`)."""
    from vlm_jax.data import native as data_native
    return data_native.batch_spec(config, batch_size)


def init_params(model: NativeVLM, rng, batch) -> dict:
    """Fresh params (unboxed) with the visual experts equal to the text weights."""
    params = nn.unbox(model.init(rng, batch)["params"])
    return init_visual_experts(params) if model.cfg.llm.experts else params


def param_counts(params) -> dict[str, int]:
    """Parameters per component: vision, projector, llm, total."""
    def n(t):
        return int(sum(x.size for x in jax.tree.leaves(t)))
    out = {k: n(params[k]) for k in ("vision", "projector", "llm") if k in params}
    out["total"] = sum(out.values())
    return out
