"""Where and how the runs of a grid execute: local processes, a GPU host, a TPU VM / pod
(gcloud), a GKE cluster (xpk).

A launcher turns a `Job` (one run, or the runs of one WSD sweep) into processes:
- `setup_commands()`: run once before the first job (install, create TPU, sync code);
- `job_commands(job)`: the steps of one job; a step is a list of argvs that run at the
  same time (several TPU slices), steps run one after the other;
- `start(job, slot, log_path)`: starts the job and returns a `Handle` (`poll() -> None |
  exit code`, `terminate()`);
- `wait(timeout)`: blocks until a job of this launcher may have ended (a worker's reply,
  a process's exit: `wakeup` is set) or `timeout` passes, so the runner dispatches the
  next job the moment a slot frees instead of at its next poll.
Every command is an argv list; whatever must pass through a remote shell (`--command`)
is built with `shlex.join`, so a config value never reaches a shell unquoted.
`--dry-run` prints exactly these commands (`format_command`). Credentials are never put
in commands, configs or logs: gcloud/xpk use the caller's own login.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from vlm_jax import malloc
from vlm_jax.grid.expand import GridError, Run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JAX_VERSION = "0.10.2"
LAUNCHERS = ("local", "gpu", "tpu", "xpk")


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit the runner schedules: a single run, or the runs of one WSD sweep."""
    name: str                      # the run name, or the sweep key
    runs: tuple[Run, ...]
    deps: tuple[str, ...]          # run names outside the job it needs
    # runs of the same WSD sweep that are already done: not run again (the worker skips
    # them), but part of the job spec, so the resumed sweep is planned as when it started
    # (its stable run, shared warmup and branch points)
    done: tuple[Run, ...] = ()

    @property
    def sweep(self) -> str:
        return self.runs[0].sweep if len(self.runs) > 1 or self.runs[0].sweep else ""


def make_jobs(runs: Sequence[Run], done: Sequence[Run] = ()) -> list[Job]:
    """Groups runs into jobs (sweep stages: one job per sweep key), in run order. `done`:
    runs already done; those of a job's WSD sweep go into its `done` (a sweep resumed
    after its stable run finished must be planned with it, or its largest unfinished run
    would become the stable run with another schedule than the one its workdir holds)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.sweep_key, []).append(r)
    finished: dict[str, list[Run]] = {}
    for r in done:
        if r.sweep and r.sweep_key in groups:
            finished.setdefault(r.sweep_key, []).append(r)
    jobs = []
    for key, rs in groups.items():
        names = {r.name for r in rs}
        deps = tuple(dict.fromkeys(d for r in rs for d in r.deps if d not in names))
        jobs.append(Job(name=key, runs=tuple(rs), deps=deps,
                        done=tuple(finished.get(key, ()))))
    return jobs


def format_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """One shell line for an argv (with `KEY=VALUE` env prefixes), shlex-quoted."""
    pre = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
    return " ".join(pre + [shlex.quote(str(a)) for a in argv])


def repo_relative(path: str) -> str:
    """A path inside the checkout as a relative path (remote hosts have their own copy)."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO)
    if rel.startswith(".."):
        raise GridError(f"config file {path} is outside the checkout {REPO}: remote launchers "
                        "only ship the checkout; move it under configs/")
    return rel


TRAINER = ("-m", "vlm_jax.main")


def run_argv(run: Run, workdirs: Mapping[str, str], python: Sequence[str],
             config_file: str | None = None, trainer: Sequence[str] = TRAINER) -> list[str]:
    """`python -m vlm_jax.main --config FILE:ARG --workdir WD [--config.KEY=DEP_WD ...]`.

    `workdirs` maps run names (this one and its dependencies) to their workdirs.
    """
    cfg = config_file or run.config_file
    spec = f"{cfg}:{run.arg}" if run.arg else cfg
    argv = [*python, *trainer, "--config", spec, "--workdir", workdirs[run.name]]
    argv += [f"--config.{key}={workdirs[dep]}" for key, dep in run.overrides]
    return argv


def job_spec(job: Job, workdirs: Mapping[str, str], relative: bool = False) -> dict:
    """The JSON a worker runs (`python -m vlm_jax.grid.worker --job JSON`)."""
    return {"name": job.name, "sweep": job.sweep,
            "sweep_axis": job.runs[0].sweep_axis,
            "runs": [{"name": r.name,
                      "config_file": repo_relative(r.config_file) if relative else r.config_file,
                      "arg": r.arg, "axes": dict(r.axes), "workdir": workdirs[r.name],
                      "overrides": {k: workdirs[d] for k, d in r.overrides}}
                     for r in (*job.done, *job.runs)]}


def job_argv(job: Job, workdirs: Mapping[str, str], python: Sequence[str],
             relative: bool = False, trainer: Sequence[str] = TRAINER) -> list[str]:
    """The command of a job: `vlm_jax.main` for a run, the worker for a sweep."""
    if not job.sweep and len(job.runs) == 1:
        r = job.runs[0]
        return run_argv(r, workdirs, python, repo_relative(r.config_file) if relative else None,
                        trainer)
    spec = json.dumps(job_spec(job, workdirs, relative), sort_keys=True, separators=(",", ":"))
    return [*python, "-m", "vlm_jax.grid.worker", "--job", spec]


# ----------------------------------------------------------------------------- handles


class Handle:
    """A started job. `poll()` -> None while running, else the exit code."""

    def poll(self) -> int | None:
        raise NotImplementedError

    def terminate(self, grace_s: float = 20.0) -> None:
        raise NotImplementedError


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (the trainer checkpoints on it), then SIGKILL after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait()


def _notify_on_exit(proc: subprocess.Popen, wakeup: threading.Event | None) -> None:
    """Sets `wakeup` when `proc` exits (a daemon thread waits on it)."""
    if wakeup is not None:
        threading.Thread(target=lambda: (proc.wait(), wakeup.set()), daemon=True).start()


class StepsHandle(Handle):
    """Runs steps one after the other; the argvs of one step run at the same time.
    `wakeup` (optional) is set whenever one of its processes exits."""

    def __init__(self, steps: Sequence[Sequence[Sequence[str]]], log_path: str,
                 env: Mapping[str, str] | None = None,
                 wakeup: threading.Event | None = None):
        self._steps = [list(s) for s in steps]
        self._env = dict(env) if env is not None else None
        self._wakeup = wakeup
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self._log = open(log_path, "ab")
        self._procs: list[subprocess.Popen] = []
        self._rc: int | None = None
        self._next()

    def _next(self) -> None:
        if not self._steps:
            self._rc = 0
            self._log.close()
            return
        step = self._steps.pop(0)
        self._procs = []
        for argv in step:
            self._log.write(f"$ {format_command(argv)}\n".encode())
            self._log.flush()
            self._procs.append(subprocess.Popen(
                list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=self._env,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO))
            _notify_on_exit(self._procs[-1], self._wakeup)

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        codes = [p.poll() for p in self._procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            _stop(self._procs, 5.0)
            self._rc = bad[0]
            self._log.close()
        elif all(c == 0 for c in codes):
            self._next()
        return self._rc

    def terminate(self, grace_s: float = 20.0) -> None:
        _stop(self._procs, grace_s)
        self._steps = []
        if self._rc is None:
            self._rc = -signal.SIGTERM
            self._log.close()


class LineServer:
    """A child process that reads one JSON request per stdin line and writes one JSON
    reply per stdout line (the grid worker; the runner's analysis server,
    `vlm_jax.grid.preload --serve`). A reader thread queues each reply on `replies`
    (None when its output ends: the process exited), then sets `wakeup` if given."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None,
                 wakeup: threading.Event | None = None, **popen):
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=dict(env) if env is not None else None, text=True, bufsize=1, **popen)
        self.replies: queue.Queue = queue.Queue()
        self.wakeup = wakeup
        threading.Thread(target=self._read, daemon=True).start()

    def _put(self, reply: dict | None) -> None:
        self.replies.put(reply)   # queued first: a waiter woken by the set finds it
        if self.wakeup is not None:
            self.wakeup.set()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._put(json.loads(line))
            except ValueError:
                continue
        self._put(None)  # end of output: the process exited

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: dict) -> None:
        """Writes one request line (raises OSError / ValueError when its input is closed)."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()


class Worker(LineServer):
    """A persistent `python -m vlm_jax.grid.worker` process: imports JAX once and runs
    jobs in-process one after the other (saves the start-up of a process per run).
    `wakeup` is the runner's signal that a job may have ended."""

    def __init__(self, python: Sequence[str], env: Mapping[str, str] | None,
                 wakeup: threading.Event | None = None):
        super().__init__([*python, "-m", "vlm_jax.grid.worker"], env, wakeup, stderr=None,
                         start_new_session=True, cwd=REPO)

    def submit(self, spec: dict, log_path: str) -> None:
        self.send({"job": spec, "log": log_path})

    def close(self, grace_s: float = 20.0) -> None:
        close_workers([self], grace_s)


def close_workers(workers: Sequence[Worker], grace_s: float = 20.0) -> None:
    """Ends idle workers all at once (end of input, SIGTERM), then waits for them."""
    alive = [w for w in workers if w.alive()]
    for w in alive:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
    _stop([w.proc for w in alive], grace_s)


class WorkerHandle(Handle):
    def __init__(self, worker: Worker, spec: dict, log_path: str):
        self.worker = worker
        self._rc: int | None = None
        self.info: dict = {}   # the worker's job counters (worker._JOB_STATS)
        worker.submit(spec, log_path)

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        try:
            reply = self.worker.replies.get_nowait()
        except queue.Empty:
            if not self.worker.alive():  # died without a reply (segfault, OOM kill)
                rc = self.worker.proc.poll()
                self._rc = rc if rc else 1
            return self._rc
        if reply is None:
            rc = self.worker.proc.wait()
            self._rc = rc if rc else 1
        else:
            self._rc = 0 if reply.get("ok") else 1
            self.info = {k: v for k, v in reply.items() if k not in ("job", "ok", "error")}
        return self._rc

    def terminate(self, grace_s: float = 20.0) -> None:
        self.worker.close(grace_s)
        if self._rc is None:
            self._rc = -signal.SIGTERM


# ----------------------------------------------------------------------------- launchers


class Launcher:
    name = "base"
    remote = False

    def __init__(self, root: str, parallel: int = 1, python: Sequence[str] | None = None):
        self.root = os.path.abspath(root)
        self.parallel = max(1, int(parallel))
        self.python = list(python or [sys.executable])
        self.wakeup = threading.Event()   # set when one of its jobs may have ended

    def wait(self, timeout: float) -> bool:
        """Blocks until a job may have ended (`wakeup`) or `timeout` passes; True when
        woken. Clears `wakeup` before returning: a job that ends after this is seen
        by the caller's next `poll`s and wakes the next `wait`."""
        woken = self.wakeup.wait(timeout)
        self.wakeup.clear()
        return woken

    # workdir of every run as the job's processes see it
    def workdirs(self, runs: Sequence[Run]) -> dict[str, str]:
        return {r.name: os.path.join(self.root, r.workdir) for r in runs}

    def env(self, slot: int = 0) -> dict[str, str]:
        return {}

    def setup_commands(self) -> list[list[str]]:
        return []

    def job_commands(self, job: Job, all_runs: Mapping[str, Run],
                     dry_run: bool = False) -> list[list[list[str]]]:
        raise NotImplementedError

    def start(self, job: Job, all_runs: Mapping[str, Run], slot: int,
              log_path: str) -> Handle:
        env = {**os.environ, **self.env(slot)}
        return StepsHandle(self.job_commands(job, all_runs), log_path, env, self.wakeup)

    def close(self) -> None:
        pass

    def prestart(self) -> None:
        """Starts what runs jobs before the grid is planned (local workers); default none."""

    def _job_runs(self, job: Job, all_runs: Mapping[str, Run]) -> list[Run]:
        return list(job.done) + list(job.runs) + [all_runs[d] for d in job.deps]


class LocalLauncher(Launcher):
    """K local processes. `executor="worker"` (default) keeps K persistent worker
    processes that run jobs in-process; `executor="process"` starts one
    `python -m vlm_jax.main` per run. Both share one persistent compilation cache."""
    name = "local"

    def __init__(self, root: str, parallel: int = 1, python: Sequence[str] | None = None,
                 executor: str = "worker", extra_env: Mapping[str, str] | None = None,
                 trainer: Sequence[str] = TRAINER):
        super().__init__(root, parallel, python)
        self.trainer = tuple(trainer)  # argv after python of one run (process executor)
        if executor not in ("worker", "process"):
            raise GridError(f"--executor {executor!r}: use worker or process")
        self.executor = executor
        self.extra_env = dict(extra_env or {})
        self._workers: dict[int, Worker] = {}

    def env(self, slot: int = 0) -> dict[str, str]:
        env = {
            "PYTHONPATH": os.pathsep.join(
                [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "JAX_COMPILATION_CACHE_DIR": os.environ.get(
                "JAX_COMPILATION_CACHE_DIR", os.path.join(self.root, ".cache", "jax")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": os.environ.get(
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": os.environ.get(
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        }
        if malloc.env_value():   # XLA:CPU step temporaries reuse mapped memory (vlm_jax.malloc)
            env["GLIBC_TUNABLES"] = malloc.env_value()
        env.update(self.extra_env)
        return env

    def job_commands(self, job, all_runs, dry_run: bool = False):
        wd = self.workdirs(self._job_runs(job, all_runs))
        return [[job_argv(job, wd, self.python, trainer=self.trainer)]]

    def prestart(self) -> None:
        """Starts the persistent workers now: they import JAX and the trainer while the
        runner loads and plans the grid (`close` stops them if nothing runs)."""
        if self.executor == "worker":
            for slot in range(self.parallel):
                self._worker(slot)

    def _worker(self, slot: int) -> Worker:
        worker = self._workers.get(slot)
        if worker is None or not worker.alive():
            worker = Worker(self.python, {**os.environ, **self.env(slot)}, self.wakeup)
            self._workers[slot] = worker
        return worker

    def start(self, job, all_runs, slot, log_path):
        if self.executor == "process":
            return super().start(job, all_runs, slot, log_path)
        worker = self._worker(slot)
        spec = job_spec(job, self.workdirs(self._job_runs(job, all_runs)))
        return WorkerHandle(worker, spec, log_path)

    def close(self) -> None:
        close_workers(list(self._workers.values()))
        self._workers.clear()


GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                 "--xla_gpu_enable_triton_gemm=false "
                 "--xla_gpu_enable_highest_priority_async_stream=true "
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728")


class GpuLauncher(LocalLauncher):
    """One GPU host: local processes with XLA GPU flags; `gpus_per_run` devices per slot
    (CUDA_VISIBLE_DEVICES), optional `pip install jax[cuda12]` first."""
    name = "gpu"

    def __init__(self, root, parallel=1, python=None, executor="process",
                 gpus_per_run: int = 0, install_cuda: bool = False, extra_env=None):
        super().__init__(root, parallel, python, executor, extra_env)
        self.gpus_per_run = gpus_per_run
        self.install_cuda = install_cuda

    def env(self, slot: int = 0) -> dict[str, str]:
        env = super().env(slot)
        if "GLIBC_TUNABLES" not in {**os.environ, **self.extra_env}:   # CPU-only setting
            env.pop("GLIBC_TUNABLES", None)
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                  GPU_XLA_FLAGS]))
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ.get(
            "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9" if self.parallel == 1 else
            f"{0.9 / self.parallel:.2f}" if not self.gpus_per_run else "0.9")
        if self.gpus_per_run:
            first = slot * self.gpus_per_run
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(i) for i in range(first, first + self.gpus_per_run))
        return env

    def setup_commands(self):
        if not self.install_cuda:
            return []
        return [[*self.python, "-m", "pip", "install", "-U", f"jax[cuda12]=={JAX_VERSION}"]]


@dataclasses.dataclass
class CloudOptions:
    project: str = ""
    zone: str = ""
    remote_root: str = ""          # gs://bucket/path: workdirs every host can read/write
    # tpu
    tpu_name: str = ""
    accelerator: str = "v5p-8"     # --accelerator-type / --tpu-type
    tpu_version: str = "tpu-ubuntu2204-base"
    num_slices: int = 1
    spot: bool = False
    create: bool = False           # create the TPU VM / queued resource first
    coordinator: str = ""          # multi-slice: slice 0 worker 0 address (else looked up)
    # xpk
    cluster: str = ""
    docker_image: str = ""         # prebuilt image with the requirements installed
    base_docker_image: str = "python:3.11-slim"  # else: xpk copies the checkout onto it
    workload_prefix: str = "vlmjax"
    timeout_s: int = 7 * 24 * 3600


def _need(opts: CloudOptions, launcher: str, *fields: str) -> None:
    missing = [f for f in fields if not getattr(opts, f)]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise GridError(f"--launcher {launcher} needs {flags} (or the environment "
                        f"variables in launch/{'tpu_pod' if launcher == 'tpu' else launcher}.sh)")


class _CloudLauncher(Launcher):
    remote = True
    code_dir = "~/vlm_jax"

    def __init__(self, root, parallel=1, opts: CloudOptions | None = None):
        super().__init__(root, parallel, ["python3"])
        self.opts = opts or CloudOptions()
        if self.opts.remote_root and not self.opts.remote_root.startswith("gs://"):
            raise GridError(f"--remote-root {self.opts.remote_root!r} must be a gs:// path "
                            "that every host can reach")

    def workdirs(self, runs):
        base = self.opts.remote_root.rstrip("/")
        return {r.name: f"{base}/{r.workdir}" for r in runs}

    def cache_dir(self) -> str:
        """The compilation cache every run of the grid shares (JAX reads gs:// paths)."""
        return f"{self.opts.remote_root.rstrip('/')}/.cache/jax"

    def fetch_commands(self, job: Job) -> list[list[str]]:
        """Copies each run's small result files back into ROOT (for status/results.csv)."""
        wd = self.workdirs(job.runs)
        cmds = []
        for r in job.runs:
            local = os.path.join(self.root, r.workdir)
            cmds.append(["gcloud", "storage", "cp", f"{wd[r.name]}/result.json",
                         f"{wd[r.name]}/config.json", f"{wd[r.name]}/metrics.jsonl",
                         local + "/"])
        return [[c] for c in cmds]

    def start(self, job, all_runs, slot, log_path):
        for r in job.runs:
            os.makedirs(os.path.join(self.root, r.workdir), exist_ok=True)
        return StepsHandle(self.job_commands(job, all_runs), log_path, None, self.wakeup)


class TpuLauncher(_CloudLauncher):
    """Cloud TPU VM / pod slice(s) through `gcloud compute tpus tpu-vm`: every run executes
    on all workers (`--worker=all`) of every slice; multi-slice through queued resources
    and the MEGASCALE_* variables."""
    name = "tpu"

    def __init__(self, root, parallel=1, opts=None):
        super().__init__(root, parallel, opts)
        _need(self.opts, "tpu", "tpu_name", "zone", "project", "remote_root")
        if self.parallel != 1:
            raise GridError("--launcher tpu runs one run at a time on its TPU (--parallel 1); "
                            "use xpk to run several at once")

    def _loc(self) -> list[str]:
        return [f"--zone={self.opts.zone}", f"--project={self.opts.project}"]

    def nodes(self) -> list[str]:
        o = self.opts
        return [o.tpu_name] if o.num_slices == 1 else [f"{o.tpu_name}-{i}"
                                                       for i in range(o.num_slices)]

    def ssh(self, node: str, remote_cmd: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self._loc(),
                "--worker=all", f"--command={remote_cmd}"]

    def code_archive(self) -> str:
        return os.path.join(self.root, ".cache", "code.tgz")

    def setup_commands(self):
        o = self.opts
        cmds = []
        if o.create:
            if o.num_slices == 1:
                cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "create", o.tpu_name,
                             *self._loc(), f"--accelerator-type={o.accelerator}",
                             f"--version={o.tpu_version}"] + (["--spot"] if o.spot else []))
            else:
                cmds.append(["gcloud", "compute", "tpus", "queued-resources", "create",
                             o.tpu_name, *self._loc(), f"--accelerator-type={o.accelerator}",
                             f"--runtime-version={o.tpu_version}",
                             f"--node-count={o.num_slices}", f"--node-prefix={o.tpu_name}"]
                            + (["--spot"] if o.spot else []))
        archive = self.code_archive()
        cmds.append(["mkdir", "-p", os.path.dirname(archive)])
        cmds.append(["tar", "czf", archive, "--exclude=.venv", "--exclude=.git",
                     "--exclude=runs", "--exclude=__pycache__", "-C", REPO, "."])
        install = (f"mkdir -p {self.code_dir} && tar xzf ~/code.tgz -C {self.code_dir} && "
                   f"cd {self.code_dir} && (test -x .venv/bin/python || python3 -m venv .venv)"
                   " && " + shlex.join([".venv/bin/pip", "install", "-q", "-r",
                                        "requirements.txt", f"jax[tpu]=={JAX_VERSION}"]))
        for node in self.nodes():
            cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                         f"{node}:~/code.tgz", *self._loc(), "--worker=all"])
            cmds.append(self.ssh(node, install))
        return cmds

    def coordinator_command(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.nodes()[0],
                *self._loc(), "--format=value(networkEndpoints[0].ipAddress)"]

    def coordinator(self, dry_run: bool) -> str:
        if self.opts.coordinator:
            return self.opts.coordinator
        if dry_run:
            return "COORDINATOR_IP"
        out = subprocess.run(self.coordinator_command(), capture_output=True, text=True,
                             check=True)
        self.opts.coordinator = out.stdout.strip().splitlines()[0]
        return self.opts.coordinator

    def job_commands(self, job, all_runs, dry_run: bool = False):
        wd = self.workdirs(self._job_runs(job, all_runs))
        argv = job_argv(job, wd, [".venv/bin/python"], relative=True)
        if self.opts.num_slices > 1:
            argv += [f"--config.mesh.dcn_shape=({self.opts.num_slices}, 1, 1)"] \
                if argv[2] == "vlm_jax.main" else []
        step = []
        for i, node in enumerate(self.nodes()):
            env = ["env", f"JAX_COMPILATION_CACHE_DIR={self.cache_dir()}"]
            if self.opts.num_slices > 1:
                env += [f"MEGASCALE_NUM_SLICES={self.opts.num_slices}",
                       f"MEGASCALE_SLICE_ID={i}",
                       f"MEGASCALE_COORDINATOR_ADDRESS={self.coordinator(dry_run)}:8080"]
            step.append(self.ssh(node, f"cd {self.code_dir} && " + shlex.join(env + argv)))
        return [step] + self.fetch_commands(job)


class XpkLauncher(_CloudLauncher):
    """GKE TPU/GPU clusters through xpk: one workload per job (`--parallel` at a time),
    waits for it, then copies the run's result files back."""
    name = "xpk"

    def __init__(self, root, parallel=1, opts=None):
        super().__init__(root, parallel, opts)
        _need(self.opts, "xpk", "cluster", "zone", "project", "remote_root")

    def workload_name(self, job: Job) -> str:
        """A valid, stable workload name: [a-z][-a-z0-9]*, at most 40 characters."""
        h = hashlib.sha1(f"{self.opts.remote_root}|{job.name}".encode()).hexdigest()[:8]
        prefix = re.sub(r"[^a-z0-9-]+", "-", self.opts.workload_prefix.lower()).strip("-")
        stage = re.sub(r"[^a-z0-9-]+", "-", job.runs[0].stage.lower()).strip("-")
        name = f"{prefix or 'vlmjax'}-{stage}"[:30].strip("-")
        if not name[0].isalpha():
            name = "w" + name
        return f"{name}-{h}"

    def job_commands(self, job, all_runs, dry_run: bool = False):
        o = self.opts
        wd = self.workdirs(self._job_runs(job, all_runs))
        run_cmd = shlex.join(["env", f"JAX_COMPILATION_CACHE_DIR={self.cache_dir()}"]
                             + job_argv(job, wd, ["python3"], relative=True)
                             + ([f"--config.mesh.dcn_shape=({o.num_slices}, 1, 1)"]
                                if o.num_slices > 1 and not job.sweep else []))
        if o.docker_image:
            image = [f"--docker-image={o.docker_image}"]
            command = run_cmd
        else:
            image = [f"--base-docker-image={o.base_docker_image}"]
            command = shlex.join(["pip", "install", "-q", "-r", "requirements.txt",
                                  f"jax[tpu]=={JAX_VERSION}"]) + " && " + run_cmd
        loc = [f"--cluster={o.cluster}", f"--zone={o.zone}", f"--project={o.project}"]
        name = self.workload_name(job)
        create = ["xpk", "workload", "create", f"--workload={name}", *loc,
                  f"--tpu-type={o.accelerator}", f"--num-slices={o.num_slices}", *image,
                  f"--command={command}"]
        wait = ["xpk", "workload", "list", *loc, f"--wait-for-job-completion={name}",
                f"--timeout={o.timeout_s}"]
        return [[create], [wait]] + self.fetch_commands(job)


def make_launcher(name: str, root: str, parallel: int = 1, *, executor: str = "",
                  gpus_per_run: int = 0, install_cuda: bool = False,
                  opts: CloudOptions | None = None) -> Launcher:
    if name == "local":
        return LocalLauncher(root, parallel, executor=executor or "worker")
    if name == "gpu":
        return GpuLauncher(root, parallel, executor=executor or "process",
                           gpus_per_run=gpus_per_run, install_cuda=install_cuda)
    if name == "tpu":
        return TpuLauncher(root, parallel, opts)
    if name == "xpk":
        return XpkLauncher(root, parallel, opts)
    raise GridError(f"--launcher {name!r}: valid: {list(LAUNCHERS)}")
