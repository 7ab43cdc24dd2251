#!/usr/bin/env bash
# The quality grid (benchmarks/quality.py) on one GPU, JAX: every config of
# quality.py at its full size (2160 steps, seeds 0, 1 and 2), PARALLEL runs
# at a time, each in a process of its own. The runs share the GPU, so the
# table compares steps and FLOPs, not wall-clock.
#
#   bash benchmarks/gpu_quality.sh            # PARALLEL=14, no time limit
#
# The corpus must be in the example's cache (runs/corpus) already: run the
# example once per seed on a machine with TensorFlow first, e.g.
#   for s in 0 1 2; do python examples/pretrain.py --seed $s --steps 1 --no-save-preset; done
# so that the GPU machine needs keras, keras-hub and JAX only. LIMIT seconds
# after the start it stops; the finished runs stay under RUNS (default
# runs/quality_gpu), and the table is made again from them with the same
# command (finished runs are reused), e.g. on another machine.
#
# Measured on one H100 (16 cores, 14 runs at a time, BENCHMARKS.md): a
# baseline run evaluated first after about 70 s and finished 2160 steps in
# about 105 s; a run of drawn paths evaluated first after 390 to 490 s (XLA's
# GPU compiler, one train step per path length, about 8 lengths in the first
# 60 steps), and had reached steps 60 to 540 when 530 s were up. The whole
# grid needs far more than one 10-minute run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RUNS=${RUNS:-runs/quality_gpu}
RESULTS=${RESULTS:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
# Small tensors: XLA's GEMM autotuning would cost more compile time than it
# saves here.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
METHODS=${METHODS:-baseline,raptr,raptr-zero-grad,raptr-long-last,baseline+cosine,raptr+cosine,raptr-zero-grad+cosine,raptr-long-last+cosine,stochastic-depth,pld,stacking,stochastic-depth+cosine,pld+cosine,stacking+cosine}
KERAS_BACKEND=jax timeout "${LIMIT:-0}" "$PY" benchmarks/quality.py \
  --parallel "${PARALLEL:-14}" --methods "$METHODS" --seeds "${SEEDS:-0,1,2}" \
  --tag "${TAG:-gpu}" ${QUALITY_ARGS:-} --runs-dir "$RUNS" --results-dir "$RESULTS" \
  --example-args "--no-checkpoint --no-save-preset ${EXAMPLE_ARGS:-}"
echo "quality.py exit code $?"
