"""configs/native.py: sizes agree with N = 12 d w^2, grids expand, presets validate."""
import pytest

from configs import native as cn
from vlm_jax.data import native as dn
from vlm_jax.grid import expand
from vlm_jax.models.native_vit import vit_params


@pytest.mark.parametrize("name", cn.ENCODER_GRID + cn.DEPTH_WIDTH)
def test_encoders_agree_with_12dw2(name):
    e = cn.ENCODERS[name]
    nominal = cn.nominal_params(e["depth"], e["width"])
    exact = vit_params(dict(e, patch_size=16))
    assert abs(exact / nominal - 1) < 0.05, (name, exact, nominal)
    target = 600e6 if name in cn.DEPTH_WIDTH else cn.parse_params(name)
    assert abs(nominal / target - 1) < 0.05, (name, nominal, target)
    assert (e["width"] // e["heads"]) % 4 == 0  # 2D RoPE splits head dims in halves


def test_encoder_grid_doubles():
    sizes = [cn.parse_params(n) for n in cn.ENCODER_GRID]
    assert sizes[0] == 75e6 and sizes[-1] == 2.4e9
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:]))


def test_depth_width_sweep():
    got = [(cn.ENCODERS[n]["depth"], cn.ENCODERS[n]["width"]) for n in cn.DEPTH_WIDTH]
    assert got == [(3, 4096), (6, 2880), (12, 2048), (24, 1472), (48, 1024)]


def test_navil2b():
    c = cn.get_config("navil2b")
    v = c.model.vision
    assert (v.depth, v.width, v.mlp_dim, v.heads, v.patch_size) == (24, 1472, 5888, 23, 16)
    assert c.model.llm.width == 2048 and c.model.llm.depth == 24  # InternLM2-1.8B
    assert c.model.llm.experts and c.model.llm.init_from  # pretrained text LLM
    o = c.optim
    assert (o.name, o.b1, o.b2, o.weight_decay, o.lr, o.schedule, o.warmup_steps) == (
        "adamw", 0.9, 0.95, 0.05, 5e-5, "constant", 200)
    assert c.model.projector.type == "pixel_shuffle" and c.model.projector.shuffle_ratio == 0.5
    dn.spec_from_config(c)  # the budgets validate


@pytest.mark.parametrize("arg", ["run,llm=qwen2_0.5b,vit=75M", "run,llm=internlm2_7b,vit=2.4B",
                                 "run,vit=d3_w4096,experts=False,llm_init=scratch",
                                 "run,num_scales=2,max_image_tokens=1024,seq_len=2048",
                                 "demo_run,llm=t128,vit=e128"])
def test_presets_build_and_validate(arg):
    c = cn.get_config(arg)
    spec = dn.spec_from_config(c)
    assert spec.image_token_id < c.model.llm.vocab_size
    assert c.model.kind == "native" and c.optim.trainable == ("*",)
    if "experts=False" in arg:
        assert not c.model.llm.experts and c.model.llm.init_from == ""


def test_bad_args_are_clear():
    with pytest.raises(ValueError, match="unknown vit"):
        cn.get_config("run,vit=3B")
    with pytest.raises(ValueError, match="unknown llm"):
        cn.get_config("run,llm=gpt2")
    c = cn.get_config("run,seq_len=512,max_image_tokens=1024")
    with pytest.raises(ValueError, match="data.seq_len=512 cannot hold one image"):
        dn.spec_from_config(c)


def test_study_grid_expands():
    g = expand.load_grid("configs/native.py")
    stages = {r.stage for r in g.runs}
    assert stages == {"depth_width", "llm_x_vit", "ablation"}
    assert sum(r.stage == "llm_x_vit" for r in g.runs) == 3 * 6
    assert sum(r.stage == "depth_width" for r in g.runs) == 5
    assert sum(r.stage == "ablation" for r in g.runs) == 4
    assert [a.cmd for a in g.analysis] == ["optimal"]
    for r in g.runs:
        cn.get_config(r.arg)  # every run's arg builds


def test_demo_grid_expands():
    g = expand.load_grid("configs/native.py:demo")
    runs = [r for r in g.runs if r.stage == "native"]
    assert len(runs) == len(cn.TOY_LLMS) * len(cn.TOY_ENCODERS) and len(cn.TOY_ENCODERS) >= 4
    assert [a.cmd for a in g.analysis] == ["optimal"]
    for r in runs:
        c = cn.get_config(r.arg)
        dn.spec_from_config(c)
        assert c.data.source == "synthetic"


def test_importing_the_config_does_not_import_jax():
    """The grid runner imports config files before its first job: configs/native.py (and its
    grid presets) must not pull in jax, grain or PIL at import time."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; import configs.native as n; n.get_config('demo'); n.get_config('grid');"
            "print(sorted(m for m in ('jax', 'grain', 'PIL', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
