"""transformers decoder LMs (Llama/Vicuna, Qwen2, InternLM2) <-> `vlm_jax.models.llm.LLM`.

Config: a transformers `config.json` (4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters`; a LLaVA config's `text_config`) -> overrides of `common.llm_config()`.
Keys: `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, ...; LLaVA
checkpoints nest them under `language_model.model.` (4.x) or `model.language_model.`
(5.x); InternLM2 packs q/k/v per kv-head group into `attention.wqkv`.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.convert import mapping as M
from vlm_jax.convert.safetensors_io import ConversionError, Reader

LLAMA_TYPES = ("llama", "mistral", "qwen2", "internlm2")
# Body prefixes (transformers 5.x LLaVA, 4.x LLaVA, plain CausalLM) and lm_head keys.
BODY_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "output.weight")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def text_config(hf: dict) -> dict:
    """The LM part of a transformers config (a VLM's `text_config`, else itself)."""
    return hf.get("text_config") or hf.get("llm_config") or hf


def arch_of(hf: dict, source: str) -> str:
    t = text_config(hf).get("model_type", "")
    archs = text_config(hf).get("architectures") or []
    if t not in LLAMA_TYPES and any("InternLM2" in a for a in archs):
        t = "internlm2"
    if t not in LLAMA_TYPES:
        raise ConversionError(f"{source}: unsupported LLM architecture model_type={t!r} "
                              f"(architectures={archs}); supported: {list(LLAMA_TYPES)}")
    return t


def rope_of(c: dict) -> tuple[float, dict]:
    """(theta, scaling dict for common.llm_config) from 4.x or 5.x rope keys."""
    params = dict(c.get("rope_parameters") or {})
    old = dict(c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} or old
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    out = dict(rope_type=kind, factor=float(scaling.get("factor", 1.0)),
               original_max_position_embeddings=int(scaling.get(
                   "original_max_position_embeddings", c.get("max_position_embeddings", 4096))),
               low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
               high_freq_factor=float(scaling.get("high_freq_factor", 4.0)))
    if kind == "dynamic":  # transformers scales against max_position_embeddings
        out["original_max_position_embeddings"] = int(c.get("max_position_embeddings", 4096))
    if kind not in ("default", "linear", "dynamic", "llama3"):
        raise ConversionError(f"unsupported rope scaling {kind!r}; use default, linear, "
                              "dynamic or llama3")
    return theta, out


def config_overrides(hf: dict, source: str = "config.json") -> dict:
    """transformers config dict -> overrides of `common.llm_config()`."""
    arch = arch_of(hf, source)
    c = text_config(hf)
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported (SwiGLU/silu only)")
    if c.get("mlp_bias"):
        raise ConversionError(f"{source}: mlp_bias=true is not supported")
    if arch == "llama" and c.get("attention_bias"):
        raise ConversionError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
    if arch == "internlm2" and c.get("bias"):
        raise ConversionError(f"{source}: InternLM2 bias=true is not supported")
    width, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    hd = c.get("head_dim") or width // heads
    theta, scaling = rope_of(c)
    return dict(
        vocab_size=int(c["vocab_size"]), width=width, depth=int(c["num_hidden_layers"]),
        heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=0 if hd * heads == width else int(hd),
        mlp_dim=int(c["intermediate_size"]), act="silu",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_len=int(c.get("max_position_embeddings", 4096)),
        qkv_bias=arch == "qwen2",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_id=_id(c.get("bos_token_id"), 1), eos_id=_id(c.get("eos_token_id"), 2),
        pad_id=_id(c.get("pad_token_id"), 0),
    )


def _id(v, default):
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)


def hf_config(cfg, arch: str = "llama", base: dict | None = None) -> dict:
    """Our llm config -> a transformers config dict (`base` = the original, if known)."""
    if base:
        return base
    hd = cfg.head_dim or cfg.width // cfg.heads
    rs = cfg.rope_scaling.to_dict() if hasattr(cfg.rope_scaling, "to_dict") else dict(
        cfg.rope_scaling)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": rs.get("rope_type", "default")}
    if rope["rope_type"] != "default":
        rope.update({k: v for k, v in rs.items() if k != "rope_type"})
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "internlm2": "InternLM2ForCausalLM"}
    return {"architectures": [names[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": hd, "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
            "torch_dtype": "float32"}


# Per-layer keys (after `{prefix}layers.{i}.`) of the tensors both layouts share.
LAYER_KEYS = {
    "llama": {"attn/o/kernel": "self_attn.o_proj", "mlp/gate/kernel": "mlp.gate_proj",
              "mlp/up/kernel": "mlp.up_proj", "mlp/down/kernel": "mlp.down_proj",
              "attn_norm/scale": "input_layernorm",
              "mlp_norm/scale": "post_attention_layernorm"},
    "internlm2": {"attn/o/kernel": "attention.wo", "mlp/gate/kernel": "feed_forward.w1",
                  "mlp/up/kernel": "feed_forward.w3", "mlp/down/kernel": "feed_forward.w2",
                  "attn_norm/scale": "attention_norm", "mlp_norm/scale": "ffn_norm"},
}


def entries(cfg, arch: str, prefix: str = "model.", head_key: str = "lm_head.weight"
            ) -> list[M.Entry]:
    """The key table of an LLM config (one entry per checkpoint tensor group). Our kernels
    are in torch's layout, so each weight is copied as stored (split into heads)."""
    hd = cfg.head_dim or cfg.width // cfg.heads
    o_split = M.heads_last(cfg.heads)
    p = prefix
    emb = "tok_embeddings" if arch == "internlm2" else "embed_tokens"
    out = [M.one(f"{p}{emb}.weight", "embedding"), M.one(f"{p}norm.weight", "final_norm/scale")]
    if not cfg.tie_embeddings:
        out.append(M.one(head_key, "lm_head"))
    keys = LAYER_KEYS["internlm2" if arch == "internlm2" else "llama"]
    for i in range(cfg.depth):
        lp, o = f"{p}layers.{i}.", f"layers_{i}/"
        if arch == "internlm2":
            out.append(_wqkv(f"{lp}attention.wqkv.weight", o, cfg.heads, cfg.kv_heads, hd))
        else:
            for n, h in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
                out.append(M.one(f"{lp}self_attn.{n}_proj.weight", o + f"attn/{n}/kernel",
                                 *M.heads(h)))
                if cfg.qkv_bias:
                    out.append(M.one(f"{lp}self_attn.{n}_proj.bias", o + f"attn/{n}/bias",
                                     *M.heads(h)))
        out += [M.one(f"{lp}{k}.weight", o + ours, *(o_split if ours == "attn/o/kernel" else ()))
                for ours, k in keys.items()]
    return out


def _wqkv(key: str, o: str, heads: int, kv_heads: int, hd: int) -> M.Entry:
    """InternLM2's packed wqkv [(kv * (g + 2) * hd), D]: per kv head, g q heads, k, v (row
    blocks). q comes out as [kv, g, hd, D], a view that splits the leaf's heads axis
    (`mapping.load` copies it block by block)."""
    g = heads // kv_heads

    def fwd(w):
        w = w.reshape(kv_heads, g + 2, hd, w.shape[1])
        return w[:, :g], w[:, g], w[:, g + 1]

    def back(q, k, v):
        d = q.shape[-1]
        q = q.reshape(kv_heads, g, hd, d)
        return (np.concatenate([q, k[:, None], v[:, None]], 1).reshape(-1, d),)

    return M.Entry((key,), (o + "attn/q/kernel", o + "attn/k/kernel", o + "attn/v/kernel"),
                   fwd, back)


def detect_layout(reader: Reader, arch: str) -> tuple[str, str]:
    """(body prefix, lm_head key) of the checkpoint's key layout (4.x / 5.x / plain)."""
    emb = "tok_embeddings.weight" if arch == "internlm2" else "embed_tokens.weight"
    for p in BODY_PREFIXES:
        if p + emb in reader:
            break
    else:
        raise ConversionError(f"{reader.source}: no LLM embedding found (looked for "
                              f"{[p + emb for p in BODY_PREFIXES]})")
    head = next((h for h in HEAD_KEYS if h in reader), "lm_head.weight")
    return p, head


def ignore_fn(prefix: str, head_key: str, tied: bool):
    """Keys that are not LLM weights of this checkpoint (other towers, buffers, a saved
    copy of a tied lm_head)."""
    def ignore(k: str) -> bool:
        if k.endswith(IGNORED_SUFFIXES):
            return True
        if tied and k == head_key:
            return True
        return not (k.startswith(prefix) or k in HEAD_KEYS)
    return ignore
