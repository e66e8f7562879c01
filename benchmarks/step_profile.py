"""Where the train step's time goes: a per-part breakdown of `benchmarks/step.py`'s steps.

    python benchmarks/step_profile.py [--config llava] [--modes pixels,features] [--steps 3]
    python benchmarks/step_profile.py --quick      # the demo config, features only, 2 steps

Builds our step exactly as `benchmarks/step.py` does (the trainer's compiled program),
runs `--steps` steps under `jax.profiler.trace` and reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed). XLA CPU runs independent kernels
concurrently on its threads, so a kernel's own duration over-counts: each instant of the
trace is split evenly among the kernels running then ("attributed wall ms"), so the parts
add up to the time the step kept the threads busy.

Each kernel is put in a part by its HLO `op_name` (vision tower, projector, LLM attention
projections, attention core, MLP, norms, loss, ...) and is a matmul kernel (a YNNPACK
fusion or a dot) or not. Its FLOPs come from the dot shapes of the compiled HLO. The
matmul floor of a part is its FLOPs at the rate of one big matmul in the step's precision
(`--dtype`: fp32, or bf16 operands with an fp32 result) measured in the same run
(`matmul_gflops_per_s`): what the part would take if all its FLOPs ran at the
machine's best matmul speed and nothing else cost time. `ratio` = step seconds / floor
seconds of the whole step (>= 1; the headroom left for exact optimisations).

On a loaded machine every number inflates alike; the shares stay meaningful.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as bench_step  # noqa: E402  (sets the XLA-level env before jax is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# (regex on op_name, part); the first match wins
PARTS = (("vision", "vit"), ("projector", "projector"), (r"llm\.loss|unembed", "loss"),
         ("attn_norm|mlp_norm|final_norm", "norms"), (r"attn/(q|k|v|o)/", "attn_proj"),
         ("attn/", "attn_core"), ("mlp/", "mlp"), ("splice|embed|take_along_axis", "embed_splice"),
         ("adam|optim|scale_by|apply_updates|clip", "optimizer"))
SKIP_EVENTS = ("ThunkExecutor", "Slinky", "Threadpool", "end: ")


def part_of(op_name: str) -> str:
    for pat, name in PARTS:
        if re.search(pat, op_name):
            return name
    return "other"


def hlo_kernels(hlo: str) -> dict:
    """Kernel name -> (op_name, GFLOP of the dots it runs) from a compiled module's text."""
    shape, calls, meta, comp = {}, {}, {}, {}
    dots = collections.defaultdict(list)  # computation -> [(dot name, lhs, lhs contracting)]
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
        if not m:
            continue
        name = m.group(1)
        shape[name] = [int(x) for x in m.group(2).split(",") if x]
        comp[name] = cur
        c = re.search(r" fusion\(.*calls=%([\w.\-]+)", line)
        if c:
            calls[name] = c.group(1)
        o = re.search(r'op_name="([^"]+)"', line)
        if o:
            meta[name] = o.group(1)
        d = re.search(r" dot\(%([\w.\-]+), %[\w.\-]+\).*lhs_contracting_dims=\{([\d,]*)\}", line)
        if d:
            dots[cur].append((name, d.group(1), d.group(2)))

    def gflop(dot):
        name, lhs, lc = dot
        k = math.prod(shape[lhs][int(i)] for i in lc.split(",") if i)
        return 2.0 * math.prod(shape[name]) * k / 1e9
    top = {d[0]: d for ds in dots.values() for d in ds}
    fused = set(calls.values())  # the bodies of fusions: their ops are no kernels of their own
    out = {}
    for name, op in meta.items():
        if comp.get(name) in fused:
            continue
        if name in top:
            out[name] = (op, gflop(top[name]))
        elif calls.get(name) in dots:
            out[name] = (op, sum(gflop(d) for d in dots[calls[name]]))
        else:
            out[name] = (op, 0.0)
    return out


def attributed_ms(events, n_steps: int) -> dict:
    """Kernel name -> wall ms per step, each instant split among the kernels running then."""
    pts = []
    for i, (_, s, d) in enumerate(events):
        pts += [(s, 1, i), (s + d, -1, i)]
    pts.sort()
    active, last, out = set(), None, collections.Counter()
    for t, kind, i in pts:
        if last is not None and active:
            for j in active:
                out[events[j][0]] += (t - last) / len(active)
        last = t
        (active.add if kind == 1 else active.discard)(i)
    return {k: v / n_steps / 1e6 for k, v in out.items()}


def trace_events(fn, n_steps: int):
    d = tempfile.mkdtemp(prefix="step_profile_")
    try:
        with jax.profiler.trace(d):
            for _ in range(n_steps):
                fn()
        pd = jax.profiler.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb",
                                                          recursive=True)[0])
        return [(ev.name, ev.start_ns, ev.duration_ns) for plane in pd.planes
                for line in plane.lines if "XLAEigen" in line.name or "PjRtCpuClient" in line.name
                for ev in line.events
                if not ev.name.startswith(SKIP_EVENTS)]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def matmul_rate(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """GFLOP/s of one big jitted matmul (the machine's best matmul speed), best of reps:
    fp32, or bf16 operands with an fp32 result (what the bf16 step's dots are on CPU)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))
    return 2.0 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def breakdown(c, mode: str, n_steps: int, rate: float) -> dict:
    step_fn, info, hlo = bench_step.ours(c, mode == "features", with_hlo=True)
    step_fn()
    step_s = float(np.median([_timed(step_fn) for _ in range(n_steps)]))
    kernels = hlo_kernels(hlo)
    ms = attributed_ms(trace_events(step_fn, n_steps), n_steps)
    parts = collections.defaultdict(lambda: dict(matmul_ms=0.0, other_ms=0.0, gflop=0.0,
                                                 kernels=0))
    for name, t in ms.items():
        op, gf = kernels.get(name, ("?", 0.0))
        p = parts[part_of(op)]
        p["matmul_ms" if gf > 0 else "other_ms"] += t
        p["gflop"] += gf  # each kernel runs once per step
        p["kernels"] += 1
    for p in parts.values():
        p["ms"] = p["matmul_ms"] + p["other_ms"]
        p["floor_ms"] = p["gflop"] / rate * 1e3
    total_gf = sum(p["gflop"] for p in parts.values())
    busy = sum(p["ms"] for p in parts.values())
    rnd = lambda d: {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}
    return dict(step_s=step_s, gflop_xla=info["gflops"], gflop_dots=total_gf,
                floor_s=total_gf / rate, ratio=step_s / (total_gf / rate),
                busy_ms=busy, non_matmul_share=sum(p["other_ms"] for p in parts.values()) / busy,
                parts={k: rnd(v) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]["ms"])})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llava", choices=("llava", "demo"))
    ap.add_argument("--modes", default="pixels,features")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (and timed ones)")
    ap.add_argument("--quick", action="store_true", help="demo config, features, 2 steps")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute and frozen-weight dtype (see benchmarks/step.py)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc settings (see benchmarks/step.py)")
    args = ap.parse_args()
    if not args.system_malloc:
        bench_step.malloc.reexec(sys.argv)
    if args.quick:
        args.config, args.modes, args.steps = "demo", "features", 2
    make = bench_step.llava_config if args.config == "llava" else bench_step.demo_config
    c = make(args.dtype)
    out = {"benchmark": "step_profile", "config": args.config, "steps": args.steps,
           "dtype": args.dtype,
           "loadavg_start": os.getloadavg(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    rate = matmul_rate(dtype=args.dtype)
    out["matmul_gflops_per_s"] = rate
    for mode in args.modes.split(","):
        out[mode] = breakdown(c, mode, args.steps, rate)
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
