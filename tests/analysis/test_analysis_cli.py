"""The CLI end to end: results.csv / result.json / CSV in, fit.json, optimal.json, plots and
reports out; bad input gives named errors while the rest is still written."""
import csv
import json
import os
import sys

import numpy as np
import pytest

from vlm_jax.analysis import fit
from vlm_jax.analysis.__main__ import main

VITS = {"S": 2e7, "M": 8e7, "L": 3.2e8}
LLMS = {"A": 5e8, "B": 2e9}
SIZES = [1000, 2000, 4000, 8000, 16000]
COLUMNS = ["run", "status", "stage", "vit", "llm", "n", "data", "params_vision",
           "params_projector", "params_llm", "params_total", "params_trainable",
           "data_size", "examples_seen", "tokens_seen", "train_loss", "eval_loss", "flops",
           "wall_time_s", "steps"]


def _loss(vit, llm, n, rng):
    # encoder size barely matters for LLM A (saturates at M), matters for B
    e = {"A": 2.2, "B": 2.0}[llm] + {"A": {"S": 0.05, "M": 0.0, "L": 0.0},
                                     "B": {"S": 0.3, "M": 0.15, "L": 0.0}}[llm][vit]
    return (e + 40.0 / n ** 0.5) * np.exp(0.002 * rng.standard_normal())


def _write_results(root, extra_rows=()):
    rng = np.random.default_rng(0)
    rows = []
    for llm, nl in LLMS.items():
        for vit, nv in VITS.items():
            for n in SIZES:
                rows.append({"run": f"grid/vit={vit},llm={llm},n={n},data=syn", "status": "done",
                             "stage": "grid", "vit": vit, "llm": llm, "n": n, "data": "syn",
                             "params_vision": nv, "params_llm": nl, "data_size": n,
                             "examples_seen": n, "eval_loss": _loss(vit, llm, n, rng),
                             "flops": 2 * (nl + nv) * n * 64})
    rows.append({"run": "vit/vit=S", "status": "done", "stage": "vit", "eval_loss": 1.0})
    rows += list(extra_rows)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_grid_root_fit_optimal_and_combined_report(tmp_path):
    root = str(tmp_path / "root")
    bad = [{"run": "grid/nan", "status": "done", "stage": "grid", "llm": "A",
            "params_vision": 2e7, "data_size": 1000, "eval_loss": "nan"},
           {"run": "grid/failed", "status": "failed", "stage": "grid", "llm": "A"},
           {"run": "grid/diverged", "status": "done", "stage": "grid", "llm": "B",
            "params_vision": 8e7, "data_size": 3000, "eval_loss": 40.0}]
    _write_results(root, bad)
    out = os.path.join(root, "report", "fit")
    assert main(["fit", "--runs", root, "--stage", "grid", "--out", out, "--group-cols", "llm",
                 "--n-boot", "150"]) == 0
    res = json.load(open(os.path.join(out, "fit.json")))
    assert set(res["groups"]) == {"llm=A", "llm=B"}
    reasons = {e["run"]: e["reason"] for e in res["excluded"]}
    assert "nan" in reasons["grid/nan"] and reasons["grid/failed"] == "status=failed"
    assert reasons["grid/diverged"].startswith("diverged")
    for name, g in res["groups"].items():
        assert g["kind"] == "joint" and g["n_points"] == 15
        assert set(g["ci"]) == set(fit.PARAMS) and all(k in g for k in fit.PARAMS)
        assert g["compute_optimal"] and g["flops_model"]["source"].startswith("fitted")
    # bigger encoder: not reliably better for A (saturated at M), reliably better for B
    sa, sb = (res["groups"][k]["encoder_summary"] for k in ("llm=A", "llm=B"))
    assert sb["reliably_better"] == sb["pairs_tested"] == 15
    assert sa["reliably_better"] < sa["pairs_tested"]
    text = open(os.path.join(out, "report.md")).read()
    assert "llm=A: a bigger encoder is NOT reliably better" in text
    assert "llm=B: a bigger encoder is reliably better" in text
    assert "Data efficiency" in text and "most data-efficient" in text
    for png in res["plots"].values():
        assert os.path.getsize(os.path.join(out, png)) > 1000
        assert f"({png})" in text

    out2 = os.path.join(root, "report", "optimal")
    assert main(["optimal", "--runs", root, "--stage", "grid", "--out", out2]) == 0
    opt = json.load(open(os.path.join(out2, "optimal.json")))
    assert [r["optimal"] for r in opt["per_llm"]] == [VITS["M"], VITS["L"]]
    assert opt["loglog"]["b"] > 0 and "no interval" in opt["loglog"]["note"]
    combined = open(os.path.join(root, "report", "report.md")).read()
    assert "fit/loss_vs_data.png" in combined and "optimal/optimal_heatmap.png" in combined
    assert main(["report", "--runs", root, "--out", str(tmp_path / "r")]) == 0
    assert "../root/report/fit/joint_fit.png" in open(tmp_path / "r" / "report.md").read()


def test_degenerate_group_is_reported_and_rest_written(tmp_path):
    rows = [("x", 1e8, d, 2 + 50 / d ** 0.5) for d in np.geomspace(1e3, 1e5, 8)]  # one N only
    rows += [("y", n, d, 2 + 5 / n ** 0.2 + 50 / d ** 0.5)
             for n in (1e6, 1e7, 1e8) for d in (1e3, 1e4, 1e5)]
    path = tmp_path / "p.csv"
    with open(path, "w") as f:
        f.write("group,N,D,loss\n" + "".join(f"{g},{n},{d},{l}\n" for g, n, d, l in rows))
    out = str(tmp_path / "o")
    assert main(["fit", "--csv", str(path), "--out", out, "--law", "joint", "--n-boot", "150"]) == 0
    res = json.load(open(os.path.join(out, "fit.json")))
    assert "degenerate" in res["groups"]["group=x"]["error"]
    assert res["groups"]["group=y"]["kind"] == "joint"
    assert "group=x**: no fit" in open(os.path.join(out, "report.md")).read()


def test_missing_column_and_result_json_fallback(tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text("N,D,eval\n1,2,3\n")
    out = str(tmp_path / "o")
    assert main(["fit", "--csv", str(path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) 'loss' (set with --loss-col)" in err and "N, D, eval" in err
    assert "missing column" in json.load(open(os.path.join(out, "fit.json")))["error"]
    # no results.csv: result.json files (+ config.json for the data size) are scanned
    root = tmp_path / "root"
    for i, (v, llm, l) in enumerate([(1e7, 1e9, 3.0), (2e7, 1e9, 2.9), (4e7, 1e9, 2.89),
                                     (1e7, 2e9, 2.8), (2e7, 2e9, 2.6), (4e7, 2e9, 2.5)]):
        wd = root / "runs" / "grid" / f"vit-{i}_llm-{llm:g}"
        wd.mkdir(parents=True)
        (wd / "result.json").write_text(json.dumps({
            "status": "done", "final/eval_loss": l, "params/vision": v, "params/llm": llm}))
    assert main(["optimal", "--runs", str(root), "--stage", "grid",
                 "--out", str(tmp_path / "opt")]) == 0
    opt = json.load(open(tmp_path / "opt" / "optimal.json"))
    assert [r["optimal"] for r in opt["per_llm"]] == [2e7, 4e7]
    assert main(["fit", "--runs", str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_data_efficiency_bounds_instead_of_extrapolating_below_the_data(tmp_path, monkeypatch):
    # llm=B is so much better that it is below llm=A's best loss at its smallest data size:
    # the report must give a bound ("< 1e+03"), not a D extrapolated far below the data.
    base = _loss
    monkeypatch.setattr(sys.modules[__name__], "_loss",
                        lambda vit, llm, n, rng: base(vit, llm, n, rng) - (1.0 if llm == "B" else 0))
    root = str(tmp_path / "root")
    _write_results(root)
    out = os.path.join(root, "fit")
    assert main(["fit", "--runs", root, "--stage", "grid", "--out", out, "--group-cols", "llm",
                 "--n-boot", "150"]) == 0  # the first test's programs (compile cache)
    text = open(os.path.join(out, "report.md")).read()
    sentences = [l for l in text.splitlines() if "most data-efficient" in l]
    assert sentences and all("< 1e+03 (llm=B)" in s and "at least" in s for s in sentences)
    rows = json.load(open(os.path.join(out, "fit.json")))["data_efficiency"]["rows"]
    assert all(r["below_measured"] == (r["group"] == "llm=B") for r in rows)
