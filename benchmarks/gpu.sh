#!/usr/bin/env bash
# The GPU run, as one script: the large step-time configuration on JAX and
# PyTorch (drawn paths first), the loop step's compile against the
# baseline's (JAX), then the whole example's speed-up. Results land in
# benchmarks/results/ with the tag (default: gpu) in their names.
#
#   bash benchmarks/gpu.sh [TAG]   # not yet timed on a GPU; REPEATS=3 lengthens it
#
# Run it first on the CPU with QUICK=1 (a smoke run of every step), e.g.
#   QUICK=1 PY=.venv/bin/python RESULTS=/tmp/gpu_smoke bash benchmarks/gpu.sh cpu
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-gpu}
PY=${PY:-python}
RESULTS=${RESULTS:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
BACKENDS=${BACKENDS:-jax,torch}
if [ -n "${QUICK:-}" ]; then
  "$PY" benchmarks/step_time.py --backends "$BACKENDS" --tag "$TAG" --quick \
    --output-dir "$RESULTS"
  "$PY" benchmarks/compile_time.py --modes jax --num-blocks 4 --steps 6 --tag "$TAG" \
    --output-dir "$RESULTS"
  "$PY" benchmarks/example_speed.py --backends "${BACKENDS%%,*}" --tag "$TAG" \
    --steps 8 --eval-every 4 --repeats 1 --runs-dir "runs/example_speed_$TAG" \
    --results-dir "$RESULTS"
  exit 0
fi
"$PY" benchmarks/step_time.py --backends "$BACKENDS" --tag "$TAG" --output-dir "$RESULTS" \
  --hidden-dim 512 --intermediate-dim 2048 --num-heads 8 \
  --batch-size 32 --seq-len 256 --rounds 5
"$PY" benchmarks/compile_time.py --modes jax --tag "$TAG" --output-dir "$RESULTS"
"$PY" benchmarks/example_speed.py --backends "$BACKENDS" --tag "$TAG" --results-dir "$RESULTS" \
  --repeats "${REPEATS:-1}" --runs-dir "runs/example_speed_$TAG"
