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


def subprocess_env(root: str, devices: int | None = None) -> dict:
    """os.environ for a test's JAX subprocess on CPU: PYTHONPATH=root, the parent's XLA_FLAGS
    (tests/run.sh's compile level: the subprocess shares the session's compilation cache
    entries) without its virtual device count, and `devices` virtual devices if given."""
    import os
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    flags = [f for f in env.pop("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env
