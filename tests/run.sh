#!/usr/bin/env bash
# Installs what the tests need into .venv (once, or when requirements change) and runs
# the whole suite, on every core (pytest-xdist; TEST_WORKERS=N to choose, or pass -n
# yourself; -n 0 runs in one process). Extra arguments go to pytest. pytest's exit
# code 5 (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[tests] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.dev-requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[tests] installing requirements-dev.txt into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
# One persistent XLA compilation cache for the whole session: the test processes and the
# runs they start (grid workers, killed-and-resumed trainers, multi-device workers)
# compile the same tiny programs; each is compiled once. Fresh per invocation.
cache=$(mktemp -d "${TMPDIR:-/tmp}/vlm_jax_test_cache.XXXXXX")
# vlm_jax.train.program_cache serializes built programs next to the compilation cache
# ("<dir>_executables"): removed with it.
trap 'rm -rf "$cache" "${cache}_executables"' EXIT
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
# XLA:CPU's fast compile level for the session (`trainer.FAST_COMPILE`: LLVM -O0, no
# expensive passes; the HLO passes are unchanged): the tests' programs are tiny, their
# compiles are most of the suite's time (the model/ckpt tests: 202 -> 135 CPU-s).
# TEST_XLA_FULL=1 keeps XLA's default level.
if [ "${TEST_XLA_FULL:-0}" != 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
fi
workers=$(nproc 2>/dev/null || echo 2); [ "$workers" -gt 8 ] && workers=8
# (tests/conftest.py orders the tests so that the two workers finish together.)
par=(-n "${TEST_WORKERS:-$workers}")
for a in "$@"; do
  case "$a" in -n|-n[0-9]*|--numprocesses*|no:xdist|-pno:xdist|-p\ no:xdist) par=() ;; esac
done
set +e
.venv/bin/python -m pytest tests "${par[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "[tests] pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
