"""Conversion benchmark: transformers Llama safetensors -> vlm_jax params -> orbax dir.

Writes a random Llama (~1B params, bf16; `--quick`: ~100M) with transformers'
`save_pretrained`, then measures, each in a fresh subprocess:
  - ours: `vlm_jax.convert.convert_llm` (streamed read into numpy params) + orbax save;
  - reference: transformers `LlamaForCausalLM.from_pretrained` of the same files.
Prints one JSON object: times (imports excluded), peak RSS (`ru_maxrss`), checkpoint
bytes, and the ratios `time_ratio` (ours load+save / transformers load) and `rss_ratio`
(our peak RSS / checkpoint bytes; target <= 1.5).

  PYTHONPATH=. python benchmarks/convert.py [--quick] [--dir /tmp/x]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SIZES = {  # ~1B and ~100M Llama shapes
    "full": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=8),
    "quick": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4),
}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_model(path: str, size: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048)
    torch.set_default_dtype(torch.bfloat16)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(path)
    return sum(p.numel() for p in m.parameters())


def worker(kind: str, src: str, out: str) -> dict:
    if kind == "ours":
        from vlm_jax.convert import api
        base = rss_bytes()
        t0 = time.perf_counter()
        _, params, meta = api.convert_llm(src)
        t1 = time.perf_counter()
        load_rss = rss_bytes()
        api.save_converted(out, params, meta, force=True)
        t2 = time.perf_counter()
        return {"load_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0,
                "rss_after_import": base, "peak_rss_load": load_rss, "peak_rss": rss_bytes()}
    import torch
    from transformers import LlamaForCausalLM
    base = rss_bytes()
    t0 = time.perf_counter()
    m = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    del m
    return {"total_s": t1 - t0, "rss_after_import": base, "peak_rss": rss_bytes()}


def run_worker(kind: str, src: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, "--worker", kind, "--src", src, "--out", out],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default="")
    ap.add_argument("--worker", choices=("ours", "hf"))
    ap.add_argument("--src")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.src, a.out)))
        return
    root = a.dir or tempfile.mkdtemp(prefix="bench_convert_")
    size = "quick" if a.quick else "full"
    src, out = os.path.join(root, "hf"), os.path.join(root, "converted")
    try:
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
                f"import convert as c; print(c.write_model({src!r}, {size!r}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=1800)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        n_params = int(r.stdout.strip().splitlines()[-1])
        ckpt = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)
                   if f.endswith(".safetensors"))
        hf = run_worker("hf", src, out)
        ours = run_worker("ours", src, out)
        print(json.dumps({
            "benchmark": "convert", "size": size, "params": n_params, "checkpoint_bytes": ckpt,
            "ours": ours, "transformers_from_pretrained": hf,
            "time_ratio": round(ours["total_s"] / hf["total_s"], 3),
            "load_time_ratio": round(ours["load_s"] / hf["total_s"], 3),
            "rss_ratio": round(ours["peak_rss"] / ckpt, 3),
            "rss_ratio_load_only": round(ours["peak_rss_load"] / ckpt, 3),
            "rss_ratio_transformers": round(hf["peak_rss"] / ckpt, 3),
        }))
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
