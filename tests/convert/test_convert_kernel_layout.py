"""The [out, in] kernel layout: a Linear holds torch's weight as is, and files written
with the [in, out] kernels of earlier versions (converted dirs, train checkpoints) are
refused with a message saying what to do, never loaded transposed."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import convert
from vlm_jax.models import layers as L
from vlm_jax.train import checkpoint as ckpt


def test_linear_kernel_is_torch_weight():
    """A Linear whose kernel is a torch Linear's `weight`, unchanged, computes the same;
    multi-axis kernels ([heads, kv, embed] in, [embed, heads, kv] out) too, with their
    logical axes reordered like the shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    t = torch.nn.Linear(12, 6, bias=True)
    q = L.Linear((2, 3), (L.EMBED, L.HEADS, L.KV), use_bias=True)
    boxed = q.init(jax.random.key(0), x)["params"]
    assert boxed["kernel"].names == (L.HEADS, L.KV, L.EMBED)
    w = t.weight.detach().numpy()
    p = {"kernel": w.reshape(2, 3, 12), "bias": t.bias.detach().numpy().reshape(2, 3)}
    y = q.apply({"params": p}, x)
    ref = t(torch.tensor(x)).detach().numpy().reshape(2, 5, 2, 3)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    o = L.Linear(6, (L.HEADS, L.KV, L.EMBED), in_axes=2)
    assert o.init(jax.random.key(0), ref)["params"]["kernel"].names == (L.EMBED, L.HEADS, L.KV)
    wo = rng.standard_normal((6, 6)).astype(np.float32)
    y2 = o.apply({"params": {"kernel": wo.reshape(6, 2, 3)}}, ref)
    np.testing.assert_allclose(np.asarray(y2), ref.reshape(2, 5, 6) @ wo.T, rtol=1e-5,
                               atol=1e-5)
    # The initialiser draws what it drew for [in, out] kernels, transposed.
    init = L.out_in_init(L.normal_init(1.0), 2)
    k = init(jax.random.key(3), (2, 3, 12))
    np.testing.assert_array_equal(k, jnp.transpose(L.normal_init(1.0)(jax.random.key(3),
                                                                      (12, 2, 3)), (1, 2, 0)))


def test_stale_converted_dir_refused(tmp_path):
    params = {"embedding": np.zeros((4, 2), np.float32)}
    meta = {"part": "llm", "arch": "llama", "config": {}, "source": "/models/llama"}
    convert.api.save_converted(str(tmp_path / "old"), params, meta)   # no kernel_layout
    with pytest.raises(convert.ConversionError, match=r"\[in, out\] kernel layout.*"
                       r"python -m vlm_jax.convert --hf /models/llama --out .*old --force"):
        convert.load_pretrained("llm", str(tmp_path / "old"))
    convert.api.save_converted(str(tmp_path / "new"), params,
                               dict(meta, kernel_layout=L.KERNEL_LAYOUT))
    _, got = convert.load_converted(str(tmp_path / "new"))
    np.testing.assert_array_equal(got["embedding"], params["embedding"])


def test_stale_train_checkpoint_refused(tmp_path):
    """A workdir checkpoint without the layout marker (written before it existed) is
    refused by both resume (`restore`) and init_from (`restore_params`); a new one
    restores, and the marker does not leak into the run's meta."""
    import orbax.checkpoint as ocp
    state = {"params": {"p": {"kernel": jnp.arange(4.0).reshape(2, 2)}}}
    old = ckpt.make_manager(str(tmp_path / "old"), async_save=False)
    old.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave({"examples_seen": 3})))
    old.wait_until_finished()
    with pytest.raises(ckpt.StaleCheckpointError, match=r"\[in, out\] kernel layout"):
        ckpt.restore(old, 1, state)
    old.close()
    with pytest.raises(ckpt.StaleCheckpointError, match="re-run the training"):
        ckpt.restore_params(str(tmp_path / "old"), "p")
    new = ckpt.make_manager(str(tmp_path / "new"), async_save=False)
    ckpt.save(new, 1, state, meta={"examples_seen": 3})
    new.wait_until_finished()
    got, meta = ckpt.restore(new, 1, state)
    new.close()
    assert meta == {"examples_seen": 3}
    np.testing.assert_array_equal(got["params"]["p"]["kernel"], state["params"]["p"]["kernel"])
    np.testing.assert_array_equal(ckpt.restore_params(str(tmp_path / "new"), "p")["kernel"],
                                  state["params"]["p"]["kernel"])
    assert json.load(open(os.path.join(tmp_path, "new", "checkpoints", "1", "meta",
                                       "metadata")))["kernel_layout"] == L.KERNEL_LAYOUT
