# Sourced by launch/local.sh and launch/gpu.sh (from the repository root): creates .venv
# with $PYTHON (default python3) and installs requirements.txt into it when the file
# changed since the last install (a sha256 stamp in .venv); puts the checkout on
# PYTHONPATH.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
_stamp=.venv/.requirements.sha
_want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[launch] installing requirements.txt into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$_want" > "$_stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One durable XLA compilation cache for every worker of every grid on this machine (jax
# keys entries by program, compile options, jax version and device), so a re-run, an
# extended grid or another root skips the compiles an earlier grid did. Set
# JAX_COMPILATION_CACHE_DIR to choose another place (the runner's own default without
# this script is ROOT/.cache/jax).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlm_jax/xla}"
