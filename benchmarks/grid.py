"""End-to-end grid benchmark: wall time of a grid and the runner's overhead; prints JSON.

    python benchmarks/grid.py                                    # the demo grid: cold cache,
                                                                 # then warm (second root)
    python benchmarks/grid.py --config configs/demo.py:tiny --parallel 2
    python benchmarks/grid.py --compare --select vit=S,M         # feature cache + WSD sweep
                                                                 # vs neither (issue 9)

Overhead: the runner executes jobs in `parallel` slots; the time the slots spend in
train steps is the sum over runs of metrics.jsonl `perf/step_time_s` x the steps it
covers. overhead = 1 - train-step time / (wall time x parallel): everything that is not a
train step (process start, imports, init, compile, init_from, eval, checkpoints, data
start-up, idle slots waiting on dependencies). Target <= 25% with a shared compilation
cache. Per job: ROOT/timings.jsonl (written by the runner) vs the runs' step time.
Outside jobs: `slot_s_outside_jobs` splits wall x parallel - job seconds into `start`
(launch until each slot's first job), `gaps` (between a slot's jobs: dependency waits)
and `tail` (after a slot's last job: the analysis left at the end), and `analysis_s`
gives each analysis entry's seconds (ROOT/runner_events.jsonl).

Two measurements, both reported against the target: `cold_cache` (a fresh root and a
fresh, empty compilation cache: every program is compiled) and `warm_cache` (a second grid
in another fresh root sharing the cache the first one filled: what a re-run, an extended
grid or a second study on the same machine costs). Per stage they list the job seconds,
the runs' phase seconds (result.json "timings": init, compile, data, eval, checkpoint,
...) and the XLA compile seconds and persistent-cache hits/misses the workers counted.

The grids run on a snapshot of the checkout's code (vlm_jax/, configs/ copied at the
start; `--rev HEAD` takes a commit instead, `--no-snapshot` runs the checkout itself): in
a checkout others edit, a change between the cold and the warm grid would change programs
and turn cache hits into misses.

`--compare` runs the grid twice in fresh roots, each with its own fresh cache, `CONFIG`
as given and with `sweep=0,feature_cache=0` appended to its arg; target:
wall(fast) <= 0.35 x wall(slow). Then (unless `--no-warm`) each variant once more in a
fresh root sharing the cache its first grid filled (`warm`: the ratios without the
compiles both pay). `eval_loss_sweep_vs_separate`: per run of the swept stage, the
sweep's eval loss vs the separate run's (own cosine schedule), relative difference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vlm_jax.grid import registry  # noqa: E402


def start_step(workdir: str) -> int:
    """The step a run started from: 0, or S of a WSD branch (`train.branch_from` WD:S)."""
    cfg = registry.read_json(os.path.join(workdir, "config.json")) or {}
    branch = str((cfg.get("train") or {}).get("branch_from") or "")
    step = branch.rpartition(":")[2]
    return int(step) if step.isdigit() else 0


def step_seconds(workdir: str) -> tuple[float, int]:
    """(train-step seconds, steps executed) of a run from its metrics.jsonl (a WSD branch
    only executes the steps after its branch point)."""
    total = 0.0
    first = prev = start_step(workdir)
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [json.loads(x) for x in f if x.strip()]
    except (OSError, ValueError):
        return 0.0, 0
    for m in lines:
        if "perf/step_time_s" in m and "step" in m and int(m["step"]) > prev:
            total += float(m["perf/step_time_s"]) * (int(m["step"]) - prev)
            prev = int(m["step"])
    return total, prev - first


def _add(acc: dict, key: str, items) -> None:
    d = acc.setdefault(key, {})
    for k, v in items:
        d[k] = round(d.get(k, 0.0) + float(v), 3)


def snapshot(dst: str, rev: str = "") -> str:
    """Copies the code a grid runs (vlm_jax/, configs/) to `dst`: the working tree, or
    the commit `rev` (`git archive`: without others' uncommitted edits); returns `dst`."""
    if rev:
        os.makedirs(dst, exist_ok=True)
        tar = subprocess.run(["git", "-C", REPO, "archive", rev, "vlm_jax", "configs"],
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=tar, check=True)
        return dst
    for d in ("vlm_jax", "configs"):
        shutil.copytree(os.path.join(REPO, d), os.path.join(dst, d),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def measure(config: str, root: str, parallel: int, select: list[str], extra: list[str],
            cache_dir: str, code: str = REPO) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([code] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, "-m", "vlm_jax.grid", "run", config, "--root", root,
           "--parallel", str(parallel), *[a for s in select for a in ("--select", s)], *extra]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    t_end = time.time()
    wall = t_end - t0
    grid = registry.load_recorded_grid(root)
    runs, step_s, trainer_s = [], 0.0, 0.0
    phases: dict[str, dict] = {}     # stage -> phase -> seconds (result.json "timings")
    levels: dict[str, dict] = {}     # program -> compile level -> runs (result.json)
    for r in grid.runs:
        st, _ = registry.run_state(root, r)
        s, n = step_seconds(os.path.join(root, r.workdir))
        res = registry.read_result(root, r) or {}
        step_s += s
        trainer_s += float(res.get("wall_time_s") or 0.0)
        _add(phases, r.stage, (res.get("timings") or {}).items())
        for prog, lv in (res.get("compile_levels") or {}).items():
            levels.setdefault(prog, {})[lv] = levels.get(prog, {}).get(lv, 0) + 1
        ev = res.get("final/eval_loss")
        runs.append({"run": r.name, "stage": r.stage, "status": st, "steps": n,
                     "step_s": round(s, 3), "trainer_wall_s": res.get("wall_time_s"),
                     "eval_loss": ev})
    timings = registry.read_timings(root)
    job_s = sum(t["seconds"] for t in timings)
    stage_of = {r.name: r.stage for r in grid.runs}
    per_stage: dict[str, float] = {}
    xla: dict[str, dict] = {}        # stage -> XLA compile s, persistent-cache hits/misses
    for t in timings:
        st = stage_of.get(t["runs"][0], "?")
        per_stage[st] = round(per_stage.get(st, 0.0) + t["seconds"], 2)
        _add(xla, st, ((k, t.get(k, 0)) for k in (
            "xla_compile_s", "persistent_load_s", "persistent_cache_hits",
            "persistent_cache_misses", "programs_reused", "programs_built",
            "programs_loaded", "traces", "trace_s", "lower_s")))
    done = sum(r["status"] == "done" for r in runs)
    total = lambda k: sum(int(t.get(k, 0)) for t in timings)  # noqa: E731
    return {
        "config": config, "select": select, "parallel": parallel, "exit_code": p.returncode,
        "wall_s": round(wall, 2), "runs": len(runs), "runs_done": done,
        "jobs": len(timings), "job_s_sum": round(job_s, 2),
        "mean_job_s": round(job_s / max(1, len(timings)), 2),
        "job_s_by_stage": per_stage,
        "run_phase_s_by_stage": phases,
        "compiles_by_stage": xla,
        "train_step_s_sum": round(step_s, 2), "trainer_wall_s_sum": round(trainer_s, 2),
        "overhead_frac": round(1 - step_s / max(1e-9, wall * parallel), 4),
        "overhead_frac_in_jobs": round(1 - step_s / max(1e-9, job_s), 4),
        # slot-seconds outside jobs (wall x parallel - job seconds), by where they went
        "slot_s_outside_jobs": slot_timeline(timings, t0, t_end, parallel),
        "analysis_s": _analysis_seconds(registry.read_events(root), t_end),
        "train_steps": sum(r["steps"] for r in runs),
        # compiled programs (init/train/eval) the warm workers reused in memory, loaded
        # from the serialized executables (program_cache), or built (traced, lowered and
        # compiled or loaded from the persistent cache); jax traces of any function
        "programs_reused_in_memory": total("programs_reused"),
        "programs_loaded": total("programs_loaded"), "programs_built": total("programs_built"),
        "traces": total("traces"),
        "compile_levels": levels,
        "log_tail": p.stdout.strip().splitlines()[-3:],
        "per_run": runs,
    }


def _analysis_seconds(events: list[dict], t_end: float) -> dict:
    """Seconds of each analysis entry (runner_events.jsonl) and how many of them came
    after the last job (`after_jobs_s`: both slots idle)."""
    out, open_, jobs_done = {}, {}, None
    for e in events:
        if e["event"] == "jobs_done":
            jobs_done = e["t"]
        name = f"{e.get('cmd')}:{e.get('stage')}"
        if e["event"] == "analysis_start":
            open_[name] = e["t"]
        elif e["event"] == "analysis_end" and name in open_:
            out[name] = round(e["t"] - open_.pop(name), 2)
    if jobs_done is not None:
        out["after_jobs_s"] = round(t_end - jobs_done, 2)
    return out


def slot_timeline(timings: list[dict], t0: float, t_end: float, parallel: int) -> dict:
    """Where the slots' time outside jobs went (slot-seconds): `start` (the runner's
    start until each slot's first job: imports, loading and planning the grid, worker
    start), `gaps` (between a slot's jobs: waits on dependencies, polling), `tail` (after
    each slot's last job until the runner exits: the analysis left at the end, closing).
    Jobs are placed on their `slot` (timings.jsonl), or, in roots from before that field,
    on the first slot free at their start."""
    ends = [t0] * parallel
    first: list[float | None] = [None] * parallel
    gaps = [0.0] * parallel
    for t in sorted(timings, key=lambda x: x["start"]):
        slot = t.get("slot")
        if slot is None or not 0 <= int(slot) < parallel:
            slot = min(range(parallel), key=lambda i: (ends[i] > t["start"] + 1e-3, ends[i]))
        slot = int(slot)
        if first[slot] is None:
            first[slot] = t["start"]
        else:
            gaps[slot] += max(0.0, t["start"] - ends[slot])
        ends[slot] = t["start"] + t["seconds"]
    start = sum((f if f is not None else t_end) - t0 for f in first)
    tail = sum(max(0.0, t_end - e) for e, f in zip(ends, first) if f is not None)
    return {"start": round(start, 2), "gaps": round(sum(gaps), 2), "tail": round(tail, 2),
            "total": round(start + sum(gaps) + tail, 2),
            "first_job_after_s": round(min((f for f in first if f is not None),
                                           default=t_end) - t0, 2),
            "last_job_end_to_exit_s": round(t_end - max(ends), 2)}


def compare(fast: dict, slow: dict) -> dict:
    """Ratios of the feature cache + WSD sweep grid (`fast`) to the one without (`slow`)."""
    ratio = lambda a, b: round(a / max(1e-9, b), 4)  # noqa: E731
    fg, sg = (x["job_s_by_stage"].get("grid", 0.0) for x in (fast, slow))
    return {"wall_ratio_fast_over_slow": ratio(fast["wall_s"], slow["wall_s"]),
            "train_steps_ratio": ratio(fast["train_steps"], max(1, slow["train_steps"])),
            "grid_stage_job_s_ratio": ratio(fg, sg)}


def eval_loss_differences(fast: dict, slow: dict) -> dict:
    """Per run of the swept stage: the sweep's eval loss (a WSD branch, or the stable run)
    vs the separate run's (its own cosine schedule, the recipe's), |relative difference|."""
    theirs = {r["run"]: r["eval_loss"] for r in slow.get("per_run", [])}
    diffs = {r["run"]: abs(r["eval_loss"] / theirs[r["run"]] - 1)
             for r in fast.get("per_run", []) if r["stage"] == "grid"
             and r.get("eval_loss") is not None and theirs.get(r["run"]) is not None}
    if not diffs:
        return {}
    worst = max(diffs, key=diffs.get)
    return {"runs": len(diffs), "mean_rel": round(sum(diffs.values()) / len(diffs), 5),
            "max_rel": round(diffs[worst], 5), "max_run": worst}


def with_arg(config: str, extra: str) -> str:
    path, _, arg = config.partition(":")
    return f"{path}:{arg + ',' if arg else ''}{extra}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--root", default="", help="default: a fresh temporary directory")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--select", action="append", default=[])
    p.add_argument("--compare", action="store_true",
                   help="run with and without sweep=0,feature_cache=0 and report the ratio")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the warm-cache grid (a second root sharing the cache)")
    p.add_argument("--no-analysis", action="store_true")
    p.add_argument("--per-run", action="store_true", help="include per-run rows")
    p.add_argument("--keep", action="store_true", help="keep temporary roots")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run the checkout's code, not a copy taken at the start")
    p.add_argument("--rev", default="",
                   help="run the code of this commit (e.g. HEAD), not the working tree's")
    args = p.parse_args(argv)
    extra = ["--no-analysis"] if args.no_analysis else []
    tmp = tempfile.mkdtemp(prefix="vlm_jax_grid_bench_")
    out = {"benchmark": "grid", "nproc": os.cpu_count(),
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    target = 0.25
    try:
        code = REPO if args.no_snapshot else snapshot(os.path.join(tmp, "code"), args.rev)
        out["code"] = args.rev or ("checkout" if args.no_snapshot else "working tree copy")
        run = lambda cfg, name, cache: measure(  # noqa: E731
            cfg, name if os.path.isabs(name) else os.path.join(tmp, name), args.parallel,
            args.select, extra, os.path.join(tmp, cache), code)
        fast = run(args.config, os.path.abspath(args.root) if args.root else "fast", "xla_fast")
        out["cold_cache"] = fast
        out["overhead_cold_cache"] = fast["overhead_frac"]
        if not args.compare and not args.no_warm:
            warm = run(args.config, "warm", "xla_fast")
            out["warm_cache"] = warm
            out["overhead_warm_cache"] = warm["overhead_frac"]
            out["wall_ratio_warm_over_cold"] = round(warm["wall_s"] / max(1e-9, fast["wall_s"]),
                                                     4)
        out["overhead_target"] = target
        out["overhead_target_met"] = {k: out[f"overhead_{k}"] <= target
                                      for k in ("cold_cache", "warm_cache")
                                      if f"overhead_{k}" in out}
        if args.compare:
            slow_cfg = with_arg(args.config, "sweep=0,feature_cache=0")
            slow = run(slow_cfg, "slow", "xla_slow")
            out["baseline_no_sweep_no_cache"] = slow
            out.update(compare(fast, slow))
            out["eval_loss_sweep_vs_separate"] = eval_loss_differences(fast, slow)
            if not args.no_warm:
                # each variant again in a fresh root, sharing the cache its cold grid filled
                fast_w = run(args.config, "fast_warm", "xla_fast")
                slow_w = run(slow_cfg, "slow_warm", "xla_slow")
                out["warm_cache"] = fast_w
                out["baseline_no_sweep_no_cache_warm"] = slow_w
                out["warm"] = compare(fast_w, slow_w)
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if not args.per_run:
            for k in ("cold_cache", "warm_cache", "baseline_no_sweep_no_cache",
                      "baseline_no_sweep_no_cache_warm"):
                if k in out:
                    out[k].pop("per_run", None)
        print(json.dumps(out, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
