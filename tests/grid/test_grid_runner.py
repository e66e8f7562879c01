"""The runner with a stand-in trainer (tests/grid/fake_main.py): dependencies, skip of
finished runs (idempotence), crash isolation, skipped dependants, results.csv, status,
a root holding another grid, Ctrl-C."""
import csv
import json
import os
import signal
import subprocess
import time

import pytest

from tests.grid.conftest import FAKE_GRID, FAKE_MAIN, PY, REPO, cli_env
from vlm_jax.grid import expand, registry, runner


def _csv(root):
    with open(os.path.join(root, "results.csv")) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def test_runs_all_then_second_run_does_nothing(tmp_path, fake_launcher):
    root = str(tmp_path / "g")
    g = expand.load_grid(FAKE_GRID + ":grid,values=x|y")
    logs = []
    s = runner.run_grid(g, root, fake_launcher(root), log=logs.append)
    assert s.ok and s.done == s.total == 6 and s.ran == 6, logs
    assert any("6/6 done" in m for m in logs) and any("ETA" in m for m in logs)
    rows = _csv(root)
    assert set(rows) == {r.name for r in g.runs}
    with open(os.path.join(root, "results.csv")) as f:
        header = next(csv.reader(f))
    assert header == ["run", "status", "stage", "a", "b", *registry.METRIC_COLUMNS]
    r = rows["main/a=2,b=y"]
    assert (r["status"], r["stage"], r["a"], r["b"]) == ("done", "main", "2", "y")
    assert float(r["eval_loss"]) == pytest.approx(0.75) and r["params_total"] == "20"
    # the dependency's workdir reached the run as --config.model.init_from
    cfg = json.load(open(os.path.join(root, "runs/main/a-2_b-y/config.json")))
    assert cfg["model"]["init_from"] == os.path.join(root, "runs/pre/a-2")
    mtimes = {p: os.path.getmtime(os.path.join(root, p, "result.json"))
              for p in ("runs/pre/a-1", "runs/main/a-1_b-x")}
    logs2 = []
    s2 = runner.run_grid(g, root, fake_launcher(root), log=logs2.append)
    assert s2.ok and s2.ran == 0 and s2.already_done == 6
    assert any("6/6 runs already done" in m for m in logs2)
    assert mtimes == {p: os.path.getmtime(os.path.join(root, p, "result.json")) for p in mtimes}


def test_failing_run_is_isolated_and_dependants_skipped(tmp_path, fake_launcher):
    root = str(tmp_path / "g")
    # extra stage that depends on a failing run
    grid = {"name": "fake", "stages": [
        dict(name="pre", arg="run", axes={"a": [1, 2]}),
        dict(name="main", arg="run", axes={"a": [1, 2], "b": ["x", "bad"]},
             needs={"model.init_from": "pre/a={a}"}),
        dict(name="post", arg="run", axes={"a": [1], "b": ["x", "bad"]},
             needs={"model.init_from": "main/a={a},b={b}"})]}
    g = expand.expand(grid, FAKE_GRID, spec="inline")
    logs = []
    s = runner.run_grid(g, root, fake_launcher(root), log=logs.append)
    assert sorted(s.failed) == ["main/a=1,b=bad", "main/a=2,b=bad"]
    assert s.skipped == ["post/a=1,b=bad"]
    assert s.done == 2 + 2 + 1 and not s.ok
    marker = json.load(open(os.path.join(root, "runs/main/a-1_b-bad/grid_status.json")))
    assert marker["status"] == "failed" and "exit code 3" in marker["error"]
    assert "deliberate failure b=bad" in marker["log_tail"]
    skip = json.load(open(os.path.join(root, "runs/post/a-1_b-bad/grid_status.json")))
    assert skip["error"] == "needs main/a=1,b=bad, which failed"
    rows = _csv(root)
    assert rows["main/a=1,b=bad"]["status"] == "failed"
    assert rows["post/a=1,b=bad"]["status"] == "skipped"
    assert rows["post/a=1,b=x"]["status"] == "done"
    # status explains it
    lines = runner.status_lines(root)
    assert any("failed" in ln and "main/a=1,b=bad" in ln for ln in lines)
    assert any("needs main/a=1,b=bad, which failed" in ln for ln in lines)
    assert lines[-1].startswith("total: 5/8 done")
    # re-running retries only the failed runs (and the skipped one)
    logs2 = []
    s2 = runner.run_grid(g, root, fake_launcher(root), log=logs2.append)
    assert s2.ran == 2 and len(s2.failed) == 2 and s2.skipped == ["post/a=1,b=bad"]
    s3 = runner.run_grid(g, root, fake_launcher(root), retry_failed=False, log=logs2.append)
    assert s3.ran == 0


def test_root_with_another_grid_is_refused(tmp_path, fake_launcher):
    root = str(tmp_path / "g")
    g = expand.load_grid(FAKE_GRID + ":grid,values=x", select={"a": ["1"]})
    assert runner.run_grid(g, root, fake_launcher(root), log=lambda m: None).ok
    other = expand.expand({"name": "other", "stages": [dict(name="pre", arg="run",
                                                            axes={"a": [1]})]}, FAKE_GRID)
    with pytest.raises(expand.GridError, match="holds grid 'fake'.*not 'other'"):
        runner.run_grid(other, root, fake_launcher(root), log=lambda m: None)
    changed = expand.load_grid(FAKE_GRID + ":grid,values=x,sleep=0.5")
    with pytest.raises(expand.GridError, match="different config"):
        runner.run_grid(changed, root, fake_launcher(root), log=lambda m: None)
    # the same grid extended by axis values is fine, and the done runs are kept
    wider = expand.load_grid(FAKE_GRID + ":grid,values=x|y")
    s = runner.run_grid(wider, root, fake_launcher(root), log=lambda m: None)
    assert s.ok and s.already_done == 2 and s.ran == 4


def _cli(*args, **kw):
    return subprocess.run([PY, "-m", "vlm_jax.grid", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_errors_before_anything_launches(tmp_path):
    root = str(tmp_path / "g")
    p = _cli("run", FAKE_GRID, "--root", root, "--select", "b=z")
    assert p.returncode == 2 and "valid values: ['x', 'y', 'bad']" in p.stderr
    p = _cli("run", FAKE_GRID + ":grid,values=x,break_main=True", "--root", root)
    assert p.returncode == 2, p.stderr
    assert "2 run config(s) fail to build; nothing launched" in p.stderr
    assert "broken=True: this config does not build" in p.stderr
    p = _cli("status", "--root", root)
    assert p.returncode == 2 and "holds no grid" in p.stderr
    assert not os.path.exists(os.path.join(root, "runs"))


def test_ctrl_c_leaves_everything_resumable(tmp_path):
    root = str(tmp_path / "g")
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from vlm_jax.grid import expand, runner\n"
        "from vlm_jax.grid.launchers import LocalLauncher\n"
        "g = expand.load_grid(%r)\n"
        "l = LocalLauncher(%r, 2, executor='process', trainer=(%r,))\n"
        "s = runner.run_grid(g, %r, l)\n"
        "sys.exit(130 if s.interrupted else 0)\n"
    ) % (REPO, FAKE_GRID + ":grid,values=x,sleep=30", root, FAKE_MAIN, root)
    p = subprocess.Popen([PY, "-c", script], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    main_wd = os.path.join(root, "runs/main/a-1_b-x")
    while time.time() < deadline and not os.path.exists(os.path.join(main_wd, "metrics.jsonl")):
        time.sleep(0.2)
    assert os.path.exists(os.path.join(main_wd, "metrics.jsonl"))
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert "interrupted" in out
    g = expand.load_grid(FAKE_GRID + ":grid,values=x,sleep=30")
    states = {r.name: registry.run_state(root, r)[0] for r in g.runs}
    assert states["pre/a=1"] == "done" and states["main/a=1,b=x"] == "interrupted"
    assert not os.path.exists(os.path.join(main_wd, "grid_status.json"))


def test_second_runner_on_the_same_root_is_refused(tmp_path, fake_launcher):
    root = str(tmp_path / "g")
    os.makedirs(root)
    g = expand.load_grid(FAKE_GRID + ":grid,values=x", select={"a": ["1"]})
    p = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(root, ".lock"), "w") as f:
            f.write(str(p.pid))
        with pytest.raises(expand.GridError, match=f"another runner \\(pid {p.pid}\\)"):
            runner.run_grid(g, root, fake_launcher(root), log=lambda m: None)
    finally:
        p.kill()
        p.wait()
    # a stale lock (dead pid) is taken over
    assert runner.run_grid(g, root, fake_launcher(root), log=lambda m: None).ok
    assert not os.path.exists(os.path.join(root, ".lock"))


def test_cli_status_and_plan_dispatch(tmp_path, fake_launcher):
    root = str(tmp_path / "g")
    g = expand.load_grid(FAKE_GRID + ":grid,values=x|bad", select={"a": ["1"]})
    runner.run_grid(g, root, fake_launcher(root), log=lambda m: None)
    p = _cli("status", "--root", root)
    assert p.returncode == 0, p.stderr
    assert "stage main: 1/2 done, 1 failed" in p.stdout
    assert "failed   main/a=1,b=bad: exit code 3" in p.stdout
    p = _cli("plan", "--help")
    assert p.returncode == 0 and "python -m vlm_jax.grid plan" in p.stdout
