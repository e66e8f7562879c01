"""Native eval batches are built once per process for the runs they are the same for
(model sizes differ, data and spec do not), rebuilt when what decides them changes, and
shared read-only."""
import numpy as np
import pytest

from configs import native as cn
from vlm_jax.data import native


def _config(vit="e16", **data):
    c = cn.get_config(f"demo_run,llm=t64,vit={vit},batch_size=4")
    c.data.eval_n = 6
    c.data.update(data)
    return c


@pytest.fixture
def built(monkeypatch):
    """Counts the eval samples encoded (LoadNative.map calls) from a cleared cache."""
    native._EVAL_BATCHES.clear()
    calls = []
    real = native.LoadNative.map

    def counting(self, item):
        calls.append(item)
        return real(self, item)
    monkeypatch.setattr(native.LoadNative, "map", counting)
    yield calls
    native._EVAL_BATCHES.clear()


def test_built_once_for_runs_that_differ_in_model_size(built):
    first = native.eval_batches(_config("e16"))
    assert len(built) == 6
    again = native.eval_batches(_config("e64"))    # another encoder: same batches
    assert len(built) == 6
    assert len(first) == len(again)
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # shared arrays are read-only; the dicts are the caller's
    with pytest.raises(ValueError):
        again[0]["tokens"][0, 0] = 1
    again[0]["extra"] = 1
    assert "extra" not in native.eval_batches(_config("e16"))[0]


def test_rebuilt_when_data_spec_or_processes_change(built):
    native.eval_batches(_config())
    n = len(built)
    native.eval_batches(_config(seed=1))                 # other eval records
    assert len(built) == 2 * n
    c = _config()
    c.data.native.max_image_tokens = 24                  # other NativeSpec
    native.eval_batches(c)
    assert len(built) == 3 * n
    halves = [native.eval_batches(_config(), p, 2) for p in range(2)]
    assert len(built) == 5 * n
    whole = native.eval_batches(_config())
    assert len(built) == 5 * n
    np.testing.assert_array_equal(
        np.concatenate([halves[0][0]["tokens"], halves[1][0]["tokens"]]), whole[0]["tokens"])


def test_size_bound_zero_keeps_nothing(built, monkeypatch):
    monkeypatch.setenv("VLM_JAX_EVAL_CACHE_MB", "0")
    native.eval_batches(_config())
    native.eval_batches(_config())
    assert len(built) == 12
