#!/usr/bin/env bash
# Create .venv with CPU torch 2.13 and the project (editable) with its editor and test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: this machine's local CPU build (a bare `torch` would pull a multi-GB CUDA build)
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[editor,test,ray]"  # ray: CI runs the --ray tests too
# Sampler goldens (tests/test_samplers_kdiffusion.py): --no-deps, its deps (torchvision, clip, wandb) would replace the CPU torch
python -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
