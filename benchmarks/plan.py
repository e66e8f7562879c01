"""Fused chunked cross-entropy vs the naive loss in a real train step; prints one JSON.

    python benchmarks/plan.py [--vocab 32000] [--seq 512] [--batch 8] [--chunk 128] [--steps 2]

Both steps are the trainer's train step (`vlm_jax.train.step.make_train_step`, AdamW) of
the same LM (kind "lm", all params trainable), AOT-compiled on the local backend; only
`model.llm.loss_chunk` differs (-1 = naive fp32 logits [B, T, V] and their gradient;
> 0 = `vlm_jax.models.losses` chunked over the sequence). Reports XLA's memory analysis
(temp bytes = activations and temporaries) and the median step time of each, the
ratios chunked / naive, the loss values (equal up to fp32 rounding), and what
`python -m vlm_jax.grid plan` estimates for the same activations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402


def lm_config(vocab: int, seq: int, batch: int, chunk: int):
    from configs import common
    c = common.base_config()
    c.model.kind = "lm"
    c.model.llm.update(vocab_size=vocab, width=256, depth=2, heads=4, kv_heads=4, mlp_dim=688,
                       max_len=max(seq, 128), scan_layers=True, loss_chunk=chunk)
    c.data.seq_len = seq
    c.train.batch_size = batch
    c.train.steps = 100
    c.optim.trainable = ("*",)
    return c


def measure(c, steps: int) -> dict:
    from lm_step import compile_and_time
    from vlm_jax.grid import plan
    r = compile_and_time(c, steps)
    mem, b = r["memory"], r["batch_shape"][0]
    analytic = plan.activation_bytes(c, b, plan._MeshShape((1, 1, 1)), ["llm"])
    return {"temp_bytes": int(mem.temp_size_in_bytes), "compile_s": r["compile_s"],
            "step_s": r["step_s"], "loss": r["loss"],
            "plan_activation_bytes": int(analytic)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    naive = measure(lm_config(a.vocab, a.seq, a.batch, -1), a.steps)
    fused = measure(lm_config(a.vocab, a.seq, a.batch, a.chunk), a.steps)
    logits_bytes = a.batch * a.seq * a.vocab * 4
    print(json.dumps({
        "benchmark": "fused_cross_entropy", "device": jax.devices()[0].device_kind,
        "vocab": a.vocab, "seq": a.seq, "batch": a.batch, "chunk": a.chunk,
        "fp32_logits_bytes": logits_bytes, "naive": naive, "chunked": fused,
        "temp_ratio": fused["temp_bytes"] / naive["temp_bytes"],
        "step_time_ratio": fused["step_s"] / naive["step_s"],
        "loss_rel_diff": abs(fused["loss"] - naive["loss"]) / abs(naive["loss"]),
    }, indent=1))


if __name__ == "__main__":
    main()
