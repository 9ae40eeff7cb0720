#!/usr/bin/env bash
# Nsight Compute profile of the tensor-core kernels (benchmarks/profile_cuda.py: one forward and
# backward of linear attention, the delta rule and the flash engine at the benchmark shapes):
# occupancy, warp stall reasons, issue-slot use, memory throughput per kernel, as text in
# $OUT_DIR/ncu.txt (default results/gpu_check). Needs a GPU machine whose runtime lets ncu read
# the counters (the device tool's Firecracker machines; KINDS.md) and linattn built there
# (scripts/gpu_check.sh builds it). The clocks are left alone (--clock-control none).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-results/gpu_check}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [[ -z "$NCU" ]]; then echo "gpu_profile: no ncu on this machine" | tee "$OUT/ncu.txt"; exit 0; fi
# Kernels of linattn's engines only (the ATen kernels around them are not ours to tune).
"$NCU" --clock-control none --target-processes all -k "regex:tensor_core|flash|delta" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  "$PY" -m benchmarks.profile_cuda "$@" >"$OUT/ncu.txt" 2>&1
echo "gpu_profile: ncu exit $? ($(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu.txt") kernels profiled; $OUT/ncu.txt)"
