"""Metric writers (metrics.jsonl, TensorBoard, console + progress bar) and MFU.

Only process 0 writes files. `metrics.jsonl` holds one JSON object per logged step; on
resume `JsonlWriter.truncate_after(step)` drops lines past the restored step, so a
resumed run ends with exactly the lines of an uninterrupted one.

Exact means over many batches use `clu.metrics.Average` with `total` = sum of token
losses and `count` = number of tokens (merging sums both, so the mean is token-weighted).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from clu import metrics as clu_metrics

# Dense bf16 peak FLOP/s per chip (vendor numbers; GPUs without sparsity).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device from its `device_kind`, None when unknown (CPU)."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        device_kind: str) -> float | None:
    peak = peak_flops_per_device(device_kind)
    if peak is None or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / (peak * num_devices)


def token_mean(loss_sums, num_tokens) -> float:
    """Exact token-weighted mean of per-batch (loss_sum, num_tokens) pairs via clu."""
    acc = None
    for s, n in zip(loss_sums, num_tokens):
        m = clu_metrics.Average(total=np.float64(s), count=np.float64(n))
        acc = m if acc is None else acc.merge(m)
    if acc is None or float(acc.count) == 0:
        return float("nan")
    return float(acc.total / acc.count)


def _clean(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e309 if v > 0 else -1e309)
    return v


def atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlWriter:
    """Appends one JSON object per step to `path`."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Keeps only complete lines with `step` <= step (atomic rewrite)."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a torn last line from a kill
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                if rec.get("step", 0) <= step:
                    keep.append(line)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict) -> None:
        rec = {"step": int(step)}
        rec.update({k: _clean(v) for k, v in sorted(scalars.items())})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def _import_summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX's writer imports
    torch when it is installed (only to accept torch tensors; ~5 s of a trainer process's
    start on CPU); only floats are written here. Where torch is already loaded, it is used."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """TensorBoard event files via tensorboardX (no TensorFlow at run time)."""

    def __init__(self, logdir: str):
        self._w = _import_summary_writer()(logdir)

    def write(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            v = _clean(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.add_scalar(k, float(v), int(step))
        self._w.flush()

    def close(self):
        self._w.close()


class Console:
    """A tqdm progress bar with ETA on stderr and one log line per logged step."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                            desc="train", unit="step", mininterval=1.0)

    def update(self, n: int = 1, postfix: dict | None = None):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()
                                      if isinstance(v, (int, float))}, refresh=False)

    def write(self, step: int, scalars: dict):
        items = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()) if v is not None)
        line = f"[step {step}] {items}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt(v):
    return f"{v:.5g}" if isinstance(v, float) else str(v)


class Writers:
    """All writers of a run; a no-op on processes other than 0."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, is_main: bool,
                 progress: bool = True):
        self.is_main = is_main
        self.jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if is_main else None
        if self.jsonl is not None:
            self.jsonl.truncate_after(start_step)
        self.tb = TensorBoardWriter(os.path.join(workdir, "tb")) if is_main else None
        self.console = Console(total_steps, start_step, enabled=is_main and progress)
        self.t0 = time.time()

    def write(self, step: int, scalars: dict, to_console: bool = True) -> None:
        if not self.is_main:
            return
        self.jsonl.write(step, scalars)
        self.tb.write(step, scalars)
        if to_console:
            self.console.write(step, scalars)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        self.console.close()
