"""A native run through the real trainer: examples/images/tokens seen count the samples of
the packed rows (not the rows), FLOPs count what the steps ran (rows of the analytic
per-row count)."""
import json
import os

import jax
import numpy as np
import pytest

from configs import native as cn
from vlm_jax.data import native as dn
from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import flops, trainer
from vlm_jax.train import step as step_lib


def test_native_run_counts_examples_not_rows(tmp_path):
    c = cn.get_config("demo_run,llm=t64,vit=e16,steps=2,batch_size=2")
    c.data.eval_n = 2
    c.train.log_every_steps = 1
    run = trainer.Run(c, str(tmp_path / "run"))
    result = run.train()
    assert result["status"] == "done" and result["steps"] == 2

    it = dn.train_iterator(c)  # the same two batches, read again
    batches = [next(it) for _ in range(2)]
    examples = sum(int(b["_examples"]) for b in batches)
    rows = 2 * c.train.batch_size
    assert examples > rows  # packed: several samples per row
    # what the step counts on device (max segment id per row) is what the packer put there
    assert examples == sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
    assert result["examples_seen"] == examples
    assert result["images_seen"] == examples  # one image per NaViL sample
    assert result["tokens_seen"] == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    per_row = flops.train_per_example(c, ["llm", "projector", "vision"])
    assert np.isclose(result["flops"], per_row * rows)
    # the analytic per-row count is what XLA compiled for the step's model part, the loss
    # and its gradient (rows of patches and tokens, padding included; both experts of the
    # masked routing); the optimizer update (O(params), ~15 % of this toy step's count)
    # is not in it
    def loss(p, b):
        return run.model.apply({"params": p}, step_lib.model_inputs(b))["loss_sum"]
    trainable, _ = run.init_params()
    with run.ctx():
        grad = jax.jit(jax.value_and_grad(loss)).lower(
            ckpt.abstract_like(trainable), run._abstract_batch(run.batch_spec)).compile()
    assert per_row * c.train.batch_size == pytest.approx(grad.cost_analysis()["flops"],
                                                         rel=0.05)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["examples_seen"] for r in logged if "examples_seen" in r][-1] == examples
    per_step = [r["perf/examples_per_sec"] * r["perf/step_time_s"] for r in logged
                if "perf/examples_per_sec" in r]
    np.testing.assert_allclose(per_step, [int(b["_examples"]) for b in batches], rtol=1e-6)
    assert os.path.exists(tmp_path / "run" / "result.json")
