"""Memory-lean next-token cross-entropy straight from final hidden states.

The naive loss (`layers.next_token_loss`) materialises fp32 logits [B, T, V] for the whole
batch, and its backward pass holds a second [B, T, V] fp32 array (the softmax gradient).
For a 32k-vocabulary 7B model at batch 16 x 2k tokens that is 4 GiB each, more than the
activations of several decoder layers.

`chunked_next_token_loss` computes the same (loss_sum, num_tokens) by scanning over
chunks of the sequence axis: each step forms the logits of [B, chunk] tokens, reduces them
to the token losses and, when differentiated, to the gradients w.r.t. the hidden states
and the unembedding, then drops them. A custom VJP does the gradient work in the forward
scan (one pass over the logits instead of a forward pass plus a recomputation), so neither
pass ever holds more than one [B, chunk, V] fp32 block. Inputs that are not being
differentiated (e.g. a frozen lm_head) get no gradient work at all (JAX symbolic zeros).

Chunks run along the sequence, not the flattened tokens, so a batch axis sharded over the
mesh stays sharded inside every step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_derivatives as cd

from vlm_jax.models import layers


def logits_from_hidden(hidden: jax.Array, unembed: jax.Array, tied: bool) -> jax.Array:
    """fp32 logits [..., V] from hidden [..., E] and an unembedding.

    `unembed` is an lm_head kernel [E, V] (`tied=False`) or a tied token embedding
    [V, E] (`tied=True`). Operands are cast to the hidden states' dtype (the compute
    dtype) and accumulated in fp32.
    """
    w = unembed.astype(hidden.dtype)
    spec = "...e,ve->...v" if tied else "...e,ev->...v"
    return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)


def naive_next_token_loss(hidden, unembed, targets, loss_mask, tied: bool = False):
    """Reference: full logits then `layers.next_token_loss` (what chunking must equal)."""
    return layers.next_token_loss(logits_from_hidden(hidden, unembed, tied), targets, loss_mask)


def _check(hidden, unembed, targets, loss_mask, chunk, tied):
    if hidden.ndim != 3:
        raise ValueError(f"chunked loss: hidden must be [B, T, E], got shape {hidden.shape}")
    b, t, e = hidden.shape
    if targets.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(f"chunked loss: targets {targets.shape} and loss_mask {loss_mask.shape} "
                         f"must both be [B, T] = {(b, t)}")
    want_e = unembed.shape[1] if tied else unembed.shape[0]
    if unembed.ndim != 2 or want_e != e:
        layout = "[vocab, embed] (tied embedding)" if tied else "[embed, vocab] (lm_head kernel)"
        raise ValueError(f"chunked loss: unembedding of shape {unembed.shape} is not {layout} "
                         f"with embed={e}; pass tied={not tied} if it is the other layout")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunked loss: chunk must be a positive int (model.loss_chunk), "
                         f"got {chunk!r}")


def _to_chunks(x, n, chunk):
    """[B, T, ...] (T = n * chunk) -> [n, B, chunk, ...] for lax.scan."""
    b = x.shape[0]
    x = x.reshape((b, n, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x):
    """[n, B, chunk, ...] -> [B, n * chunk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _chunk_stats(h, w, t, m, tied):
    """Logits of one chunk -> (loss_sum, softmax-minus-onehot weighted by mask)."""
    logits = logits_from_hidden(h, w, tied)
    logits = layers.constrain(logits, (layers.BATCH, layers.LENGTH, layers.VOCAB))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    loss = jnp.sum((lse - picked) * m)
    return loss, logits, lse


def _forward(hidden, unembed, targets, loss_mask, chunk, tied, need_dh, need_dw):
    """One scan over sequence chunks; returns loss_sum, num_tokens, dh, dw (or None)."""
    b, t, e = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    mask = loss_mask.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    xs = (_to_chunks(hidden, n, chunk), _to_chunks(targets, n, chunk), _to_chunks(mask, n, chunk))
    w = unembed.astype(hidden.dtype)
    dw0 = jnp.zeros(unembed.shape, jnp.float32) if need_dw else None

    def body(carry, x):
        loss_acc, dw_acc = carry
        h, tc, mc = x
        loss, logits, lse = _chunk_stats(h, w, tc, mc, tied)
        dh = None
        if need_dh or need_dw:
            # d loss / d logits = (softmax - onehot(target)) * mask, fp32, one chunk only.
            g = jnp.exp(logits - lse[..., None])
            g = g - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
            g = (g * mc[..., None]).astype(h.dtype)
            if need_dh:
                spec = "bcv,ve->bce" if tied else "bcv,ev->bce"
                dh = jnp.einsum(spec, g, w, preferred_element_type=jnp.float32).astype(h.dtype)
            if need_dw:
                spec = "bcv,bce->ve" if tied else "bcv,bce->ev"
                dw_acc = dw_acc + jnp.einsum(spec, g, h, preferred_element_type=jnp.float32)
        return (loss_acc + loss, dw_acc), dh

    (loss_sum, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), xs)
    if need_dh:
        dh = _from_chunks(dh)[:, :t]
    return loss_sum, jnp.sum(mask), dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(hidden, unembed, targets, loss_mask, chunk, tied):
    loss_sum, num, _, _ = _forward(hidden, unembed, targets, loss_mask, chunk, tied,
                                   need_dh=False, need_dw=False)
    return loss_sum, num


def _value(x):
    return x.value if isinstance(x, cd.CustomVJPPrimal) else x


def _chunked_fwd(hidden, unembed, targets, loss_mask, chunk, tied):
    # With symbolic_zeros=True the primals arrive wrapped, saying whether they are perturbed.
    # Integer inputs (targets) arrive unwrapped: they have no tangent space.
    need_dh, need_dw = hidden.perturbed, unembed.perturbed
    h, w = hidden.value, unembed.value
    loss_sum, num, dh, dw = _forward(h, w, _value(targets), _value(loss_mask), chunk, tied,
                                     need_dh=need_dh, need_dw=need_dw)
    # Residuals must be arrays: a zero-size array carries the unembedding's dtype.
    res = (dh, dw, jnp.zeros((0,), w.dtype))
    return (loss_sum, num), res


def _chunked_bwd(chunk, tied, res, cts):
    del chunk, tied
    dh, dw, w_marker = res
    g = cts[0]  # cotangent of loss_sum; num_tokens does not depend on any float input
    if isinstance(g, cd.SymbolicZero):
        return None, None, None, None
    g = g.astype(jnp.float32)
    out_h = None if dh is None else (dh.astype(jnp.float32) * g).astype(dh.dtype)
    out_w = None if dw is None else (dw * g).astype(w_marker.dtype)
    return out_h, out_w, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def chunked_next_token_loss(hidden: jax.Array, unembed: jax.Array, targets: jax.Array,
                            loss_mask: jax.Array, chunk: int, tied: bool = False):
    """Masked next-token cross-entropy without whole-batch logits.

    hidden: [B, T, E] final (normed) hidden states in the compute dtype; unembed: lm_head
    kernel [E, V] or, with `tied=True`, the token embedding [V, E]; targets: int [B, T];
    loss_mask: [B, T]; chunk: sequence positions per step (T is padded up to a multiple).
    Returns (loss_sum, num_tokens), fp32 scalars, equal to
    `layers.next_token_loss(hidden @ unembed, targets, loss_mask)`; differentiable in
    `hidden` and `unembed`.
    """
    _check(hidden, unembed, targets, loss_mask, chunk, tied)
    return _chunked(hidden, unembed, targets, loss_mask, int(chunk), bool(tied))


def next_token_loss_from_hidden(hidden, unembed, targets, loss_mask, chunk: int = 0,
                                tied: bool = False):
    """Dispatch on `model.loss_chunk`: > 0 = chunks of that many positions; 0 = the whole
    sequence as one chunk. Both are the fused loss: the logits exist once, and the
    gradient w.r.t. hidden states (and unembedding) comes out of the same pass, instead of
    autodiff's several passes over [B, T, V] fp32 arrays. Without a gradient (eval) it is
    the plain loss. < 0 = `naive_next_token_loss`, the unfused reference."""
    chunk = int(chunk or 0)
    if chunk < 0 or hidden.ndim != 3 or hidden.shape[1] == 0:
        return naive_next_token_loss(hidden, unembed, targets, loss_mask, tied)
    if chunk == 0:
        chunk = hidden.shape[1]
    return chunked_next_token_loss(hidden, unembed, targets, loss_mask, chunk, tied)
