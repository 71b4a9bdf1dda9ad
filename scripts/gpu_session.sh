#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one 10-minute device call (the device tool's limit).
# Results land in benchmarks/results/ (JSON + MD + PNG named after the device); logs in $OUT (or /tmp) when set.
#
#   bash scripts/gpu_session.sh check     # build the CUDA extension, sm_90a compile check, GPU tests (~5 min)
#   bash scripts/gpu_session.sh kernels   # kernel microbenchmarks, quick grids, all providers (~8 min)
#   bash scripts/gpu_session.sh e2e       # end-to-end latency: SmolLM2 and the Llama-2-7B shape (~8 min)
#   bash scripts/gpu_session.sh e2e-gqa   # end-to-end latency: the Llama-3-8B (GQA) shape (~5 min)
#
# Set LOWRANK_OPS_GIT_SHA to the commit being measured (the device gets a copy of the tree without .git).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}"
PY="${PYTHON:-python3}"
export LOWRANK_OPS_GIT_SHA="${LOWRANK_OPS_GIT_SHA:-unknown}"

case "${1:-}" in
  check)
    nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -3
    "$PY" -m lowrank_ops env
    "$PY" scripts/check_sm90_compile.py | tail -5
    LOWRANK_OPS_TEST_GPU=1 "$PY" -m pytest -q -x tests/test_cuda_kernels.py tests/test_lowrank_matmul.py \
      tests/test_quant_lowrank_matmul.py tests/test_codebook_matmul.py tests/test_svd.py tests/test_e2e.py \
      2>&1 | tee "$LOG/gpu_tests.log" | tail -15
    ;;
  kernels)
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -1
    "$PY" benchmarks/bench_lowrank_matmul.py --out benchmarks/results --quick | tail -25
    "$PY" benchmarks/bench_quant_lowrank_matmul.py --out benchmarks/results --shapes 4096x4096 --ranks 0,128 \
      --ms 1,16,64 | tail -20
    "$PY" benchmarks/bench_codebook.py --out benchmarks/results --quick | tail -15
    ;;
  e2e)
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -1
    "$PY" benchmarks/bench_e2e.py --model default --out benchmarks/results --profile 3 | tail -30
    "$PY" benchmarks/bench_e2e.py --model llama2-7b --out benchmarks/results --profile 3 | tail -30
    ;;
  e2e-gqa)
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -1
    "$PY" benchmarks/bench_e2e.py --model llama3-8b --out benchmarks/results | tail -30
    ;;
  *)
    sed -n 2,9p "$0"
    exit 2
    ;;
esac
