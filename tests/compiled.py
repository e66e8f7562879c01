"""Test helper: programs compiled the way the trainer compiles its small ones.

The tests' programs are tiny and run a few times: XLA:CPU's fast level
(`trainer.FAST_COMPILE`: LLVM at -O0, no expensive passes) compiles them in about a third
of the default level's time (a flax init with its per-parameter random draws: 18 -> 5 CPU-s)
and gives the same results within fp32 rounding. The HLO passes (fusion, buffer
assignment, cost analysis) are the default level's.
"""
from __future__ import annotations

import jax

from vlm_jax.train.trainer import FAST_COMPILE


def fast(f, *args, **kwargs):
    """`f` jitted and compiled at the fast level for these arguments (call it with
    arguments of the same shapes and dtypes)."""
    return jax.jit(f).lower(*args, **kwargs).compile(FAST_COMPILE)


def run_fast(f, *args, **kwargs):
    """f(*args) through a fast-level compile (one compile per call: for a function that runs
    once on these shapes)."""
    return fast(f, *args, **kwargs)(*args, **kwargs)
