"""Inputs and outputs of the analysis: run tables, point selection, atomic writes.

The analysis reads only the results registry: `ROOT/results.csv` (columns in
docs/contracts.md), or, when it is absent, the `result.json` files under ROOT (with the
`config.json` next to each for the data size). A user-made CSV works the same way.
Every write goes to a temporary file that is renamed over the target.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from typing import Iterable, Sequence


class InputError(ValueError):
    """Input that cannot be analysed; the message names the file/column and the fix."""


@dataclasses.dataclass
class Table:
    rows: list[dict]          # column -> str
    columns: list[str]
    source: str               # for messages


@dataclasses.dataclass
class Group:
    name: str                 # "all" or "col=value,col=value"
    keys: dict                # group column -> value
    cols: dict                # role -> np.ndarray-able list of floats (e.g. N, D, loss)
    runs: list[str]


# --------------------------------------------------------------------------- reading

def read_csv(path: str) -> Table:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise InputError(f"{path}: empty CSV (expected a header line)")
        rows = [dict(r) for r in reader]
    return Table(rows=rows, columns=[c.strip() for c in reader.fieldnames], source=path)


_RESULT_KEYS = {  # result.json key -> results.csv column
    "status": "status", "final/train_loss": "train_loss", "final/eval_loss": "eval_loss",
    "params/vision": "params_vision", "params/projector": "params_projector",
    "params/llm": "params_llm", "params/total": "params_total",
    "params/trainable": "params_trainable", "examples_seen": "examples_seen",
    "tokens_seen": "tokens_seen", "flops": "flops", "wall_time_s": "wall_time_s",
    "steps": "steps",
}


def _row_from_result(root: str, path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    workdir = os.path.dirname(path)
    rel = os.path.relpath(workdir, root).split(os.sep)
    row = {col: res.get(key, "") for key, col in _RESULT_KEYS.items()}
    row["run"] = res.get("config_name") or "/".join(rel)
    if len(rel) >= 3 and rel[0] == "runs":   # ROOT/runs/STAGE/axis-value_axis-value
        row["stage"] = rel[1]
        for part in rel[2].split("_"):
            if "-" in part:
                k, v = part.split("-", 1)
                row.setdefault(k, v)
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        n = (cfg.get("data") or {}).get("n")
        if n is not None:
            row["data_size"] = n
    return {k: ("" if v is None else str(v)) for k, v in row.items()}


def read_runs(root: str) -> Table:
    """ROOT/results.csv, or a scan of ROOT/**/result.json when there is no results.csv."""
    path = os.path.join(root, "results.csv")
    if os.path.isfile(path):
        return read_csv(path)
    if not os.path.isdir(root):
        raise InputError(f"--runs {root}: no such directory")
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("report", "checkpoints"))
        if "result.json" in filenames:
            rows.append(_row_from_result(root, os.path.join(dirpath, "result.json")))
    if not rows:
        raise InputError(f"--runs {root}: neither results.csv nor any result.json under it "
                         f"(run the grid first: python -m vlm_jax.grid run CONFIG --root {root})")
    columns = sorted({k for r in rows for k in r})
    return Table(rows=rows, columns=columns, source=f"{root}/**/result.json")


# --------------------------------------------------------------------------- selecting

def _float(s) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def require_columns(table: Table, needed: dict) -> None:
    """needed: column -> flag that sets it (for the message)."""
    missing = [c for c in needed if c not in table.columns]
    if missing:
        hints = ", ".join(f"'{c}' (set with {needed[c]})" for c in missing)
        raise InputError(f"{table.source}: missing column(s) {hints}; "
                         f"columns present: {', '.join(table.columns)}")


def filter_stage(table: Table, stage: str | None) -> tuple[list[dict], list[dict]]:
    """Rows of `stage` with status done, and the excluded ones [{run, reason}]."""
    rows, excluded = table.rows, []
    if stage:
        if "stage" not in table.columns:
            raise InputError(f"{table.source}: --stage {stage} given but there is no "
                             f"'stage' column")
        rows = [r for r in rows if r.get("stage") == stage]
        if not rows:
            stages = sorted({r.get("stage", "") for r in table.rows})
            raise InputError(f"{table.source}: no rows of stage '{stage}' "
                             f"(stages present: {', '.join(stages)})")
    if "status" in table.columns:
        kept = []
        for r in rows:
            if (r.get("status") or "").strip() == "done":
                kept.append(r)
            else:
                excluded.append({"run": run_name(r), "reason": f"status={r.get('status') or 'missing'}"})
        rows = kept
    return rows, excluded


def run_name(row: dict) -> str:
    return row.get("run") or row.get("_line", "?")


def group_points(rows: Sequence[dict], roles: dict, group_cols: Sequence[str], *,
                 max_loss: float | None = None, diverged_factor: float | None = 3.0,
                 loss_role: str = "loss", optional: Sequence[str] = ()
                 ) -> tuple[list[Group], list[dict]]:
    """Split rows into groups and numeric columns; drop (and list) unusable points.

    roles: role -> column (e.g. {"N": "params_vision", "D": "data_size", "loss": "eval_loss"}).
    A point is excluded when a (non-optional) role's value is not a finite positive number, when the loss
    is above `max_loss`, or when it is above `diverged_factor` x its group's median loss.
    """
    excluded: list[dict] = []
    buckets: dict[tuple, list[tuple[dict, dict]]] = {}
    for i, r in enumerate(rows):
        r.setdefault("_line", f"row {i + 1}")
        vals, bad = {}, None
        for role, col in roles.items():
            v = _float(r.get(col))
            if role in optional:
                vals[role] = v
                continue
            if not math.isfinite(v) or v <= 0:
                bad = f"{col}={r.get(col)!r} is not a finite positive number"
                break
            vals[role] = v
        if bad is None and max_loss is not None and vals[loss_role] > max_loss:
            bad = f"{roles[loss_role]}={vals[loss_role]:.4g} > --max-loss {max_loss:g}"
        if bad:
            excluded.append({"run": run_name(r), "reason": bad})
            continue
        key = tuple(str(r.get(c, "")) for c in group_cols)
        buckets.setdefault(key, []).append((r, vals))
    groups = []
    for key in sorted(buckets, key=_natural_key):
        members = buckets[key]
        if diverged_factor:
            med = sorted(v[loss_role] for _, v in members)[len(members) // 2]
            ok = []
            for r, v in members:
                if v[loss_role] > diverged_factor * med:
                    excluded.append({"run": run_name(r), "reason": f"diverged: loss "
                                     f"{v[loss_role]:.4g} > {diverged_factor:g} x group median "
                                     f"{med:.4g}"})
                else:
                    ok.append((r, v))
            members = ok
        name = ",".join(f"{c}={k}" for c, k in zip(group_cols, key)) if group_cols else "all"
        groups.append(Group(name=name, keys=dict(zip(group_cols, key)),
                            cols={role: [v[role] for _, v in members] for role in roles},
                            runs=[run_name(r) for r, _ in members]))
    return groups, excluded


def _natural_key(key: tuple) -> tuple:
    out = []
    for k in key:
        v = _float(k)
        out.append((0, v, k) if math.isfinite(v) else (1, 0.0, k))
    return tuple(out)


def split_list(s: str | None) -> list[str]:
    return [c.strip() for c in (s or "").split(",") if c.strip()]


# --------------------------------------------------------------------------- writing

def atomic_write(path: str, data: bytes | str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def _jsonable(x):
    """NaN/inf -> None (strict JSON); numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


FIGURE_DPI = 110


def tight_png(fig, dpi: float = FIGURE_DPI) -> bytes:
    """`fig` as PNG cropped to its tight bounding box (+ `savefig.pad_inches` of its face
    colour), like `savefig(bbox_inches="tight")` but drawn once, not twice: the tight box
    is measured on the drawn canvas and the pixels outside it are cut off. Falls back to
    `savefig` when an artist reaches outside the figure (its pixels were not drawn)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.get_tightbbox(canvas.get_renderer())
    w, h = canvas.get_width_height()

    def rows_cols(b):   # pixel rows go down from the top, figure inches up from the bottom
        # (savefig's canvas is int(size * dpi) pixels, its origin at the box's corner)
        bottom, left = round(h - b.y0 * dpi), round(b.x0 * dpi)
        return (bottom - int(b.height * dpi), bottom, left, left + int(b.width * dpi))
    r0, r1, c0, c1 = rows_cols(box)
    if r0 < 0 or c0 < 0 or r1 > h or c1 > w or r1 <= r0 or c1 <= c0:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return buf.getvalue()
    r0, r1, c0, c1 = rows_cols(box.padded(float(matplotlib.rcParams["savefig.pad_inches"])))
    face = np.round(np.asarray(matplotlib.colors.to_rgba(fig.get_facecolor())) * 255)
    out = np.empty((r1 - r0, c1 - c0, 4), np.uint8)
    out[...] = face.astype(np.uint8)
    drawn = np.asarray(canvas.buffer_rgba())
    out[max(0, -r0):min(r1, h) - r0, max(0, -c0):min(c1, w) - c0] = \
        drawn[max(0, r0):min(r1, h), max(0, c0):min(c1, w)]
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="png", dpi=(dpi, dpi))
    return buf.getvalue()


def save_figure(fig, path: str) -> None:
    atomic_write(path, tight_png(fig))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def existing(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]
