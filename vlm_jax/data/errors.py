"""Errors of the data pipeline.

`BadSample` is raised by a transform for one sample that cannot be used (undecodable
image, empty caption, ...); the pipeline catches it, drops the sample and counts it under
`reason`. `BadDataError` stops a run when too many samples are bad.
"""
from __future__ import annotations


class BadSample(Exception):
    """One unusable sample. `reason` is a short snake_case counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadDataError(RuntimeError):
    """Too many bad samples (fraction above `config.data.max_bad_fraction`).

    `counts` maps reason -> number of skipped samples; `seen` is the number of samples
    read (good + bad).
    """

    def __init__(self, message: str, counts: dict[str, int] | None = None, seen: int = 0):
        super().__init__(message)
        self.counts = dict(counts or {})
        self.seen = seen
