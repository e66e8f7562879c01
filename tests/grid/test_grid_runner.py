"""The runner with the real trainer on tiny runs (tests/grid/tiny_grid.py): dependencies,
crash isolation with a run that really diverges, skipped dependants, results.csv, status,
idempotence (a second run launches nothing), retry, a root holding another grid, the
root lock, Ctrl-C and resume. Every run compiles to the same tiny programs, shared through
one compilation cache per test process."""
import csv
import json
import os
import signal
import subprocess
import time

import pytest

from tests.grid.conftest import PY, REPO, TINY_GRID, cache_env, cli_env
from vlm_jax.grid import expand, registry, runner


def _csv(root):
    with open(os.path.join(root, "results.csv")) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def _cli(*args, env=None):
    return subprocess.run([PY, "-m", "vlm_jax.grid", *args], cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=300)


def _snapshot(root):
    """Every file under root (except the lock) -> (size, mtime): to show nothing changed."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f != ".lock":
                out[p] = (os.path.getsize(p), os.path.getmtime(p))
    return out


@pytest.mark.slow
def test_real_runs_isolation_idempotence_and_root_checks(tmp_path, launcher):
    root = str(tmp_path / "g")
    spec = TINY_GRID + ":grid,values=x|bad,post=True"
    g = expand.load_grid(spec)
    assert [r.name for r in g.runs] == ["pre/a=1", "main/a=1,b=x", "main/a=1,b=bad",
                                        "post/a=1,b=x", "post/a=1,b=bad"]
    logs = []
    # one slot: the worker goes on with the next job after the diverging run failed.
    # poll_s=600: the runner must learn of each job's end from the worker's reply
    # (launcher.wait), not from its poll, or this test would take 10 minutes a job
    s = runner.run_grid(g, root, launcher(root, parallel=1), log=logs.append, poll_s=600)
    out = "\n".join(logs)
    # the freed slot takes its next job before the finished job's bookkeeping (progress
    # line, results.csv, timings)
    starts = [i for i, m in enumerate(logs) if m.startswith("[grid] start ")]
    reports = [i for i, m in enumerate(logs) if " done, " in m and "elapsed" in m]
    assert len(starts) == 4 and len(reports) == 4, out
    assert all(starts[k + 1] < reports[k] for k in range(3)), out
    # the diverging run failed, the run that needs it was skipped, the rest finished
    assert s.failed == ["main/a=1,b=bad"], out
    assert s.skipped == ["post/a=1,b=bad"], out
    assert s.done == 3 and s.ran == 4 and not s.ok, out
    assert "main/a=1,b=bad failed" in out and "non-finite" in out  # log tail shown
    marker = json.load(open(os.path.join(root, "runs/main/a-1_b-bad/grid_status.json")))
    assert marker["status"] == "failed" and "exit code 1" in marker["error"]
    assert "NonFiniteError" in marker["log_tail"] and "train.max_nonfinite=1" in marker["log_tail"]
    # the warm worker compiled the tiny programs once and reused them for the later runs
    t = registry.read_timings(root)
    assert [x["job"] for x in t] == ["pre/a=1", "main/a=1,b=x", "main/a=1,b=bad",
                                     "post/a=1,b=x"]
    assert all(x["programs_reused"] > 0 and x["programs_built"] == 0 for x in t[1:]), t
    assert all(x["slot"] == 0 for x in t), t
    # each job started when the one before it ended (not a poll interval later)
    assert all(b["start"] - (a["start"] + a["seconds"]) < 30 for a, b in zip(t, t[1:])), t
    # the runner's own timeline (benchmarks/grid.py accounts for the time outside jobs)
    ev = registry.read_events(root)
    assert [e["event"] for e in ev] == ["start", "planned", "jobs_done", "finished"], ev
    # (times are written rounded to the millisecond)
    assert ev[0]["t"] <= t[0]["start"] + 2e-3
    assert ev[2]["t"] >= t[-1]["start"] + t[-1]["seconds"] - 2e-3
    skip = json.load(open(os.path.join(root, "runs/post/a-1_b-bad/grid_status.json")))
    assert skip["error"] == "needs main/a=1,b=bad, which failed"
    rows = _csv(root)
    with open(os.path.join(root, "results.csv")) as f:
        assert next(csv.reader(f)) == ["run", "status", "stage", "a", "b",
                                       *registry.METRIC_COLUMNS]
    assert {k: r["status"] for k, r in rows.items()} == {
        "pre/a=1": "done", "main/a=1,b=x": "done", "main/a=1,b=bad": "failed",
        "post/a=1,b=x": "done", "post/a=1,b=bad": "skipped"}
    r = rows["main/a=1,b=x"]
    assert (r["stage"], r["a"], r["b"], r["steps"], r["data_size"]) == ("main", "1", "x",
                                                                        "3", "256")
    assert 0 < float(r["eval_loss"]) < 10 and int(r["params_total"]) > 0
    # the dependency's workdir reached the run as model.llm.init_from, and the run started
    # from its weights (a different init would give another first loss than a fresh run)
    cfg = json.load(open(os.path.join(root, "runs/main/a-1_b-x/config.json")))
    assert cfg["model"]["llm"]["init_from"] == os.path.join(root, "runs/pre/a-1")
    first = lambda p: json.loads(open(os.path.join(root, p, "metrics.jsonl")).readline())
    assert first("runs/main/a-1_b-x")["train/loss"] < first("runs/pre/a-1")["train/loss"]
    # status explains it (CLI)
    p = _cli("status", "--root", root)
    assert p.returncode == 0, p.stderr
    assert "stage main: 1/2 done, 1 failed" in p.stdout
    assert "failed   main/a=1,b=bad: exit code 1" in p.stdout
    assert "skipped  post/a=1,b=bad: needs main/a=1,b=bad, which failed" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "total: 3/5 done, 1 failed, 1 skipped"

    # idempotent: nothing is launched, nothing is rewritten
    done_files = {p: v for p, v in _snapshot(root).items() if p.endswith("result.json")}
    logs2 = []
    s2 = runner.run_grid(g, root, launcher(root), retry_failed=False, log=logs2.append)
    assert s2.ran == 0 and s2.already_done == 3
    assert any("3/5 runs already done" in m for m in logs2)
    assert not any("[grid] start" in m for m in logs2)
    assert {p: v for p, v in _snapshot(root).items() if p.endswith("result.json")} == done_files
    # the default retries the failed run (and its dependant) only
    s3 = runner.run_grid(g, root, launcher(root, parallel=1), log=lambda m: None)
    assert s3.ran == 1 and s3.failed == ["main/a=1,b=bad"] and s3.skipped == ["post/a=1,b=bad"]

    # a root holding another grid is refused and nothing is written
    snap = _snapshot(root)
    other = expand.expand({"name": "other", "stages": [dict(name="pre", arg="run",
                                                            axes={"a": [1]})]}, TINY_GRID)
    with pytest.raises(expand.GridError, match="holds grid 'tiny'.*not 'other'"):
        runner.run_grid(other, root, launcher(root), log=lambda m: None)
    with pytest.raises(expand.GridError, match="stage 'main': arg"):
        runner.run_grid(expand.load_grid(spec + ",main_steps=4"), root, launcher(root),
                        log=lambda m: None)
    p = _cli("run", spec.replace(":grid", ":grid,main_steps=4"), "--root", root)
    assert p.returncode == 2 and "new --root" in p.stderr, p.stderr
    assert _snapshot(root) == snap
    # the same grid extended by an axis value keeps every done run and runs only the new
    wider = expand.load_grid(TINY_GRID + ":grid,values=x|bad|y,post=True",
                             select={"b": ["x", "y"]})
    s4 = runner.run_grid(wider, root, launcher(root, parallel=1), log=lambda m: None)
    assert s4.ok and s4.already_done == 3 and s4.ran == 2
    assert set(_csv(root)) == {r.name for r in g.runs} | {"main/a=1,b=y", "post/a=1,b=y"}


def test_cli_errors_before_anything_launches(tmp_path):
    root = str(tmp_path / "g")
    p = _cli("run", TINY_GRID, "--root", root, "--select", "b=z")
    assert p.returncode == 2 and "valid values: ['x', 'y', 'bad']" in p.stderr
    p = _cli("run", TINY_GRID + ":grid,values=x,break_main=True", "--root", root)
    assert p.returncode == 2, p.stderr
    assert "1 run config(s) fail to build; nothing launched" in p.stderr
    assert "broken=True: this config does not build" in p.stderr
    p = _cli("status", "--root", root)
    assert p.returncode == 2 and "holds no grid" in p.stderr
    assert not os.path.exists(os.path.join(root, "runs"))
    p = _cli("plan", "--help")
    assert p.returncode == 0 and "python -m vlm_jax.grid plan" in p.stdout


@pytest.mark.slow
def test_ctrl_c_leaves_runs_resumable_and_they_resume(tmp_path, jax_cache_dir):
    """Ctrl-C stops the running job (SIGTERM: the trainer checkpoints), exit 130; the same
    command resumes the run from that checkpoint and finishes it."""
    root = str(tmp_path / "g")
    cmd = ["run", TINY_GRID + ":grid,values=x,main_steps=200", "--root", root,
           "--parallel", "1"]
    env = cli_env(jax_cache_dir)
    p = subprocess.Popen([PY, "-m", "vlm_jax.grid", *cmd], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    main_wd = os.path.join(root, "runs/main/a-1_b-x")
    metrics = os.path.join(main_wd, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not os.path.exists(metrics):
        time.sleep(0.1)
    assert os.path.exists(metrics), p.communicate()[0] if p.poll() is not None else "timeout"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert "interrupted" in out
    g = expand.load_grid(TINY_GRID + ":grid,values=x,main_steps=200")
    states = {r.name: registry.run_state(root, r)[0] for r in g.runs}
    assert states == {"pre/a=1": "done", "main/a=1,b=x": "interrupted"}, out
    assert not os.path.exists(os.path.join(main_wd, "grid_status.json"))
    stopped = max(int(s) for s in os.listdir(os.path.join(main_wd, "checkpoints"))
                  if s.isdigit())
    assert 0 < stopped < 200
    p2 = _cli(*cmd, env=env)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-2000:]
    assert "1/2 runs already done (skipped), 1 to run" in p2.stdout
    log = open(os.path.join(main_wd, "run.log")).read()
    assert f"resumed from step {stopped}" in log
    res = json.load(open(os.path.join(main_wd, "result.json")))
    assert res["status"] == "done" and res["steps"] == 200


def test_second_runner_on_the_same_root_is_refused(tmp_path):
    root = str(tmp_path / "g")
    os.makedirs(root)
    g = expand.load_grid(TINY_GRID + ":grid,values=x")
    p = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(root, ".lock"), "w") as f:
            f.write(str(p.pid))
        with pytest.raises(expand.GridError, match=f"another runner \\(pid {p.pid}\\)"):
            runner.run_grid(g, root, None, log=lambda m: None)
    finally:
        p.kill()
        p.wait()
    # a stale lock (dead pid) is taken over, and released at the end
    with registry.RootLock(root):
        assert open(os.path.join(root, ".lock")).read() == str(os.getpid())
    assert not os.path.exists(os.path.join(root, ".lock"))
