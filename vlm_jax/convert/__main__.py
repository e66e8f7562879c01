"""`python -m vlm_jax.convert --hf DIR --out DIR` (and `--to-hf` for export).

  python -m vlm_jax.convert --hf path/to/hf_model --out ckpt/ [--part llm|vision] [--dtype bf16]
  python -m vlm_jax.convert --openclip open_clip_model.safetensors --out ckpt/
  python -m vlm_jax.convert --to-hf --src ckpt/ --out hf_dir/    (or: --to-hf ckpt/ --out hf_dir/)
      [--max-shard-size 5GB] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlm_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", help="transformers model dir (config.json + safetensors)")
    ap.add_argument("--openclip", help="OpenCLIP weights file (or dir holding one)")
    ap.add_argument("--to-hf", nargs="?", const="", default=None, metavar="SRC",
                    help="export a converted dir (SRC or --src) to the transformers layout")
    ap.add_argument("--src", help="converted dir to export with --to-hf")
    ap.add_argument("--out", required=True, help="output dir (written atomically)")
    ap.add_argument("--part", choices=("llm", "vision"), help="default: from config.json")
    ap.add_argument("--dtype", default=None, help="target dtype (float32, bfloat16, ...); "
                    "default: the checkpoint's")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--max-shard-size", default="5GB",
                    help="--to-hf: largest safetensors file (transformers' rule: 5GB = 5e9 "
                    "bytes, also MB/KB/GiB/MiB); above it, shards + model.safetensors.index.json")
    a = ap.parse_args(argv)

    from vlm_jax import convert as C
    from vlm_jax.models import layers
    if a.dtype not in (None, "", "auto"):
        try:
            layers.dtype_of(a.dtype)
        except ValueError as e:
            ap.error(f"--dtype: {e}")
    t0 = time.time()
    try:
        if a.to_hf is not None:
            src = a.to_hf or a.src
            if not src:
                ap.error("--to-hf needs the converted dir (--to-hf SRC or --src SRC)")
            out = C.export_hf(src, a.out, a.dtype, a.force, a.max_shard_size)
            info = {"exported": out}
        else:
            src = a.hf or a.openclip
            if not src:
                ap.error("give --hf DIR, --openclip FILE, or --to-hf SRC")
            part = "vision" if a.openclip and not a.part else a.part
            meta = C.convert(src, a.out, part, a.dtype, a.force)
            info = {"converted": a.out, "part": meta["part"], "arch": meta["arch"],
                    "config": meta["config"]}
    except C.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
