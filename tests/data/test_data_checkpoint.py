"""The train iterator's state through orbax (grain's checkpoint handler), mid-epoch, with
worker processes and packing; named dataset configs."""
import os

import numpy as np
import pytest

from tests.data.test_data_pipeline import tiny_config
from vlm_jax.data import train_iterator


def _save(it, path, step):
    import grain
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(str(path))
    mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    return mngr


def _restore(mngr, it, step):
    import grain
    import orbax.checkpoint as ocp
    mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))


def _assert_same(got, want, keys=("tokens", "segment_ids", "_seen", "_epoch")):
    for k in keys:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("kind,packing", [("vlm", False), ("lm", True)])
def test_orbax_checkpoint_roundtrip(tmp_path, kind, packing):
    c = tiny_config(kind=kind, n=20, packing=packing)
    it = train_iterator(c)
    for _ in range(3):  # 24 of 20 records: into the second epoch
        next(it)
    mngr = _save(it, tmp_path / "ckpt", 3)
    want = [next(it) for _ in range(3)]
    fresh = train_iterator(c)
    _restore(mngr, fresh, 3)
    for w in want:
        _assert_same(next(fresh), w)


def test_worker_processes_same_stream_and_checkpoint(tmp_path):
    """2 worker processes give the 0-worker stream (pixels through shared memory too), and
    their iterator state round-trips through orbax mid-epoch (workers re-seeked in place:
    one spawn for the whole test)."""
    c = tiny_config(n=20)
    ref = train_iterator(c)
    want = [next(ref) for _ in range(6)]
    c.data.num_workers = 2
    it = train_iterator(c)
    try:
        for w in want[:3]:
            _assert_same(next(it), w, ("tokens", "pixels", "loss_mask", "_seen", "_records"))
        mngr = _save(it, tmp_path / "ckpt", 3)
        for w in want[3:]:
            _assert_same(next(it), w)
        _restore(mngr, it, 3)
        for w in want[3:]:
            _assert_same(next(it), w, ("tokens", "pixels", "_seen", "_epoch"))
    finally:
        it.close()


def test_named_datasets_resolve(monkeypatch, tmp_path):
    from configs import datasets
    from vlm_jax.data.pipeline import data_config
    c = tiny_config(name="cc12m")
    monkeypatch.delenv("VLM_JAX_DATA", raising=False)
    d = data_config(c)
    assert d.source == "tar" and d.path.startswith("$VLM_JAX_DATA/cc12m/")
    with pytest.raises(ValueError, match="VLM_JAX_DATA"):
        train_iterator(c)
    monkeypatch.setenv("VLM_JAX_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="1243 of 1243 files do not exist"):
        train_iterator(c)
    # An explicit field wins over the named value.
    c.data.path = str(tmp_path / "mine-*.tar")
    assert data_config(c).path.endswith("mine-*.tar")
    assert data_config(tiny_config(name="coco_captions")).text_column == "captions/text"
    assert data_config(tiny_config(name="synthetic_noisy")).caption_noise > 0
    with pytest.raises(ValueError, match="known:.*laion400m"):
        data_config(tiny_config(name="imagenet"))
    assert set(datasets.names()) >= {"cc12m", "laion400m", "coco_captions",
                                     "synthetic_clean", "synthetic_noisy"}
    assert os.environ.get("VLM_JAX_DATA") == str(tmp_path)
