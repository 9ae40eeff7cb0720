#!/usr/bin/env bash
# Sets up everything on a fresh machine (scripts/install.sh) and runs the main demo: a
# torchvision ViT swapped to linear attention with one line and trained for a few steps on
# synthetic images, against softmax as the images grow (about a minute on 2 CPU cores after
# the install); it prints the comparison table and where its plot was written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 examples/quickcheck.py
python3 examples/vit_linear_attention.py --quick
