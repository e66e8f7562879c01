"""Comparisons from fitted curves: encoder vs encoder at each data size, data efficiency.

A grid has one run per (encoder, data size), so the uncertainty of a difference comes
from the fitted L(D) curve of each encoder and its bootstrap (resampling that encoder's
points): the difference of two curves at D, refitted on every resample, gives a
percentile interval. "A bigger encoder is reliably better at D" means the whole interval
of L(bigger) - L(smaller) is below zero.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vlm_jax.analysis import fit as fitlib


def _interval(samples, level=0.95):
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 10:
        return None
    q = (1 - level) / 2
    return [float(np.quantile(s, q)), float(np.quantile(s, 1 - q))]


def encoder_differences(N, D, loss, curves: Mapping[float, "fitlib.Fit"],
                        level: float = 0.95) -> list[dict]:
    """For each data size and each pair (smaller encoder, next bigger one; and smallest vs
    largest): observed and fitted L(bigger) - L(smaller) with a bootstrap interval.

    curves: encoder size -> its L(D) fit (missing sizes give rows without an interval).
    """
    N, D, loss = (np.asarray(v, np.float64) for v in (N, D, loss))
    sizes = sorted(set(N.tolist()))
    pairs = list(zip(sizes[:-1], sizes[1:]))
    if len(sizes) > 2:
        pairs.append((sizes[0], sizes[-1]))
    observed = {(n, d): l for n, d, l in zip(N.tolist(), D.tolist(), loss.tolist())}
    rows = []
    for d in sorted(set(D.tolist())):
        for small, big in pairs:
            row = {"D": d, "N_small": small, "N_big": big, "observed": None,
                   "fitted": None, "ci": None, "reliably_better": None}
            if (small, d) in observed and (big, d) in observed:
                row["observed"] = observed[(big, d)] - observed[(small, d)]
            fs, fb = curves.get(small), curves.get(big)
            if fs is not None and fb is not None:
                row["fitted"] = float(fb.predict(D=[d])[0] - fs.predict(D=[d])[0])
                if len(fs.boot) and len(fb.boot):
                    k = min(len(fs.boot), len(fb.boot))
                    diff = fb.predict_boot(D=[d])[:k, 0] - fs.predict_boot(D=[d])[:k, 0]
                    row["ci"] = _interval(diff, level)
                    if row["ci"] is not None:
                        row["reliably_better"] = bool(row["ci"][1] < 0)
            if row["observed"] is not None or row["fitted"] is not None:
                rows.append(row)
    return rows


def summarise_differences(rows: Sequence[dict]) -> dict:
    """Counts over (D, pair) rows: how often the bigger encoder is reliably better."""
    tested = [r for r in rows if r["reliably_better"] is not None]
    observed = [r for r in rows if r["observed"] is not None]
    return {
        "pairs_tested": len(tested),
        "reliably_better": sum(r["reliably_better"] for r in tested),
        "reliably_worse": sum(1 for r in tested if r["ci"][0] > 0),
        "observed_pairs": len(observed),
        "observed_bigger_lower": sum(1 for r in observed if r["observed"] < 0),
    }


def common_target(curves_losses: Sequence[Sequence[float]]) -> float | None:
    """The lowest loss that every curve reaches in its data: max over curves of min loss."""
    mins = [min(l) for l in curves_losses if len(l)]
    return float(max(mins)) if mins else None


def data_needed(f: "fitlib.Fit", target: float, N: float | None = None,
                level: float = 0.95) -> dict:
    """D to reach loss `target` on fit `f` (an L(D) or joint fit at encoder size N)."""
    d = float(fitlib.loss_to_data(f.params, target, N))
    out = {"target": target, "D": d if np.isfinite(d) else None, "ci": None}
    if len(f.boot):
        bp = {k: f.boot[:, i] for i, k in enumerate(fitlib.PARAMS)}
        if f.kind == "D":
            bp["A"] = None
        bd = fitlib.loss_to_data(bp, target, N)
        s = np.sort(np.where(np.isnan(bd), np.inf, bd))    # unreachable = inf, sorts last
        q = (1 - level) / 2
        out["ci"] = [float(s[int(np.floor(q * (len(s) - 1)))]),
                     float(s[int(np.ceil((1 - q) * (len(s) - 1)))])]
        out["unreachable_frac"] = float(np.mean(~np.isfinite(bd)))
    return out
