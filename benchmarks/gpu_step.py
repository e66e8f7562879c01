"""MFU and memory of a 1B-class LLM train step on the local accelerator, against the plan.

    python benchmarks/gpu_step.py                       # 1.1B Llama (TinyLlama shape), bf16,
                                                        # seq 2048, on the first device
    python benchmarks/gpu_step.py --impls ,xla          # default kernel vs XLA's attention
    python benchmarks/gpu_step.py --variants :8:none,:16:none,xla:8:dots --check --out r.json
                                                        # IMPL:BATCH:REMAT runs, each in its
                                                        # own process, + the kernel parity check
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
With several runs each runs in its own process (`--isolate`, the default unless
`--tiny`), so that each peak is its own (the allocator's peak is per process); this one
then does not preallocate the card's memory.
`--check` first compares the default kernel with fp32 einsum attention on random inputs
(a right-padded and a packed batch, output and gradients; bf16 einsum's error beside it
as the yardstick). Prints one JSON object (and writes it to `--out` after each run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

# TinyLlama-1.1B's shape (Llama 2 architecture, GQA)
LLM_1B = dict(vocab_size=32000, width=2048, depth=22, heads=32, kv_heads=4, mlp_dim=5632)
LLM_TINY = dict(vocab_size=256, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=128)
REMATS = ("none", "dots", "full")


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
           "xla_bytes": peak_bytes(mem),
           "kernel_warnings": sorted(attention._WARNED)}   # e.g. cuDNN refused -> XLA
    if chip:
        # what `grid plan` gives without compiling for the device (as on a CPU host)
        p = plan.plan_config(c, (1, 1, 1), chip, 0.4, compile_mode="off")
        out["plan_chip"] = chip
        out["plan_bytes"] = p.total_bytes
        out["plan_by"] = p.bytes
        out["plan_source"] = p.activations_source
        out["plan_analytic_bytes"] = p.total_bytes - p.bytes["activations"] + \
            p.activations_analytic
        if peak:
            out["plan_vs_peak"] = p.total_bytes / peak
    return out


def _rel(a, b, valid) -> float:
    import jax.numpy as jnp
    a = jnp.where(valid, a.astype(jnp.float32), 0.0)
    b = jnp.where(valid, b.astype(jnp.float32), 0.0)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def attention_check(impl: str = "", seed: int = 0) -> dict:
    """The kernel `impl` resolves to in bf16 vs fp32 einsum attention (causal, GQA) on a
    right-padded batch (cuDNN: its lengths path) and a packed one (cuDNN: its bias path):
    relative errors of the output and of dq, dk, dv over the real rows; bf16 einsum's
    errors beside them as the yardstick of bf16 rounding."""
    import jax.numpy as jnp
    from vlm_jax.models import attention, layers
    b, t, n, kv, h = 2, 256, 8, 2, 64
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h))
    k, v = (jax.random.normal(x, (b, t, kv, h)) for x in ks[1:3])
    cot = jax.random.normal(ks[3], (b, t, n, h))
    segs = {"padded": [[1] * t, [1] * 200 + [0] * (t - 200)],
            "packed": [[1] * 100 + [2] * 100 + [3] * 40 + [0] * 16, [1] * 60 + [2] * 196]}

    def outputs(name, dtype, seg):
        def f(q, k, v):
            mask = layers.self_attention_mask(seg, True, t, name, dtype, h)
            x = [a.astype(dtype) for a in (q, k, v)]
            return layers.dot_product_attention(*x, mask=mask, implementation=name)
        out, vjp = jax.vjp(f, q, k, v)
        valid = (seg > 0)[:, :, None, None]
        return (out, *vjp(jnp.where(valid, cot, 0.0).astype(out.dtype))), valid

    res = {"kernel": attention.resolve(impl, jnp.bfloat16, h)}
    for case, seg in segs.items():
        seg = jnp.asarray(seg, jnp.int32)
        ref, valid = jax.jit(lambda s: outputs("einsum", jnp.float32, s))(seg)
        for name in (impl, "einsum"):
            got, _ = jax.jit(lambda s, name=name: outputs(name, jnp.bfloat16, s))(seg)
            key = f"{case}_{'kernel' if name == impl else 'einsum_bf16'}"
            res[key] = {n_: round(_rel(g, r, valid if i < 2 else True), 6) for i, (n_, g, r)
                        in enumerate(zip(("out", "dq", "dk", "dv"), got, ref))}
    worst = max(max(res[f"{c}_kernel"].values()) for c in segs)
    yard = max(max(res[f"{c}_einsum_bf16"].values()) for c in segs)
    res["ok"] = bool(worst <= max(2 * yard, 1e-2))
    return res


def parse_variants(a) -> list[tuple[str, int, str, int]]:
    """`--variants IMPL:BATCH:REMAT[:SEQ],...`, else `--impls` x `--batch` x `--remat`;
    as (impl, batch, remat, seq) with `--seq` where SEQ is left out."""
    if not a.variants:
        return [(i.strip(), a.batch, a.remat, a.seq) for i in a.impls.split(",")]
    out = []
    for v in a.variants.split(","):
        parts = v.split(":")
        if len(parts) not in (3, 4) or not all(x.isdigit() for x in parts[1::2]) \
                or parts[2] not in REMATS:
            raise SystemExit(f"--variants: {v!r} is not IMPL:BATCH:REMAT[:SEQ] (REMAT one "
                             f"of {REMATS}; IMPL may be empty for the default kernel)")
        out.append((parts[0].strip(), int(parts[1]), parts[2],
                    int(parts[3]) if len(parts) == 4 else a.seq))
    return out


def _failed(variant, error: str) -> dict:
    impl, batch, remat, seq = variant
    return {"attention_impl": impl, "batch": batch, "remat": remat, "seq": seq, "error": error}


def run_isolated(a, variant, timeout: float | None, env: dict) -> dict:
    """One run in a fresh process (its own allocator peak); its error, if any, reported."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--no-isolate", "--variants",
               ":".join(map(str, variant)), "--chunk", str(a.chunk),
               "--steps", str(a.steps), "--out", out] + (["--tiny"] if a.tiny else []) + \
            (["--chip", a.chip] if a.chip else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return _failed(variant, f"timed out after {timeout:.0f} s")
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)["runs"][0]
        return _failed(variant, f"exit {p.returncode}: {(p.stderr or p.stdout)[-600:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="", help="comma-separated attention impls ('' = default)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--remat", default="none", choices=REMATS)
    ap.add_argument("--variants", default="", help="IMPL:BATCH:REMAT[:SEQ],... (instead "
                    "of --impls/--batch/--remat; ':16:none' = the default kernel at batch 16)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each run in its own process (default: with more than one run, "
                    "unless --tiny)")
    ap.add_argument("--check", action="store_true", help="the kernel parity check first")
    ap.add_argument("--out", default="", help="also write the JSON here after each run")
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds for all isolated runs together (0: none)")
    ap.add_argument("--chunk", type=int, default=512, help="model.llm.loss_chunk")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (checks the script)")
    ap.add_argument("--chip", default=None, help="grid plan's chip name (default: the "
                    "device's, e.g. h100; none on CPU)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.batch, a.chunk, a.steps = min(a.seq, 128), min(a.batch, 2), 64, min(a.steps, 2)
    variants = parse_variants(a)
    isolate = a.isolate if a.isolate is not None else (len(variants) > 1 and not a.tiny)
    child_env = dict(os.environ)
    if isolate:   # this process only checks: it must not take the card's memory from the runs
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    dev = jax.devices()[0]
    out = {"benchmark": "gpu_step", "device": dev.device_kind, "backend": jax.default_backend(),
           "jax": jax.__version__,
           "model": "tiny" if a.tiny else "llama-1.1b (TinyLlama shape)",
           "loss_chunk": a.chunk, "dtype": "bfloat16", "isolated": isolate,
           "mfu_target": 0.45, "plan_target": 0.10, "runs": []}

    def write():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
    if a.check:
        try:
            out["attention_check"] = attention_check()
        except Exception as e:  # noqa: BLE001 - report it, then time the runs
            out["attention_check"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        write()
    t_end = time.monotonic() + a.timeout if a.timeout else None
    for variant in variants:
        impl, batch, remat, seq = variant
        if isolate:
            left = t_end - time.monotonic() if t_end else None
            r = run_isolated(a, variant, left, child_env) if left is None or left > 0 else \
                _failed(variant, "not run: --timeout spent")
        else:
            c = config(impl, seq, batch, a.tiny, remat, a.chunk)
            try:
                r = {**measure(c, a.steps, a.chip), "batch": batch, "remat": remat, "seq": seq}
            except Exception as e:  # noqa: BLE001 - report it and go on with the next run
                r = _failed(variant, f"{type(e).__name__}: {e}"[:600])
        out["runs"].append(r)
        write()
    print(json.dumps(out, indent=1))
    ok = all("error" not in r for r in out["runs"]) and \
        out.get("attention_check", {}).get("ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
