"""Power-law fits: L(N, D) = E + A/N^alpha + B/D^beta and its one-variable forms.

Chinchilla "approach 3" as Besiroglu et al. (2024) ran it: the predicted log loss is
logsumexp(e, a - alpha log N, b - beta log D) with E, A, B = exp(e, a, b); the objective
is the Huber loss (delta = 1e-3) of observed minus predicted log loss, summed over points;
L-BFGS starts from a grid of initialisations and the lowest objective wins. Confidence
intervals come from a bootstrap over points: a resample is a vector of multinomial counts
used as weights, so every resample x start is one lane of a single vmapped L-BFGS
(`optimize.minimize`), with no Python loop over resamples or points.

Laws (`kind`): "joint" (both terms), "N" (E + A/N^alpha), "D" (E + B/D^beta).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.analysis import optimize

PARAMS = ("E", "A", "alpha", "B", "beta")
TERMS = {"joint": ("N", "D"), "N": ("N",), "D": ("D",)}
_TERM_PARAMS = {"N": ("A", "alpha"), "D": ("B", "beta")}
DELTA = 1e-3
# Besiroglu et al.'s grid: alpha, beta in {0, .5, .., 2}; e in {-1, -.5, .., 1}; a, b in {0, 5, .., 25}.
GRID_EXPONENTS = tuple(np.arange(0.0, 2.01, 0.5))
GRID_E = tuple(np.arange(-1.0, 1.01, 0.5))
GRID_LOG_COEF = tuple(np.arange(0.0, 25.1, 5.0))


class FitError(ValueError):
    """The points cannot identify the law (too few, one value only, bad values)."""


def huber(r, delta):
    a = jnp.abs(r)
    return jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _predict_log(theta, x):
    """theta = [e, a1, alpha1, (a2, alpha2)]; x = [n, T] (centred) log features."""
    n, t = x.shape
    terms = theta[1::2][None, :t] - theta[2::2][None, :t] * x
    z = jnp.concatenate([jnp.broadcast_to(theta[0], (n, 1)), terms], axis=1)
    return jax.nn.logsumexp(z, axis=1)


def _objective(theta, x, logy, w, delta):
    return jnp.sum(w * huber(logy - _predict_log(theta, x), delta))


def _value_and_grad(theta, x, logy, w, delta):
    """`_objective` and its gradient by hand: one softmax serves both (2x faster than AD)."""
    n, t = x.shape
    terms = theta[1::2][None, :t] - theta[2::2][None, :t] * x
    z = jnp.concatenate([jnp.broadcast_to(theta[0], (n, 1)), terms], axis=1)
    zmax = jnp.max(z, axis=1, keepdims=True)
    ez = jnp.exp(z - zmax)
    tot = jnp.sum(ez, axis=1)
    r = logy - (zmax[:, 0] + jnp.log(tot))
    f = jnp.sum(w * huber(r, delta))
    c = (-w * jnp.clip(r, -delta, delta) / tot)[:, None] * ez   # df/dz, [n, T + 1]
    g_coef = jnp.sum(c, axis=0)                                  # d/de, d/da_j
    g_exp = -jnp.sum(c[:, 1:] * x, axis=0)                       # d/dalpha_j
    rest = jnp.stack([g_coef[1:], g_exp], axis=1).reshape(-1)    # a1, alpha1, a2, alpha2
    return f, jnp.concatenate([g_coef[:1], rest])


@jax.jit
def _solve(theta0, x, logy, w, delta, maxiter):
    """theta0 [K, P], w [K, n] -> optimize.Result batched over K."""
    solve = lambda th, wk: optimize.minimize(_objective, th, x, logy, wk, delta,
                                             maxiter=maxiter, value_and_grad=_value_and_grad)
    return jax.vmap(solve)(theta0, w)


def _bucket(n: int) -> int:
    """Pad point counts to powers of two (at least 16) so one compilation serves many fits.

    Every L-BFGS evaluation costs in proportion to the padded count: the floor used to be
    256, 20x the demo's 12-point fits. Padding has zero weight, so it changes no sum's
    value, only (through XLA's shape-dependent reduction order) its last-bit rounding.
    """
    return max(16, 1 << (n - 1).bit_length())


def init_grid(kind: str) -> np.ndarray:
    """Besiroglu et al.'s initial values as [K, P] rows of (e, a, alpha[, b, beta])."""
    per_term = [list(itertools.product(GRID_LOG_COEF, GRID_EXPONENTS))] * len(TERMS[kind])
    rows = []
    for e in GRID_E:
        for combo in itertools.product(*per_term):
            rows.append([e] + [v for pair in combo for v in pair])
    return np.asarray(rows, np.float64)


@dataclasses.dataclass
class Fit:
    """A fitted law with its bootstrap; params use the natural scale (E, A, alpha, B, beta)."""
    kind: str
    params: dict                  # name -> float (only the law's parameters)
    ci: dict                      # name -> [lo, hi] (95% percentile bootstrap)
    se: dict                      # name -> bootstrap standard deviation
    n_points: int
    huber_loss: float
    boot: np.ndarray              # [B, 5] bootstrap params in PARAMS order (NaN if absent)
    residuals: dict
    converged: bool
    n_boot: int

    def predict(self, N=None, D=None) -> np.ndarray:
        return predict(self.params, N, D)

    def predict_boot(self, N=None, D=None) -> np.ndarray:
        """[B, n] predictions of every bootstrap refit."""
        return predict({k: self.boot[:, i, None] for i, k in enumerate(PARAMS)}, N, D)

    def band(self, N=None, D=None, level=0.95):
        p = self.predict_boot(N, D)
        q = (1 - level) / 2
        return np.nanquantile(p, q, axis=0), np.nanquantile(p, 1 - q, axis=0)

    def to_json(self) -> dict:
        out = {k: self.params.get(k) for k in PARAMS}
        out.update(kind=self.kind, ci=self.ci, se=self.se, n_points=self.n_points,
                   huber_loss=self.huber_loss, converged=self.converged,
                   n_boot=self.n_boot, residuals=self.residuals)
        return out


def predict(params: Mapping, N=None, D=None) -> np.ndarray:
    """L = E + A/N^alpha + B/D^beta, absent terms (A or B None/NaN) left out."""
    out = np.asarray(params["E"], np.float64)
    for var, (c, p) in (("N", ("A", "alpha")), ("D", ("B", "beta"))):
        coef = params.get(c)
        if coef is None or np.all(np.isnan(np.asarray(coef, np.float64))):
            continue
        vals = N if var == "N" else D
        if vals is None:
            raise ValueError(f"the law has a {var} term: pass {var}")
        out = out + np.asarray(coef) / np.asarray(vals, np.float64) ** np.asarray(params[p])
    return out


def check_design(kind: str, N, D, loss) -> None:
    """Raise FitError unless the points can identify the law `kind`."""
    n_params = 1 + 2 * len(TERMS[kind])
    n = len(loss)
    if n < n_params + 1:
        raise FitError(f"{n} points for {n_params} parameters of L({','.join(TERMS[kind])}):"
                       f" need at least {n_params + 1}")
    for var, vals in (("N", N), ("D", D)):
        if var not in TERMS[kind]:
            continue
        distinct = len(np.unique(vals))
        if distinct < 3:
            raise FitError(f"{var} takes {distinct} distinct value(s): a power law in {var} "
                           f"needs at least 3 (degenerate design)")


def _features(kind, N, D):
    cols = [np.log(np.asarray(N if v == "N" else D, np.float64)) for v in TERMS[kind]]
    x = np.stack(cols, axis=1)
    centre = x.mean(axis=0)
    return x - centre, centre


def _to_centred(theta, centre):
    """Natural log-space params (e, a, alpha, ...) -> centred a' = a - alpha * c."""
    th = np.array(theta, np.float64, copy=True)
    th[..., 1::2] = th[..., 1::2] - th[..., 2::2] * centre
    return th


def _from_centred(theta, centre):
    th = np.array(theta, np.float64, copy=True)
    th[..., 1::2] = th[..., 1::2] + th[..., 2::2] * centre
    return th


def _natural(theta, kind) -> np.ndarray:
    """[..., P] log-space params -> [..., 5] in PARAMS order, NaN for absent terms."""
    theta = np.asarray(theta)
    out = np.full(theta.shape[:-1] + (5,), np.nan)
    out[..., 0] = np.exp(theta[..., 0])
    for i, var in enumerate(TERMS[kind]):
        j = 1 if var == "N" else 3
        out[..., j] = np.exp(theta[..., 1 + 2 * i])
        out[..., j + 1] = theta[..., 2 + 2 * i]
    return out


def _distinct_best(x, f, k, tol=1e-3):
    """Indices of the k lowest finite f whose x differ (max abs) by more than tol."""
    f = np.where(np.isfinite(f), f, np.inf)
    picked = []
    for i in np.argsort(f, kind="stable"):
        if not np.isfinite(f[i]) or len(picked) >= k:
            break
        if all(np.max(np.abs(x[i] - x[j])) > tol for j in picked):
            picked.append(int(i))
    return picked


def fit_law(N, D, loss, kind: str = "joint", *, n_boot: int = 1000, seed: int = 0,
            delta: float = DELTA, grid: np.ndarray | None = None, keep: int = 1,
            refine: int = 16, scout_iters: int = 20, maxiter: int = 1000,
            boot_maxiter: int = 300, level: float = 0.95) -> Fit:
    """Fit law `kind` to points (N, D, loss); bootstrap `n_boot` resamples of the points.

    Every row of `grid` (default: `init_grid(kind)`, Besiroglu et al.'s 4,500 starts for
    the joint law) runs `scout_iters` L-BFGS iterations; the `refine` best distinct ones
    run to convergence and the lowest objective wins. Each bootstrap resample starts from
    the `keep` best distinct minima and keeps its lowest objective after at most
    `boot_maxiter` evaluations (well-posed resamples converge in ~50; a resample that
    cannot identify a parameter drifts along a flat valley and is cut there).
    """
    if kind not in TERMS:
        raise ValueError(f"kind must be one of {sorted(TERMS)}, got {kind!r}")
    loss = np.asarray(loss, np.float64)
    N = None if N is None else np.asarray(N, np.float64)
    D = None if D is None else np.asarray(D, np.float64)
    for var, vals in (("N", N), ("D", D), ("loss", loss)):
        if (var == "loss" or var in TERMS[kind]) and (
                vals is None or not np.all(np.isfinite(vals)) or np.any(vals <= 0)):
            raise FitError(f"{var} must be finite and > 0 for every point")
    check_design(kind, N, D, loss)
    n = len(loss)
    x, centre = _features(kind, N, D)
    m = _bucket(n)
    xp = np.zeros((m, x.shape[1]))
    xp[:n] = x
    logy = np.zeros(m)
    logy[:n] = np.log(loss)
    w_full = np.zeros(m)
    w_full[:n] = 1.0
    starts = init_grid(kind) if grid is None else np.asarray(grid, np.float64)

    with jax.enable_x64(True):
        args = (jnp.asarray(xp), jnp.asarray(logy))
        th = _to_centred(starts, centre)
        if len(th) > refine:   # scout every start briefly, then refine the best few
            res = _solve(jnp.asarray(th), *args,
                         jnp.asarray(np.broadcast_to(w_full, (len(th), m))), delta, scout_iters)
            idx = _distinct_best(np.asarray(res.x), np.asarray(res.f), refine) or [0]
            th = np.asarray(res.x)[(idx * refine)[:refine]]   # fixed batch: one compilation
        res = _solve(jnp.asarray(th), *args, jnp.asarray(np.broadcast_to(w_full, (len(th), m))),
                     delta, maxiter)
        xs, f = np.asarray(res.x), np.where(np.isfinite(res.f), np.asarray(res.f), np.inf)
        order = np.argsort(f, kind="stable")
        best = xs[order[0]]
        idx = _distinct_best(xs, f, keep) or [int(order[0])]
        seeds = [xs[i] for i in (idx * keep)[:keep]]
        boot = np.full((0, 5), np.nan)
        if n_boot > 0:
            rng = np.random.default_rng(seed)
            counts = np.zeros((n_boot, m))
            counts[:, :n] = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
            k = len(seeds)
            th0 = np.tile(np.stack(seeds), (n_boot, 1))
            w = np.repeat(counts, k, axis=0)
            bres = _solve(jnp.asarray(th0), *args, jnp.asarray(w), delta, boot_maxiter)
            bf = np.asarray(bres.f).reshape(n_boot, k)
            bf = np.where(np.isfinite(bf), bf, np.inf)
            bx = np.asarray(bres.x).reshape(n_boot, k, -1)
            pick = bx[np.arange(n_boot), np.argmin(bf, axis=1)]
            boot = _natural(_from_centred(pick, centre), kind)

    theta = _from_centred(best, centre)
    nat = _natural(theta, kind)
    names = ["E"] + [p for v in TERMS[kind] for p in _TERM_PARAMS[v]]
    params = {k: float(nat[PARAMS.index(k)]) for k in names}
    ci, se = bootstrap_intervals(boot, names, level)
    pred = predict(params, N, D)
    r = np.log(loss) - np.log(pred)
    return Fit(kind=kind, params=params, ci=ci, se=se, n_points=n,
               huber_loss=float(f[order[0]]), boot=boot,
               residuals=residual_diagnostics(N, D, loss, pred, kind),
               converged=bool(np.asarray(res.converged)[order[0]]), n_boot=len(boot))


def bootstrap_intervals(boot: np.ndarray, names, level: float) -> tuple[dict, dict]:
    """(percentile interval, standard error) per parameter over the bootstrap fits' finite
    values; a parameter with none (unidentified: every resample ran off to inf/NaN, e.g.
    a data term that the losses do not determine) gets neither."""
    q = (1 - level) / 2
    ci, se = {}, {}
    for k in names if len(boot) else ():
        col = boot[:, PARAMS.index(k)]
        col = col[np.isfinite(col)]
        if not len(col):
            continue
        ci[k] = [float(np.quantile(col, q)), float(np.quantile(col, 1 - q))]
        with np.errstate(over="ignore", invalid="ignore"):   # large values overflow
            se[k] = float(np.std(col, ddof=1)) if len(col) > 1 else float("nan")
    return ci, se


def _corr(a, b) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def residual_diagnostics(N, D, loss, pred, kind) -> dict:
    """Log-space residuals (observed - predicted) and simple checks for structure in them."""
    r = np.log(loss) - np.log(pred)
    out = {"rmse_log": float(np.sqrt(np.mean(r ** 2))), "max_abs_log": float(np.max(np.abs(r))),
           "mean_log": float(np.mean(r)), "rel_rmse": float(np.sqrt(np.mean((loss / pred - 1) ** 2)))}
    for var, vals in (("N", N), ("D", D)):
        if vals is not None:
            out[f"corr_log{var}"] = _corr(r, np.log(vals))
    out["points"] = [[None if N is None else float(N[i]), None if D is None else float(D[i]),
                      float(loss[i]), float(pred[i]), float(r[i])] for i in range(len(loss))]
    out["points_columns"] = ["N", "D", "loss", "pred", "resid_log"]
    return out


def loss_to_data(params: Mapping, target, N=None) -> np.ndarray:
    """D needed to reach loss `target` (inf when the law's floor is at or above it)."""
    floor = np.asarray(params["E"], np.float64)
    if params.get("A") is not None and N is not None and np.all(np.isfinite(params["A"])):
        floor = floor + np.asarray(params["A"]) / np.asarray(N, np.float64) ** np.asarray(params["alpha"])
    gap = np.asarray(target, np.float64) - floor
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (np.asarray(params["B"]) / gap) ** (1.0 / np.asarray(params["beta"]))
    return np.where(gap > 0, d, np.inf)


def describe(params: Mapping, ci: Mapping | None = None, digits: int = 3) -> str:
    """`E=1.82 [1.77, 1.87], ...` for tables and sentences."""
    parts = []
    for k in PARAMS:
        v = params.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        s = f"{k}={v:.{digits}g}"
        if ci and k in ci:
            s += f" [{ci[k][0]:.{digits}g}, {ci[k][1]:.{digits}g}]"
        parts.append(s)
    return ", ".join(parts)


