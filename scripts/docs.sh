#!/usr/bin/env bash
# Builds the documentation (docs/) with Sphinx into build/docs, warnings as errors. Needs the
# extension built (the API reference imports linattn): run scripts/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "sphinx>=7" "myst-parser>=3"
"$PY" -m sphinx -E -W --keep-going -q -b html docs build/docs
echo "documentation: build/docs/index.html"
