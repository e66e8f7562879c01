"""Optimizer, learning-rate schedules and freeze masks.

Freezing works by splitting the param tree into a trainable and a frozen part
(`split_params`): the optimizer only ever sees the trainable part, so frozen params have
no optimizer state, no weight gradients are computed for them (jax.grad is taken w.r.t.
the trainable part only) and they stay bit-identical.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util


# --------------------------------------------------------------------------- schedules
def warmup_steps(optim_cfg, total_steps: int) -> int:
    if optim_cfg.warmup_steps:
        return int(optim_cfg.warmup_steps)
    return int(round(optim_cfg.warmup_frac * total_steps))


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then cosine | linear | constant | wsd (warmup-stable-decay).

    wsd: constant after warmup, then a decay to min_lr over the last `decay_frac` steps,
    of `decay_shape` "linear" or "1-sqrt" (lr x (1 - sqrt(x)) at fraction x of the decay:
    Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations", where it matches a cosine run with a shorter decay than linear does).
    """
    lr = float(optim_cfg.lr)
    end = lr * float(optim_cfg.min_lr_ratio)
    total = max(int(total_steps), 1)
    warm = min(warmup_steps(optim_cfg, total), total)
    rest = max(total - warm, 1)
    kind = optim_cfg.schedule
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, rest)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "wsd":
        decay = max(int(round(float(optim_cfg.decay_frac) * total)), 1)
        stable = max(rest - decay, 0)
        shape = decay_shape(optim_cfg)
        tail = optax.linear_schedule(lr, end, decay) if shape == "linear" else \
            (lambda n: lr + (end - lr) * jnp.sqrt(jnp.clip(n, 0, decay) / decay))
        main = optax.join_schedules([optax.constant_schedule(lr), tail], [stable])
    else:
        raise ValueError(f"optim.schedule={kind!r}: use cosine, linear, constant or wsd")
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


_KINDS = ("cosine", "linear", "constant", "wsd")
_WSD_1_SQRT = len(_KINDS)   # the schedule code of wsd with the 1-sqrt decay
DECAY_SHAPES = ("linear", "1-sqrt")


def decay_shape(optim_cfg) -> str:
    shape = str(optim_cfg.get("decay_shape", "linear") or "linear")
    if shape not in DECAY_SHAPES:
        raise ValueError(f"optim.decay_shape={shape!r}: use one of {DECAY_SHAPES}")
    return shape


# optim fields that reach the train step only through `schedule_params` (runtime inputs
# with make_optimizer(runtime_lr=True)): runs differing only in them share one program.
RUNTIME_FIELDS = ("lr", "schedule", "warmup_steps", "warmup_frac", "decay_frac",
                  "decay_shape", "min_lr_ratio")


def schedule_params(optim_cfg, total_steps: int) -> np.ndarray:
    """The schedule as runtime numbers [lr, end_lr, warmup, total, decay_steps, kind] for
    `traced_schedule`. Passing them to the train step as an argument (instead of baking the
    schedule into it) gives every run of the same shapes the same XLA program, so the
    persistent compilation cache serves all the data sizes of a grid from one compile."""
    make_schedule(optim_cfg, total_steps)  # validates
    lr = float(optim_cfg.lr)
    total = max(int(total_steps), 1)
    warm = min(warmup_steps(optim_cfg, total), total)
    decay = max(int(round(float(optim_cfg.decay_frac) * total)), 1)
    kind = _KINDS.index(optim_cfg.schedule)
    if optim_cfg.schedule == "wsd" and decay_shape(optim_cfg) == "1-sqrt":
        kind = _WSD_1_SQRT
    return np.array([lr, lr * float(optim_cfg.min_lr_ratio), warm, total, decay, kind],
                    np.float32)


def traced_schedule(count, hp) -> jax.Array:
    """`make_schedule`'s value at step `count` from `schedule_params` (traceable)."""
    lr, end, warm, total, decay, kind = (hp[i] for i in range(6))
    c = jnp.asarray(count, jnp.float32)
    rest = jnp.maximum(total - warm, 1.0)
    cm = jnp.clip(c - warm, 0.0, rest)                      # steps into the main phase
    cosine = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * cm / rest))
    linear = lr + (end - lr) * cm / rest
    stable = jnp.maximum(rest - decay, 0.0)
    frac = jnp.clip(cm - stable, 0.0, decay) / decay
    wsd = lr + (end - lr) * frac
    wsd_sqrt = lr + (end - lr) * jnp.sqrt(frac)
    main = jnp.select([kind == 0, kind == 1, kind == 2, kind == 3],
                      [cosine, linear, lr, wsd], wsd_sqrt)   # else _WSD_1_SQRT
    ramp = lr * jnp.minimum(c, warm) / jnp.maximum(warm, 1.0)
    return jnp.where(c < warm, ramp, main)


def make_optimizer(optim_cfg, total_steps: int, runtime_lr: bool = False,
                   flat: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """AdamW with global-norm clipping (clip_norm <= 0 disables it).

    runtime_lr=True: the transformation uses learning rate 1 and the train step scales its
    updates by `traced_schedule(step, hp)` (AdamW's update is linear in the learning rate,
    weight decay included); returns (tx, None).
    flat=True: the chain runs on one fp32 vector of all leaves (`flat_transform`)."""
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name={optim_cfg.name!r}: only 'adamw' is supported")
    # runtime_lr: the step applies the schedule (its numbers are checked by
    # `schedule_params`, which the trainer calls); the transformation uses lr 1
    sched = 1.0 if runtime_lr else make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(sched, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                             eps=float(optim_cfg.eps),
                             weight_decay=float(optim_cfg.weight_decay)))
    tx = optax.chain(*parts)
    return (flat_transform(tx) if flat else tx), (None if runtime_lr else sched)


# --------------------------------------------------------------------------- flat update
FLATTEN = ("auto", "on", "off")


def ravel(tree) -> jax.Array:
    """The leaves of `tree` as one fp32 vector (tree order)."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def unravel(like, flat) -> Any:
    """Inverse of `ravel`: `flat` cut into leaves shaped and typed like `like`'s."""
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for x in leaves:
        n = int(np.prod(x.shape))
        out.append(flat[i:i + n].reshape(x.shape).astype(x.dtype))
        i += n
    return jax.tree.unflatten(treedef, out)


def flat_transform(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to ONE fp32 vector holding every leaf (updates and params raveled,
    the result cut back into leaves): the same update up to fp32 rounding (the global norm
    is one sum instead of a sum of per-leaf sums), but one fused elementwise chain instead
    of one per leaf, so the train step's program is smaller and compiles faster. The state
    holds vectors (mu, nu: [num_trainable]), not trees: use it where the trainable params
    are replicated (`use_flat`); a sharded param's state would be gathered."""

    def init(params):
        return inner.init(ravel(params))

    def update(updates, state, params=None):
        flat, state = inner.update(ravel(updates), state,
                                   None if params is None else ravel(params))
        return unravel(updates, flat), state

    # vectors in, vectors out: the train step ravels the gradient once and runs the
    # scaling, finite check, norm, update and skip-select on the vector
    # (step.make_train_step); `flat_update` is how it recognises a flat transformation
    update.flat_update = inner.update
    return optax.GradientTransformation(init, update)


def flat_update_of(tx: optax.GradientTransformation):
    """The vector update of a `flat_transform` (None for any other transformation)."""
    return getattr(tx.update, "flat_update", None)


def use_flat(optim_cfg, trainable) -> bool:
    """`optim.flatten`: "on", "off", or "auto" = on when every trainable leaf is fully
    replicated (one device, or a data-parallel-only mesh), where a flat state costs no
    extra memory or communication."""
    mode = str(optim_cfg.get("flatten", "auto"))
    if mode not in FLATTEN:
        raise ValueError(f"optim.flatten={mode!r}: use one of {list(FLATTEN)}")
    if mode != "auto":
        return mode == "on"
    return all(getattr(getattr(x, "sharding", None), "is_fully_replicated", True)
               for x in jax.tree.leaves(trainable))


# --------------------------------------------------------------------------- freeze masks
def _patterns(trainable) -> list[str]:
    if isinstance(trainable, str):
        trainable = (trainable,)
    return [str(p) for p in (trainable or ())]


def is_trainable(path: str, patterns: Sequence[str]) -> bool:
    """True when a "/"-joined param path matches one of the regexes (re.search).

    "*" and "" mean "everything"."""
    for p in patterns:
        if p in ("*", "", ".*"):
            return True
        if re.search(p, path):
            return True
    return False


def trainable_mask(params, trainable) -> Any:
    """A bool pytree like `params`: True for trainable leaves."""
    pats = _patterns(trainable)
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: is_trainable(k, pats) for k in flat}, sep="/")


def split_params(params, trainable) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts with disjoint leaves; `merge_params` inverts it."""
    pats = _patterns(trainable)
    flat = traverse_util.flatten_dict(params, sep="/")
    tr = {k: v for k, v in flat.items() if is_trainable(k, pats)}
    fr = {k: v for k, v in flat.items() if not is_trainable(k, pats)}
    if not tr:
        raise ValueError(f"optim.trainable={tuple(pats)} matches no parameter; param paths "
                         f"look like {sorted(flat)[:5]}")
    return (traverse_util.unflatten_dict(tr, sep="/"),
            traverse_util.unflatten_dict(fr, sep="/") if fr else {})


def merge_params(trainable: dict, frozen: dict) -> dict:
    flat = dict(traverse_util.flatten_dict(frozen, sep="/")) if frozen else {}
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def cast_tree(tree, dtype):
    """Casts floating leaves of a pytree (e.g. frozen params to bf16 for storage)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)
