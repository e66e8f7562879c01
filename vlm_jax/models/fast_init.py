"""Fresh params of a small model from ONE random draw, placed from the host.

flax's `Module.init` derives a key and draws per parameter; compiled, that is a program of
~10 XLA kernels per parameter (609 for the demo's CLIP ViT-L, 326 for its LM-M), and a
grid worker loads one such program per model shape from the serialized-program cache
(`vlm_jax.train.program_cache`): 0.3-0.9 CPU-s a run, more than the init computes. Even
one draw sliced into the leaves inside a program (`native.one_draw_init`) keeps one copy
kernel per leaf (~60, 0.9 MB, ~0.2 CPU-s to load).

Here the program is the draw alone, `jax.random.normal(rng, (n,))` (10 kernels, 70 kB,
~0.02 s to load), and the leaves are cut from it on the host and put on the mesh with
their shardings. Which value a leaf gets is a rule by its "/"-joined path: the model's
`init_rules()` (first match wins) over `DEFAULT_RULES`, else normal(`DEFAULT_STD`): the
initialisers the layers use (normal(0.02) kernels and embeddings, ones for norm scales,
zeros for biases, the ViT's normal(width^-1/2) class/position embeddings, CLIP's
constant logit scale). tests/models/test_fast_init.py checks every leaf of flax's own
init against the rules, so a layer whose initialiser changes fails there.

Normal leaves take consecutive slices of the draw in tree order (disjoint: independent);
the values do not depend on the mesh, on which parts `init_from` replaces (the layout is
the whole model's), or on the process. For `NativeVLM` they are bit for bit those of its
`init` (`one_draw_init`, which uses the same layout). Models without `init_rules` or with
more than `MAX_PARAMS` parameters return no plan (flax's init: no flat host copy).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_STD = 0.02
MAX_PARAMS = 1 << 24

# (regex over the "/"-joined param path, value): ("normal", std) | ("constant", value);
# std / value may be a function of the leaf's shape.
Rule = tuple[str, tuple[str, Any]]
DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|/)scale$", ("constant", 1.0)),              # RMSNorm / LayerNorm scales
    (r"(^|/)(visual_)?bias$", ("constant", 0.0)),     # Linear / LayerNorm biases
)


def path_name(path) -> str:
    """"/"-joined dict keys of a `tree_flatten_with_path` path (boxes are skipped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def strip_boxes(tree):
    """`tree` without its flax metadata boxes (`nn.Partitioned`...): the wrapped values,
    with no sharding constraint applied (`nn.unbox` applies one under a mesh: outside
    a trace, an identity program per leaf shape)."""
    from flax.core import meta

    def strip(x):
        while isinstance(x, meta.AxisMetadata):
            try:
                x = x.unbox(apply_constraint=False)   # nn.Partitioned, LogicallyPartitioned
            except TypeError:
                x = x.unbox()                          # boxes without constraints
        return x
    return jax.tree.map(strip, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def rule_for(name: str, shape: Sequence[int], rules: Sequence[Rule]) -> tuple[str, float]:
    """("normal", std) or ("constant", value) of the leaf `name` of `shape`."""
    for pattern, (kind, value) in tuple(rules) + DEFAULT_RULES:
        if re.search(pattern, name):
            return kind, float(value(tuple(shape)) if callable(value) else value)
    return "normal", DEFAULT_STD


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    kind: str          # "normal" | "constant"
    value: float       # std | constant
    offset: int        # into the draw (normal leaves)


def _standard_normals(rng, size: int):
    """The one draw both paths cut their leaves from (`Plan.draw`, `traced_values`)."""
    return jax.random.normal(rng, (max(size, 1),), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The layout of one draw over a model's params (`plan`). `draw` (jitted, rng ->
    standard normals [size] fp32) is the only program; `values` cuts and places."""
    leaves: tuple[Leaf, ...]
    treedef: Any          # of the abstract tree given (boxes kept: `traced_values`)
    plain_treedef: Any    # the same without boxes (`values`)
    size: int

    @property
    def draw(self) -> Callable:
        return jax.jit(lambda rng: _standard_normals(rng, self.size))

    def leaf_values(self, flat, full=np.full) -> list:
        """Every leaf's value (flatten order) from the standard-normal draw `flat` (numpy,
        or traced with `full=jnp.full`): slice * std in fp32 (on the host what `x * std`
        gives on device), then the leaf's dtype; constants by `full`."""
        out = []
        for leaf in self.leaves:
            if leaf.kind == "normal":
                n = int(np.prod(leaf.shape, dtype=np.int64))
                x = flat[leaf.offset:leaf.offset + n] * np.float32(leaf.value)
                out.append(x.reshape(leaf.shape).astype(leaf.dtype))
            else:
                out.append(full(leaf.shape, leaf.value, leaf.dtype))
        return out

    def values(self, flat, parts: Sequence[str] | None = None, shardings=None) -> dict:
        """The params tree (unboxed) from the draw `flat` (device or host array); with
        `parts`, only those top-level entries; with `shardings` (a tree like the result,
        or its parts), each leaf put on the mesh with its sharding, else on the default
        device."""
        host = self.leaf_values(np.asarray(jax.device_get(flat)))
        tree = jax.tree_util.tree_unflatten(self.plain_treedef, host)
        if parts is not None:
            tree = {p: tree[p] for p in parts}
        if shardings is None:
            return jax.tree.map(jnp.asarray, tree)
        if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
            return jax.device_put(tree, shardings)
        # over several processes: each process places its shards of the same host values
        # (no cross-process equality check per leaf, as device_put of host data does)
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(
            x.shape, s, lambda idx, x=x: x[idx]), tree, shardings)


def plan(model, abstract) -> Plan | None:
    """The one-draw layout of `abstract` (`jax.eval_shape` of `model.init(...)["params"]`,
    boxed or not) by the model's `init_rules()`, or None: the model has none, or more
    than MAX_PARAMS parameters."""
    if getattr(type(model), "init_rules", None) is None:
        return None
    return layout(abstract, model.init_rules())


def layout(abstract, rules: Sequence[Rule] = ()) -> Plan | None:
    """The one-draw layout of an abstract params (or variables) tree under `rules`; None
    above MAX_PARAMS parameters. The plan's tree is `abstract`'s (boxes kept)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if sum(int(np.prod(a.shape, dtype=np.int64)) for _, a in flat) > MAX_PARAMS:
        return None
    leaves, offset = [], 0
    for path, a in flat:
        name = path_name(path)
        kind, value = rule_for(name, a.shape, rules)
        leaves.append(Leaf(name, tuple(a.shape), np.dtype(a.dtype), kind, value, offset))
        if kind == "normal":
            offset += int(np.prod(a.shape, dtype=np.int64))
    plain = jax.tree.structure(strip_boxes(abstract))
    assert plain.num_leaves == len(leaves)
    return Plan(tuple(leaves), treedef, plain, offset)


def traced_values(p: Plan, rng):
    """The values of `p` inside a traced function (one draw, sliced per leaf on device):
    bit for bit `p.values(p.draw(rng))` when both programs are compiled alike (XLA's
    optimisation level changes the draw's last bits). For `Module.init` overrides
    (`NativeVLM`)."""
    # the barrier keeps XLA from folding the std into the draw's own constants: the
    # multiply rounds like the host's
    flat = jax.lax.optimization_barrier(_standard_normals(rng, p.size))
    return jax.tree_util.tree_unflatten(p.treedef, p.leaf_values(flat, jnp.full))
