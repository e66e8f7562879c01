"""Nested, deterministic data-size subsets and epoch order over record indices.

A source of N records is viewed through one record order: for random-access sources
(`order="permute"`) a permutation of [0, N) fixed by `data_seed` (stateless Feistel
shuffle, `grain.experimental.index_shuffle`, so nothing of size N is materialised or
read); for tar shards (`order="prefix"`) the source's own order, which is already the
shards in a seeded order, so a subset only needs the shards that hold it. The eval split
is the first `eval_n` records of that order, the train subset of size n the next n. So
every train subset contains every smaller one (the 2M subset holds the 1M subset) and
none meets the eval split.

Training reads the train subset epoch after epoch; epoch e visits it in its own order
(a second shuffle seeded by (train_seed, e)). Global position p of the training stream
is example (p mod n) of epoch p // n.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

_ROUNDS = 4
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_size(value: int | str | float, field: str = "data.n") -> int:
    """Parses a data size: 1000, "1000", "500k", "1M", "1.5M", "2B" (decimal suffixes).

    "all", 0 and -1 mean "everything that is left" and return -1.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r}: expected a size like 1000, '500k' or '1M'")
    if isinstance(value, (int, np.integer)):
        return -1 if value <= 0 else int(value)
    if isinstance(value, float):
        if value != int(value):
            raise ValueError(f"{field}={value!r}: a size must be a whole number")
        return -1 if value <= 0 else int(value)
    s = str(value).strip().lower().replace("_", "")
    if s in ("all", "0", "-1", ""):
        return -1
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmbg]?)", s)
    if not m:
        raise ValueError(f"{field}={value!r}: expected a size like 1000, '500k', '1M' or 'all'")
    n = float(m.group(1)) * _SUFFIX[m.group(2)]
    if n != int(n) or n <= 0:
        raise ValueError(f"{field}={value!r}: not a positive whole number of samples")
    return int(n)


@functools.lru_cache(maxsize=4096)
def mix_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


_DENSE_MAX = 1 << 22  # up to here a permutation is materialised (<= 16 MB, cached)


@functools.lru_cache(maxsize=3)
def _dense_permutation(size: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.Philox(seed)).permutation(size).astype(np.int32)


def permute(i: int, size: int, seed: int) -> int:
    """Position `i` of a seeded permutation of [0, size).

    Small sizes use a cached numpy permutation (O(1) a lookup); large ones a stateless
    Feistel shuffle (`index_shuffle`), so nothing of the source's size is materialised.
    """
    if not 0 <= i < size:
        raise IndexError(f"index {i} out of range [0, {size})")
    if size == 1:
        return 0
    if size <= _DENSE_MAX:
        return int(_dense_permutation(int(size), int(seed))[i])
    # imported here: Grain imports JAX, and config files import this module (parse_size)
    from grain.experimental import index_shuffle
    return int(index_shuffle(int(i), max_index=size - 1, seed=seed, rounds=_ROUNDS))


@dataclasses.dataclass(frozen=True)
class Split:
    """Eval split and train subset of a source with `total` records.

    Attributes:
      total: records in the source.
      eval_n: size of the eval split.
      n: size of the train subset.
      data_seed: seed of the permutation that defines the splits.
      train_seed: seed of the per-epoch training order.
    """
    total: int
    eval_n: int
    n: int
    data_seed: int = 0
    train_seed: int = 0
    order: str = "permute"

    @classmethod
    def create(cls, total: int, n: int | str, eval_n: int | str, data_seed: int = 0,
               train_seed: int = 0, what: str = "the source",
               order: str = "permute") -> "Split":
        """Checks the sizes against `total`; n = "all" takes everything after eval."""
        ev = parse_size(eval_n, "data.eval_n") if eval_n not in (0, "0") else 0
        ev = max(ev, 0)
        nn = parse_size(n, "data.n")
        if nn < 0:
            nn = total - ev
        if ev + nn > total or nn <= 0:
            raise ValueError(
                f"data.n={n!r} ({nn}) + data.eval_n={eval_n!r} ({ev}) needs {nn + ev} records "
                f"but {what} has {total}: lower data.n/data.eval_n or use a larger source")
        if order not in ("permute", "prefix"):
            raise ValueError(f"unknown record order {order!r}: use 'permute' or 'prefix'")
        return cls(total=total, eval_n=ev, n=nn, data_seed=data_seed, train_seed=train_seed,
                   order=order)

    def _record(self, i: int) -> int:
        if self.order == "prefix":
            return i
        return permute(i, self.total, self._seed())

    def _seed(self) -> int:
        return mix_seed(self.data_seed, 0x5EB5E7)

    def eval_record(self, k: int) -> int:
        """Record index of eval example k (0 <= k < eval_n)."""
        if not 0 <= k < self.eval_n:
            raise IndexError(f"eval example {k} out of range [0, {self.eval_n})")
        return self._record(k)

    def train_record(self, k: int) -> int:
        """Record index of train-subset example k (0 <= k < n), in subset order."""
        if not 0 <= k < self.n:
            raise IndexError(f"train example {k} out of range [0, {self.n})")
        return self._record(self.eval_n + k)

    def epoch_of(self, position: int) -> int:
        return position // self.n

    def train_record_at(self, position: int) -> int:
        """Record index at global position `position` of the endless training stream."""
        epoch, k = divmod(position, self.n)
        return self.train_record(permute(k, self.n, mix_seed(self.train_seed, epoch, 0xE90C)))

    def train_records_at(self, first: int, count: int) -> np.ndarray:
        """int64 [count]: `train_record_at` of positions first, ..., first + count - 1,
        with array lookups where the orders are materialised (sizes <= _DENSE_MAX)."""
        pos = np.arange(first, first + count, dtype=np.int64)
        if self.n > _DENSE_MAX or (self.order != "prefix" and self.total > _DENSE_MAX):
            return np.array([self.train_record_at(int(p)) for p in pos], np.int64)
        epoch, k = np.divmod(pos, self.n)
        out = np.empty((count,), np.int64)
        for e in np.unique(epoch).tolist():  # one or two epochs in a batch
            sel = epoch == e
            out[sel] = _dense_permutation(self.n, mix_seed(self.train_seed, e, 0xE90C))[k[sel]]
        out += self.eval_n
        if self.order == "prefix":
            return out
        return _dense_permutation(int(self.total), int(self._seed()))[out].astype(np.int64)

    def train_records(self) -> np.ndarray:
        """All record indices of the train subset (for tests and small sets)."""
        return np.array([self.train_record(k) for k in range(self.n)], np.int64)

    def eval_records(self) -> np.ndarray:
        return np.array([self.eval_record(k) for k in range(self.eval_n)], np.int64)
