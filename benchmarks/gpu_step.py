"""MFU and memory of a 1B-class LLM train step on the local accelerator, against the plan.

    python benchmarks/gpu_step.py                       # 1.1B Llama (TinyLlama shape), bf16,
                                                        # seq 2048, on the first device
    python benchmarks/gpu_step.py --impls ,xla          # default kernel vs XLA's attention
    python benchmarks/gpu_step.py --tiny                # a tiny model: the script's check (CPU)

The step is the trainer's (`vlm_jax.train.step.make_train_step`: AdamW, fp32 master
weights, bf16 compute, every parameter trained, donated state), AOT-compiled for one
device; the batch is random tokens (the step's cost does not depend on them). Per
attention impl ("" = what `vlm_jax.models.attention.resolve` picks: cuDNN flash on a
bf16 GPU, splash on TPU) it reports:
- step time (median of `--steps` after a warm-up step), tokens/s;
- MFU = training FLOPs per step (`vlm_jax.train.flops`, the trainer's count: 6 N per token
  plus attention) / (step time x the device's peak bf16 FLOP/s, `train.metrics`);
  target (issue 9): >= 45 % on an H100;
- memory: the device's `peak_bytes_in_use` (allocator stats; None on CPU) and XLA's
  memory analysis of the compiled step, against `python -m vlm_jax.grid plan`'s per-device
  total for the same config and chip (`plan_vs_peak`; target within 10 %).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

# TinyLlama-1.1B's shape (Llama 2 architecture, GQA)
LLM_1B = dict(vocab_size=32000, width=2048, depth=22, heads=32, kv_heads=4, mlp_dim=5632)
LLM_TINY = dict(vocab_size=256, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=128)


def config(impl: str, seq: int, batch: int, tiny: bool, remat: str, chunk: int):
    from configs import common
    c = common.base_config()
    c.name = "bench_gpu_step"
    c.model.kind = "lm"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = impl
    c.model.llm.update(LLM_TINY if tiny else LLM_1B)
    c.model.llm.update(max_len=seq, scan_layers=True, remat=remat, loss_chunk=chunk)
    c.data.seq_len = seq
    c.train.batch_size = batch
    c.train.steps = 1000
    c.optim.update(trainable=("*",), lr=1e-4)
    return c


def chip_name(kind: str) -> str | None:
    """`grid plan`'s chip name of a device kind ("NVIDIA H100 80GB HBM3" -> "h100")."""
    kind = kind.lower()
    for chip, key in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"),
                      ("v5e", "v5 lite"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5p", "v5"),
                      ("v6e", "v6"), ("v4", "v4")):
        if key in kind:
            return chip
    return None


def measure(c, steps: int, chip: str | None = None) -> dict:
    from lm_step import compile_and_time, peak_bytes
    from vlm_jax.grid import plan
    from vlm_jax.models import attention
    from vlm_jax.models.layers import dtype_of
    from vlm_jax.train import flops as F
    from vlm_jax.train import metrics
    from vlm_jax.train.trainer import FAST_COMPILE   # CPU: the script's check, not a number
    dev = jax.devices()[0]
    r = compile_and_time(c, steps, FAST_COMPILE if jax.default_backend() == "cpu" else None,
                         dev)
    mem, step_s, b, t = r["memory"], r["step_s"], *r["batch_shape"]
    flops = F.train_per_example(c, ["llm"]) * b
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    chip = chip or chip_name(dev.device_kind)
    out = {"attention_impl": c.model.attention_impl,
           "attention_kernel": attention.resolve(c.model.attention_impl,
                                                 dtype_of(c.model.dtype),
                                                 c.model.llm.width // c.model.llm.heads),
           "compile_s": round(r["compile_s"], 2), "step_s": step_s, "step_s_all": r["times_s"],
           "tokens_per_s": b * t / step_s, "train_flops_per_step": flops,
           "mfu": metrics.mfu(flops, step_s, 1, dev.device_kind), "loss_first": r["loss"],
           "loss_last": float(r["last_metrics"]["loss"]), "peak_bytes_in_use": peak,
           "xla_bytes": peak_bytes(mem)}
    if chip:
        p = plan.plan_config(c, (1, 1, 1), chip, 0.4, compile_mode="off")
        out["plan_chip"] = chip
        out["plan_bytes"] = p.total_bytes
        out["plan_by"] = p.bytes
        if peak:
            out["plan_vs_peak"] = p.total_bytes / peak
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="", help="comma-separated attention impls ('' = default)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    ap.add_argument("--chunk", type=int, default=512, help="model.llm.loss_chunk")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (checks the script)")
    ap.add_argument("--chip", default=None, help="grid plan's chip name (default: the "
                    "device's, e.g. h100; none on CPU)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.batch, a.chunk, a.steps = min(a.seq, 128), min(a.batch, 2), 64, min(a.steps, 2)
    dev = jax.devices()[0]
    out = {"benchmark": "gpu_step", "device": dev.device_kind, "backend": jax.default_backend(),
           "model": "tiny" if a.tiny else "llama-1.1b (TinyLlama shape)", "seq": a.seq,
           "batch": a.batch, "remat": a.remat, "loss_chunk": a.chunk, "dtype": "bfloat16",
           "mfu_target": 0.45, "plan_target": 0.10, "runs": []}
    for impl in a.impls.split(","):
        c = config(impl.strip(), a.seq, a.batch, a.tiny, a.remat, a.chunk)
        try:
            out["runs"].append(measure(c, a.steps, a.chip))
        except Exception as e:  # noqa: BLE001 - report it and go on with the next impl
            out["runs"].append({"attention_impl": impl, "error": f"{type(e).__name__}: {e}"[:600]})
    print(json.dumps(out, indent=1))
    return 0 if all("error" not in r for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
