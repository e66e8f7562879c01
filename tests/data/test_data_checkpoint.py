"""The train iterator's state through orbax (grain's checkpoint handler), mid-epoch, with
worker processes and packing; named dataset configs."""
import os

import numpy as np
import pytest

from tests.data.test_data_pipeline import tiny_config
from vlm_jax.data import train_iterator


@pytest.mark.parametrize("workers,kind,packing", [(0, "vlm", False), (1, "lm", True)])
def test_orbax_checkpoint_roundtrip(tmp_path, workers, kind, packing):
    import grain
    import orbax.checkpoint as ocp
    c = tiny_config(kind=kind, n=20, packing=packing, num_workers=workers)
    it = train_iterator(c)
    for _ in range(3):  # 24 of 20 records: into the second epoch
        next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it) for _ in range(3)]
    if hasattr(it, "close"):
        it.close()
    fresh = train_iterator(c)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for w in want:
        got = next(fresh)
        for k in ("tokens", "segment_ids", "_seen", "_epoch"):
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)
    if hasattr(fresh, "close"):
        fresh.close()


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
