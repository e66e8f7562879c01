"""Scanned <-> unscanned parameter layouts.

With `scan_layers=True` the blocks' params are one subtree `layers` whose leaves carry a
leading `layers` axis; without, they are `layers_0 .. layers_{L-1}`. Both are plain dicts
of arrays (no flax metadata boxes), so conversion and tests can move between them.
"""
from __future__ import annotations

import re

import numpy as np

_LAYER = re.compile(r"^layers_(\d+)$")


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def unstack_layers(tree: dict) -> dict:
    """Replaces every `layers` subtree (stacked leaves) by `layers_0..` (recursively)."""
    out = {}
    for k, v in tree.items():
        if k == "layers" and isinstance(v, dict):
            depth = _depth(v)
            for i in range(depth):
                out[f"layers_{i}"] = _map(lambda a, i=i: a[i], v)
        elif isinstance(v, dict):
            out[k] = unstack_layers(v)
        else:
            out[k] = v
    return out


def stack_layers(tree: dict, xp=np) -> dict:
    """Inverse of `unstack_layers`: `layers_0..layers_{L-1}` -> one stacked `layers`."""
    out, found = {}, {}
    for k, v in tree.items():
        m = _LAYER.match(k)
        if m and isinstance(v, dict):
            found[int(m.group(1))] = v
        elif isinstance(v, dict):
            out[k] = stack_layers(v, xp)
        else:
            out[k] = v
    if found:
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"layer indices {sorted(found)} are not 0..{len(found) - 1}")
        blocks = [found[i] for i in range(len(found))]
        out["layers"] = _stack(blocks, xp)
    return out


def _stack(blocks, xp):
    first = blocks[0]
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in blocks], xp) for k in first}
    return xp.stack(blocks)


def _depth(stacked: dict) -> int:
    for v in stacked.values():
        return _depth(v) if isinstance(v, dict) else int(v.shape[0])
    raise ValueError("empty 'layers' subtree")
