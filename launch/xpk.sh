#!/usr/bin/env bash
# Runs a grid on a GKE TPU cluster through xpk: one workload per run (PARALLEL at a time),
# workdirs under REMOTE_ROOT (gs://), result files copied back to ROOT.
#
#   PROJECT=my-proj ZONE=us-east5-a CLUSTER=my-cluster ACCELERATOR=v5p-256 NUM_SLICES=2 \
#   REMOTE_ROOT=gs://my-bucket/comp PARALLEL=4 ./launch/xpk.sh
#
# Variables: PROJECT, ZONE, CLUSTER, REMOTE_ROOT (required); ACCELERATOR (v5p-8),
# NUM_SLICES (1), DOCKER_IMAGE (prebuilt image with the requirements; default: xpk copies
# this checkout onto BASE_DOCKER_IMAGE=python:3.11-slim and installs them), WORKLOAD_PREFIX
# (vlmjax), PARALLEL (1), CONFIG (configs/compositional.py), ROOT (runs/xpk), PYTHON (the
# runner's local Python: default .venv/bin/python where launch/local.sh or gpu.sh made
# it, else python3; it needs requirements.txt).
# Extra arguments go to `python -m vlm_jax.grid run` (try --dry-run first).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${CLUSTER:?set CLUSTER}" \
  "${REMOTE_ROOT:?set REMOTE_ROOT=gs://bucket/path}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PROJECT ZONE CLUSTER REMOTE_ROOT
exec "$PY" -m vlm_jax.grid run "${CONFIG:-configs/compositional.py}" \
  --root "${ROOT:-runs/xpk}" --launcher xpk --parallel "${PARALLEL:-1}" "$@"
