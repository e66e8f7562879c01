"""Data: sources (tar shards, ArrayRecord, TFDS, Parquet, synthetic), transforms, Grain
pipelines, nested data-size subsets. Entry points: `train_iterator`, `eval_batches`,
`load_tokenizer`, `source_for`, `split_for`; CLI: `python -m vlm_jax.data {stats,convert}`.

The names below are imported on first use (PEP 562): importing a light submodule
(`vlm_jax.data.native_config`, `vlm_jax.data.errors`) does not pull in Grain and JAX, so a
config file that needs one stays cheap to import (the grid runner imports every config
file before its first job).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BadDataError": "vlm_jax.data.errors", "BadSample": "vlm_jax.data.errors",
    "data_info": "vlm_jax.data.pipeline", "eval_batches": "vlm_jax.data.pipeline",
    "num_image_tokens": "vlm_jax.data.pipeline", "record_positions": "vlm_jax.data.pipeline",
    "source_for": "vlm_jax.data.pipeline", "split_for": "vlm_jax.data.pipeline",
    "train_iterator": "vlm_jax.data.pipeline",
    "Split": "vlm_jax.data.subsets", "parse_size": "vlm_jax.data.subsets",
    "load_tokenizer": "vlm_jax.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
