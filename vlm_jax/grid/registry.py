"""Results registry of a grid root: run states, `grid.json`, `results.csv`.

Layout of a root (everything the runner writes; the trainer writes the workdirs):

    ROOT/grid.json                  the grid this root holds: its stage definitions (a grid
                                    defined differently is refused) and every run launched
    ROOT/results.csv                one row per run (columns: docs/contracts.md), atomic
    ROOT/timings.jsonl              one line per finished job (wall seconds, exit code)
    ROOT/runs/STAGE/AXES/           a run's workdir (config.json, metrics.jsonl, result.json)
    ROOT/runs/STAGE/AXES/grid_status.json   runner's marker: failed | skipped | running
    ROOT/runs/STAGE/AXES/run.log    the run's stdout+stderr (appended on every attempt)
    ROOT/report/OUT/                analysis outputs

A run is `done` when its `result.json` says `"status": "done"`; nothing else counts.
No JAX here: the runner stays a light process.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import time
from typing import Any, Iterable, Mapping

from vlm_jax.grid.expand import Grid, GridError, Run

RESULT = "result.json"
STATUS = "grid_status.json"
LOG = "run.log"
GRID_JSON = "grid.json"
RESULTS_CSV = "results.csv"
TIMINGS = "timings.jsonl"   # one line per finished job: job, runs, rc, start, seconds, slot
EVENTS = "runner_events.jsonl"  # the runner's own timeline: start, planned, analysis, end

# results.csv columns after `run, status, stage, <axes...>` (docs/contracts.md).
METRIC_COLUMNS = ("params_vision", "params_projector", "params_llm", "params_total",
                  "params_trainable", "data_size", "examples_seen", "tokens_seen",
                  "train_loss", "eval_loss", "flops", "wall_time_s", "steps")
# result.json key for each column (data_size comes from config.json data.n when absent).
_RESULT_KEYS = {"params_vision": "params/vision", "params_projector": "params/projector",
                "params_llm": "params/llm", "params_total": "params/total",
                "params_trainable": "params/trainable", "data_size": "data_size",
                "examples_seen": "examples_seen", "tokens_seen": "tokens_seen",
                "train_loss": "final/train_loss", "eval_loss": "final/eval_loss",
                "flops": "flops", "wall_time_s": "wall_time_s", "steps": "steps"}


# ----------------------------------------------------------------------------- files


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` via temp + rename: a crash leaves the previous file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when missing or unreadable (half-written)."""
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def log_tail(path: str, lines: int = 20, max_chars: int = 4000) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = "\n".join(data.splitlines()[-lines:])
    return tail[-max_chars:]


# ----------------------------------------------------------------------------- run states


def workdir(root: str, run: Run) -> str:
    return os.path.join(root, run.workdir)


def read_result(root: str, run: Run) -> dict | None:
    return read_json(os.path.join(workdir(root, run), RESULT))


def is_done(root: str, run: Run) -> bool:
    res = read_result(root, run)
    return bool(res) and res.get("status") == "done"


def run_state(root: str, run: Run) -> tuple[str, str]:
    """(state, detail): done | failed | skipped | running | interrupted | pending.

    `running` = a live runner (the pid and host in its marker) is training it now.
    `interrupted` = started (has a workdir with metrics or checkpoints) but not finished:
    the next `run` resumes it from its last checkpoint.
    """
    wd = workdir(root, run)
    res = read_json(os.path.join(wd, RESULT))
    if res is not None:
        if res.get("status") == "done":
            return "done", ""
        return "failed", f"result.json status {res.get('status')!r}"
    marker = read_json(os.path.join(wd, STATUS)) or {}
    st = marker.get("status")
    if st in ("failed", "skipped"):
        return st, str(marker.get("error", ""))
    if st == "running" and _runner_alive(marker):
        return "running", f"by the runner, pid {marker['pid']}"
    if os.path.isdir(wd) and any(os.path.exists(os.path.join(wd, f))
                                 for f in ("metrics.jsonl", "checkpoints", "config.json")):
        return "interrupted", "resumes from its last checkpoint"
    return "pending", ""


def _runner_alive(marker: dict) -> bool:
    """Whether the runner that wrote a "running" marker (its `pid` on `host`) still runs
    (else the run was interrupted: the runner was killed without clearing its marks)."""
    pid = marker.get("pid")
    if not isinstance(pid, int) or marker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def mark(root: str, run: Run, status: str, error: str = "", **extra) -> None:
    """Writes the runner's marker for a run (atomic)."""
    wd = workdir(root, run)
    os.makedirs(wd, exist_ok=True)
    atomic_write_json(os.path.join(wd, STATUS), dict(
        status=status, error=error, run=run.name, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra))


def clear_mark(root: str, run: Run) -> None:
    try:
        os.remove(os.path.join(workdir(root, run), STATUS))
    except FileNotFoundError:
        pass


def append_timing(root: str, **entry) -> None:
    """Appends one finished job's timing to ROOT/timings.jsonl (benchmarks/grid.py)."""
    with open(os.path.join(root, TIMINGS), "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def append_event(root: str, event: str, **entry) -> None:
    """Appends one event of the runner's timeline (`t`: Unix time) to ROOT/runner_events.jsonl:
    where its wall time went outside jobs (benchmarks/grid.py)."""
    with open(os.path.join(root, EVENTS), "a") as f:
        f.write(json.dumps(dict(entry, event=event, t=round(time.time(), 3)),
                           sort_keys=True) + "\n")


def read_events(root: str) -> list[dict]:
    return read_timings(root, EVENTS)


def read_timings(root: str, name: str = TIMINGS) -> list[dict]:
    out = []
    try:
        with open(os.path.join(root, name)) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


class RootLock:
    """ROOT/.lock holding the runner's pid: two runners on one root would train the same
    runs twice. A lock left by a dead process is taken over."""

    def __init__(self, root: str):
        self.path = os.path.join(root, ".lock")
        self.fd = None

    def __enter__(self):
        for _ in range(2):
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(self.fd, str(os.getpid()).encode())
                return self
            except FileExistsError:
                try:
                    pid = int(open(self.path).read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise GridError(f"another runner (pid {pid}) is running this root "
                                    f"({self.path}); wait for it or stop it first")
                try:
                    os.remove(self.path)  # stale
                except FileNotFoundError:
                    pass
        raise GridError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- grid.json


def _fingerprint(run_json: Mapping) -> tuple:
    """What makes two runs with one name the same run (paths compared by file name)."""
    return (os.path.basename(run_json.get("config_file", "")), run_json.get("arg", ""),
            tuple(sorted((run_json.get("overrides") or {}).items())))


_STAGE_FIELDS = (("config", "config file"), ("arg", "arg"), ("needs", "needs"),
                 ("sweep", "sweep"), ("sweep_axis", "sweep_axis"))


def definition_changes(old_stages: list[dict], new_stages: list[dict]) -> list[str]:
    """How the stages a root recorded differ from a grid's, in words; [] = compatible.

    Compatible: the same stages with the same config file, arg, axes (names and order),
    needs and sweep; stages and axis values may be added or left out (an extension or a
    narrowing: no run changes its name or its config). Anything else would rename runs
    (axis order) or change what a run of the same name computes.
    """
    old_by = {s.get("name"): s for s in old_stages}
    out = []
    for new in new_stages:
        old = old_by.get(new["name"])
        if old is None:
            continue
        w = f"stage {new['name']!r}"
        old_axes = [a for a, _ in old.get("axes", [])]
        new_axes = [a for a, _ in new["axes"]]
        if old_axes != new_axes:
            what = ("axis order" if sorted(old_axes) == sorted(new_axes) else "axes")
            out.append(f"{w}: {what} {old_axes} -> {new_axes} (run names would change, so "
                       "every run would start again)")
        for key, label in _STAGE_FIELDS:
            if old.get(key, "") != new.get(key, ""):
                out.append(f"{w}: {label} {old.get(key, '')!r} -> {new.get(key, '')!r}")
    return out


def _refuse_unreadable_grid_json(root: str) -> None:
    """ROOT/grid.json exists but is no JSON object (it is written atomically, so it was
    edited or damaged): say so instead of treating the root as empty."""
    path = os.path.join(root, GRID_JSON)
    if os.path.exists(path):
        raise GridError(f"{path} is not a readable JSON object (edited or damaged?): restore "
                        "it, or use another --root")


def check_root(root: str, grid: Grid, allow_change: bool = False) -> list[str]:
    """Refuses a root that holds a different grid (nothing is written); returns the
    names of the runs it knows.

    Same grid = same grid name, compatible stage definitions (`definition_changes`; a
    root made before definitions were recorded skips this) and, for every run name both
    know, the same config file name, arg and `needs`. `allow_change=True` accepts changed
    stage definitions (the runs already done stay, under their old names); the grid name
    and the per-run configs must still match.
    """
    old = read_json(os.path.join(root, GRID_JSON))
    if old is None:
        _refuse_unreadable_grid_json(root)
        if os.path.isdir(os.path.join(root, "runs")):
            raise GridError(f"root {root} has runs/ but no {GRID_JSON}: it was not made by "
                            "this runner; use another --root")
        return []
    if old.get("name") != grid.name:
        raise GridError(f"root {root} holds grid {old.get('name')!r} (from "
                        f"{old.get('spec')!r}), not {grid.name!r}: use another --root")
    changes = definition_changes(old.get("stages") or [], [dict(s) for s in grid.stages])
    if changes and not allow_change:
        raise GridError(
            f"root {root} holds grid {grid.name!r} as defined by {old.get('spec')!r}, and "
            f"{grid.spec or 'this grid'!r} defines it differently:\n  - "
            + "\n  - ".join(changes) + "\nNothing was run or written. Use a new --root for "
            "the new definition (or restore the old one); --allow-grid-change records the "
            "new definition here and keeps every run already done.")
    old_runs = {r["name"]: r for r in old.get("runs", [])}
    for r in grid.runs:
        o = old_runs.get(r.name)
        if o is not None and _fingerprint(o) != _fingerprint(r.to_json()):
            raise GridError(
                f"root {root} holds run {r.name} with a different config "
                f"({os.path.basename(o.get('config_file', ''))}:{o.get('arg')} vs "
                f"{os.path.basename(r.config_file)}:{r.arg}); it was made by "
                f"{old.get('spec')!r}: use another --root (or the same preset)")
    return list(old_runs)


def record_grid(root: str, grid: Grid) -> dict:
    """Writes ROOT/grid.json = the union of the runs known so far and `grid`'s runs."""
    old = read_json(os.path.join(root, GRID_JSON)) or {}
    new = grid.to_json()
    names = {r["name"] for r in new["runs"]}
    kept = [r for r in old.get("runs", []) if r["name"] not in names]
    new["runs"] = kept + new["runs"]
    axes = list(old.get("axes", []))
    axes += [a for a in new["axes"] if a not in axes]
    new["axes"] = axes
    analysis = {json.dumps(a, sort_keys=True): a for a in old.get("analysis", [])}
    analysis.update({json.dumps(a, sort_keys=True): a for a in new["analysis"]})
    new["analysis"] = list(analysis.values())
    # stage definitions: this grid's, plus those of stages it leaves out; a changed
    # definition (--allow-grid-change) keeps the old one under "previous_stages"
    mine = {s["name"] for s in new["stages"]}
    new["stages"] = [s for s in old.get("stages", []) if s.get("name") not in mine] \
        + new["stages"]
    if definition_changes(old.get("stages") or [], new["stages"]):
        new["previous_stages"] = old.get("previous_stages", []) + [old.get("stages")]
    elif old.get("previous_stages"):
        new["previous_stages"] = old["previous_stages"]
    atomic_write_json(os.path.join(root, GRID_JSON), new)
    return new


def load_recorded_grid(root: str) -> Grid:
    """The grid recorded in ROOT/grid.json (for `status`)."""
    from vlm_jax.grid.expand import Analysis  # local: keeps the import list short
    data = read_json(os.path.join(root, GRID_JSON))
    if data is None:
        _refuse_unreadable_grid_json(root)
        raise GridError(f"{root} holds no grid ({GRID_JSON} missing): run "
                        "`python -m vlm_jax.grid run CONFIG --root ROOT` first")
    runs = tuple(Run(name=r["name"], stage=r["stage"], axes=tuple(r["axes"].items()),
                     config_file=r["config_file"], arg=r["arg"],
                     overrides=tuple(r.get("overrides", {}).items()),
                     deps=tuple(r.get("deps", ())), workdir=r["workdir"],
                     sweep=r.get("sweep", ""), sweep_axis=r.get("sweep_axis", ""))
                 for r in data.get("runs", []))
    analysis = tuple(Analysis(cmd=a["cmd"], stage=a["stage"], out=a["out"],
                              args=tuple(a.get("args", ()))) for a in data.get("analysis", []))
    return Grid(name=data.get("name", ""), spec=data.get("spec", ""), runs=runs,
                analysis=analysis, axes=tuple(data.get("axes", ())),
                stages=tuple(data.get("stages", ())))


# ----------------------------------------------------------------------------- results.csv


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def result_row(root: str, run: Run, axes: Iterable[str]) -> dict[str, str]:
    state, _ = run_state(root, run)
    ax = dict(run.axes)
    row = {"run": run.name, "status": state, "stage": run.stage}
    row.update({a: ax.get(a, "") for a in axes})
    res = read_result(root, run) or {}
    cfg = read_json(os.path.join(workdir(root, run), "config.json")) or {}
    for col in METRIC_COLUMNS:
        v = res.get(_RESULT_KEYS[col])
        if v is None and col == "data_size":
            v = (cfg.get("data") or {}).get("n")
        row[col] = _fmt(v)
    return row


def results_table(root: str, grid: Grid, done_rows: dict[str, dict] | None = None
                  ) -> tuple[list[str], list[dict[str, str]]]:
    """The results.csv columns and rows. `done_rows` (run name -> row, filled here):
    rows of done runs kept by a caller that rewrites the table while runs finish (a done
    run's row does not change), so only the other runs' files are read again."""
    columns = ["run", "status", "stage", *grid.axes, *METRIC_COLUMNS]
    rows = []
    for r in grid.runs:
        row = None if done_rows is None else done_rows.get(r.name)
        if row is None:
            row = result_row(root, r, grid.axes)
            if done_rows is not None and row["status"] == "done":
                done_rows[r.name] = row
        rows.append(row)
    return columns, rows


def write_results_csv(root: str, grid: Grid, done_rows: dict[str, dict] | None = None) -> str:
    """Aggregates every run's result.json into ROOT/results.csv (atomic); returns its path.
    `done_rows`: see `results_table`."""
    columns, rows = results_table(root, grid, done_rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path = os.path.join(root, RESULTS_CSV)
    atomic_write_text(path, buf.getvalue())
    return path
