#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one command that fits the device budget (about 15 minutes
# a task, a fresh machine's start included): `all` takes at most 8 minutes on a fresh H100 / H200, the build
# included. Stages run in order of value, each under its own time box (timeout), so a stage cut short still
# leaves every earlier stage's results written: JSON + MD + PNG named after the device in benchmarks/results/,
# logs and the GPU tests' JUnit XML in $OUT (or /tmp).
#
#   bash scripts/gpu_session.sh all [--dry-run]   # build, GPU kernel tests, microbenchmarks, e2e decode (<= 8 min)
#   bash scripts/gpu_session.sh check             # older stages, one 10-minute call each:
#   bash scripts/gpu_session.sh kernels           #   build + GPU tests (~5 min), kernel microbenchmarks (~8 min),
#   bash scripts/gpu_session.sh e2e               #   e2e latency SmolLM2 + Llama-2-7B shape (~8 min),
#   bash scripts/gpu_session.sh e2e-gqa           #   e2e latency Llama-3-8B (GQA) shape (~5 min)
#
# --dry-run prints the plan and the time boxes and runs nothing (it works on any machine; the tests run it).
# Set LOWRANK_OPS_GIT_SHA to the commit being measured (the device gets a copy of the tree without .git).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}"
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results
export LOWRANK_OPS_GIT_SHA="${LOWRANK_OPS_GIT_SHA:-unknown}"

# The `all` plan: name, time box in seconds, command. Boxes sum to 480 s (8 minutes).
ALL_STAGES=(
  "build|120|$PY -m pip install --no-build-isolation -q -e . && $PY -m lowrank_ops env"
  "gpu-tests|140|LOWRANK_OPS_TEST_GPU=1 $PY -m pytest -q --junitxml=$LOG/gpu_tests.xml tests/test_cuda_kernels.py tests/test_lowrank_matmul.py tests/test_quant_lowrank_matmul.py tests/test_codebook_matmul.py -k 'gpu or cuda'"
  "bench-lowrank|55|$PY benchmarks/bench_lowrank_matmul.py --out $RESULTS --quick"
  "bench-quant|55|$PY benchmarks/bench_quant_lowrank_matmul.py --out $RESULTS --shapes 4096x4096 --ranks 0,128 --ms 1,16,64"
  "bench-codebook|45|$PY benchmarks/bench_codebook.py --out $RESULTS --quick"
  "e2e-7b-decode|65|$PY benchmarks/bench_e2e.py --model llama2-7b --out $RESULTS --decode-batches 1,8 --prefill-batches 1 --prompt-lens 512 --new-tokens 64 --no-layer-share"
)

run_all() {
  local dry_run="$1" total=0 start now elapsed status
  for stage in "${ALL_STAGES[@]}"; do
    IFS='|' read -r _ box _ <<<"$stage"
    total=$((total + box))
  done
  echo "gpu_session.sh all: ${#ALL_STAGES[@]} stages, time boxes summing to ${total} s; logs in $LOG"
  start=$(date +%s)
  for stage in "${ALL_STAGES[@]}"; do
    IFS='|' read -r name box cmd <<<"$stage"
    if [[ "$dry_run" == 1 ]]; then
      printf '  %-15s %4d s  %s\n' "$name" "$box" "$cmd"
      continue
    fi
    now=$(date +%s)
    echo "== $name (box ${box} s, $((now - start)) s into the session)"
    status=0
    timeout --signal=INT --kill-after=15 "$box" bash -c "$cmd" >"$LOG/gpu_$name.log" 2>&1 || status=$?
    tail -12 "$LOG/gpu_$name.log"
    case "$status" in
      0) ;;
      124 | 130 | 137) echo "== $name: cut at its ${box} s box; later stages still run" ;;
      *) echo "== $name: exit status $status (see $LOG/gpu_$name.log)" ;;
    esac
    if [[ "$name" == build && "$status" != 0 ]]; then
      echo "== the build failed: nothing else can run"
      return 1
    fi
  done
  elapsed=$(($(date +%s) - start))
  echo "gpu_session.sh all: done in ${elapsed} s; results: $RESULTS (named by device), logs: $LOG/gpu_*.log"
}

case "${1:-}" in
  all)
    run_all "$([[ "${2:-}" == --dry-run ]] && echo 1 || echo 0)"
    ;;
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
    "$PY" benchmarks/bench_lowrank_matmul.py --out "$RESULTS" --quick | tail -25
    "$PY" benchmarks/bench_quant_lowrank_matmul.py --out "$RESULTS" --shapes 4096x4096 --ranks 0,128 \
      --ms 1,16,64 | tail -20
    "$PY" benchmarks/bench_codebook.py --out "$RESULTS" --quick | tail -15
    ;;
  e2e)
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -1
    "$PY" benchmarks/bench_e2e.py --model default --out "$RESULTS" --profile 3 | tail -30
    "$PY" benchmarks/bench_e2e.py --model llama2-7b --out "$RESULTS" --profile 3 | tail -30
    ;;
  e2e-gqa)
    "$PY" -m pip install --no-build-isolation -q -e . 2>&1 | tail -1
    "$PY" benchmarks/bench_e2e.py --model llama3-8b --out "$RESULTS" | tail -30
    ;;
  *)
    sed -n 2,15p "$0"
    exit 2
    ;;
esac
