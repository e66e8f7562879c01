#!/usr/bin/env bash
# Installs what the tests need into .venv (once, or when requirements change) and runs
# the whole suite. Extra arguments go to pytest. pytest's exit code 5 (no tests
# collected) is a failure.
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
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "[tests] pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
