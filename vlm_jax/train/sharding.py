"""Device mesh and the one table of logical-axis rules (MaxText style).

Mesh axes are ("data", "fsdp", "tensor"). Every parameter and the few constrained
activations carry logical axis names (`vlm_jax.models.layers.AXES`); `LOGICAL_RULES`
maps each name to mesh axes. A parameter dimension that the chosen mesh axes do not
divide is replicated instead (tiny test models have odd sizes), so any model runs on any
mesh. Batches are split over data x fsdp.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis / axes / None (replicated). The only sharding table.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def resolve_shape(shape: Sequence[int], num_devices: int, what: str = "mesh.shape") -> tuple[int, ...]:
    """Replaces a single -1 by the devices left over; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{what}={shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what}={shape}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{what}={shape}: {num_devices} devices are not divisible by "
                             f"{known}; change {what}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"{what}={shape} needs {math.prod(shape)} devices but "
                         f"{num_devices} are available; change {what} (-1 = the rest)")
    return shape


def mesh_shapes(mesh_cfg, num_devices: int, num_slices: int = 1):
    """(ici_shape, dcn_shape) for `mesh_cfg` (fields `shape`, `dcn_shape`)."""
    dcn = resolve_shape(getattr(mesh_cfg, "dcn_shape", (1, 1, 1)), num_slices, "mesh.dcn_shape")
    ici = resolve_shape(mesh_cfg.shape, num_devices // num_slices, "mesh.shape")
    return ici, dcn


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh: ICI shape x DCN shape (multi-slice).

    Raises a clear ValueError when the mesh does not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    n_slices = len(slices)
    ici, dcn = mesh_shapes(mesh_cfg, len(devices), n_slices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if n_slices > 1 or math.prod(dcn) > 1:
        from jax.experimental import mesh_utils
        dev = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        return jax.sharding.Mesh(dev, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def _rule(name):
    for k, v in LOGICAL_RULES:
        if k == name:
            return v
    return None


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh) -> P:
    """Maps logical axis names of an array of `shape` to a mesh PartitionSpec.

    A dimension whose size the mesh axes do not divide, or whose mesh axes are already
    used by an earlier dimension, is replicated.
    """
    if names is None:
        return P()
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        rule = _rule(name) if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or size % n:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_names(boxed_tree) -> Any:
    """Logical axis names of every leaf of a (possibly boxed) param tree (None if unboxed)."""
    return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else None,
                        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(boxed_abstract_tree, mesh) -> Any:
    """NamedShardings for a boxed abstract param tree (from jax.eval_shape of init)."""
    def one(x):
        if isinstance(x, nn.Partitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, boxed_abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def flax_rules(mesh) -> tuple:
    """The rules in flax's `nn.logical_axis_rules` form, for activation constraints."""
    out = []
    for k, v in LOGICAL_RULES:
        if v is None:
            out.append((k, None))
        else:
            axes = (v,) if isinstance(v, str) else tuple(v)
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            out.append((k, axes if axes else None))
    return tuple(out)


def global_batch(local: dict, mesh) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over data x fsdp.

    Metadata keys (starting with "_") are dropped. In one process the local batch is the
    global one: all arrays go to the devices in one batched `device_put` (a call per
    array cost ~0.4 ms each, most of a small model's data time per step).
    """
    arrays = {k: np.asarray(v) for k, v in local.items() if not k.startswith("_")}
    shardings = {k: batch_sharding(mesh, v.ndim) for k, v in arrays.items()}
    if jax.process_count() == 1:
        return jax.device_put(arrays, shardings)
    return {k: jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in arrays.items()}


def check_batch(batch_size: int, mesh, process_count: int, what: str = "train.batch_size"):
    """Clear error when the global batch does not split over processes / data-parallel size."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(f"{what}={batch_size} is not divisible by the data-parallel size "
                         f"{dp} (mesh data x fsdp = {mesh.shape['data']} x "
                         f"{mesh.shape['fsdp']}); change {what} or mesh.shape")
    if batch_size % process_count:
        raise ValueError(f"{what}={batch_size} is not divisible by the {process_count} "
                         f"processes; change {what}")
