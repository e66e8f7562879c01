"""Orbax checkpoints of the train state plus the Grain data-iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta[,frozen]}`. `state` is the
train-state pytree (trainable params, optimizer state, counters); `frozen` holds the
frozen params when `train.save_frozen`; `data` one JSON file per process with its
iterator state (grain's checkpoint handler); `meta` host counters (examples/tokens seen,
wall time, skipped samples). Saves are async and atomic (orbax writes a temporary
directory and renames it when complete), so a kill at any moment leaves the previous
good checkpoint. Restore takes an abstract target carrying the *current* shardings, so a
checkpoint written on one mesh restores onto another.

Kept: the newest `keep` checkpoints plus every step of `keep_steps` (never removed).

`restore_params` (init_from) keeps what it read in memory, keyed by the checkpoint's path,
step and modification time, up to VLM_JAX_INIT_FROM_CACHE_MB (default 512; 0 = off): the
runs of a grid that start from one pretrained workdir (a sweep's runs, its clean/noisy
twin) read it once per worker process.
"""
from __future__ import annotations

import json
import os
import time

import grain.python as gp
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from vlm_jax.models import layers
from vlm_jax.train import program_cache

STATE, DATA, META, FROZEN = "state", "data", "meta", "frozen"
ITEMS = (STATE, DATA, META, FROZEN)
# Linear kernels are [out..., in...] (torch layout, `layers.Linear`) since this marker was
# added to `meta`; a checkpoint without it has [in, out] kernels and must not be restored
# (square kernels would load transposed without any shape error).
KERNEL_LAYOUT = layers.KERNEL_LAYOUT


class StaleCheckpointError(ValueError):
    """A checkpoint written with the [in, out] kernel layout of an older vlm_jax."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers():
    return {STATE: ocp.StandardCheckpointHandler(), DATA: gp.PyGrainCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(), FROZEN: ocp.StandardCheckpointHandler()}


def make_manager(workdir: str, keep: int = 2, keep_steps=(), async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    policies = [ocm.LatestN(n=max(int(keep), 1))]
    if keep_steps:
        policies.append(ocm.CustomSteps(steps=[int(s) for s in keep_steps]))
    opts = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        preservation_policy=ocm.AnyPreservationPolicy(policies))
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts, item_names=ITEMS,
                                 item_handlers=_handlers())


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter=None, meta=None,
         frozen=None) -> None:
    """Starts an (async) save of `state` (+ iterator state, meta, frozen) at `step`."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[DATA] = gp.PyGrainCheckpointSave(data_iter)
    items[META] = ocp.args.JsonSave(dict(meta or {}, kernel_layout=KERNEL_LAYOUT))
    if frozen:
        items[FROZEN] = ocp.args.StandardSave(frozen)
    mgr.save(int(step), args=ocp.args.Composite(**items), force=True)


def iterator_state(data_iter) -> str:
    """The data iterator's state as the checkpoint's `data` item stores it (grain's
    handler: JSON of a DatasetIterator's state, a DataLoader iterator's bytes decoded)."""
    if isinstance(data_iter, gp.DatasetIterator):
        return json.dumps(data_iter.get_state(), indent=4)
    return data_iter.get_state().decode()


def set_iterator_state(data_iter, state: str) -> None:
    """Sets a state from `iterator_state` as restoring the `data` item does."""
    data_iter.set_state(json.loads(state) if isinstance(data_iter, gp.DatasetIterator)
                        else state.encode())
    data_iter.start_prefetch()


def tree_bytes(tree) -> int:
    """Bytes of the arrays of `tree` (global sizes)."""
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def copy_onto(tree, target):
    """Fresh device copies of the arrays of `tree` placed with the shardings of `target`
    (arrays or abstract arrays of the same structure, shapes and dtypes), bit for bit:
    what restoring a checkpoint of `tree` onto `target` gives, without the disk. Raises
    ValueError when the trees differ."""
    if jax.tree.structure(tree) != jax.tree.structure(target):
        raise ValueError("copy_onto: the trees differ in structure")
    bad = [(x.shape, x.dtype, t.shape, t.dtype) for x, t in
           zip(jax.tree.leaves(tree), jax.tree.leaves(target))
           if x.shape != t.shape or x.dtype != t.dtype]
    if bad:
        raise ValueError(f"copy_onto: shapes/dtypes differ: {bad[:3]}")
    # may_alias=False: a new buffer even where the sharding is the same (the train step
    # donates its state, which must not take the kept copy with it)
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding, may_alias=False),
                        tree, target)


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of `tree` (a restore or compile target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def restore(mgr: ocp.CheckpointManager, step: int, target_state, data_iter=None):
    """Restores `step` onto the shardings of `target_state` (arrays or abstract arrays);
    sets the iterator's state in place. Returns (state, meta dict)."""
    items = {STATE: ocp.args.StandardRestore(abstract_like(target_state))}
    if data_iter is not None:
        items[DATA] = gp.PyGrainCheckpointRestore(data_iter)
    present = _present_items(mgr, step)
    check_layout(mgr, step, present)
    items[META] = ocp.args.JsonRestore()
    try:
        out = mgr.restore(int(step), args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {mgr.directory}/{step} does not fit this run's train "
                         f"state (different model, optim.trainable or data?): {e}") from e
    meta = dict(out[META]) if out[META] is not None else {}
    meta.pop("kernel_layout", None)
    return out[STATE], meta


def check_layout(mgr, step, present=None) -> None:
    """Raises `StaleCheckpointError` unless checkpoint `step` records this version's
    kernel layout (`KERNEL_LAYOUT` in its meta)."""
    present = _present_items(mgr, step) if present is None else present
    meta = {}
    if META in present:
        meta = mgr.restore(int(step), args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))[META] or {}
    if meta.get("kernel_layout") != KERNEL_LAYOUT:
        raise StaleCheckpointError(
            f"checkpoint {mgr.directory}/{step} was written with the [in, out] kernel layout "
            f"of vlm_jax < this version (Linear kernels are now [out, in], torch's layout); "
            f"re-run the training that wrote it (or re-convert pretrained weights with "
            f"python -m vlm_jax.convert)")


def _present_items(mgr, step) -> set[str]:
    d = os.path.join(str(mgr.directory), str(int(step)))
    return {n for n in ITEMS if os.path.isdir(os.path.join(d, n))}


def _restore_host(mgr, step, item):
    meta = mgr.item_metadata(step)[item]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    return mgr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(target)}))[item]


# init_from params read by this process, VLM_JAX_INIT_FROM_CACHE_MB (see the docstring)
_params_cache = program_cache.BoundedCache("VLM_JAX_INIT_FROM_CACHE_MB", 512)


def latest_step_dir(workdir: str) -> str | None:
    """WORKDIR/checkpoints/<step> of the newest finished checkpoint (orbax's temporary
    directories of a save in progress do not count), or None; no manager is opened."""
    path = checkpoint_dir(workdir)
    try:
        steps = [int(n) for n in os.listdir(path) if n.isdigit()]
    except OSError:
        return None
    return os.path.join(path, str(max(steps))) if steps else None


def restore_params(workdir: str, subtree: str | None = None, step: int | None = None):
    """Params of another vlm_jax workdir's latest (or `step`) checkpoint, on one device.

    Returns the trainable params merged with the frozen ones if they were saved; with
    `subtree` ("vision", "llm", ...) only that top-level entry. Raises a clear error when
    the workdir has no checkpoint or the subtree is missing.
    """
    path = checkpoint_dir(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={workdir!r}: no checkpoints/ directory; "
                                f"point init_from at a finished vlm_jax workdir")
    mgr = make_manager(workdir, read_only=True)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"init_from={workdir!r}: checkpoints/ holds no checkpoint")
        step_dir = os.path.join(path, str(int(step)))
        key = (os.path.realpath(step_dir), int(step), os.stat(step_dir).st_mtime_ns)

        def load():
            from vlm_jax.train.optim import merge_params
            check_layout(mgr, step)
            state = _restore_host(mgr, step, STATE)
            frozen = (_restore_host(mgr, step, FROZEN) if FROZEN in _present_items(mgr, step)
                      else {})
            return merge_params(state["params"], frozen or {})
        params = _params_cache.get_or_load(key, load)
    finally:
        mgr.close()
    if subtree is None:
        return params
    if subtree not in params:
        raise KeyError(f"init_from={workdir!r}: its checkpoint has no {subtree!r} params "
                       f"(it has {sorted(params)}); was {subtree!r} frozen without "
                       f"train.save_frozen=True?")
    return params[subtree]


class SaveTimer:
    """Decides step- and time-based saves. `every_steps`=0 disables step saves,
    `every_secs`<=0 time saves."""

    def __init__(self, every_steps: int, every_secs: float):
        self.every_steps = int(every_steps or 0)
        self.every_secs = float(every_secs or 0)
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.every_secs > 0 and time.monotonic() - self.last >= self.every_secs

    def saved(self) -> None:
        self.last = time.monotonic()
