"""LLM sizes: name -> overrides of `common.llm_config()`.

Llama family checkpoints used by the two studies (hyper-parameters of their released
`config.json`), and tiny sizes for the demo grid and tests.
"""
from __future__ import annotations

from configs import common
from configs.models import lookup

_LLAMA = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, qkv_bias=False,
              tie_embeddings=False, max_len=4096, bos_id=1, eos_id=2, pad_id=0)
_QWEN2 = dict(norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, max_len=32768,
              bos_id=151643, eos_id=151643, pad_id=151643)
_INTERNLM2 = dict(vocab_size=92544, norm_eps=1e-5, rope_theta=1e6, qkv_bias=False,
                  tie_embeddings=False, max_len=32768, bos_id=1, eos_id=2, pad_id=2)

SIZES: dict[str, dict] = {
    "vicuna7b": dict(_LLAMA, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008),
    "vicuna13b": dict(_LLAMA, width=5120, depth=40, heads=40, kv_heads=40, mlp_dim=13824),
    "llama2_7b": dict(_LLAMA, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008),
    "qwen2_0.5b": dict(_QWEN2, vocab_size=151936, width=896, depth=24, heads=14, kv_heads=2,
                       mlp_dim=4864, tie_embeddings=True),
    "qwen2_1.5b": dict(_QWEN2, vocab_size=151936, width=1536, depth=28, heads=12, kv_heads=2,
                       mlp_dim=8960, tie_embeddings=True),
    "qwen2_7b": dict(_QWEN2, vocab_size=152064, width=3584, depth=28, heads=28, kv_heads=4,
                     mlp_dim=18944, tie_embeddings=False),
    "internlm2_1.8b": dict(_INTERNLM2, width=2048, depth=24, heads=16, kv_heads=8,
                           mlp_dim=8192),
    "internlm2_7b": dict(_INTERNLM2, width=4096, depth=32, heads=32, kv_heads=8,
                         mlp_dim=14336),
    # Demo / test sizes (vocab fits the synthetic word-level tokenizer).
    "S": dict(vocab_size=512, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=192,
              max_len=512, tie_embeddings=True),
    "M": dict(vocab_size=512, width=128, depth=4, heads=4, kv_heads=2, mlp_dim=384,
              max_len=512, tie_embeddings=True),
    "L": dict(vocab_size=512, width=192, depth=6, heads=6, kv_heads=2, mlp_dim=512,
              max_len=512, tie_embeddings=True),
}

# Published parameter counts (from the model cards / safetensors metadata).
PUBLISHED = {
    "vicuna7b": 6_738_415_616, "llama2_7b": 6_738_415_616, "vicuna13b": 13_015_864_320,
    "qwen2_0.5b": 494_032_768, "qwen2_1.5b": 1_543_714_304, "qwen2_7b": 7_615_616_512,
    "internlm2_1.8b": 1_889_110_016, "internlm2_7b": 7_737_708_544,
}


def get(name: str):
    """`common.llm_config()` with the overrides of LLM size `name`."""
    return lookup(SIZES, name, common.llm_config(), "configs/models/llm.py")
