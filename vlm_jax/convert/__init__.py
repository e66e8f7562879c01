"""Hugging Face / OpenCLIP weights <-> vlm_jax params (see `api` for the functions)."""
from vlm_jax.convert.api import (convert, export_hf, export_params, load_converted,
                                 load_hf_llm, load_hf_vision, load_pretrained, save_converted)
from vlm_jax.convert.safetensors_io import ConversionError

__all__ = ["convert", "export_hf", "export_params", "load_converted", "load_hf_llm",
           "load_hf_vision", "load_pretrained", "save_converted", "ConversionError"]
