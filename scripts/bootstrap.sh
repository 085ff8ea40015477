#!/usr/bin/env bash
# Creates .venv (once) with the CPU torch wheel (or a CUDA one where FASTCM_TORCH says so) and
# installs fastcm editable with its test, plot and lint extras, building the C++ extension.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import fastcm, torch, triton, pytest, diffusers, sklearn, tqdm" 2>/dev/null || [ ! -x .venv/bin/ruff ] || [ "${FASTCM_REINSTALL:-0}" = 1 ]; then
  .venv/bin/pip install --quiet --upgrade "setuptools>=64" wheel ninja
  # torch==2.13.0 is the CPU wheel on CI's disk; a bare "torch" would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "${FASTCM_TORCH:-torch==2.13.0}"
  .venv/bin/pip install --quiet --no-build-isolation -e ".[test,plot,lint]"
fi
# k-diffusion is the oracle of tests/test_kdiffusion_compat.py. Its declared dependencies (torchvision,
# scipy, torchsde, kornia, clip, wandb, ...) are gigabytes and its sampling loops need none of them, so it
# is installed without them; the test loads k_diffusion/sampling.py with stand-ins for those imports.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('k_diffusion') is None)"; then
  .venv/bin/pip install --quiet --no-deps "k-diffusion==0.1.1.post1"
fi
