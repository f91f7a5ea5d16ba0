#!/usr/bin/env bash
# Set up (if needed) and run the whole SDXL base + refiner pipeline on tiny random checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sdxl-nodes demo --dir "${1:-sdxl-nodes-demo}"
echo "(the sdxl-nodes command lives in the project's virtual environment: in a new shell, run"
echo " '. .venv/bin/activate' in $(pwd) first)"
