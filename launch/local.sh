#!/usr/bin/env bash
# Creates .venv, installs requirements.txt when it changed, and runs the embedded demo
# grid (configs/demo.py) on this machine's CPU; running it again skips what is done and
# resumes what was interrupted.
#   ROOT      where runs, results.csv and the report go (default runs/demo)
#   PARALLEL  runs at a time (default 2)
#   CONFIG    another grid, e.g. configs/demo.py:tiny (default configs/demo.py)
#   JAX_COMPILATION_CACHE_DIR  the compilation cache every grid shares
#             (default ~/.cache/vlm_jax/xla, see launch/_venv.sh)
# Extra arguments go to `python -m vlm_jax.grid run` (e.g. --select vit=S,M --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_venv.sh
exec .venv/bin/python -m vlm_jax.grid run "${CONFIG:-configs/demo.py}" --root "${ROOT:-runs/demo}" \
  --parallel "${PARALLEL:-2}" "$@"
