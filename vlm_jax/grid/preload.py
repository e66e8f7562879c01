"""Starts a CLI's imports now and its work later:

    python -m vlm_jax.grid.preload MODULE [ARGS...]     # e.g. vlm_jax.analysis optimal ...

imports `MODULE.__main__` (numpy, scipy, matplotlib, ...: seconds of start-up), then
waits for one line on stdin: `go` runs `MODULE.__main__.main(ARGS)` and exits with its
code; anything else (or end of input: the runner stopped) exits with code 3 and does
nothing. The grid runner arms an analysis entry this way while the last jobs of its stage
still train, so the entry's start-up is paid before the slots go idle, not after.
"""
from __future__ import annotations

import importlib
import sys

NOT_STARTED = 3


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
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
