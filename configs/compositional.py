"""Compositional VLMs: "Are Bigger Encoders Always Better in Vision Large Models?"
(Li et al., arXiv 2408.00620) as a grid.

    python -m vlm_jax.grid run configs/compositional.py --root gs://.../comp --launcher tpu ...
    python -m vlm_jax.main --config configs/compositional.py:run,vit=L14,llm=vicuna7b,data=cc12m,n=3M \
        --workdir runs/x

A frozen CLIP ViT (B/16, L/14, H/14, g/14: 86M/304M/632M/1.01B) feeds a trainable 2-layer
GELU MLP projector into a frozen Vicuna (7B/13B). Data: 1M..10M pairs (steps of 1M) of
CC12M or LAION-400M; metric: eval loss on a held-out split of each source.
Recipe where the paper is silent, LLaVA-1.5 stage 1: penultimate-layer patch features
without CLS, `mlp2x_gelu`, lr 1e-3 cosine with 3% warmup, wd 0, batch 256, bf16, one
epoch, "plain" template (`<image> caption</s>`), loss on caption tokens only.

Presets: `grid` (default; `sweep=1` trains each data-size axis as one WSD sweep with short
decays, `sweep=0` gives every point its own cosine run as in the paper), `run` (one point;
also implied by an ARG that sets vit/llm/data/n without naming a preset).
Weights: `init_from` = `$VLM_JAX_WEIGHTS/<name>` (transformers / OpenCLIP checkpoints, see
`python -m vlm_jax.convert`); data: `$VLM_JAX_DATA` (configs/datasets.py).
"""
from __future__ import annotations

import os

import ml_collections as mlc

from configs import common

# CLIP / OpenCLIP vision towers (transformers CLIPVisionConfig numbers).
VIT = {
    "B16": dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                act="quick_gelu", weights="openai/clip-vit-base-patch16"),
    "L14": dict(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                act="quick_gelu", weights="openai/clip-vit-large-patch14"),
    "H14": dict(patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120,
                act="gelu", weights="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "g14": dict(patch_size=14, width=1408, depth=40, heads=16, mlp_dim=6144,
                act="gelu", weights="laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
}
LLM = {  # Vicuna v1.5 (Llama-2 architecture)
    "vicuna7b": dict(width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008,
                     vocab_size=32000, weights="lmsys/vicuna-7b-v1.5"),
    "vicuna13b": dict(width=5120, depth=40, heads=40, kv_heads=40, mlp_dim=13824,
                      vocab_size=32000, weights="lmsys/vicuna-13b-v1.5"),
}
DATA = ("cc12m", "laion400m")
SIZES = tuple(f"{i}M" for i in range(1, 11))
BATCH = 256


def _weights(name: str) -> str:
    return os.path.join(os.environ.get("VLM_JAX_WEIGHTS", "weights"), name.split("/")[-1])


def _n(value: str) -> int:
    v = str(value).strip().upper()
    mult = {"K": 10**3, "M": 10**6}.get(v[-1:], 1)
    return int(float(v.rstrip("KM")) * mult)


def run(a) -> mlc.ConfigDict:
    for field, table in (("vit", VIT), ("llm", LLM), ("data", DATA)):
        if a[field] not in table:
            raise ValueError(f"{field}={a[field]!r}: valid values are {list(table)}")
    c = common.base_config()
    c.name = f"comp_{a.vit}_{a.llm}_{a.data}_{a.n}"
    c.model.kind = "vlm"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    v = dict(VIT[a.vit])
    c.model.vision.update(image_size=224, feature_layer=-2, feature_select="patch",
                          init_from=_weights(v.pop("weights")), **v)
    m = dict(LLM[a.llm])
    c.model.llm.update(init_from=_weights(m.pop("weights")), max_len=4096, **m)
    c.model.projector.type = "mlp2x_gelu"
    c.data.name = a.data
    c.data.n = _n(a.n)
    c.data.eval_n = a.eval_n
    c.data.tokenizer = c.model.llm.init_from
    c.data.template = "plain"
    c.data.seq_len = a.seq_len
    c.data.num_workers = 8
    c.train.batch_size = a.batch
    c.train.steps = a.steps or max(1, _n(a.n) // a.batch)          # one epoch
    c.train.eval_every_steps = 0
    c.train.checkpoint_every_secs = 1800.0
    c.train.feature_cache = a.feature_cache
    c.train.progress = True
    c.optim.update(name="adamw", lr=1e-3, schedule="cosine", warmup_frac=0.03,
                   weight_decay=0.0, trainable=("projector",))
    c.model.vision.remat = "full"
    c.model.llm.remat = "full"
    return c


def grid(a) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.grid = mlc.ConfigDict(dict(
        name="compositional",
        stages=[dict(name="projector", arg=f"run,feature_cache={int(a.feature_cache)}",
                     axes={"vit": list(VIT), "llm": list(LLM), "data": list(DATA),
                           "n": list(SIZES)},
                     sweep="wsd" if a.sweep else "", sweep_axis="n")],
        analysis=[dict(cmd="fit", stage="projector", out="fit",
                       args=["--group-cols", "llm,data"])],
    ))
    return c


RUN_KEYS = ("vit", "llm", "data", "n")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """`grid` (default) or `run`; an ARG that sets a run's point (vit/llm/data/n) and names
    no preset is one run (`compositional.py:vit=L14,llm=vicuna7b,data=cc12m,n=3M`, as in
    DESIGN.md), not the whole grid with those values ignored."""
    a = common.parse_arg(common.imply_preset(arg, RUN_KEYS), preset="grid", vit="L14",
                         llm="vicuna7b", data="cc12m", n="1M", eval_n=10000, seq_len=96,
                         batch=BATCH, steps=0, sweep=True, feature_cache=True)
    if a.preset == "grid":
        return grid(a)
    if a.preset == "run":
        return run(a)
    raise ValueError(f"configs/compositional.py: unknown preset {a.preset!r}; use grid or run")
