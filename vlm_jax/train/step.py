"""The train and eval steps: pure functions of (state, frozen params, batch).

Train state is a dict pytree: `step`, `params` (trainable subtree only, fp32 master
weights), `opt_state`, `nonfinite` (consecutive non-finite steps) and `skipped` (total
skipped updates). Frozen params are a separate, never-donated argument; the gradient is
taken w.r.t. the trainable subtree only.

Loss = sum of token losses / number of loss tokens over the whole global batch (all
micro-batches of gradient accumulation): exact, not a mean of micro-batch means.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vlm_jax.train.optim import flat_update_of, merge_params, ravel, traced_schedule, unravel


def model_inputs(batch: dict) -> dict:
    """Strips metadata keys ("_..."); they never reach the model."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _forward(model, params, batch):
    out = model.apply({"params": params}, model_inputs(batch), deterministic=True)
    if "loss_sum" not in out or "num_tokens" not in out:
        raise ValueError(f"{type(model).__name__} must return 'loss_sum' and 'num_tokens'; "
                         f"got {sorted(out)}")
    return out


def _extras(out) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()
            if k not in ("loss_sum", "num_tokens") and jnp.ndim(v) == 0}


def init_state(params, tx) -> dict:
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                nonfinite=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable | None,
                    grad_accum: int = 1) -> Callable:
    """Returns `train_step(state, frozen, batch) -> (state, metrics)`; with schedule=None
    (a `make_optimizer(..., runtime_lr=True)` transformation) it is
    `train_step(state, frozen, batch, hp)` and the learning rate is
    `optim.traced_schedule(step, hp)`, a runtime input rather than a compiled constant.

    With grad_accum = A, the global batch [B, ...] is split into A micro-batches
    (example i goes to micro-batch i % A, so each stays spread over the data axes) and
    gradients of the summed token loss are accumulated in fp32 by `lax.scan`.
    A non-finite loss or gradient skips the update (params and optimizer state unchanged)
    and increments `nonfinite` / `skipped`.
    """
    def loss_sum_fn(trainable, frozen, mb):
        out = _forward(model, merge_params(trainable, frozen), mb)
        return out["loss_sum"].astype(jnp.float32), out

    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    flat_update = flat_update_of(tx)   # a flat_transform: update one raveled vector

    def train_step(state, frozen, batch, hp=None):
        params = state["params"]
        lr = schedule(state["step"]) if schedule is not None else \
            traced_schedule(state["step"], hp)
        batch = model_inputs(batch)
        if grad_accum == 1:
            (loss_sum, out), grads = grad_fn(params, frozen, batch)
            num_tokens = out["num_tokens"].astype(jnp.float32)
            extras = _extras(out)
        else:
            def split(x):
                b = x.shape[0]
                return jnp.swapaxes(x.reshape((b // grad_accum, grad_accum) + x.shape[1:]), 0, 1)
            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                g_acc, ls_acc, nt_acc = carry
                (ls, out), g = grad_fn(params, frozen, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, ls_acc + ls, nt_acc + out["num_tokens"].astype(jnp.float32)), \
                    _extras(out)

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, loss_sum, num_tokens), ex = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
            extras = jax.tree.map(jnp.mean, ex)
        denom = jnp.maximum(num_tokens, 1.0)
        loss = loss_sum / denom
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        if flat_update is not None:
            # one fp32 vector: scaling, finite check, norm, AdamW, learning rate and the
            # skip-select are a few fused kernels, not a handful per leaf
            g = ravel(grads) / denom
            finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g))
            grad_norm = jnp.sqrt(jnp.sum(g * g))
            p = ravel(params)
            u, new_opt = flat_update(g, state["opt_state"], p)
            if schedule is None:
                u = u * lr
            new_params = unravel(params, jnp.where(finite, p + u, p))
        else:
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
            finite = jnp.isfinite(loss) & _all_finite(grads)
            grad_norm = optax.tree.norm(grads)
            updates, new_opt = tx.update(grads, state["opt_state"], params)
            if schedule is None:
                updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
            new_params = keep(optax.apply_updates(params, updates), params)
        new_state = dict(
            step=state["step"] + 1,
            params=new_params,
            opt_state=keep(new_opt, state["opt_state"]),
            nonfinite=jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
            skipped=(state["skipped"] + (~finite).astype(jnp.int32)).astype(jnp.int32),
        )
        seg = batch.get("segment_ids")
        input_tokens = (jnp.sum(seg > 0) if seg is not None else
                        jnp.asarray(batch["tokens"].size if "tokens" in batch else 0))
        # examples in the global batch: rows number their packed samples 1..n in
        # segment_ids (native rows, packed text), so a row holds max(segment_ids) of them
        examples = (jnp.sum(jnp.max(seg, axis=-1)) if seg is not None and seg.ndim == 2
                    else jnp.asarray(jax.tree.leaves(batch)[0].shape[0]))
        metrics = dict(loss=loss, loss_sum=loss_sum, num_tokens=num_tokens,
                       input_tokens=input_tokens.astype(jnp.int32),
                       examples=examples.astype(jnp.int32),
                       grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32),
                       finite=finite, nonfinite=new_state["nonfinite"],
                       skipped=new_state["skipped"], **extras)
        return new_state, metrics

    return train_step


def make_eval_step(model) -> Callable:
    """Returns `eval_step(params, frozen, batch) -> {"loss_sum", "num_tokens"}` (fp32).

    Padding examples of the last eval batch have loss_mask 0, so they add nothing."""
    def eval_step(params, frozen, batch):
        out = _forward(model, merge_params(params, frozen), batch)
        return dict(loss_sum=out["loss_sum"].astype(jnp.float32),
                    num_tokens=out["num_tokens"].astype(jnp.float32))
    return eval_step
