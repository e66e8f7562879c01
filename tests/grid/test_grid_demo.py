"""The embedded demo end to end at its `tiny` preset, with the real trainer: pretraining
(CLIP ViTs, LM) -> frozen projector grid (a WSD sweep over data sizes) -> native stage
-> results.csv -> analysis; then a second `run` that does nothing."""
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.grid.conftest import PY, REPO, cli_env

pytestmark = pytest.mark.slow


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def test_tiny_demo_end_to_end(tmp_path):
    root = str(tmp_path / "demo")
    analysis = _have("vlm_jax.analysis.__main__")
    cmd = [PY, "-m", "vlm_jax.grid", "run", "configs/demo.py:tiny", "--root", root,
           "--parallel", "2"] + ([] if analysis else ["--no-analysis"])
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                       timeout=840)
    wall = time.time() - t0
    out = p.stdout + p.stderr
    with open(os.path.join(root, "results.csv")) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert len(rows) == 8, out[-3000:]
    bad = {k: r["status"] for k, r in rows.items() if r["status"] != "done"}
    assert not bad, f"{bad}\n{out[-4000:]}"
    assert p.returncode == 0, out[-3000:]
    grid = {k: r for k, r in rows.items() if r["stage"] == "grid"}
    assert len(grid) == 4
    for r in grid.values():
        assert float(r["eval_loss"]) > 0 and int(r["params_trainable"]) > 0
        assert int(r["params_projector"]) == int(r["params_trainable"])  # only the projector
        assert int(r["data_size"]) == int(r["n"])
    # a frozen encoder came from its pretraining run
    cfg = json.load(open(os.path.join(root, "runs/grid/data-clean_vit-M_llm-S_n-128/config.json")))
    assert cfg["model"]["vision"]["init_from"] == os.path.join(root, "runs/vit/vit-M")
    if analysis:
        fit_dir = os.path.join(root, "report", "fit")
        assert os.path.exists(os.path.join(fit_dir, "fit.json")), out[-3000:]
        assert os.path.exists(os.path.join(root, "report", "report.md"))
        # the entry ran in the runner's analysis server (vlm_jax.grid.preload --serve)
        log = open(os.path.join(fit_dir, "analysis.log")).read()
        assert "[analysis server pid " in log and "wrote " in log, log[-3000:]
    assert "8/8 done" in out
    # idempotent: a second run launches nothing (its analysis re-run is not what this
    # checks: tests/grid/test_grid_compile_cache.py covers the analysis entries)
    p2 = subprocess.run(cmd + ["--no-analysis"], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert "8/8 runs already done (skipped), 0 to run" in p2.stdout
    assert "[grid] start" not in p2.stdout
    # a sweep interrupted after its stable run (n=128) finished, before its branch (n=64)
    # ran: the resumed job is planned with the done stable run, so the branch still starts
    # from its branch point (not as a sweep of its own) and gives the same row
    branch = os.path.join(root, "runs/grid/data-clean_vit-M_llm-S_n-64")
    stable = os.path.join(root, "runs/grid/data-clean_vit-M_llm-S_n-128")
    before = rows["grid/data=clean,vit=M,llm=S,n=64"]
    shutil.rmtree(branch)
    p3 = subprocess.run(cmd + ["--no-analysis"], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=600)
    assert p3.returncode == 0, p3.stdout[-2000:] + p3.stderr[-2000:]
    assert "7/8 runs already done (skipped), 1 to run" in p3.stdout
    cfg = json.load(open(os.path.join(branch, "config.json")))
    assert cfg["train"]["branch_from"].startswith(stable + ":"), cfg["train"]
    with open(os.path.join(root, "results.csv")) as f:
        after = {r["run"]: r for r in csv.DictReader(f)}["grid/data=clean,vit=M,llm=S,n=64"]
    assert after["status"] == "done" and after["steps"] == before["steps"]
    assert float(after["eval_loss"]) == pytest.approx(float(before["eval_loss"]), rel=1e-6)
    print(f"tiny demo wall time {wall:.1f}s")
