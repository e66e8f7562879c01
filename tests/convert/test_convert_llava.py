"""LLaVA check: transformers' LlavaForConditionalGeneration and our VLM (converted from
the same checkpoint, both key layouts) give the same caption loss on the same batch."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import common
from vlm_jax import models
from vlm_jax.convert import safetensors_io as st
from vlm_jax.convert.llava import load_llava

IMG = 999  # image token id (inside the vocabulary)


def build(path):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=32, patch_size=8,
                                       hidden_act="quick_gelu", projection_dim=32),
        text_config=LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=160,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128),
        image_token_index=IMG, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    m = LlavaForConditionalGeneration(cfg).eval()
    m.save_pretrained(path)
    return m


def batch_for(rng, b=2, k=16, caption=10):
    t = 1 + k + caption
    ids = rng.integers(3, 990, (b, t))
    ids[:, 0] = 1
    ids[:, 1:1 + k] = IMG
    labels = ids.copy()
    labels[:, :1 + k] = -100
    labels[1, -3:] = -100                            # a shorter caption in row 1
    px = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, :-1] = labels[:, 1:] != -100
    batch = {"pixels": px, "tokens": ids.astype(np.int32),
             "targets": np.roll(ids, -1, 1).astype(np.int32), "loss_mask": loss_mask,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32), "visual_mask": ids == IMG,
             "valid": np.ones((b,), np.float32)}
    return batch, labels


def our_loss(path, batch):
    over, params = load_llava(path)
    c = common.base_config()
    c.model.vision.update(over["vision"])
    c.model.llm.update(over["llm"])
    c.model.projector.update(over["projector"])
    c.model.image_token_id = over["image_token_id"]
    m = models.build_model(c.model)
    out = jax.jit(m.apply)({"params": params}, jax.tree.map(jnp.asarray, batch))
    return float(out["loss_sum"] / out["num_tokens"]), params


def test_llava_loss_matches_transformers(tmp_path):
    m = build(tmp_path / "v5")
    batch, labels = batch_for(np.random.default_rng(0))
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                pixel_values=torch.tensor(batch["pixels"].transpose(0, 3, 1, 2)),
                labels=torch.tensor(labels)).loss.item()
    got, params = our_loss(str(tmp_path / "v5"), batch)
    assert abs(got - ref) <= 1e-4, (got, ref)
    # The same weights in the other LLaVA key layouts convert identically: transformers
    # 4.x hub checkpoints (`vision_tower.vision_model.`) and 5.x in-memory names.
    r = st.Reader(str(tmp_path / "v5"))
    assert "language_model.model.embed_tokens.weight" in r   # what 5.x save_pretrained wrote
    layouts = {
        "hub4": [("vision_tower.", "vision_tower.vision_model.")],
        "mem5": [("language_model.model.", "model.language_model."),
                 ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector.")],
    }
    for name, rename in layouts.items():
        def new(k):
            for a, b in rename:
                if k.startswith(a):
                    return b + k[len(a):]
            return k
        os.makedirs(tmp_path / name)
        st.write(str(tmp_path / name / "model.safetensors"), {new(k): r.read(k) for k in r.keys()})
        os.link(tmp_path / "v5" / "config.json", tmp_path / name / "config.json")
        _, params2 = load_llava(str(tmp_path / name))
        jax.tree.map(np.testing.assert_array_equal, params, params2)
