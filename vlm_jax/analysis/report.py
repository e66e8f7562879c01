"""report.md from fit.json / optimal.json: tables with intervals and plain sentences.

Everything here reads the JSON the commands wrote, so a combined report (`report`
command) can be rebuilt from ROOT/report/*/ without refitting.
"""
from __future__ import annotations

import os

from vlm_jax.analysis import fit as fitlib


def _g(v, d=3):
    return "–" if v is None else f"{v:.{d}g}"


def _pair(iv, d=3):
    return "" if not iv or None in iv else f" [{_g(iv[0], d)}, {_g(iv[1], d)}]"


def _ci(ci, k, d=3):
    return _pair((ci or {}).get(k), d)


def _images(plots, prefix):
    return [f"![{name}]({os.path.join(prefix, p) if prefix else p})\n"
            for name, p in plots.items()]


def _head(h, title, about, res):
    lines = [f"{h} {title}\n", f"Source: `{res.get('source')}`; {about}\n"]
    if res.get("error"):
        lines.append(f"**Error:** {res['error']}\n")
    return lines


def _tail(h, res, prefix):
    lines = []
    if res.get("excluded"):
        lines.append(f"\n{h}# Excluded runs ({len(res['excluded'])})\n")
        lines += [f"- `{e['run']}`: {e['reason']}" for e in res["excluded"]]
    lines.append(f"\n{h}# Plots\n")
    return lines + _images(res.get("plots", {}), prefix)


def fit_markdown(res: dict, prefix: str = "", level: int = 1) -> str:
    h = "#" * level
    lines = _head(h, "Scaling-law fits",
                  f"roles: {res.get('roles')}; groups by {res.get('group_cols') or 'none'}; "
                  f"{res.get('n_boot')} bootstrap resamples, 95% percentile intervals; Huber "
                  f"delta {res.get('delta')} on log loss.", res)
    lines.append(f"\n{h}# Fits: L = E + A/N^alpha + B/D^beta\n")
    lines.append("| group | law | E | A | alpha | B | beta | points | huber | rmse (log) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name, g in res["groups"].items():
        if g.get("error"):
            lines.append(f"| {name} | – | | | | | | {g.get('n_points', 0)} | | |")
            notes.append(f"- **{name}**: no fit: {g['error']}")
            continue
        cells = [f"{_g(g.get(k), 4)}{_ci(g.get('ci'), k)}" if g.get(k) is not None else "–"
                 for k in fitlib.PARAMS]
        lines.append(f"| {name} | {g['kind']} | " + " | ".join(cells) +
                     f" | {g['n_points']} | {_g(g.get('huber_loss'))} | "
                     f"{_g((g.get('residuals') or {}).get('rmse_log'))} |")
        if g.get("note"):
            notes.append(f"- **{name}**: {g['note']}")
    lines += [""] + notes + [""]
    lines.append(f"{h}# Answers\n")
    lines += [f"- {s}" for s in res.get("answers", [])] or ["- (no answer: nothing could be fitted)"]
    for name, g in res["groups"].items():
        diffs = g.get("encoder_differences") or []
        if diffs:
            lines.append(f"\n{h}## {name}: L(bigger encoder) - L(smaller) at each data size\n")
            lines.append("| D | N small | N big | observed | fitted [95% CI] | reliably better |")
            lines.append("|---|---|---|---|---|---|")
            for r in diffs:
                lines.append(f"| {_g(r['D'])} | {_g(r['N_small'])} | {_g(r['N_big'])} | "
                             f"{_g(r['observed'])} | {_g(r['fitted'])}{_pair(r.get('ci'))} | "
                             f"{'–' if r['reliably_better'] is None else r['reliably_better']} |")
        co = g.get("compute_optimal") or []
        if co and not co[0].get("error"):
            lines.append(f"\n{h}## {name}: compute-optimal allocation ({g.get('flops_model')})\n")
            lines.append("| FLOPs | N* [95% CI] | D* [95% CI] | loss | at search edge |")
            lines.append("|---|---|---|---|---|")
            for r in co:
                lines.append(f"| {r['C']:.2g} | {_g(r['N'])}{_pair(r.get('N_ci'))} | "
                             f"{_g(r['D'])}{_pair(r.get('D_ci'))} | {_g(r['loss'], 4)} | "
                             f"{r['at_edge']} |")
    eff = res.get("data_efficiency")
    if eff and eff.get("rows"):
        lines.append(f"\n{h}# Data efficiency: D needed to reach a loss\n")
        lines.append("| group | N | target loss | D needed [95% CI] |")
        lines.append("|---|---|---|---|")
        for r in eff["rows"]:
            lines.append(f"| {r['group']} | {_g(r['N'])} | {_g(r['target'], 4)} | "
                         f"{_g(r['D'])}{_pair(r.get('ci'))} |")
    return "\n".join(lines + _tail(h, res, prefix)) + "\n"


def optimal_markdown(res: dict, prefix: str = "", level: int = 1) -> str:
    h = "#" * level
    lines = _head(h, "Optimal encoder per LLM (NaViL rule)",
                  f"rule: the smallest encoder whose loss is within "
                  f"{100 * res.get('tol', 0.01):g}% (of the smallest encoder's loss) of the "
                  f"next larger encoder.", res)
    lines.append("| LLM | encoders | losses | optimal encoder | rule met |")
    lines.append("|---|---|---|---|---|")
    for r in res.get("per_llm", []):
        lines.append(f"| {_g(r['llm'])} | {', '.join(_g(v) for v in r['encoders'])} | "
                     f"{', '.join(_g(v, 4) for v in r['losses'])} | {_g(r['optimal'])} | "
                     f"{r['saturated'] if not r.get('error') else r['error']} |")
    line = res.get("loglog", {})
    lines.append(f"\n{h}# Answers\n")
    lines += [f"- {s}" for s in res.get("answers", [])]
    if "b" in line:
        lines.append(f"\nFit: log V* = a + b log N_LLM, a = {line['a']:.3f}{_ci(line.get('ci'), 'a')}, "
                     f"b = {line['b']:.3f}{_ci(line.get('ci'), 'b')} ({line['n_points']} LLM sizes).\n")
    return "\n".join(lines + _tail(h, res, prefix)) + "\n"


def combined_markdown(sections: list[tuple[str, str, dict]]) -> str:
    """sections: (kind 'fit'|'optimal', relative folder, json) -> one report."""
    lines = ["# Scaling analysis\n"]
    lines += [f"- [{folder}](#{folder}): {kind}" for kind, folder, _ in sections] + [""]
    for kind, folder, res in sections:
        lines.append(f'<a id="{folder}"></a>\n')
        body = (fit_markdown if kind == "fit" else optimal_markdown)(res, prefix=folder, level=2)
        lines.append(body.replace("## ", f"## {folder}: ", 1))
    return "\n".join(lines)
