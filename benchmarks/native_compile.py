"""What the native demo runs' programs cost to build, and their step time.

    PYTHONPATH=. python benchmarks/native_compile.py [--quick | --all] [--breakdown]

For native demo shapes (configs/native.py `demo_stages`: LLM t64/t128 x encoder
e16..e128; default the smallest and the largest, `--all` all 8, `--quick` the smallest),
built exactly as the trainer builds them (`trainer.Run`: its init, train and eval programs
at its XLA levels), with no compilation or program cache:
- `init_s`: CPU seconds of `Run.init_params` (abstract params, the init program's compile,
  its run);
- `train_lower_s` / `train_compile_s`, `eval_lower_s` / `eval_compile_s`: CPU seconds to
  trace + lower and to compile each program;
- `train_loop_kernels` / `eval_loop_kernels`: XLA:CPU loop fusions in the optimized HLO.
  Compile time follows these: each distinct one is LLVM code generation (~20-75 ms at the
  default level), while matmuls (`ynn` library fusions) compile in ~1 ms;
- `step_s`: median CPU seconds of one train step on real packed batches.
`--breakdown` adds the compile of the model's loss gradient alone (`grad_compile_s`,
`grad_loop_kernels`): the rest of the train program is the update (AdamW, the finite check,
the gradient norm, the skip-on-non-finite select, over every parameter leaf).

Variants, measured in the same run on the same shapes (interleaved):
- `fused` (the model): `NativeVLM.__call__`'s loss is the LLM's fused cross-entropy
  (`LLM.loss`), one hand-written backward pass;
- `reference` (before): logits + `layers.next_token_loss` (autodiff over [b, T, V]);
- `tree_update`: the fused model with the update run leaf by leaf (the step before its
  flat-vector update; `--variants fused,tree_update`).
`ratio` = reference / fused train-program compile CPU seconds (summed over shapes);
`step_ratio` the same for the step time. CPU seconds, not wall: fair on a shared machine,
still noisy (+-15% under load).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLM_JAX_PROGRAM_CACHE", "0")  # build every program here

import jax  # noqa: E402

from configs import native as cn  # noqa: E402
from vlm_jax.models.native import NativeVLM  # noqa: E402
from vlm_jax.train import checkpoint as ckpt  # noqa: E402
from vlm_jax.train import sharding  # noqa: E402
from vlm_jax.train import step as step_lib  # noqa: E402
from vlm_jax.train import trainer as tr  # noqa: E402

SHAPES = [(llm, vit) for llm in cn.TOY_LLMS for vit in cn.TOY_ENCODERS]


class ReferenceLoss(NativeVLM):
    """The native model with its previous loss: logits, then `layers.next_token_loss`."""

    def __call__(self, batch, deterministic: bool = True):
        loss_sum, num = self.reference_loss(batch)
        return {"loss_sum": loss_sum, "num_tokens": num,
                "visual_tokens": batch["visual_mask"].astype("float32").sum()}


VARIANTS = {"fused": NativeVLM, "reference": ReferenceLoss, "tree_update": NativeVLM}


@contextlib.contextmanager
def _update_path(variant: str):
    """`tree_update`: the train step's update over the parameter tree (what the step did
    before the flat one: scaling, finite check, norm, lr and skip-select per leaf, the
    flat AdamW fed by `flat_transform`'s ravel/unravel); other variants: the step as is."""
    if variant != "tree_update":
        yield
        return
    real = step_lib.flat_update_of
    step_lib.flat_update_of = lambda tx: None
    try:
        yield
    finally:
        step_lib.flat_update_of = real


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loop_kernels(compiled) -> int:
    return len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(.*kind=kLoop", compiled.as_text(),
                          re.M))


def _timed(f):
    t = cpu_s()
    out = f()
    return out, round(cpu_s() - t, 3)


def measure(llm: str, vit: str, variant: str, steps: int, breakdown: bool) -> dict:
    c = cn.get_config(f"demo_run,llm={llm},vit={vit}")
    run = tr.Run(c, tempfile.mkdtemp(prefix="native_compile_"),
                 model=VARIANTS[variant](c.model))
    out = {}
    (trainable, frozen), out["init_s"] = _timed(run.init_params)
    state = run.init_state(trainable)
    n_steps, n_eval = run._executions()
    b_train = run._abstract_batch(run.batch_spec)
    b_eval = run._abstract_batch(run.eval_spec)
    hp = jax.device_put(run.schedule_hp)
    levels = {"train": run._compile_level("train", n_steps),
              "eval": run._compile_level("eval", n_eval)}
    opts = {k: tr.FAST_COMPILE if v == "fast" else None for k, v in levels.items()}
    with run.ctx():
        with _update_path(variant):
            train = jax.jit(step_lib.make_train_step(run.model, run.tx, run.schedule, 1),
                            donate_argnums=(0,))
        low, out["train_lower_s"] = _timed(lambda: train.lower(
            ckpt.abstract_like(state), ckpt.abstract_like(frozen), b_train,
            ckpt.abstract_like(hp)))
        train_c, out["train_compile_s"] = _timed(lambda: low.compile(opts["train"]))
        ev = jax.jit(step_lib.make_eval_step(run.model))
        low, out["eval_lower_s"] = _timed(lambda: ev.lower(
            ckpt.abstract_like(state["params"]), ckpt.abstract_like(frozen), b_eval))
        eval_c, out["eval_compile_s"] = _timed(lambda: low.compile(opts["eval"]))
        if breakdown:
            def loss(p, b):
                return run.model.apply({"params": p}, step_lib.model_inputs(b))["loss_sum"]
            low = jax.jit(jax.value_and_grad(loss)).lower(ckpt.abstract_like(trainable),
                                                          b_train)
            grad_c, out["grad_compile_s"] = _timed(lambda: low.compile(opts["train"]))
            out["grad_loop_kernels"] = loop_kernels(grad_c)
    out["levels"] = levels
    out["train_loop_kernels"] = loop_kernels(train_c)
    out["eval_loop_kernels"] = loop_kernels(eval_c)
    it = run.data.train_iterator(c, 0, 1)
    batches = [sharding.global_batch(next(it), run.mesh) for _ in range(steps + 1)]
    state, m = train_c(state, frozen, batches[0], hp)   # warm-up
    jax.block_until_ready(m)
    times, losses = [], [float(m["loss"])]
    for b in batches[1:]:
        t = cpu_s()
        state, m = train_c(state, frozen, b, hp)
        jax.block_until_ready(m)
        times.append(cpu_s() - t)
        losses.append(float(m["loss"]))
    out["step_s"] = round(statistics.median(times), 4)
    out["losses"] = [round(x, 5) for x in losses]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smallest shape, 3 steps")
    ap.add_argument("--all", action="store_true", help="all 8 demo shapes")
    ap.add_argument("--breakdown", action="store_true",
                    help="also compile the loss gradient alone (model vs update)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default="fused,reference")
    a = ap.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    shapes = SHAPES if a.all else [SHAPES[0]] if a.quick else [SHAPES[0], SHAPES[-1]]
    steps = 3 if a.quick else a.steps
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"--variants: unknown {v!r}; use {sorted(VARIANTS)}")
    t0 = time.perf_counter()
    res = {"benchmark": "native_compile", "device": jax.devices()[0].device_kind,
           "load_avg_1m": round(os.getloadavg()[0], 2), "shapes": {}}
    for i, (llm, vit) in enumerate(shapes):
        row = {}
        for v in (variants if i % 2 == 0 else variants[::-1]):  # alternate who goes first
            row[v] = measure(llm, vit, v, steps, a.breakdown)
        res["shapes"][f"{llm}/{vit}"] = row
    if len(variants) == 2:
        new, ref = variants
        tot = lambda v, k: sum(r[v][k] for r in res["shapes"].values())  # noqa: E731
        res["train_compile_s"] = {v: round(tot(v, "train_compile_s"), 2) for v in variants}
        res["ratio"] = round(tot(ref, "train_compile_s") / tot(new, "train_compile_s"), 3)
        res["step_ratio"] = round(tot(ref, "step_s") / tot(new, "step_s"), 3)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
