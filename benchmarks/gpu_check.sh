#!/usr/bin/env bash
# The issue-9 GPU check in one command, for a lent GPU machine whose Python already has
# jax[cuda] (the packages it lacks can travel as wheels in .whl/, installed to /tmp/site):
#   OUT=/some/dir benchmarks/gpu_check.sh [extra gpu_step.py args]
# Prints the device, versions, then benchmarks/gpu_step.py's JSON (the kernel parity check
# and the runs below, each in its own process), also written to $OUT/gpu_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# the allocator may use up to 92 % of the card (JAX preallocates 75 % by default)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
VARIANTS=${VARIANTS:-:8:none,:16:none,:8:dots,xla:8:dots}
"$PY" benchmarks/gpu_step.py --check --variants "$VARIANTS" --out "$OUT/gpu_step.json" \
  --timeout "${RUNS_TIMEOUT:-400}" "$@" 2>"$OUT/stderr.txt"
rc=$?
tail -c 3000 "$OUT/stderr.txt" | grep -v "^\s*$" | tail -20
exit $rc
