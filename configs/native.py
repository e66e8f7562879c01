"""NaViL (arXiv 2510.08565): native VLMs trained end to end, as configs.

    python -m vlm_jax.main --config configs/native.py:navil2b --workdir runs/navil2b
    python -m vlm_jax.main --config configs/native.py:run,llm=qwen2_0.5b,vit=300M ...
    python -m vlm_jax.grid run configs/native.py --root runs/navil     # the full study
    python -m vlm_jax.grid run configs/native.py:demo --root runs/nd   # toy, CPU, ~2 min

Presets (`arg`'s bare word): `run` (one run: llm x vit), `navil2b`, `demo_run` (one toy
run), `grid` (default of the grid runner: the studies below), `demo` (the toy grid).

Encoder size: a native ViT of depth d and width w has N ~= 12 d w^2 parameters (4 w^2
attention + 3 w * mlp_dim SwiGLU with mlp_dim ~= 8/3 w); every table entry below agrees
with the formula within 5% (tests/native/test_native_configs.py). NaViL-2B's encoder keeps
the paper's FFN 5888 = 4w, so its exact count (~0.83B) is above its nominal 12 d w^2 = 0.62B.

Studies (grid stages):
- `depth_width`: d 3/6/12/24/48 x w 4096/2880/2048/1472/1024 at ~600M (paired), with
  InternLM2-1.8B.
- `llm_x_vit`: LLM (Qwen2-0.5B, InternLM2-1.8B, InternLM2-7B) x encoder (75M ... 2.4B,
  doubling); analysis `optimal` applies NaViL's optimal-encoder rule to it.
- `ablation`: pretrained vs scratch LLM x modality experts vs dense (NaViL-2B sizes).

Special tokens sit in the top 5 rows of the LLM vocabulary (`data.native.special_ids`);
InternLM2's vocabulary (92544, its own specials at the top) is extended by 8 rows for them.
Real-scale runs read `data_path` (webdataset tar shards); without it they use the
synthetic source (useful for dry runs only). A pretrained LLM is `llm_dir` (a transformers
directory); its visual experts start as copies of its text weights.
"""
from __future__ import annotations

import math

import ml_collections as mlc

from configs import common

# No module-level import of vlm_jax.data / jax (grain, PIL, numpy): the grid runner imports
# config files before it starts its first job, so run_config imports them when called.

# --------------------------------------------------------------------------- size tables
# LLMs (transformers config values). vocab includes room for the 5 NaViL special tokens.
LLMS = {
    "qwen2_0.5b": dict(vocab_size=151936, width=896, depth=24, heads=14, kv_heads=2,
                       mlp_dim=4864, norm_eps=1e-6, rope_theta=1e6, max_len=32768,
                       qkv_bias=True, tie_embeddings=True, bos_id=151643, eos_id=151643,
                       pad_id=151643),
    "internlm2_1.8b": dict(vocab_size=92552, width=2048, depth=24, heads=16, kv_heads=8,
                           mlp_dim=8192, norm_eps=1e-5, rope_theta=1e6, max_len=32768,
                           bos_id=1, eos_id=2, pad_id=0),
    "internlm2_7b": dict(vocab_size=92552, width=4096, depth=32, heads=32, kv_heads=8,
                         mlp_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_len=32768,
                         bos_id=1, eos_id=2, pad_id=0),
}
LLM_PARAMS = {"qwen2_0.5b": 0.5e9, "internlm2_1.8b": 1.8e9, "internlm2_7b": 7e9}


def swiglu_dim(width: int, multiple: int = 64) -> int:
    """SwiGLU hidden size ~= 8/3 width (3 matrices of w*h = 8 w^2, like a 4w GELU MLP)."""
    return multiple * max(1, round(8 * width / 3 / multiple))


def encoder(depth: int, width: int, head_dim: int = 64, mlp_dim: int = 0) -> dict:
    heads = max(1, width // head_dim)
    if heads * head_dim != width:
        raise ValueError(f"encoder width {width} is not a multiple of head_dim {head_dim}")
    return dict(depth=depth, width=width, heads=heads, mlp_dim=mlp_dim or swiglu_dim(width))


# Nominal size -> (depth, width) with 12 d w^2 within 5% of the name.
ENCODERS = {
    "75M": encoder(24, 512),
    "150M": encoder(24, 720, head_dim=80),
    "300M": encoder(24, 1024),
    "600M": encoder(24, 1472),
    "1.2B": encoder(24, 2048),
    "2.4B": encoder(24, 2880),
    # depth x width at ~600M
    "d3_w4096": encoder(3, 4096),
    "d6_w2880": encoder(6, 2880),
    "d12_w2048": encoder(12, 2048),
    "d24_w1472": encoder(24, 1472),
    "d48_w1024": encoder(48, 1024),
    # NaViL-2B: 24 layers, width 1472, FFN 5888, 23 heads.
    "navil2b": encoder(24, 1472, mlp_dim=5888),
}
ENCODER_GRID = ("75M", "150M", "300M", "600M", "1.2B", "2.4B")
DEPTH_WIDTH = ("d3_w4096", "d6_w2880", "d12_w2048", "d24_w1472", "d48_w1024")

# Toy sizes for the CPU demo (synthetic data; the word-level tokenizer has < 100 words).
TOY_LLMS = {
    "t64": dict(vocab_size=128, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=176,
                norm_eps=1e-6, max_len=512),
    "t128": dict(vocab_size=128, width=128, depth=2, heads=4, kv_heads=2, mlp_dim=352,
                 norm_eps=1e-6, max_len=512),
}
TOY_ENCODERS = {
    "e16": encoder(2, 16, head_dim=8),
    "e32": encoder(2, 32, head_dim=16),
    "e64": encoder(2, 64, head_dim=16),
    "e128": encoder(2, 128, head_dim=32),
}


def nominal_params(depth: int, width: int) -> float:
    """NaViL's size formula N = 12 d w^2."""
    return 12.0 * depth * width * width


def parse_params(name: str) -> float:
    """"75M" -> 7.5e7, "1.2B" -> 1.2e9."""
    mult = {"M": 1e6, "B": 1e9}[name[-1]]
    return float(name[:-1]) * mult


# --------------------------------------------------------------------------- one run
def _vision(enc: dict) -> mlc.ConfigDict:
    v = common.vit_config()
    v.update(dict(variant="native", patch_size=16, act="silu", norm_eps=1e-6,
                  pre_norm=False, class_token=False, image_size=64, feature_select="patch",
                  **enc))
    v.rope_theta = 10000.0
    v.head_dim = 0
    return v


def _llm(table: dict, experts: bool, impl: str) -> mlc.ConfigDict:
    llm = common.llm_config()
    llm.update(table)
    llm.experts = experts
    llm.expert_impl = impl if experts else "masked"
    return llm


def run_config(llm: dict, enc: dict, *, experts: bool = True, expert_impl: str = "chunked",
               seq_len: int = 4096, max_image_tokens: int = 2560, max_patches: int = 0,
               num_scales: int = 1, batch_size: int = 256, steps: int = 10000,
               lr: float = 5e-5, warmup: int = 200, llm_dir: str = "",
               data_path: str = "", n: str | int = "all") -> mlc.ConfigDict:
    """One native run (NaViL's recipe: AdamW (0.9, 0.95), wd 0.05, constant lr, warmup)."""
    from vlm_jax.data import native_config as data_native   # no Grain / JAX
    from vlm_jax.data.subsets import parse_size
    c = common.base_config()
    c.model.kind = "native"
    c.model.vision = _vision(enc)
    c.model.llm = _llm(llm, experts, expert_impl)
    c.model.llm.init_from = llm_dir
    c.model.projector = mlc.ConfigDict(dict(type="pixel_shuffle", shuffle_ratio=0.5))
    ids = data_native.special_ids(c.model.llm.vocab_size)
    c.model.image_token_id = ids.pop("image_token_id")
    c.model.native = mlc.ConfigDict(ids)
    c.data.seq_len = seq_len
    c.data.packing = True
    c.data.native = data_native.native_data_config(
        max_image_tokens=max_image_tokens, num_scales=num_scales,
        max_patches=max_patches or 4 * (max_image_tokens + max_image_tokens // 4))
    if data_path:
        c.data.update(dict(name="", source="tar", path=data_path, tokenizer=llm_dir))
    c.data.n = parse_size(n)
    c.train.batch_size = batch_size
    c.train.steps = steps
    c.optim.update(dict(name="adamw", lr=lr, schedule="constant", warmup_steps=warmup,
                        b1=0.9, b2=0.95, weight_decay=0.05, trainable=("*",)))
    return c


def toy_run(llm: str = "t64", vit: str = "e32", steps: int = 40, experts: bool = True,
            packing: bool = True, expert_impl: str = "masked") -> mlc.ConfigDict:
    """A CPU-sized native run on mixed-resolution synthetic images. Expert routing is the
    masked reference by default: at toy widths it compiles faster and the FLOPs it wastes
    do not matter (pass expert_impl=chunked to exercise the efficient path)."""
    c = run_config(TOY_LLMS[llm], TOY_ENCODERS[vit], experts=experts, expert_impl=expert_impl,
                   seq_len=128, max_image_tokens=32, max_patches=192, batch_size=8,
                   steps=steps, lr=3e-3, warmup=5, n=2000)
    c.model.llm.scan_layers = False
    c.model.vision.scan_layers = False
    c.data.update(dict(name="synthetic_clean", source="synthetic", tokenizer="synthetic",
                       n=2000, eval_n=64, packing=packing))
    c.data.native.image_sizes = (32, 48, 64, 96)
    c.model.vision.image_size = 96  # synthetic render size (then resized per record)
    c.data.native.aspect_ratios = (0.5, 1.0, 2.0)
    c.train.update(dict(log_every_steps=20, checkpoint_every_secs=0.0, progress=False))
    c.optim.schedule = "cosine"
    return c


# --------------------------------------------------------------------------- grids
def _stage(name, arg, axes, **kw):
    return dict(name=name, config="", arg=arg, axes=axes, needs=kw.get("needs", {}))


def study_grid() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        name="navil",
        stages=[
            _stage("depth_width", "run,llm=internlm2_1.8b", {"vit": list(DEPTH_WIDTH)}),
            _stage("llm_x_vit", "run", {"llm": list(LLMS), "vit": list(ENCODER_GRID)}),
            _stage("ablation", "run,llm=internlm2_1.8b,vit=navil2b",
                   {"llm_init": ["pretrained", "scratch"], "experts": [True, False]}),
        ],
        analysis=[dict(cmd="optimal", stage="llm_x_vit", out="optimal", args=[])],
    ))


def demo_stages(config_file: str = "") -> list[dict]:
    """The toy native stage (tiny LLMs x 4 encoder sizes); configs/demo.py includes it
    with `config_file` pointing here."""
    st = _stage("native", "demo_run", {"llm": list(TOY_LLMS), "vit": list(TOY_ENCODERS)})
    st["config"] = config_file
    return [st]


def demo_analysis() -> list[dict]:
    return [dict(cmd="optimal", stage="native", out="native_optimal", args=[])]


def demo_grid() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(name="native_demo", stages=demo_stages(),
                               analysis=demo_analysis()))


# --------------------------------------------------------------------------- entry
def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, preset="run", llm="", vit="", llm_init="pretrained",
                         llm_dir="", experts=True, expert_impl="", steps=0,
                         batch_size=0, seq_len=0, max_image_tokens=0, num_scales=1,
                         data_path="", n="all", packing=True)
    if a.preset in ("grid", "demo"):
        c = common.base_config()
        c.grid = study_grid() if a.preset == "grid" else demo_grid()
        return c
    if a.preset == "demo_run":
        c = toy_run(a.llm or "t64", a.vit or "e32", steps=a.steps or 40, experts=a.experts,
                    packing=a.packing, expert_impl=a.expert_impl or "masked")
        if a.batch_size:
            c.train.batch_size = a.batch_size
        c.name = f"native_demo_{a.llm or 't64'}_{a.vit or 'e32'}"
        return c
    if a.preset not in ("run", "navil2b"):
        raise ValueError(f"configs/native.py: unknown preset {a.preset!r}; use run, navil2b, "
                         "demo_run, grid or demo")
    llm = a.llm or "internlm2_1.8b"
    vit = a.vit or ("navil2b" if a.preset == "navil2b" else "600M")
    if llm not in LLMS:
        raise ValueError(f"configs/native.py: unknown llm {llm!r}; use one of {sorted(LLMS)}")
    if vit not in ENCODERS:
        raise ValueError(f"configs/native.py: unknown vit {vit!r}; use one of "
                         f"{sorted(ENCODERS)}")
    if a.llm_init not in ("pretrained", "scratch"):
        raise ValueError(f"llm_init={a.llm_init!r}: use pretrained or scratch")
    kw = {}
    if a.seq_len:
        kw["seq_len"] = a.seq_len
    if a.max_image_tokens:
        kw["max_image_tokens"] = a.max_image_tokens
    c = run_config(LLMS[llm], ENCODERS[vit], experts=a.experts,
                   expert_impl=a.expert_impl or "chunked",
                   num_scales=a.num_scales, llm_dir=a.llm_dir if a.llm_init == "pretrained"
                   else "", data_path=a.data_path, n=a.n, **kw)
    if a.llm_init == "pretrained" and not a.llm_dir:
        # Convention: a converted transformers directory per LLM (override with llm_dir=).
        c.model.llm.init_from = f"pretrained/{llm}"
    c.data.packing = a.packing
    if a.steps:
        c.train.steps = a.steps
    if a.batch_size:
        c.train.batch_size = a.batch_size
    c.name = f"native_{llm}_{vit}" + ("" if a.experts else "_dense") + (
        "_scratch" if a.llm_init == "scratch" else "")
    return c


def encoder_params(name: str) -> int:
    """Exact encoder parameters of a table entry (patch 16)."""
    from vlm_jax.models.native_vit import vit_params
    return vit_params(dict(ENCODERS.get(name) or TOY_ENCODERS[name], patch_size=16))


def _check_tables():
    for name, e in ENCODERS.items():
        assert e["width"] % e["heads"] == 0 and (e["width"] // e["heads"]) % 4 == 0, name
    assert math.isclose(nominal_params(24, 1472), 624e6, rel_tol=0.01)


_check_tables()
