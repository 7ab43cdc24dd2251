#!/usr/bin/env bash
# The GPU run, as one script: the large step-time configuration on JAX and
# PyTorch (drawn paths first), then the whole example's speed-up. Results
# land in benchmarks/results/ with the tag (default: gpu) in their names.
#
#   bash benchmarks/gpu.sh [TAG]        # about 10 minutes on one H100
#
# Run it first on the CPU with QUICK=1 (a smoke run of every step).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-gpu}
PY=${PY:-python}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
BACKENDS=${BACKENDS:-jax,torch}
if [ -n "${QUICK:-}" ]; then
  "$PY" benchmarks/step_time.py --backends "$BACKENDS" --tag "$TAG" --quick
  "$PY" benchmarks/example_speed.py --backends "${BACKENDS%%,*}" --tag "$TAG" \
    --steps 8 --eval-every 4 --repeats 1 --runs-dir "runs/example_speed_$TAG"
  exit 0
fi
"$PY" benchmarks/step_time.py --backends "$BACKENDS" --tag "$TAG" \
  --hidden-dim 512 --intermediate-dim 2048 --num-heads 8 \
  --batch-size 32 --seq-len 256 --rounds 5
"$PY" benchmarks/example_speed.py --backends "$BACKENDS" --tag "$TAG" \
  --repeats 3 --runs-dir "runs/example_speed_$TAG"
