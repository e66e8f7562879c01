"""Efficient hard routing of tokens to NaViL's modality experts (text vs visual weights).

The reference (`impl="masked"` in `layers.route_experts`) runs both experts on every token
and selects, which doubles the FLOPs of every expert layer. The implementation here runs
each token through exactly one expert with static shapes, so it works under `jax.jit`:

"chunked" (sort once, chunk-aligned grouped matmul)
  1. Scatter the B*T tokens into a buffer of `n_chunks * chunk` rows: visual tokens first
     (in order), then the text tokens starting at the next chunk boundary. Every chunk now
     holds tokens of a single modality (or is empty).
  2. `lax.scan` over the chunks; `lax.switch` runs the visual expert, the text expert or
     nothing on a chunk (a real branch on CPU/GPU/TPU: the other expert is not computed).
  3. Gather the outputs back to the token order.
  The scan body is under `jax.checkpoint`: otherwise autodiff keeps, per chunk, a copy of
  the weights the chosen branch read (a `switch` returns its residuals as outputs of its
  own, which the scan stacks): n_chunks copies of every routed kernel per layer (NaViL at
  4096 tokens a device: 17 of each expert matrix; `grid plan` on 256 v5p: 131 -> 35 GiB a
  device). With it the backward keeps each chunk's input and reads the weights once; a
  linear branch recomputes nothing (benchmarks/native.py: chunked step 1.04 vs 1.11 s).
  The extra work is at most one chunk of padding (chunk / (B*T) of the FLOPs); the
  scatter/gather move the activations once. XLA deduplicates the identical routing of
  q/k/v (same input, same mask). Gradients flow through scan/switch/scatter as usual.

Under data-parallel sharding the routing is global over the batch (the scatter reshards
the tokens); for multi-device runs prefer running the model inside the data axis
(per-shard routing) or impl="masked".
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

IMPLS = ("masked", "chunked")
DEFAULT_CHUNK = 256


def routing_plan(visual_mask: jax.Array, chunk: int):
    """Destination of every token in the chunk-aligned buffer and each chunk's expert.

    visual_mask: [N] bool. Returns (dest [N] int32, kind [n_chunks] int32 with 0 = empty,
    1 = text, 2 = visual, n_chunks). Visual tokens fill rows [0, nv); text tokens start at
    ceil(nv / chunk) * chunk.
    """
    m = visual_mask.astype(bool)
    n = m.shape[0]
    n_chunks = -(-n // chunk) + 1
    mi = m.astype(jnp.int32)
    nv = jnp.sum(mi)
    nt = n - nv
    v_chunks = (nv + chunk - 1) // chunk
    t_chunks = (nt + chunk - 1) // chunk
    text_start = v_chunks * chunk
    dest = jnp.where(m, jnp.cumsum(mi) - 1, text_start + jnp.cumsum(1 - mi) - 1)
    idx = jnp.arange(n_chunks)
    kind = jnp.where(idx < v_chunks, 2, jnp.where(idx < v_chunks + t_chunks, 1, 0))
    return dest.astype(jnp.int32), kind.astype(jnp.int32), n_chunks


def route_chunked(x, visual_mask, text_fn: Callable, visual_fn: Callable,
                  chunk: int = DEFAULT_CHUNK):
    """x: [B, T, *in]; visual_mask: [B, T]. Each token goes through one expert only."""
    b, t = visual_mask.shape
    feat_in = x.shape[2:]
    n = b * t
    chunk = max(1, min(int(chunk), n))
    dest, kind, n_chunks = routing_plan(visual_mask.reshape(n), chunk)
    xf = x.reshape((n,) + feat_in)
    buf = jnp.zeros((n_chunks * chunk,) + feat_in, x.dtype)
    buf = buf.at[dest].set(xf, unique_indices=True, mode="promise_in_bounds")
    chunks = buf.reshape((n_chunks, chunk) + feat_in)
    out = jax.eval_shape(text_fn, chunks[0])

    def empty(c):
        del c
        return jnp.zeros(out.shape, out.dtype)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(carry, inp):
        k, c = inp
        return carry, jax.lax.switch(k, (empty, text_fn, visual_fn), c)

    _, ys = jax.lax.scan(body, None, (kind, chunks))
    ys = ys.reshape((n_chunks * chunk,) + out.shape[1:])
    y = ys.at[dest].get(mode="promise_in_bounds", unique_indices=True)
    return y.reshape((b, t) + out.shape[1:])


def route(x, visual_mask, text_fn: Callable, visual_fn: Callable, impl: str = "chunked"):
    """Dispatches to an efficient implementation (called by `layers.route_experts`).

    impl: "chunked" or "chunked:<size>" (tokens per chunk, default 256).
    """
    name, _, arg = impl.partition(":")
    if name == "chunked":
        return route_chunked(x, visual_mask, text_fn, visual_fn,
                             chunk=int(arg) if arg else DEFAULT_CHUNK)
    raise ValueError(f"unknown expert_impl {impl!r}; use 'masked' (reference) or "
                     f"'chunked[:size]' (model.llm.expert_impl)")


def fill_visual_experts(loaded, like):
    """Completes a text-only (pretrained) params tree for an expert model.

    `loaded` lacks the `visual_*` leaves that `like` (the expert model's params, any leaf
    type with .shape) has: each is filled with a copy of its text twin, so the visual
    experts start from the pretrained text weights. Other leaves are kept as loaded.
    """
    if not hasattr(like, "items"):
        return loaded
    out = dict(loaded)
    for k, v in like.items():
        if k in loaded:
            out[k] = fill_visual_experts(loaded[k], v)
        elif k.startswith("visual_") and k[len("visual_"):] in loaded:
            out[k] = jnp.array(loaded[k[len("visual_"):]], copy=True)
    return out


def init_visual_experts(params, overwrite: bool = True):
    """Copies every expert Linear's text weights to its visual weights.

    Walks a params pytree (nested dicts, boxed or not) and sets `visual_kernel` :=
    `kernel` and `visual_bias` := `bias` wherever both exist, so the visual experts start
    from the pretrained text weights (NaViL). Returns a new tree; the input is unchanged.
    """
    def walk(node):
        if not isinstance(node, dict) and not hasattr(node, "items"):
            return node
        out = {k: walk(v) for k, v in node.items()}
        for name in ("kernel", "bias"):
            if name in out and ("visual_" + name) in out and overwrite:
                src = out[name]
                out["visual_" + name] = jax.tree.map(lambda a: jnp.array(a, copy=True), src)
        return out
    return walk(params)
