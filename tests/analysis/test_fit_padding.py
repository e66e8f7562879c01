"""The point bucket (padding to a power of two, floor 16) is only a shape: a fit padded to
16 equals the same fit padded to 256 (the floor before), and the demo's fits get small
buckets (each L-BFGS evaluation costs in proportion to the padded size)."""
import numpy as np
import pytest

from vlm_jax.analysis import fit

# Each refit stops at a relative objective change <= 1e-13 (optimize.minimize's ftol), so
# on a well-posed fit the minimiser is pinned to ~sqrt(1e-13) relative in the worst
# direction; padding only changes last-bit rounding of the sums. 1e-6 has room for both.
RTOL = 1e-6


def _fit_both(monkeypatch, *args, **kw):
    out = {}
    for floor in (16, 256):
        monkeypatch.setattr(fit, "_bucket", lambda n, f=floor: max(f, 1 << (n - 1).bit_length()))
        out[floor] = fit.fit_law(*args, **kw)
    return out[16], out[256]


def _assert_same(a, b):
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert a.params[k] == pytest.approx(b.params[k], rel=RTOL), k
        np.testing.assert_allclose(a.ci[k], b.ci[k], rtol=RTOL, err_msg=k)
    assert a.huber_loss == pytest.approx(b.huber_loss, rel=RTOL)
    assert a.boot.shape == b.boot.shape
    np.testing.assert_allclose(a.boot, b.boot, rtol=RTOL)   # resample by resample


def test_demo_sized_fits_get_small_buckets():
    assert [fit._bucket(n) for n in (3, 4, 12, 16, 17, 24, 240)] == [16, 16, 16, 16, 32, 32, 256]


def test_padding_does_not_change_a_one_variable_fit(monkeypatch):
    law = dict(E=2.0, B=150.0, beta=0.4)
    D = np.geomspace(1e4, 1e7, 10)
    L = fit.predict(law, D=D) * np.exp(0.003 * np.random.default_rng(3).standard_normal(10))
    a, b = _fit_both(monkeypatch, None, D, L, "D", n_boot=200, seed=4)
    _assert_same(a, b)


def test_padding_does_not_change_a_joint_fit(monkeypatch):
    law = dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)
    NN, DD = (v.ravel() for v in np.meshgrid(np.geomspace(1e6, 1e9, 4), np.geomspace(1e7, 1e11, 5)))
    L = fit.predict(law, NN, DD) * np.exp(0.002 * np.random.default_rng(5).standard_normal(20))
    a, b = _fit_both(monkeypatch, NN, DD, L, "joint", n_boot=100, seed=6,
                     grid=fit.init_grid("joint")[::9])
    _assert_same(a, b)
