"""NaViL benchmark: packed vs padded batches, efficient vs masked expert routing, init.

    PYTHONPATH=. python benchmarks/native.py [--quick] [--repeats 5]

Prints one JSON object:
- `packing`: train-step (forward + backward) throughput of the native VLM on the same
  mixed-resolution synthetic examples, packed into long rows (first fit) vs padded one
  example per row to the longest possible example (the padded baseline's rows are as short
  as the token budget allows). `useful_tokens_per_s` counts real (non-padding) LLM tokens;
  `ratio` = packed / padded (target >= 1.5).
- `experts`: train step of a decoder LLM with modality experts at a 50/50 visual/text token
  mix, `expert_impl` "chunked" (each token through one expert) vs "masked" (both experts on
  every token, the reference); `ratio` = masked time / chunked time (target >= 1.6).
- `init`: the init program of native demo shapes (configs/native.py `demo`: the smallest
  and the largest of its 2 LLMs x 4 encoders; `--quick` the smallest), compiled as the
  trainer compiles it (XLA level 0): `NativeVLM.init`'s one random draw vs flax's
  per-parameter init (the reference, `nn.Module.init`): XLA kernels and CPU seconds to
  trace + compile (CPU time, not wall: fair on a shared machine); `ratio` = reference /
  ours.
All measured in this run, on this machine; step timings are medians over interleaved
repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from configs import native as cn
from vlm_jax.data import native as dn
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.models.llm import LLM
from vlm_jax.models.native import NativeVLM, init_params


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-arg fn, run in alternation (fair under shared load)."""
    for f in fns.values():
        f()  # compile + warm up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_packing(repeats: int, n_examples: int) -> dict:
    c = cn.get_config("demo_run,llm=t128,vit=e128")
    c.model.llm.expert_impl = "chunked:128"
    c.model.llm.scan_layers = True
    c.model.vision.scan_layers = True
    tok = load_tokenizer("synthetic")
    budget, longest_caption = 64, 48
    # Padded baseline: one example per row, rows just long enough for the largest example.
    c.data.seq_len = budget + longest_caption
    c.data.native.max_image_tokens = budget
    c.data.native.max_patches = 4 * (budget - 3)
    pad_spec = dataclasses.replace(dn.spec_from_config(c, tok), packing=False)
    # Packed: rows twice as long, half as many (the same token slots per batch).
    pack_spec = dataclasses.replace(pad_spec, seq_len=2 * pad_spec.seq_len,
                                    max_patches=2 * pad_spec.max_patches, packing=True)
    rows = {"packed": 4, "padded": 8}
    exs = list(dn.synthetic_examples(pad_spec, tok.encode, n_examples, seed=11,
                                     sizes=(32, 64, 96, 128, 192, 256),
                                     aspect_ratios=(0.25, 0.5, 1.0, 2.0, 4.0)))
    useful = sum(len(e["tokens"]) for e in exs)
    patches = sum(len(e["patches"]) for e in exs)
    model = NativeVLM(c.model)
    out = {}
    fns = {}
    for name, spec in (("packed", pack_spec), ("padded", pad_spec)):
        batches = [jax.device_put(b) for b in dn.pack(exs, spec, rows[name])]
        params = init_params(model, jax.random.PRNGKey(0), batches[0])

        def loss(p, b):
            o = model.apply({"params": p}, b)
            return o["loss_sum"] / jnp.maximum(o["num_tokens"], 1.0)

        step = jax.jit(jax.grad(loss))

        def run(step=step, params=params, batches=batches):
            for b in batches:
                g = step(params, b)
            return jax.block_until_ready(g)
        fns[name] = run
        slots = len(batches) * rows[name]
        out[name] = {"batches": len(batches), "rows": rows[name], "seq_len": spec.seq_len,
                     "max_patches": spec.max_patches,
                     "token_fill": round(useful / (slots * spec.seq_len), 3),
                     "patch_fill": round(patches / (slots * spec.max_patches), 3)}
    secs = _interleaved(fns, repeats)
    for name in fns:
        out[name]["seconds"] = round(secs[name], 4)
        out[name]["useful_tokens_per_s"] = round(useful / secs[name], 1)
    out["examples"] = n_examples
    out["useful_tokens"] = useful
    out["ratio"] = round(out["packed"]["useful_tokens_per_s"]
                         / out["padded"]["useful_tokens_per_s"], 3)
    out["target"] = 1.5
    return out


def bench_experts(repeats: int, width: int, length: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 1000, (batch, length)), jnp.int32)
    # 50/50 mix in image-like runs of tokens (as in real sequences).
    vm = np.zeros((batch, length), bool)
    for b in range(batch):
        for s in range(0, length, 64):
            vm[b, s:s + 32] = True
    vm = jnp.asarray(np.roll(vm, 7, axis=1))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    seg = jnp.ones((batch, length), jnp.int32)
    fns, info = {}, {}
    params = None
    for impl in ("chunked:256", "masked"):
        cfg = common.llm_config()
        cfg.update(dict(vocab_size=1000, width=width, depth=2, heads=width // 64,
                        kv_heads=width // 64, mlp_dim=3 * width, experts=True,
                        expert_impl=impl, scan_layers=True))
        llm = LLM(cfg)
        if params is None:
            params = nn.unbox(llm.init(jax.random.PRNGKey(0), ids, pos, seg,
                                       visual_mask=vm)["params"])
            info["mlp_dim"] = cfg.mlp_dim

        def loss(p, llm=llm):
            y = llm.apply({"params": p}, ids, pos, seg, visual_mask=vm)
            return jnp.mean(jax.nn.logsumexp(y.astype(jnp.float32), -1))
        step = jax.jit(jax.grad(loss))
        fns[impl.split(":")[0]] = (lambda step=step: jax.block_until_ready(step(params)))
    secs = _interleaved(fns, repeats)
    return {"width": width, "length": length, "batch": batch, "depth": 2,
            "mlp_dim": info["mlp_dim"], "visual_fraction": float(vm.mean()),
            "chunked_s": round(secs["chunked"], 4), "masked_s": round(secs["masked"], 4),
            "ratio": round(secs["masked"] / secs["chunked"], 3), "target": 1.6}


# The smallest and the largest native demo shape (all 8: `bench_init(DEMO_SHAPES)`).
DEMO_SHAPES = [(llm, vit) for llm in cn.TOY_LLMS for vit in cn.TOY_ENCODERS]
INIT_SHAPES = [DEMO_SHAPES[0], DEMO_SHAPES[-1]]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_init(shapes) -> dict:
    """Trace + compile CPU seconds and XLA kernels of the init programs of `shapes`."""
    from vlm_jax.models import batch_spec
    from vlm_jax.train.trainer import FAST_COMPILE
    rng = jax.random.PRNGKey(0)
    out = {"shapes": len(shapes)}
    acc = {name: {"compile_cpu_s": 0.0, "kernels": 0} for name in ("one_draw", "flax")}
    for i, (llm, vit) in enumerate(shapes):
        c = cn.get_config(f"demo_run,llm={llm},vit={vit}")
        model = NativeVLM(c.model)
        batch = {k: jnp.zeros(x.shape, x.dtype)
                 for k, x in batch_spec(c, c.train.batch_size).items()}
        inits = {"one_draw": model.init,
                 "flax": lambda r, b, model=model: nn.Module.init(model, r, b)}
        for name in sorted(inits, reverse=bool(i % 2)):  # alternate which goes first
            t = _cpu_s()
            compiled = jax.jit(lambda r, f=inits[name]: nn.unbox(f(r, batch)["params"])).lower(
                rng).compile(FAST_COMPILE)
            acc[name]["compile_cpu_s"] += _cpu_s() - t
            acc[name]["kernels"] += len(re.findall(r"^\s*(ROOT )?\S+ = \S+ fusion\(",
                                                   compiled.as_text(), re.M))
    for name, v in acc.items():
        out[name] = {"compile_cpu_s": round(v["compile_cpu_s"], 2), "kernels": v["kernels"]}
    out["ratio"] = round(out["flax"]["compile_cpu_s"] / out["one_draw"]["compile_cpu_s"], 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.examples, a.width, a.length, a.batch = 1, 24, 128, 256, 2
    t0 = time.perf_counter()
    res = {"benchmark": "native", "device": jax.devices()[0].device_kind,
           "packing": bench_packing(a.repeats, a.examples),
           "experts": bench_experts(a.repeats, a.width, a.length, a.batch),
           "init": bench_init(INIT_SHAPES[:1] if a.quick else INIT_SHAPES)}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
