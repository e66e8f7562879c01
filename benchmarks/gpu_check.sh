#!/usr/bin/env bash
# The issue-9 GPU check in one command, for a lent GPU machine whose Python already has
# jax[cuda] (the packages it lacks can travel as wheels in .whl/, installed to /tmp/site):
#   OUT=/some/dir [VARIANTS=...] [XLA_VARIANT=FLAGS] [TRAIN_SMOKE=1] benchmarks/gpu_check.sh
# 1. benchmarks/gpu_step.py --check over $VARIANTS (IMPL:BATCH:REMAT[:SEQ], each in its
#    own process): the cuDNN parity check, step time, MFU, peak memory vs `grid plan`
#    -> $OUT/gpu_step.json;
# 2. with XLA_VARIANT, the first variant again under XLA_FLAGS=$XLA_VARIANT -> $OUT/xla_variant.json;
# 3. with TRAIN_SMOKE=1, the trainer on the GPU: a demo run killed (SIGKILL) after 30 s and
#    resumed from its checkpoint to the end -> $OUT/train{1,2}.txt;
# then a summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# the allocator may use up to 92 % of the card (JAX preallocates 75 % by default)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
VARIANTS=${VARIANTS:-:8:none,:16:none,:8:dots,xla:8:dots}
"$PY" benchmarks/gpu_step.py --check --variants "$VARIANTS" --out "$OUT/gpu_step.json" \
  --timeout "${RUNS_TIMEOUT:-400}" "$@" >/dev/null 2>"$OUT/stderr.txt"
rc=$?
if [ -n "${XLA_VARIANT:-}" ]; then
  XLA_FLAGS="$XLA_VARIANT" timeout 120 "$PY" benchmarks/gpu_step.py --variants "${VARIANTS%%,*}" \
    --out "$OUT/xla_variant.json" "$@" >/dev/null 2>>"$OUT/stderr.txt"
fi
if [ "${TRAIN_SMOKE:-0}" = 1 ]; then
  w=$(mktemp -d)/run
  args=(--config configs/demo.py:run --workdir "$w" --config.train.steps=3000
        --config.train.checkpoint_every_steps=100)
  timeout -s KILL 30 "$PY" -m vlm_jax.main "${args[@]}" >"$OUT/train1.txt" 2>&1
  timeout 120 "$PY" -m vlm_jax.main "${args[@]}" >"$OUT/train2.txt" 2>&1
  echo "train smoke: resumed run exit $?"
  grep -h -i -E "restor|resum|^done" "$OUT/train1.txt" "$OUT/train2.txt" | tail -4
  tail -n 2 "$OUT/train1.txt"
fi
"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
for name in ("gpu_step.json", "xla_variant.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    d = json.load(open(path))
    print(f"== {name}: {d['device']}, jax {d['jax']}")
    if "attention_check" in d:
        print("attention check:", json.dumps(d["attention_check"]))
    for r in d["runs"]:
        if "error" in r:
            print(f"{r['attention_impl'] or 'default':8s} b={r['batch']} {r['remat']} "
                  f"seq={r['seq']}: ERROR {r['error'][:200]}")
            continue
        peak = r["peak_bytes_in_use"] or 0
        print(f"{r['attention_kernel']:8s} b={r['batch']:<3d} {r['remat']:5s} seq={r['seq']:<5d} "
              f"step {r['step_s']:.4f} s  MFU {r['mfu'] or 0:.3f}  peak {peak / 1e9:6.2f} GB  "
              f"plan {r.get('plan_bytes', 0) / 1e9:6.2f} GB ({r.get('plan_source')}, "
              f"x{r.get('plan_vs_peak', 0):.3f})  compile {r['compile_s']} s  "
              f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f} {r['kernel_warnings'] or ''}")
PY
tail -c 2000 "$OUT/stderr.txt" | grep -v "^\s*$" | tail -8
exit $rc
