#!/usr/bin/env bash
# Builds linattn's extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (LINATTN_SANITIZE=1, see setup.py) in a separate folder, so the regular build is untouched,
# and runs the CPU test files against it. Any out-of-bounds access or undefined behaviour aborts
# the run with a report. Needs gcc's libasan/libubsan (Debian: part of gcc). About 5 minutes on
# 2 cores. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${LINATTN_SANITIZE_DIR:-build/sanitize}
rm -rf "$BUILD"
mkdir -p "$BUILD"
cp -r setup.py pyproject.toml MANIFEST.in README.md LICENSE csrc linattn "$BUILD"/
rm -f "$BUILD"/linattn/*.so
if [ -d /usr/lib/ccache ]; then export PATH="/usr/lib/ccache:$PATH"; fi
(cd "$BUILD" && LINATTN_SANITIZE=1 LINATTN_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace)

# The sanitizer runtimes must be loaded before Python; leak checking is off (CPython and torch
# keep allocations alive until exit by design).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# `python -S` with site-packages on PYTHONPATH: its .pth files are then not run, so an editable
# install of the regular build cannot shadow the sanitized copy.
SITE=$("$PY" -c "import site; print(':'.join(site.getsitepackages()))")
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from the sanitized copy, so that its linattn/ (not the checkout's) is first on sys.path.
ROOT=$PWD
cd "$BUILD"
"$PY" -S -c "import linattn, os; assert linattn.__file__.startswith(os.getcwd()), linattn.__file__"
"$PY" -S -m pytest -q -p no:cacheprovider "$ROOT"/tests/ops/test_linear_attention.py "$ROOT"/tests/ops/test_edge_inputs.py \
  "$ROOT"/tests/ops/test_errors.py "$ROOT"/tests/ops/test_ops.py "$ROOT"/tests/ops/test_cpu_gemm_fallback.py \
  "$ROOT"/tests/nn/test_methods.py "$ROOT"/tests/ops/test_window_attention.py \
  "$ROOT"/tests/ops/test_block_sparse_attention.py "$ROOT"/tests/ops/test_swin_attention.py \
  "$ROOT"/tests/ops/test_lsh_attention.py "$ROOT"/tests/ops/test_sequence_parallel.py \
  "$ROOT"/tests/ops/test_decayed_linear_attention.py "$ROOT"/tests/ops/test_varlen.py "$ROOT"/tests/ops/test_recurrent_step.py \
  "$ROOT"/tests/ops/test_fused_kernels.py "$ROOT"/tests/ops/test_fuzz.py "$ROOT"/tests/ops/test_autograd_registration.py \
  "$ROOT"/tests/ops/test_delta_rule.py "$ROOT"/tests/ops/test_delta_rule_fuzz.py \
  "$ROOT"/tests/ops/test_delta_rule_channel_gates.py "$ROOT"/tests/ops/test_channel_gates.py \
  "$ROOT"/tests/ops/test_warp_layer.py "$ROOT"/tests/ops/test_tensor_core_forward.py \
  "$ROOT"/tests/ops/test_tensor_core_backward.py "$ROOT"/tests/ops/test_tensor_core_fading_backward.py \
  "$ROOT"/tests/ops/test_tensor_core_packed.py "$ROOT"/tests/ops/test_tensor_core_channel_gates.py \
  "$ROOT"/tests/ops/test_tensor_core_float16_range.py "$ROOT"/tests/ops/test_tensor_core_split_fuzz.py \
  "$ROOT"/tests/ops/test_delta_rule_tensor_core.py \
  "$ROOT"/tests/ops/test_delta_rule_step_kernel.py "$ROOT"/tests/ops/test_delta_rule_tensor_core_channel_gates.py \
  "$ROOT"/tests/ops/test_flash_forward.py "$ROOT"/tests/ops/test_flash_backward.py \
  "$ROOT"/tests/ops/test_grouped_query.py "$ROOT"/tests/ops/test_dropout.py "$ROOT"/tests/ops/test_softcap.py \
  "$ROOT"/tests/ops/test_alibi.py "$ROOT"/tests/ops/test_forgetting_attention.py \
  "$ROOT"/tests/ops/test_flash_attn_kvcache.py \
  -k "not swin_swap_models" "$@"
