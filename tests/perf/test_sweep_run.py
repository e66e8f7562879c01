"""A WSD data-size sweep trained end to end: the branched decay matches a separate run."""
import json
import os

import pytest

from configs import demo
from vlm_jax.grid import sweep
from vlm_jax.train import trainer


def _cfg(n):
    c = demo.get_config(f"run,vit=S,llm=S,n={n},batch=8,eval_n=32")
    c.optim.update(lr=3e-3, decay_frac=0.25, trainable=("projector", "llm"))
    c.train.log_every_steps = 2
    return c


@pytest.mark.slow
def test_branch_matches_separate_run(tmp_path):
    root = str(tmp_path)
    small, large = _cfg(64), _cfg(128)          # 8 and 16 steps, one epoch each
    res = sweep.run_sweep([(large, f"{root}/n128"), (small, f"{root}/n64")],
                          run_fn=trainer.run)
    stable, branch = res
    assert stable["steps"] == 16 and branch["steps"] == 8
    assert branch["branched_from"] == f"{root}/n128:6"
    # the branch trained only its decay (steps 7..8) on top of the stable run's state
    steps = [json.loads(line)["step"] for line in open(f"{root}/n64/metrics.jsonl")]
    assert min(steps) > 6
    # a separate run with its own WSD schedule (same shared warmup)
    (item,) = [i for i in sweep.plan_group([("s", small, "a"), ("l", large, "b")])
               if i.role == "branch"]
    sep = item.apply(small)
    sep.train.branch_from = ""
    ref = trainer.run(sep, f"{root}/separate64")
    init = json.loads(open(f"{root}/separate64/metrics.jsonl").readline())["train/loss"]
    assert ref["final/eval_loss"] < 0.9 * init      # it learned something: the check has teeth
    rel = abs(branch["final/eval_loss"] - ref["final/eval_loss"]) / ref["final/eval_loss"]
    print(json.dumps({"branch_eval_loss": branch["final/eval_loss"], "init_loss": init,
                      "separate_eval_loss": ref["final/eval_loss"], "rel_diff": rel}))
    assert rel < 0.01, (branch["final/eval_loss"], ref["final/eval_loss"])
    # done runs are skipped when the sweep is run again
    again = sweep.run_sweep([(large, f"{root}/n128"), (small, f"{root}/n64")],
                            run_fn=lambda c, w: pytest.fail("retrained a done run"))
    assert [r["final/eval_loss"] for r in again] == [r["final/eval_loss"] for r in res]
