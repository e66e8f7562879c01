"""Incremental fits: `fit --partial --cache-dir` fits only the groups whose runs are all
done (results.csv status) and writes nothing but the cache; the final `fit` with the same
cache reuses those fits and gives the same fit.json as a fit without any cache. The grid
runner's part (`_Analyses`): which groups of a fit entry are complete."""
import csv
import json
import os

from tests.analysis.test_analysis_cli import COLUMNS, _write_results
from vlm_jax.analysis.__main__ import main
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


def test_partial_fits_fill_the_cache_and_the_final_fit_reuses_them(tmp_path):
    root = str(tmp_path / "root")
    _write_results(root)
    fit = ["fit", "--runs", root, "--stage", "grid", "--group-cols", "llm", "--n-boot", "40"]
    ref = str(tmp_path / "ref")
    assert main(fit + ["--out", ref]) == 0                      # no cache at all
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    _set_status(root, "B", "running")                          # group B not finished
    assert main(fit + ["--out", out, "--cache-dir", cache, "--partial"]) == 0
    assert not os.path.exists(out)                             # a partial pass writes no output
    first = set(os.listdir(cache))
    assert first                                               # group A's fits
    _set_status(root, "B", "done")
    assert main(fit + ["--out", out, "--cache-dir", cache]) == 0
    after = set(os.listdir(cache))
    assert first < after                                       # A reused, B added
    got, want = (json.load(open(os.path.join(d, "fit.json"))) for d in (out, ref))
    for g in ("llm=A", "llm=B"):
        for k in ("E", "A", "alpha", "B", "beta", "ci", "curves", "encoder_differences"):
            assert got["groups"][g][k] == want["groups"][g][k], (g, k)
    # a rerun fits nothing new
    assert main(fit + ["--out", out, "--cache-dir", cache]) == 0
    assert set(os.listdir(cache)) == after


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
