"""Text-only language model (model kind "lm"): the LLM alone on next-token loss.

Batch (docs/contracts.md, kind "lm"): `tokens`, `targets`, `loss_mask`, `positions`,
`segment_ids` [b, T], optional `valid` [b]. Param tree: `{"llm": ...}`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers as L
from vlm_jax.models.llm import LLM


def compute_dtypes(model_cfg):
    """(compute dtype, param dtype, attention implementation or None) of a model config."""
    impl = model_cfg.get("attention_impl", "") or None
    return L.dtype_of(model_cfg.dtype), L.dtype_of(model_cfg.param_dtype), impl


def loss_mask_of(batch) -> jnp.ndarray:
    """The batch's loss mask (fp32) with padding examples (`valid` = 0) masked out."""
    mask = batch["loss_mask"].astype(jnp.float32)
    if "valid" in batch:
        mask = mask * batch["valid"].astype(jnp.float32)[:, None]
    return mask


def loss_outputs(llm: LLM, hidden, batch) -> dict:
    """The contract's output dict: fp32 `loss_sum` and `num_tokens`."""
    loss_sum, num = llm.loss(hidden, batch["targets"], loss_mask_of(batch))
    return {"loss_sum": loss_sum.astype(jnp.float32), "num_tokens": num.astype(jnp.float32)}


class LM(nn.Module):
    """`__call__(batch) -> {"loss_sum", "num_tokens"}`; `logits(batch) -> [B, T, V]`."""
    cfg: Any  # config.model

    @staticmethod
    def init_rules() -> tuple:
        """`vlm_jax.models.fast_init` rules: its defaults (normal(0.02) embeddings,
        kernels and head, ones for norm scales, zeros for biases) are the LLM's."""
        return ()

    def setup(self):
        dt, pdt, impl = compute_dtypes(self.cfg)
        self.llm = LLM(self.cfg.llm, dtype=dt, param_dtype=pdt, attention_impl=impl)

    def hidden(self, batch):
        x = self.llm.embed(batch["tokens"])
        return self.llm.decode(x, batch.get("positions"), batch.get("segment_ids"))

    def logits(self, batch):
        return self.llm.logits(self.hidden(batch))

    def __call__(self, batch, deterministic: bool = True):
        del deterministic  # no dropout
        return loss_outputs(self.llm, self.hidden(batch), batch)
