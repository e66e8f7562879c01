"""Launcher commands (`--dry-run`): local, gpu, tpu (single and multi-slice), xpk; every
command is shlex-quoted, so a hostile config value stays one argument."""
import os
import shlex
import subprocess

import pytest

from tests.grid.conftest import TINY_GRID, PY, REPO, cli_env
from vlm_jax.grid import expand, launchers, runner
from vlm_jax.grid.launchers import CloudOptions, make_jobs

HOSTILE = "x y;$(touch /tmp/pwned)'\""


def _grid():
    # a value with spaces, quotes, ;, $(...) must reach the program as one argument
    return expand.expand({"name": "fake", "stages": [
        dict(name="pre", arg="run", axes={"a": [1]}),
        dict(name="main", arg="run", axes={"a": [1], "b": [HOSTILE]},
             needs={"model.init_from": "pre/a={a}"})]}, TINY_GRID, spec="inline")


def _dry(launcher, root):
    lines = runner.dry_run(_grid(), root, launcher, out=open(os.devnull, "w"))
    return [ln for ln in lines if not ln.startswith("#")]


def test_local_dry_run_is_exact_and_quoted(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # tests/run.sh sets one
    root = str(tmp_path / "r")
    cmds = _dry(launchers.LocalLauncher(root, 2, executor="process"), root)
    assert len(cmds) == 2
    argv = shlex.split(cmds[1])
    env = dict(a.split("=", 1) for a in argv if "=" in a and a.split("=")[0].isupper())
    assert env["JAX_COMPILATION_CACHE_DIR"] == os.path.join(root, ".cache", "jax")
    rest = argv[len(env):]
    assert rest[1:3] == ["-m", "vlm_jax.main"]
    assert rest[rest.index("--config") + 1] == f"{TINY_GRID}:run,a=1,b={HOSTILE}"
    assert rest[rest.index("--workdir") + 1] == os.path.join(root, "runs/main/a-1_b-x-y-touch-tmp-pwned")
    assert rest[-1] == f"--config.model.init_from={os.path.join(root, 'runs/pre/a-1')}"
    assert not os.path.exists(os.path.join(root, "runs"))  # a dry run writes no workdirs


def test_gpu_env_and_install(tmp_path):
    root = str(tmp_path / "r")
    l = launchers.make_launcher("gpu", root, 2, gpus_per_run=4, install_cuda=True)
    assert l.setup_commands() == [[l.python[0], "-m", "pip", "install", "-U",
                                   f"jax[cuda12]=={launchers.JAX_VERSION}"]]
    assert l.env(1)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in l.env(0)["XLA_FLAGS"]
    cmds = _dry(l, root)
    assert cmds[0].endswith(f"'jax[cuda12]=={launchers.JAX_VERSION}'")


def test_cpu_workers_get_the_malloc_setting(tmp_path, monkeypatch):
    """Local CPU workers start with vlm_jax.malloc's GLIBC_TUNABLES (XLA:CPU temporaries
    reuse mapped memory); a user's own setting wins; GPU hosts do not get it."""
    from vlm_jax import malloc
    root = str(tmp_path / "r")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert launchers.make_launcher("local", root, 2).env(0)["GLIBC_TUNABLES"] == malloc.TUNABLES
    assert "GLIBC_TUNABLES" not in launchers.make_launcher("gpu", root, 1).env(0)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    for kind in ("local", "gpu"):
        assert launchers.make_launcher(kind, root, 1).env(0)["GLIBC_TUNABLES"] == \
            "glibc.malloc.arena_max=2"


def _remote_cmd(argv, flag="--command="):
    return next(a[len(flag):] for a in argv if a.startswith(flag))


def test_tpu_commands(tmp_path):
    root = str(tmp_path / "r")
    opts = CloudOptions(project="proj", zone="us-east5-a", remote_root="gs://b/demo",
                        tpu_name="vm1", accelerator="v5p-64", create=True)
    l = launchers.make_launcher("tpu", root, 1, opts=opts)
    setup = l.setup_commands()
    assert setup[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vm1",
                        "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
                        "--version=tpu-ubuntu2204-base"]
    assert setup[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm1"]
    assert "--worker=all" in setup[-1] and "jax[tpu]" in _remote_cmd(setup[-1])
    g = _grid()
    job = make_jobs(g.runs)[1]
    steps = l.job_commands(job, g.by_name())
    ssh = steps[0][0]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm1"]
    assert "--worker=all" in ssh
    remote = shlex.split(_remote_cmd(ssh).split("&&", 1)[1])
    assert remote[:2] == ["env", "JAX_COMPILATION_CACHE_DIR=gs://b/demo/.cache/jax"]
    remote = remote[2:]
    assert remote[:3] == [".venv/bin/python", "-m", "vlm_jax.main"]
    assert remote[remote.index("--config") + 1] == f"tests/grid/tiny_grid.py:run,a=1,b={HOSTILE}"
    assert remote[remote.index("--workdir") + 1] == "gs://b/demo/runs/main/a-1_b-x-y-touch-tmp-pwned"
    assert remote[-1] == "--config.model.init_from=gs://b/demo/runs/pre/a-1"
    fetch = steps[1][0]
    assert fetch[:3] == ["gcloud", "storage", "cp"] and fetch[-1].startswith(root)


def test_tpu_multislice(tmp_path):
    opts = CloudOptions(project="p", zone="z", remote_root="gs://b/x", tpu_name="pod",
                        accelerator="v5p-128", num_slices=2, create=True, coordinator="10.0.0.2")
    l = launchers.make_launcher("tpu", str(tmp_path), 1, opts=opts)
    assert l.setup_commands()[0][:6] == ["gcloud", "compute", "tpus", "queued-resources",
                                         "create", "pod"]
    assert "--node-count=2" in l.setup_commands()[0]
    g = _grid()
    step = l.job_commands(make_jobs(g.runs)[0], g.by_name())[0]
    assert [a[5] for a in step] == ["pod-0", "pod-1"]  # both slices at the same time
    for i, argv in enumerate(step):
        remote = shlex.split(_remote_cmd(argv).split("&&", 1)[1])
        assert remote[:5] == ["env", "JAX_COMPILATION_CACHE_DIR=gs://b/x/.cache/jax",
                              "MEGASCALE_NUM_SLICES=2", f"MEGASCALE_SLICE_ID={i}",
                              "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080"]
        assert remote[-1] == "--config.mesh.dcn_shape=(2, 1, 1)"


def test_xpk_commands(tmp_path):
    root = str(tmp_path / "r")
    opts = CloudOptions(project="p", zone="z", remote_root="gs://b/x", cluster="c1",
                        accelerator="v5p-256", num_slices=2)
    l = launchers.make_launcher("xpk", root, 4, opts=opts)
    g = _grid()
    job = make_jobs(g.runs)[1]
    steps = l.job_commands(job, g.by_name())
    create, wait = steps[0][0], steps[1][0]
    name = l.workload_name(job)
    assert len(name) <= 40 and name == l.workload_name(job) and name[0].isalpha()
    assert create[:3] == ["xpk", "workload", "create"]
    assert {f"--workload={name}", "--cluster=c1", "--tpu-type=v5p-256", "--num-slices=2",
            "--base-docker-image=python:3.11-slim"} <= set(create)
    inner = shlex.split(_remote_cmd(create))
    assert inner[inner.index("env") + 1] == "JAX_COMPILATION_CACHE_DIR=gs://b/x/.cache/jax"
    assert inner[-1] == "--config.mesh.dcn_shape=(2, 1, 1)"
    assert f"tests/grid/tiny_grid.py:run,a=1,b={HOSTILE}" in inner
    assert wait[:3] == ["xpk", "workload", "list"] and f"--wait-for-job-completion={name}" in wait


def test_cloud_launchers_say_what_is_missing(tmp_path):
    with pytest.raises(expand.GridError, match="--tpu-name, --zone, --project, --remote-root"):
        launchers.make_launcher("tpu", str(tmp_path), opts=CloudOptions())
    with pytest.raises(expand.GridError, match="must be a gs:// path"):
        launchers.make_launcher("xpk", str(tmp_path), opts=CloudOptions(
            cluster="c", zone="z", project="p", remote_root="/local"))


def test_cli_dry_run_prints_commands_and_runs_nothing(tmp_path):
    root = str(tmp_path / "r")
    env = cli_env()
    env.update(PROJECT="p", ZONE="z", REMOTE_ROOT="gs://b/r", TPU_NAME="vm")
    p = subprocess.run([PY, "-m", "vlm_jax.grid", "run", TINY_GRID, "--root", root,
                        "--launcher", "tpu", "--dry-run", "--select", "b=x"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("# grid tiny: 2 runs, 0 done, 2 to run; launcher tpu")
    assert sum("tpu-vm ssh vm" in ln and "vlm_jax.main" in ln for ln in lines) == 2
    assert not os.path.exists(root) or not os.listdir(root)


def test_analysis_commands():
    fit = expand.Analysis(cmd="fit", stage="grid", out="fit", args=("--group-cols", "llm,data"))
    assert runner.analysis_argv(fit, "/r", ["py"]) == [
        "py", "-m", "vlm_jax.analysis", "fit", "--runs", "/r", "--out", "/r/report/fit",
        "--stage", "grid", "--group-cols", "llm,data",
        "--cache-dir", "/r/report/fit/" + runner.FIT_CACHE]   # kept fits (fit --partial)
    rep = expand.Analysis(cmd="report", stage="grid", out="report", args=())
    assert runner.analysis_argv(rep, "/r", ["py"]) == [
        "py", "-m", "vlm_jax.analysis", "report", "--runs", "/r", "--out", "/r/report"]


def test_local_sh_shares_one_durable_cache(tmp_path):
    """launch/local.sh points every worker of every grid at one cache under ~/.cache."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "home")
    root = str(tmp_path / "r")
    p = subprocess.run(["bash", "launch/local.sh", "--executor", "process", "--dry-run"],
                       cwd=repo, env={**env, "CONFIG": f"{TINY_GRID}:grid,values=x",
                                      "ROOT": root},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    want = os.path.join(str(tmp_path / "home"), ".cache", "vlm_jax", "xla")
    assert f"JAX_COMPILATION_CACHE_DIR={want}" in p.stdout, p.stdout
    assert not os.path.exists(os.path.join(root, "runs"))
