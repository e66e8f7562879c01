"""Runs grid jobs in-process: one run through `vlm_jax.main.run`, or a WSD sweep through
`vlm_jax.grid.sweep`.

    python -m vlm_jax.grid.worker --job JSON     # one job, exit code 0 when every run is done
    python -m vlm_jax.grid.worker                # serve: JSON lines {"job", "log"} on stdin,
                                                 # one reply {"job", "ok", "error"} each

Serving keeps JAX imported and its caches warm across runs (the local launcher's default
executor): runs of equal shapes reuse the compiled programs of earlier runs in memory
(`vlm_jax.train.program_cache`), so such a run skips tracing, lowering and compiling;
a program some earlier process built is loaded from its serialized file instead.
While a job runs, the process's stdout/stderr (file descriptors 1 and 2, so
XLA's C++ logs too) go to the job's log; replies use a private copy of the original
stdout. A job's failure is reported, not raised: the worker goes on with the next one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

from vlm_jax.grid import expand


def build_run_config(run: dict):
    """The config of one run of a job spec: get_config(arg) plus the `needs` overrides."""
    config = expand.build_config(run["config_file"], run["arg"])
    for key, value in (run.get("overrides") or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _done(workdir: str) -> bool:
    try:
        with open(os.path.join(workdir, "result.json")) as f:
            return json.load(f).get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def run_job(spec: dict) -> None:
    """Runs a job spec (see launchers.job_spec); raises when a run fails."""
    runs = spec["runs"]
    configs = [build_run_config(r) for r in runs]  # every config builds before any trains
    if spec.get("sweep"):
        from vlm_jax.grid import sweep  # helper module: WSD sweeps (issue 9)
        sweep.run_sweep([(c, r["workdir"]) for c, r in zip(configs, runs)],
                        axis=spec.get("sweep_axis") or "n")
    else:
        from vlm_jax import main
        for config, r in zip(configs, runs):
            if not _done(r["workdir"]):
                main.run(config, r["workdir"])
    missing = [r["name"] for r in runs if not _done(r["workdir"])]
    if missing:
        raise RuntimeError(f"finished without result.json status done: {missing}")


@contextlib.contextmanager
def _redirect_fds(log_path: str):
    """Points fds 1 and 2 (and sys.stdout/err) at `log_path` for the duration."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


# program_cache.stats() counters a job's timing line records (as their difference)
_JOB_STATS = {"hits": "programs_reused", "misses": "programs_built",
              "disk_hits": "programs_loaded",
              "persistent_hits": "persistent_cache_hits",
              "persistent_misses": "persistent_cache_misses",
              "xla_compile_s": "xla_compile_s", "persistent_load_s": "persistent_load_s",
              "traces": "traces", "trace_s": "trace_s", "lower_s": "lower_s"}


def _program_stats() -> dict:
    """Compiled programs reused / built in this process, persistent-cache hits / misses
    and XLA compile seconds (vlm_jax.train.program_cache)."""
    from vlm_jax.train import program_cache
    return program_cache.stats()


def _job_stats(before: dict, after: dict) -> dict:
    return {name: round(after.get(k, 0) - before.get(k, 0), 3) for k, name in _JOB_STATS.items()}


def _setup_logging() -> None:
    """As `python -m vlm_jax.main` logs (INFO, quiet libraries), into the job's log."""
    from vlm_jax import main as train_main
    train_main.setup_logging()


# What a job imports (a run, a sweep, the feature cache, checkpoints, the models, the data
# pipeline) and the backend it starts: a worker does both before it reads its first job,
# so a worker started with the runner (`LocalLauncher.prestart`) is ready when the first
# job arrives instead of spending its first seconds importing.
# (+ every model kind's module, `vlm_jax.models.KINDS`)
WARM_MODULES = ("vlm_jax.train.trainer", "vlm_jax.train.feature_cache", "vlm_jax.grid.sweep",
                "vlm_jax.data.pipeline")


def warm_up() -> None:
    """Imports `WARM_MODULES` and starts JAX's backend; a failure here is left to the
    first job, which reports it in its own log."""
    import importlib
    try:
        from vlm_jax.models import KINDS
        for name in (*WARM_MODULES, *(m for m, _ in KINDS.values())):
            importlib.import_module(name)
        import jax
        jax.devices()
    except Exception:  # noqa: BLE001 - the job that needs it raises it where it is seen
        pass


def serve_lines(handle) -> int:
    """Serves requests, one JSON object per stdin line, each with a `log` path:
    `handle(request) -> reply dict` runs with file descriptors 1 and 2 appended to that
    log, and the reply goes as one JSON line to the original stdout (the protocol stream:
    nothing else is printed there; outside a request our output goes to stderr). End of
    input returns 0. The grid worker and `vlm_jax.grid.preload --serve` use it."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        with _redirect_fds(msg["log"]):
            out = handle(msg)
        reply.write(json.dumps(out) + "\n")
    return 0


def _serve_job(msg: dict) -> dict:
    """Runs one job of `serve` (in its log); the reply: ok / error and the job's program
    counters."""
    spec = msg["job"]
    ok, error = True, ""
    t0 = time.time()
    before = _program_stats()
    print(f"[worker pid {os.getpid()}] job {spec['name']}", flush=True)
    try:
        run_job(spec)
    except BaseException as e:  # noqa: BLE001 - isolate: report and go on
        if isinstance(e, KeyboardInterrupt):
            raise
        ok, error = False, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    st = _job_stats(before, _program_stats())
    print(f"[worker] job {spec['name']} {'done' if ok else 'FAILED'} in "
          f"{time.time() - t0:.1f}s; programs: {st['programs_reused']} reused in "
          f"memory, {st['programs_built']} built; persistent cache: "
          f"{st['persistent_cache_hits']} hits, {st['persistent_cache_misses']} "
          f"misses; XLA compiling {st['xla_compile_s']:.1f}s", flush=True)
    return {"job": spec["name"], "ok": ok, "error": error, **st}


def serve() -> int:
    _setup_logging()
    warm_up()
    return serve_lines(_serve_job)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.grid.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", help="one job spec (JSON); without it: serve jobs from stdin")
    args = p.parse_args(argv)
    if args.job is None:
        return serve()
    _setup_logging()
    try:
        run_job(json.loads(args.job))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
