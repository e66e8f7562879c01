"""Vision encoder sizes: name -> overrides of `common.vit_config()`.

CLIP ViTs of the compositional study (Li et al. 2024: 86M / 304M / 632M / 1.01B) with the
hyper-parameters of their released checkpoints (OpenAI CLIP B/16, L/14, L/14-336; OpenCLIP
H/14 and g/14 trained on LAION-2B, which use exact GELU), and tiny sizes for the demo grid
and tests (32 px, patch 8: 16 patch tokens).
"""
from __future__ import annotations

from configs import common
from configs.models import lookup

_CLIP = dict(variant="clip", class_token=True, pre_norm=True, norm_eps=1e-5)

SIZES: dict[str, dict] = {
    "B16": dict(_CLIP, image_size=224, patch_size=16, width=768, depth=12, heads=12,
                mlp_dim=3072, act="quick_gelu"),
    "L14": dict(_CLIP, image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                mlp_dim=4096, act="quick_gelu"),
    "L14_336": dict(_CLIP, image_size=336, patch_size=14, width=1024, depth=24, heads=16,
                    mlp_dim=4096, act="quick_gelu"),
    "H14": dict(_CLIP, image_size=224, patch_size=14, width=1280, depth=32, heads=16,
                mlp_dim=5120, act="gelu"),
    "g14": dict(_CLIP, image_size=224, patch_size=14, width=1408, depth=40, heads=16,
                mlp_dim=6144, act="gelu"),
    # Demo / test sizes.
    "S": dict(_CLIP, image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=256,
              act="gelu"),
    "M": dict(_CLIP, image_size=32, patch_size=8, width=96, depth=4, heads=4, mlp_dim=384,
              act="gelu"),
    "L": dict(_CLIP, image_size=32, patch_size=8, width=128, depth=6, heads=4, mlp_dim=512,
              act="gelu"),
    "XL": dict(_CLIP, image_size=32, patch_size=8, width=192, depth=8, heads=6, mlp_dim=768,
               act="gelu"),
}

# Published parameter counts of the vision towers (the paper's sizes).
PUBLISHED = {"B16": 86e6, "L14": 304e6, "L14_336": 304e6, "H14": 632e6, "g14": 1.01e9}


def get(name: str):
    """`common.vit_config()` with the overrides of ViT size `name`."""
    return lookup(SIZES, name, common.vit_config(), "configs/models/vit.py")
