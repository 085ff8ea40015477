#!/usr/bin/env bash
# Builds .gpu-cache/triton-cache.tar.xz, the Triton cache a GPU machine's test run starts from
# (scripts/device_run.sh unpacks it when the call carries ".gpu-cache"), on a machine without a GPU:
#
#   1. record every kernel specialisation the Triton-family tests launch, in the interpreter, and those
#      the benchmark cases launch at their GPU shapes (recorded without running), with the project's
#      .venv (the launches do not depend on the Triton version);
#   2. compile them for sm_90 with the GPU machine's Python (3.12) and Triton (3.6, as torch 2.11
#      pins it) in a venv of its own: Triton's cache key hashes libtriton, built per Python version,
#      so a cache made by any other Python or Triton is never hit there;
#   3. pack each kernel's metadata and cubin (scripts/compile_triton_kernels.py --cache-out).
#
#   bash scripts/build_gpu_cache.sh            # FASTCM_GPU_PYTHON=path/to/python3.12 if not on PATH
#
# Kernels whose specialisation differs on the GPU (the tests pick other dtypes there, or other
# paths) still compile there; device_run.sh's summary counts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${FASTCM_GPU_PYTHON:-$(command -v python3.12 || true)}
VENV=${FASTCM_GPU_CACHE_VENV:-/tmp/fastcm_gpu_cache_venv}
[ -x "$PYTHON" ] || { echo "build_gpu_cache: no Python 3.12 (set FASTCM_GPU_PYTHON)"; exit 1; }
if ! "$VENV/bin/python" -c "import torch, triton; assert triton.__version__ == '3.6.0'" 2> /dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.11.0 "numpy<2.4" "setuptools<82" wheel
fi
mkdir -p .gpu-cache
FASTCM_TEST_DEVICE=cpu TRITON_INTERPRET=1 .venv/bin/python scripts/compile_triton_kernels.py \
  --record-only .gpu-cache/launches.json > .gpu-cache/record.log 2>&1 || { tail -20 .gpu-cache/record.log; exit 1; }
tail -1 .gpu-cache/record.log
.venv/bin/python scripts/compile_triton_kernels.py --record-benchmarks .gpu-cache/bench_launches.json | tail -1
# fastcm from this tree without building its extension: the Triton kernels are plain Python.
FASTCM_SKIP_EXTENSION=1 "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . > /dev/null
"$VENV/bin/python" scripts/compile_triton_kernels.py --arch 90 --launches .gpu-cache/launches.json \
  --launches .gpu-cache/bench_launches.json --cache-out .gpu-cache/triton-cache.tar.xz | tail -2
