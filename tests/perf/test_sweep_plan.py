"""WSD sweep planning: one stable run + branched decays, checks and costs."""
import textwrap

import ml_collections as mlc
import pytest

from vlm_jax.grid import expand, sweep

_CFG = textwrap.dedent('''
    from configs import common

    def get_config(arg=None):
        a = common.parse_arg(arg, n=100, llm="S", lr=1e-3, preset="")
        c = common.base_config()
        c.data.n = a.n
        c.train.batch_size = 4
        c.train.steps = a.n // 4
        c.optim.lr = a.lr
        c.optim.warmup_frac = 0.1
        c.optim.decay_frac = 0.2
        c.model.llm.width = 32 if a.llm == "S" else 64
        return c
''')


def _runs(tmp_path, axes, arg=""):
    path = tmp_path / "cfg.py"
    path.write_text(_CFG)
    grid = {"stages": [dict(name="sw", arg=arg, axes=axes)]}
    return expand.expand(grid, str(path)).runs


def test_plan_stable_and_branches(tmp_path):
    runs = _runs(tmp_path, {"llm": ["S", "M"], "n": [400, 100, 200]})
    items = sweep.plan_sweep(runs, root="/r")
    assert len(items) == 6
    by = {i.name: i for i in items}
    st = by["sw/llm=S,n=400"]
    assert st.role == "stable" and st.steps == 100
    ov = dict(st.overrides)
    # warmup of the smallest run (25 steps * 0.1 -> 2), decay starts: 25-5=20, 50-10=40
    assert ov["optim.schedule"] == "wsd" and ov["optim.warmup_steps"] == 2
    assert ov["train.checkpoint_steps"] == (20, 40)
    assert "--config.train.checkpoint_steps=(20, 40)" in st.cli_overrides()
    cfg = st.apply(expand.build_config(st.run.config_file, st.run.arg))
    assert cfg.train.checkpoint_steps == (20, 40) and cfg.optim.schedule == "wsd"
    b = by["sw/llm=S,n=100"]
    assert b.role == "branch" and b.branch_step == 20 and b.steps == 25
    assert dict(b.overrides)["train.branch_from"] == f"/r/{st.run.workdir}:20"
    assert b.apply(expand.build_config(b.run.config_file, b.run.arg)).train.branch_from == \
        f"/r/{st.run.workdir}:20"
    assert b.depends_on == ("sw/llm=S,n=400",)
    assert by["sw/llm=M,n=200"].depends_on == ("sw/llm=M,n=400",)
    # order: every branch comes after its stable run
    pos = {i.name: k for k, i in enumerate(items)}
    for i in items:
        for d in i.depends_on:
            assert pos[d] < pos[i.name]
    cost = sweep.sweep_cost(items)
    assert cost["steps_separate"] == 2 * (25 + 50 + 100)
    assert cost["steps_sweep"] == 2 * (100 + 5 + 10)


def test_single_run_group(tmp_path):
    (item,) = sweep.plan_sweep(_runs(tmp_path, {"n": [100]}))
    assert item.role == "single" and item.depends_on == ()


def test_errors(tmp_path):
    with pytest.raises(sweep.SweepError, match="no axis 'n'"):
        sweep.plan_sweep(_runs(tmp_path, {"llm": ["S", "M"]}))
    with pytest.raises(sweep.SweepError, match="supported sweeps"):
        sweep.plan_sweep(_runs(tmp_path, {"n": [100, 200]}), kind="cosine")
    runs = _runs(tmp_path, {"n": [100, 200], "lr": [1e-3, 2e-3]})
    # lr is not the size axis, so runs group by lr: fine
    assert len(sweep.plan_sweep(runs)) == 4
    # a group whose runs differ in something else than the size is refused
    cfgs = {r.name: expand.build_config(r.config_file, r.arg) for r in runs}
    cfgs[runs[0].name].model.llm.depth = 3
    with pytest.raises(sweep.SweepError, match="model.llm.depth"):
        sweep.plan_sweep(runs, configs=cfgs)
    # repeated data (more than one epoch) is refused unless allowed
    cfgs = {r.name: expand.build_config(r.config_file, r.arg) for r in runs}
    cfgs[runs[0].name].train.steps = 1000
    cfgs[runs[2].name].train.steps = 2000
    with pytest.raises(sweep.SweepError, match="repeats data"):
        sweep.plan_sweep(runs, configs=cfgs)


def test_decay_start_matches_trainer_schedule():
    optim = pytest.importorskip("vlm_jax.train.optim")
    for total, frac, warm in [(25, 0.2, 2), (100, 0.2, 2), (37, 0.1, 3), (10, 0.25, 0)]:
        cfg = mlc.ConfigDict(dict(lr=1.0, schedule="wsd", warmup_steps=warm, warmup_frac=0.0,
                                  decay_frac=frac, min_lr_ratio=0.0))
        sched = optim.make_schedule(cfg, total)
        s = sweep.decay_start(total, frac)
        assert float(sched(s)) == pytest.approx(1.0)       # still stable at the branch point
        assert float(sched(s + 1)) < 1.0                   # decaying right after
        assert sweep.warmup_steps(cfg, total) == optim.warmup_steps(cfg, total)
