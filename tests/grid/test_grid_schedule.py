"""The order the runner starts jobs in (`runner.schedule`): critical path first, stages in
grid order, the biggest job of a stage first (so the slots finish together), twins of
equal cost (the same programs) in different waves. On the real demo grid and its FLOPs."""
import os

from tests.grid.conftest import REPO
from vlm_jax.grid import expand, launchers, runner


def _demo():
    grid = expand.load_grid(os.path.join(REPO, "configs", "demo.py"))
    jobs = launchers.make_jobs(grid.runs)
    return grid, jobs, runner.job_costs(jobs)


def test_demo_schedule_order():
    grid, jobs, costs = _demo()
    assert all(c > 0 for c in costs.values()), costs   # every demo model has a FLOP count
    order = [j.name for j in runner.schedule(jobs, grid, costs)]
    stages = [n.split("/")[0] for n in order]
    # the LMs feed 24 grid runs, each ViT 16: they start first; then grid, then native
    assert stages == ["lm"] * 2 + ["vit"] * 3 + ["grid"] * 12 + ["native"] * 8, stages
    assert order[:5] == ["lm/llm=M", "lm/llm=S", "vit/vit=L", "vit/vit=M", "vit/vit=S"]
    native = [costs[n] for n in order if n.startswith("native/")]
    assert native == sorted(native, reverse=True)          # longest first
    assert order[-1] == "native/llm=t64,vit=e16"           # the smallest one last
    grid_jobs = [n for n in order if n.startswith("grid/")]
    # clean/noisy twins (equal cost, same programs) sit 6 jobs apart, never adjacent
    assert [n.split(",")[0] for n in grid_jobs] == ["grid/data=clean"] * 6 + ["grid/data=noisy"] * 6
    for a, b in zip(grid_jobs[:6], grid_jobs[6:]):
        assert a.replace("clean", "noisy") == b and costs[a] == costs[b]
    first = [costs[n] for n in grid_jobs[:6]]
    assert first == sorted(first, reverse=True)


def test_unknown_costs_keep_grid_order():
    grid, jobs, _ = _demo()
    order = [j.name for j in runner.schedule(jobs, grid, {j.name: 0.0 for j in jobs})]
    grid_order = [j.name for j in jobs]
    # same stage order as before costs existed: critical path first, ties in grid order
    assert [n for n in order if n.startswith(("grid/", "native/"))] == \
        [n for n in grid_order if n.startswith(("grid/", "native/"))]
