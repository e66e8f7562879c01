#!/usr/bin/env bash
# Runs a grid on a Cloud TPU VM or pod slice (or several slices) through gcloud, from
# this machine: creates the TPU (CREATE=1), ships this checkout to every worker, installs
# requirements + jax[tpu] there, then runs each run on all workers (--worker=all); the
# workdirs live under REMOTE_ROOT (gs://) and result files are copied back to ROOT.
#
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=vlm ACCELERATOR=v5p-64 \
#   REMOTE_ROOT=gs://my-bucket/comp CONFIG=configs/compositional.py ./launch/tpu_pod.sh
#
# Variables: PROJECT, ZONE, TPU_NAME, REMOTE_ROOT (required); ACCELERATOR (v5p-8),
# TPU_VERSION (tpu-ubuntu2204-base), NUM_SLICES (1; >1 uses queued resources and
# MEGASCALE_*), COORDINATOR (multi-slice: slice 0 worker 0 IP, default looked up),
# CREATE=1, SPOT=1, CONFIG (configs/compositional.py), ROOT (runs/tpu), PYTHON (the runner's
# local Python: default .venv/bin/python where launch/local.sh or gpu.sh made it, else
# python3; it needs requirements.txt).
# gcloud uses your own login; no credential is written anywhere.
# Extra arguments go to `python -m vlm_jax.grid run` (try --dry-run first).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}" \
  "${REMOTE_ROOT:?set REMOTE_ROOT=gs://bucket/path}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PROJECT ZONE TPU_NAME REMOTE_ROOT
exec "$PY" -m vlm_jax.grid run "${CONFIG:-configs/compositional.py}" \
  --root "${ROOT:-runs/tpu}" --launcher tpu "$@"
