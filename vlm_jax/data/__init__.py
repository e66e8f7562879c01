"""Data: sources (tar shards, ArrayRecord, TFDS, Parquet, synthetic), transforms, Grain
pipelines, nested data-size subsets. Entry points: `train_iterator`, `eval_batches`,
`load_tokenizer`, `source_for`, `split_for`; CLI: `python -m vlm_jax.data {stats,convert}`.
"""
from vlm_jax.data.errors import BadDataError, BadSample
from vlm_jax.data.pipeline import (data_info, eval_batches, num_image_tokens,
                                   record_positions, source_for, split_for, train_iterator)
from vlm_jax.data.subsets import Split, parse_size
from vlm_jax.data.tokenizer import load_tokenizer

__all__ = ["BadDataError", "BadSample", "Split", "data_info", "eval_batches",
           "load_tokenizer", "num_image_tokens", "parse_size", "record_positions",
           "source_for", "split_for", "train_iterator"]
