"""The config schema every experiment shares (big_vision style: configs are code).

Each experiment file defines `get_config(arg)` that starts from `base_config()` and fills
in its sizes. `arg` is a "key=value,..." string parsed by `parse_arg`. Field names here
are a stable interface: the trainer, the data pipeline, the grid runner and outside tools
read them.
"""
from __future__ import annotations

import ml_collections as mlc

# Placeholder so that a field can hold a dict/None and still be overridden from the CLI.
NONE = mlc.FieldReference(None, field_type=str)


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parses "a=1,b=x,c=True" into a ConfigDict over `defaults` (types follow defaults).

    Unknown keys are an error that lists the valid ones.
    """
    out = mlc.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            # A bare word selects a preset, e.g. "run" or "smallest".
            key, value = "preset", item
        else:
            key, value = (s.strip() for s in item.split("=", 1))
        if key not in out:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: "
                             f"{sorted(out.keys())}")
        default = out[key]
        if isinstance(default, bool):
            v = value.lower() in ("1", "true", "yes", "y")
        elif isinstance(default, int):
            v = int(float(value))
        elif isinstance(default, float):
            v = float(value)
        else:
            v = value
        out[key] = v
    return out


def imply_preset(arg: str | None, point_keys, preset: str = "run") -> str | None:
    """`arg` with `preset` in front when it sets one of `point_keys` (a run's point, e.g.
    vit/llm/data/n) and names no preset: "vit=L14,n=3M" -> "run,vit=L14,n=3M", so such
    an ARG means that one run, not the file's default grid with the values ignored."""
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    keys = [s.split("=", 1)[0].strip() if "=" in s else None for s in items]
    if None in keys or "preset" in keys or not set(keys) & set(point_keys):
        return arg
    return ",".join([preset, *items])


def vit_config() -> mlc.ConfigDict:
    """A vision encoder. `variant`: "clip" (CLIP/OpenCLIP ViT) or "native" (NaViL)."""
    return mlc.ConfigDict(dict(
        variant="clip",
        image_size=224,
        patch_size=16,
        width=768,
        depth=12,
        heads=12,
        mlp_dim=3072,
        act="quick_gelu",
        norm_eps=1e-5,
        pre_norm=True,            # CLIP's ln_pre
        class_token=True,
        feature_layer=-2,         # which hidden state feeds the projector (LLaVA: -2)
        feature_select="patch",   # "patch" (drop CLS) | "cls_patch"
        init_from="",            # HF/OpenCLIP dir or a vlm_jax workdir ("" = random init)
        scan_layers=True,
        remat="none",            # none | full | dots
    ))


def llm_config() -> mlc.ConfigDict:
    """A decoder LM of the Llama family (Llama/Vicuna, Qwen2, InternLM2)."""
    return mlc.ConfigDict(dict(
        vocab_size=32000,
        width=4096,
        depth=32,
        heads=32,
        kv_heads=32,
        head_dim=0,               # 0 = width // heads
        mlp_dim=11008,
        act="silu",
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=mlc.ConfigDict(dict(rope_type="default", factor=1.0,
                                         original_max_position_embeddings=4096,
                                         low_freq_factor=1.0, high_freq_factor=4.0)),
        max_len=4096,
        qkv_bias=False,
        tie_embeddings=False,
        experts=False,            # NaViL modality-specific experts
        expert_impl="masked",
        init_from="",
        scan_layers=True,
        remat="none",
        bos_id=1,
        eos_id=2,
        pad_id=0,
        loss_chunk=0,             # fused cross-entropy: > 0 in chunks of this many positions,
                                  # 0 over the whole sequence at once, < 0 the unfused reference
    ))


def projector_config() -> mlc.ConfigDict:
    """`type`: "linear" | "mlp{N}x_gelu" (LLaVA naming) | "pixel_shuffle" (NaViL)."""
    return mlc.ConfigDict(dict(type="mlp2x_gelu", shuffle_ratio=0.5))


def data_config() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        name="synthetic_clean",   # a named dataset from vlm_jax.data (or "" for raw fields)
        source="synthetic",       # synthetic | tar | arrayrecord | tfds | parquet
        path="",                  # file pattern / builder name / dir
        image_column="image",     # parquet/tfds field names
        text_column="caption",
        n=1000,                   # train subset size (nested: the 2k subset holds the 1k one)
        eval_n=200,               # held-out eval examples, disjoint from every train subset
        caption_noise=0.0,        # synthetic: fraction of wrong/generic captions
        tokenizer="synthetic",    # dir with tokenizer.json | *.model (SentencePiece) | synthetic
        template="plain",         # plain | chat
        seq_len=64,               # text tokens per example (images add their tokens)
        packing=False,
        num_workers=0,            # Grain worker processes (0: in the main process)
        num_threads=4,            # Grain read threads per process
        prefetch=2,
        shard_cache="",           # local copies of remote tar shards ("" = $VLM_JAX_SHARD_CACHE
                                  # or ~/.cache/vlm_jax/shards)
        max_bad_fraction=0.01,    # stop when more than this fraction of samples is bad
        seed=0,
    ))


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = "run"
    c.model = mlc.ConfigDict(dict(
        kind="vlm",               # vlm | lm | clip | native
        dtype="float32",          # compute dtype (bfloat16 on accelerators)
        param_dtype="float32",    # master weights of trainable params
        frozen_dtype="float32",   # storage dtype of frozen params (bfloat16 halves memory)
        image_token_id=0,
        attention_impl="",        # "": einsum (CPU), cudnn (GPU, bf16), splash (TPU), else xla;
                                  # or einsum/xla/cudnn/splash/einsum_remat (models.attention)
        vision=vit_config(),
        llm=llm_config(),
        projector=projector_config(),
        # Contrastive pretraining (kind "clip"): text tower sizes and loss ("clip"|"siglip").
        clip=mlc.ConfigDict(dict(loss="clip", embed_dim=512, text_width=512, text_depth=4,
                                 text_heads=8, text_max_len=77, init_logit_scale=2.6592)),
    ))
    c.data = data_config()
    c.train = mlc.ConfigDict(dict(
        steps=1000,
        batch_size=256,           # global batch
        grad_accum=1,
        seed=0,
        eval_every_steps=0,       # 0 = only at the end
        eval_batch_size=0,        # 0 = batch_size
        log_every_steps=10,
        checkpoint_every_steps=0,  # 0 = only at the end (and on SIGTERM)
        checkpoint_every_secs=600.0,
        keep_checkpoints=2,
        save_frozen=False,        # also checkpoint frozen params
        max_nonfinite=10,         # consecutive non-finite steps before stopping
        feature_cache=False,      # cache frozen-encoder features (vlm_jax.train.feature_cache)
        feature_cache_dir="",     # its directory; "" = feature_cache/ next to the workdir
        checkpoint_steps=(),      # extra steps always saved and never garbage-collected
        branch_from="",           # "WORKDIR:STEP": start from another run's full train state
        progress=True,
    ))
    c.optim = mlc.ConfigDict(dict(
        name="adamw",
        lr=1e-3,
        schedule="cosine",        # cosine | linear | constant | wsd
        warmup_steps=0,
        warmup_frac=0.03,         # used when warmup_steps == 0
        decay_frac=0.2,           # wsd: fraction of steps in the final decay
        decay_shape="linear",     # wsd: linear | 1-sqrt (lr x (1 - sqrt(x)), Hägele et al.)
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,
        trainable=("projector",),  # regexes over "/"-joined param paths; ("*",) or ("",) = all
        flatten="auto",           # AdamW over one fp32 vector: auto (replicated params) | on | off
    ))
    c.mesh = mlc.ConfigDict(dict(
        shape=(-1, 1, 1),         # (data, fsdp, tensor); -1 = the rest
        dcn_shape=(1, 1, 1),      # multi-slice: across slices
    ))
    return c
