"""Runs many commands of one CLI after one import:

    python -m vlm_jax.grid.preload --serve MODULE       # e.g. vlm_jax.analysis

imports `MODULE.__main__` (numpy, scipy, matplotlib, ...: seconds of start-up) once and
then runs one command per JSON line on stdin,
`{"argv": [ARGS...], "log": PATH}`: `main(ARGS)` with stdout/stderr (file descriptors 1
and 2) appended to PATH, and one reply line `{"rc": EXIT_CODE}` on its own stdout each;
a command's exception or SystemExit is its exit code (traceback in PATH), the next
command still runs. End of input exits 0. The grid runner keeps one such process for
all of a grid's analysis passes (each `fit --partial` pass and each entry), so the
analysis imports (~3 CPU-s: JAX, SciPy, matplotlib) are paid once, while jobs train.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def serve(module: str) -> int:
    from vlm_jax.grid.worker import serve_lines   # light: no JAX in vlm_jax.grid.worker
    cli = importlib.import_module(f"{module}.__main__")

    def run(msg: dict) -> dict:
        print(f"[analysis server pid {os.getpid()}]", flush=True)
        try:
            rc = int(cli.main(list(msg["argv"])) or 0)
        except SystemExit as e:   # argparse errors, sys.exit in the command
            rc = _exit_code(e)
        except Exception:  # noqa: BLE001 - reported in the command's log, go on
            traceback.print_exc()
            rc = 1
        return {"rc": rc}
    return serve_lines(run)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"] and len(argv) == 2:
        return serve(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
