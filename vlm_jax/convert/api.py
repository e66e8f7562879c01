"""Python API of weight conversion (DESIGN.md "Weights").

- `load_hf_llm(dir) -> (LLM module, params)`: `module.apply({"params": p}, ids) -> logits`.
- `load_hf_vision(dir_or_file) -> (ViT module, params)`: `module.apply(..., pixels_nhwc)
  -> hidden states [layers+1, B, tokens, D]`; transformers CLIP or OpenCLIP weights.
- `convert(src, out)`: -> an orbax checkpoint dir (`params/` + `vlm_jax_convert.json`),
  written atomically; `export_hf(converted_dir, out)`: back to the transformers layout.
- `load_pretrained(part, path, dtype)`: the trainer's `init_from` helper.

Params are numpy arrays in the scanned layout unless `scan_layers=False`: shapes are
checked against the config first, then each tensor is mapped from the files and copied
straight into its slice of its leaf, on one thread per usable core (`mapping.load`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from vlm_jax.convert import hf_llm, hf_vision
from vlm_jax.convert import mapping as M
from vlm_jax.convert import safetensors_io as st
from vlm_jax.convert.layout import stack_layers, unstack_layers
from vlm_jax.convert.safetensors_io import ConversionError
from vlm_jax.models import layers as L

META = "vlm_jax_convert.json"
PARTS = ("llm", "vision")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found (a transformers model dir needs "
                              "config.json next to the weights)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def _np_dtype(dtype):
    return None if dtype in (None, "", "auto") else np.dtype(L.dtype_of(dtype))


def _llm_module(overrides: dict, scan_layers: bool, param_dtype=None):
    from vlm_jax.models.llm import LLM
    cfg = common.llm_config()
    cfg.update(overrides)
    cfg.scan_layers = scan_layers
    return cfg, LLM(cfg, param_dtype=param_dtype or jnp.float32)


def _vit_module(overrides: dict, scan_layers: bool, param_dtype=None):
    from vlm_jax.models.vit import ViT
    cfg = common.vit_config()
    cfg.update(overrides)
    cfg.scan_layers = scan_layers
    return cfg, ViT(cfg, param_dtype=param_dtype or jnp.float32)


# --------------------------------------------------------------------------- readers
def convert_llm(path: str, dtype=None, scan_layers: bool = True):
    """transformers dir -> (config overrides, params, meta)."""
    hf = read_json(os.path.join(path, "config.json"))
    arch = hf_llm.arch_of(hf, os.path.join(path, "config.json"))
    over = hf_llm.config_overrides(hf, os.path.join(path, "config.json"))
    reader = st.Reader(path)
    prefix, head = hf_llm.detect_layout(reader, arch)
    cfg, _ = _llm_module(over, scan_layers)
    from vlm_jax.models.llm import param_shapes
    shapes = param_shapes(cfg)
    params = M.load(reader, hf_llm.entries(cfg, arch, prefix, head), shapes,
                    scan_layers, _np_dtype(dtype),
                    hf_llm.ignore_fn(prefix, head, cfg.tie_embeddings), what=f"{arch} LLM")
    meta = dict(part="llm", arch=arch, config=over, hf_config=hf, prefix=prefix, head_key=head,
                source=os.path.abspath(path), kernel_layout=L.KERNEL_LAYOUT)
    return over, params, meta


def convert_vision(path: str, dtype=None, scan_layers: bool = True, **overrides):
    """transformers CLIP dir, or OpenCLIP file/dir -> (config overrides, params, meta)."""
    oc = None if os.path.exists(os.path.join(path, "config.json")) else hf_vision.find_openclip(path)
    if oc is not None:
        reader = hf_vision.open_reader(oc)
        cfg_json = os.path.join(os.path.dirname(oc), "open_clip_config.json")
        over = hf_vision.openclip_overrides(reader, cfg_json, **overrides)
        cfg, _ = _vit_module(over, scan_layers)
        entries, ignore, hf, prefix, arch = (hf_vision.openclip_entries(cfg),
                                             hf_vision.openclip_ignore, {}, "visual.", "openclip")
    else:
        hf = read_json(os.path.join(path, "config.json"))
        over = hf_vision.config_overrides(hf, os.path.join(path, "config.json"))
        over.update(overrides)
        reader = st.Reader(path)
        prefix = hf_vision.detect_prefix(reader)
        cfg, _ = _vit_module(over, scan_layers)
        entries, ignore, arch = hf_vision.hf_entries(cfg, prefix), hf_vision.hf_ignore(prefix), "clip"
    from vlm_jax.models.vit import param_shapes
    shapes = param_shapes(cfg)
    params = M.load(reader, entries, shapes, scan_layers,
                    _np_dtype(dtype), ignore, what=f"{arch} vision")
    meta = dict(part="vision", arch=arch, config=over, hf_config=hf, prefix=prefix,
                source=os.path.abspath(path), kernel_layout=L.KERNEL_LAYOUT)
    return over, params, meta


def load_hf_llm(path: str, dtype=None, scan_layers: bool = True):
    """(LLM module, params) from a transformers checkpoint dir (Llama, Qwen2, InternLM2,
    or a LLaVA checkpoint's language model)."""
    over, params, _ = convert_llm(path, dtype, scan_layers)
    return _llm_module(over, scan_layers, _np_dtype(dtype))[1], params


def load_hf_vision(path: str, dtype=None, scan_layers: bool = True, **overrides):
    """(ViT module, params) from a transformers CLIP dir or an OpenCLIP file/dir."""
    over, params, _ = convert_vision(path, dtype, scan_layers, **overrides)
    return _vit_module(over, scan_layers, _np_dtype(dtype))[1], params


# --------------------------------------------------------------------------- orbax dirs
def _atomic_dir(out: str, force: bool):
    """A temp dir next to `out`, and a commit function that renames it into place."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise ConversionError(f"{out}: output exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on `out`; os.mkdir honours umask.
    tmp = os.path.join(parent, f"{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)

    def commit():
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    return tmp, commit


def save_params(path: str, params: dict) -> None:
    """An orbax PyTree checkpoint of numpy `params` at `path`, written without copies.

    orbax's default numpy handler deep-copies every array and zstd-compresses every chunk,
    all leaves at once: peak memory ~2.8x the weights. Our arrays are private and not
    mutated during this synchronous save, so the copy is skipped, and chunks are stored
    uncompressed (random-looking float weights shrink ~20% at best; the safetensors we
    read are uncompressed too): tensorstore then writes straight from the arrays (+3%).
    One zarr array per leaf (no OCDBT: a params tree has a few dozen leaves) writes at
    disk speed, ~1.7x OCDBT's rate here. The result is a standard orbax checkpoint
    (`PyTreeCheckpointer().restore` reads it)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as thr
    from orbax.checkpoint._src.serialization import type_handlers as th
    registry = thr.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                          use_compression=False, use_ocdbt=False)
    ckptr = ocp.Checkpointer(handler)
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_no_ocdbt_merge_note)
    try:
        ckptr.save(path, args=ocp.args.PyTreeSave(params))
    finally:
        ckptr.close()
        absl_log.removeFilter(_no_ocdbt_merge_note)


def _no_ocdbt_merge_note(record: logging.LogRecord) -> bool:
    """Drops orbax's 'Skipping merge of OCDBT checkpoints' warning: this save writes no
    OCDBT (`use_ocdbt=False`), so there is nothing to merge, yet orbax warns on every
    `python -m vlm_jax.convert`."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def save_converted(out: str, params: dict, meta: dict, force: bool = False) -> str:
    """Writes `out/params` (orbax, scanned layout) and `out/vlm_jax_convert.json`."""
    if not _is_stacked(params):
        params = stack_layers(params)
    params = jax.tree.map(np.asarray, params)
    tmp, commit = _atomic_dir(out, force)
    try:
        save_params(os.path.join(tmp, "params"), params)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        commit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(out)


def _is_stacked(params: dict) -> bool:
    flat = M.flatten(params)
    return not any("/layers_" in "/" + k for k in flat)


def load_converted(path: str, scan_layers: bool = True, dtype=None):
    """(meta, params) of a dir written by `save_converted` (by this version: a dir of
    [in, out] kernels, from before `kernel_layout` was recorded, is refused)."""
    import orbax.checkpoint as ocp
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    if not os.path.exists(os.path.join(path, META)):
        what = ("a transformers model dir (config.json), not" if
                os.path.exists(os.path.join(path, "config.json")) else "not")
        raise ConversionError(f"{path}: {what} a dir written by `python -m vlm_jax.convert "
                              f"--hf/--openclip` (no {META}); convert it first")
    meta = read_json(os.path.join(path, META))
    if meta.get("kernel_layout") != L.KERNEL_LAYOUT:
        raise ConversionError(
            f"{os.path.join(path, META)}: written with the [in, out] kernel layout of "
            f"vlm_jax < this version (kernels are now torch's [out, in]); re-convert it: "
            f"python -m vlm_jax.convert --{'openclip' if meta.get('arch') == 'openclip' else 'hf'}"
            f" {meta.get('source', 'SOURCE')} --out {path} --force")
    params = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(path, "params")))
    params = jax.tree.map(np.asarray, params)
    dt = _np_dtype(dtype)
    if dt is not None:
        params = jax.tree.map(lambda a: a.astype(dt), params)
    return meta, params if scan_layers else unstack_layers(params)


def convert(src: str, out: str, part: str | None = None, dtype=None, force: bool = False) -> dict:
    """A transformers/OpenCLIP checkpoint -> an orbax dir. `part` ("llm" | "vision") is
    guessed from config.json when None. Returns the metadata."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    part = part or guess_part(src)
    fn = convert_llm if part == "llm" else convert_vision
    _, params, meta = fn(src, dtype)
    save_converted(out, params, meta, force)
    return meta


def guess_part(src: str) -> str:
    cfg_path = os.path.join(src, "config.json")
    if not os.path.exists(cfg_path):
        if hf_vision.find_openclip(src):
            return "vision"
        raise ConversionError(f"{src}: no config.json and no OpenCLIP weights file")
    hf = read_json(cfg_path)
    t = hf.get("model_type", "")
    if t in ("clip_vision_model", "clip"):
        return "vision"
    if t == "llava":
        raise ConversionError(f"{cfg_path}: a LLaVA checkpoint holds both towers; pass "
                              "--part llm or --part vision")
    hf_llm.arch_of(hf, cfg_path)  # raises a clear error for unknown architectures
    return "llm"


def export_hf(src: str, out: str, dtype=None, force: bool = False,
              max_shard_size: int | str = "5GB") -> str:
    """A converted dir (or a params tree via `export_params`) -> a transformers dir."""
    st.parse_size(max_shard_size, "--max-shard-size")  # fail before reading anything
    meta, params = load_converted(src, scan_layers=True)
    return export_params(params, meta, out, dtype, force, max_shard_size)


def export_params(params: dict, meta: dict, out: str, dtype=None, force: bool = False,
                  max_shard_size: int | str = "5GB") -> str:
    """Writes `out/config.json` and the weights in the checkpoint's key layout:
    `model.safetensors`, or above `max_shard_size` (transformers' rule and names) shards
    plus `model.safetensors.index.json`; tensor by tensor, the whole dir atomically."""
    st.parse_size(max_shard_size, "--max-shard-size")
    part, arch = meta["part"], meta.get("arch", "llama")
    stacked = _is_stacked(params)
    if part == "llm":
        cfg, _ = _llm_module(meta["config"], stacked)
        if arch not in ("llama", "qwen2", "internlm2", "mistral"):
            raise ConversionError(f"cannot export LLM architecture {arch!r}")
        entries = hf_llm.entries(cfg, arch, meta.get("prefix", "model."),
                                 meta.get("head_key", "lm_head.weight"))
        hf = hf_llm.hf_config(cfg, "llama" if arch == "mistral" else arch, meta.get("hf_config"))
    else:
        cfg, _ = _vit_module(meta["config"], stacked)
        prefix = meta.get("prefix", "")
        if meta.get("arch") == "openclip":
            prefix, base = "", None  # transformers 5.x CLIPVisionModel layout
        else:
            base = meta.get("hf_config")
        entries = hf_vision.hf_entries(cfg, prefix)
        hf = hf_vision.hf_config(cfg, base)
    tmp, commit = _atomic_dir(out, force)
    try:
        st.write_checkpoint(tmp, lambda: M.export(params, entries, stacked), max_shard_size,
                            _np_dtype(dtype), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        commit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(out)


# --------------------------------------------------------------------------- init_from
def load_pretrained(part: str, path: str, dtype=None, scan_layers: bool = True):
    """(config overrides, params) for `model.<vision|llm>.init_from`.

    `path`: a transformers dir, an OpenCLIP file/dir (vision) or a dir written by
    `python -m vlm_jax.convert`. Params are numpy arrays; `dtype` casts them."""
    if part not in PARTS:
        raise ValueError(f"load_pretrained: part must be one of {PARTS}, got {part!r}")
    if os.path.exists(os.path.join(path, META)):
        meta, params = load_converted(path, scan_layers, dtype)
        if meta.get("part") != part:
            raise ConversionError(f"{path}: holds a converted {meta.get('part')!r}, not {part!r}")
        return dict(meta["config"]), params
    fn = convert_llm if part == "llm" else convert_vision
    over, params, _ = fn(path, dtype, scan_layers)
    return over, params
