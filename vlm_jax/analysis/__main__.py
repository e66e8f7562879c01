"""CLI: `python -m vlm_jax.analysis fit|optimal|report ...` (see DESIGN.md "Analysis").

  fit     --runs ROOT [--stage S] | --csv FILE   --out DIR   -> fit.json, PNGs, report.md
  optimal --runs ROOT [--stage S] | --csv FILE   --out DIR   -> optimal.json, PNGs, report.md
  report  --runs ROOT [--out DIR]   -> one report.md over every ROOT/report/*/{fit,optimal}.json

With `--runs ROOT` and an `--out` inside ROOT/report/, fit and optimal also rebuild the
combined ROOT/report/report.md, so a grid's analysis steps end with one report.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from vlm_jax.analysis import compare, io, optimal as optlib, plots, report
from vlm_jax.analysis import fit as fitlib

MAX_LINES = 12   # per-line curves and comparisons only for grid-like designs
# results.csv column defaults per role (the CSV mode's defaults are the role names)
RUNS_DEFAULTS = {"N": "params_vision", "D": "data_size", "loss": "eval_loss",
                 "llm": "params_llm", "encoder": "params_vision", "flops": "flops"}


def _add_common(p, roles):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", help="grid root: reads ROOT/results.csv (or result.json files)")
    src.add_argument("--csv", help=f"a CSV with columns {','.join(roles)} (+ group columns)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stage", help="with --runs: keep rows of this stage (status done)")
    p.add_argument("--group-cols", default=None,
                   help="comma list of columns that define groups (default: --runs none; "
                        "--csv every column that is not a role)")
    for role in roles:
        p.add_argument(f"--{role.lower()}-col", dest=f"col_{role}", default=None,
                       help=f"column of {role} (default: {RUNS_DEFAULTS.get(role, role)} with "
                            f"--runs, {role} with --csv)")
    p.add_argument("--max-loss", type=float, default=None,
                   help="exclude (and list) points with a loss above this")
    p.add_argument("--diverged-factor", type=float, default=3.0,
                   help="exclude as diverged a loss above this x its group's median (0: off)")


def _load(args, roles: list[str], optional=()):
    """(table, usable rows, role -> column, group columns, excluded rows), all checked."""
    table = io.read_runs(args.runs) if args.runs else io.read_csv(args.csv)
    cols = {}
    for role in list(roles) + list(optional):
        given = getattr(args, f"col_{role}", None)
        col = given or (RUNS_DEFAULTS.get(role, role) if args.runs else role)
        if role == "D" and not given and args.runs and col not in table.columns:
            col = "examples_seen"
        if role in optional and col not in table.columns:
            continue
        cols[role] = col
    io.require_columns(table, {c: f"--{r.lower()}-col" for r, c in cols.items()})
    if args.group_cols is not None:
        group_cols = io.split_list(args.group_cols)
    elif args.csv:
        group_cols = [c for c in table.columns if c not in cols.values()]
    else:
        group_cols = []
    io.require_columns(table, {c: "--group-cols" for c in group_cols})
    rows, excluded = io.filter_stage(table, args.stage)
    stages = sorted({r.get("stage") or "" for r in rows} - {""})
    if args.runs and not args.stage and len(stages) > 1:
        print(f"warning: {table.source} holds done runs of several stages "
              f"({', '.join(stages)}) and no --stage was given: their losses (different "
              f"models and objectives) are analysed together; pass --stage STAGE to keep one",
              file=sys.stderr)
    return table, rows, cols, group_cols, excluded


def _fail(out: str, name: str, msg: str, md) -> int:
    """Bad input: the message goes to stderr, NAME.json and report.md."""
    print(f"error: {msg}", file=sys.stderr)
    res = {"error": msg, "groups": {}, "plots": {}}
    io.write_json(os.path.join(out, name), res)
    io.atomic_write(os.path.join(out, "report.md"), md(res))
    return 2


# --------------------------------------------------------------------------- fit

def _auto_kind(N, D) -> str:
    nN, nD = len(set(N)), len(set(D))
    if nN >= 3 and nD >= 3:
        return "joint"
    if nD >= 3:
        return "D"
    if nN >= 3:
        return "N"
    return "joint"   # check_design names what is missing


def _fit_law(args, N, D, loss, kind, **kw) -> fitlib.Fit:
    """`fitlib.fit_law`, kept in `--cache-dir` (one file per distinct input: the points,
    the law, the options and the source of analysis/fit.py): a grid's `fit --partial`
    passes fill it while later runs train, the final `fit` reads what they fitted."""
    if not getattr(args, "cache_dir", None):
        return fitlib.fit_law(N, D, loss, kind, **kw)
    import hashlib
    import pickle
    h = hashlib.sha256()
    with open(fitlib.__file__, "rb") as f:
        h.update(f.read())
    for a in (N, D, loss):
        h.update(b"-" if a is None else np.asarray(a, np.float64).tobytes() + b"|")
    h.update(repr((kind, sorted(kw.items()))).encode())
    path = os.path.join(args.cache_dir, h.hexdigest()[:32] + ".pkl")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        pass
    fit = fitlib.fit_law(N, D, loss, kind, **kw)   # raises FitError: not kept
    io.atomic_write(path, pickle.dumps(fit))
    return fit


def _fit_group(g: io.Group, args, flops_model) -> dict:
    N, D, loss = (np.asarray(g.cols[k]) for k in ("N", "D", "loss"))
    out: dict = {"n_points": len(loss), "runs": g.runs, "keys": g.keys}
    kind = args.law if args.law != "auto" else _auto_kind(N, D)
    common = dict(n_boot=args.n_boot, seed=args.seed)
    fits = {}
    try:
        f = _fit_law(args, N, D, loss, kind, **common)
        fits["_fit"] = f
        out.update(f.to_json())
        if args.law == "auto" and kind != "joint":
            out["note"] = (f"only {len(set(N))} N value(s) and {len(set(D))} D value(s): "
                           f"fitted L({kind}) instead of the joint law")
        lost = [k for k, v in f.params.items() if not np.isfinite(v)]
        if lost:   # e.g. A -> inf, alpha -> large: the loss does not fall as a power of N
            notes = [out["note"]] if out.get("note") else []
            out["note"] = "; ".join(notes + [
                f"{', '.join(lost)} ran off to infinity: these losses do not determine that "
                "term (no power-law trend in it), so the fit has no finite predictions; read "
                "the term as absent"])
    except fitlib.FitError as e:
        out["error"] = f"L({','.join(fitlib.TERMS[kind])}) fit: {e}"
    # per-line curves: L(D) for each N (encoder), L(N) for each D
    curves = {"L(D)": {}, "L(N)": {}}
    curve_json = {"L(D)": {}, "L(N)": {}}
    for key, by, var in (("L(D)", N, "D"), ("L(N)", D, "N")):
        values = sorted(set(by.tolist()))
        if len(values) > MAX_LINES:   # not a grid (e.g. Chinchilla's scattered runs)
            continue
        for v in values:
            sel = by == v
            if sel.sum() < 2:
                continue
            try:
                c = _fit_law(args, N[sel], D[sel], loss[sel], var, **common)
                curves[key][v] = c
                j = c.to_json()
                j.pop("residuals")
                curve_json[key][f"{v:g}"] = j
            except fitlib.FitError as e:
                curve_json[key][f"{v:g}"] = {"error": str(e), "n_points": int(sel.sum())}
    out["curves"] = curve_json
    fits["_curves"] = curves
    if 2 <= len(set(N.tolist())) <= MAX_LINES:
        out["encoder_differences"] = compare.encoder_differences(N, D, loss, curves["L(D)"])
        out["encoder_summary"] = compare.summarise_differences(out["encoder_differences"])
    f = fits.get("_fit")
    if f is not None and f.kind == "joint":
        budgets = ([float(b) for b in io.split_list(args.budgets)] if args.budgets else
                   optlib.default_budgets(flops_model["c"] * N ** flops_model["p"]
                                          * D ** flops_model["q"]))
        out["flops_model"] = flops_model
        out["compute_optimal"] = optlib.compute_optimal(
            f, budgets, flops_model, (N.min() / 100, N.max() * 100))
    return out, fits


def _flops_model(args, groups) -> dict:
    if args.flops_per_nd is not None:
        return {"c": args.flops_per_nd, "p": 1.0, "q": 1.0, "source": "--flops-per-nd"}
    pts = [(n, d, c) for g in groups if "flops" in g.cols
           for n, d, c in zip(g.cols["N"], g.cols["D"], g.cols["flops"])
           if np.isfinite(c) and c > 0]
    if len(pts) >= 3:
        return optlib.fit_flops_model(*zip(*pts))
    return {"c": 6.0, "p": 1.0, "q": 1.0, "source": "default C = 6 N D"}


def _answers(res: dict, fits: dict) -> list[str]:
    out = []
    for name, g in res["groups"].items():
        s = g.get("encoder_summary")
        if s and s["pairs_tested"]:
            verdict = ("a bigger encoder is reliably better" if s["reliably_better"] ==
                       s["pairs_tested"] else "a bigger encoder is NOT reliably better")
            out.append(f"{name}: {verdict}: of {s['pairs_tested']} (data size, encoder pair) "
                       f"comparisons, the bigger encoder's loss is lower with 95% confidence in "
                       f"{s['reliably_better']}, higher in {s['reliably_worse']}, and not "
                       f"distinguishable in the rest.")
        elif s and s["observed_pairs"]:
            out.append(f"{name}: the bigger encoder had the lower observed loss in "
                       f"{s['observed_bigger_lower']} of {s['observed_pairs']} comparisons "
                       f"(no interval: too few data sizes per encoder for L(D) fits).")
        if g.get("beta") is not None and g.get("ci", {}).get("beta"):
            lo = g["ci"]["beta"][0]
            out.append(f"{name}: loss falls with data as D^-{g['beta']:.3g} "
                       f"(95% CI [{lo:.3g}, {g['ci']['beta'][1]:.3g}])"
                       + ("; more data reliably lowers the loss." if lo > 0 else
                          "; the decrease with data is not significant."))
    eff = res.get("data_efficiency") or {}
    for sent in eff.get("sentences", []):
        out.append(sent)
    return out


def _data_efficiency(groups, results, fits) -> dict:
    """D needed to reach a common loss, per group, at every encoder size all groups share."""
    if len(groups) < 2:
        return {}
    shared = set.intersection(*[set(g.cols["N"]) for g in groups])
    rows, sentences = [], []
    for n in sorted(shared):
        per = []
        for g in groups:
            c = fits[g.name]["_curves"]["L(D)"].get(n)
            losses = [l for l, nn in zip(g.cols["loss"], g.cols["N"]) if nn == n]
            per.append((g, c, losses))
        if any(c is None for _, c, _ in per):
            continue
        target = compare.common_target([l for _, _, l in per])
        got = []
        for g, c, _ in per:
            r = compare.data_needed(c, target)
            d_min = min(d for d, nn in zip(g.cols["D"], g.cols["N"]) if nn == n)
            # Below the smallest measured D the fit extrapolates: report a bound, not a value.
            r["below_measured"] = r["D"] is not None and r["D"] < d_min
            rows.append({"group": g.name, "N": n, **r})
            if r["D"] is not None:
                got.append((max(r["D"], d_min), r["below_measured"], g.name))
        if len(got) >= 2:
            got.sort()
            (best, bound, _), (worst, _, name1) = got[0], got[-1]
            tied = [nm for d, b, nm in got if b and d == best] if bound else [got[0][2]]
            name0 = (tied[0] + " is" if len(tied) == 1 else
                     " and ".join([", ".join(tied[:-1]), tied[-1]]) + " are")
            ratio = f"{'at least ' if bound else ''}{worst / best:.2g}x less data than {name1}"
            sentences.append(f"At encoder size {n:.3g}, reaching loss {target:.4g} takes "
                             + ", ".join(f"{'< ' if b else ''}{d:.3g} ({nm})"
                                         for d, b, nm in got)
                             + f": {name0} the most data-efficient ({ratio})"
                             + (" ('< D': already below that loss at its smallest measured"
                                " data size)" if any(b for _, b, _ in got) else "") + ".")
    return {"rows": rows, "sentences": sentences}


def cmd_fit(args) -> int:
    out = args.out
    md = lambda r: report.fit_markdown(r)
    try:
        table, rows, cols, group_cols, excluded = _load(args, ["N", "D", "loss"],
                                                        optional=["flops"])
        groups, bad = io.group_points(rows, cols, group_cols, max_loss=args.max_loss,
                                      diverged_factor=args.diverged_factor or None,
                                      optional=("flops",))
    except io.InputError as e:
        return _fail(out, "fit.json", str(e), md)
    flops_model = _flops_model(args, groups)
    if args.partial:   # fill --cache-dir with the complete groups' fits, write nothing else
        if "status" in table.columns:
            stage_rows = [r for r in table.rows
                          if not args.stage or r.get("stage") == args.stage]
            open_ = {tuple(str(r.get(c, "")) for c in group_cols) for r in stage_rows
                     if r.get("status") != "done"}
            groups = [g for g in groups
                      if tuple(str(g.keys.get(c, "")) for c in group_cols) not in open_]
        for g in groups:
            _fit_group(g, args, flops_model)
        print(f"fitted {len(groups)} complete group(s) into {args.cache_dir}: "
              + ", ".join(g.name for g in groups))
        return 0
    res = {"source": table.source, "roles": cols, "group_cols": group_cols,
           "n_boot": args.n_boot, "delta": fitlib.DELTA, "groups": {},
           "excluded": excluded + bad, "plots": {}}
    fits = {}
    for g in groups:
        res["groups"][g.name], fits[g.name] = _fit_group(g, args, flops_model)
    res["data_efficiency"] = _data_efficiency(groups, res, fits)
    res["answers"] = _answers(res, fits)
    if groups:
        for fname, fn in (("loss_vs_data.png", lambda p: plots.loss_vs(groups, fits, p)),
                          ("loss_vs_encoder.png", lambda p: plots.loss_vs(
                              groups, fits, p, x_role="N", line_role="D", xlabel="N",
                              linelabel="D")),
                          ("joint_fit.png", lambda p: plots.joint_fit(groups, fits, p)),
                          ("residuals.png", lambda p: plots.residuals(groups, fits, p))):
            fn(os.path.join(out, fname))
            res["plots"][fname[:-4]] = fname
    io.write_json(os.path.join(out, "fit.json"), res)
    io.atomic_write(os.path.join(out, "report.md"), md(res))
    _maybe_combined(args)
    print(f"wrote {out}/fit.json, report.md ({len(groups)} group(s), "
          f"{len(res['excluded'])} excluded)")
    return 0


# --------------------------------------------------------------------------- optimal

def cmd_optimal(args) -> int:
    out = args.out
    md = lambda r: report.optimal_markdown(r)
    try:
        table, rows, cols, group_cols, excluded = _load(args, ["llm", "encoder", "loss"])
        if args.group_cols is None and args.csv:
            group_cols = []
        groups, bad = io.group_points(rows, cols, [], max_loss=args.max_loss,
                                      diverged_factor=args.diverged_factor or None)
    except io.InputError as e:
        return _fail(out, "optimal.json", str(e), md)
    res = {"source": table.source, "roles": cols, "tol": args.tol,
           "excluded": excluded + bad, "plots": {}, "answers": []}
    g = groups[0] if groups else None
    if g is None or not g.cols["loss"]:
        res["error"] = "no usable points (see excluded)"
        res["per_llm"], res["loglog"] = [], {}
    else:
        llm, enc, loss = g.cols["llm"], g.cols["encoder"], g.cols["loss"]
        # several runs per (llm, encoder) (e.g. other data sizes): keep the best (lowest) loss
        best = {}
        for m, v, l in zip(llm, enc, loss):
            best[(m, v)] = min(l, best.get((m, v), np.inf))
        res["per_llm"] = optlib.navil_rule([k[0] for k in best], [k[1] for k in best],
                                           list(best.values()), tol=args.tol)
        ok = [r for r in res["per_llm"] if not r.get("error")]
        res["loglog"] = optlib.loglog_fit([r["llm"] for r in ok], [r["optimal"] for r in ok])
        for r in ok:
            res["answers"].append(
                f"LLM {r['llm']:.3g}: optimal encoder {r['optimal']:.3g}"
                + ("" if r["saturated"] else " (no encoder met the rule: the optimum is at least "
                                               "the largest encoder tried)") + ".")
        line = res["loglog"]
        if "b" in line:
            if line.get("ci"):
                lo, hi = line["ci"]["b"]
                grows = ("grows with" if lo > 0 else "shrinks with" if hi < 0 else
                         "does not change significantly with")
                res["answers"].append(f"The optimal encoder {grows} the LLM size: "
                                      f"V* ∝ N_LLM^{line['b']:.3g} (95% CI [{lo:.3g}, {hi:.3g}]).")
            else:
                res["answers"].append(f"log V* = {line['a']:.3g} + {line['b']:.3g} log N_LLM "
                                      f"({line.get('note', '')}).")
        if ok:
            plots.heatmap(ok, os.path.join(out, "optimal_heatmap.png"))
            plots.optimal_line(ok, line, os.path.join(out, "optimal_line.png"))
            res["plots"] = {"optimal_heatmap": "optimal_heatmap.png",
                            "optimal_line": "optimal_line.png"}
    io.write_json(os.path.join(out, "optimal.json"), res)
    io.atomic_write(os.path.join(out, "report.md"), md(res))
    _maybe_combined(args)
    print(f"wrote {out}/optimal.json, report.md")
    return 0


# --------------------------------------------------------------------------- report

def _sections(report_dir: str) -> list[tuple[str, str, dict]]:
    found = []
    for folder in sorted(os.listdir(report_dir)) if os.path.isdir(report_dir) else []:
        for kind in ("fit", "optimal"):
            path = os.path.join(report_dir, folder, f"{kind}.json")
            if os.path.isfile(path):
                found.append((kind, folder, io.read_json(path)))
    return found


def write_combined(report_dir: str, out: str | None = None) -> str | None:
    sections = _sections(report_dir)
    if not sections:
        return None
    out = out or report_dir
    rel = os.path.relpath(report_dir, out)
    sections = [(k, os.path.normpath(os.path.join(rel, f)), r) for k, f, r in sections]
    path = os.path.join(out, "report.md")
    io.atomic_write(path, report.combined_markdown(sections))
    return path


def _maybe_combined(args) -> None:
    if not args.runs:
        return
    report_dir = os.path.abspath(os.path.join(args.runs, "report"))
    if os.path.dirname(os.path.abspath(args.out)) == report_dir:
        write_combined(report_dir)


def cmd_report(args) -> int:
    report_dir = os.path.join(args.runs, "report")
    path = write_combined(report_dir, args.out)
    if path is None:
        print(f"error: no fit.json or optimal.json under {report_dir}/*/ (run the fit and "
              f"optimal commands first)", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="power-law fits with bootstrap intervals")
    _add_common(f, ["N", "D", "loss", "flops"])
    f.add_argument("--law", choices=["auto", "joint", "N", "D"], default="auto",
                   help="auto: joint when N and D both take >= 3 values, else the 1-D law")
    f.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--budgets", help="comma list of FLOP budgets for the compute-optimal table")
    f.add_argument("--flops-per-nd", type=float, default=None,
                   help="FLOPs = this x N x D (default: fitted to the runs' flops, else 6)")
    f.add_argument("--cache-dir", default=None,
                   help="keep every fit here (by its points and options) and reuse it")
    f.add_argument("--partial", action="store_true",
                   help="with --cache-dir: only fit the groups whose runs are all done "
                        "(results.csv status) into the cache; write no outputs (the grid "
                        "runner's early passes while other runs train)")
    o = sub.add_parser("optimal", help="NaViL optimal-encoder rule and log V* vs log N_LLM")
    _add_common(o, ["llm", "encoder", "loss"])
    o.add_argument("--tol", type=float, default=0.01, help="the rule's tolerance (1%%)")
    r = sub.add_parser("report", help="combine ROOT/report/*/ into one report.md")
    r.add_argument("--runs", required=True)
    r.add_argument("--out", default=None, help="default: ROOT/report")
    args = p.parse_args(argv)
    if getattr(args, "stage", None) and not args.runs:
        p.error("--stage needs --runs")
    if getattr(args, "partial", False) and not args.cache_dir:
        p.error("--partial needs --cache-dir")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a directory")
    if getattr(args, "n_boot", 0) < 0:
        p.error(f"--n-boot {args.n_boot}: give 0 (no intervals) or more resamples")
    if getattr(args, "budgets", None):
        try:
            [float(b) for b in io.split_list(args.budgets)]
        except ValueError:
            p.error(f"--budgets {args.budgets!r}: give a comma list of FLOP numbers, "
                    "e.g. 1e20,1e21")
    return {"fit": cmd_fit, "optimal": cmd_optimal, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
