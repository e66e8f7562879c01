"""CLIP vision towers <-> `vlm_jax.models.vit.ViT`.

transformers `CLIPVisionModel` / `CLIPModel` / LLaVA checkpoints (keys under
`vision_model.` (4.x) or no prefix (5.x CLIPVisionModel), `vision_tower.vision_model.`
(4.x LLaVA), `vision_tower.` (5.x LLaVA as saved) or `model.vision_tower.` (5.x LLaVA in
memory)), and OpenCLIP checkpoints (`visual.*`,
q/k/v packed in `attn.in_proj_weight`; sizes from `open_clip_config.json` when present,
else inferred from the tensor shapes).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np

from vlm_jax.convert import mapping as M
from vlm_jax.convert.safetensors_io import ConversionError, Reader

HF_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.",
               "vision_tower.vision_model.", "vision_tower.", "vision_model.", "")
IGNORED = ("embeddings.position_ids",)
OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def vision_config(hf: dict) -> dict:
    return hf.get("vision_config") or hf


def config_overrides(hf: dict, source: str = "config.json") -> dict:
    """transformers CLIP vision config -> overrides of `common.vit_config()`."""
    c = vision_config(hf)
    t = c.get("model_type", "clip_vision_model")
    if t not in ("clip_vision_model", "clip"):
        raise ConversionError(f"{source}: unsupported vision model_type {t!r}; supported: "
                              "clip_vision_model (CLIP ViT), or an OpenCLIP checkpoint")
    act = c.get("hidden_act", "quick_gelu")
    return dict(variant="clip", image_size=int(c.get("image_size", 224)),
                patch_size=int(c.get("patch_size", 32)), width=int(c.get("hidden_size", 768)),
                depth=int(c.get("num_hidden_layers", 12)),
                heads=int(c.get("num_attention_heads", 12)),
                mlp_dim=int(c.get("intermediate_size", 3072)), act=act,
                norm_eps=float(c.get("layer_norm_eps", 1e-5)), pre_norm=True, class_token=True)


def hf_config(cfg, base: dict | None = None) -> dict:
    if base:
        return base
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_act": cfg.act,
            "layer_norm_eps": cfg.norm_eps, "num_channels": 3, "torch_dtype": "float32"}


def _ln(key: str, ours: str) -> list[M.Entry]:
    return [M.one(f"{key}.weight", f"{ours}/scale"), M.one(f"{key}.bias", f"{ours}/bias")]


def _dense(key: str, ours: str, fwd=None, back=None, bias=None) -> list[M.Entry]:
    """A torch Linear's weight and bias (copied as stored; `fwd`/`back` split heads)."""
    bf, bb = bias or (None, None)
    return [M.one(f"{key}.weight", f"{ours}/kernel", fwd, back),
            M.one(f"{key}.bias", f"{ours}/bias", bf, bb)]


def hf_entries(cfg, prefix: str = "vision_model.") -> list[M.Entry]:
    p = prefix
    h = cfg.heads
    qf, qb = M.heads(h)
    of, ob = M.heads_last(h)
    out = [M.one(f"{p}embeddings.class_embedding", "class_embed"),
           # the conv weight [D, 3, p, p] is our patch kernel as stored
           M.one(f"{p}embeddings.patch_embedding.weight", "patch_embed/kernel"),
           M.one(f"{p}embeddings.position_embedding.weight", "pos_embed"),
           *_ln(f"{p}pre_layrnorm", "ln_pre"), *_ln(f"{p}post_layernorm", "ln_post")]
    for i in range(cfg.depth):
        lp, o = f"{p}encoder.layers.{i}.", f"layers_{i}/"
        for n in ("q", "k", "v"):
            out += _dense(f"{lp}self_attn.{n}_proj", o + f"attn/{n}", qf, qb, M.heads(h))
        out += _dense(f"{lp}self_attn.out_proj", o + "attn/o", of, ob)
        out += _ln(f"{lp}layer_norm1", o + "ln1") + _ln(f"{lp}layer_norm2", o + "ln2")
        out += _dense(f"{lp}mlp.fc1", o + "mlp/fc1") + _dense(f"{lp}mlp.fc2", o + "mlp/fc2")
    return out


def detect_prefix(reader) -> str:
    for p in HF_PREFIXES:
        if p + "embeddings.class_embedding" in reader:
            return p
    raise ConversionError(f"{reader.source}: no CLIP vision tower found (looked for "
                          f"{[p + 'embeddings.class_embedding' for p in HF_PREFIXES]})")


def hf_ignore(prefix: str):
    def ignore(k: str) -> bool:
        return not k.startswith(prefix) or k[len(prefix):] in IGNORED or (
            prefix == "" and not k.startswith(("embeddings.", "encoder.", "pre_layrnorm",
                                               "post_layernorm")))
    return ignore


# --------------------------------------------------------------------------- OpenCLIP
def _in_proj(key: str, o: str, h: int, bias: bool) -> M.Entry:
    """OpenCLIP's packed attn.in_proj_{weight,bias} [3D, D] / [3D] -> q, k, v (three row
    blocks, each split into heads)."""
    qf, qb = M.heads(h)

    def fwd(w):
        return tuple(qf(x) for x in np.split(w, 3, axis=0))

    def back(q, k, v):
        return (np.concatenate([qb(q), qb(k), qb(v)], axis=0),)
    suffix = "bias" if bias else "kernel"
    return M.Entry((key,), tuple(o + f"attn/{n}/{suffix}" for n in "qkv"), fwd, back)


def openclip_entries(cfg) -> list[M.Entry]:
    h = cfg.heads
    of, ob = M.heads_last(h)
    out = [M.one("visual.class_embedding", "class_embed"),
           M.one("visual.conv1.weight", "patch_embed/kernel"),
           M.one("visual.positional_embedding", "pos_embed"),
           *_ln("visual.ln_pre", "ln_pre"), *_ln("visual.ln_post", "ln_post")]
    for i in range(cfg.depth):
        lp, o = f"visual.transformer.resblocks.{i}.", f"layers_{i}/"
        out += [_in_proj(f"{lp}attn.in_proj_weight", o, h, False),
                _in_proj(f"{lp}attn.in_proj_bias", o, h, True)]
        out += _dense(f"{lp}attn.out_proj", o + "attn/o", of, ob)
        out += _ln(f"{lp}ln_1", o + "ln1") + _ln(f"{lp}ln_2", o + "ln2")
        out += _dense(f"{lp}mlp.c_fc", o + "mlp/fc1") + _dense(f"{lp}mlp.c_proj", o + "mlp/fc2")
    return out


def openclip_ignore(k: str) -> bool:
    """Everything outside the visual trunk (text tower, logit scale, `visual.proj`)."""
    return not k.startswith("visual.") or k in ("visual.proj",)


def openclip_overrides(reader, config_path: str | None = None, **overrides) -> dict:
    """Sizes from `open_clip_config.json` (if any) and the tensor shapes."""
    for k in ("visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding"):
        if k not in reader:
            raise ConversionError(f"{reader.source}: not an OpenCLIP vision checkpoint "
                                  f"(missing {k!r})")
    width = reader.shape("visual.class_embedding")[0]
    patch = reader.shape("visual.conv1.weight")[-1]
    tokens = reader.shape("visual.positional_embedding")[0]
    grid = int(round((tokens - 1) ** 0.5))
    depth = len({k.split(".")[3] for k in reader.keys()
                 if k.startswith("visual.transformer.resblocks.")})
    mlp = reader.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    vc, quick = {}, False
    if config_path and os.path.exists(config_path):
        with open(config_path) as f:
            mc = json.load(f).get("model_cfg", {})
        vc, quick = mc.get("vision_cfg", {}), bool(mc.get("quick_gelu", False))
    head_width = int(vc.get("head_width", 88 if width == 1408 else 64))
    if "heads" not in overrides:
        if width % head_width:
            given = ("its open_clip_config.json" if "head_width" in vc else
                     "OpenCLIP's default; no head_width in an open_clip_config.json next to it")
            raise ConversionError(
                f"{reader.source}: width {width} is not a multiple of head_width {head_width}"
                f" ({given}): put the model's open_clip_config.json (model_cfg.vision_cfg."
                f"head_width) next to the weights")
        if "head_width" not in vc:   # the weights do not say how many heads there are
            logging.getLogger("vlm_jax.convert").warning(
                "%s: no head_width in an open_clip_config.json next to it; assuming "
                "OpenCLIP's default %d (heads = %d)", reader.source, head_width,
                width // head_width)
    out = dict(variant="clip", image_size=grid * patch, patch_size=patch, width=width,
               depth=depth, heads=width // head_width, mlp_dim=mlp,
               act="quick_gelu" if quick else "gelu", norm_eps=1e-5, pre_norm=True,
               class_token=True)
    out.update(overrides)
    return out


def find_openclip(path: str) -> str | None:
    """The OpenCLIP weights file at `path` (a file, or a dir holding one), else None."""
    if os.path.isfile(path):
        return path if not path.endswith(".json") else None
    for f in OPENCLIP_FILES:
        if os.path.exists(os.path.join(path, f)):
            return os.path.join(path, f)
    return None


class TorchReader:
    """Reader over a torch `.bin` state dict, loaded with `weights_only=True` (never
    unpickles arbitrary objects) and memory-mapped."""

    def __init__(self, path: str):
        import ml_dtypes
        import torch
        self.path = self.source = path
        self._bf16 = (torch.bfloat16, ml_dtypes.bfloat16)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
            raise ConversionError(f"{path}: cannot load as a torch state dict ({e})") from None
        self._sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        self._sd = {k.removeprefix("module."): v for k, v in self._sd.items()
                    if hasattr(v, "shape")}

    def keys(self):
        return list(self._sd)

    def __contains__(self, k):
        return k in self._sd

    def file_of(self, k):
        return self.path

    def shape(self, k):
        return tuple(self._sd[k].shape)

    def dtype(self, k):
        return self.read(k).dtype   # a view of the mapped tensor: reads no data

    @contextlib.contextmanager
    def mapped(self, k):
        """`Reader.mapped`'s interface (the state dict is already memory-mapped by torch)."""
        yield self.read(k)

    def read(self, k):
        import torch
        if k not in self._sd:
            raise ConversionError(f"{self.path}: missing tensor {k!r}")
        t = self._sd[k].detach()
        if t.dtype == self._bf16[0]:
            return t.view(torch.int16).numpy().view(self._bf16[1])
        return t.numpy()


def open_reader(path: str):
    return TorchReader(path) if path.endswith((".bin", ".pt", ".pth")) else Reader(path)
