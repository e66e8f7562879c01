"""Tiny random transformers models written with save_pretrained (no downloads)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from vlm_jax.convert import safetensors_io as st


def llama(path, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    base = dict(vocab_size=1000, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=3, num_key_value_heads=1, head_dim=48, rope_theta=5e5,
                max_position_embeddings=64, rms_norm_eps=1e-5)
    base.update(kw)
    m = LlamaForCausalLM(LlamaConfig(**base)).eval()
    _randomize_norms(m)
    m.save_pretrained(path)
    return m


def qwen2(path, seed=0, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                tie_word_embeddings=True, max_position_embeddings=64)
    base.update(kw)
    m = Qwen2ForCausalLM(Qwen2Config(**base)).eval()
    with torch.no_grad():  # transformers inits biases to zero: make them matter
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    _randomize_norms(m)
    m.save_pretrained(path)
    return m


def clip_vision(path, seed=0, **kw):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu")
    base.update(kw)
    m = CLIPVisionModel(CLIPVisionConfig(**base)).eval()
    _randomize_norms(m)
    m.save_pretrained(path)
    return m


def _randomize_norms(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in n and n.endswith("bias"):
                p.normal_(0, 0.1)


def internlm2_from_llama(llama_dir, out_dir):
    """Rewrites a Llama checkpoint in InternLM2's layout (same math): packed wqkv per
    kv-head group, wo, w1/w3/w2, attention_norm/ffn_norm, tok_embeddings, output."""
    cfg = json.load(open(os.path.join(llama_dir, "config.json")))
    r = st.Reader(llama_dir)
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // h
    g = h // kv
    out = {"model.tok_embeddings.weight": r.read("model.embed_tokens.weight"),
           "model.norm.weight": r.read("model.norm.weight"),
           "output.weight": r.read("lm_head.weight")}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = r.read(p + "self_attn.q_proj.weight").reshape(kv, g, hd, -1)
        k = r.read(p + "self_attn.k_proj.weight").reshape(kv, 1, hd, -1)
        v = r.read(p + "self_attn.v_proj.weight").reshape(kv, 1, hd, -1)
        out[p + "attention.wqkv.weight"] = np.concatenate([q, k, v], 1).reshape(-1, q.shape[-1])
        out[p + "attention.wo.weight"] = r.read(p + "self_attn.o_proj.weight")
        for a, b in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[p + f"feed_forward.{a}.weight"] = r.read(p + f"mlp.{b}_proj.weight")
        out[p + "attention_norm.weight"] = r.read(p + "input_layernorm.weight")
        out[p + "ffn_norm.weight"] = r.read(p + "post_attention_layernorm.weight")
    os.makedirs(out_dir, exist_ok=True)
    st.write(os.path.join(out_dir, "model.safetensors"), out)
    icfg = dict(cfg, model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False)
    json.dump(icfg, open(os.path.join(out_dir, "config.json"), "w"))
