"""Kernel layout microbenchmark: x @ W with W [in, out] vs W [out, in] (torch layout).

One dense layer's share of a train step, jitted: forward y = x W, then the input gradient
dx and the weight gradient dW from a cotangent dy, fp32, at the shapes of
`benchmarks/step.py`'s LLaVA LLM (1824 tokens; gate/up 512 -> 1536 / 1376, down
1376 -> 512, q/o 512 -> 512) and its untied LM head (512 -> 32000). [in, out] is
`x @ W`; [out, in] contracts x's last axis with W's axis 1 (`lax.dot_general`), as
`vlm_jax.models.layers.Linear` does. Timed interleaved (in_out, out_in, in_out, ...),
medians; `copies_of_w` counts the HLO ops (outside dots) that transpose or copy the
weight. Prints one JSON object; `ratio` = out_in / in_out (<= 1.05 = no cost).

  PYTHONPATH=. python benchmarks/kernel_layout.py [--quick] [--reps 7]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"gate_up": (1824, 512, 1376), "mlp1536": (1824, 512, 1536),
          "down": (1824, 1376, 512), "attn_qo": (1824, 512, 512), "head": (1824, 512, 32000)}


def in_out(x, w):
    return x @ w


def out_in(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def step_fn(mm):
    def f(x, w, dy):
        y, vjp = jax.vjp(mm, x, w)
        dx, dw = vjp(dy)
        return y, dx, dw
    return jax.jit(f)


def weight_copies(fn, x, w, dy) -> int:
    """HLO ops other than dots/fusions of dots whose operand is the weight parameter and
    that move it (transpose/copy)."""
    hlo = fn.lower(x, w, dy).compile().as_text()
    name = re.search(r"%(\S+) = f32\[[0-9,]+\]\{[0-9,]+\} parameter\(1\)", hlo).group(1)
    return sum(1 for line in hlo.splitlines()
               if re.search(rf"= \S+ (copy|transpose)\(%{re.escape(name)}\)", line))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    reps = 3 if a.quick else a.reps
    rng = np.random.default_rng(0)
    out = {"benchmark": "kernel_layout", "loadavg_start": list(os.getloadavg())}
    ratios = {}
    for name, (m, k, n) in SHAPES.items():
        if a.quick:
            m = 64
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        dy = jnp.asarray(rng.standard_normal((m, n), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32))
        wt = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
        f_io, f_oi = step_fn(in_out), step_fn(out_in)
        r_io, r_oi = f_io(x, w, dy), f_oi(x, wt, dy)
        np.testing.assert_allclose(r_io[0], r_oi[0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(r_io[2].T, r_oi[2], rtol=1e-4, atol=1e-3)
        times = {"in_out": [], "out_in": []}
        for _ in range(reps):
            for key, f, ww in (("in_out", f_io, w), ("out_in", f_oi, wt)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, ww, dy))
                times[key].append(time.perf_counter() - t0)
        med = {key: float(np.median(v)) for key, v in times.items()}
        ratios[name] = med["out_in"] / med["in_out"]
        out[name] = {"shape_x": [m, k], "n_out": n, "in_out_ms": round(med["in_out"] * 1e3, 3),
                     "out_in_ms": round(med["out_in"] * 1e3, 3),
                     "ratio": round(ratios[name], 3),
                     "copies_of_w": {"in_out": weight_copies(f_io, x, w, dy),
                                     "out_in": weight_copies(f_oi, x, wt, dy)}}
    out["ratio_geomean"] = round(float(np.exp(np.mean(np.log(list(ratios.values()))))), 3)
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
