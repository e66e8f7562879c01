"""The training loop of one run: `run(config, workdir) -> result dict`.

Order of work (every check that can fail comes before anything is compiled or written):
validate the config and the workdir -> mesh -> model and param shardings -> params
(init, `init_from`) -> optimizer state -> restore (own checkpoint, else `branch_from`) ->
AOT-compile the steps -> loop: step, log, eval, checkpoint -> final eval, checkpoint,
`result.json`.

A run is resumable by construction: the train state, the data-iterator state and the
counters live in the checkpoint, the step is a pure function of (state, batch), and
`metrics.jsonl` is cut back to the restored step, so a run killed at any moment and
restarted with the same command ends with the same losses as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import flops as flops_lib
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import optim, prefetch, program_cache, sharding, step as step_lib

log = logging.getLogger("vlm_jax.train")

# Fields that may differ between the config a workdir was started with and a restart:
# they change how a run executes, not what it computes.
RESTART_MUTABLE = (
    "mesh", "train.progress", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.checkpoint_every_secs", "train.keep_checkpoints", "train.eval_batch_size",
    "data.num_workers", "data.num_threads", "data.prefetch", "data.shard_cache",
    "model.attention_impl",
)
# Fields added to the config schema later, with the value a workdir written before them
# behaves as: such a workdir still matches a config holding that value.
ADDED_FIELDS = {"optim.flatten": "off"}   # per-leaf optimizer state before the field


# XLA options for functions that run once (init): optimising them only costs time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The train / eval programs are compiled with FAST_COMPILE too when all their executions in
# a run do at most this many FLOPs (estimated: `flops` x steps or eval batches): measured
# on the 2-core CPU VM (docs/grid.md), FAST_COMPILE saves ~45% of a program's compile
# (4.4 CPU-s of the demo LM's train step, 11 of the ViT's) and makes its step 2.2-2.5x
# slower (+29 / +90 ms), which breaks even at ~75-95 GFLOP of steps; below 50 GFLOP it
# saves wall time. `VLM_JAX_FAST_COMPILE_MAX_FLOPS` overrides it (0: never).
FAST_COMPILE_MAX_FLOPS = 5e10


def fast_compile_max_flops() -> float:
    return float(os.environ.get("VLM_JAX_FAST_COMPILE_MAX_FLOPS", FAST_COMPILE_MAX_FLOPS))


class Phases:
    """Wall seconds by phase of a run (`result.json` "timings"): where a run's time goes
    besides its train steps (benchmarks/grid.py sums them per job kind)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in self.seconds.items()}


# Frozen init_from parts on the mesh kept across the runs of a process,
# VLM_JAX_INIT_FROM_CACHE_MB (like checkpoint.restore_params' host copies).
_FROZEN_PARTS = program_cache.BoundedCache("VLM_JAX_INIT_FROM_CACHE_MB", 512)
# Eval batches kept across the runs of a process (a grid worker), VLM_JAX_EVAL_CACHE_MB.
_EVAL_BATCHES = program_cache.BoundedCache("VLM_JAX_EVAL_CACHE_MB", 256)


# --------------------------------------------------------------------------- sweep hand-off
# Config keys in which a sweep branch may differ from the run whose setup it adopts (what
# `vlm_jax.grid.sweep` changes between its runs): none of them changes the mesh, the
# params' shapes, the frozen params, the compiled programs or the eval batches (the
# schedule is a runtime input of the train step; a smaller nested train subset needs no
# new cached features, which `_adopt_setup` checks).
SETUP_FREE = ("name", "data.n", "train.steps", "train.branch_from", "train.checkpoint_steps",
              *(f"optim.{k}" for k in optim.RUNTIME_FIELDS))
# The train-state bytes a sweep's stable run may keep in memory for its branches.
SWEEP_MEMORY_MB = 1024


class SweepMemory:
    """What the runs of one WSD sweep hand each other in this process
    (`vlm_jax.grid.sweep.run_sweep` makes one per sweep and passes it as `sweep=`).

    Branch points: at each of its `train.checkpoint_steps` the stable run keeps what that
    checkpoint holds -- a device copy of the train state (the train step donates its
    input), the data iterator's state and the meta counters as the checkpoint stores them
    (JSON) -- while the kept states total at most `limit_mb` (VLM_JAX_SWEEP_MEMORY_MB,
    default 1024; 0 = none: branches restore from disk) and live in this one process
    (multi-process runs restore from disk). The checkpoints are still written: a branch
    in another process, or after a restart, reads them.
    Setup: a run offers its mesh, model, frozen params (with attached cached features),
    train-state shardings, compiled programs and data module; a branch whose config
    differs only in `SETUP_FREE` adopts them instead of initialising its params and
    optimizer state, attaching the feature cache and looking its programs up.
    `clear()` drops everything (the sweep calls it when it ends).
    """

    def __init__(self, limit_mb: float | None = None):
        if limit_mb is None:
            limit_mb = float(os.environ.get("VLM_JAX_SWEEP_MEMORY_MB", SWEEP_MEMORY_MB))
        self.limit = int(float(limit_mb) * (1 << 20))
        self._points: dict[tuple[str, int], tuple] = {}
        self._setup = None
        self.stats = {"kept": 0, "not_kept": 0, "taken": 0, "setups_adopted": 0}

    def keep(self, workdir: str, step: int, state, data_iter, meta: dict) -> bool:
        """Keeps the branch point `step` of the run in `workdir` (False: over the limit)."""
        if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(state)):
            return False   # arrays over several processes: their checkpoint serves
        size = ckpt.tree_bytes(state)
        used = sum(ckpt.tree_bytes(p[0]) for p in self._points.values())
        if used + size > self.limit:
            self.stats["not_kept"] += 1
            log.info("sweep: the train state at step %d (%.1f MB) is not kept in memory "
                     "(VLM_JAX_SWEEP_MEMORY_MB=%.0f); its branches restore the checkpoint",
                     step, size / 2**20, self.limit / 2**20)
            return False
        copy = ckpt.copy_onto(state, state)
        it_state = None if data_iter is None else ckpt.iterator_state(data_iter)
        self._points[(os.path.abspath(workdir), int(step))] = (
            copy, it_state, json.loads(json.dumps(meta)))
        self.stats["kept"] += 1
        return True

    def take(self, workdir: str, step: int, target, data_iter):
        """(state placed like `target`, meta) of the kept branch point, the iterator set
        to its state; None when it is not kept or does not fit `target`."""
        hit = self._points.get((os.path.abspath(workdir), int(step)))
        if hit is None or (data_iter is not None) != (hit[1] is not None):
            return None
        state, it_state, meta = hit
        try:
            state = ckpt.copy_onto(state, target)
        except ValueError as e:
            log.warning("sweep: the kept state of %s:%d does not fit this run (%s); "
                        "restoring its checkpoint", workdir, step, e)
            return None
        if data_iter is not None:
            ckpt.set_iterator_state(data_iter, it_state)
        self.stats["taken"] += 1
        return state, json.loads(json.dumps(meta))

    def offer_setup(self, run: "Run", frozen, state) -> None:
        """Makes `run`'s setup (after compile) adoptable by the next runs."""
        self._setup = (setup_key(run.config), run, frozen, ckpt.abstract_like(state))

    def setup_for(self, run: "Run"):
        """(run, frozen, abstract state) of an offered setup `run` may adopt, or None."""
        if self._setup is None or self._setup[0] != setup_key(run.config):
            return None
        return self._setup[1:]

    def clear(self) -> None:
        self._points.clear()
        self._setup = None


def setup_key(config) -> str:
    """The config without `SETUP_FREE`: runs with equal keys can share one setup."""
    flat = _flat(config_to_dict(config))
    return json.dumps({k: v for k, v in flat.items() if k not in SETUP_FREE},
                      sort_keys=True, default=str)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (`train.max_nonfinite`)."""


# --------------------------------------------------------------------------- config / workdir
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _mutable(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in RESTART_MUTABLE)


def config_to_dict(config) -> dict:
    """A JSON-able dict of the resolved config (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def check_workdir(workdir: str, config) -> None:
    """Raises when `workdir` holds a run of a different config (nothing is written)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = _flat(json.load(f))
    for k, v in ADDED_FIELDS.items():
        old.setdefault(k, v)
    new = _flat(config_to_dict(config))
    diff = sorted(k for k in set(old) | set(new)
                  if not _mutable(k) and old.get(k, "<missing>") != new.get(k, "<missing>"))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}"
                          for k in diff[:8])
        raise ValueError(f"workdir {workdir!r} holds a run with a different config ({shown}"
                         f"{' ...' if len(diff) > 8 else ''}); use a new --workdir or the "
                         f"same config")


def validate(config) -> None:
    """Cheap checks of the fields the trainer reads, with the field name in the error."""
    t = config.train
    for name in ("steps", "batch_size", "grad_accum", "log_every_steps", "max_nonfinite"):
        if int(t[name]) < (0 if name == "max_nonfinite" else 1):
            raise ValueError(f"train.{name}={t[name]} must be >= 1")
    for name in ("eval_every_steps", "checkpoint_every_steps", "eval_batch_size"):
        if int(t[name]) < 0:
            raise ValueError(f"train.{name}={t[name]} must be >= 0")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                         f"train.grad_accum={t.grad_accum}")
    for s in t.get("checkpoint_steps", ()) or ():
        if not 0 < int(s) <= t.steps:
            raise ValueError(f"train.checkpoint_steps holds {s}, outside [1, train.steps="
                             f"{t.steps}]")
    optim.make_schedule(config.optim, t.steps)  # validates optim.schedule
    if t.get("branch_from"):
        parse_branch(t.branch_from)


def parse_branch(spec: str) -> tuple[str, int]:
    path, sep, step = spec.rpartition(":")
    if not sep or not path or not step.isdigit():
        raise ValueError(f"train.branch_from={spec!r}: use 'WORKDIR:STEP'")
    return path, int(step)


# --------------------------------------------------------------------------- params
def _init_batch(spec: dict) -> dict:
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items() if not k.startswith("_")}


def _is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def _check_init_from(config) -> None:
    """A local `model.<part>.init_from` that does not exist is an error before the run
    writes anything (its config.json would otherwise hold the wrong path)."""
    for part in ("vision", "llm"):
        sub = config.model.get(part)
        path = str(sub.get("init_from", "") or "") if sub is not None else ""
        if path and "://" not in path and not os.path.exists(path):
            raise FileNotFoundError(
                f"model.{part}.init_from={path!r} does not exist; point it at a vlm_jax "
                "workdir or at weights converted with `python -m vlm_jax.convert`")


def _load_init_from(part: str, path: str, part_cfg, dtype) -> dict:
    """Params of `part` from a vlm_jax workdir (its latest checkpoint) or a
    transformers/OpenCLIP/converted directory (`vlm_jax.convert.load_pretrained`, whose
    architecture must match `model.<part>`)."""
    if _is_workdir(path):
        return ckpt.restore_params(path, subtree=part)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.{part}.init_from={path!r} does not exist")
    from vlm_jax import convert
    over, params = convert.load_pretrained(part, path, dtype,
                                           scan_layers=bool(part_cfg.get("scan_layers", True)))
    bad = {k: (part_cfg[k], v) for k, v in dict(over).items()
           if k in part_cfg and not isinstance(v, dict) and k not in ("init_from", "scan_layers",
                                                                    "remat")
           and _plain(part_cfg[k]) != _plain(v)}
    if bad:
        raise ValueError(f"model.{part}.init_from={path!r} is a different architecture: "
                         + ", ".join(f"model.{part}.{k}={a!r} but the checkpoint has {b!r}"
                                     for k, (a, b) in sorted(bad.items())))
    return params


def _plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    return list(v) if isinstance(v, tuple) else v


def _graft(want, part: str, loaded: dict, source: str) -> dict:
    """`loaded` placed like `want` (params[part], arrays or abstract arrays with shardings),
    checking that the trees and shapes match."""
    fw = optim.traverse_util.flatten_dict(want, sep="/")
    fl = optim.traverse_util.flatten_dict(loaded, sep="/")
    missing, extra = sorted(set(fw) - set(fl)), sorted(set(fl) - set(fw))
    bad = [k for k in fw if k in fl and tuple(np.shape(fl[k])) != tuple(fw[k].shape)]
    if missing or extra or bad:
        raise ValueError(
            f"model.{part}.init_from={source!r} does not match model.{part}: missing "
            f"{missing[:5]}, unexpected {extra[:5]}, shape mismatch "
            f"{[(k, np.shape(fl[k]), fw[k].shape) for k in bad[:5]]}; check the size config")
    new = {k: jax.device_put(np.asarray(fl[k]).astype(fw[k].dtype), fw[k].sharding)
           for k in fw}
    return optim.traverse_util.unflatten_dict(new, sep="/")


# --------------------------------------------------------------------------- data
def default_data():
    from vlm_jax.data import pipeline
    return pipeline


def _skipped_counts(batch: dict, acc: dict) -> None:
    for k, v in batch.items():
        if k.startswith("_skipped/"):
            acc[k[len("_skipped/"):]] = int(np.max(np.asarray(v)))  # cumulative counts


# --------------------------------------------------------------------------- signals
class _StopFlag:
    """Set by SIGTERM (preemption); the loop then saves and exits cleanly."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping")
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _any_process(flags: list[bool]) -> list[bool]:
    """Element-wise OR of host flags over processes (so all processes agree)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils
    g = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return [bool(x) for x in np.asarray(g).reshape(-1, len(flags)).max(0)]


# --------------------------------------------------------------------------- the run
class Run:
    """One training run; `Run(config, workdir).train()` does the work. Built in steps so
    tests and benchmarks can use its pieces (mesh, params, compiled steps)."""

    def __init__(self, config, workdir: str, *, model=None, batch_spec=None, data=None,
                 devices=None, sweep: SweepMemory | None = None):
        self.config = config
        self.sweep = sweep   # the in-process hand-off of a WSD sweep's runs, or None
        self.workdir = os.path.abspath(workdir)
        self.data = data or default_data()
        self._own_data = data is None   # the pipeline of the config (eval batches shareable)
        self.pi, self.pc = jax.process_index(), jax.process_count()
        self.is_main = self.pi == 0
        validate(config)
        check_workdir(self.workdir, config)
        _check_init_from(config)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        sharding.check_batch(config.train.batch_size, self.mesh, self.pc)
        sharding.check_batch(config.train.batch_size // config.train.grad_accum, self.mesh, 1,
                             "train.batch_size / train.grad_accum")
        self.eval_bs = int(config.train.eval_batch_size or config.train.batch_size)
        sharding.check_batch(self.eval_bs, self.mesh, self.pc, "train.eval_batch_size")
        self.rules = sharding.flax_rules(self.mesh)
        # Compiled programs are shared in-process only for models built from the config
        # (program_cache); a model or batch_spec passed in is not described by the config.
        self._share_programs = model is None and batch_spec is None
        self._key_base = None
        if model is None:
            from vlm_jax.models import build_model
            model = build_model(config.model)
        self.model = model
        if batch_spec is None:
            from vlm_jax.models import batch_spec
        self.batch_spec = batch_spec(config, config.train.batch_size)
        self.eval_spec = batch_spec(config, self.eval_bs)
        self.phases = Phases()

    # -- context for tracing: mesh + logical rules for activation constraints
    def ctx(self):
        mesh, rules = self.mesh, self.rules

        class _Ctx:
            def __enter__(s):
                s.a = jax.set_mesh(mesh)
                s.a.__enter__()
                s.b = nn.logical_axis_rules(rules)
                s.b.__enter__()

            def __exit__(s, *e):
                s.b.__exit__(*e)
                s.a.__exit__(*e)
        return _Ctx()

    def _program_key(self, what: str, *args) -> str | None:
        """program_cache key of a program of this run: everything that decides it."""
        if not self._share_programs:
            return None
        if self._key_base is None:   # the run's part of every key, built once
            model = config_to_dict(self.config.model)
            for part in model.values():
                if isinstance(part, dict):
                    part.pop("init_from", None)
            opt = {k: v for k, v in config_to_dict(self.config.optim).items()
                   if k not in optim.RUNTIME_FIELDS}
            self._key_base = [model, opt, int(self.config.train.grad_accum),
                              list(self.mesh.device_ids.flat), list(self.mesh.axis_names),
                              list(self.mesh.devices.shape), str(self.rules)]
        return program_cache.make_key(what, *self._key_base,
                                      [program_cache.signature(a) for a in args])

    # -- params
    def init_params(self):
        """(trainable, frozen) params on the mesh, with init_from applied."""
        cfg = self.config
        spec = self.batch_spec

        def init(rng):
            return self.model.init(rng, _init_batch(spec), deterministic=True)["params"]

        rng = jax.random.PRNGKey(int(cfg.train.seed))
        with self.ctx(), self.phases("init"):
            # the abstract params (shapes, logical axes) are kept like the programs: tracing
            # the model for them costs as much as a tiny run's steps
            boxed = program_cache.get_or_build(self._program_key("init_shapes", rng, spec),
                                               lambda: jax.eval_shape(init, rng), count=False)
            shard = nn.unbox(sharding.tree_shardings(boxed, self.mesh))
            # Parts that init_from replaces are not initialised: the program returns only
            # the others, so XLA drops their random-number generation (most of a frozen
            # ViT + LLM's init program); the loaded arrays take their place.
            loaded = [p for p in self._init_from_parts() if p in boxed]
            keep = [p for p in boxed if p not in loaded]
            # Small models with init rules (vlm_jax.models.fast_init): one random draw (a
            # 10-kernel program) cut into the kept parts' leaves on the host, not an init
            # program of ~10 kernels per parameter (0.2-0.9 CPU-s a run to load).
            from vlm_jax.models import fast_init
            plan = fast_init.plan(self.model, boxed) if keep else None
            if plan is not None:
                draw = program_cache.get_or_build(
                    self._program_key("init_draw", rng, plan.size),
                    lambda: plan.draw.lower(rng).compile(FAST_COMPILE))
                params = plan.values(draw(rng), keep, {p: shard[p] for p in keep})
            else:
                # Runs once: compile it fast (XLA's optimisations cost seconds, save nothing).
                init_fn = program_cache.get_or_build(
                    self._program_key("init", rng, spec, boxed, keep),
                    lambda: jax.jit(lambda r: {p: v for p, v in nn.unbox(init(r)).items()
                                               if p in keep},
                                    out_shardings={p: shard[p] for p in keep}).lower(
                        rng).compile(FAST_COMPILE)) if keep else (lambda _: {})
                params = init_fn(rng)
            params = dict(jax.block_until_ready(params))
        abstract = {p: jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                       sharding=sh),
                                    nn.unbox(boxed[p]), shard[p]) for p in loaded}
        with self.phases("init_from"):
            for part in loaded:
                params[part] = self._load_part(part, abstract[part])
            params = {p: params[p] for p in boxed}   # the model's order
        trainable, frozen = optim.split_params(params, cfg.optim.trainable)
        fdt = jnp.dtype(cfg.model.get("frozen_dtype", "float32"))
        if frozen and fdt != jnp.float32:
            frozen = jax.jit(lambda t: optim.cast_tree(t, fdt),
                             out_shardings=jax.tree.map(lambda x: x.sharding, frozen))(frozen)
        self.components = sorted(params)
        self.trainable_components = sorted(trainable)
        self.param_counts = {k: optim.count_params(v) for k, v in params.items()}
        self.param_counts["total"] = sum(self.param_counts.values())
        self.param_counts["trainable"] = optim.count_params(trainable)
        return trainable, frozen

    def _init_from_parts(self) -> list[str]:
        """The model parts whose params come from model.<part>.init_from."""
        return [p for p in ("vision", "llm")
                if self.config.model.get(p) is not None
                and self.config.model[p].get("init_from", "")]

    def _load_part(self, part: str, like) -> dict:
        """Params of `part` from model.<part>.init_from (a vlm_jax workdir or a pretrained
        directory), checked against and placed like `like` (abstract arrays with
        shardings)."""
        sub = self.config.model[part]
        src = sub.init_from
        pdt = jax.tree.leaves(like)[0].dtype

        def load():
            loaded = _load_init_from(part, src, sub, pdt)
            if part == "llm":  # NaViL: missing visual experts start as the text weights
                from vlm_jax.models.experts import fill_visual_experts
                loaded = fill_visual_experts(loaded, like)
            return _graft(like, part, loaded, src)
        # A frozen part is never donated (the train step donates only the train state), so
        # its arrays on the mesh can serve the next run of this process from the same
        # checkpoint (a sweep's runs, the runs of one pretrained encoder); a trainable one
        # is rebuilt every time.
        pats = optim._patterns(self.config.optim.trainable)
        flat = optim.traverse_util.flatten_dict(like, sep="/")
        if not _is_workdir(src) or any(optim.is_trainable(f"{part}/{k}", pats) for k in flat):
            return load()
        step_dir = ckpt.latest_step_dir(src)
        if step_dir is None:
            return load()
        key = json.dumps([os.path.realpath(step_dir), os.stat(step_dir).st_mtime_ns, part,
                          [int(d) for d in self.mesh.device_ids.flat],
                          [(k, str(v.dtype), list(v.shape), str(v.sharding))
                           for k, v in sorted(flat.items())]])
        return _FROZEN_PARTS.get_or_load(key, load)

    def init_state(self, trainable):
        cfg = self.config
        # flat: AdamW over one vector of the trainable leaves (optim.flat_transform)
        self.flat_optimizer = optim.use_flat(cfg.optim, trainable)
        self._make_optimizer()
        p_sh = jax.tree.map(lambda x: x.sharding, trainable)
        abstract_opt = jax.eval_shape(self.tx.init, trainable)
        repl = sharding.replicated(self.mesh)
        if self.flat_optimizer:   # vectors: replicated like the params they stand for
            opt_sh = jax.tree.map(lambda _: repl, abstract_opt)
        else:
            opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, p_sh,
                                           transform_non_params=lambda _: repl)
        self.state_shardings = dict(step=repl, params=p_sh, opt_state=opt_sh, nonfinite=repl,
                                    skipped=repl)
        # runs once per run: compiled fast, and kept / serialized like the other programs
        init = program_cache.get_or_build(
            self._program_key("opt_init", trainable, self.flat_optimizer),
            lambda: jax.jit(lambda p: step_lib.init_state(p, self.tx),
                            out_shardings=self.state_shardings).lower(
                ckpt.abstract_like(trainable)).compile(FAST_COMPILE))
        return init(trainable)

    def _make_optimizer(self) -> None:
        """This run's optimizer and schedule numbers (its own steps, lr, schedule): the
        schedule is a runtime input of the compiled step (`_bind_schedule`)."""
        cfg = self.config
        self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.steps,
                                                      runtime_lr=True,
                                                      flat=self.flat_optimizer)
        self.schedule_hp = optim.schedule_params(cfg.optim, cfg.train.steps)

    def _bind_schedule(self, compiled) -> "_WithSchedule":
        """The compiled train step with this run's schedule numbers on the mesh."""
        return _WithSchedule(compiled, jax.device_put(self.schedule_hp,
                                                      sharding.replicated(self.mesh)))

    # -- a sweep's shared setup
    # What a run's setup leaves on it (init_params, feature_cache.attach, init_state,
    # compile) and a branch takes over from the run whose setup it adopts.
    _ADOPTED = ("mesh", "rules", "model", "data", "batch_spec", "eval_spec",
                "feature_cache_info", "components", "trainable_components", "param_counts",
                "flat_optimizer", "state_shardings", "eval_step", "compile_levels",
                "_key_base")

    def _adopt_setup(self):
        """(frozen, abstract train state) of the setup a branch of a sweep adopts
        (`SweepMemory`), or None: this run sets itself up. Only a branch (it restores its
        state, never initialises it) whose config differs from the offering run's only in
        `SETUP_FREE`, on the same mesh, with its model and data from the config, and (with
        the feature cache) whose records are all in the store."""
        t = self.config.train
        if self.sweep is None or not t.get("branch_from") or not (
                self._share_programs and self._own_data):
            return None
        found = self.sweep.setup_for(self)
        if found is None:
            return None
        src, frozen, abstract = found
        if src.mesh != self.mesh or not src._share_programs or not src._own_data:
            return None
        if t.get("feature_cache", False):
            from vlm_jax.train import feature_cache
            store = getattr(src.data, "store", None)
            if store is None or len(store.missing(feature_cache.needed_records(self.config))):
                return None
        for name in self._ADOPTED:
            if hasattr(src, name):
                value = getattr(src, name)
                setattr(self, name, dict(value) if type(value) is dict else value)
        if self.config.model.get("kind") != "native" and hasattr(src, "_eval_key_value"):
            # the eval key has the source's record count in place of data.n: equal
            self._eval_key_value = src._eval_key_value
        self._make_optimizer()
        self.train_step = self._bind_schedule(src.train_step.compiled)
        self.sweep.stats["setups_adopted"] += 1
        return frozen, abstract

    # -- compiled steps
    def _abstract_batch(self, spec):
        return {k: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                        sharding=sharding.batch_sharding(self.mesh, len(s.shape)))
                for k, s in spec.items() if not k.startswith("_")}

    def _executions(self) -> tuple[int, int | None]:
        """(train steps, eval batches) this invocation runs, estimated from the config
        (None: not known, e.g. eval_n="all")."""
        t = self.config.train
        steps = int(t.steps) - (parse_branch(t.branch_from)[1] if t.get("branch_from") else 0)
        try:
            eval_n = int(self.config.data.get("eval_n", 0) or 0)
        except (TypeError, ValueError):
            return steps, None
        evals = (steps // int(t.eval_every_steps) if int(t.eval_every_steps) else 0) + 1
        return steps, evals * math.ceil(eval_n / self.eval_bs)

    def _compile_level(self, what: str, executions: int | None) -> str:
        """"fast" (FAST_COMPILE) when the program's work in this run is too small to win
        back the compile seconds XLA's optimisations cost, else "full"."""
        if executions is None:
            return "full"
        per = (flops_lib.train_per_example(self.config, self.trainable_components)
               if what == "train" else flops_lib.eval_per_example(self.config))
        bs = self.config.train.batch_size if what == "train" else self.eval_bs
        work = per * bs * max(executions, 0)
        return "fast" if 0 < work <= fast_compile_max_flops() else "full"

    def _compiled(self, what: str, key_args: tuple, lower: Callable, level: str):
        """The compiled program `what`: one already built at either level (memory or
        disk: a sweep's branches take the stable run's), else `lower()` compiled at
        `level`. Records the level used in `self.compile_levels`."""
        keys = {lv: self._program_key(what, *key_args, lv) for lv in ("full", "fast")}
        for lv in (level, "fast" if level == "full" else "full"):
            hit = program_cache.lookup(keys[lv])
            if hit is not None:
                self.compile_levels[what] = lv
                return hit
        self.compile_levels[what] = level
        return program_cache.get_or_build(
            keys[level], lambda: lower().compile(FAST_COMPILE if level == "fast" else None))

    def compile(self, state, frozen, with_eval: bool = True):
        cfg = self.config
        self.compile_levels = {}
        n_steps, n_eval = self._executions()
        fn = step_lib.make_train_step(self.model, self.tx, self.schedule,
                                      int(cfg.train.grad_accum))
        f_sh = jax.tree.map(lambda x: x.sharding, frozen)
        b_train = self._abstract_batch(self.batch_spec)
        b_eval = self._abstract_batch(self.eval_spec)
        repl = sharding.replicated(self.mesh)
        hp = jax.device_put(self.schedule_hp, repl)
        with self.ctx():
            jitted = jax.jit(fn, in_shardings=(self.state_shardings, f_sh,
                                               {k: v.sharding for k, v in b_train.items()},
                                               repl),
                             out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
            compiled = self._compiled(
                "train", (state, frozen, b_train, hp),
                lambda: jitted.lower(ckpt.abstract_like(state), ckpt.abstract_like(frozen),
                                     b_train, ckpt.abstract_like(hp)),
                self._compile_level("train", n_steps))
            # The schedule is an input, so runs that differ only in steps/lr share this
            # program (and the persistent compilation cache entry).
            self.train_step = self._bind_schedule(compiled)
            if not with_eval:
                return self.train_step, None
            ev = jax.jit(step_lib.make_eval_step(self.model),
                         in_shardings=(self.state_shardings["params"], f_sh,
                                       {k: v.sharding for k, v in b_eval.items()}),
                         out_shardings=repl)
            self.eval_step = self._compiled(
                "eval", (state["params"], frozen, b_eval),
                lambda: ev.lower(ckpt.abstract_like(state["params"]),
                                 ckpt.abstract_like(frozen), b_eval),
                self._compile_level("eval", n_eval))
        return self.train_step, self.eval_step

    # -- eval
    def _eval_key(self) -> str | None:
        """What decides this run's eval batches (on its mesh), or None when they may not be
        shared: the data config (not its train subset's size), the model config without
        `init_from` (weights never change a batch; cached features are identified by the
        feature store's key), the seed, the eval batch size, the processes and the mesh.
        Built at the run's first eval (after the feature store is set up) and kept: it
        opens the data source to count its records."""
        if not hasattr(self, "_eval_key_value"):
            self._eval_key_value = self._build_eval_key()
        return self._eval_key_value

    def _build_eval_key(self) -> str | None:
        if not (self._own_data and self._share_programs):
            return None
        model = config_to_dict(self.config.model)
        for part in model.values():
            if isinstance(part, dict):
                part.pop("init_from", None)
        fc = getattr(self, "feature_cache_info", None) or {}
        data = config_to_dict(self.config.data)
        if self.config.model.get("kind") != "native":
            # the eval records are the first eval_n of the source's permutation whatever
            # the train subset's size (data.n): only the source's record count matters
            from vlm_jax.data import pipeline
            data["n"] = f"source of {pipeline.split_for(self.config).total} records"
        return json.dumps([data, model,
                           int(self.config.train.seed), self.eval_bs, self.pi, self.pc,
                           list(self.mesh.device_ids.flat), list(self.mesh.axis_names),
                           fc.get("key", "")], sort_keys=True, default=str)

    def eval_batches(self) -> list[dict]:
        """The eval split as global batches on the mesh; kept in memory (`_EVAL_BATCHES`)
        for the next run of this process with the same `_eval_key` (a sweep's runs, the
        runs of one data set and model): built once per worker, not once per eval."""
        def build():
            return [sharding.global_batch(local, self.mesh)
                    for local in self.data.eval_batches(self.config, self.pi, self.pc)]
        key = self._eval_key()
        return build() if key is None else _EVAL_BATCHES.get_or_load(key, build)

    def evaluate(self, params, frozen) -> dict:
        sums, counts = [], []
        for gb in self.eval_batches():
            out = jax.device_get(self.eval_step(params, frozen, gb))
            sums.append(float(out["loss_sum"]))
            counts.append(float(out["num_tokens"]))
        return {"eval/loss": metrics_lib.token_mean(sums, counts),
                "eval/tokens": float(sum(counts))}

    def _logged_final(self, step, frozen, state):
        """(train loss, eval metrics) of the last step from metrics.jsonl (re-evaluated
        when the line is missing)."""
        rec = {}
        path = os.path.join(self.workdir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    if r.get("step") == step:
                        rec = r
        ev = ({"eval/loss": rec["eval/loss"]} if "eval/loss" in rec
              else self.evaluate(state["params"], frozen))
        return float(rec.get("train/loss", float("nan"))), ev

    def _restore(self, mgr, state, it, meta):
        """(start step, state, meta): from this run's latest checkpoint, else from
        `train.branch_from` (WORKDIR:STEP of another run), else the fresh state at 0."""
        t = self.config.train
        start = mgr.latest_step()
        if start is not None:
            state, meta = ckpt.restore(mgr, start, state, it)
            log.info("resumed from step %d of %s", start, self.workdir)
        elif t.get("branch_from"):
            src, bstep = parse_branch(t.branch_from)
            kept = self.sweep.take(src, bstep, state, it) if self.sweep else None
            if kept is not None:   # the sweep's stable run kept it in this process
                state, meta = kept
                meta["branched_from"] = t.branch_from
                log.info("branched from step %d of %s (kept in memory)", bstep, src)
                return bstep, state, meta
            other = ckpt.make_manager(src, 1, read_only=True)
            if bstep not in other.all_steps():
                raise ValueError(f"train.branch_from={t.branch_from!r}: {src} has no "
                                 f"checkpoint at step {bstep} (has {sorted(other.all_steps())})"
                                 f"; list it in that run's train.checkpoint_steps")
            state, meta = ckpt.restore(other, bstep, state, it)
            other.close()
            meta["branched_from"] = t.branch_from
            start = bstep
        else:
            start = 0
        return int(start), state, meta

    # -- the loop
    def train(self) -> dict:
        cfg, t = self.config, self.config.train
        total = int(t.steps)
        result_path = os.path.join(self.workdir, "result.json")
        if self.is_main:
            os.makedirs(self.workdir, exist_ok=True)
            metrics_lib.atomic_write_json(os.path.join(self.workdir, "config.json"),
                                          config_to_dict(cfg))
        ph = self.phases
        with ph("adopt"):
            adopted = self._adopt_setup()
        if adopted is not None:   # a sweep's branch: the stable run's setup
            frozen, state = adopted   # state: abstract (restored below)
        else:
            trainable, frozen = self.init_params()
            if t.get("feature_cache", False):  # frozen encoder: features computed once
                from vlm_jax.train import feature_cache
                with ph("feature_cache"):
                    frozen = feature_cache.attach(self, frozen)
            with ph("opt_init"):
                state = self.init_state(trainable)
            del trainable
            with ph("compile"):
                self.compile(state, frozen)
            if self.sweep is not None and self._share_programs and self._own_data:
                self.sweep.offer_setup(self, frozen, state)
        self.flops_per_example = flops_lib.train_per_example(cfg, self.trainable_components)

        with ph("data_start"):
            it = self.data.train_iterator(cfg, self.pi, self.pc)
        keep_steps = tuple(int(s) for s in (t.get("checkpoint_steps", ()) or ()))
        meta = dict(examples_seen=0, tokens_seen=0, wall_time_s=0.0, skipped={})
        with ph("restore"):
            mgr = ckpt.make_manager(self.workdir, t.keep_checkpoints, keep_steps=keep_steps)
            start, state, meta = self._restore(mgr, state, it, meta)
        # the next batch is read and put on the mesh while the current step runs; its
        # state (what checkpoints save) is the one after the last batch taken
        it = prefetch.DevicePrefetch(it, lambda local: sharding.global_batch(local, self.mesh))
        save_frozen = bool(t.get("save_frozen", False))
        if start > total:
            raise ValueError(f"train.steps={total} is below the checkpointed step {start}")
        if os.path.exists(result_path) and start == total:
            with open(result_path) as f:
                done = json.load(f)
            if done.get("status") == "done":
                mgr.close()
                return done

        writers = metrics_lib.Writers(self.workdir, total, start, self.is_main,
                                      progress=bool(t.progress))
        timer = ckpt.SaveTimer(t.checkpoint_every_steps, t.checkpoint_every_secs)
        eval_every = int(t.eval_every_steps)
        log_every = int(t.log_every_steps)
        last_loss = float("nan")
        last_eval = None
        n_dev = self.mesh.size
        kind = jax.devices()[0].device_kind
        t_wall0 = time.time()
        wall0 = float(meta.get("wall_time_s", 0.0))
        skipped = dict(meta.get("skipped", {}))
        images = any(k in self.batch_spec for k in ("pixels", "features", "patches"))
        window_t, window_n, window_tok, window_ex = time.time(), 0, 0, 0
        step = start
        stopped = False

        def save(s, force_wait=False):
            meta_now = dict(meta, wall_time_s=wall0 + time.time() - t_wall0, skipped=skipped)
            with ph("checkpoint"):
                ckpt.save(mgr, s, state, it, meta_now, frozen if save_frozen else None)
                timer.saved()
                if self.sweep is not None and s in keep_steps:   # a branch point
                    self.sweep.keep(self.workdir, s, state, it, meta_now)
                if force_wait:
                    mgr.wait_until_finished()

        try:
            with _StopFlag() as stop:
                while step < total:
                    t_data = time.perf_counter()
                    local, gb = next(it)
                    _skipped_counts(local, skipped)
                    t_step = time.perf_counter()
                    state, m = self.train_step(state, frozen, gb)
                    m = jax.device_get(m)
                    ph.add("data", t_step - t_data)
                    ph.add("steps", time.perf_counter() - t_step)
                    step += 1
                    ntok = int(m["input_tokens"])  # non-padding tokens of the global batch
                    # examples: the samples of the batch (a packed row holds several);
                    # rows: what the step ran, for the FLOPs (a checkpoint from before
                    # rows_seen counted rows as examples)
                    meta["rows_seen"] = _rows_seen(meta) + int(t.batch_size)
                    meta["examples_seen"] += int(m["examples"])
                    meta["tokens_seen"] += ntok
                    window_n += 1
                    window_ex += int(m["examples"])
                    window_tok += ntok
                    writers.console.update(1, {"loss": float(m["loss"])})
                    if not bool(m["finite"]):
                        log.warning("step %d: non-finite loss/gradient, update skipped "
                                    "(%d in a row)", step, int(m["nonfinite"]))
                        if int(m["nonfinite"]) >= int(t.max_nonfinite) > 0:
                            mgr.wait_until_finished()
                            raise NonFiniteError(
                                f"{int(m['nonfinite'])} consecutive non-finite steps at step "
                                f"{step} (train.max_nonfinite={t.max_nonfinite}); the last "
                                f"good checkpoint (step {mgr.latest_step()}) is kept. Lower "
                                f"optim.lr or check the data")
                    else:
                        last_loss = float(m["loss"])
                    scalars = {}
                    if step % log_every == 0 or step == total:
                        dt = (time.time() - window_t) / max(window_n, 1)
                        scalars.update({
                            "train/loss": float(m["loss"]),
                            "train/grad_norm": float(m["grad_norm"]),
                            "train/lr": float(m["lr"]),
                            "train/skipped_steps": int(m["skipped"]),
                            "perf/step_time_s": dt,
                            "perf/examples_per_sec": window_ex / window_n / dt,
                            "perf/tokens_per_sec": window_tok / window_n / dt,
                            "examples_seen": meta["examples_seen"],
                        })
                        if "_epoch" in local:
                            scalars["data/epoch"] = float(np.asarray(local["_epoch"]))
                        for k, v in m.items():
                            if k not in ("loss", "loss_sum", "num_tokens", "grad_norm", "lr",
                                         "finite", "nonfinite", "skipped", "input_tokens",
                                         "examples") \
                                    and np.ndim(v) == 0:
                                scalars[f"train/{k}"] = float(v)
                        u = metrics_lib.mfu(self.flops_per_example * t.batch_size, dt, n_dev,
                                            kind)
                        if u is not None:
                            scalars["perf/mfu"] = u
                        window_t, window_n, window_tok, window_ex = time.time(), 0, 0, 0
                    if (eval_every and step % eval_every == 0) or step == total:
                        with ph("eval"):
                            last_eval = self.evaluate(state["params"], frozen)
                        scalars.update(last_eval)
                        window_t = time.time()  # eval time is not step time
                    if scalars:
                        writers.write(step, scalars)
                    stop_now, time_due = _any_process([stop.set, timer.due(step)])
                    if step == total:
                        break
                    if int(m["nonfinite"]) and not stop_now:
                        continue  # never checkpoint inside a non-finite streak
                    if stop_now or time_due or step in keep_steps:
                        save(step, force_wait=stop_now)
                    if stop_now:
                        stopped = True
                        break
            if stopped:
                log.warning("stopped by SIGTERM at step %d; restart the same command to "
                            "resume", step)
                return {"status": "preempted", "steps": step}
            if mgr.latest_step() != step:
                save(step, force_wait=True)
            if step == start:  # killed after the final save, before result.json
                last_loss, last_eval = self._logged_final(step, frozen, state)
        finally:
            it.close()
            with ph("checkpoint"):
                writers.close()
                mgr.wait_until_finished()
                mgr.close()

        result = {
            "status": "done",
            "steps": step,
            "final/train_loss": last_loss,
            "final/eval_loss": last_eval["eval/loss"] if last_eval else None,
            **{f"params/{k}": v for k, v in self.param_counts.items()},
            "examples_seen": meta["examples_seen"],
            "images_seen": meta["examples_seen"] if images else 0,
            "tokens_seen": meta["tokens_seen"],
            "flops": self.flops_per_example * _rows_seen(meta),
            "wall_time_s": wall0 + time.time() - t_wall0,
            "data/skipped": skipped,
            "config_name": cfg.get("name", ""),
            "timings": ph.rounded(),   # this invocation's seconds by phase (Phases)
            "compile_levels": dict(self.compile_levels),  # program -> "full" | "fast"
        }
        if meta.get("branched_from"):
            result["branched_from"] = meta["branched_from"]
        if self.is_main:
            metrics_lib.atomic_write_json(result_path, result)
        return result


def _rows_seen(meta: dict) -> int:
    """Batch rows trained so far (a checkpoint from before `rows_seen` counted rows as
    examples)."""
    return int(meta.get("rows_seen", meta["examples_seen"]))


class _WithSchedule:
    """The compiled train step with this run's schedule numbers bound:
    `step(state, frozen, batch)`; other attributes (cost_analysis, memory_analysis, ...)
    are the compiled executable's."""

    def __init__(self, compiled, hp):
        self.compiled, self.hp = compiled, hp

    def __call__(self, state, frozen, batch):
        return self.compiled(state, frozen, batch, self.hp)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


def run(config, workdir: str, **kw) -> dict:
    """Trains one run in this process and returns its result dict (also `result.json`)."""
    return Run(config, workdir, **kw).train()
