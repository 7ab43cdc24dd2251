#!/usr/bin/env bash
# Creates .venv (if missing) and installs keras-raptr with every backend,
# keras-hub and the test and example dependencies, at the versions CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is named explicitly so that pip takes the CPU build when one
# is available locally, rather than a multi-GB CUDA build.
.venv/bin/python -m pip install -q \
  "torch==2.13.0" \
  -c requirements/tested.txt \
  -e ".[jax,tensorflow,torch,hub,examples,tests]"
echo "Installed into .venv: $(.venv/bin/python -c 'import keras; print("keras", keras.__version__)')"
