"""The persistent compilation cache shared across grids (issue 6): a second grid in a new
root with the same JAX_COMPILATION_CACHE_DIR compiles nothing (every program of its runs
is a persistent-cache hit), and trains exactly as the first. Each job's timing line
records the counters (worker._JOB_STATS); each run's result.json its phase timings."""
import json
import os

from tests.grid.conftest import TINY_GRID, cache_env
from vlm_jax.grid import expand, registry, runner
from vlm_jax.grid.launchers import LocalLauncher
from vlm_jax.train import program_cache


def _grid(root, cache):
    g = expand.load_grid(TINY_GRID + ":grid,values=x")
    s = runner.run_grid(g, root, LocalLauncher(root, 1, extra_env=cache_env(cache)),
                        log=lambda _: None)
    assert s.ok and s.done == 2, s
    return {t["job"]: t for t in registry.read_timings(root)}


def _losses(root, run):
    path = os.path.join(root, "runs", run, "metrics.jsonl")
    return [(m["step"], m["train/loss"]) for m in map(json.loads, open(path))]


def test_second_grid_compiles_nothing(tmp_path):
    cache = str(tmp_path / "xla")
    code = program_cache.code_hash.__wrapped__()
    cold = _grid(str(tmp_path / "a"), cache)
    first = cold["pre/a=1"]
    assert first["persistent_cache_misses"] > 0 and first["xla_compile_s"] > 0, first
    warm, roots = _grid(str(tmp_path / "b"), cache), ("a", "b")
    if program_cache.code_hash.__wrapped__() != code:
        # the vlm_jax sources changed under the test (a checkout others edit): the second
        # grid rightly built its programs again; a third one must load all of them
        cold, warm, roots = warm, _grid(str(tmp_path / "c"), cache), ("b", "c")
    assert list(cold) == list(warm) == ["pre/a=1", "main/a=1,b=x"]
    for job, t in warm.items():
        # a new worker process: every program of the run is loaded from the serialized
        # executables next to the cache: none is traced, lowered or compiled again
        # (or reused in memory: a later job of the same worker)
        assert t["programs_built"] == 0, (job, t)
        assert t["programs_loaded"] + t["programs_reused"] >= 3, (job, t)
    assert warm["pre/a=1"]["programs_loaded"] >= 3, warm
    assert all(t["programs_built"] > 0 for t in cold.values() if not t["programs_reused"])
    # (rarely, one small program of the libraries' misses: seen once in a loaded test
    # session, program not identified)
    assert sum(t["persistent_cache_misses"] for t in warm.values()) <= 1, warm
    assert sum(t["xla_compile_s"] for t in warm.values()) < 0.5 * sum(
        t["xla_compile_s"] for t in cold.values())
    assert len(os.listdir(cache)) > 0
    for run in ("pre/a-1", "main/a-1_b-x"):
        assert _losses(str(tmp_path / roots[0]), run) == _losses(str(tmp_path / roots[1]), run)
        res = json.load(open(os.path.join(tmp_path, roots[1], "runs", run, "result.json")))
        ph = res["timings"]
        for k in ("init", "compile", "steps", "eval", "checkpoint", "data"):
            assert ph[k] >= 0, (k, ph)
        assert ph["steps"] > 0 and ph["compile"] > 0
    main = json.load(open(os.path.join(tmp_path, roots[1], "runs", "main/a-1_b-x",
                                       "result.json")))
    assert main["timings"]["init_from"] > 0          # the pretrained LM was loaded


def test_analysis_of_a_finished_stage_overlaps_later_jobs(tmp_path, monkeypatch, launcher):
    """A stage's analysis starts (in the background) as soon as its runs are done, while
    the later stages' jobs go on; `report` and the rest still run at the end."""
    import sys
    stamps = str(tmp_path / "stamps")

    def argv(a, root, python):  # stands in for `python -m vlm_jax.analysis ...`
        return [sys.executable, "-c", "import sys,time; open(sys.argv[1],'a').write("
                "sys.argv[2]+' %r %r\\n' % (time.time(), time.sleep(float(sys.argv[3]))))",
                stamps, f"{a.cmd}:{a.stage}", "1" if a.stage == "main" else "0"]
    monkeypatch.setattr(runner, "analysis_argv", argv)
    g = expand.expand({"name": "overlap", "stages": [
        dict(name="pre", arg="run", axes={"a": [1]}),
        dict(name="main", arg="run,steps=12", axes={"a": [1], "b": ["x"]},
             needs={"model.llm.init_from": "pre/a={a}"})],
        "analysis": [dict(cmd="fit", stage="pre", out="pre"),
                     dict(cmd="fit", stage="main", out="main")]}, TINY_GRID, spec="inline")
    root = str(tmp_path / "r")
    logs = []
    s = runner.run_grid(g, root, launcher(root, parallel=1), log=logs.append)
    assert s.ok, logs
    lines = [ln.split() for ln in open(stamps)]
    assert [ln[0] for ln in lines] == ["fit:pre", "fit:main"]
    main = {t["job"]: t for t in registry.read_timings(root)}["main/a=1,b=x"]
    assert float(lines[0][1]) < main["start"] + main["seconds"]   # ran during main's job
    assert float(lines[1][1]) >= main["start"] + main["seconds"]
    assert any("analysis fit pre" in ln for ln in logs)
    # the last stage's entry starts as its last job ends (the first entry ended during
    # that job), not after the workers closed
    ev = [(e["event"], e.get("stage")) for e in registry.read_events(root)]
    assert ev.index(("analysis_start", "main")) < ev.index(("jobs_done", None)), ev
