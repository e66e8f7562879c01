"""Optimal encoder per LLM (NaViL's rule) and compute-optimal allocation (joint fit).

NaViL (arXiv 2510.08565): for each LLM size, the optimal encoder V* is the smallest
encoder whose loss is within 1% -- of the smallest encoder's loss -- of the encoder
twice its size (here: the next larger encoder of the grid); log V* is then linear in
log N_LLM: log V* = a + b log N_LLM, fitted by least squares with t intervals.

Compute-optimal allocation: minimise the joint fit L(N, D) subject to a FLOP budget
C = c N^p D^q (Chinchilla: c = 6, p = q = 1), over a dense grid of log N, for the fit and
for every bootstrap refit (intervals).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from vlm_jax.analysis import fit as fitlib


def navil_rule(llm, encoder, loss, tol: float = 0.01) -> list[dict]:
    """Per LLM size: the optimal encoder and the comparisons behind it.

    A row per LLM: {"llm", "encoders", "losses", "threshold", "gaps", "optimal",
    "saturated"}; `saturated` is False when no encoder met the rule (then "optimal" is
    the largest encoder: the true optimum is at least that big).
    """
    table: dict[float, dict[float, float]] = {}
    for m, v, l in zip(llm, encoder, loss):
        table.setdefault(float(m), {})[float(v)] = float(l)
    out = []
    for m in sorted(table):
        encs = sorted(table[m])
        losses = [table[m][v] for v in encs]
        row = {"llm": m, "encoders": encs, "losses": losses, "threshold": None,
               "gaps": [], "size_ratios": [], "optimal": None, "saturated": False}
        if len(encs) < 2:
            row["error"] = f"LLM {m:g}: {len(encs)} encoder size(s); the rule needs at least 2"
            out.append(row)
            continue
        row["threshold"] = tol * losses[0]
        for i in range(len(encs) - 1):
            gap = losses[i] - losses[i + 1]
            row["gaps"].append(gap)
            row["size_ratios"].append(encs[i + 1] / encs[i])
            if row["optimal"] is None and gap < row["threshold"]:
                row["optimal"], row["saturated"] = encs[i], True
        if row["optimal"] is None:
            row["optimal"] = encs[-1]
        out.append(row)
    return out


def loglog_fit(x, y, level: float = 0.95) -> dict:
    """Least squares log y = a + b log x with t intervals (needs 3 points for intervals)."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    n = len(lx)
    if n < 2 or len(np.unique(lx)) < 2:
        return {"error": f"{n} point(s) with {len(np.unique(lx))} distinct LLM size(s): "
                         f"the line needs at least 2", "n_points": n}
    b, a = np.polyfit(lx, ly, 1)
    out = {"a": float(a), "b": float(b), "n_points": n, "ci": {}}
    if n >= 3:
        resid = ly - (a + b * lx)
        s2 = float(np.sum(resid ** 2) / (n - 2))
        sxx = float(np.sum((lx - lx.mean()) ** 2))
        se_b = math.sqrt(s2 / sxx)
        se_a = math.sqrt(s2 * (1 / n + lx.mean() ** 2 / sxx))
        t = float(stats.t.ppf(0.5 + level / 2, n - 2))
        out["ci"] = {"a": [a - t * se_a, a + t * se_a], "b": [b - t * se_b, b + t * se_b]}
        out["se"] = {"a": se_a, "b": se_b}
    else:
        out["note"] = "2 points: the line is exact and has no interval"
    return out


def fit_flops_model(N, D, flops) -> dict:
    """flops = c N^p D^q by least squares in logs (p or q fixed to 0 if its variable is constant)."""
    lN, lD, lF = (np.log(np.asarray(v, np.float64)) for v in (N, D, flops))
    cols, names = [np.ones_like(lN)], ["log_c"]
    for name, v in (("p", lN), ("q", lD)):
        if np.ptp(v) > 0:
            cols.append(v)
            names.append(name)
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), lF, rcond=None)
    got = dict(zip(names, coef))
    return {"c": float(np.exp(got["log_c"])), "p": float(got.get("p", 0.0)),
            "q": float(got.get("q", 0.0)), "source": "fitted to the runs' flops column"}


def compute_optimal(f: "fitlib.Fit", budgets: Sequence[float], flops_model: Mapping,
                    n_range: tuple[float, float], level: float = 0.95,
                    grid_points: int = 2001) -> list[dict]:
    """For each budget C: N, D minimising the joint fit with c N^p D^q = C (and intervals)."""
    c, p, q = flops_model["c"], flops_model["p"], flops_model["q"]
    if q <= 0:
        return [{"C": float(C), "error": "the FLOP model does not grow with D (q <= 0)"}
                for C in budgets]
    logn = np.linspace(math.log(n_range[0]), math.log(n_range[1]), grid_points)
    rows = []
    params = {k: np.asarray([f.params[k]]) for k in fitlib.PARAMS}
    boot = {k: f.boot[:, i] for i, k in enumerate(fitlib.PARAMS)}

    def n_part(pr):   # E + A N^-alpha on the N grid: the same for every budget
        return pr["E"][:, None] + pr["A"][:, None] * np.exp(-pr["alpha"][:, None] * logn)
    params["n_part"] = n_part(params)
    if len(f.boot):
        boot["n_part"] = n_part(boot)
    for C in budgets:
        logd = (math.log(C) - math.log(c) - p * logn) / q

        def best(pr):
            L = pr["n_part"] + pr["B"][:, None] * np.exp(-pr["beta"][:, None] * logd)
            i = np.nanargmin(np.where(np.isfinite(L), L, np.inf), axis=1)
            return np.exp(logn[i]), np.exp(logd[i]), L[np.arange(len(i)), i], i

        n_opt, d_opt, l_opt, i = best(params)
        row = {"C": float(C), "N": float(n_opt[0]), "D": float(d_opt[0]), "loss": float(l_opt[0]),
               "at_edge": bool(i[0] in (0, grid_points - 1))}
        if len(f.boot):
            bn, bd, bl, _ = best(boot)
            qq = (1 - level) / 2
            for k, v in (("N", bn), ("D", bd), ("loss", bl)):
                row[f"{k}_ci"] = [float(np.quantile(v, qq)), float(np.quantile(v, 1 - qq))]
        rows.append(row)
    return rows


def default_budgets(flops) -> list[float]:
    """Powers of ten from the smallest run's FLOPs to 100x the largest."""
    lo, hi = math.floor(math.log10(min(flops))), math.ceil(math.log10(max(flops))) + 2
    return [10.0 ** k for k in range(lo, hi + 1)]
