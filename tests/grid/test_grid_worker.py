"""The persistent worker: a failing job is reported (with its traceback in the job's log)
and the worker goes on with the next job; a dead worker reads as a failed job."""
import os
import threading
import time

from tests.grid.conftest import PY, TINY_GRID, cli_env
from vlm_jax.grid import expand
from vlm_jax.grid.launchers import Worker, WorkerHandle, job_spec, make_jobs


def _wait(handle, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rc = handle.poll()
        if rc is not None:
            return rc
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_worker_isolates_failures_and_dead_worker_is_a_failed_job(tmp_path):
    # configs that really fail to build (get_config raises): no JAX work, the worker
    # reports each failure with its traceback in the job's log and serves the next job
    g = expand.expand({"name": "w", "stages": [
        dict(name="s", arg="run,broken=True", axes={"a": [1, 2]})]}, TINY_GRID)
    wd = {r.name: str(tmp_path / r.workdir) for r in g.runs}
    wakeup = threading.Event()
    w = Worker([PY], cli_env(), wakeup)
    try:
        logs = []
        for job in make_jobs(g.runs):
            log = os.path.join(wd[job.name], "run.log")
            logs.append(log)
            h = WorkerHandle(w, job_spec(job, wd), log)
            # the reply wakes the runner (launcher.wait) and is there when it polls
            assert wakeup.wait(120), "the worker's reply did not wake the runner"
            wakeup.clear()
            assert h.poll() == 1
            assert w.alive()
        text = open(logs[1]).read()
        assert "broken=True: this config does not build" in text and "FAILED" in text
        assert "Traceback" in text
        # the worker's own stdout is the protocol: nothing of the job leaked into it
        w.proc.stdin.close()
        w.proc.wait(timeout=30)
        assert w.proc.returncode == 0
    finally:
        w.close()
    # a worker that dies (segfault, OOM kill) without replying: the job reads as failed
    w = Worker([PY], cli_env())
    h = WorkerHandle.__new__(WorkerHandle)  # attach without submitting, then kill
    h.worker, h._rc = w, None
    w.proc.kill()
    assert _wait(h) != 0
    assert job_spec(make_jobs(g.runs)[0], wd)["runs"][0]["workdir"] == wd["s/a=1"]
