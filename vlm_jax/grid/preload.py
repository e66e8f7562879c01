"""Starts a CLI's imports now and its work later:

    python -m vlm_jax.grid.preload MODULE [ARGS...]     # e.g. vlm_jax.analysis optimal ...
    python -m vlm_jax.grid.preload --serve MODULE       # runs many commands, one import

The first form imports `MODULE.__main__` (numpy, scipy, matplotlib, ...: seconds of
start-up), then waits for one line on stdin: `go` runs `MODULE.__main__.main(ARGS)` and
exits with its code; anything else (or end of input: the runner stopped) exits with code
3 and does nothing.

`--serve` imports it once and then runs one command per JSON line on stdin,
`{"argv": [ARGS...], "log": PATH}`: `main(ARGS)` with stdout/stderr (file descriptors 1
and 2) appended to PATH, and one reply line `{"rc": EXIT_CODE}` on its own stdout each;
a command's exception or SystemExit is its exit code (traceback in PATH), the next
command still runs. End of input exits 0. The grid runner keeps one such process for
all of a grid's analysis passes (each `fit --partial` pass and each entry), so the
analysis imports (~3 CPU-s: JAX, SciPy, matplotlib) are paid once, while jobs train.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

NOT_STARTED = 3


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def serve(module: str) -> int:
    from vlm_jax.grid.worker import _redirect_fds   # light: no JAX in vlm_jax.grid.worker
    cli = importlib.import_module(f"{module}.__main__")
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # only replies on the protocol stream
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        with _redirect_fds(msg["log"]):
            print(f"[analysis server pid {os.getpid()}]", flush=True)
            try:
                rc = int(cli.main(list(msg["argv"])) or 0)
            except SystemExit as e:   # argparse errors, sys.exit in the command
                rc = _exit_code(e)
            except Exception:  # noqa: BLE001 - reported in the command's log, go on
                traceback.print_exc()
                rc = 1
        reply.write(json.dumps({"rc": rc}) + "\n")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"] and len(argv) == 2:
        return serve(argv[1])
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    cli = importlib.import_module(f"{module}.__main__")
    line = sys.stdin.readline()
    if line.strip() != "go":
        return NOT_STARTED
    sys.stdin.close()
    return int(cli.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
