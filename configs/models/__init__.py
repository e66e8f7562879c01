"""Size tables: `vit.SIZES`, `llm.SIZES` (name -> overrides of common's defaults)."""
from __future__ import annotations


def lookup(table: dict, name: str, base, where: str):
    """`base` (a fresh ConfigDict) updated with `table[name]`; a clear error otherwise."""
    if name not in table:
        raise ValueError(f"unknown size {name!r}; known: {sorted(table)} ({where})")
    base.update(table[name])
    return base
