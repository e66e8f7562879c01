"""CLIP / OpenCLIP vision conversion parity against transformers' CLIPVisionModel."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.convert import hf_tiny
from vlm_jax import convert
from vlm_jax.convert import safetensors_io as st
from vlm_jax.convert.layout import unstack_layers

TOL = 1e-4


def pixels(size, seed=0):
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def hf_hidden(m, px, interpolate=False):
    with torch.no_grad():
        out = m(torch.tensor(px.transpose(0, 3, 1, 2)), output_hidden_states=True,
                interpolate_pos_encoding=interpolate)
    return np.stack([h.numpy() for h in out.hidden_states])


def ours(mod, params, px):
    return np.asarray(jax.jit(lambda p, x: mod.apply({"params": p}, x))(params, jnp.asarray(px)))


def test_clip_hidden_states_and_features_both_layouts(tmp_path):
    m = hf_tiny.clip_vision(tmp_path)
    mod, params = convert.load_hf_vision(str(tmp_path))
    px = pixels(32)
    ref = hf_hidden(m, px)
    f = jax.jit(lambda p, x: (mod.apply({"params": p}, x),
                              mod.apply({"params": p}, x, method=mod.features),
                              mod.apply({"params": p}, x, method=mod.pooled)))
    got, feats, pooled = map(np.asarray, f(params, jnp.asarray(px)))
    assert got.shape == ref.shape == (4, 2, 17, 64)
    assert np.abs(got - ref).max() <= TOL
    np.testing.assert_allclose(feats, ref[-2][:, 1:], atol=TOL)
    with torch.no_grad():
        ref_pool = m(torch.tensor(px.transpose(0, 3, 1, 2))).pooler_output.numpy()
    np.testing.assert_allclose(pooled, ref_pool, atol=TOL)
    # Unscanned: the same tensors, one subtree per layer (tests/models checks the model
    # computes the same in both layouts).
    mod_u, params_u = convert.load_hf_vision(str(tmp_path), scan_layers=False)
    assert not mod_u.cfg.scan_layers and "layers_2" in params_u and "layers" not in params_u
    assert jax.tree.structure(params_u) == jax.tree.structure(unstack_layers(params))
    jax.tree.map(np.testing.assert_array_equal, params_u, unstack_layers(params))


def test_clip_gelu_other_resolution(tmp_path):
    m = hf_tiny.clip_vision(tmp_path, hidden_act="gelu")
    mod, params = convert.load_hf_vision(str(tmp_path))
    assert mod.cfg.act == "gelu"
    px = pixels(48, seed=1)                     # 6x6 patches instead of the trained 4x4
    ref = hf_hidden(m, px, interpolate=True)
    assert np.abs(ours(mod, params, px) - ref).max() <= TOL


def openclip_state(hf_dir):
    """OpenCLIP's key layout written from a transformers CLIP vision checkpoint."""
    r = st.Reader(str(hf_dir))
    g = lambda k: r.read(k)  # transformers 5.x: no "vision_model." prefix
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    out = {"visual.class_embedding": g("embeddings.class_embedding"),
           "visual.conv1.weight": g("embeddings.patch_embedding.weight"),
           "visual.positional_embedding": g("embeddings.position_embedding.weight"),
           "visual.proj": np.zeros((cfg["hidden_size"], 8), np.float32),
           "logit_scale": np.ones((), np.float32),
           "token_embedding.weight": np.zeros((10, 8), np.float32)}
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            out[f"visual.{a}.{s}"] = g(f"{b}.{s}")
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for s in ("weight", "bias"):
            out[p + f"attn.in_proj_{s}"] = np.concatenate(
                [g(q + f"self_attn.{n}_proj.{s}") for n in "qkv"], 0)
            out[p + f"attn.out_proj.{s}"] = g(q + f"self_attn.out_proj.{s}")
            out[p + f"ln_1.{s}"] = g(q + f"layer_norm1.{s}")
            out[p + f"ln_2.{s}"] = g(q + f"layer_norm2.{s}")
            out[p + f"mlp.c_fc.{s}"] = g(q + f"mlp.fc1.{s}")
            out[p + f"mlp.c_proj.{s}"] = g(q + f"mlp.fc2.{s}")
    return out


def test_openclip_safetensors_and_bin(tmp_path):
    m = hf_tiny.clip_vision(tmp_path / "hf", hidden_act="gelu", num_attention_heads=2)
    sd = openclip_state(tmp_path / "hf")
    os.makedirs(tmp_path / "oc")
    st.write(str(tmp_path / "oc" / "open_clip_model.safetensors"), sd)
    json.dump({"model_cfg": {"vision_cfg": {"width": 64, "layers": 3, "head_width": 32,
                                            "patch_size": 8, "image_size": 32}}},
              open(tmp_path / "oc" / "open_clip_config.json", "w"))
    px = pixels(32, seed=2)
    ref = hf_hidden(m, px)
    mod, params = convert.load_hf_vision(str(tmp_path / "oc"))
    assert (mod.cfg.heads, mod.cfg.act, mod.cfg.image_size) == (2, "gelu", 32)
    assert np.abs(ours(mod, params, px) - ref).max() <= TOL
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
               tmp_path / "oc.bin")
    mod2, params2 = convert.load_hf_vision(str(tmp_path / "oc.bin"), heads=2)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # OpenCLIP -> converted dir -> transformers layout equals the original HF weights.
    convert.convert(str(tmp_path / "oc.bin"), str(tmp_path / "ck"), part="vision")
    convert.export_hf(str(tmp_path / "ck"), str(tmp_path / "back"))
    ra, rb = st.Reader(str(tmp_path / "hf")), st.Reader(str(tmp_path / "back"))
    assert sorted(rb.keys()) == sorted(k for k in ra.keys() if "position_ids" not in k)
    for k in rb.keys():
        np.testing.assert_array_equal(ra.read(k), rb.read(k))


def test_vision_round_trip_and_errors(tmp_path):
    hf_tiny.clip_vision(tmp_path / "hf")
    meta = convert.convert(str(tmp_path / "hf"), str(tmp_path / "ck"))
    assert meta["part"] == "vision"
    convert.export_hf(str(tmp_path / "ck"), str(tmp_path / "back"))
    ra, rb = st.Reader(str(tmp_path / "hf")), st.Reader(str(tmp_path / "back"))
    for k in rb.keys():
        assert ra.read(k).tobytes() == rb.read(k).tobytes(), k
    over, p = convert.load_pretrained("vision", str(tmp_path / "ck"), scan_layers=False)
    assert over["width"] == 64 and "layers_2" in p
    # transformers 4.x layout ("vision_model." prefix) gives the same params.
    os.makedirs(tmp_path / "v4")
    st.write(str(tmp_path / "v4" / "model.safetensors"),
             {"vision_model." + k: ra.read(k) for k in ra.keys()})
    os.link(tmp_path / "hf" / "config.json", tmp_path / "v4" / "config.json")
    _, p4 = convert.load_hf_vision(str(tmp_path / "v4"), scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, p, p4)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    json.dump(dict(cfg, model_type="siglip_vision_model"), open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(convert.ConversionError, match="config.json: unsupported vision"):
        convert.load_hf_vision(str(tmp_path / "hf"))
    json.dump(dict(cfg, num_attention_heads=8, hidden_size=72), open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(convert.ConversionError, match="model.safetensors: tensor 'embeddings.class_embedding' of shape .64,.*expects .72,."):
        convert.load_hf_vision(str(tmp_path / "hf"))
