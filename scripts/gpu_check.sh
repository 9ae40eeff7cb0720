#!/usr/bin/env bash
# Everything a GPU machine should check, in one command (issue 12): builds linattn against the
# torch installed there (for the visible GPU's architecture), runs the CUDA tests (both CUDA
# backends, the fused kernels' own tests, CUDA graphs and streams), the whole test suite with the
# fused kernels as the CUDA backend, an Nsight Compute profile of the tensor-core kernels
# (scripts/gpu_profile.sh), then the GPU benchmarks (linear attention; restricted softmax
# against FlexAttention; the delta rule against flash-linear-attention), and writes one JSON report
# with the pass/fail counts, the timings and the device: $OUT_DIR/gpu_check.json (default results/gpu_check).
# Installs nothing from the network (GPU machines here have none): torch, pytest and ninja must be
# there already. Usage: bash scripts/gpu_check.sh [--quick]   (--quick: the CUDA tests and the
# benchmark at the CUDA issue's target points, without the whole suite: fits a lent GPU's minutes)
# GPU_CHECK_STAGES picks stages (default "build tests suite profile bench"): a lent GPU's 10-minute
# commands take "build tests profile", then, on the still-warm machine whose build is kept, "bench".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-results/gpu_check}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
STAGES=" ${GPU_CHECK_STAGES:-build tests suite profile bench} "
wants() { [[ "$STAGES" == *" $1 "* ]]; }
build_seconds=0 cuda_seconds=0 suite_seconds=0 profile_seconds=0 bench_seconds=0

if wants build; then
  SECONDS=0
  "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  build_exit=$?
  echo "build: exit $build_exit in ${SECONDS}s (log: $OUT/build.log)"
  if [[ $build_exit != 0 ]]; then tail -n 60 "$OUT/build.log"; exit 1; fi
  build_seconds=$SECONDS
fi

# With pytest-xdist a test that crashes the process fails alone (its worker is restarted)
# instead of ending the stage without a report; pytest-timeout turns a hung kernel into a failure.
# Both were there on the H100 image this ran on (2026-11-24); neither is required.
PYTEST_EXTRA=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
# --quick runs only the tests that touch the GPU (the emulation tests in the same files run in CI),
# a hung one failing after 90 s.
QUICK=0; [[ " $* " == *" --quick "* ]] && QUICK=1
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout "$([[ $QUICK == 1 ]] && echo 90 || echo 300)")
[[ $QUICK == 1 ]] && PYTEST_EXTRA+=(-k "cuda or stream")

if wants tests; then
  SECONDS=0
  "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_EXTRA[@]}" tests/gpu/test_cuda.py tests/ops/test_fused_kernels.py \
    tests/ops/test_tensor_core_forward.py tests/ops/test_tensor_core_backward.py \
    tests/ops/test_tensor_core_wide_backward.py tests/ops/test_tensor_core_fading_backward.py \
    tests/ops/test_tensor_core_packed.py tests/ops/test_tensor_core_channel_gates.py tests/ops/test_flash_forward.py \
    tests/ops/test_tensor_core_float16_range.py \
    tests/ops/test_flash_backward.py tests/ops/test_softcap.py tests/ops/test_alibi.py tests/ops/test_grouped_query.py \
    tests/ops/test_dropout.py \
    tests/ops/test_delta_rule_tensor_core.py \
    tests/ops/test_delta_rule_tensor_core_backward.py tests/ops/test_delta_rule_step_kernel.py \
    tests/ops/test_delta_rule_channel_gates.py tests/ops/test_delta_rule_tensor_core_channel_gates.py \
    tests/integrations/test_fla_compat_cuda.py \
    -rfE --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 40
  cuda_seconds=$SECONDS
fi

if wants suite; then
  SECONDS=0
  if [[ $QUICK == 1 ]]; then
    echo "suite with the fused backend: skipped (--quick fits the time a GPU is lent)" | tee "$OUT/suite.log"
  else
    LINATTN_CUDA_BACKEND=fused "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_EXTRA[@]}" tests \
      --junitxml="$OUT/suite_fused_backend.xml" 2>&1 | tail -n 40 | tee "$OUT/suite.log"
  fi
  suite_seconds=$SECONDS
fi

limit() { [[ $QUICK == 1 ]] && echo "$1" || echo 7200; }

# What limits each tensor-core kernel (Nsight Compute, where the machine lets it read counters).
if wants profile; then
  SECONDS=0
  OUT_DIR="$OUT" timeout "$(limit 120)" bash scripts/gpu_profile.sh
  profile_seconds=$SECONDS
fi

# --quick: each benchmark under its own time limit in seconds (the linear-attention table first and
# longest) so that one slow or hung benchmark cannot take the others' minutes.
if wants bench; then
  SECONDS=0
  timeout "$(limit 220)" "$PY" -m benchmarks.bench_cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_cuda.log"
  timeout "$(limit 120)" "$PY" -m benchmarks.bench_delta_cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_delta_cuda.log"
  timeout "$(limit 100)" "$PY" -m benchmarks.bench_restricted_cuda --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench_restricted_cuda.log"
  timeout "$(limit 70)" "$PY" -m benchmarks.bench_swin --device cuda --dtype bfloat16 --batch 32 --out "$OUT" "$@" \
    2>&1 | tee "$OUT/bench_swin.log"
  bench_seconds=$SECONDS
fi

"$PY" scripts/gpu_report.py "$OUT" "build=$build_seconds" "cuda_tests=$cuda_seconds" \
  "suite=$suite_seconds" "profile=$profile_seconds" "benchmark=$bench_seconds"
