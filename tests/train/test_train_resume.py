"""End-to-end runs of `python -m vlm_jax.main` on `configs/demo.py:run`.

- SIGTERM saves and exits cleanly; SIGKILL at a random moment loses nothing: restarted
  with the same command, the run ends with the same metrics.jsonl losses as an
  uninterrupted one (bit-identical).
- Two processes on localhost (gloo) give the losses of one process with the same
  global batch.
- Bad input (unknown config key, a workdir holding another config) fails before anything
  is written.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.compiled import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARG = "run,feature_cache=0,steps=24,n=512,vit=S,eval_n=64"  # the smallest ViT: cheap compiles
# One test function whose subtests share the in-process reference run: under pytest-xdist a
# module fixture shared by several tests runs again in every worker that gets one of them
# (xdist_group does not group with pytest 9 + xdist 3.8).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
OVERRIDES = dict(checkpoint_every_steps=4, log_every_steps=1, eval_every_steps=8,
                 checkpoint_every_secs=0.0, keep_checkpoints=2)


def _env():
    return subprocess_env(ROOT)


def _cmd(workdir, *extra):
    flags = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
    return [sys.executable, "-m", "vlm_jax.main", f"--config=configs/demo.py:{ARG}",
            f"--workdir={workdir}", *flags, *extra]


def _config():
    from configs import demo
    c = demo.get_config(ARG)
    for k, v in OVERRIDES.items():
        c.train[k] = v
    return c


def _losses(workdir):
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out.append((r["step"], r.get("train/loss"), r.get("eval/loss")))
    return out


def _wait_lines(path, n, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return True
        time.sleep(0.05)
    raise TimeoutError(path)


def test_main_runs_resumes_and_distributes(tmp_path, subtests):
    from vlm_jax import main
    w = str(tmp_path / "ref" / "run")
    reference = w, main.run(_config(), w)  # the uninterrupted run, in-process
    for check in (reference_run_files, sigterm_then_sigkill_resume_same_losses,
                  two_processes_match_one, bad_input_fails_before_writing):
        with subtests.test(check.__name__):
            (tmp_path / check.__name__).mkdir()
            check(reference, tmp_path / check.__name__)


def reference_run_files(reference, tmp_path):
    w, result = reference
    assert result["status"] == "done" and result["steps"] == 24
    with open(os.path.join(w, "result.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    for k in ("final/train_loss", "final/eval_loss", "params/vision", "params/projector",
              "params/llm", "params/total", "params/trainable", "examples_seen",
              "images_seen", "tokens_seen", "flops", "wall_time_s", "data/skipped",
              "config_name"):
        assert k in result, k
    assert result["params/trainable"] == result["params/projector"]
    assert result["examples_seen"] == 24 * 32 and result["flops"] > 0
    lines = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == list(range(1, 25))
    assert all("perf/examples_per_sec" in l and "perf/step_time_s" in l for l in lines)
    assert [l["step"] for l in lines if "eval/loss" in l] == [8, 16, 24]
    assert lines[-1]["eval/loss"] == result["final/eval_loss"]
    assert os.listdir(os.path.join(w, "tb"))
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["20", "24"]


def sigterm_then_sigkill_resume_same_losses(reference, tmp_path):
    w = str(tmp_path / "run")
    metrics = os.path.join(w, "metrics.jsonl")
    # 1) SIGTERM: saves a checkpoint at the current step and exits cleanly
    p = subprocess.Popen(_cmd(w), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert _wait_lines(metrics, 6, p), p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "preempted" in out and "Traceback" not in err
    steps = sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit())
    n_lines = sum(1 for _ in open(metrics))
    assert steps[-1] == n_lines < 24  # saved exactly where it stopped
    # 2) SIGKILL at an arbitrary later moment
    p = subprocess.Popen(_cmd(w), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_lines(metrics, n_lines + 7, p)
    p.kill()
    p.wait()
    assert not os.path.exists(os.path.join(w, "result.json"))
    # 3) the same command finishes the run
    p = subprocess.run(_cmd(w), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(w) == _losses(reference[0])  # bit-identical train and eval losses
    with open(os.path.join(w, "result.json")) as f:
        r = json.load(f)
    assert r["examples_seen"] == reference[1]["examples_seen"]
    assert r["tokens_seen"] == reference[1]["tokens_seen"]
    assert r["final/eval_loss"] == reference[1]["final/eval_loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes_match_one(reference, tmp_path):
    w = str(tmp_path / "run")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(w, f"--coordinator_address=localhost:{port}",
                                   "--num_processes=2", f"--process_id={i}"),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=800) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    got, ref = _losses(w), _losses(reference[0])
    assert [g[0] for g in got] == [r[0] for r in ref]
    for (_, gl, ge), (_, rl, re_) in zip(got, ref):
        assert gl == pytest.approx(rl, rel=1e-5)
        assert (ge is None) == (re_ is None) and (ge is None or ge == pytest.approx(re_, rel=1e-5))
    with open(os.path.join(w, "config.json")) as f:
        assert json.load(f)["train"]["batch_size"] == 32


def bad_input_fails_before_writing(reference, tmp_path):
    # unknown config key: config_flags refuses it, nothing is created
    w = str(tmp_path / "new")
    p = subprocess.run(_cmd(w, "--config.train.stepz=3"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "stepz" in p.stderr
    assert not os.path.exists(w)
    # a workdir holding a different config: clear error, files untouched
    from vlm_jax import main
    ref = reference[0]
    before = {n: open(os.path.join(ref, n), "rb").read()
              for n in ("config.json", "metrics.jsonl", "result.json")}
    c = _config()
    c.optim.lr = 0.5
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 -> 0.5"):
        main.run(c, ref)
    after = {n: open(os.path.join(ref, n), "rb").read() for n in before}
    assert after == before
