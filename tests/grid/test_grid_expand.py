"""Grid expansion: counts, stable names, workdirs, dependencies, selection, bad input."""
import os

import pytest

from tests.grid.conftest import TINY_GRID, REPO
from vlm_jax.grid import expand
from vlm_jax.grid.launchers import make_jobs

DEMO = os.path.join(REPO, "configs", "demo.py")
COMP = os.path.join(REPO, "configs", "compositional.py")


TWO = TINY_GRID + ":grid,seeds=1|2"


def test_tiny_grid_counts_names_deps():
    g = expand.load_grid(TWO)
    assert len(g.runs) == 2 + 2 * 3
    names = [r.name for r in g.runs]
    assert names[:3] == ["pre/a=1", "pre/a=2", "main/a=1,b=x"]
    r = g.by_name()["main/a=2,b=y"]
    assert r.deps == ("pre/a=2",)
    assert r.overrides == (("model.llm.init_from", "pre/a=2"),)
    assert r.workdir == "runs/main/a-2_b-y"
    assert r.arg == "run,steps=3,broken=False,a=2,b=y"
    # stable: a second expansion gives the same names and workdirs
    assert [x.to_json() for x in expand.load_grid(TWO).runs] == [x.to_json() for x in g.runs]
    # pretraining stages come before the runs that need them
    pos = {n: i for i, n in enumerate(names)}
    assert all(pos[d] < pos[x.name] for x in g.runs for d in x.deps)


def test_demo_grid_shape():
    g = expand.load_grid(DEMO + ":grid,native=0")
    stages = {}
    for r in g.runs:
        stages[r.stage] = stages.get(r.stage, 0) + 1
    assert stages == {"vit": 3, "lm": 2, "grid": 3 * 2 * 2 * 10}
    r = g.by_name()["grid/data=noisy,vit=L,llm=M,n=5120"]
    assert dict(r.overrides) == {"model.vision.init_from": "vit/vit=L",
                                 "model.llm.init_from": "lm/llm=M"}
    # a WSD sweep groups the 10 data sizes of each (vit, llm, data): 512..5120 in steps of
    # 512 like the compositional study's 1M..10M
    sizes = [dict(r.axes)["n"] for r in g.runs if r.stage == "grid"][:10]
    assert sizes == [str(512 * k) for k in range(1, 11)]
    jobs = make_jobs(g.runs)
    assert len(jobs) == 3 + 2 + 12
    assert all(len(j.runs) == 10 for j in jobs if j.sweep)
    assert expand.validate_runs(g) == []
    # the runner starts what most runs wait on first: the LMs (24 grid runs each), then
    # the ViTs (16 each), then the grid
    from vlm_jax.grid import runner
    waiting = runner.dependants(g.runs)
    assert len(waiting["lm/llm=S"]) == 60 and len(waiting["vit/vit=L"]) == 40
    assert waiting["grid/data=clean,vit=S,llm=S,n=512"] == set()
    g0 = expand.load_grid(DEMO + ":grid,native=0,sweep=0")
    assert len(make_jobs(g0.runs)) == len(g0.runs) == 125


def test_demo_point_without_preset_is_one_run():
    """`configs/demo.py:vit=M,llm=S` (a run's point, no preset) is that run, not the grid
    with the values ignored; options of the grid stay the grid's."""
    from configs import demo
    c = demo.get_config("vit=M,llm=S,n=1024")
    assert "grid" not in c and c.name == "demo_vitM_llmS_clean_n1024"
    assert c.data.n == 1024 and c.model.vision.width == 48
    assert "grid" in demo.get_config("sweep=0,feature_cache=0")


def test_demo_includes_native_stages():
    g = expand.load_grid(DEMO)
    native = [r for r in g.runs if r.stage == "native"]
    if not os.path.exists(os.path.join(REPO, "configs", "native.py")):
        pytest.skip("configs/native.py not present")
    assert len(native) >= 4
    assert any(a.stage == "native" for a in g.analysis)


def test_compositional_grid():
    g = expand.load_grid(COMP)
    grid_runs = [r for r in g.runs if r.stage == "projector"]
    assert len(grid_runs) == 4 * 2 * 10 * 2
    assert set(g.axes) >= {"vit", "llm", "data", "n"}
    assert expand.validate_runs(expand.load_grid(COMP, select={"n": ["1M"]})) == []


def test_selection_keeps_dependencies():
    g = expand.load_grid(TWO, select={"b": ["y"], "a": ["2"]})
    assert [r.name for r in g.runs] == ["pre/a=2", "main/a=2,b=y"]


def test_unknown_axis_and_value_list_valid_ones():
    with pytest.raises(expand.GridError, match=r"unknown grid axis 'c'.*valid axes: \['a', 'b'\]"):
        expand.load_grid(TINY_GRID, select={"c": ["1"]})
    with pytest.raises(expand.GridError, match=r"unknown value\(s\) \['z'\].*'b'.*\['x', 'y', 'bad'\]"):
        expand.load_grid(TINY_GRID, select={"b": ["z"]})
    with pytest.raises(expand.GridError, match="AXIS=V1"):
        expand.parse_selection(["b"])


def test_bad_grids_are_reported():
    base = dict(name="s", arg="run", axes={"a": [1]})
    with pytest.raises(expand.GridError, match="unknown field.*'axis'"):
        expand.expand({"stages": [dict(base, axis={})]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="not a run of an earlier stage"):
        expand.expand({"stages": [dict(base, needs={"model.init_from": "pre/a={a}"})]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="unknown axis"):
        expand.expand({"stages": [base, dict(base, name="t", needs={"x.y": "s/a={zz}"})]},
                      TINY_GRID)
    with pytest.raises(expand.GridError, match="distinct values"):
        expand.expand({"stages": [dict(base, axes={"a": [1, 1]})]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="sweep_axis 'n' is not an axis"):
        expand.expand({"stages": [dict(base, sweep="wsd")]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="without ','"):
        expand.expand({"stages": [dict(base, axes={"a": ["x,y"]})]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="without a `grid` field"):
        expand.load_grid(TINY_GRID + ":run")
    with pytest.raises(expand.GridError, match="FILE.py"):
        expand.load_grid("configs/demo")


def test_config_that_fails_to_build_is_reported_before_launch():
    g = expand.expand({"stages": [dict(name="s", arg="run,broken=True", axes={"a": [1, 2]})]},
                      TINY_GRID)
    errors = expand.validate_runs(g)
    assert len(errors) == 2 and "broken=True: this config does not build" in errors[0]


def _reordered(grid: dict, stage: str, order) -> dict:
    out = dict(grid, stages=[dict(s) for s in grid["stages"]])
    for s in out["stages"]:
        if s["name"] == stage:
            s["axes"] = {k: s["axes"][k] for k in order}
    return out


def test_root_refuses_a_changed_grid_definition(tmp_path):
    """A root records its grid's stage definitions; another axis order (which renames every
    run), another arg, needs or sweep is refused with what differs, writing nothing;
    added axis values, left-out values and new stages are fine."""
    from vlm_jax.grid import registry
    root = str(tmp_path)
    _, grid = expand.load_grid_spec(TWO)
    g = expand.expand(grid, TINY_GRID, spec="v1")
    registry.check_root(root, g)
    registry.record_grid(root, g)
    before = open(os.path.join(root, "grid.json")).read()
    swapped = expand.expand(_reordered(grid, "main", ["b", "a"]), TINY_GRID, spec="v2")
    with pytest.raises(expand.GridError) as e:
        registry.check_root(root, swapped)
    msg = str(e.value)
    assert "stage 'main': axis order ['a', 'b'] -> ['b', 'a']" in msg
    assert "new --root" in msg and "--allow-grid-change" in msg and "'v1'" in msg
    assert open(os.path.join(root, "grid.json")).read() == before
    wsd = dict(grid, stages=[dict(s) for s in grid["stages"]])
    wsd["stages"][1] = dict(wsd["stages"][1], arg="run,steps=4,broken=False")
    with pytest.raises(expand.GridError, match="arg 'run,steps=3,broken=False' -> "
                       "'run,steps=4,broken=False'"):
        registry.check_root(root, expand.expand(wsd, TINY_GRID))
    # compatible: more values, fewer values, a selection, an added stage
    for spec in (TINY_GRID + ":grid,seeds=1|2|3", TINY_GRID + ":grid,seeds=1,values=x",
                 TINY_GRID + ":grid,seeds=1|2,post=True"):
        registry.check_root(root, expand.load_grid(spec))
    registry.check_root(root, expand.load_grid(TWO, select={"b": ["y"]}))
    # --allow-grid-change: accepted, the old definition is kept in grid.json
    registry.check_root(root, swapped, allow_change=True)
    registry.record_grid(root, swapped)
    data = registry.read_json(os.path.join(root, "grid.json"))
    assert data["previous_stages"][0][1]["axes"][0][0] == "a"
    assert len(data["runs"]) == 2 + 6 + 6   # the old runs are still known
    registry.check_root(root, swapped)       # the new definition is the recorded one
