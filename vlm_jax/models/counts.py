"""Token and layer counts of the model configs, without JAX (the FLOP estimates the grid
runner orders its jobs by use them). `projector` and `vit` re-export them."""
from __future__ import annotations

import re

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def num_linear(ptype: str) -> int:
    """Number of Linear layers of a projector type (validates the name)."""
    if ptype == "linear":
        return 1
    if ptype == "pixel_shuffle":
        return 2
    m = _MLP.match(ptype)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector.type {ptype!r}; use 'linear', 'mlp<N>x_gelu' "
                         "(e.g. mlp2x_gelu) or 'pixel_shuffle'")
    return int(m.group(1))


def num_output_tokens(cfg, num_input_tokens: int) -> int:
    """Tokens the projector `cfg` makes of `num_input_tokens` features."""
    if cfg.type == "pixel_shuffle":
        return int(round(num_input_tokens * cfg.shuffle_ratio ** 2))
    return num_input_tokens


def num_patches(cfg, image_size: int | None = None) -> int:
    g = (image_size or cfg.image_size) // cfg.patch_size
    return g * g


def num_feature_tokens(cfg) -> int:
    """Tokens per image that `ViT.features` returns."""
    n = num_patches(cfg)
    if cfg.class_token and cfg.feature_select == "cls_patch":
        n += 1
    return n
