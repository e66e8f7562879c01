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

Grid-runner API (vlm_jax/grid/runner.py; a stage with `sweep="wsd"`):

    from vlm_jax.grid import sweep
    items = sweep.plan_sweep(stage_runs, root=ROOT, size_axis="n")
    for item in items:           # in dependency order: stable runs first
        launch(item.run, extra_overrides=item.overrides, deps=item.depends_on)

`plan_sweep(runs, root, size_axis="n", configs=None, allow_repeats=False)` takes the runs
of one stage (`expand.Run`s), groups them by every axis except `size_axis`, and returns
one `SweepItem(run, overrides, depends_on, role, branch_step)` per run:
- `overrides`: extra `(config key, value)` pairs, passed as `--config.KEY=VALUE` after the
  run's own: `optim.schedule=wsd` and `optim.warmup_steps=W` for every run;
  `train.checkpoint_steps=(S_1, ..., S_{k-1})` for the stable run;
  `train.branch_from=ROOT/<stable workdir>:S_i` for a branch (the trainer restores that
  checkpoint, params, optimizer state and data iterator, and trains to its own
  `train.steps` with its own schedule).
- `depends_on`: run names that must be done first (the run's own deps, plus the stable
  run for a branch).
- `role`: "stable" | "branch" | "single" (a group with one run).
Every run keeps its own name and workdir, so each branch is its own row of results.csv.
`sweep_cost(items)` gives the steps with and without the sweep.
"""
from __future__ import annotations

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
    run: expand.Run
    overrides: tuple[tuple[str, str], ...]
    depends_on: tuple[str, ...]
    role: str                      # "stable" | "branch" | "single"
    branch_step: int = 0           # branch: the stable run's step it starts from
    steps: int = 0                 # train.steps of this run

    @property
    def cost_steps(self) -> int:
        """Steps this run trains itself (a branch only its decay)."""
        return self.steps - self.branch_step

    def to_json(self) -> dict:
        return {"run": self.run.name, "overrides": dict(self.overrides),
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


def _tuple_literal(values: Sequence[int]) -> str:
    vals = [int(v) for v in values]
    return "(" + ", ".join(map(str, vals)) + ("," if len(vals) == 1 else "") + ")"


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
    runs = list(runs)
    if not runs:
        return []
    configs = dict(configs or {})
    modules: dict[str, Any] = {}
    for r in runs:
        if size_axis not in dict(r.axes):
            raise SweepError(f"sweep stage {r.stage!r}: run {r.name} has no axis "
                             f"{size_axis!r}; a sweep needs the data-size axis (axes: "
                             f"{[k for k, _ in r.axes]})")
        if r.name not in configs:
            module = modules.get(r.config_file) or expand.load_config_module(r.config_file)
            modules[r.config_file] = module
            configs[r.name] = expand.build_config(r.config_file, r.arg, module)
    groups: dict[tuple, list[expand.Run]] = {}
    for r in runs:
        key = tuple((k, v) for k, v in r.axes if k != size_axis)
        groups.setdefault(key, []).append(r)
    items: list[SweepItem] = []
    for key, members in groups.items():
        items.extend(_plan_group(members, configs, root, allow_repeats))
    return items


def _plan_group(members, configs, root, allow_repeats) -> list[SweepItem]:
    info = []
    for r in members:
        c = configs[r.name]
        steps = int(c.train.steps)
        n = _size(c.data.n)
        seen = steps * int(c.train.batch_size)
        if n > 0 and seen > n and not allow_repeats:
            raise SweepError(
                f"sweep: run {r.name} trains {steps} steps x batch {c.train.batch_size} = "
                f"{seen} samples on data.n={n}: it repeats data, so a branch of a longer run "
                "(which sees fresh samples) is not equivalent; use at most one epoch per run "
                "or drop `sweep` from the stage")
        info.append((steps, n, r, c))
    info.sort(key=lambda x: (x[0], x[1]))
    steps_seen = [s for s, _, _, _ in info]
    if len(set(steps_seen)) != len(steps_seen):
        raise SweepError(f"sweep: runs {[x[2].name for x in info]} have train.steps "
                         f"{steps_seen}; a data-size sweep needs distinct step counts")
    ref_flat = _flat(info[-1][3])
    for _, _, r, c in info[:-1]:
        diff = _differences(_flat(c), ref_flat)
        if diff:
            raise SweepError(f"sweep: runs {r.name} and {info[-1][2].name} differ in {diff}; "
                             f"runs of one sweep may differ only in {list(_FREE_KEYS)}")
    optim = info[0][3].optim
    warm = warmup_steps(optim, info[0][0])
    decay_frac = float(optim.decay_frac)
    base = (("optim.schedule", "wsd"), ("optim.warmup_steps", str(warm)))
    if len(info) == 1:
        steps, _, r, _ = info[0]
        return [SweepItem(r, base, tuple(r.deps), "single", 0, steps)]
    starts = [decay_start(s, decay_frac) for s, _, _, _ in info]
    for (steps, _, r, _), s in zip(info, starts):
        if s < warm:
            raise SweepError(f"sweep: run {r.name} ({steps} steps) starts its decay at step "
                             f"{s}, before the shared warmup of {warm} steps ends; lower "
                             "optim.warmup_steps/warmup_frac or optim.decay_frac")
    stable_steps, _, stable, _ = info[-1]
    branch_points = tuple(sorted(set(starts[:-1])))
    out = [SweepItem(stable, base + (("train.checkpoint_steps", _tuple_literal(branch_points)),),
                     tuple(stable.deps), "stable", 0, stable_steps)]
    stable_dir = os.path.join(root, stable.workdir) if root else stable.workdir
    for (steps, _, r, _), s in zip(info[:-1], starts[:-1]):
        deps = tuple(dict.fromkeys(tuple(r.deps) + (stable.name,)))
        out.append(SweepItem(r, base + (("train.branch_from", f"{stable_dir}:{s}"),), deps,
                             "branch", s, steps))
    return out


def sweep_cost(items: Sequence[SweepItem]) -> dict:
    """Training steps with the sweep vs separate runs, and their ratio."""
    separate = sum(i.steps for i in items)
    swept = sum(i.cost_steps for i in items)
    return {"steps_separate": separate, "steps_sweep": swept,
            "ratio": swept / separate if separate else 1.0}
