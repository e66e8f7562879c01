"""transformers LLaVA checkpoints -> a `vlm_jax.models.vlm.VLM` (vision, projector, llm).

Key layouts: 5.x `model.{vision_tower,multi_modal_projector,language_model}.*` +
`lm_head.weight`; 4.x `vision_tower.*`, `multi_modal_projector.*`,
`language_model.{model.*,lm_head.weight}`.
"""
from __future__ import annotations

import os

from vlm_jax.convert import api
from vlm_jax.convert import mapping as M
from vlm_jax.convert import safetensors_io as st
from vlm_jax.convert.safetensors_io import ConversionError

PROJ_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def projector_overrides(hf: dict, source: str) -> dict:
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{source}: projector_hidden_act {act!r} unsupported (gelu only)")
    return {"type": "mlp2x_gelu"}


def load_llava(path: str, dtype=None, scan_layers: bool = True):
    """(model overrides {"vision", "projector", "llm", "image_token_id"}, params
    {"vision", "projector", "llm"}) of a LLaVA checkpoint dir."""
    cfg_path = os.path.join(path, "config.json")
    hf = api.read_json(cfg_path)
    if hf.get("model_type") != "llava":
        raise ConversionError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not 'llava'")
    sel = hf.get("vision_feature_select_strategy", "default")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{cfg_path}: vision_feature_layer {layer!r}: one layer only")
    v_over, v_params, _ = api.convert_vision(
        path, dtype, scan_layers, feature_layer=layer,
        feature_select={"default": "patch", "full": "cls_patch"}[sel])
    l_over, l_params, _ = api.convert_llm(path, dtype, scan_layers)
    reader = st.Reader(path)
    prefix = next((p for p in PROJ_PREFIXES if p + "linear_1.weight" in reader), None)
    if prefix is None:
        raise ConversionError(f"{reader.source}: missing tensor "
                              f"{PROJ_PREFIXES[0] + 'linear_1.weight'!r} (LLaVA projector)")
    entries = []
    for i in (1, 2):
        entries += [M.one(f"{prefix}linear_{i}.weight", f"linear_{i - 1}/kernel"),
                    M.one(f"{prefix}linear_{i}.bias", f"linear_{i - 1}/bias")]
    shapes = {f"linear_{i}/kernel": reader.shape(f"{prefix}linear_{i + 1}.weight")
              for i in (0, 1)}   # torch's [out, in]: our kernel layout
    shapes.update({f"linear_{i}/bias": reader.shape(f"{prefix}linear_{i + 1}.bias")
                   for i in (0, 1)})
    p_params = M.load(reader, entries, shapes, False, api._np_dtype(dtype),
                      lambda k: not k.startswith(prefix), what="LLaVA projector")
    over = {"vision": v_over, "llm": l_over, "projector": projector_overrides(hf, cfg_path),
            "image_token_id": int(hf.get("image_token_index", hf.get("image_token_id", 0)))}
    return over, {"vision": v_params, "projector": p_params, "llm": l_params}
