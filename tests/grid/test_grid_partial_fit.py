"""Incremental fits, the grid runner's part (`_Analyses`): which groups of a fit entry are
complete. (`fit --partial --cache-dir` through the runner's analysis server, and the entry
reusing its fits with the fit.json of a fresh fit: tests/grid/test_grid_analysis_server.py.)"""
import csv
import os

from tests.analysis.test_analysis_cli import COLUMNS
from vlm_jax.grid import expand, runner


def _set_status(root, llm, status):
    path = os.path.join(root, "results.csv")
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        if r["stage"] == "grid" and r["llm"] == llm:
            r["status"] = status
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_runner_complete_groups(tmp_path):
    grid = expand.load_grid("configs/demo.py:tiny")
    fit = [i for i, a in enumerate(grid.analysis) if a.cmd == "fit"][0]
    an = runner._Analyses(grid, str(tmp_path), lambda m: None)
    assert runner._group_cols(grid.analysis[fit].args) == ["llm", "data"]
    state = {r.name: "done" for r in grid.runs}
    assert an._complete_groups(fit, state) == {("S", "clean")}
    one = next(r.name for r in grid.runs if r.stage == "grid")
    assert an._complete_groups(fit, {**state, one: "running"}) == set()
    argv = runner.analysis_argv(grid.analysis[fit], str(tmp_path), ["python"])
    assert argv[argv.index("--cache-dir") + 1] == os.path.join(
        str(tmp_path), "report", grid.analysis[fit].out, runner.FIT_CACHE)
