"""Attention kernels behind `layers.dot_product_attention`, and which one runs where.

`model.attention_impl` picks one; "" picks by backend (`resolve`):

- "einsum" (CPU): `layers.einsum_attention`, heads-major einsums with a flash-style VJP;
  reads the dense [B|1, 1, T, S] mask.
- "cudnn" (CUDA GPUs, bf16/fp16, head dim a multiple of 8 and <= 128, <= 256 from
  Hopper): cuDNN flash attention, `jax.nn.dot_product_attention(implementation="cudnn")`;
  causal as cuDNN's mask type (no mask tensor); segment ids that only mark right padding
  as its padding mask (sequence lengths), packed segments as a mask (a bias, built from
  the segment ids inside the kernel's branch).
- "splash" (TPU): Pallas splash attention (`jax.experimental.pallas.ops.tpu.
  splash_attention`); causal and segment ids as the kernel's block-sparse mask and
  `SegmentIds` (no T x S tensor).
- "xla" (other GPUs, dtypes, head dims): `jax.nn.dot_product_attention(implementation=
  "xla")`, dense mask.
- "einsum_remat" (never by default): "einsum" under `jax.checkpoint`, so the backward
  pass recomputes the probabilities instead of keeping them: a flash kernel's activation
  memory on any backend (`grid plan` compiles with it for chips whose kernel is flash).

(`jax.nn.dot_product_attention` with no implementation runs its XLA lowering on every
backend, cuDNN only when asked; hence the explicit choice here.)

Splash runs under `jax.shard_map` over the mesh of the surrounding `jax.set_mesh` with the
activations' logical sharding (batch over data x fsdp, heads over tensor; a sequence
sharded by the rules is gathered), each device's shard through the kernel with
`jax.vmap` over its rows. Sequences are padded to a multiple of 128 (the kernel's block
granularity) with a segment id of their own, so padded keys are never attended by real
queries; the padded rows are dropped. Off TPU the kernel runs in Pallas' interpret mode
(exact, slow: for tests and debugging).

A query subset attending to all keys (the LLM's last layer on the positions that carry
loss) has no causal structure the kernels know: it uses the dense mask on XLA's path.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("", "einsum", "xla", "cudnn", "splash", "einsum_remat")
DENSE_IMPLS = ("einsum", "xla", "einsum_remat")   # read the [B|1, 1, T, S] mask
FLASH_IMPLS = ("cudnn", "splash")   # keep no [T, S] probabilities for the backward pass
SPLASH_BLOCK = 128                # sequences are padded to a multiple of this
_PAD_SEGMENT = int(np.iinfo(np.int32).min)


def check_impl(impl: str | None) -> str:
    impl = impl or ""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: use one of {IMPLS} "
                         "('' = by backend)")
    return impl


def _cuda_capability() -> float | None:
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
    except RuntimeError:
        return None
    try:
        return float(cc) if cc else None
    except (TypeError, ValueError):
        return None


def cudnn_supports(dtype, head_dim: int, capability: float | None) -> bool:
    """cuDNN flash attention's conditions (jax's `check_is_flash_attention`): bf16/fp16,
    head dim a multiple of 8 and <= 128 (<= 256 from compute capability 9.0)."""
    if capability is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                       jnp.dtype(jnp.float16)):
        return False
    return head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def chip_backend(chip: str) -> tuple[str, float | None]:
    """(jax backend, CUDA capability) of a `grid plan` chip name (v4, v5e, ..., h100)."""
    cap = {"a100": 8.0, "h100": 9.0, "h200": 9.0}
    return ("gpu", cap[chip]) if chip in cap else ("tpu", None)


def resolve(impl: str | None, dtype, head_dim: int, backend: str | None = None,
            capability: float | None = None) -> str:
    """The kernel `impl` means for activations of `dtype` and heads of `head_dim` on
    `backend` (default: jax's); see the module docstring. `capability`: the CUDA compute
    capability (default: the first device's, on "gpu")."""
    impl = check_impl(impl)
    if impl:
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "einsum"
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda"):
        cap = capability if capability is not None else _cuda_capability()
        if cudnn_supports(dtype, head_dim, cap):
            return "cudnn"
    return "xla"


def needs_dense_mask(impl: str | None, dtype, head_dim: int) -> bool:
    """Whether self-attention under `impl` reads the dense [B|1, 1, T, S] mask (so the
    caller builds it) rather than causal + segment ids alone (the kernels)."""
    return resolve(impl, dtype, head_dim) in DENSE_IMPLS


# --------------------------------------------------------------------------- cuDNN
def right_padded(segment_ids) -> tuple[jax.Array, jax.Array]:
    """(every row is one segment followed by padding (id 0), the rows' lengths [B] int32)."""
    valid = segment_ids > 0
    n = jnp.sum(valid, axis=1, dtype=jnp.int32)
    prefix = jnp.all(valid == (jnp.arange(segment_ids.shape[1])[None, :] < n[:, None]))
    same = jnp.all(jnp.where(valid, segment_ids == segment_ids[:, :1], True))
    return prefix & same, n


def _segment_mask(segment_ids, causal: bool = False):
    """[B, 1, T, T] bool: `layers.attention_mask` (same segment, padding only sees padding,
    and if causal no key after its query; imported here, where it runs, as layers imports
    this module)."""
    from vlm_jax.models.layers import attention_mask
    t = segment_ids.shape[1]
    return attention_mask(segment_ids, causal, t, t)


def cudnn_attention(q, k, v, causal: bool, segment_ids=None):
    """cuDNN flash attention: causal as its mask type. With segment ids, a batch whose rows
    are each one sample followed by padding (the VLM/LM batches) runs as cuDNN's padding
    mask with the rows' lengths (no mask tensor: real queries see the same keys, padded
    rows give 0 and carry no loss); any other batch (packed samples) runs with the
    segments' mask as a bias, chosen per batch by `lax.cond` (the bias branch builds the
    mask from the segment ids: a right-padded batch never materialises it). Where cuDNN
    refuses a bias (odd sequence lengths in training) that branch is XLA's attention.

    When jax refuses cuDNN while tracing (no cuDNN, an unsupported shape or dtype) the
    call runs XLA's attention instead, with a warning naming the reason."""
    try:
        return _cudnn_attention(q, k, v, causal, segment_ids)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        _warn_once(f"attention_impl 'cudnn': cuDNN refused ({type(e).__name__}: "
                   f"{str(e)[:200]}); using XLA's attention")
        t, s = q.shape[1], k.shape[1]
        mask = _segment_mask(segment_ids, causal and t == s) if segment_ids is not None \
            else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla",
                                            is_causal=causal and t == s and mask is None)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        logging.getLogger(__name__).warning(msg)


def _cudnn_attention(q, k, v, causal: bool, segment_ids=None):
    t, s = q.shape[1], k.shape[1]
    is_causal = causal and t == s
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            implementation="cudnn")
    padded, n = right_padded(segment_ids)

    def by_lengths(q, k, v, n, seg):
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            query_seq_lengths=n, key_value_seq_lengths=n,
                                            implementation="cudnn")

    def by_mask(q, k, v, n, seg):
        impl = "xla" if t % 2 or s % 2 else "cudnn"
        mask = _segment_mask(seg, is_causal and impl == "xla")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                            is_causal=is_causal and impl == "cudnn")
    return jax.lax.cond(padded, by_lengths, by_mask, q, k, v, n, segment_ids)


# --------------------------------------------------------------------------- splash
def _block(t: int) -> int:
    for b in (512, 256):
        if t % b == 0:
            return b
    return SPLASH_BLOCK


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    b = _block(t)
    one = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                          block_kv_dq=b)
    with jax.ensure_compile_time_eval():   # the mask tables are constants, not tracers
        return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, causal: bool, interpret: bool):
    """One device's splash attention: q [b, T, N, H], k/v [b, T, K, H] (T a multiple of
    128), segment_ids [b, T] or None -> [b, T, N, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    kernel = _splash_kernel(q.shape[2], q.shape[1], causal, interpret)
    qs = jnp.swapaxes(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), 1, 2)
    ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if segment_ids is None:
        o = jax.vmap(kernel)(qs, ks, vs)
    else:
        o = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(
            qs, ks, vs, segment_ids)
    return jnp.swapaxes(o, 1, 2)


def _axes_size(mesh, names) -> int:
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def _mesh_specs(b: int, n: int):
    """(mesh, batch axes, head axes) for shard_map from the current mesh and logical
    rules, or None outside a multi-device mesh. Axes that do not divide their dimension
    are dropped (that dimension is then replicated)."""
    import flax.linen as nn
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))

    def axes(entry, dim):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        return names if names and dim % _axes_size(mesh, names) == 0 else ()
    return mesh, axes(spec[0], b), axes(spec[2], n)


def splash_attention(q, k, v, segment_ids=None, causal: bool = False,
                     interpret: bool | None = None):
    """Self-attention (T == S) through Pallas splash attention: q [B, T, N, H], k/v
    [B, T, K, H] (N % K == 0), segment_ids [B, T] (attend within equal ids) -> [B, T, N, H].
    Scale 1/sqrt(H); see the module docstring for padding, sharding and interpret mode."""
    bsz, t, n, h = q.shape
    if k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention: {t} queries vs {k.shape[1]} keys")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    pad = (-t) % SPLASH_BLOCK
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
        seg = jnp.zeros((bsz, t), jnp.int32) if segment_ids is None else segment_ids
        segment_ids = jnp.pad(seg.astype(jnp.int32), ((0, 0), (0, pad)),
                              constant_values=_PAD_SEGMENT)
    elif segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    specs = _mesh_specs(bsz, n)
    if specs is None:
        o = _splash_local(q, k, v, segment_ids, causal, interpret)
        return o[:, :t] if pad else o
    mesh, batch_axes, head_axes = specs
    if k.shape[2] % _axes_size(mesh, head_axes):
        # kv heads do not split like the query heads: one per query head
        k, v = (jnp.repeat(a, n // k.shape[2], axis=2) for a in (k, v))
    from jax.sharding import PartitionSpec as P
    bspec = batch_axes or None
    hspec = head_axes or None
    qkv = P(bspec, None, hspec, None)
    fn = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if segment_ids is None:
        o = jax.shard_map(lambda a, b, c: fn(a, b, c, None), mesh=mesh,
                          in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)(q, k, v)
    else:
        o = jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(bspec, None)),
                          out_specs=qkv, check_vma=False)(q, k, v, segment_ids)
    return o[:, :t] if pad else o


def kernel_attention(impl: str, q, k, v, segment_ids, causal: bool):
    """Self-attention with a structured mask (segment ids, causal) through kernel `impl`
    ("cudnn" / "splash")."""
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, causal)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, causal, segment_ids)
    raise ValueError(f"{impl!r} is not a kernel attention impl (cudnn, splash)")
