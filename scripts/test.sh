#!/usr/bin/env bash
# Runs the test suite once per Keras backend; fails if any run fails.
# Usage: bash scripts/test.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
failed=()
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend "$PY" -m pytest -q -p no:cacheprovider "$@" || failed+=("$backend")
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED on: ${failed[*]}"
  exit 1
fi
echo "All backends passed."
