"""Batched L-BFGS in JAX: one pure function, `jax.vmap`-able over starts and data weights.

`minimize(fun, x0, *args)` minimises `fun(x, *args)` (a scalar function of a flat float
vector) with limited-memory BFGS and a backtracking Armijo line search. Everything is a
`lax.while_loop` over fixed-size arrays with one evaluation per iteration (a failed
Armijo step is retried shorter on the next iteration), so `jax.vmap(minimize, ...)` fits thousands of
problems (bootstrap resamples x initialisations) in one compiled program; a finished lane
is frozen while the others go on. Use it under `jax.enable_x64(True)`: the scaling-law
objectives are sums of tiny Huber terms and need float64 to converge tightly.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Result(NamedTuple):
    x: jax.Array          # [P] the minimiser found
    f: jax.Array          # objective at x
    grad_norm: jax.Array  # max |gradient| at x
    iters: jax.Array      # iterations used
    converged: jax.Array  # bool: stopped by a tolerance (not by maxiter)


class _State(NamedTuple):
    x: jax.Array
    f: jax.Array
    g: jax.Array
    S: jax.Array      # [m, P] steps, shift buffer (newest last)
    Y: jax.Array      # [m, P] gradient changes
    rho: jax.Array    # [m] 1 / (s . y)
    k: jax.Array      # accepted memory updates so far
    it: jax.Array     # iterations (= evaluations) so far
    t: jax.Array      # step scale of the next trial
    done: jax.Array
    converged: jax.Array


def _two_loop(g, S, Y, rho, k, m):
    """-H g with the L-BFGS inverse-Hessian approximation.

    The memory is a shift buffer: the newest pair is row m - 1 and the last
    min(k, m) rows are valid. Loop indices are not batched, so under vmap the row
    reads stay slices (no gathers).
    """
    count = jnp.minimum(k, m)

    def backward(i, carry):
        q, alphas = carry
        j = m - 1 - i
        a = jnp.where(j >= m - count, rho[j] * jnp.dot(S[j], q), 0.0)
        return q - a * Y[j], alphas.at[j].set(a)

    q, alphas = jax.lax.fori_loop(0, m, backward, (g, jnp.zeros(m, g.dtype)))
    yy = jnp.dot(Y[m - 1], Y[m - 1])
    gamma = jnp.where(count > 0, jnp.dot(S[m - 1], Y[m - 1]) / jnp.maximum(yy, 1e-300),
                      1.0 / jnp.maximum(jnp.linalg.norm(g), 1e-300))

    def forward(j, r):
        b = rho[j] * jnp.dot(Y[j], r)
        return r + jnp.where(j >= m - count, alphas[j] - b, 0.0) * S[j]

    return -jax.lax.fori_loop(0, m, forward, gamma * q)


def minimize(fun: Callable[..., jax.Array], x0: jax.Array, *args, maxiter: int = 500,
             history: int = 10, gtol: float = 1e-12, ftol: float = 1e-13,
             min_step: float = 1e-12, c1: float = 1e-4,
             value_and_grad: Callable | None = None) -> Result:
    """Minimise `fun(x, *args)` from `x0` (see the module docstring).

    `value_and_grad(x, *args) -> (f, grad)` may be given (e.g. a hand-written gradient);
    the default is `jax.value_and_grad(fun)`. Each line-search trial evaluates both, so
    an accepted first step costs one evaluation.

    Stops when max|grad| <= gtol, when an accepted step lowers f by no more than
    ftol * |f| (scipy's `factr` test, relative to f), when even a step of `min_step`
    finds no decrease, or after `maxiter` evaluations (then `converged` is False).
    """
    value_and_grad = value_and_grad or jax.value_and_grad(fun)
    x0 = jnp.asarray(x0)
    p = x0.shape[0]
    f0, g0 = value_and_grad(x0, *args)
    state = _State(x=x0, f=f0, g=g0, S=jnp.zeros((history, p), x0.dtype),
                   Y=jnp.zeros((history, p), x0.dtype), rho=jnp.zeros(history, x0.dtype),
                   k=jnp.array(0), it=jnp.array(0), t=jnp.array(1.0, x0.dtype),
                   done=~jnp.isfinite(f0),
                   converged=jnp.max(jnp.abs(g0)) <= gtol)
    state = state._replace(done=state.done | state.converged)

    def cond(s):
        return (~s.done) & (s.it < maxiter)

    def body(s):
        d = _two_loop(s.g, s.S, s.Y, s.rho, s.k, history)
        slope = jnp.dot(s.g, d)
        # Not a descent direction (memory went bad): restart from scaled steepest descent.
        restart = ~(slope < 0)
        d = jnp.where(restart, -s.g / jnp.maximum(jnp.linalg.norm(s.g), 1e-300), d)
        slope = jnp.where(restart, jnp.dot(s.g, d), slope)
        k = jnp.where(restart, 0, s.k)

        # One trial step per iteration: a lane whose step fails the Armijo test stays put
        # and retries with a 4x shorter step next iteration. Under vmap every iteration
        # then costs one evaluation, instead of the worst lane's number of halvings.
        t = s.t
        x_new = s.x + t * d
        f_new, g_new = value_and_grad(x_new, *args)
        ok = jnp.isfinite(f_new) & (f_new <= s.f + c1 * t * slope)
        t_next = jnp.where(ok, jnp.minimum(1.0, 4.0 * t), 0.25 * t)
        step, dg = x_new - s.x, g_new - s.g
        sy = jnp.dot(step, dg)
        update = ok & (sy > 1e-12 * jnp.linalg.norm(step) * jnp.linalg.norm(dg))
        shift = lambda buf, new: jnp.where(update, jnp.concatenate([buf[1:], new[None]]), buf)
        S = shift(s.S, step)
        Y = shift(s.Y, dg)
        rho = shift(s.rho, 1.0 / jnp.where(update, sy, 1.0))
        k = jnp.where(update, k + 1, k)
        x = jnp.where(ok, x_new, s.x)
        f = jnp.where(ok, f_new, s.f)
        g = jnp.where(ok, g_new, s.g)
        small_g = jnp.max(jnp.abs(g)) <= gtol
        small_f = ok & (s.f - f_new <= ftol * jnp.maximum(jnp.abs(s.f), 1e-300))
        stuck = t_next < min_step            # no decrease even for a tiny step: stop
        converged = small_g | small_f | stuck
        return _State(x=x, f=f, g=g, S=S, Y=Y, rho=rho, k=k, it=s.it + 1, t=t_next,
                      done=converged, converged=converged)

    s = jax.lax.while_loop(cond, body, state)
    return Result(x=s.x, f=s.f, grad_norm=jnp.max(jnp.abs(s.g)), iters=s.it,
                  converged=s.converged)
