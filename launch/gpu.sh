#!/usr/bin/env bash
# Runs a grid on this GPU host (one or more GPUs) with XLA GPU flags.
#
#   CONFIG=configs/compositional.py ROOT=runs/comp PARALLEL=8 GPUS_PER_RUN=1 ./launch/gpu.sh
#
# Variables (all optional):
#   CONFIG        grid config FILE.py[:ARG]              (default configs/demo.py)
#   ROOT          root of the grid's runs and results    (default runs/gpu)
#   PARALLEL      runs at a time                          (default 1)
#   GPUS_PER_RUN  GPUs per run, CUDA_VISIBLE_DEVICES per slot (default 0 = all GPUs)
#   INSTALL_CUDA  1: pip install jax[cuda12] into .venv first (once)
#   VLM_JAX_DATA, VLM_JAX_WEIGHTS   where the data shards and converted weights live
# Extra arguments go to `python -m vlm_jax.grid run` (e.g. --select vit=L14 --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_venv.sh
extra=()
if [ "${INSTALL_CUDA:-0}" = 1 ] && [ ! -f .venv/.cuda-installed ]; then
  extra+=(--install-cuda)
fi
set +e
.venv/bin/python -m vlm_jax.grid run "${CONFIG:-configs/demo.py}" --root "${ROOT:-runs/gpu}" \
  --launcher gpu --parallel "${PARALLEL:-1}" --gpus-per-run "${GPUS_PER_RUN:-0}" \
  ${extra[@]+"${extra[@]}"} "$@"
rc=$?
set -e
if [ "${INSTALL_CUDA:-0}" = 1 ] && [ $rc -eq 0 ]; then touch .venv/.cuda-installed; fi
exit $rc
