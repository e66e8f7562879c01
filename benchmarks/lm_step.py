"""The trainer's train step of an LM config on random tokens, compiled and timed: shared by
benchmarks/plan.py (fused loss vs naive) and benchmarks/gpu_step.py (MFU, memory vs plan)."""
from __future__ import annotations

import time

import jax
import numpy as np


def peak_bytes(mem) -> int | None:
    """A compiled program's peak bytes from XLA's memory analysis: arguments + outputs -
    aliased (donated) + temporaries; None when the backend gives no analysis."""
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def random_batch(c) -> dict:
    """A batch of `c.train.batch_size` rows of random tokens, every position in the loss."""
    from vlm_jax.models import batch_spec
    spec = batch_spec(c, c.train.batch_size)
    b, t = spec["tokens"].shape
    rng = np.random.default_rng(0)
    v = c.model.llm.vocab_size
    batch = {"tokens": rng.integers(3, v, (b, t)).astype(np.int32),
             "targets": rng.integers(3, v, (b, t)).astype(np.int32),
             "loss_mask": np.ones((b, t), np.float32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32), "valid": np.ones((b,), np.float32)}
    return {k: batch[k] for k in spec if not k.startswith("_")}


def compile_and_time(c, steps: int, compile_options=None, device=None) -> dict:
    """Builds the model and AdamW state of `c` (on `device`, default the first), compiles
    the train step (state donated) and runs one step, then `steps` timed ones. Returns
    compile_s, XLA's memory analysis (`memory`), the first step's loss, the last step's
    metrics, each timed step's seconds and their median (`step_s`)."""
    import flax.linen as nn
    from vlm_jax.models import build_model
    from vlm_jax.train import optim, step as step_lib
    dev = device or jax.devices()[0]
    model = build_model(c.model)
    batch = jax.device_put(random_batch(c), dev)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    tx, sched = optim.make_optimizer(c.optim, int(c.train.steps))
    state = jax.jit(lambda p: step_lib.init_state(p, tx))(params)
    del params
    fn = step_lib.make_train_step(model, tx, sched)
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, {}, batch).compile(compile_options)
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, {}, batch)
    first_loss = float(jax.block_until_ready(m)["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, {}, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "memory": compiled.memory_analysis(),
            "loss": first_loss, "last_metrics": jax.device_get(m), "times_s": times,
            "step_s": float(np.median(times)) if times else 0.0,
            "batch_shape": tuple(batch["tokens"].shape)}
