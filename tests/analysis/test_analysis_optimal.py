"""NaViL's optimal-encoder rule, the log-log line, compute-optimal allocation, comparisons."""
import numpy as np
import pytest

from vlm_jax.analysis import compare, fit, optimal


def test_navil_rule_on_constructed_table():
    encs = [75e6, 150e6, 300e6, 600e6, 1.2e9]
    # losses per LLM; gaps (in % of the first loss) decide the optimum
    table = {
        0.5e9: [3.00, 2.95, 2.94, 2.935, 2.93],   # gap 150->300 is 0.33% < 1%: V* = 150M
        1.8e9: [2.80, 2.70, 2.62, 2.60, 2.59],    # gaps 3.6%, 2.9%, 0.7%: V* = 300M
        7.0e9: [2.60, 2.50, 2.40, 2.30, 2.20],    # never within 1%: largest, not saturated
    }
    llm, enc, loss = zip(*[(m, v, l) for m, ls in table.items() for v, l in zip(encs, ls)])
    rows = optimal.navil_rule(llm, enc, loss)
    assert [r["optimal"] for r in rows] == [150e6, 300e6, 1.2e9]
    assert [r["saturated"] for r in rows] == [True, True, False]
    assert rows[0]["threshold"] == pytest.approx(0.03)
    assert rows[1]["gaps"][:3] == pytest.approx([0.10, 0.08, 0.02])
    # the tolerance is relative to the SMALLEST encoder's loss, not the neighbour's
    r = optimal.navil_rule([1, 1, 1], [1, 2, 4], [10.0, 9.0, 8.905], tol=0.01)[0]
    assert r["optimal"] == 2            # 9.0 - 8.905 = 0.095 < 0.01 * 10
    r = optimal.navil_rule([1, 1, 1], [1, 2, 4], [10.0, 9.0, 8.895], tol=0.01)[0]
    assert r["optimal"] == 4 and not r["saturated"]
    assert "needs at least 2" in optimal.navil_rule([1], [1], [3.0])[0]["error"]


def test_loglog_fit_line_and_interval():
    n = np.array([0.5e9, 1.8e9, 7e9, 20e9])
    v = 3e4 * n ** 0.5
    line = optimal.loglog_fit(n, v)
    assert line["b"] == pytest.approx(0.5) and line["a"] == pytest.approx(np.log(3e4))
    assert line["ci"]["b"][1] - line["ci"]["b"][0] < 1e-6
    noisy = optimal.loglog_fit(n, v * np.array([1.1, 0.9, 1.05, 0.97]))
    assert noisy["ci"]["b"][0] < 0.5 < noisy["ci"]["b"][1]
    assert "no interval" in optimal.loglog_fit(n[:2], v[:2])["note"]
    assert "error" in optimal.loglog_fit(n[:1], v[:1])


def test_compute_optimal_matches_chinchilla_closed_form():
    law = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
    f = fit.Fit(kind="joint", params=law, ci={}, se={}, n_points=0, huber_loss=0.0,
                boot=np.asarray([[law[k] for k in fit.PARAMS]] * 20), residuals={},
                converged=True, n_boot=20)
    rows = optimal.compute_optimal(f, [1e21, 1e23], {"c": 6.0, "p": 1.0, "q": 1.0},
                                   (1e6, 1e13), grid_points=20001)
    a, b = law["alpha"], law["beta"]
    G = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
    for r in rows:
        n_star = G * (r["C"] / 6) ** (b / (a + b))
        assert r["N"] == pytest.approx(n_star, rel=2e-3)
        assert r["D"] == pytest.approx(r["C"] / (6 * r["N"]), rel=1e-9)
        assert r["N_ci"][0] == pytest.approx(r["N"]) and not r["at_edge"]
    flops = optimal.fit_flops_model([1, 2, 4, 1], [1, 1, 2, 8], [6, 12, 48, 48])
    assert flops["c"] == pytest.approx(6) and flops["p"] == pytest.approx(1)


def _curves(offsets, noise, seed):
    """Per-encoder L(D) data: the same law shifted by `offsets[N]`."""
    rng = np.random.default_rng(seed)
    D = np.geomspace(1e6, 1e7, 10)
    N, DD, L, curves = [], [], [], {}
    for n, off in offsets.items():
        loss = fit.predict(dict(E=2.0 + off, B=300.0, beta=0.45), D=D)
        loss = loss * np.exp(noise * rng.standard_normal(len(D)))
        curves[n] = fit.fit_law(None, D, loss, "D", n_boot=150, seed=seed)
        N += [n] * len(D)
        DD += list(D)
        L += list(loss)
    return N, DD, L, curves


def test_encoder_differences_separate_real_and_null_effects():
    N, D, L, curves = _curves({1e8: 0.0, 3e8: -0.05, 1e9: -0.10}, 0.002, 0)
    rows = compare.encoder_differences(N, D, L, curves)
    s = compare.summarise_differences(rows)
    assert s["pairs_tested"] == 30 and s["reliably_better"] == 30
    assert all(r["ci"][0] < r["fitted"] < r["ci"][1] for r in rows)
    N, D, L, curves = _curves({1e8: 0.0, 3e8: 0.0, 1e9: 0.0}, 0.01, 1)
    s = compare.summarise_differences(compare.encoder_differences(N, D, L, curves))
    assert s["reliably_better"] <= 3    # bigger is not reliably better when nothing changes


def test_data_needed_inverts_the_law():
    D = np.geomspace(1e5, 1e8, 12)
    law = dict(E=1.5, B=80.0, beta=0.3)
    f = fit.fit_law(None, D, fit.predict(law, D=D), "D", n_boot=150)
    r = compare.data_needed(f, 2.0)
    assert r["D"] == pytest.approx((80.0 / 0.5) ** (1 / 0.3), rel=1e-3)
    assert r["ci"][0] <= r["D"] <= r["ci"][1]
    assert compare.data_needed(f, 1.4)["D"] is None            # below the floor: unreachable
    assert compare.common_target([[3, 2.5], [2.8, 2.6]]) == 2.6
