"""Analytic model FLOPs (matmuls and attention), for MFU and `result.json`'s `flops`.

Counts multiply-adds of every dense layer as 2 FLOPs and attention as 2 x (QK^T + AV)
over the full T x T square (what XLA computes; causal masking does not skip work).
Norms, softmax, activations and embedding gathers are ignored (< 1% at real sizes).

Training FLOPs per component: forward F; backward 2F for a component with trainable
params (input and weight gradients), F for a frozen component that a trainable one
precedes (input gradients only), 0 for a frozen component before every trainable one
(no gradient flows into it). `tests/train/test_train_flops.py` checks the count against
XLA's `compiled.cost_analysis()`.
"""
from __future__ import annotations

from typing import Iterable


def _vit_tokens(v, image_size=None) -> int:
    g = (image_size or v.image_size) // v.patch_size
    return g * g + int(bool(v.class_token))


def vit_forward(v, layers: int | None = None) -> float:
    """One image through the patch embedding and `layers` blocks (default: all)."""
    layers = v.depth if layers is None else layers
    t = _vit_tokens(v)
    d, m = v.width, v.mlp_dim
    patches = (v.image_size // v.patch_size) ** 2
    f = 2.0 * patches * (v.patch_size ** 2 * 3) * d
    per_layer = 2.0 * t * d * 3 * d + 2.0 * t * d * d + 4.0 * t * t * d + 4.0 * t * d * m
    return f + layers * per_layer


def vit_feature_layers(v) -> int:
    n = v.depth + 1
    return v.feature_layer % n


def llm_forward(c, t: int, logits_tokens: int | None = None) -> float:
    """One sequence of `t` tokens through the decoder and the LM head (on
    `logits_tokens` positions, default all)."""
    hd = c.head_dim or c.width // c.heads
    d, m = c.width, c.mlp_dim
    q = c.heads * hd
    kv = c.kv_heads * hd
    per_layer = (2.0 * t * d * (q + 2 * kv) + 2.0 * t * q * d + 4.0 * t * t * q
                 + 6.0 * t * d * m)
    if c.get("experts", False) and c.get("expert_impl", "masked") == "masked":
        per_layer = per_layer + (per_layer - 4.0 * t * t * q)  # both experts run
    lt = t if logits_tokens is None else logits_tokens
    return c.depth * per_layer + 2.0 * lt * d * c.vocab_size


def projector_forward(p, k: int, din: int, dout: int) -> float:
    from vlm_jax.models.counts import num_linear
    n = num_linear(p.type)
    if p.type == "pixel_shuffle":
        s = round(1 / p.shuffle_ratio)
        k, din = k // (s * s), din * s * s
    return 2.0 * k * din * dout + (n - 1) * 2.0 * k * dout * dout


def clip_text_forward(c, t: int) -> float:
    w = c.text_width
    per_layer = 2.0 * t * w * 3 * w + 2.0 * t * w * w + 4.0 * t * t * w + 4.0 * t * w * 4 * w
    return c.text_depth * per_layer


def native_forward_per_row(config) -> dict[str, float]:
    """A packed native row (kind "native") as the step runs it, padding included: the ViT
    on `data.native.max_patches` patches (SwiGLU blocks; attention over the whole row, the
    image mask skips no work), the connector on a quarter of them, the LLM on
    `data.seq_len` tokens (its visual tokens among them)."""
    m, v = config.model, config.model.vision
    p = int(config.data.native.max_patches) or 2 * int(config.data.seq_len)
    w, q = v.width, v.heads * (v.get("head_dim", 0) or v.width // v.heads)
    per_layer = 2.0 * p * w * 3 * q + 2.0 * p * q * w + 4.0 * p * p * q + 6.0 * p * w * v.mlp_dim
    fv = 2.0 * p * (v.patch_size ** 2 * 3) * w + v.depth * per_layer
    return {"vision": fv, "projector": projector_forward(m.projector, p, w, m.llm.width),
            "llm": llm_forward(m.llm, int(config.data.seq_len))}


def forward_per_example(config) -> dict[str, float]:
    """Forward FLOPs per example (per packed row for kind "native": the trainer multiplies
    by the rows a step runs), by top-level param subtree, in data-flow order."""
    m = config.model
    kind = m.kind
    if kind == "native":
        return native_forward_per_row(config)
    if kind == "lm":
        return {"llm": llm_forward(m.llm, config.data.seq_len)}
    if kind == "clip":
        v, c = m.vision, m.clip
        t = min(config.data.seq_len, c.text_max_len)
        return {"vision": vit_forward(v), "text": clip_text_forward(c, t),
                "head": 2.0 * (v.width + c.text_width) * c.embed_dim}
    if kind in ("vlm", "native"):
        v = m.vision
        if v.get("variant", "clip") == "clip":
            from vlm_jax.models.counts import num_feature_tokens
            k = num_feature_tokens(v)
            fv = vit_forward(v, vit_feature_layers(v))
        else:  # native ViT: same block shapes (no CLS); an estimate
            k = (v.image_size // v.patch_size) ** 2
            fv = vit_forward(v, v.depth) * 1.0
        from vlm_jax.models.counts import num_output_tokens
        k_out = num_output_tokens(m.projector, k)
        t = k_out + config.data.seq_len
        return {"vision": fv, "projector": projector_forward(m.projector, k, v.width,
                                                             m.llm.width),
                "llm": llm_forward(m.llm, t)}
    raise ValueError(f"model.kind={kind!r}: no FLOP count for it")


def train_per_example(config, trainable_components: Iterable[str]) -> float:
    """Training FLOPs per example (forward + backward) given which top-level components
    hold trainable params."""
    fwd = forward_per_example(config)
    trainable = set(trainable_components)
    order = list(fwd)
    if config.model.kind == "clip":  # two parallel towers feeding the head
        return sum(3 * f if k in trainable else (2 * f if k == "head" and trainable - {k}
                                                 else f)
                   for k, f in fwd.items())
    total, grad_flows = 0.0, False
    for k in order:
        f = fwd[k]
        if k in trainable:
            total += 3 * f
            grad_flows = True
        else:
            total += 2 * f if grad_flows else f
    return total


def eval_per_example(config) -> float:
    return sum(forward_per_example(config).values())
