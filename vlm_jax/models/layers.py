"""Shared building blocks for every model in vlm_jax.

Everything here is flax.linen and pure: parameters live in the params pytree, nothing is
global. Every parameter carries logical axis names (see `AXES`); `vlm_jax.train.sharding`
maps them to mesh axes with one table of rules. Activations are annotated with
`constrain(x, names)` at the few places where the layout matters.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import struct
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from vlm_jax.models import attention

# Logical axis names (DESIGN.md). The sharding rules map these to ("data", "fsdp", "tensor").
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
KV = "kv"          # per-head dimension
VOCAB = "vocab"
LAYERS = "layers"  # the stacked-layer axis of scanned parameters
AXES = (BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, KV, VOCAB, LAYERS)

Dtype = Any
Initializer = Callable[..., jax.Array]

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def dtype_of(name: str | Dtype | None, default=jnp.float32) -> Dtype:
    """Maps a config string ("bfloat16", "float32", ...) to a jnp dtype."""
    if name is None:
        return default
    if isinstance(name, str):
        try:
            return _DTYPES[name.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None
    return name


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, tuple(names))


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows `tokens` of an embedding table [vocab, embed] sharded (tensor, fsdp). The table
    is gathered over fsdp first (as FSDP gathers every weight it uses): a lookup in the
    fsdp-sharded table gives rows sharded along embed, which XLA can only turn into the
    batch-sharded activation by replicating them ("involuntary full rematerialization")."""
    return jnp.take(constrain(table, (VOCAB, None)), tokens, axis=0)


def normal_init(std: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev=std)


def with_axes(init: Initializer, names: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(names))


# --------------------------------------------------------------------------- activations
def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Llama RMSNorm: statistics in fp32, scale applied after casting back (as transformers)."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", with_axes(nn.initializers.ones, (EMBED,)), (x.shape[-1],),
                           self.param_dtype)
        return rms_norm(x, scale, float(self.eps), self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps: float, dtype=jnp.float32):
    """scale * x / rms(x) over the last axis (statistics in fp32, the scale applied after
    casting back, as transformers), with a one-pass backward.

    Autodiff writes two [tokens, embed] intermediates in the backward (the gradient through
    the normalised x, then its correction through the statistics); here the backward is
    one row reduction and one elementwise pass over x and dy, with the fp32 reciprocal rms
    r [tokens, 1] saved by the forward: dx = r * g - x * r^3 * mean(g * x), g = dy * scale;
    d scale = sum(dy * x * r) over tokens (dropped by XLA for a frozen scale).
    """
    return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _rms_norm_fwd(x, scale, eps, dtype):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = (scale.astype(dtype) * (x32 * r).astype(dtype)).astype(dtype)
    return y, residuals(x, scale, r)


def _rms_norm_bwd(eps, dtype, res, dy):
    del eps, dtype
    x, scale, r = res
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    g = dy32 * scale.astype(jnp.float32)
    # dx = r * g - x * (r^3 * mean(g * x)): one row reduction over (dy, x), then one pass;
    # nothing [tokens, embed]-sized besides dx (x * r, shared by two terms, would be).
    k = jnp.mean(g * x32, axis=-1, keepdims=True) * (r * r * r)
    dx = r * g - x32 * k
    dscale = jnp.sum((dy32 * x32 * r).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm with fp32 statistics and logical axes on scale and bias."""
    eps: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, (EMBED,)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", with_axes(nn.initializers.zeros, (EMBED,)), (d,),
                              self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


# --------------------------------------------------------------------------- linear layers
# The kernel layout of `Linear` (and of the LM head), recorded in checkpoints and converted
# dirs: "out_in" = torch's [out..., in...]. Files without it hold the [in, out] kernels of
# earlier versions and are refused on restore (square kernels would load transposed).
KERNEL_LAYOUT = "out_in"


def _contract(x, kernel, n_in: int):
    """Contracts the last `n_in` axes of x with the last `n_in` axes of kernel [out..., in...].

    As one 2-D matmul: x [..., prod(in)] against kernel [prod(out), prod(in)] on its axis
    1, reshaped back. The reshapes of row-major arrays are free (bitcasts); contracting
    several axes at once instead (e.g. [B, T, N, H] with a [D, N, H] kernel) makes XLA CPU
    transpose-copy the kernel in every backward pass, which a 2-D dot's transposed operand
    avoids. The [out, in] kernel (torch's layout) costs the step nothing against [in, out]:
    XLA swaps the dot's dimension numbers, no copy (benchmarks/kernel_layout.py).
    """
    in_shape = kernel.shape[kernel.ndim - n_in:]
    out_shape = kernel.shape[:kernel.ndim - n_in]
    k_in, k_out = math.prod(in_shape), math.prod(out_shape)
    lead = x.shape[:x.ndim - n_in]
    x2, k2 = x.reshape(lead + (k_in,)), kernel.reshape(k_out, k_in)
    if cpu_bf16_accumulate(x2.dtype, k2.dtype):
        y = _bf16_matmul(x2, k2)
    else:
        y = jax.lax.dot_general(x2, k2, (((len(lead),), (1,)), ((), ())))
    return y.reshape(lead + out_shape)


# The checkpoint name of `_bf16_matmul`'s outputs: the "dots" remat policies save them like
# the dot outputs they are (`vit.remat_policy`); a custom VJP hides its dot from them.
BF16_MATMUL = "bf16_matmul"
_PLATFORM: list[str] = []   # `matmul_platform`'s override of the local backend


@contextlib.contextmanager
def matmul_platform(platform: str):
    """Traces matmuls as they are on `platform` ("cpu", "gpu", "tpu") instead of the local
    backend: `grid plan` traces an accelerator's step on a CPU host."""
    _PLATFORM.append(platform)
    try:
        yield
    finally:
        _PLATFORM.pop()


def cpu_bf16_accumulate(*dtypes) -> bool:
    """Whether a bf16 x bf16 matmul should go through `_bf16_matmul` (fp32 results).

    XLA CPU runs a bf16 dot with a bf16 result as an fp32 dot (it converts the operands):
    fp32's speed. With an fp32 result it runs YNNPACK's bf16 kernels: on an AVX512-BF16 host
    a chain of [1824, 512] x [512, 1376] dots ran at ~180 GFLOP/s the first way and ~330 the
    second, the llava-shaped bf16 step 0.63 s vs 0.94 s (docs/step.md). Accelerators
    accumulate bf16 dots in fp32 in any case and round in the dot, so they keep the plain
    dot (and the programs measured on them)."""
    platform = _PLATFORM[-1] if _PLATFORM else jax.default_backend()
    return all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes) and platform == "cpu"


def _bf16_matmul(x, w):
    """x [..., in] @ w[out, in].T with fp32 accumulation, rounded to bf16, named
    `BF16_MATMUL` for the remat policies."""
    return checkpoint_name(_bf16_matmul_vjp(x, w), BF16_MATMUL)


@jax.custom_vjp
def _bf16_matmul_vjp(x, w):
    """The product; its backward's two dots take bf16 operands with fp32 results as well
    (autodiff of the forward would feed the fp32 cotangent into them: fp32 dots)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_matmul_fwd(x, w):
    return _bf16_matmul_vjp(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    lead = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jax.lax.dot_general(g, x, ((lead, lead), ((), ())),
                             preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_bf16_matmul_vjp.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


class Linear(nn.Module):
    """A dense layer over the last `in_axes` input axes with logical axis names.

    The kernel is stored in torch's layout, [*features, *in_shape] ([out..., in...]), so a
    transformers checkpoint's `weight` converts by a plain copy (`vlm_jax.convert`).
    `kernel_axes` names the kernel's axes in (in..., out...) order (the input axes first,
    then `features`); the param carries them reordered like its shape. With
    `experts=True` it holds a second set of weights for visual tokens (NaViL's
    modality-specific experts) and routes each token by `visual_mask` ([B, T], True for
    visual tokens); see `route_experts` for the implementations.
    """
    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    in_axes: int = 1
    use_bias: bool = False
    experts: bool = False
    expert_impl: str = "masked"     # "masked" (reference) | efficient impls in experts.py
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init()

    @nn.compact
    def __call__(self, x, visual_mask=None):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.in_axes:])
        if len(self.kernel_axes) != len(in_shape) + len(features):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} (in..., out...) do "
                             f"not match input axes {in_shape} + features {features}")
        shape = features + in_shape
        axes = tuple(self.kernel_axes[self.in_axes:]) + tuple(self.kernel_axes[:self.in_axes])
        init = with_axes(out_in_init(self.kernel_init, len(features)), axes)
        bias_axes = self.kernel_axes[self.in_axes:]
        binit = with_axes(nn.initializers.zeros, bias_axes)

        def weights(prefix):
            k = self.param(prefix + "kernel", init, shape, self.param_dtype)
            b = self.param(prefix + "bias", binit, features, self.param_dtype) if self.use_bias else None
            return k, b

        def apply(xs, kb):
            k, b = kb
            y = _contract(xs.astype(self.dtype), k.astype(self.dtype), self.in_axes)
            if b is not None:
                y = y + b.astype(self.dtype)
            return y

        text = weights("")
        if not self.experts:
            return apply(x, text)
        visual = weights("visual_")
        if visual_mask is None:
            return apply(x, text)
        return route_experts(x, visual_mask, lambda xs: apply(xs, text),
                             lambda xs: apply(xs, visual), impl=self.expert_impl)


def out_in_init(init: Initializer, n_out: int) -> Initializer:
    """`init` for an [out..., in...] kernel, drawing what it draws for [in..., out...] (so
    fan-in scaled initialisers see the right fans, and a seed gives the same weights as an
    [in, out] layer, transposed)."""
    def f(key, shape, dtype=jnp.float32):
        n_in = len(shape) - n_out
        k = init(key, tuple(shape[n_out:]) + tuple(shape[:n_out]), dtype)
        return jnp.transpose(k, tuple(range(n_in, len(shape))) + tuple(range(n_in)))
    return f


def route_experts(x, visual_mask, text_fn, visual_fn, impl: str = "masked"):
    """Hard routing of tokens to a text or a visual expert.

    x: [B, T, ...]; visual_mask: [B, T] bool. `text_fn`/`visual_fn` map [..., T', ...] tokens
    to outputs. "masked" runs both experts on every token and selects (the reference);
    other names are the efficient implementations of `vlm_jax.models.experts`, which run
    each token through one expert only.
    """
    visual_mask = visual_mask.astype(bool)
    if impl == "masked":
        yt, yv = text_fn(x), visual_fn(x)
        m = visual_mask.reshape(visual_mask.shape + (1,) * (yt.ndim - 2))
        return jnp.where(m, yv, yt)
    from vlm_jax.models import experts  # local import: experts builds on this module
    return experts.route(x, visual_mask, text_fn, visual_fn, impl=impl)


# --------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  seq_len: int | jax.Array | None = None) -> jax.Array:
    """Inverse frequencies for rotary embeddings, with transformers' scaling variants.

    `scaling` is a dict with "rope_type"/"type" in {"default", "linear", "dynamic", "llama3"}
    and its factors (the transformers config keys). "dynamic" needs `seq_len` (the
    largest position + 1 in the batch), as transformers computes it per forward pass.
    """
    dim = head_dim
    base = float(theta)
    kind = "default"
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind == "dynamic":
        factor = float(scaling["factor"])
        max_pos = float(scaling["original_max_position_embeddings"])
        sl = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
        base_eff = base * ((factor * sl / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (base_eff ** exps)
    inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if kind in ("default", None):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, inv_l)
    raise ValueError(f"unsupported rope scaling type {kind!r}; use linear, dynamic or llama3")


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, signed sin), fp32 [B, T, 1, H], for `rope_rotate`: computed once per forward
    pass and shared by every layer, instead of sin/cos of [B, T, N, H] in each layer's
    query and key rotation and again in their backward passes. The sin table carries
    rotate_half's sign: [-sin, sin] over the two halves of the head dimension."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    return (jnp.concatenate([cos, cos], axis=-1)[:, :, None, :],
            jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :])


def rope_rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H] rotated by `rope_tables` (cos, signed sin): x * cos +
    rotate_half(x) * sin, with rotate_half's halves swapped by a reverse (fused into the
    elementwise pass) instead of a materialised slice + negate + concatenate."""
    h = x.shape[-1]
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(x.shape[:-1] + (2, h // 2)), axis=-2).reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, N, H]; positions: [B, T]. transformers' (non-interleaved) convention."""
    return rope_rotate(x, *rope_tables(positions, inv_freq))


# --------------------------------------------------------------------------- attention
def attention_mask(segment_ids: jax.Array | None, causal: bool, q_len: int,
                   kv_len: int | None = None) -> jax.Array | None:
    """Boolean mask [B|1, 1, T, S]: same segment (0 = padding attends only to padding)
    and, if causal, no look-ahead. Returns None when nothing is masked."""
    kv_len = q_len if kv_len is None else kv_len
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if causal:
        c = jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]
        mask = c if mask is None else mask & c
    return mask


@struct.dataclass
class AttentionMask:
    """A self-attention mask by its structure: each query sees the keys of its segment
    (`segment_ids` [B, T]; None: one segment) and, if `causal`, none after it. `dense` is
    the same mask as bool [B|1, 1, T, T] for the paths that read one, or None
    (`self_attention_mask` leaves it out when the chosen kernel takes the structure).
    A pytree (`causal` is static), so it passes through `nn.scan` and remat."""
    segment_ids: Any = None
    dense: Any = None
    causal: bool = struct.field(pytree_node=False, default=False)


def self_attention_mask(segment_ids: jax.Array | None, causal: bool, t: int,
                        implementation: str | None, dtype, head_dim: int) -> AttentionMask:
    """The mask a model builds once per forward pass and hands every layer."""
    dense = None
    if attention.needs_dense_mask(implementation, dtype, head_dim):
        dense = attention_mask(segment_ids, causal, t)
    return AttentionMask(segment_ids, dense, causal)


def dot_product_attention(q, k, v, mask=None, implementation: str | None = None,
                          causal: bool = False):
    """q: [B, T, N, H], k/v: [B, S, K, H] with N % K == 0 (grouped-query attention) ->
    [B, T, N, H], scale 1/sqrt(H).

    `mask`: None (every key), an `AttentionMask` (self-attention within segments), or a
    bool array broadcastable to [B, N, T, S] with a head axis of 1 or N (any mask: it
    runs on the dense paths, einsum or XLA). `causal=True` (or an `AttentionMask`'s):
    no key after its query (S == T, same positions); with an array mask it promises the
    mask already hides them (the einsum path then skips the key blocks above the
    diagonal).

    `implementation` (config `model.attention_impl`): "" by backend, "einsum", "xla",
    "cudnn", "splash"; `vlm_jax.models.attention` says which runs where."""
    impl = attention.resolve(implementation, q.dtype, q.shape[-1])
    structured = mask is None or isinstance(mask, AttentionMask)
    segments, dense = (mask.segment_ids, mask.dense) if isinstance(mask, AttentionMask) \
        else (None, mask)
    causal = causal or (isinstance(mask, AttentionMask) and mask.causal)
    if structured and impl not in attention.DENSE_IMPLS and q.shape[1] == k.shape[1]:
        return attention.kernel_attention(impl, q, k, v, segments, causal)
    if structured and dense is None and (segments is not None or causal):
        dense = attention_mask(segments, causal, q.shape[1], k.shape[1])
    if impl == "einsum":
        return einsum_attention(q, k, v, dense, causal=causal)
    if impl == "einsum_remat":
        return jax.checkpoint(functools.partial(einsum_attention, causal=causal))(q, k, v, dense)
    return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")


_NEG = float(jnp.finfo(jnp.float32).min)


# Causal self-attention runs as query blocks of at least CAUSAL_SPLIT_MIN_ROWS rows (at most
# CAUSAL_MAX_BLOCKS of them), block i against keys 0..end of block i only: with n blocks
# (n+1)/(2n) of the score and value matmuls (2: 3/4, 3: 2/3, 4: 5/8; exact: the skipped
# keys are masked for those queries). LLaVA benchmark shapes (T = 228): 2 blocks ran the
# attention forward + backward in 0.59x the CPU time of 1; 3 blocks (76 rows each) in
# 0.92x the time of 2 (4 blocks 0.92x too; loaded VM, interleaved, best of 25).
CAUSAL_SPLIT_MIN_ROWS = 64
CAUSAL_MAX_BLOCKS = 4


def causal_blocks(t: int) -> list[tuple[int, int]]:
    """The query blocks [(lo, hi), ...] of causal self-attention over t positions."""
    n = max(1, min(CAUSAL_MAX_BLOCKS, t // CAUSAL_SPLIT_MIN_ROWS))
    edges = [round(i * t / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def einsum_attention(q, k, v, mask=None, causal: bool = False):
    """Softmax attention as two batched matmuls in a heads-major layout ([B, K, G*T, H]:
    the query heads of one key/value head are stacked along the query axis, so grouped-query
    attention needs no copy of k/v), with a custom VJP.

    Same math as `jax.nn.dot_product_attention(implementation="xla")` (scale 1/sqrt(H),
    masked logits set to the fp32 minimum, fp32 softmax), but cheaper where XLA's own
    lowering is not fused, e.g. on CPU: the normalisation is applied to the [B, T, N, H]
    output instead of the [B, N, T, S] probabilities, and the backward pass is the
    flash-attention one, dS = P * (dP - rowsum(dO * O)), instead of the autodiff of a
    softmax (measured 1.6x faster forward + backward than jax.nn's XLA path on CPU at LLaVA
    shapes). Saves the unnormalised probabilities in the compute dtype, as jax.nn's
    autodiff saves the normalised ones: the same activation memory. `causal`: see
    `dot_product_attention` and `CAUSAL_SPLIT_MIN_ROWS`.
    """
    b, t, n, h = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv} kv heads")
    g = n // kv
    m5 = None
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] not in (1, n):
            raise ValueError(f"attention: mask of shape {mask.shape} is not [B|1, 1|N, T, S]")
        m5 = mask.reshape(mask.shape[0], 1, 1, t, s_len) if mask.shape[1] == 1 else \
            mask.reshape(mask.shape[0], kv, g, t, s_len)
        # An additive bias (0 / fp32 min) rather than a select: XLA CPU fuses the add into
        # the score matmul's fusion, the select it would run as a separate pass over the
        # [B, N, T, S] scores in every layer. s + min rounds to min for any |s| < 1e31:
        # the same logits as `where(mask, s, min)`.
        m5 = jnp.where(m5.astype(bool), 0.0, _NEG).astype(jnp.float32)
    qs = (q * jnp.asarray(h ** -0.5, q.dtype)).transpose(0, 2, 1, 3).reshape(b, kv, g, t, h)
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = causal_blocks(t) if causal and m5 is not None and s_len == t else [(0, t)]
    if len(blocks) > 1:
        o = _causal_attention(qs, ks, vs, m5, g, tuple(blocks))
    else:
        o = _attention(qs.reshape(b, kv, g * t, h), ks, vs, m5, g)
    return o.reshape(b, n, t, h).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_attention(qs, ks, vs, m5, g, blocks):
    """Causal attention as query blocks: rows lo..hi of qs [B, K, G, T, H] against keys
    0..hi of ks / vs [B, K, S, H] (bias m5 [.., T, S]) -> [B, K, G, T, H].

    Its own VJP so that the blocks' gradients are assembled, not padded and summed: as
    autodiff of the slices, every block's dQ, dK, dV became a zero-padded [B, K, S, H]
    copy (5 per layer at 3 blocks) and a sum over them; here dQ is the concatenation of
    the blocks' rows, and each key block of dK / dV the sum of the query blocks that reach
    it, in one pass."""
    return _causal_attention_fwd(qs, ks, vs, m5, g, blocks)[0]


def _causal_attention_fwd(qs, ks, vs, m5, g, blocks):
    # Each block keeps its unnormalised output (the value matmul's result, saved for the
    # backward in place of the normalised one): the division by the row sums then runs
    # inside the pass that concatenates the blocks (and transposes them back to
    # token-major), not as a pass of its own per block.
    b, kv, _, _, h = qs.shape
    outs, res = [], []
    for lo, hi in blocks:
        q = qs[:, :, :, lo:hi].reshape(b, kv, g * (hi - lo), h)
        k, v = ks[:, :, :hi], vs[:, :, :hi]
        p, l, o = _attention_unnormalised(q, k, v, m5[..., lo:hi, :hi], g)
        outs.append((o / l).astype(v.dtype).reshape(b, kv, g, hi - lo, h))
        res.append(residuals(q, k, v, p, l, o.astype(v.dtype)))
    return jnp.concatenate(outs, axis=3), tuple(res)


def _causal_attention_bwd(g, blocks, res, do):
    b, kv = do.shape[:2]
    h = do.shape[-1]
    dqs, dks, dvs = [], [], []
    for (lo, hi), r in zip(blocks, res):
        dq, dk, dv, _ = _attention_bwd(g, r, do[:, :, :, lo:hi].reshape(b, kv, g * (hi - lo), h),
                                       normalised=False)
        dqs.append(dq.reshape(b, kv, g, hi - lo, h))
        dks.append(dk)
        dvs.append(dv)

    def assemble(parts):  # key block j gets the gradients of query blocks j, j+1, ...
        out = []
        for j, (lo, hi) in enumerate(blocks):
            acc = parts[j][:, :, lo:hi]
            for p in parts[j + 1:]:
                acc = acc + p[:, :, lo:hi]
            out.append(acc)
        return jnp.concatenate(out, axis=2)
    return jnp.concatenate(dqs, axis=3), assemble(dks), assemble(dvs), None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def _attention_probs(q, k, mask, g):
    """Unnormalised probabilities exp(s - rowmax) [B, K, G*T, S] (fp32) and row sums."""
    s = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
    if mask is not None:  # the additive bias [B|1, 1|K, 1|G, T, S] of einsum_attention
        b, kv, gt, sl = s.shape
        s = (s.reshape(b, kv, g, gt // g, sl) + mask).reshape(s.shape)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p, jnp.sum(p, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, g):
    return _attention_fwd(q, k, v, mask, g)[0]


def _attention_unnormalised(q, k, v, mask, g):
    """(probabilities exp(s - rowmax) in v's dtype, row sums, p @ v in fp32): the output
    before its division by the row sums."""
    p, l = _attention_probs(q, k, mask, g)
    p = p.astype(v.dtype)
    return p, l, jnp.einsum("bkqs,bksh->bkqh", p, v, preferred_element_type=jnp.float32)


def _attention_fwd(q, k, v, mask, g):
    p, l, o = _attention_unnormalised(q, k, v, mask, g)
    o = (o / l).astype(v.dtype)
    return o, residuals(q, k, v, p, l, o)


def _attention_bwd(g, res, do, normalised: bool = True):
    """The flash backward; `normalised=False`: the saved o is unnormalised (o * rowsum)."""
    del g
    q, k, v, p, l, o = res
    f32 = jnp.float32
    dn = do.astype(f32) / l                    # dO / rowsum: folds the normalisation in
    d = jnp.sum(dn * o.astype(f32), axis=-1, keepdims=True)   # rowsum(dO * O) / rowsum
    if not normalised:
        d = d / l
    dn_c = dn.astype(v.dtype)
    dv = jnp.einsum("bkqs,bkqh->bksh", p, dn_c, preferred_element_type=f32)
    dp = jnp.einsum("bkqh,bksh->bkqs", dn_c, v, preferred_element_type=f32)
    ds = (p.astype(f32) * (dp - d)).astype(q.dtype)
    dq = jnp.einsum("bkqs,bksh->bkqh", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("bkqs,bkqh->bksh", ds, q, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- MLPs
class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)); optional modality experts (per-token routing
    is consistent across gate/up/down, so routing each projection equals routing the FFN)."""
    hidden: int
    experts: bool = False
    expert_impl: str = "masked"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init()

    @nn.compact
    def __call__(self, x, visual_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                  experts=self.experts, expert_impl=self.expert_impl)
        gate = Linear(self.hidden, (EMBED, MLP), name="gate", **kw)(x, visual_mask)
        up = Linear(self.hidden, (EMBED, MLP), name="up", **kw)(x, visual_mask)
        h = constrain(silu_mul(gate, up), (BATCH, LENGTH, MLP))
        return Linear(x.shape[-1], (MLP, EMBED), name="down", **kw)(h, visual_mask)


def residuals(*arrays):
    """The residuals a custom VJP's forward saves, behind an optimization barrier: the
    same buffers (no copy), but XLA cannot common up the backward's elementwise math with
    the forward's (e.g. the sigmoid of SwiGLU's gate), which would make the forward write
    that shared intermediate [tokens, features] to memory for the backward to read (one
    more pass each way) instead of recomputing it inside the fusions that need it."""
    return jax.lax.optimization_barrier(arrays)


@jax.custom_vjp
def silu_mul(gate, up):
    """silu(gate) * up, SwiGLU's gating, with a one-pass backward.

    Autodiff of `jax.nn.silu(gate) * up` sums silu's two derivative terms in a separate
    pass and re-reads the [tokens, mlp] operands several times (the widest activations of
    a decoder layer); here the backward reads dh, gate, up and writes both gradients:
    d gate = dh * up * s * (1 + gate * (1 - s)), d up = dh * gate * s with s = sigmoid(gate).
    """
    return jax.nn.silu(gate) * up


def _silu_mul_fwd(gate, up):
    return silu_mul(gate, up), residuals(gate, up)


def _silu_mul_bwd(res, dh):
    gate, up = res
    dtype_g, dtype_u = gate.dtype, up.dtype
    gate, up, dh = (a.astype(jnp.float32) for a in (gate, up, dh))  # fp32 math, fused
    # Two fusions that each read dh, gate, up and recompute the sigmoid (tanh-based in one,
    # exp-based in the other, so XLA does not write a shared sigmoid [tokens, mlp] for them).
    s = 0.5 * jnp.tanh(0.5 * gate) + 0.5
    d_gate = dh * up * (s * (1 + gate * (1 - s)))
    d_up = dh * gate / (1 + jnp.exp(-gate))
    return d_gate.astype(dtype_g), d_up.astype(dtype_u)


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


class GeluMLP(nn.Module):
    """CLIP / ViT MLP: fc2(act(fc1(x))) with biases."""
    hidden: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init()

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                  use_bias=True)
        h = Linear(self.hidden, (EMBED, MLP), name="fc1", **kw)(x)
        h = constrain(activation(self.act)(h), (BATCH, LENGTH, MLP))
        return Linear(x.shape[-1], (MLP, EMBED), name="fc2", **kw)(h)


# --------------------------------------------------------------------------- losses
def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Masked next-token cross-entropy. Returns (sum of token losses, number of tokens),
    both fp32 scalars, so callers can form exact token-weighted means across batches."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((lse - picked) * mask), jnp.sum(mask)
