r"""One training run.

    python -m vlm_jax.main --config configs/demo.py:run --workdir runs/x \
        [--config.train.steps=100] [--coordinator_address host:port --num_processes N \
         --process_id i]

In-process: `vlm_jax.main.run(config, workdir) -> result dict` (what `result.json` holds).
Multi-host: the three flags above, or the TPU / SLURM environment (`jax.distributed`
auto-detects it), initialise `jax.distributed` before anything touches a device; on CPU
the collectives go through gloo. Only process 0 writes files.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file: PATH.py[:ARG]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory of the run (created)")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")

EXIT_NONFINITE = 3


def _auto_distributed() -> bool:
    """True when the environment describes a multi-process job jax can detect."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """`jax.distributed.initialize` from flags or the environment (no-op for one process)."""
    import jax
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("multi-host needs all of --coordinator_address, --num_processes "
                             "and --process_id")
        if num_processes == 1:
            return
        # CPU collectives across processes go through gloo (no effect on GPU/TPU clients).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    elif _auto_distributed():
        jax.distributed.initialize()


def run(config, workdir: str, **kw) -> dict:
    """Trains one run in this process; returns the result dict (see docs/contracts.md)."""
    from vlm_jax.train import trainer
    return trainer.run(config, workdir, **kw)


def setup_logging() -> None:
    """A run's logging: INFO with timestamps, libraries quiet (also the grid worker's)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_problem(config, spec: str) -> str | None:
    """Why `config` (the `--config` flag's value, from file spec `spec`) is not one run's
    config, or None: an unreadable file (config_flags defers that error to first use) or a
    grid config (`grid` and no `train`: `python -m vlm_jax.grid run` runs those)."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return (f"--config {spec}: no config file {path!r} (a path relative to the "
                f"current directory {os.getcwd()!r}, or absolute)")
    try:
        keys = set(config.keys())
    except OSError as e:
        cause = e.__cause__ or e
        detail = " ".join(str(cause).split())
        return f"--config {spec}: cannot load the config file ({detail})"
    if "grid" in keys and "train" not in keys:
        return (f"--config {spec} is a grid, not one run: run it with "
                f"`python -m vlm_jax.grid run {spec} --root DIR`, or name one of its "
                f"single-run presets ({path}:PRESET, e.g. configs/demo.py:run)")
    return None


def main(argv):
    del argv
    setup_logging()
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. configs/demo.py:run)")
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        print(f"error: --workdir {_WORKDIR.value} is a file, not a directory", file=sys.stderr)
        sys.exit(2)
    problem = _flag_config_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        init_distributed(_COORD.value, _NPROC.value, _PID.value)
    except ValueError as e:   # flags that do not describe a job (jax's checks included)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from vlm_jax.train import trainer
    try:
        result = run(_CONFIG.value, _WORKDIR.value)
    except trainer.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {e}\n(set VLM_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    status = result.get("status")
    if status == "done":
        print(f"done: {result.get('steps')} steps, train loss "
              f"{result.get('final/train_loss')}, eval loss {result.get('final/eval_loss')} "
              f"-> {os.path.join(_WORKDIR.value, 'result.json')}")
    else:
        print(f"{status} at step {result.get('steps')}; run the same command to resume")


def _flag_config_problem(argv=None) -> str | None:
    """`config_problem` of the `--config` flag, else None. With `argv` (flag parsing
    failed, e.g. a `--config.train.steps` override of a grid config, so the flag may hold
    nothing) the config file named there is loaded again to look at it."""
    flag = flags.FLAGS["config"]
    spec, value = getattr(flag, "_config_filename", None), flag.value
    if argv is not None and value is None:
        for i, a in enumerate(argv):
            if a.startswith("--config="):
                spec = a.split("=", 1)[1]
            elif a == "--config" and i + 1 < len(argv):
                spec = argv[i + 1]
        if spec and not os.path.isfile(spec.split(":", 1)[0]):
            return config_problem(None, spec)
        if spec:
            from vlm_jax.grid import expand
            path, _, arg = spec.partition(":")
            try:
                value = expand.build_config(path, arg)
            except Exception:  # noqa: BLE001 - its own errors are reported as before
                return None
    if value is None or not spec:
        return None
    return config_problem(value, spec)


def _parse_flags(argv):
    """absl flag parsing with a one-line error for bad flags or config overrides (an
    unknown `--config.x.y` key, a bad `get_config` argument) instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises several types
        problem = _flag_config_problem(argv)
        if problem:  # an override of a config that is missing or a grid: say that
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        msg = str(e).replace("\\n", "\n")
        if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":   # a repr'd message
            msg = msg[1:-1]
        if "Traceback" in msg:  # config file errors arrive with their traceback inside
            msg = [l for l in msg.splitlines() if l.strip()][-1].strip()
        msg = " ".join(msg.replace("\\'", "'").split())
        print(f"error: {type(e).__name__}: {msg}\nPass --helpfull to see the flags.",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
