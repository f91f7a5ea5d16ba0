#!/usr/bin/env bash
# Create .venv with CPU torch 2.13 and the project (editable) with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: this machine's local CPU build (a bare `torch` would pull a multi-GB CUDA build)
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,ray]"  # ray: CI runs the --ray tests too
