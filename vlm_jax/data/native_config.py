"""The native data's config helpers, without Grain / JAX / PIL (config files import them:
the grid runner builds every run's config before its first job). `vlm_jax.data.native`
re-exports them."""
from __future__ import annotations


def special_ids(vocab_size: int) -> dict[str, int]:
    """Default ids of the special tokens: the top 5 rows of the LLM vocabulary (unused
    padding rows in Qwen2/InternLM2 embeddings; the toy vocab reserves them)."""
    return {name: vocab_size - 5 + i for i, name in enumerate(
        ("boi_id", "eoi_id", "eol_id", "eos_scale_id", "image_token_id"))}


def native_data_config(**overrides):
    """The `config.data.native` block (defaults) used by configs/native.py."""
    import ml_collections as mlc
    d = dict(max_patches=0,          # 0 = 2 * data.seq_len
             max_image_tokens=256, min_image_tokens=1, num_scales=1,
             image_sizes=(64,), aspect_ratios=(1.0,))  # synthetic mixed-res source
    d.update(overrides)
    return mlc.ConfigDict(d)
