#!/usr/bin/env bash
# Sets up everything on a fresh machine (scripts/install.sh) and runs the main demo: a
# correctness check of linear attention against the float64 reference and a quick benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 examples/quickcheck.py
python3 -m benchmarks.bench_linear_attention --quick
