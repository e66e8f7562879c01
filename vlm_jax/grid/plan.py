"""Compute planning: per-device memory and step time of every run, before launch.

    python -m vlm_jax.grid plan CONFIG [--mesh 8,1,1 | --mesh=-1,4,2 --devices 64]
        [--chip h100] [--mfu 0.4] [--select AXIS=V1,V2] [--compile auto|on|off] [--json]

CONFIG is a grid (`FILE.py[:ARG]` whose config has `grid`) or a single run config. Per
run (runs whose step programs are identical, e.g. differing only in data size, are planned
once) it prints:
- parameters (total / trainable) and, per device: parameter bytes (trainable in
  `model.param_dtype`, frozen in `model.frozen_dtype`), optimizer state (from
  `jax.eval_shape` of the optimizer's init), gradients (fp32, plus the accumulator with
  `train.grad_accum` > 1), the batch, and activations with the configured remat policy;
- activations, by default traced (`traced_activation_bytes`): the residuals autodiff
  keeps for the backward pass in the train step (`jax.make_jaxpr` of its `jax.vjp` on
  abstract params and batch: exact shapes and dtypes, whatever the local backend), plus
  what the backward pass holds at its peak (`transient_bytes`: the loss's logits block or
  one layer's working set). On an H100 (benchmarks/gpu_step.py, a 1.1B Llama, bf16,
  batch 2-32, seq 2048-8192, remat none/dots/full, cuDNN and XLA attention) this was
  0.93-1.01x the allocator's peak, planned from a CPU host; the analytic estimate
  (`activation_bytes`, always shown) 0.76-1.09x, and XLA:CPU's compile of the same step
  1.41-1.68x (it keeps bf16 work in fp32 and fuses differently). `--compile on` (or
  `auto` where the local backend is the chip's platform, e.g. an H100 plan on a GPU
  host, for models < 2B) takes XLA's own number instead (`temp_size_in_bytes` of the
  memory analysis of the AOT-compiled step for one device's share of the batch). All
  follow the attention kernel the chip runs (`vlm_jax.models.attention`: cuDNN flash on
  bf16/fp16 GPUs, splash on TPU keep no [T, T] probabilities; where the local backend
  cannot run that kernel, `einsum_remat`, which keeps none either, stands in);
- a step-time estimate: training FLOPs per step (`vlm_jax.train.flops`) / (devices x
  peak bf16 FLOP/s of `--chip` x `--mfu`), and the run's total time;
- a warning when the total exceeds the chip's HBM (`HBM_GIB`, less `--headroom`).
Nothing is allocated: params, optimizer state and batches are abstract
(`jax.ShapeDtypeStruct`), so 7B-13B configs plan on a laptop. Exit code 1 when some run
does not fit (so a launch script can refuse it), 2 on a config error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, NamedTuple, Sequence

from vlm_jax.grid import expand

GIB = 1024 ** 3
# Memory per chip (GiB) and dense bf16 peak FLOP/s (vendor numbers; GPUs without sparsity).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "a100": 80, "h100": 80, "h200": 141}
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "a100": 312e12,
              "h100": 989e12, "h200": 989e12}
CHIPS = tuple(HBM_GIB)


class _MeshShape:
    """What `sharding.logical_to_spec` needs of a mesh: its axis sizes (no devices)."""

    def __init__(self, shape: Sequence[int]):
        from vlm_jax.train.sharding import MESH_AXES
        self.shape = dict(zip(MESH_AXES, (int(s) for s in shape)))
        self.size = math.prod(self.shape.values())


@dataclasses.dataclass
class RunPlan:
    names: list[str]
    params_total: int = 0
    params_trainable: int = 0
    bytes: dict = dataclasses.field(default_factory=dict)   # per device
    activations_source: str = "analytic"
    attention: str = ""            # the attention kernel on the chip (models.attention)
    activations_analytic: float = 0.0
    flops_per_step: float = 0.0
    step_time_s: float = 0.0
    steps: int = 0
    run_time_h: float = 0.0
    hbm_gib: float = 0.0
    fits: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_gib"] = self.total_bytes / GIB
        d["gib"] = {k: v / GIB for k, v in self.bytes.items()}
        return d


# ----------------------------------------------------------------------------- pieces
def parse_mesh(text: str, devices: int = 0) -> tuple[int, int, int]:
    """"8,1,1" -> (8, 1, 1); one -1 takes the rest of `devices`."""
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise expand.GridError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR, e.g. 8,1,1") from None
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise expand.GridError(f"--mesh {text!r}: three positive sizes, at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if devices <= 0 or devices % known:
            raise expand.GridError(f"--mesh {text!r} has -1: pass --devices N, a multiple of "
                                   f"{known}")
        shape = tuple(devices // known if s == -1 else s for s in shape)
    return shape


def _itemsize(name) -> int:
    import jax.numpy as jnp
    from vlm_jax.models.layers import dtype_of
    return jnp.dtype(dtype_of(name)).itemsize


def abstract_params(config, batch: int = 1):
    """(model, boxed abstract params, abstract batch spec) via `jax.eval_shape`."""
    import jax
    from vlm_jax.models import batch_spec, build_model
    model = build_model(config.model)
    spec = {k: v for k, v in batch_spec(config, batch).items() if not k.startswith("_")}
    boxed = jax.eval_shape(lambda r, b: model.init(r, b, deterministic=True)["params"],
                           jax.random.PRNGKey(0), spec)
    return model, boxed, spec


def _param_leaves(boxed, mesh: _MeshShape, trainable_patterns):
    """[(path, n_elements, shard divisor, trainable)] for every param leaf."""
    import flax.linen as nn
    import jax
    from flax import traverse_util
    from vlm_jax.train import optim, sharding
    flat = traverse_util.flatten_dict(
        jax.tree.map(lambda x: x, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
        sep="/")
    out = []
    pats = optim._patterns(trainable_patterns)
    for path, leaf in flat.items():
        names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        spec = sharding.logical_to_spec(names, value.shape, mesh)
        div = 1
        for axes in spec:
            for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())):
                div *= mesh.shape[a]
        out.append((path, int(math.prod(value.shape)), div,
                    optim.is_trainable(path, pats), value))
    return out


def chip_attention(config, chip: str | None, tower: str = "llm") -> str:
    """The attention kernel `model.attention_impl` runs for `tower` ("llm" / "vision") on
    `chip` (None: the local backend), as `vlm_jax.models.attention.resolve` picks it."""
    from vlm_jax.models import attention
    from vlm_jax.models.layers import dtype_of
    m = config.model
    c = m.llm if tower == "llm" else m.vision
    hd = c.get("head_dim", 0) or c.width // max(1, c.get("heads", 1))
    backend, cap = attention.chip_backend(chip) if chip else (None, None)
    return attention.resolve(m.get("attention_impl", ""), dtype_of(m.get("dtype")), hd,
                             backend=backend, capability=cap)


def activation_bytes(config, per_device_batch: float, mesh: _MeshShape,
                     trainable_components: Sequence[str], chip: str | None = None) -> float:
    """Analytic per-device activation memory of one (micro-)batch's train step.

    LLM layer (tokens t = b x T, compute dtype bytes e, tensor-parallel size p): with
    remat "none" it keeps its input, two norm outputs, q/k/v, the attention output, the
    SwiGLU gate/up/product and the attention probabilities ([heads, T, T] fp32; with a
    flash kernel on `chip`, cuDNN or splash, only their fp32 log-sum-exp [heads, T]);
    "dots" keeps the weight-matmul outputs; "full" keeps only the layer input, plus one
    layer's worth recomputed in the backward pass. Only components a gradient flows
    through keep activations (a frozen encoder before every trainable part runs forward
    only: one layer's worth). The loss keeps fp32 logits and their gradient over the
    whole sequence, or one `loss_chunk` block with the fused loss.
    """
    e, p = _sizes(config, mesh)
    total = 0.0
    for tw in _towers(config, trainable_components, chip):
        per, peak = _layer_bytes(tw, per_device_batch, p, e)
        # a tower no gradient runs through: forward only, about one layer alive at a time
        total += (tw.c.depth * per + peak) if tw.flows else per + peak
        if tw.name == "llm":
            total += _loss_bytes(tw.c, per_device_batch, tw.t_seq, p)
    return total


def _sizes(config, mesh: _MeshShape) -> tuple[int, int]:
    """(compute dtype bytes, tensor-parallel size)."""
    return _itemsize(config.model.get("dtype", "float32")), mesh.shape.get("tensor", 1)


def _dims(c) -> tuple[int, int, int, int, int]:
    """(width, query width, key/value width, MLP width, heads) of a tower's layer config."""
    heads = c.get("heads", 1)
    hd = c.get("head_dim", 0) or c.width // heads
    return c.width, heads * hd, (c.get("kv_heads", 0) or heads) * hd, c.mlp_dim, heads


class _Tower(NamedTuple):
    name: str            # "vision" | "llm"
    c: Any               # its layer config (model.vision / model.llm)
    t_seq: int           # tokens per example
    flows: bool          # the backward pass runs through it
    kernel: str          # the attention kernel it runs on the chip (`chip_attention`)

    @property
    def remat(self) -> str:
        return self.c.get("remat", "none")

    @property
    def flash(self) -> bool:
        from vlm_jax.models.attention import FLASH_IMPLS
        return self.kernel in FLASH_IMPLS


def _layer_bytes(tw: _Tower, b, p, e):
    """(bytes one layer keeps for the backward pass, bytes one layer holds while it is
    recomputed there) of `activation_bytes`' analytic model."""
    d, q, kv, mlp, heads = _dims(tw.c)
    t = b * tw.t_seq
    attn_probs = 4.0 * b * heads / p * tw.t_seq * (1 if tw.flash else tw.t_seq)
    full = e * t * (3 * d + (q + 2 * kv + q) / p + 3 * mlp / p) + attn_probs
    if tw.remat == "full":
        return e * t * d, full
    if tw.remat in ("dots", "dots_all"):
        return e * t * (2 * d + (q + 2 * kv) / p + 2 * mlp / p) + e * t * d, full
    return full, 0.0


def _loss_bytes(c, b, t_seq, p) -> float:
    """fp32 logits and their gradient: one `loss_chunk` block, or the whole sequence."""
    chunk = int(c.get("loss_chunk", 0) or 0)
    positions = min(chunk, t_seq) if chunk > 0 else t_seq
    return 2 * 4.0 * b * positions * c.vocab_size / p


def _towers(config, trainable_components: Sequence[str], chip: str | None) -> list[_Tower]:
    """The attention stacks of the model, in forward order."""
    m = config.model
    flows = _grad_flows(config, trainable_components)
    out = []
    if m.kind in ("vlm", "native", "clip") and not (
            m.kind == "vlm" and config.train.get("feature_cache", False)):
        v = m.vision
        out.append(_Tower("vision", v, (v.image_size // v.patch_size) ** 2
                          + int(bool(v.get("class_token", False))),
                          bool(flows.get("vision") or flows.get("text")),
                          chip_attention(config, chip, "vision")))
    if m.kind in ("vlm", "native", "lm"):
        t_seq = config.data.seq_len
        if m.kind == "vlm":
            from vlm_jax.models.vlm import num_image_tokens
            t_seq += num_image_tokens(m)
        out.append(_Tower("llm", m.llm, t_seq, bool(flows.get("llm", True)),
                          chip_attention(config, chip, "llm")))
    return out


def _grad_flows(config, trainable_components) -> dict[str, bool]:
    """Per component (forward order): whether the backward pass runs through it (it or an
    earlier component is trained)."""
    from vlm_jax.train import flops as F
    trainable = set(trainable_components)
    flows, seen = {}, False
    for k in F.forward_per_example(config):
        seen = seen or k in trainable
        flows[k] = seen
    return flows


def transient_bytes(config, per_device_batch: float, mesh: _MeshShape,
                    trainable_components: Sequence[str], chip: str | None = None) -> float:
    """What the backward pass holds beyond the kept activations at its peak: the larger of
    the loss's fp32 logits block and its gradient, and one layer's working set (a
    rematerialised layer's activations; for attention without a flash kernel, the
    [T, S] score gradients in fp32, twice). Calibrated on an H100 (benchmarks/gpu_step.py:
    a 1.1B Llama at seq 2048, cuDNN and XLA attention, remat none and dots)."""
    e, p = _sizes(config, mesh)
    b = per_device_batch
    peak = 0.0
    for tw in _towers(config, trainable_components, chip):
        if tw.name == "llm":
            peak = max(peak, _loss_bytes(tw.c, b, tw.t_seq, p))
        if not tw.flows:
            continue
        _, full = _layer_bytes(tw, b, p, e)
        scores = 0.0 if tw.flash else 2 * 4.0 * b * _dims(tw.c)[-1] / p * tw.t_seq ** 2
        peak = max(peak, full + scores)
    return peak


# XLA's attention on a GPU without remat keeps more per layer than autodiff's residuals
# (the fp32 and bf16 probabilities): measured on an H100 (1.1B Llama, seq 2048, batch 1
# and 2, benchmarks/gpu_step.py) 3.2 bytes more per [T, S] score element and layer.
XLA_GPU_SCORE_BYTES = 3.2


def xla_score_bytes(config, per_device_batch: float, mesh: _MeshShape,
                    trainable_components: Sequence[str], chip: str | None) -> float:
    """The score buffers XLA keeps beyond the traced residuals for attention without a
    flash kernel and without remat on a GPU chip (`XLA_GPU_SCORE_BYTES` per element)."""
    from vlm_jax.models import attention as attn_lib
    if chip is None or attn_lib.chip_backend(chip)[0] != "gpu":
        return 0.0
    _, p = _sizes(config, mesh)
    return sum(tw.c.depth * XLA_GPU_SCORE_BYTES * per_device_batch * _dims(tw.c)[-1] / p
               * tw.t_seq ** 2 for tw in _towers(config, trainable_components, chip)
               if tw.flows and tw.remat == "none" and not tw.flash)


def cudnn_residual_bytes(config, per_device_batch: float, mesh: _MeshShape,
                         trainable_components: Sequence[str], chip: str | None) -> float:
    """What cuDNN's attention keeps per layer (remat none) beyond `einsum_remat`, the
    stand-in traced where cuDNN cannot run: its output once more (the `lax.cond` that picks
    lengths or a bias returns it as a residual of its own) and its fp32 log-sum-exp.
    Measured on an H100: the trace with cuDNN itself was 1.55 GB above the stand-in's for
    a 1.1B Llama at 16k tokens a step (22 layers x 16k x (2048 x 2 + 32 x 4) bytes)."""
    e, p = _sizes(config, mesh)
    total = 0.0
    for tw in _towers(config, trainable_components, chip):
        if tw.flows and tw.remat == "none" and tw.kernel == "cudnn":
            _, q, _, _, heads = _dims(tw.c)
            total += tw.c.depth * per_device_batch * tw.t_seq * (e * q + 4.0 * heads) / p
    return total


def traced_activation_bytes(config, model, boxed, spec, mesh: _MeshShape, leaves,
                            trainable_patterns) -> tuple[float, float]:
    """(activations kept for the backward pass, compute-dtype weight copies kept with
    them), per device: the residuals autodiff saves in the train step's forward pass
    (`jax.make_jaxpr` of `jax.vjp` with respect to the trainable params, abstract
    params and batch: nothing is computed, the backend does not matter), less those that
    are the params or the batch themselves. Weight copies (e.g. the bf16 casts of fp32
    layer weights that the backward pass reads) are divided like their params; the rest
    is the per-device batch's, divided by the tensor-parallel size the analytic model
    gives (an estimate)."""
    import jax
    import jax.extend.core as jex_core
    import jax.numpy as jnp
    from vlm_jax.train import optim, step as step_lib
    trainable, frozen = _step_params(config, boxed, trainable_patterns)

    def loss(tr, fr, batch):
        return step_lib._forward(model, optim.merge_params(tr, fr), batch)["loss_sum"] \
            .astype(jnp.float32)
    closed = jax.make_jaxpr(lambda tr, fr, batch: jax.vjp(
        lambda t: loss(t, fr, batch), tr))(trainable, frozen, spec)
    jaxpr = closed.jaxpr
    inputs = set(jaxpr.invars)
    seen, weights, acts = set(), 0.0, 0.0
    divs, stacked = {}, {}
    for _, _, div, _, value in leaves:
        shape = tuple(value.shape)
        divs.setdefault(shape, div)
        if len(shape) >= 3:   # a scanned stack: a residual may hold some of its layers
            stacked.setdefault(shape[1:], (shape[0], div))
    for v in jaxpr.outvars[1:]:          # [loss, *residuals]
        if isinstance(v, jex_core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        shape = tuple(v.aval.shape)
        nbytes = math.prod(shape) * v.aval.dtype.itemsize
        if shape in divs:
            weights += nbytes / divs[shape]
        elif len(shape) >= 3 and shape[1:] in stacked and shape[0] <= stacked[shape[1:]][0]:
            weights += nbytes / stacked[shape[1:]][1]   # e.g. all layers but the last
        else:
            acts += nbytes
    return acts, weights


def _step_params(config, boxed, trainable_patterns):
    """Abstract (trainable, frozen) params as the trainer passes them to the step (frozen
    in `model.frozen_dtype`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from vlm_jax.models.layers import dtype_of
    from vlm_jax.train import optim
    trainable, frozen = optim.split_params(nn.unbox(boxed), trainable_patterns)
    fdt = jnp.dtype(dtype_of(config.model.get("frozen_dtype", "float32")))
    if frozen and fdt != jnp.float32:
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, fdt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), frozen)
    return trainable, frozen


def _compiled_temp_bytes(config, model, boxed, spec_fn, per_device_batch: int,
                         trainable_patterns):
    """XLA's temp bytes of the train step compiled for one device's share of the batch."""
    import jax
    from vlm_jax.train import optim, step as step_lib
    from vlm_jax.train.trainer import FAST_COMPILE
    trainable, frozen = _step_params(config, boxed, trainable_patterns)
    tx, sched = optim.make_optimizer(config.optim, int(config.train.steps))
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), trainable)
    fn = step_lib.make_train_step(model, tx, sched, int(config.train.grad_accum))
    batch = spec_fn(per_device_batch)
    # XLA:CPU's fast level (LLVM -O0): the same buffer assignment, a third of the compile
    compiled = jax.jit(fn).lower(state, frozen, batch).compile(
        FAST_COMPILE if jax.default_backend() == "cpu" else None)
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return float(mem.temp_size_in_bytes)


def _records(config) -> int:
    from vlm_jax.data.subsets import parse_size
    try:
        return max(parse_size(config.data.n), 0) + max(parse_size(config.data.eval_n), 0)
    except ValueError:
        return 0


def plan_config(config, mesh_shape, chip: str, mfu: float, compile_mode: str = "auto",
                headroom: float = 0.1, names: Sequence[str] = (),
                cache_records: int = 0) -> RunPlan:
    """The plan of one run config on `mesh_shape` devices of `chip` (`cache_records`:
    records the feature cache holds, default the run's own train + eval records)."""
    import jax
    import optax
    from vlm_jax.models import batch_spec
    from vlm_jax.train import flops as F
    from vlm_jax.train import optim
    mesh = _MeshShape(mesh_shape)
    t = config.train
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    B = int(t.batch_size)
    accum = int(t.get("grad_accum", 1))
    if B % dp or (B // accum) % dp:
        raise expand.GridError(f"train.batch_size={B} (grad_accum {accum}) does not split over "
                               f"the data-parallel size {dp} of mesh {mesh_shape}")
    plan = RunPlan(names=list(names))
    model, boxed, _ = abstract_params(config)
    leaves = _param_leaves(boxed, mesh, config.optim.trainable)
    m = config.model
    tr_size = _itemsize(m.get("param_dtype", "float32"))
    fr_size = _itemsize(m.get("frozen_dtype", "float32"))
    plan.params_total = sum(n for _, n, _, _, _ in leaves)
    plan.params_trainable = sum(n for _, n, _, tr, _ in leaves if tr)
    fc_on = m.kind == "vlm" and bool(t.get("feature_cache", False))
    by = {"params_trainable": 0.0, "params_frozen": 0.0, "grads": 0.0}
    for path, n, div, tr, _ in leaves:
        if tr:
            by["params_trainable"] += n * tr_size / div
            by["grads"] += n * 4.0 / div * (2 if accum > 1 else 1)
        elif not (fc_on and path.startswith("vision/")):
            by["params_frozen"] += n * fr_size / div
    # optimizer state: eval_shape of the optimizer's init, sharded like its params
    tx, _ = optim.make_optimizer(config.optim, int(t.steps))
    from flax import traverse_util
    flat_tr = {p: v for p, _, _, tr, v in leaves if tr}
    divs = {p: d for p, _, d, tr, _ in leaves if tr}
    tr_tree = traverse_util.unflatten_dict(flat_tr, sep="/")
    div_tree = traverse_util.unflatten_dict(divs, sep="/")
    opt = jax.eval_shape(tx.init, tr_tree)
    opt_bytes = optax.tree_map_params(
        tx, lambda x, d: x.size * x.dtype.itemsize / d, opt, div_tree,
        transform_non_params=lambda x: getattr(x, "size", 0) * getattr(
            getattr(x, "dtype", None), "itemsize", 0))
    by["optimizer"] = float(sum(jax.tree.leaves(opt_bytes)))
    # batch
    spec = batch_spec(config, B)
    if fc_on:
        from vlm_jax.models.vit import num_feature_tokens
        spec = {k: v for k, v in spec.items() if k != "pixels"}
        spec["features"] = jax.ShapeDtypeStruct(
            (B, num_feature_tokens(m.vision), m.vision.width), m.get("dtype", "float32"))
    by["batch"] = float(sum(math.prod(s.shape) * s.dtype.itemsize for k, s in spec.items()
                            if not k.startswith("_"))) / dp
    trainable_components = sorted({p.split("/")[0] for p, _, _, tr, _ in leaves if tr})
    per_dev_b = B // accum // dp
    plan.activations_analytic = activation_bytes(config, per_dev_b, mesh, trainable_components,
                                                 chip)
    act = plan.activations_analytic
    from vlm_jax.models import attention as attn_lib
    kernel = chip_attention(config, chip) if m.kind != "clip" else \
        chip_attention(config, chip, "vision")
    plan.attention = kernel
    # XLA's memory analysis is the chip's own only where the local backend is its
    # platform (an H100 plan on a GPU host); elsewhere (XLA:CPU keeps bf16 work in fp32,
    # fuses differently: 1.4-1.7x an H100's peak, measured) the residuals are traced
    same_platform = jax.default_backend() == attn_lib.chip_backend(chip)[0]
    want_compile = compile_mode == "on" or (
        compile_mode == "auto" and same_platform and plan.params_total < 2e9)
    local_config, local_model = config, model
    if kernel in attn_lib.FLASH_IMPLS and chip_attention(config, None) not in \
            attn_lib.FLASH_IMPLS:
        # the local backend cannot run the chip's kernel: a model whose attention keeps,
        # like it, no probabilities (recomputed in the backward pass) stands in
        local_config = config.copy_and_resolve_references()
        local_config.model.attention_impl = "einsum_remat"
        local_model, _, _ = abstract_params(local_config)

    def spec_fn(b):
        s = batch_spec(local_config, b)
        if fc_on:
            s = {k: v for k, v in s.items() if k != "pixels"}
            s["features"] = jax.ShapeDtypeStruct((b,) + spec["features"].shape[1:],
                                                 spec["features"].dtype)
        return {k: v for k, v in s.items() if not k.startswith("_")}
    if want_compile:
        try:
            temp = _compiled_temp_bytes(local_config, local_model, boxed,
                                        lambda b: spec_fn(b * accum), per_dev_b,
                                        config.optim.trainable)
            if temp is not None:
                act = temp
                plan.activations_source = f"xla:{jax.default_backend()}"
                if local_model is not model:
                    plan.notes.append(f"XLA activations compiled with einsum_remat (no saved "
                                      f"attention probabilities, like {kernel} on {chip})")
                if mesh.shape["tensor"] > 1:
                    plan.notes.append("XLA activations compiled without tensor parallelism "
                                      "(an upper bound)")
        except Exception as e:  # noqa: BLE001 - the traced number stands in
            plan.notes.append(f"compile failed ({type(e).__name__}: {str(e)[:120]})")
    if plan.activations_source == "analytic":
        try:
            from vlm_jax.models import layers   # traced as the chip's program
            with layers.matmul_platform(attn_lib.chip_backend(chip)[0]):
                kept, weights = traced_activation_bytes(local_config, local_model, boxed,
                                                        spec_fn(per_dev_b), mesh, leaves,
                                                        config.optim.trainable)
            if mesh.shape["tensor"] > 1:   # traced without tensor parallelism
                one = _MeshShape((mesh.shape["data"], mesh.shape["fsdp"], 1))
                kept *= act / activation_bytes(config, per_dev_b, one, trainable_components,
                                               chip)
            act = kept + weights + transient_bytes(config, per_dev_b, mesh,
                                                   trainable_components, chip)
            extra = xla_score_bytes(config, per_dev_b, mesh, trainable_components, chip)
            if extra:
                act += extra
                plan.notes.append(f"+{extra / GIB:.1f} GiB: XLA's attention without remat "
                                  f"keeps [T, S] scores beyond autodiff's residuals on a GPU "
                                  f"(measured); a flash kernel (bf16: cuDNN) or remat avoids it")
            plan.activations_source = "traced"
            if local_model is not model:
                act += cudnn_residual_bytes(config, per_dev_b, mesh, trainable_components,
                                            chip)
                plan.notes.append(f"residuals traced with einsum_remat standing in for "
                                  f"{kernel} on {chip}")
        except Exception as e:  # noqa: BLE001 - the analytic number stands in
            plan.notes.append(f"trace failed ({type(e).__name__}: {str(e)[:120]}); "
                              "analytic activations")
    by["activations"] = float(act)
    plan.bytes = by
    # time
    fl = F.train_per_example(config, trainable_components)
    if fc_on:
        fl -= F.forward_per_example(config).get("vision", 0.0)
        f = spec["features"]
        records = cache_records or _records(config)
        disk = records * math.prod(f.shape[1:]) * f.dtype.itemsize
        plan.notes.append(f"feature cache: no encoder FLOPs per step; {disk / GIB:,.1f} GiB "
                          f"on disk for {records:,} records ({f.shape[1]}x{f.shape[2]} "
                          f"{f.dtype.name} each)")
    plan.flops_per_step = fl * B
    plan.steps = int(t.steps)
    plan.step_time_s = plan.flops_per_step / (mesh.size * PEAK_FLOPS[chip] * mfu)
    plan.run_time_h = plan.step_time_s * plan.steps / 3600.0
    plan.hbm_gib = float(HBM_GIB[chip])
    plan.fits = plan.total_bytes <= (1.0 - headroom) * HBM_GIB[chip] * GIB
    if not plan.fits:
        plan.notes.append(_advice(config, plan, mesh))
    return plan


def _advice(config, plan: RunPlan, mesh: _MeshShape) -> str:
    tips = []
    if config.model.get("llm") is not None and config.model.llm.get("remat", "none") != "full":
        tips.append("model.llm.remat=full")
    if mesh.shape["fsdp"] == 1:
        tips.append("shard params with mesh fsdp > 1")
    if config.model.get("llm") is not None and not config.model.llm.get("loss_chunk", 0):
        tips.append("model.llm.loss_chunk=512")
    if config.model.get("frozen_dtype", "float32") == "float32":
        tips.append("model.frozen_dtype=bfloat16")
    tips.append("a smaller train.batch_size or train.grad_accum > 1")
    return (f"WILL NOT FIT: {plan.total_bytes / GIB:.1f} GiB per device > "
            f"{plan.hbm_gib:.0f} GiB HBM; try " + ", ".join(tips))


# ----------------------------------------------------------------------------- configs
def _signature(config, mesh_shape) -> str:
    """Runs with equal signatures compile the same step program."""
    d = config.to_dict()
    for part in ("vision", "llm"):
        if part in d.get("model", {}):
            d["model"][part].pop("init_from", None)
    d["data"] = {k: d["data"].get(k) for k in ("seq_len", "packing", "template")}
    d["train"].pop("steps", None)   # the schedule's length: same program, same memory
    d.pop("name", None)
    d.pop("grid", None)
    return json.dumps([d, list(mesh_shape)], sort_keys=True, default=str)


def load_runs(spec: str, select=None) -> list[tuple[str, Any]]:
    """[(run name, config)] of a grid spec, or [("run", config)] of a single run config."""
    path, arg = expand.split_spec(spec)
    module = expand.load_config_module(path)
    cfg = expand.build_config(path, arg or "grid", module) if arg else None
    if cfg is None:
        cfg = expand.build_config(path, "grid", module)
    if cfg.get("grid") is None:
        return [(spec, cfg)]
    grid = expand.load_grid(spec if arg else f"{path}:grid", select=select)
    return list(expand.build_run_configs(grid.runs).items())


def plan_runs(runs, mesh_shape, chip, mfu, compile_mode="auto", headroom=0.1):
    """Plans each distinct step program once; returns RunPlans (with all their names)."""
    groups: dict[str, list] = {}
    for name, cfg in runs:
        groups.setdefault(_signature(cfg, mesh_shape), []).append((name, cfg))
    plans = []
    for members in groups.values():
        names = [n for n, _ in members]
        p = plan_config(members[0][1], mesh_shape, chip, mfu, compile_mode, headroom, names,
                        cache_records=max(_records(c) for _, c in members))
        # runs of a group share memory; steps (data size) differ: report the longest
        p.steps = max(int(c.train.steps) for _, c in members)
        p.run_time_h = sum(p.step_time_s * int(c.train.steps) for _, c in members) / 3600.0
        plans.append(p)
    return plans


def _fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_table(plans: Sequence[RunPlan], chip: str, mesh_shape, mfu: float) -> str:
    big = any(p.total_bytes >= GIB for p in plans)
    unit, scale = ("GiB", GIB) if big else ("MiB", 1024 ** 2)
    lines = [f"plan on {math.prod(mesh_shape)} x {chip} (mesh data,fsdp,tensor = "
             f"{','.join(map(str, mesh_shape))}; HBM {HBM_GIB[chip]} GiB; MFU {mfu:.0%})",
             f"{'run(s)':44s} {'params':>8s} {'train':>8s} | per device {unit}: "
             f"{'par':>7s} {'opt':>7s} {'grad':>7s} {'act':>8s} {'total':>8s} | "
             f"{'step s':>9s} {'hours':>8s}  fit"]
    for p in plans:
        more = f" (+{len(p.names) - 1})" if len(p.names) > 1 else ""
        name = p.names[0][:44 - len(more)] + more
        g = {k: v / scale for k, v in p.bytes.items()}
        par = g["params_trainable"] + g["params_frozen"]
        lines.append(
            f"{name[:44]:44s} {_fmt_count(p.params_total):>8s} "
            f"{_fmt_count(p.params_trainable):>8s} | {'':15s}{par:7.2f} {g['optimizer']:7.2f} "
            f"{g['grads']:7.2f} {g['activations']:8.2f} {p.total_bytes / scale:8.2f} | "
            f"{p.step_time_s:9.2e} {p.run_time_h:8.3f}  {'ok' if p.fits else 'NO'}")
        lines.append(f"{'':46s}activations: {p.activations_source}"
                     f" (analytic {p.activations_analytic / scale:.2f} {unit}); "
                     f"attention: {p.attention}")
        for note in p.notes:
            lines.append(f"{'':46s}{note}")
    bad = [p for p in plans if not p.fits]
    if bad:
        lines.append(f"WARNING: {sum(len(p.names) for p in bad)} run(s) will not fit on "
                     f"{chip}; fix them before launching")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.grid plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="FILE.py[:ARG]: a grid or a single run config")
    p.add_argument("--mesh", default="", help="DATA,FSDP,TENSOR (default: the config's "
                   "mesh.shape with -1 = --devices)")
    p.add_argument("--devices", type=int, default=0, help="devices in all (for -1 in --mesh)")
    p.add_argument("--chip", default="h100", choices=CHIPS)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of HBM kept free (XLA buffers, fragmentation)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="XLA memory analysis of the AOT-compiled step with the local "
                   "backend (auto: models < 2B where the local backend is the chip's "
                   "platform; otherwise the traced residuals)")
    p.add_argument("--select", action="append", default=[], metavar="AXIS=V1,V2")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        print("[plan] error: --mfu must be in (0, 1]", file=sys.stderr)
        return 2
    if not 0 <= args.headroom < 1:
        print("[plan] error: --headroom is the fraction of HBM kept free: in [0, 1)",
              file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.config, expand.parse_selection(args.select))
        if args.mesh:
            mesh_shape = parse_mesh(args.mesh, args.devices)
        else:
            shape = tuple(runs[0][1].mesh.shape)
            mesh_shape = parse_mesh(",".join(map(str, shape)), args.devices or 1)
        plans = plan_runs(runs, mesh_shape, args.chip, args.mfu, args.compile, args.headroom)
    except (expand.GridError, ValueError) as e:
        print(f"[plan] error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"chip": args.chip, "mesh": list(mesh_shape), "mfu": args.mfu,
                          "runs": [pl.to_json() for pl in plans]}, indent=1, default=str))
    else:
        print(format_table(plans, args.chip, mesh_shape, args.mfu))
    return 0 if all(pl.fits for pl in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
