"""PNG figures of the analysis (matplotlib, Agg backend; every write is atomic)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlm_jax.analysis import io  # noqa: E402


def _grid(n):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.38, wspace=0.3)   # row titles clear of the x labels above
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _log_x_ticks(ax) -> None:
    """Labels at 1, 2, 5 x 10^k (at most ~8; matplotlib thins them over wide ranges), no
    minor labels: a decade of data sizes otherwise gets crowded minor labels such as
    2x10^3 3x10^3."""
    from matplotlib import ticker
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _finish(ax, xlabel, title, legend):
    ax.set_xscale("log")
    _log_x_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7)


def _save(fig, path):
    io.save_figure(fig, path)
    plt.close(fig)


def _fmt(v):
    return f"{v:.3g}"


def loss_vs(groups, results, path, x_role="D", line_role="N", xlabel="D", linelabel="N"):
    """One panel per group: loss vs x_role, a line per value of line_role, with the fitted
    curve of that line (L(D) per encoder, or L(N) per data size) and its bootstrap band."""
    fig, axes = _grid(len(groups))
    curve_key = "L(D)" if x_role == "D" else "L(N)"
    for ax, g in zip(axes, groups):
        x, line, loss = (np.asarray(g.cols[k]) for k in (x_role, line_role, "loss"))
        cmap = plt.get_cmap("viridis")
        values = sorted(set(line.tolist()))
        if len(values) > 12:   # not a grid: one scatter coloured by log of the line variable
            sc = ax.scatter(x, loss, c=np.log10(line), s=8, cmap=cmap)
            fig.colorbar(sc, ax=ax, label=f"log10 {linelabel}")
            values = []
        for i, v in enumerate(values):
            color = cmap(i / max(1, len(values) - 1))
            sel = line == v
            order = np.argsort(x[sel])
            ax.plot(x[sel][order], loss[sel][order], "o", color=color,
                    label=f"{linelabel}={_fmt(v)}")
            f = results.get(g.name, {}).get("_curves", {}).get(curve_key, {}).get(v)
            if f is not None and len(x[sel]):
                xs = np.geomspace(x[sel].min(), x[sel].max(), 60)
                kw = {x_role: xs}
                ax.plot(xs, f.predict(**kw), "-", color=color, lw=1)
                if len(f.boot):
                    lo, hi = f.band(**kw)
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
        _finish(ax, xlabel, g.name, bool(values))
    _save(fig, path)


def joint_fit(groups, results, path):
    """Observed points and the joint fit L(N, D) per N, with bootstrap bands."""
    fig, axes = _grid(len(groups))
    for ax, g in zip(axes, groups):
        N, D, loss = (np.asarray(g.cols[k]) for k in ("N", "D", "loss"))
        f = results.get(g.name, {}).get("_fit")
        values = sorted(set(N.tolist()))
        if len(values) > 12:   # not a grid: curves at a few quantiles of N
            values = sorted(set(np.quantile(N, [0, 0.25, 0.5, 0.75, 1], method="nearest")))
            ax.scatter(D, loss, c="0.6", s=5)
        for i, v in enumerate(values):
            color = plt.get_cmap("plasma")(i / max(1, len(values)))
            sel = N == v
            ax.plot(D[sel], loss[sel], "o", color=color, ms=3, label=f"N={_fmt(v)}")
            if f is not None and f.kind != "N":
                ds = np.geomspace(D.min(), D.max(), 60)
                ns = np.full_like(ds, v)
                kw = {"D": ds} if f.kind == "D" else {"N": ns, "D": ds}
                ax.plot(ds, f.predict(**kw), "-", color=color, lw=1)
                if len(f.boot):
                    lo, hi = f.band(**kw)
                    ax.fill_between(ds, lo, hi, color=color, alpha=0.15, lw=0)
        _finish(ax, "D", f"{g.name} ({f.kind if f else 'no fit'})", len(values) <= 8)
    _save(fig, path)


def residuals(groups, results, path):
    """Log-space residuals of each group's main fit against its prediction."""
    fig, axes = _grid(len(groups))
    for ax, g in zip(axes, groups):
        f = results.get(g.name, {}).get("_fit")
        if f is None:
            ax.text(0.5, 0.5, "no fit", ha="center", transform=ax.transAxes)
        else:
            pts = np.asarray([p[3:] for p in f.residuals["points"]], np.float64)
            ax.scatter(pts[:, 0], pts[:, 1], s=8)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xlabel("predicted loss")
            ax.set_ylabel("log(obs) - log(pred)")
        ax.set_title(g.name, fontsize=9)
    _save(fig, path)


def heatmap(rows, path):
    """Encoder x LLM loss (relative to each LLM's smallest encoder) with the optimal encoder."""
    llms = [r["llm"] for r in rows]
    encs = sorted({v for r in rows for v in r["encoders"]})
    grid = np.full((len(llms), len(encs)), np.nan)
    for i, r in enumerate(rows):
        for v, l in zip(r["encoders"], r["losses"]):
            grid[i, encs.index(v)] = l / r["losses"][0] - 1
    fig, ax = plt.subplots(figsize=(1.2 * len(encs) + 3, 0.8 * len(llms) + 2))
    im = ax.imshow(grid * 100, cmap="viridis_r", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, label="loss change vs smallest encoder (%)")
    for i in range(len(llms)):
        for j in range(len(encs)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center",
                        fontsize=7, color="w")
    opt = [encs.index(r["optimal"]) if r["optimal"] in encs else np.nan for r in rows]
    ax.plot(opt, range(len(llms)), "r-o", lw=2, label="optimal encoder (NaViL rule)")
    ax.set_xticks(range(len(encs)), [_fmt(v) for v in encs])
    ax.set_yticks(range(len(llms)), [_fmt(v) for v in llms])
    ax.set_xlabel("encoder parameters")
    ax.set_ylabel("LLM parameters")
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def optimal_line(rows, line, path):
    """log V* vs log N_LLM with the fitted line and its interval on the slope."""
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    x = np.asarray([r["llm"] for r in rows if r.get("optimal")])
    y = np.asarray([r["optimal"] for r in rows if r.get("optimal")])
    ax.plot(x, y, "o", label="optimal encoder")
    if "b" in line:
        xs = np.geomspace(x.min(), x.max(), 50)
        ax.plot(xs, np.exp(line["a"] + line["b"] * np.log(xs)), "-",
                label=f"log V* = {line['a']:.2f} + {line['b']:.2f} log N")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LLM parameters")
    ax.set_ylabel("optimal encoder parameters")
    ax.legend(fontsize=7)
    _save(fig, path)
