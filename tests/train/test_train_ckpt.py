"""init_from a vlm_jax workdir, branch_from + checkpoint_steps, and the analytic FLOP count
against XLA's cost analysis on the real models."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests.train import tiny
from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import flops as flops_lib
from vlm_jax.train import trainer


def _losses(w):
    return [(r["step"], r.get("train/loss"), r.get("eval/loss"))
            for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """6 steps, everything trainable, checkpoint_steps=(2,) kept although keep=1."""
    w = str(tmp_path_factory.mktemp("long") / "run")
    c = tiny.config(steps=6, keep_checkpoints=1, checkpoint_steps=(2,), eval_every_steps=3)
    c.optim.trainable = ("",)
    c.optim.schedule = "wsd"
    tiny.run(c, w)
    return w, c


def test_checkpoint_steps_are_never_collected(long_run):
    w, _ = long_run
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "6"]


def test_branch_from_continues_the_full_state(long_run, tmp_path):
    """A branch at step 2 with the same schedule reproduces steps 3..6 exactly (params,
    optimizer state and data iterator all restored); the run's own schedule applies."""
    w, c = long_run
    b = c.copy_and_resolve_references()
    b.train.branch_from = f"{w}:2"
    out = tiny.run(b, str(tmp_path / "branch"))
    assert out["branched_from"] == f"{w}:2" and out["steps"] == 6
    assert _losses(str(tmp_path / "branch")) == _losses(w)[2:]
    assert out["examples_seen"] == 6 * c.train.batch_size
    # a missing step is a clear error that names the field
    b2 = b.copy_and_resolve_references()
    b2.train.branch_from = f"{w}:3"
    with pytest.raises(ValueError, match="train.branch_from.*no checkpoint at step 3"):
        tiny.run(b2, str(tmp_path / "branch2"))


def test_init_from_workdir(long_run, tmp_path):
    w, _ = long_run
    saved = ckpt.restore_params(w)
    c = tiny.config(steps=1)
    c.model.vision.init_from = w
    c.model.llm.init_from = w
    r = trainer.Run(c, str(tmp_path / "x"), model=tiny.TinyVLM(), batch_spec=tiny.batch_spec,
                    data=tiny.Data())
    tr, fr = r.init_params()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 fr["vision"], saved["vision"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 fr["llm"], saved["llm"])
    # the projector is freshly initialised, not taken from the checkpoint
    assert not np.array_equal(np.asarray(tr["projector"]["linear_0"]["kernel"]),
                              saved["projector"]["linear_0"]["kernel"])


def _real_config(kind):
    from configs import common
    c = common.base_config()
    c.model.kind = kind
    c.model.vision.update(image_size=32, patch_size=8, width=64, depth=3, heads=4, mlp_dim=256,
                          act="gelu", scan_layers=False)
    c.model.llm.update(vocab_size=512, width=64, depth=2, heads=4, kv_heads=4, mlp_dim=192,
                       scan_layers=False, max_len=128)
    c.data.seq_len = 24
    c.train.batch_size = 4
    c.train.progress = False
    return c


@pytest.mark.parametrize("kind,trainable", [("vlm", ("projector",)), ("vlm", ("",)),
                                            ("lm", ("",))])
def test_analytic_flops_match_xla(kind, trainable, tmp_path):
    c = _real_config(kind)
    c.optim.trainable = trainable
    # the analytic count leaves the optimizer out; XLA's cost analysis of the flat AdamW
    # (optim.flatten) counts ~4% more elementwise flops than the per-leaf one's
    c.optim.flatten = "off"
    r = trainer.Run(c, str(tmp_path))
    tr, fr = r.init_params()
    state = r.init_state(tr)
    r.compile(state, fr)
    xla = r.train_step.cost_analysis()["flops"]
    ours = flops_lib.train_per_example(c, r.trainable_components) * c.train.batch_size
    assert ours == pytest.approx(xla, rel=0.12), (ours, xla)
    xla_eval = r.eval_step.cost_analysis()["flops"]
    assert flops_lib.eval_per_example(c) * c.train.batch_size == pytest.approx(xla_eval,
                                                                              rel=0.12)
