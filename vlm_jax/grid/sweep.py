"""One-run data-size sweeps with a warmup-stable-decay (WSD) schedule.

A sweep over data sizes D1 < ... < Dk (runs that differ only in `data.n` and hence in
`train.steps`) normally trains k models from scratch. With WSD the learning rate is
constant between warmup and the final decay, so the run of size Di and the run of size
Dk are the same computation up to the step where Di's decay starts. The sweep therefore
runs the largest run once (the *stable* run, with its own full schedule, which gives the
Dk row), saves a checkpoint at each smaller run's decay start S_i, and runs each smaller
run as a short *branch*: restore the stable run's state at S_i, then do only its decay
(S_i -> T_i). Cost: T_k + sum(T_i - S_i) steps instead of sum(T_i).

Equivalence: all runs of a sweep share one warmup length (`optim.warmup_steps` = the
warmup of the smallest run) and a branch continues the stable run's data stream, so
before its decay a branch has seen T_i x batch samples drawn from the largest subset
instead of the first ones of its own subset. With one epoch or less per run (the regime
of the papers' data-size sweeps: every sample seen at most once) that is the same
distribution of training data; `plan_sweep` refuses sweeps whose runs repeat data unless
`allow_repeats=True`.

Grid-runner API (a stage with `sweep="wsd"`; vlm_jax/grid/worker.py calls it):

    sweep.run_sweep([(config, workdir), ...], axis="n")   # one sweep job, in-process

trains the runs of one sweep job (configs built, `needs` applied) in order: the stable
run, then each branch; runs already done are skipped, partly trained ones resume. In one
process the branches start from the stable run's branch points kept in memory and adopt
its setup (`vlm_jax.train.trainer.SweepMemory`: the same values as restoring the
checkpoints, which are written all the same for a resume in another process).
`plan_sweep(runs, root, size_axis="n")` plans a whole stage from `expand.Run`s (for dry
runs and launchers that start one process per run); `plan_group(members)` plans one job.
Each returns one `SweepItem` per run (stable first) with:
- `overrides`: (config key, value) pairs on top of the run's config, applied in-process by
  `item.apply(config)` or passed as `item.cli_overrides()` (`--config.KEY=VALUE`):
  `optim.schedule=wsd` and `optim.warmup_steps=W` for every run;
  `train.checkpoint_steps=(S_1, ..., S_{k-1})` for the stable run (kept, never
  garbage-collected); `train.branch_from=<stable workdir>:S_i` for a branch (the trainer
  restores that checkpoint: params, optimizer state, data iterator; then trains to its own
  `train.steps` with its own schedule; its own `data.n` stays, so its decay reads its
  own subset and its result row has its own data size).
- `depends_on`: run names that must be done first (the run's own deps, plus the stable
  run for a branch); `role`: "stable" | "branch" | "single".
Every run keeps its own name and workdir, so each branch is its own row of results.csv.
`sweep_cost(items)` gives the training steps with and without the sweep.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Mapping, Sequence

from vlm_jax.grid import expand

SWEEP_KINDS = ("wsd",)
# Config keys allowed to differ between the runs of one sweep group.
_FREE_KEYS = ("name", "data.n", "train.steps", "optim.warmup_steps")


class SweepError(expand.GridError):
    """A sweep that cannot be run as one stable run + branches (message says why)."""


@dataclasses.dataclass(frozen=True)
class SweepItem:
    """One run of a sweep and what the sweep changes about it."""
    name: str                      # run name (or workdir for `run_sweep` entries)
    workdir: str
    overrides: tuple[tuple[str, Any], ...]   # (config key, typed value)
    depends_on: tuple[str, ...]
    role: str                      # "stable" | "branch" | "single"
    branch_step: int = 0           # branch: the stable run's step it starts from
    steps: int = 0                 # train.steps of this run
    run: expand.Run | None = None

    @property
    def cost_steps(self) -> int:
        """Steps this run trains itself (a branch only its decay)."""
        return self.steps - self.branch_step

    def cli_overrides(self) -> list[str]:
        """`--config.KEY=VALUE` arguments (tuples as Python literals)."""
        return [f"--config.{k}={_cli_value(v)}" for k, v in self.overrides]

    def apply(self, config):
        """A copy of `config` with this item's overrides set."""
        config = copy.deepcopy(config)
        for key, value in self.overrides:
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise SweepError(f"sweep: the run config of {self.name} has no field {key}; "
                                 "the trainer that supports WSD sweeps defines it")
            node[leaf] = value
        return config

    def to_json(self) -> dict:
        return {"name": self.name, "workdir": self.workdir,
                "overrides": {k: _cli_value(v) for k, v in self.overrides},
                "depends_on": list(self.depends_on), "role": self.role,
                "branch_step": self.branch_step, "steps": self.steps}


# ----------------------------------------------------------------------------- schedule
def warmup_steps(optim_cfg, total_steps: int) -> int:
    """The warmup length `vlm_jax.train.optim.make_schedule` uses (kept equal by a test)."""
    if optim_cfg.get("warmup_steps"):
        return int(optim_cfg.warmup_steps)
    return int(round(float(optim_cfg.warmup_frac) * total_steps))


def decay_start(total_steps: int, decay_frac: float) -> int:
    """First step of the WSD decay of a run of `total_steps` (as make_schedule)."""
    total = max(int(total_steps), 1)
    decay = max(int(round(float(decay_frac) * total)), 1)
    return total - decay


def _size(value) -> int:
    """data.n as an int (-1 = everything): 1000, "1000", "1M" (see data.subsets)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        from vlm_jax.data.subsets import parse_size  # only for suffixed sizes
        return parse_size(value)


def _cli_value(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def _flat(cfg) -> dict[str, Any]:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node
    walk("", d)
    return out


def _differences(a: dict, b: dict) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(_FREE_KEYS))
    return [k for k in keys if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- planning
def plan_sweep(runs: Sequence[expand.Run], root: str = "", size_axis: str = "n",
               configs: Mapping[str, Any] | None = None, kind: str = "wsd",
               allow_repeats: bool = False) -> list[SweepItem]:
    """Turns one stage's runs into stable runs + branched decays (see module docstring).

    Args:
      runs: the stage's runs (any order); every run must have the axis `size_axis`.
      root: the grid root; `train.branch_from` paths are `root/<stable workdir>`.
      size_axis: the axis that sets the data size (its runs must differ only in
        `data.n` and `train.steps`).
      configs: run name -> built run config (built with `expand.build_config` if absent).
      kind: the stage's `sweep` value; only "wsd".
      allow_repeats: allow runs that see their data more than once (not equivalent).
    Returns:
      one SweepItem per run, stable runs before their branches.
    """
    if kind not in SWEEP_KINDS:
        raise SweepError(f"stage sweep={kind!r}: supported sweeps are {list(SWEEP_KINDS)}")
    for r in runs:
        if size_axis not in dict(r.axes):
            raise SweepError(f"sweep stage {r.stage!r}: run {r.name} has no axis "
                             f"{size_axis!r}; a sweep needs the data-size axis (axes: "
                             f"{[k for k, _ in r.axes]})")
    configs = dict(configs or {})
    configs.update(expand.build_run_configs([r for r in runs if r.name not in configs]))
    groups: dict[tuple, list] = {}
    for r in runs:
        key = tuple((k, v) for k, v in r.axes if k != size_axis)
        wd = os.path.join(root, r.workdir) if root else r.workdir
        groups.setdefault(key, []).append((r.name, configs[r.name], wd, tuple(r.deps), r))
    items: list[SweepItem] = []
    for members in groups.values():
        items.extend(plan_group(members, allow_repeats=allow_repeats))
    return items


def plan_group(members: Sequence[tuple], allow_repeats: bool = False) -> list[SweepItem]:
    """Plans one sweep: `members` are (name, config, workdir[, deps[, run]]) of runs that
    differ only in data size. Returns the stable run's item first, then the branches."""
    info = []
    for m in members:
        name, c, wd = m[:3]
        deps = tuple(m[3]) if len(m) > 3 else ()
        run = m[4] if len(m) > 4 else None
        steps = int(c.train.steps)
        n = _size(c.data.n)
        seen = steps * int(c.train.batch_size)
        if n > 0 and seen > n and not allow_repeats:
            raise SweepError(
                f"sweep: run {name} trains {steps} steps x batch {c.train.batch_size} = "
                f"{seen} samples on data.n={n}: it repeats data, so a branch of a longer run "
                "(which sees fresh samples) is not equivalent; use at most one epoch per run "
                "or drop `sweep` from the stage")
        info.append((steps, n, name, c, wd, deps, run))
    if not info:
        return []
    info.sort(key=lambda x: (x[0], x[1]))
    steps_seen = [x[0] for x in info]
    if len(set(steps_seen)) != len(steps_seen):
        raise SweepError(f"sweep: runs {[x[2] for x in info]} have train.steps "
                         f"{steps_seen}; a data-size sweep needs distinct step counts")
    ref_flat = _flat(info[-1][3])
    for x in info[:-1]:
        diff = _differences(_flat(x[3]), ref_flat)
        if diff:
            raise SweepError(f"sweep: runs {x[2]} and {info[-1][2]} differ in {diff}; "
                             f"runs of one sweep may differ only in {list(_FREE_KEYS)}")
    optim = info[0][3].optim
    warm = warmup_steps(optim, info[0][0])
    decay_frac = float(optim.decay_frac)
    base = (("optim.schedule", "wsd"), ("optim.warmup_steps", warm))
    if len(info) == 1:
        steps, _, name, _, wd, deps, run = info[0]
        return [SweepItem(name, wd, base, deps, "single", 0, steps, run)]
    starts = [decay_start(x[0], decay_frac) for x in info]
    for x, s in zip(info, starts):
        if s < warm:
            raise SweepError(f"sweep: run {x[2]} ({x[0]} steps) starts its decay at step "
                             f"{s}, before the shared warmup of {warm} steps ends; lower "
                             "optim.warmup_steps/warmup_frac or optim.decay_frac")
    st_steps, _, st_name, _, st_wd, st_deps, st_run = info[-1]
    points = tuple(sorted(set(starts[:-1])))
    out = [SweepItem(st_name, st_wd, base + (("train.checkpoint_steps", points),), st_deps,
                     "stable", 0, st_steps, st_run)]
    for (steps, _, name, _, wd, deps, run), s in zip(info[:-1], starts[:-1]):
        deps = tuple(dict.fromkeys(deps + (st_name,)))
        out.append(SweepItem(name, wd, base + (("train.branch_from", f"{st_wd}:{s}"),), deps,
                             "branch", s, steps, run))
    return out


def sweep_cost(items: Sequence[SweepItem]) -> dict:
    """Training steps with the sweep vs separate runs, and their ratio."""
    separate = sum(i.steps for i in items)
    swept = sum(i.cost_steps for i in items)
    return {"steps_separate": separate, "steps_sweep": swept,
            "ratio": swept / separate if separate else 1.0}


# ----------------------------------------------------------------------------- running
def _finished(workdir: str) -> dict | None:
    """The run's result.json when it says status "done", else None."""
    from vlm_jax.grid.registry import read_json
    result = read_json(os.path.join(workdir, "result.json"))
    return result if isinstance(result, dict) and result.get("status") == "done" else None


def run_sweep(entries: Sequence[tuple[Any, str]], axis: str = "n", run_fn=None,
              allow_repeats: bool = False, in_memory: bool | None = None) -> list[dict]:
    """Trains one sweep in this process (the grid worker's entry point).

    entries: (run config, workdir) of the runs of one sweep job (configs built, `needs`
    applied); they must differ only in data size (`axis` names it in messages).
    run_fn(config, workdir[, sweep=]) -> result dict trains one run (default
    `vlm_jax.main.run`).
    in_memory: hand the stable run's branch points and setup to the branches in memory
    (`vlm_jax.train.trainer.SweepMemory`, passed to run_fn as `sweep=`; the branch-point
    checkpoints are written all the same). None: on for the default run_fn, off for one
    passed in (True passes `sweep=` to it too).
    Runs already done (result.json status "done") are skipped; a partly trained run
    resumes from its own checkpoint. A run preempted by SIGTERM (status "preempted",
    checkpoint saved) ends the sweep: the runs after it are not started. Returns the
    result dicts in plan order (up to a preempted run).
    """
    if in_memory is None:
        in_memory = run_fn is None
    if run_fn is None:
        from vlm_jax import main
        run_fn = main.run
    members = [(os.path.abspath(wd), c, os.path.abspath(wd)) for c, wd in entries]
    try:
        items = plan_group(members, allow_repeats=allow_repeats)
    except SweepError as e:
        raise SweepError(f"{e} (sweep over axis {axis!r})") from None
    configs = {wd: c for _, c, wd in members}
    kw = {}
    if in_memory:
        from vlm_jax.train.trainer import SweepMemory
        kw["sweep"] = SweepMemory()
    results = []
    try:
        for item in items:
            done = _finished(item.workdir)
            if done is not None:
                results.append(done)
                continue
            results.append(run_fn(item.apply(configs[item.name]), item.workdir, **kw))
            if results[-1].get("status") == "preempted":
                break
    finally:
        if kw:
            kw["sweep"].clear()
    return results
