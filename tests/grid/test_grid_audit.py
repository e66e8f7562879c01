"""The grid CLI and launch scripts run the way docs/grid.md and launch/*.sh show them:
the gpu launcher's dry run says which GPUs each slot gets, `--dry-run | head` ends without
a traceback, and tpu_pod.sh / xpk.sh --dry-run work from a checkout whose requirements are
in .venv (launch/local.sh made it) while `python3` on PATH lacks them."""
import os
import subprocess
import sys

import pytest

from tests.grid.conftest import PY, REPO, TINY_GRID, cli_env
from vlm_jax.grid import expand, launchers, runner

COMP = os.path.join(REPO, "configs", "compositional.py")
SELECT = ["--select", "vit=B16", "--select", "llm=vicuna7b", "--select", "data=cc12m"]


def test_gpu_dry_run_shows_each_slots_devices(tmp_path):
    root = str(tmp_path / "r")
    grid = expand.load_grid(TINY_GRID)
    gpu = launchers.make_launcher("gpu", root, 2, gpus_per_run=2)
    lines = runner.dry_run(grid, root, gpu, out=open(os.devnull, "w"))
    assert ("# each job runs in the first free slot; the commands below show slot 0's "
            "environment; per slot: 0: CUDA_VISIBLE_DEVICES=0,1; 1: CUDA_VISIBLE_DEVICES=2,3"
            ) in lines
    local = launchers.make_launcher("local", root, 2, executor="process")
    assert not any("per slot" in ln
                   for ln in runner.dry_run(grid, root, local, out=open(os.devnull, "w")))


def test_dry_run_into_head_has_no_traceback(tmp_path):
    env = {**cli_env(), "PROJECT": "p", "ZONE": "z", "REMOTE_ROOT": "gs://b/r",
           "TPU_NAME": "vm"}
    cmd = (f"'{PY}' -m vlm_jax.grid run '{COMP}' --root '{tmp_path / 'r'}' --launcher tpu "
           f"--dry-run | head -1")     # ~100 kB of commands: more than a pipe holds
    p = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.startswith("# grid compositional: 160 runs")
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".venv", "bin", "python")),
                    reason="the checkout has no .venv")
@pytest.mark.parametrize("script,var", [("tpu_pod.sh", {"TPU_NAME": "vm"}),
                                        ("xpk.sh", {"CLUSTER": "c"})])
def test_cloud_scripts_use_the_checkouts_venv(tmp_path, script, var):
    # a real python3 without the requirements first on PATH (a fresh venv of the base
    # interpreter), PYTHON unset: the script must not pick it
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=120)
    env = {k: v for k, v in cli_env().items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=f"{bare / 'bin'}{os.pathsep}{env['PATH']}", PROJECT="p", ZONE="z",
               REMOTE_ROOT="gs://b/r", ROOT=str(tmp_path / "r"), **var)
    assert subprocess.run([str(bare / "bin" / "python3"), "-c", "import ml_collections"],
                          capture_output=True).returncode != 0
    p = subprocess.run(["bash", f"launch/{script}", "--dry-run", *SELECT], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("# grid compositional: 10 runs, 0 done, 10 to run")


def test_status_says_why_a_run_failed(tmp_path):
    # README: "`status` says what is done, failed (and why) or left": the error line of the
    # failed run's log and where the log is, not only "exit code 1"
    from vlm_jax.grid import registry
    root = str(tmp_path / "r")
    grid = expand.expand({"name": "g", "stages": [
        dict(name="pre", arg="run", axes={"a": [1]}),
        dict(name="main", arg="run", axes={"a": [1]}, needs={"model.init_from": "pre/a={a}"})]},
        TINY_GRID, spec="inline")
    registry.record_grid(root, grid)
    pre, main = grid.runs
    log = os.path.join(registry.workdir(root, pre), "run.log")
    tail = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "    raise FileNotFoundError(...)\n"
            "FileNotFoundError: model.vision.init_from='/w' does not exist\n"
            "[worker] job pre/a=1 FAILED in 5.0s; programs: 0 reused\n")
    registry.mark(root, pre, "failed", "exit code 1", log=log, log_tail=tail)
    registry.mark(root, main, "skipped", "needs pre/a=1, which failed")
    lines = runner.status_lines(root)
    i = lines.index("  failed   pre/a=1: exit code 1")
    assert lines[i + 1].strip() == "FileNotFoundError: model.vision.init_from='/w' does not exist"
    assert lines[i + 2].strip() == f"log: {log}"
    assert "  skipped  main/a=1: needs pre/a=1, which failed" in lines
    assert lines[-1] == "total: 0/2 done, 1 failed, 1 skipped"


def test_status_tells_running_from_interrupted(tmp_path):
    # while a grid runs, `status` called it "interrupted" (resumes from its last
    # checkpoint); a run whose runner is alive is "running", one whose runner died is not
    import socket
    from vlm_jax.grid import registry
    root = str(tmp_path / "r")
    grid = expand.expand({"name": "g", "stages": [
        dict(name="s", arg="run", axes={"a": [1, 2]})]}, TINY_GRID, spec="inline")
    registry.record_grid(root, grid)
    live, dead = grid.runs
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for run, pid in ((live, os.getpid()), (dead, gone.pid)):
        registry.mark(root, run, "running", pid=pid, host=socket.gethostname())
        with open(os.path.join(registry.workdir(root, run), "config.json"), "w") as f:
            f.write("{}")
    assert registry.run_state(root, live)[0] == "running"
    assert registry.run_state(root, dead)[0] == "interrupted"
    assert runner.status_lines(root)[-1] == "total: 0/2 done, 1 interrupted, 1 running"


def test_bad_roots_are_named(tmp_path):
    # --root naming a file: was a FileExistsError traceback (run); a damaged grid.json:
    # `status` said "grid.json missing" and `run` treated the root as empty
    env = cli_env()
    afile = tmp_path / "afile"
    afile.write_text("")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "grid.json").write_text("{bad")
    for args, want in (
            (["run", TINY_GRID, "--root", str(afile), "--dry-run"], "is a file, not a directory"),
            (["status", "--root", str(afile)], "is a file, not a directory"),
            (["run", TINY_GRID, "--root", str(damaged), "--dry-run"],
             "grid.json is not a readable JSON object"),
            (["status", "--root", str(damaged)], "grid.json is not a readable JSON object")):
        p = subprocess.run([PY, "-m", "vlm_jax.grid", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and want in p.stderr and "Traceback" not in p.stderr, \
            (args, p.stderr[-2000:])
    assert (damaged / "grid.json").read_text() == "{bad"


def test_bad_launcher_counts_are_named(tmp_path):
    # --gpus-per-run -1 gave every slot CUDA_VISIBLE_DEVICES='' (runs on no GPU);
    # --num-slices 0 gave a TPU plan with no run command at all
    env = {**cli_env(), "PROJECT": "p", "ZONE": "z", "REMOTE_ROOT": "gs://b/r",
           "TPU_NAME": "vm"}
    for extra, want in ((["--launcher", "gpu", "--gpus-per-run", "-1"], "--gpus-per-run -1"),
                        (["--launcher", "tpu", "--num-slices", "0"], "--num-slices 0")):
        p = subprocess.run([PY, "-m", "vlm_jax.grid", "run", TINY_GRID, "--root",
                            str(tmp_path / "r"), "--dry-run", *extra], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and want in p.stderr, p.stderr[-2000:]


def test_plan_refuses_a_headroom_outside_0_1(capsys):
    # --headroom 2 planned every run as "will not fit" (exit 1) instead of naming the flag
    from vlm_jax.grid import plan
    assert plan.main([TINY_GRID, "--headroom", "2", "--compile", "off"]) == 2
    assert "--headroom is the fraction of HBM kept free" in capsys.readouterr().err
