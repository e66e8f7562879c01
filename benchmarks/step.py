"""Train-step throughput of vlm_jax vs transformers + PyTorch on CPU, measured in one run.

    python benchmarks/step.py [--steps 4] [--configs llava,demo] [--modes pixels,features]
    python benchmarks/step.py --quick      # the demo config only, 2 steps

Configs:
- `llava`: LLaVA-shaped tiny model: frozen CLIP ViT (6 layers x 384, 6 heads, MLP 1536,
  224 px, patch 16, penultimate-layer patch features), trainable 2-layer GELU MLP
  projector, frozen Llama LLM (6 layers x 512, 8 heads, SwiGLU 1376, vocab 32000);
  batch 8, 32 caption tokens, fp32 (`--dtype bfloat16`: both sides in bf16, below).
- `demo`: `configs/demo.py:run` (tiny ViT / LM, batch 32).

Our step is the trainer's compiled step (`vlm_jax.train.trainer.Run`: the same
shardings, donation and AdamW as a run); the reference is `LlavaForConditionalGeneration`
of the same shapes with frozen towers, only the projector trained by `torch.optim.AdamW`
(forward with loss, backward, step). Both see the same batch size and sequence layout
(image tokens then caption tokens, loss on caption tokens). Each side does what its
library does by default: transformers unembeds all T positions (`logits_to_keep=0`) and
runs every ViT layer (`output_hidden_states`); ours unembeds the T-K+1 positions that can
carry loss, runs the last decoder layer only on them and stops the ViT at the feature
layer. Neither computes weight gradients of the frozen towers. Ours also uses what every
run uses on CPU: einsum attention with a flash-style backward (mask as an additive bias
fused into the score matmul, causal attention as query blocks of >= 64 rows, 3 here,
each against the keys up to its end: 2/3 of the score/value FLOPs), the fused cross-entropy (loss and its gradient in one pass
over the logits), one-pass backwards of the SwiGLU gate and of RMSNorm (their residuals
behind an optimization barrier, so XLA writes no shared intermediates for the backward),
RoPE cos/sin tables built once per step for all layers, and 2-D matmuls for
[heads, kv]-shaped kernels (no per-step weight copies).

XLA CPU (jaxlib 0.10.2) already runs every dot through YNNPACK by default (`ynn_fusion`
in the HLO); Eigen (`xla_cpu_experimental_ynn_fusion_type=""`), oneDNN and XNNPACK
options measured the same within this shared VM's noise, so the step uses the defaults.

Precision (`--dtype`): `float32` (default) runs both sides in fp32. `bfloat16` runs both
the way LLaVA trains: ours with `model.dtype` = `frozen_dtype` = bfloat16 (bf16 compute and
frozen weights, the projector's fp32 master weights and AdamW state); the reference with
its frozen towers cast to bf16, the projector in fp32 and the forward under
`torch.autocast("cpu", torch.bfloat16)` (oneDNN's bf16 kernels on CPUs that have them).

Modes: `pixels` = our step from pixels (vision tower in the step); `features` = our step
reads precomputed frozen-encoder features (`batch["features"]`, what `train.feature_cache`
feeds the step; `vision_mentions_in_hlo` checks that nothing of the tower is compiled in);
`--feature-cache` = `--modes features`. The reference is the same in both modes.

Timing: every step is built and warmed up first, then the timed steps run interleaved
(ours, ours with features, torch, ours, ...) and each reports its median, so a machine
whose load changes during the run slows all of them alike; `loadavg_start/end` are
`os.getloadavg()`. torch uses as many threads as the cores this process may run on.

Memory: XLA's `compiled.memory_analysis()` peak (arguments + outputs - aliased + temps)
against an estimate of what the step must hold: all params, the trainables' gradient and
AdamW moments, and the activations saved for the backward pass.

Allocator: XLA CPU allocates each execution's temporaries (hundreds of MB here) with
malloc, which glibc serves by mmap and returns by munmap for blocks over 32 MB, so every
step faults in and zeroes fresh pages (~98k minor faults, ~0.3 s of system CPU per llava
step, ~9 % of its CPU time). `main()` therefore re-executes the process once with
`GLIBC_TUNABLES` = `vlm_jax.malloc.TUNABLES` (one arena, no mmap, no trimming: freed blocks stay
mapped and the next step reuses them; 0 faults, ~0.01 s system CPU per step). Both sides
run in that one process, so torch's allocations get the same allocator (`--system-malloc`
keeps glibc's defaults; `glibc_tunables` in the JSON says which ran). A run's launcher can
set the same variable (`vlm_jax.malloc`; the local grid launcher does).

Where our step's time goes (per part, against its matmul floor): `benchmarks/step_profile.py`,
`docs/step.md`.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Step throughput is measured on programs at XLA's full optimisation level (what every run
# long enough to matter compiles): the trainer would compile the tiny demo config's step
# with FAST_COMPILE (its run is short), and no serialized program from an earlier run is
# loaded in its place.
os.environ["VLM_JAX_FAST_COMPILE_MAX_FLOPS"] = "0"
os.environ["VLM_JAX_EXECUTABLE_CACHE"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# glibc malloc settings under which the steps are timed (see the module docstring): the
# ones the local launcher gives its CPU workers.
from vlm_jax import malloc  # noqa: E402


# --------------------------------------------------------------------------- configs
def llava_config(dtype: str = "float32"):
    from configs import common
    c = common.base_config()
    c.name = "bench_llava_tiny"
    c.model.kind = "vlm"
    c.model.image_token_id = 3
    c.model.vision.update(image_size=224, patch_size=16, width=384, depth=6, heads=6,
                          mlp_dim=1536, act="quick_gelu", feature_layer=-2,
                          feature_select="patch", scan_layers=False)
    c.model.llm.update(vocab_size=32000, width=512, depth=6, heads=8, kv_heads=8,
                       mlp_dim=1376, scan_layers=False, max_len=512)
    c.model.projector.type = "mlp2x_gelu"
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.train.progress = False
    c.optim.update(lr=1e-3, trainable=("projector",), clip_norm=0.0)
    c.model.update(dtype=dtype, frozen_dtype=dtype)
    return c


def demo_config(dtype: str = "float32"):
    from configs import demo
    c = demo.get_config("run,feature_cache=0")
    c.model.update(dtype=dtype, frozen_dtype=dtype)
    c.model.image_token_id = 3
    c.optim.clip_norm = 0.0
    return c


def image_tokens(c) -> int:
    from vlm_jax.models.vlm import num_image_tokens
    return num_image_tokens(c.model)


def make_batch(c, seed=0) -> dict:
    """One global batch with the pipeline's layout: image tokens, then caption tokens."""
    rng = np.random.default_rng(seed)
    b, k, s = c.train.batch_size, image_tokens(c), c.data.seq_len
    t = k + s
    v = c.model.llm.vocab_size
    cap = rng.integers(4, v, size=(b, s + 1), dtype=np.int32)
    tokens = np.concatenate([np.full((b, k), c.model.image_token_id, np.int32), cap[:, :-1]], 1)
    targets = np.concatenate([np.zeros((b, k), np.int32), cap[:, 1:]], 1)
    loss_mask = np.concatenate([np.zeros((b, k), np.float32), np.ones((b, s), np.float32)], 1)
    size = c.model.vision.image_size
    return dict(
        pixels=rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
        tokens=tokens, targets=targets, loss_mask=loss_mask,
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        segment_ids=np.ones((b, t), np.int32),
        visual_mask=np.concatenate([np.ones((b, k), bool), np.zeros((b, s), bool)], 1),
        valid=np.ones((b,), np.float32))


# --------------------------------------------------------------------------- ours
def activation_estimate_bytes(c) -> float:
    """Activations the backward pass needs (fp32): per LLM layer the inputs of every
    matmul and the attention probabilities; the logits and their gradient; the
    projector's inputs. The frozen ViT before the projector keeps nothing."""
    b, k, s = c.train.batch_size, image_tokens(c), c.data.seq_len
    t = k + s
    l = c.model.llm
    per_layer = b * t * (8 * l.width + 3 * l.mlp_dim) + 2 * b * l.heads * t * t
    proj = b * k * (c.model.vision.width + 2 * l.width)
    logits = 2 * b * t * l.vocab_size
    return 4.0 * (l.depth * per_layer + proj + logits)


def ours(c, feature_cache: bool, with_hlo: bool = False):
    """Builds and compiles our step; returns (timed step fn, info dict[, compiled HLO text])."""
    import tempfile
    from vlm_jax.train import sharding, trainer
    batch = make_batch(c)
    r = trainer.Run(c, tempfile.mkdtemp(prefix="bench_step_"))
    tr, fr = r.init_params()
    if feature_cache:  # what train.feature_cache feeds the step: features, no vision tower
        from vlm_jax.train.feature_cache import feature_fn  # the cache's own encoder call
        feats = jax.jit(feature_fn(c.model))(fr["vision"], batch.pop("pixels"))
        batch["features"] = np.asarray(feats)
        fr = {k: v for k, v in fr.items() if k != "vision"}
        for spec in (r.batch_spec, r.eval_spec):
            n = spec["pixels"].shape[0]
            spec.pop("pixels")
            spec["features"] = jax.ShapeDtypeStruct((n,) + feats.shape[1:], feats.dtype)
    state = r.init_state(tr)
    t0 = time.perf_counter()
    r.compile(state, fr, with_eval=False)
    compile_s = time.perf_counter() - t0
    gb = sharding.global_batch(batch, r.mesh)
    box = {"state": state}

    def step():
        box["state"], m = r.train_step(box["state"], fr, gb)
        return float(m["loss"])  # waits for the step

    from lm_step import peak_bytes   # benchmarks/ (this script's directory)
    peak = peak_bytes(r.train_step.memory_analysis())
    n_all = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state["params"], fr)))
    n_opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))
    n_grad = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    need = n_all + n_opt + n_grad + activation_estimate_bytes(c)
    hlo = r.train_step.as_text()
    cost = r.train_step.cost_analysis()
    info = dict(compile_s=compile_s, peak_bytes=int(peak), estimate_bytes=int(need),
                memory_ratio=peak / need, gflops=cost["flops"] / 1e9,
                gbytes_accessed=cost["bytes accessed"] / 1e9,
                params_total=r.param_counts["total"],
                params_trainable=r.param_counts["trainable"])
    if feature_cache:  # nothing of the vision tower may remain in the compiled step
        info["vision_mentions_in_hlo"] = hlo.count("vision")
    return (step, info, hlo) if with_hlo else (step, info)


# --------------------------------------------------------------------------- reference
def hf_llava(c):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration
    v, l = c.model.vision, c.model.llm
    vc = CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                          num_hidden_layers=v.depth, num_attention_heads=v.heads,
                          image_size=v.image_size, patch_size=v.patch_size,
                          hidden_act=v.act, layer_norm_eps=v.norm_eps)
    tc = LlamaConfig(vocab_size=l.vocab_size, hidden_size=l.width,
                     intermediate_size=l.mlp_dim, num_hidden_layers=l.depth,
                     num_attention_heads=l.heads, num_key_value_heads=l.kv_heads,
                     max_position_embeddings=l.max_len, rms_norm_eps=l.norm_eps,
                     tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=c.model.image_token_id,
                      image_seq_length=image_tokens(c), projector_hidden_act="gelu",
                      vision_feature_layer=v.feature_layer,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def reference(c):
    """Builds the transformers + torch step; returns (timed step fn, info dict)."""
    import torch
    model = hf_llava(c)
    from vlm_jax.models.layers import dtype_of
    bf16 = jnp.dtype(dtype_of(c.model.dtype)) == jnp.bfloat16
    for n, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in n
        if bf16 and not p.requires_grad:  # frozen towers stored in bf16, like ours
            p.data = p.data.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    b = make_batch(c)
    ids = torch.from_numpy(b["tokens"]).long()
    labels = torch.from_numpy(np.where(b["loss_mask"] > 0, b["targets"], -100)).long()
    # transformers shifts labels itself: give it the next-token labels un-shifted
    labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], 1)
    from vlm_jax.data.transforms import normalize  # transformers takes normalised pixels
    pixels = torch.from_numpy(normalize(b["pixels"])).permute(0, 3, 1, 2).contiguous()
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    info = dict(params_total=sum(p.numel() for p in model.parameters()),
                params_trainable=sum(p.numel() for p in trainable),
                torch_threads=torch.get_num_threads())
    return step, info


def measure(steps: dict, reps: int) -> dict:
    """Interleaves the steps (A, B, C, A, B, C, ...) after one warm-up each, so that a
    machine whose load changes affects all of them alike; returns per-step median times."""
    times = {k: [] for k in steps}
    loss = {}
    for f in steps.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in steps.items():
            t0 = time.perf_counter()
            loss[k] = f()
            times[k].append(time.perf_counter() - t0)
    return {k: dict(step_s=float(np.median(v)), times_s=[round(x, 4) for x in v],
                    loss=loss[k]) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each (median)")
    ap.add_argument("--configs", default="llava,demo")
    ap.add_argument("--modes", default="pixels,features",
                    help="ours from pixels and/or from cached features (`features`)")
    ap.add_argument("--feature-cache", action="store_true", help="same as --modes features")
    ap.add_argument("--quick", action="store_true", help="tiny: --configs demo --steps 2")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="both sides' precision (bfloat16: bf16 compute and frozen weights)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc settings (no vlm_jax.malloc re-exec)")
    args = ap.parse_args()
    if not args.system_malloc:
        malloc.reexec(sys.argv)
    if args.quick:
        args.configs, args.steps = "demo", 2
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA uses
    modes = ["features"] if args.feature_cache else args.modes.split(",")
    makers = {"llava": llava_config, "demo": demo_config}
    out = {"benchmark": "train_step", "device": jax.devices()[0].device_kind,
           "cores": len(os.sched_getaffinity(0)), "modes": modes, "steps": args.steps,
           "dtype": args.dtype,
           "loadavg_start": os.getloadavg(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    for name in args.configs.split(","):
        c = makers[name](args.dtype)
        steps, infos = {}, {}
        for mode in modes:
            key = "ours" if mode == "pixels" else "ours_feature_cache"
            steps[key], infos[key] = ours(c, mode == "features")
        steps["torch"], infos["torch"] = reference(c)
        res = measure(steps, args.steps)
        r = {k: dict(infos[k], **res[k], examples_per_sec=c.train.batch_size / res[k]["step_s"])
             for k in steps}
        r.update(batch_size=c.train.batch_size, seq_len=image_tokens(c) + c.data.seq_len,
                 same_param_count=all(r[k]["params_total"] == r["torch"]["params_total"]
                                      for k in steps))
        for k in steps:
            if k != "torch":
                r["speedup" + k[len("ours"):]] = r[k]["examples_per_sec"] / \
                    r["torch"]["examples_per_sec"]
        out[name] = r
    out["loadavg_end"] = os.getloadavg()
    out["speedup"] = {f"{n}{k[len('speedup'):]}": out[n][k] for n in args.configs.split(",")
                      for k in out[n] if k.startswith("speedup")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
