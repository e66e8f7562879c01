"""Grid config -> runs: the grid config format, expansion, stable names, dependencies.

Grid config format (a contract: configs/compositional.py, configs/native.py and
configs/demo.py follow it)
----------------------------------------------------------------------------------
A grid lives in an ordinary experiment file (`get_config(arg)`, big_vision style).
`python -m vlm_jax.grid run FILE.py[:ARG]` calls `get_config(ARG)`, or
`get_config("grid")` when no ARG is given (a bare word is the `preset`, see
`configs.common.parse_arg`). The returned ConfigDict must have a field `grid`:

    config.grid = ml_collections.ConfigDict(dict(
        name="demo",                 # the study's name (informational)
        stages=[                     # run in this order; a stage's runs may need earlier ones
            dict(
                name="vit",          # stage name: [A-Za-z0-9_.-]+, unique
                config="",           # config file of its runs; "" = this file; relative
                                     # paths resolve against this file's directory
                arg="vit_pretrain",  # base arg of every run of the stage
                axes={"vit": ["S", "M", "L"]},   # ordered axis -> values; cartesian product
                needs={},            # config key -> run-name template of an earlier stage
            ),
            dict(
                name="grid",
                arg="run",
                axes={"vit": ["S", "M", "L"], "llm": ["S", "M"], "n": [512, 1024],
                      "data": ["clean", "noisy"]},
                needs={"model.vision.init_from": "vit/vit={vit}",
                       "model.llm.init_from": "lm/llm={llm}"},
                sweep="wsd",         # optional: "" (default) or "wsd"
                sweep_axis="n",      # the data-size axis a sweep branches over
            ),
        ],
        analysis=[                   # optional: run after every run is done
            dict(cmd="fit", stage="grid", out="fit", args=["--group-cols", "vit,llm,data"]),
        ],
    ))

One point of a stage's axes is one run:
- run name: `STAGE/axis=value,axis=value` in axis order (e.g. `grid/vit=S,llm=M,n=512,
  data=clean`); stable: it only depends on the stage name and the axis values (in axis
  order: a root records each stage's definition and refuses a grid that reorders axes).
- workdir: `ROOT/runs/STAGE/axis-value_axis-value` (values sanitised to [A-Za-z0-9.-]).
- its config: `FILE:ARG,axis=value,...` (the stage's `arg` plus one `axis=value` per
  axis, so every axis must be an argument of the config file's `get_config`), plus one
  `--config.KEY=WORKDIR` per entry of `needs`: the template is formatted with the point's
  axis values and must name a run of an earlier stage, which becomes a dependency.
- values are str/int/float/bool; they print with `str()` in names and args.

`sweep: "wsd"`: the runs of the stage that differ only in `sweep_axis` form one job,
trained by `vlm_jax.grid.sweep` as one warmup-stable-decay run with a short decay branched
off at each data size; each run still gets its own workdir and result.json.

`grid.analysis` entries: `cmd` ("fit" | "optimal" | "report"), `stage` (the stage whose rows are
analysed), `out` (folder under ROOT/report/), `args` (extra CLI args, list of str). The
runner calls `python -m vlm_jax.analysis CMD --runs ROOT --out ROOT/report/OUT --stage
STAGE ARGS...` as a subprocess.

A user narrows a grid with `--select AXIS=V1,V2` (repeatable): every stage that has the
axis keeps only those values; runs that remaining runs depend on are always kept.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Any, Mapping, Sequence

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SANITISE_RE = re.compile(r"[^A-Za-z0-9.-]+")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_VALUE_TYPES = (str, int, float, bool)
_STAGE_KEYS = {"name", "config", "arg", "axes", "needs", "sweep", "sweep_axis"}
_SWEEPS = ("", "wsd")
_ANALYSIS_KEYS = {"cmd", "stage", "out", "args"}
_ANALYSIS_CMDS = ("fit", "optimal", "report")


class GridError(ValueError):
    """A grid config, a selection or a root that cannot be used (message says why)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid: everything needed to launch it and to find its results."""
    name: str                      # "stage/axis=value,..."
    stage: str
    axes: tuple[tuple[str, str], ...]  # (axis, str(value)) in axis order
    config_file: str               # absolute path of the run's config file
    arg: str                       # get_config arg
    overrides: tuple[tuple[str, str], ...]  # (config key, run name it needs)
    deps: tuple[str, ...]          # run names this run needs, in order
    workdir: str                   # relative to ROOT
    sweep: str = ""                # "" | "wsd": runs of a stage differing only in
    sweep_axis: str = ""           # `sweep_axis` train as one sweep (vlm_jax.grid.sweep)

    @property
    def config_spec(self) -> str:
        """`FILE:ARG` as `--config` takes it."""
        return f"{self.config_file}:{self.arg}" if self.arg else self.config_file

    def to_json(self) -> dict:
        return {"name": self.name, "stage": self.stage, "axes": dict(self.axes),
                "config_file": self.config_file, "arg": self.arg,
                "overrides": dict(self.overrides), "deps": list(self.deps),
                "workdir": self.workdir, "sweep": self.sweep, "sweep_axis": self.sweep_axis}

    @property
    def sweep_key(self) -> str:
        """Runs with one sweep_key train together (the run name without the sweep axis)."""
        if not self.sweep:
            return self.name
        return run_name(self.stage, [(k, v) for k, v in self.axes if k != self.sweep_axis])


@dataclasses.dataclass(frozen=True)
class Analysis:
    cmd: str
    stage: str
    out: str
    args: tuple[str, ...]

    def to_json(self) -> dict:
        return {"cmd": self.cmd, "stage": self.stage, "out": self.out,
                "args": list(self.args)}


@dataclasses.dataclass(frozen=True)
class Grid:
    """An expanded grid: runs in dependency order (stages in order) and analysis steps."""
    name: str
    spec: str                      # the CONFIG argument it came from
    runs: tuple[Run, ...]
    analysis: tuple[Analysis, ...]
    axes: tuple[str, ...]          # every axis name, in first-seen order
    # The grid's definition before any --select: one dict per stage (`stage_definition`);
    # a root records it and refuses a grid whose stages are defined differently.
    stages: tuple[dict, ...] = ()

    def by_name(self) -> dict[str, Run]:
        return {r.name: r for r in self.runs}

    def to_json(self) -> dict:
        return {"name": self.name, "spec": self.spec, "axes": list(self.axes),
                "stages": [dict(s) for s in self.stages],
                "runs": [r.to_json() for r in self.runs],
                "analysis": [a.to_json() for a in self.analysis]}


# ----------------------------------------------------------------------------- loading


def split_spec(spec: str) -> tuple[str, str]:
    """"configs/demo.py:smallest" -> ("configs/demo.py", "smallest")."""
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise GridError(f"config {spec!r}: expected FILE.py[:ARG], e.g. configs/demo.py:smallest")
    return path, arg


def load_config_module(path: str):
    """Imports a config file by path (not by package), like ml_collections config_flags."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise GridError(f"config file {path} does not exist")
    name = "_grid_cfg_" + _SANITISE_RE.sub("_", path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported with the file name
        raise GridError(f"config file {path} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise GridError(f"config file {path} has no get_config(arg)")
    return module


def build_config(path: str, arg: str, module=None):
    """Calls FILE's get_config(arg); errors name the file and the arg."""
    module = module or load_config_module(path)
    try:
        return module.get_config(arg)
    except Exception as e:  # noqa: BLE001 - reported with the file name
        raise GridError(f"{path}:{arg}: get_config failed: {type(e).__name__}: {e}") from e


def build_run_configs(runs: Sequence["Run"], modules: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Run name -> its built config (`build_config`), each config file imported once
    (`modules`: config file -> module, shared by a caller's several calls)."""
    modules = {} if modules is None else modules
    out = {}
    for r in runs:
        if r.config_file not in modules:
            modules[r.config_file] = load_config_module(r.config_file)
        out[r.name] = build_config(r.config_file, r.arg, modules[r.config_file])
    return out


def load_grid_spec(spec: str) -> tuple[str, dict]:
    """Returns (abs config path, the `grid` field as a plain dict) of `FILE.py[:ARG]`."""
    path, arg = split_spec(spec)
    path = os.path.abspath(path)
    config = build_config(path, arg or "grid")
    grid = config.get("grid") if hasattr(config, "get") else None
    if grid is None:
        raise GridError(f"{spec}: get_config({arg or 'grid'!r}) returned a config without a "
                        "`grid` field: it is a single run (use python -m vlm_jax.main) or "
                        "pick one of the file's grid presets")
    if hasattr(grid, "to_dict"):
        grid = grid.to_dict()
    return path, dict(grid)


# ----------------------------------------------------------------------------- expansion


def value_str(value: Any, where: str) -> str:
    if not isinstance(value, _VALUE_TYPES):
        raise GridError(f"{where}: axis value {value!r} must be str/int/float/bool")
    s = str(value)
    if not s or any(c in s for c in ",=\n") or s != s.strip():
        raise GridError(f"{where}: axis value {s!r} must be non-empty without ',', '=' or "
                        "surrounding spaces")
    return s


def sanitise(text: str) -> str:
    """A directory-safe form of an axis value ([A-Za-z0-9.-]; anything else -> '-')."""
    out = _SANITISE_RE.sub("-", text).strip("-.")
    return out or "x"


def run_name(stage: str, point: Sequence[tuple[str, str]]) -> str:
    return f"{stage}/" + ",".join(f"{k}={v}" for k, v in point)


def run_workdir(stage: str, point: Sequence[tuple[str, str]]) -> str:
    leaf = "_".join(f"{sanitise(k)}-{sanitise(v)}" for k, v in point) or "run"
    return f"runs/{stage}/{leaf}"


def stage_definition(name: str, config_file: str, arg: str, axes: Sequence[tuple[str, list]],
                     needs: Mapping[str, str], sweep: str, sweep_axis: str) -> dict:
    """What defines a stage's runs (JSON-able; config file by base name so a moved
    checkout is the same grid): the root compares it with the one it recorded."""
    return {"name": name, "config": os.path.basename(config_file), "arg": arg,
            "axes": [[k, list(v)] for k, v in axes],
            "needs": {str(k): str(v) for k, v in needs.items()},
            "sweep": sweep, "sweep_axis": sweep_axis}


def _check_keys(d: Mapping, allowed: set, where: str):
    extra = sorted(set(d) - allowed)
    if extra:
        raise GridError(f"{where}: unknown field(s) {extra}; valid: {sorted(allowed)}")


def parse_selection(items: Sequence[str]) -> dict[str, list[str]]:
    """["vit=S,M", "n=512"] -> {"vit": ["S", "M"], "n": ["512"]}."""
    out: dict[str, list[str]] = {}
    for item in items or ():
        axis, sep, values = item.partition("=")
        axis = axis.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not axis or not vals:
            raise GridError(f"--select {item!r}: expected AXIS=V1[,V2...]")
        out.setdefault(axis, []).extend(vals)
    return out


def expand(grid: Mapping, config_path: str, spec: str = "",
           select: Mapping[str, Sequence[str]] | None = None) -> Grid:
    """Expands a grid dict (the `grid` field) to runs; validates everything it can.

    Args:
      grid: the grid field as a plain dict (see the module docstring).
      config_path: the file the grid came from (stage `config` paths are relative to it).
      spec: the CONFIG argument (recorded in grid.json).
      select: axis -> values to keep (unknown axes/values are an error listing valid ones).
    """
    where = spec or config_path
    if not isinstance(grid, Mapping):
        raise GridError(f"{where}: `grid` must be a dict, got {type(grid).__name__}")
    _check_keys(grid, {"name", "stages", "analysis"}, f"{where}: grid")
    stages = grid.get("stages")
    if not stages or not isinstance(stages, (list, tuple)):
        raise GridError(f"{where}: grid.stages must be a non-empty list of stage dicts")
    base_dir = os.path.dirname(os.path.abspath(config_path))
    runs: list[Run] = []
    names: dict[str, Run] = {}
    workdirs: dict[str, str] = {}
    stage_names: list[str] = []
    axis_values: dict[str, list[str]] = {}
    definitions: list[dict] = []
    for i, stage in enumerate(stages):
        w = f"{where}: grid.stages[{i}]"
        if not isinstance(stage, Mapping):
            raise GridError(f"{w} must be a dict")
        _check_keys(stage, _STAGE_KEYS, w)
        sname = stage.get("name", "")
        if not isinstance(sname, str) or not _NAME_RE.match(sname):
            raise GridError(f"{w}.name {sname!r} must match [A-Za-z0-9_.-]+")
        if sname in stage_names:
            raise GridError(f"{w}.name {sname!r} is used by an earlier stage")
        stage_names.append(sname)
        w = f"{where}: stage {sname!r}"
        cfg = stage.get("config") or config_path
        cfg = cfg if os.path.isabs(cfg) else os.path.normpath(os.path.join(base_dir, cfg))
        if not os.path.isfile(cfg):
            raise GridError(f"{w}: config file {cfg} does not exist")
        arg = stage.get("arg", "") or ""
        if not isinstance(arg, str):
            raise GridError(f"{w}: arg must be a string")
        axes = stage.get("axes") or {}
        if not isinstance(axes, Mapping):
            raise GridError(f"{w}: axes must be a dict axis -> list of values")
        axis_lists = []
        for axis, values in axes.items():
            if not isinstance(axis, str) or not _KEY_RE.match(axis) or "." in axis:
                raise GridError(f"{w}: axis name {axis!r} must be an identifier")
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
                raise GridError(f"{w}: axis {axis!r} must list its values, got {values!r}")
            vals = [value_str(v, f"{w}: axis {axis!r}") for v in values]
            if not vals or len(set(vals)) != len(vals):
                raise GridError(f"{w}: axis {axis!r} needs distinct values, got {vals}")
            seen = axis_values.setdefault(axis, [])
            seen.extend(v for v in vals if v not in seen)
            axis_lists.append([(axis, v) for v in vals])
        sweep = stage.get("sweep") or ""
        if sweep not in _SWEEPS:
            raise GridError(f"{w}: sweep {sweep!r} must be one of {list(_SWEEPS)}")
        sweep_axis = (stage.get("sweep_axis") or "n") if sweep else ""
        if sweep and sweep_axis not in axes:
            raise GridError(f"{w}: sweep_axis {sweep_axis!r} is not an axis of the stage; "
                            f"axes: {list(axes)}")
        needs = stage.get("needs") or {}
        if not isinstance(needs, Mapping):
            raise GridError(f"{w}: needs must be a dict config key -> run-name template")
        for key in needs:
            if not _KEY_RE.match(str(key)):
                raise GridError(f"{w}: needs key {key!r} must be a dotted config field")
        definitions.append(stage_definition(
            sname, cfg, arg, [(lst[0][0], [v for _, v in lst]) for lst in axis_lists], needs,
            sweep, sweep_axis))
        for point in itertools.product(*axis_lists):
            name = run_name(sname, point)
            fmt = dict(point)
            overrides, deps = [], []
            for key, template in needs.items():
                try:
                    dep = str(template).format(**fmt)
                except (KeyError, IndexError, ValueError) as e:
                    raise GridError(f"{w}: needs[{key!r}] template {template!r} uses an "
                                    f"unknown axis ({e}); axes: {list(fmt)}") from e
                if dep not in names:
                    raise GridError(f"{w}: run {name} needs {dep!r} (for {key}), which is not "
                                    "a run of an earlier stage")
                overrides.append((key, dep))
                if dep not in deps:
                    deps.append(dep)
            full_arg = ",".join([a for a in [arg] if a] + [f"{k}={v}" for k, v in point])
            workdir = run_workdir(sname, point)
            if workdir in workdirs:
                raise GridError(f"{w}: runs {workdirs[workdir]} and {name} map to the same "
                                f"workdir {workdir}; use distinct axis values")
            workdirs[workdir] = name
            run = Run(name=name, stage=sname, axes=tuple(point), config_file=cfg,
                      arg=full_arg, overrides=tuple(overrides), deps=tuple(deps),
                      workdir=workdir, sweep=sweep, sweep_axis=sweep_axis)
            runs.append(run)
            names[name] = run
    analysis = []
    for i, a in enumerate(grid.get("analysis") or ()):
        w = f"{where}: grid.analysis[{i}]"
        if not isinstance(a, Mapping):
            raise GridError(f"{w} must be a dict")
        _check_keys(a, _ANALYSIS_KEYS, w)
        cmd = a.get("cmd", "fit")
        if cmd not in _ANALYSIS_CMDS:
            raise GridError(f"{w}: cmd {cmd!r} must be one of {list(_ANALYSIS_CMDS)}")
        st = a.get("stage", "")
        if st not in stage_names:
            raise GridError(f"{w}: stage {st!r} is not a stage; stages: {stage_names}")
        out = a.get("out") or f"{st}_{cmd}"
        if not _NAME_RE.match(out):
            raise GridError(f"{w}: out {out!r} must match [A-Za-z0-9_.-]+")
        args = a.get("args") or ()
        if isinstance(args, str) or not all(isinstance(x, str) for x in args):
            raise GridError(f"{w}: args must be a list of strings")
        analysis.append(Analysis(cmd=cmd, stage=st, out=out, args=tuple(args)))
    full = Grid(name=str(grid.get("name") or os.path.splitext(os.path.basename(config_path))[0]),
                spec=spec, runs=tuple(runs), analysis=tuple(analysis),
                axes=tuple(axis_values), stages=tuple(definitions))
    if select:
        full = apply_selection(full, select, axis_values)
    return full


def apply_selection(grid: Grid, select: Mapping[str, Sequence[str]],
                    axis_values: Mapping[str, Sequence[str]] | None = None) -> Grid:
    """Keeps the runs whose axes match `select`, plus everything they depend on."""
    if axis_values is None:
        axis_values = {}
        for r in grid.runs:
            for k, v in r.axes:
                vals = axis_values.setdefault(k, [])
                if v not in vals:
                    vals.append(v)
    for axis, values in select.items():
        if axis not in axis_values:
            raise GridError(f"unknown grid axis {axis!r}; valid axes: {list(axis_values)}")
        bad = [v for v in values if v not in axis_values[axis]]
        if bad:
            raise GridError(f"unknown value(s) {bad} for grid axis {axis!r}; valid values: "
                            f"{list(axis_values[axis])}")
    keep = set()
    for r in grid.runs:
        ax = dict(r.axes)
        if all(ax[a] in vals for a, vals in select.items() if a in ax):
            keep.add(r.name)
    by_name = grid.by_name()
    stack = list(keep)
    while stack:  # dependency closure
        for dep in by_name[stack.pop()].deps:
            if dep not in keep:
                keep.add(dep)
                stack.append(dep)
    runs = tuple(r for r in grid.runs if r.name in keep)
    return dataclasses.replace(grid, runs=runs)


def load_grid(spec: str, select: Mapping[str, Sequence[str]] | None = None) -> Grid:
    """`FILE.py[:ARG]` -> expanded Grid (selection applied)."""
    path, grid = load_grid_spec(spec)
    return expand(grid, path, spec=spec, select=select)


def validate_runs(grid: Grid) -> list[str]:
    """Builds every run's config in-process (no JAX), before anything launches.

    Returns a list of error messages (empty when every run's config builds and every
    `needs` key is a field of it).
    """
    errors = []
    modules: dict[str, Any] = {}
    for r in grid.runs:
        try:
            module = modules.get(r.config_file) or load_config_module(r.config_file)
            modules[r.config_file] = module
            cfg = build_config(r.config_file, r.arg, module)
            if cfg is None or not hasattr(cfg, "get"):
                raise GridError(f"{r.config_spec}: get_config returned {type(cfg).__name__}")
            if cfg.get("grid") is not None:
                raise GridError(f"{r.config_spec}: returned a grid, not a run config")
            for key, _ in r.overrides:
                node = cfg
                for part in key.split("."):
                    if not hasattr(node, "get") or part not in node:
                        raise GridError(f"{r.config_spec}: needs key {key!r} is not a field "
                                        "of the run config")
                    node = node[part]
        except GridError as e:
            errors.append(f"{r.name}: {e}")
    return errors
