"""Benchmark: the joint Chinchilla fit (240 points) with 1,000 bootstrap resamples.

Prints one JSON object: wall time of the whole fit (grid of 4,500 L-BFGS starts + 1,000
resamples, cold = including XLA compilation, and warm), the 60 s target, and a reference
measured in the same run: SciPy L-BFGS-B refitting resamples one at a time in a Python
loop (timed on a subset, scaled to 1,000), as Besiroglu et al.'s notebook does.

    PYTHONPATH=. python benchmarks/fit.py [--n-boot 1000] [--ref-resamples 20]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np
from scipy import optimize as sopt
from scipy import special

from vlm_jax.analysis import fit

POINTS = "/work/shared/data/chinchilla/points.csv"
TARGET_S = 60.0


def load(path):
    rows = list(csv.DictReader(open(path)))[5:]   # Besiroglu et al. drop the first five
    return tuple(np.array([float(r[k]) for r in rows]) for k in ("N", "D", "loss"))


def scipy_resample_loop(N, D, L, start, n, seed=0):
    """Reference: one scipy L-BFGS-B fit per resample, Python loop (Besiroglu et al.)."""
    rng = np.random.default_rng(seed)
    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def obj(p, idx):
        e, a, alpha, b, beta = p
        pred = special.logsumexp([a - alpha * lN[idx], b - beta * lD[idx],
                                  np.full(len(idx), e)], axis=0)
        return np.sum(special.huber(1e-3, lL[idx] - pred))

    out = []
    t = time.perf_counter()
    for _ in range(n):
        idx = rng.integers(0, len(L), len(L))
        out.append(sopt.minimize(obj, start, args=(idx,), method="L-BFGS-B").x)
    return (time.perf_counter() - t) / n, np.asarray(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--points", default=POINTS)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--ref-resamples", type=int, default=20)
    a = p.parse_args()
    N, D, L = load(a.points)
    t = time.perf_counter()
    f = fit.fit_law(N, D, L, "joint", n_boot=a.n_boot)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    fit.fit_law(N, D, L, "joint", n_boot=a.n_boot)
    warm = time.perf_counter() - t
    start = [np.log(f.params["E"]), np.log(f.params["A"]), f.params["alpha"],
             np.log(f.params["B"]), f.params["beta"]]
    per, _ = scipy_resample_loop(N, D, L, start, a.ref_resamples)
    ref_total = per * a.n_boot
    print(json.dumps({
        "benchmark": "analysis_joint_fit_bootstrap",
        "points": int(len(L)), "n_boot": a.n_boot, "grid_starts": int(len(fit.init_grid("joint"))),
        "wall_s": round(cold, 2), "warm_wall_s": round(warm, 2), "target_s": TARGET_S,
        "meets_target": cold <= TARGET_S, "ratio_to_target": round(cold / TARGET_S, 3),
        "reference": "scipy L-BFGS-B per-resample Python loop (bootstrap only, no grid)",
        "reference_per_resample_s": round(per, 4),
        "reference_bootstrap_est_s": round(ref_total, 2),
        "speedup_warm_vs_reference": round(ref_total / warm, 2),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "params": {k: round(v, 5) for k, v in f.params.items()},
        "ci95": {k: [round(x, 5) for x in v] for k, v in f.ci.items()},
    }))


if __name__ == "__main__":
    main()
