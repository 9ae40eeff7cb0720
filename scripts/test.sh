#!/usr/bin/env bash
# Sets up everything on a fresh machine (scripts/install.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q tests "$@"
