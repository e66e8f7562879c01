"""The runner's analysis entries run in one analysis server process (`vlm_jax.grid.preload
--serve vlm_jax.analysis`: the analysis imports are paid once for every pass and entry),
with the real analysis CLI on a results.csv of a synthetic grid; a server that dies is
replaced (the next entry still runs)."""
import json
import os
import re

from tests.analysis.test_analysis_cli import LLMS, SIZES, VITS, _write_results
from tests.grid.conftest import TINY_GRID
from vlm_jax.grid import expand, registry, runner


def _pid(log_path):
    return re.findall(r"\[analysis server pid (\d+)\]", open(log_path).read())


def test_entries_share_one_server_and_a_dead_server_is_replaced(tmp_path):
    root = str(tmp_path / "root")
    _write_results(root)
    grid = expand.expand({"name": "srv", "stages": [dict(
        name="grid", arg="run", axes={"vit": list(VITS), "llm": list(LLMS),
                                      "n": list(SIZES), "data": ["syn"]})],
        "analysis": [dict(cmd="optimal", stage="grid", out="opt"),
                     dict(cmd="report", stage="grid", out="rep")]}, TINY_GRID)
    state = {r.name: "done" for r in grid.runs}
    assert all(f"{r.name}" in open(os.path.join(root, "results.csv")).read()
               for r in grid.runs)
    logs = []
    an = runner._Analyses(grid, root, logs.append)
    an.start_ready(state, pending=[])            # the stage is done: `optimal` starts
    assert an.running is not None and an.server is not None
    server = an.server.proc
    assert an._reap(wait=True)
    assert os.path.exists(os.path.join(root, "report", "opt", "optimal.json")), logs
    # the server outlives the entry; `report` (run at the end) uses the same process
    assert server.poll() is None
    assert an.finish(state) == [], logs
    opt, rep = (os.path.join(root, "report", d, "analysis.log") for d in ("opt", "rep"))
    assert _pid(opt) == _pid(rep) == [str(server.pid)]
    assert os.path.exists(os.path.join(root, "report", "report.md"))
    ev = [(e["event"], e.get("cmd")) for e in registry.read_events(root)]
    assert ev == [("analysis_start", "optimal"), ("analysis_end", "optimal"),
                  ("analysis_start", "report"), ("analysis_end", "report")], ev
    assert server.wait(timeout=60) == 0          # end of input: it exits by itself

    # a server that died (killed, crashed) is started again for the next entry
    an = runner._Analyses(grid, str(tmp_path / "root"), logs.append)
    an._server().proc.kill()
    an._server().proc.wait()
    an.todo = [1]                                # only `report` left
    assert an.finish(state) == [], logs
    pids = _pid(rep)
    assert len(pids) == 2 and pids[1] != pids[0]
    assert json.load(open(os.path.join(root, "report", "opt", "optimal.json")))["per_llm"]

    # a server that dies with a command in hand (killed while it still imports): the
    # command runs again as a process of its own and its result counts
    os.remove(os.path.join(root, "report", "opt", "optimal.json"))
    an = runner._Analyses(grid, root, logs.append)
    an.start_ready(state, pending=[])
    an.server.proc.kill()
    assert an.finish(state) == [], logs
    assert os.path.exists(os.path.join(root, "report", "opt", "optimal.json"))
    text = open(opt).read()
    assert text.count("$ ") == 3 and len(_pid(opt)) == 1   # 1st server run, died, own run


def test_tight_png_is_savefig_tight_drawn_once():
    """The analysis' figures (io.tight_png): the size of `savefig(bbox_inches="tight")`,
    the same picture (up to anti-aliasing of a sub-pixel offset), one draw instead of two;
    a figure whose artists reach outside it falls back to savefig."""
    import io as _io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    from vlm_jax.analysis import io as aio

    def fig_(outside=False):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for ax in axes:
            ax.plot(np.geomspace(1e2, 1e4, 9), np.linspace(1, 2, 9), "o-", label="a")
            ax.set_xscale("log")
            ax.set_title("title")
            ax.legend(loc="upper left", bbox_to_anchor=(1.3, 1) if outside else None)
        return fig

    draws = []
    orig = Figure.draw
    Figure.draw = lambda self, r: (draws.append(1), orig(self, r))[1]
    try:
        for outside in (False, True):
            ref_buf = _io.BytesIO()
            f = fig_(outside)
            f.savefig(ref_buf, format="png", dpi=aio.FIGURE_DPI, bbox_inches="tight")
            plt.close(f)
            draws.clear()
            f = fig_(outside)
            png = aio.tight_png(f)
            plt.close(f)
            assert len(draws) == (3 if outside else 1)   # outside: + savefig's two
            ref = np.asarray(Image.open(ref_buf)).astype(int)
            got = np.asarray(Image.open(_io.BytesIO(png))).astype(int)
            assert got.shape == ref.shape
            assert np.abs(got - ref).mean() < 6.0      # of 255: anti-aliasing only
    finally:
        Figure.draw = orig


def test_partial_pass_and_entry_in_the_server_equal_a_fresh_fit(tmp_path):
    """Incremental fits through the server: the `--partial` pass (group A done, B
    training) fits only A into the entry's cache and writes nothing else; the entry
    (reusing A's fit) gives the fit.json of a fresh `fit` without any cache (nothing of
    one command leaks into the next); running it again fits nothing new."""
    from tests.grid.test_grid_partial_fit import _set_status
    from vlm_jax.analysis.__main__ import main
    root = str(tmp_path / "root")
    _write_results(root)
    args = ["--group-cols", "llm", "--n-boot", "8"]
    grid = expand.expand({"name": "srv", "stages": [dict(
        name="grid", arg="run", axes={"vit": list(VITS), "llm": list(LLMS),
                                      "n": list(SIZES), "data": ["syn"]})],
        "analysis": [dict(cmd="fit", stage="grid", out="fit", args=args)]}, TINY_GRID)
    ref = str(tmp_path / "ref")
    assert main(["fit", "--runs", root, "--stage", "grid", "--out", ref, *args]) == 0
    an = runner._Analyses(grid, root, lambda m: None)
    _set_status(root, "B", "running")
    state = {r.name: "running" if dict(r.axes)["llm"] == "B" else "done" for r in grid.runs}
    an.start_ready(state, pending=[])             # group A complete: a partial pass
    assert an.running is not None and an.running[3]
    assert an._reap(wait=True)
    cache = os.path.join(root, "report", "fit", runner.FIT_CACHE)
    first = set(os.listdir(cache))
    assert first and not os.path.exists(os.path.join(root, "report", "fit", "fit.json"))
    _set_status(root, "B", "done")
    state = {r.name: "done" for r in grid.runs}
    assert an.finish(state) == []
    assert first < set(os.listdir(cache))         # A reused, B added
    got, want = (json.load(open(os.path.join(d, "fit.json")))
                 for d in (os.path.join(root, "report", "fit"), ref))
    for g in ("llm=A", "llm=B"):
        for k in ("E", "A", "alpha", "B", "beta", "ci", "curves"):
            assert got["groups"][g][k] == want["groups"][g][k], (g, k)
    assert len(set(_pid(os.path.join(root, "report", "fit", "analysis.log")))) == 1
    after = set(os.listdir(cache))
    assert main(["fit", "--runs", root, "--stage", "grid", "--out", str(tmp_path / "again"),
                 "--cache-dir", cache, *args]) == 0
    assert set(os.listdir(cache)) == after
