"""glibc malloc settings for processes that run XLA:CPU programs.

XLA:CPU allocates each execution's temporaries with malloc. glibc serves blocks above its
(dynamic, up to 32 MB) mmap threshold with a fresh mmap and returns them with munmap, so
every step of a large program faults in and zeroes new pages: ~98k minor faults and ~0.3 s
of system CPU per step of the LLaVA-shaped benchmark config (~9 % of its CPU time), 2-3 s of
system CPU per native demo run. Under `TUNABLES` (one arena, no mmap, no trimming) freed
blocks stay mapped and the next step reuses them. Cost: the process keeps its peak heap
mapped until it exits.

glibc reads GLIBC_TUNABLES at process start only, so it has to be in the environment of a
new process: the local grid launcher (`vlm_jax.grid.launchers.LocalLauncher`) sets it for
its CPU workers, `benchmarks/step.py` re-executes itself with it (`reexec`); for a single
`python -m vlm_jax.main` run on CPU export it yourself:

    export GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296

A GLIBC_TUNABLES already in the environment is always left as it is.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=4294967296")


def env_value(environ: Mapping[str, str] | None = None) -> str:
    """GLIBC_TUNABLES for a new CPU process: the caller's own setting if any, else
    `TUNABLES`; "" on non-Linux systems (nothing to set)."""
    environ = os.environ if environ is None else environ
    if "GLIBC_TUNABLES" in environ:
        return environ["GLIBC_TUNABLES"]
    return TUNABLES if sys.platform.startswith("linux") else ""


def reexec(argv: Sequence[str]) -> None:
    """Re-executes this Python program with GLIBC_TUNABLES = `TUNABLES`, unless it is
    already set or this is not Linux. Call it first thing in a `main()`: it does not return
    when it re-executes."""
    if "GLIBC_TUNABLES" in os.environ or not env_value():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + list(argv),
              dict(os.environ, GLIBC_TUNABLES=TUNABLES))
