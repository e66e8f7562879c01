"""Compositional VLM (model kind "vlm"): vision tower -> projector -> LLM.

Image features (from `ViT.features`, or precomputed `batch["features"]` [b, K, Dv] from a
frozen-feature cache, which skips the vision tower) go through the projector and replace
the token embeddings at the `visual_mask` positions, in order (the data pipeline puts
`model.image_token_id` placeholders there and builds targets and a loss mask that covers
caption tokens only, e.g. the "plain" template `<image> caption</s>`). The loss is the
masked next-token cross-entropy, returned as (`loss_sum`, `num_tokens`).

Param tree: `{"vision": ViT, "projector": Projector, "llm": LLM}`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models.llm import LLM
from vlm_jax.models.lm import compute_dtypes, loss_mask_of, loss_outputs
from vlm_jax.models.projector import Projector, num_output_tokens
from vlm_jax.models.vit import ViT, num_feature_tokens


def num_image_tokens(model_cfg) -> int:
    """LLM positions one image takes: projector outputs of the ViT's feature tokens."""
    return num_output_tokens(model_cfg.projector, num_feature_tokens(model_cfg.vision))


def splice(embeds, image_embeds, visual_mask):
    """Puts image_embeds [B, K, D] at the True positions of visual_mask [B, T], in order.

    Rows with fewer than K visual positions use the first ones; extra positions reuse the
    last image token (the data pipeline makes the counts equal)."""
    vm = visual_mask.astype(bool)
    k = image_embeds.shape[1]
    idx = jnp.clip(jnp.cumsum(vm, axis=1) - 1, 0, k - 1)
    picked = jnp.take_along_axis(image_embeds, idx[..., None], axis=1)
    out = jnp.where(vm[..., None], picked.astype(embeds.dtype), embeds)
    return L.constrain(out, (L.BATCH, L.LENGTH, L.EMBED))


class VLM(nn.Module):
    """`__call__(batch) -> {"loss_sum", "num_tokens"}`; `logits(batch) -> [B, T, V]`."""
    cfg: Any  # config.model

    def setup(self):
        m = self.cfg
        dt, pdt, impl = compute_dtypes(m)
        self.vision = ViT(m.vision, dtype=dt, param_dtype=pdt, attention_impl=impl)
        self.projector = Projector(m.projector, out_dim=m.llm.width, dtype=dt, param_dtype=pdt)
        self.llm = LLM(m.llm, dtype=dt, param_dtype=pdt, attention_impl=impl)

    def image_features(self, batch):
        """Projector inputs [B, K, Dv]: `batch["features"]` if present, else the ViT's."""
        if "features" in batch:
            return batch["features"]
        if "pixels" not in batch:
            raise KeyError("VLM batch needs 'pixels' [b, H, W, 3] or precomputed 'features' "
                           "[b, K, Dv]")
        return self.vision.features(batch["pixels"])

    def hidden(self, batch, keep=None):
        """Final LLM hidden states [B, T, D] of the spliced image+text sequence (only the
        positions `keep` [B, n], if given: see `LLM.decode`)."""
        img = self.projector(self.image_features(batch))
        x = splice(self.llm.embed(batch["tokens"]), img, batch["visual_mask"])
        return self.llm.decode(x, batch.get("positions"), batch.get("segment_ids"),
                               batch["visual_mask"], keep=keep)

    def logits(self, batch):
        return self.llm.logits(self.hidden(batch))

    def __call__(self, batch, deterministic: bool = True):
        del deterministic  # no dropout
        k = num_image_tokens(self.cfg)
        t = batch["tokens"].shape[1]
        if not 0 < k < t:
            return loss_outputs(self.llm, self.hidden(batch), batch)
        # Only caption positions (and the last image position, which predicts the first
        # caption token) can carry loss: the last decoder layer and the unembedding run on
        # just those T-K+1 positions instead of all T. With a 14x14-patch image and 32
        # caption tokens that is 33 of 228 positions, so the vocabulary matmul and the last
        # layer's queries, output projection and MLP (and their backward) shrink 8x.
        mask = loss_mask_of(batch)
        keep = loss_positions(mask, t - k + 1)
        hidden = self.hidden(batch, keep)
        batch = {"targets": jnp.take_along_axis(batch["targets"], keep, axis=1),
                 "loss_mask": jnp.take_along_axis(mask, keep, axis=1)}
        return loss_outputs(self.llm, hidden, batch)


def loss_positions(loss_mask, n: int):
    """Indices [B, n] of the positions that carry loss (loss_mask > 0), in order, padded
    with loss-free positions. Exact as long as no row has more than n loss positions, which
    holds when each row has K image positions (the data contract): at most T - K + 1."""
    order = jnp.argsort(jnp.where(loss_mask > 0, 0, 1), axis=1, stable=True)
    return order[:, :n]
