#!/usr/bin/env bash
# One call on a GPU machine for the Triton families: build, the whole test suite on cuda, then the
# benchmark CLI (eager / torch.compile / fastcm / floor). Logs and results under $OUT; copy the
# results into benchmarks/results/<device>/ with this command line. Attention: device_attention.sh.
#
#   OUT=/some/dir bash scripts/device_all.sh        (SKIP_TESTS=1 or SKIP_BENCH=1 shorten it)
set -uo pipefail
OUT=${OUT:-$(pwd)/device_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; git rev-parse HEAD; } | tee "$OUT/machine.txt"

step "build"
export FASTCM_CUDA_ARCH_LIST=${FASTCM_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
python -m fastcm.info | tee -a "$OUT/machine.txt"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "tests (FASTCM_TEST_DEVICE=cuda)"
  FASTCM_TEST_DEVICE=cuda timeout 330 python -m pytest tests -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
  tail -3 "$OUT/pytest.log"
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  step "benchmarks"
  PYTHONUNBUFFERED=1 timeout 250 python -m benchmarks --families precondition,losses,steps --compile \
    --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
  tail -45 "$OUT/bench.log"
fi
exit $status
