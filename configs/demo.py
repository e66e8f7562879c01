"""The embedded demo: the bigger-encoders study at toy scale, on CPU, in minutes.

    python -m vlm_jax.grid run configs/demo.py --root runs/demo --parallel 2    # the study
    python -m vlm_jax.grid run configs/demo.py:tiny --root runs/tiny            # test preset
    python -m vlm_jax.main --config configs/demo.py:run,vit=M,llm=S --workdir runs/x

Grid presets (`get_config("grid")`, the default of `python -m vlm_jax.grid run`):
- `grid`: (1) pretrain 3 tiny ViTs (S/M/L) contrastively (CLIP loss, kind "clip") on
  synthetic image-caption pairs and 2 tiny LMs (S/M, kind "lm") on the captions; (2) freeze
  them and train only the 2-layer GELU MLP projector on vit x llm x n (10 data sizes,
  512..5120 in steps of 512 like the study's 1M..10M) x data (clean / noisy captions),
  LLaVA-1.5 stage-1 recipe scaled down (one epoch, cosine lr 1e-3, 3% warmup, wd 0,
  "plain" template, loss on caption tokens), eval loss on a held-out split; (3) fit the
  scaling law and write the report (vlm_jax.analysis).
  With `sweep=1` (default) the data-size axis runs as one WSD sweep per (vit, llm, data)
  (vlm_jax.grid.sweep) and `feature_cache=1` reuses frozen-encoder features; `sweep=0,
  feature_cache=0` turns both off (benchmarks/grid.py compares the two); `decay=F` and
  `decay_shape=linear|1-sqrt` set the sweep's decay: default the last 20 % of each run,
  linear (10 %, 1-sqrt was measured within 1 % of separate cosine runs too; docs/grid.md).
- `tiny`: the same stages with 2 ViTs, 1 LM, 2 sizes, clean data, 1 native run, a few
  steps each: the test suite's preset (8 runs).

Single-run presets (`run`, `lm_run`, `clip_run`) are ordinary trainer configs.
"""
from __future__ import annotations

import os

import ml_collections as mlc

from configs import common

# --------------------------------------------------------------------------- sizes
IMAGE_SIZE = 32
PATCH = 8
SEQ_LEN = 24          # caption tokens (synthetic captions are <= 21 words + bos/eos)
VOCAB = 64            # >= the synthetic tokenizer's vocabulary (61)

VIT = {  # tiny CLIP ViTs of increasing size (86M/304M/632M/1B in the paper)
    "S": dict(width=32, depth=2, heads=2, mlp_dim=64),
    "M": dict(width=48, depth=3, heads=3, mlp_dim=96),
    "L": dict(width=64, depth=4, heads=4, mlp_dim=128),
    "XL": dict(width=96, depth=4, heads=4, mlp_dim=192),
}
LLM = {  # tiny Llama-style LMs (Vicuna-7B/13B in the paper)
    "S": dict(width=32, depth=2, heads=2, kv_heads=2, mlp_dim=64),
    "M": dict(width=64, depth=3, heads=4, kv_heads=4, mlp_dim=128),
    "L": dict(width=96, depth=4, heads=4, kv_heads=4, mlp_dim=192),
}
DATA = {"clean": "synthetic_clean", "noisy": "synthetic_noisy"}

# Grid presets: axis values and step budgets.
PRESETS = {
    # data sizes 512..5120 in steps of 512: the compositional study's 1M..10M in steps of 1M
    "grid": dict(vits=("S", "M", "L"), llms=("S", "M"),
                 sizes=tuple(512 * k for k in range(1, 11)), data=("clean", "noisy"),
                 clip_steps=120, lm_steps=120, batch=32),
    "tiny": dict(vits=("S", "M"), llms=("S",), sizes=(64, 128), data=("clean",),
                 clip_steps=8, lm_steps=8, batch=16),
}
GRID_PRESETS = tuple(PRESETS)
RUN_PRESETS = ("run", "lm_run", "clip_run")


def _defaults() -> dict:
    return dict(preset="grid", vit="M", llm="S", n=512, data="clean", steps=0, batch=32,
                sweep=True, feature_cache=True, native=True, eval_n=256,
                decay=0.2, decay_shape="linear")


def _check(name: str, value: str, table) -> None:
    if value not in table:
        raise ValueError(f"{name}={value!r}: valid values are {sorted(table)}")


# --------------------------------------------------------------------------- single runs
def _base(a) -> mlc.ConfigDict:
    c = common.base_config()
    c.data.tokenizer = "synthetic"
    c.data.seq_len = SEQ_LEN
    c.data.eval_n = a.eval_n
    c.train.batch_size = a.batch
    c.train.progress = False
    c.train.log_every_steps = 5
    c.train.checkpoint_every_secs = 120.0
    c.model.llm.update(vocab_size=VOCAB, max_len=256, bos_id=1, eos_id=2, pad_id=0,
                       scan_layers=False)
    c.model.vision.update(image_size=IMAGE_SIZE, patch_size=PATCH, act="gelu",
                          scan_layers=False)
    return c


def _vit(c, size: str) -> None:
    _check("vit", size, VIT)
    c.model.vision.update(VIT[size])


def _llm(c, size: str) -> None:
    _check("llm", size, LLM)
    c.model.llm.update(LLM[size])


def clip_run(a) -> mlc.ConfigDict:
    """Contrastive pretraining of a tiny ViT with a small text tower (CLIP loss)."""
    c = _base(a)
    c.name = f"demo_clip_{a.vit}"
    c.model.kind = "clip"
    _vit(c, a.vit)
    c.model.clip.update(loss="clip", embed_dim=32, text_width=32, text_depth=2,
                        text_heads=2, text_max_len=SEQ_LEN)
    c.data.name = "synthetic_clean"
    c.data.n = 4096
    c.train.steps = a.steps or 120
    # lr 1e-3: at 3e-3 the M and L towers fell to chance (eval loss ln 32) or a plateau for
    # some seeds (2 and 1 of 4); at 1e-3 all of S/M/L learn for seeds 0-3, bigger lower
    # (mean eval 2.14 / 2.06 / 1.94)
    c.optim.update(lr=1e-3, schedule="cosine", warmup_frac=0.05, weight_decay=0.05,
                   trainable=("*",))
    return c


def lm_run(a) -> mlc.ConfigDict:
    """A tiny LM pretrained on the synthetic captions (the demo's "Vicuna")."""
    c = _base(a)
    c.name = f"demo_lm_{a.llm}"
    c.model.kind = "lm"
    _llm(c, a.llm)
    c.data.name = "synthetic_clean"
    c.data.n = 4096
    c.train.steps = a.steps or 120
    c.optim.update(lr=3e-3, schedule="cosine", warmup_frac=0.05, weight_decay=0.05,
                   trainable=("*",))
    return c


def run(a) -> mlc.ConfigDict:
    """One point of the projector grid: frozen ViT + frozen LM, trainable MLP projector,
    LLaVA-1.5 stage-1 recipe: one epoch over `n` pairs, cosine lr 1e-3, 3% warmup, wd 0."""
    c = _base(a)
    _check("data", a.data, DATA)
    c.name = f"demo_vit{a.vit}_llm{a.llm}_{a.data}_n{a.n}"
    c.model.kind = "vlm"
    _vit(c, a.vit)
    _llm(c, a.llm)
    c.model.projector.type = "mlp2x_gelu"
    c.data.name = DATA[a.data]
    c.data.n = a.n
    c.train.steps = a.steps or max(1, a.n // a.batch)     # one epoch
    c.train.feature_cache = a.feature_cache
    # the eval split in one batch (the token-mean loss does not depend on the batching);
    # the feature cache encodes its images in batches of this size too
    c.train.eval_batch_size = a.eval_n
    c.optim.update(lr=1e-3, schedule="cosine", warmup_frac=0.03, weight_decay=0.0,
                   trainable=("projector",))
    # the WSD sweep's decay (`sweep=1`): its fraction of each run and its shape
    c.optim.update(decay_frac=a.decay, decay_shape=a.decay_shape)
    return c


# --------------------------------------------------------------------------- the grid
def _native(a) -> tuple[list[dict], list[dict]]:
    """The toy native-VLM stages and analysis of configs/native.py (`demo_stages`,
    `demo_analysis`); the `tiny` preset keeps one run of a few steps and no analysis (the
    optimal-encoder rule needs several encoders and LLMs)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native.py")
    if not a.native or not os.path.exists(path):
        return [], []
    import importlib.util
    spec = importlib.util.spec_from_file_location("_demo_native_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "demo_stages"):
        return [], []
    stages = [dict(s) for s in mod.demo_stages(path)]
    if a.preset == "tiny":
        for s in stages:
            s["arg"] = f"{s['arg']},steps=4,batch_size=4"
            s["axes"] = {k: list(v)[:1] for k, v in s["axes"].items()}
        return stages, []
    return stages, [dict(x) for x in mod.demo_analysis()]


def grid(a) -> mlc.ConfigDict:
    p = PRESETS[a.preset]
    b = f"batch={p['batch']},eval_n={a.eval_n}"
    d = _defaults()
    decay = "".join(f",{k}={a[k]}" for k in ("decay", "decay_shape") if a[k] != d[k])
    stages = [
        dict(name="vit", arg=f"clip_run,steps={p['clip_steps']},{b}",
             axes={"vit": list(p["vits"])}),
        dict(name="lm", arg=f"lm_run,steps={p['lm_steps']},{b}",
             axes={"llm": list(p["llms"])}),
        dict(name="grid", arg=f"run,{b},feature_cache={int(a.feature_cache)}{decay}",
             # data first: the clean and noisy runs of one (vit, llm) compile the same
             # programs, and this order keeps them out of the same parallel wave, so the
             # second one finds them in the shared compilation cache.
             axes={"data": list(p["data"]), "vit": list(p["vits"]), "llm": list(p["llms"]),
                   "n": list(p["sizes"])},
             needs={"model.vision.init_from": "vit/vit={vit}",
                    "model.llm.init_from": "lm/llm={llm}"},
             sweep="wsd" if a.sweep else "", sweep_axis="n"),
    ]
    native_stages, native_analysis = _native(a)
    stages += native_stages
    analysis = [
        dict(cmd="fit", stage="grid", out="fit", args=["--group-cols", "llm,data"]),
    ] + native_analysis
    c = mlc.ConfigDict()
    c.grid = mlc.ConfigDict(dict(name=f"demo_{a.preset}", stages=stages, analysis=analysis))
    return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    # "vit=M,llm=S" (a run's point, no preset) means that run, not the grid
    a = common.parse_arg(common.imply_preset(arg, ("vit", "llm", "n", "data")), **_defaults())
    if a.preset in GRID_PRESETS:
        return grid(a)
    if a.preset == "run":
        return run(a)
    if a.preset == "lm_run":
        return lm_run(a)
    if a.preset == "clip_run":
        return clip_run(a)
    raise ValueError(f"configs/demo.py: unknown preset {a.preset!r}; grids: "
                     f"{list(GRID_PRESETS)}, single runs: {list(RUN_PRESETS)}")
