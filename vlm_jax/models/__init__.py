"""Model registry: `build_model(model_cfg)` by `model_cfg.kind`, and `batch_spec`.

Kinds: "vlm" (compositional ViT + projector + LLM), "lm" (text only), "clip"
(contrastive pretraining), "native" (NaViL). Modules are imported lazily so that one
kind's module failing to import does not break the others.
"""
from __future__ import annotations

import importlib

import numpy as np   # JAX is imported when a spec is built (config tools stay light)

KINDS = {
    "vlm": ("vlm_jax.models.vlm", "VLM"),
    "lm": ("vlm_jax.models.lm", "LM"),
    "clip": ("vlm_jax.models.clip", "CLIPModel"),
    "native": ("vlm_jax.models.native", "NativeVLM"),
}


def _kind(model_cfg) -> str:
    kind = model_cfg.get("kind", "vlm")
    if kind not in KINDS:
        raise ValueError(f"unknown model.kind {kind!r}; use one of {sorted(KINDS)}")
    return kind


def build_model(model_cfg):
    """The flax module for `config.model` (its `kind` picks the class)."""
    module, cls = KINDS[_kind(model_cfg)]
    return getattr(importlib.import_module(module), cls)(cfg=model_cfg)


def _sds(shape, dtype):
    import jax
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def text_spec(b: int, t: int, with_targets: bool = True) -> dict:
    """tokens/positions/segment_ids (+ targets/loss_mask) [b, t] and valid [b]."""
    out = {"tokens": _sds((b, t), np.int32), "positions": _sds((b, t), np.int32),
           "segment_ids": _sds((b, t), np.int32), "valid": _sds((b,), np.float32)}
    if with_targets:
        out["targets"] = _sds((b, t), np.int32)
        out["loss_mask"] = _sds((b, t), np.float32)
    return out


def batch_spec(config, batch_size: int) -> dict:
    """Shapes/dtypes (`jax.ShapeDtypeStruct`) of one batch of `config` (the full config:
    model + data), per docs/contracts.md, for init and AOT compilation."""
    kind = _kind(config.model)
    b = int(batch_size)
    if kind == "native":
        return importlib.import_module("vlm_jax.models.native").batch_spec(config, b)
    if kind == "clip":
        clip = importlib.import_module("vlm_jax.models.clip")
        if hasattr(clip, "batch_spec"):
            return clip.batch_spec(config, b)
        s = config.model.vision.image_size
        out = text_spec(b, config.model.clip.text_max_len, with_targets=False)
        out.pop("positions")
        out["pixels"] = _sds((b, s, s, 3), np.uint8)
        return out
    if kind == "lm":
        return text_spec(b, config.data.seq_len)
    from vlm_jax.models.vlm import num_image_tokens
    t = num_image_tokens(config.model) + config.data.seq_len
    s = config.model.vision.image_size
    out = text_spec(b, t)
    out["pixels"] = _sds((b, s, s, 3), np.uint8)  # raw RGB; the ViT normalises
    out["visual_mask"] = _sds((b, t), np.bool_)
    return out
