#!/usr/bin/env bash
# One call on a GPU machine: build fastcm with the CUDA kernels, a smoke call per forward kernel,
# the attention tests on cuda, compute-sanitizer memcheck + racecheck + synccheck on small shapes,
# then the benchmark. Logs under $OUT.
#
#   OUT=/some/dir bash scripts/device_attention.sh            (run tool: $OUT is set for you)
#   SKIP_TESTS=1 / SKIP_SANITIZER=1 / SKIP_BENCH=1 / QUICK_BENCH=1 / BENCH_BUDGET=seconds shorten it;
#   SAN_TOOLS="memcheck" / SAN_TIMEOUT=seconds pick the compute-sanitizer tools and their limit. The build and the smoke
#   calls (which decide the kernels the later steps may use) run once per source state: a later call
#   on the warm machine reuses both (FORCE_SMOKE=1 reruns the smoke).
set -uo pipefail
export PYTHONUNBUFFERED=1   # a step killed by its timeout still leaves its output in the logs
OUT=${OUT:-$(pwd)/device_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
git rev-parse HEAD | tee -a "$OUT/gpu.txt"

step "build (FASTCM_CUDA_ARCH_LIST=${FASTCM_CUDA_ARCH_LIST:-9.0a})"
export FASTCM_CUDA_ARCH_LIST=${FASTCM_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
export FASTCM_NVCC_FLAGS=${FASTCM_NVCC_FLAGS:--Xptxas -v}   # the register / spill report of this nvcc
# A warm machine keeps ignored build outputs between calls: the extension is rebuilt only when its
# sources (or the arch list) changed since the last build (stamp in build/, ignored by git).
STAMP=$( (echo "$FASTCM_CUDA_ARCH_LIST"; cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/*) | sha1sum | cut -c1-16)
if [ "$(cat build/ext_stamp 2>/dev/null)" = "$STAMP" ] && python -c "import fastcm._C" 2> /dev/null; then
  echo "extension up to date (sources $STAMP): not rebuilt"
elif pip install --no-build-isolation -e . -v > "$OUT/build.log" 2>&1; then
  mkdir -p build && echo "$STAMP" > build/ext_stamp
  # Spills and wgmma serialisation (C7510-C7515) are what to look at; the full report is in build.log.
  grep -E "[1-9][0-9]* bytes spill stores|C751[0-5]" "$OUT/build.log" | sort | uniq -c | head -20
  echo "ptxas reports: $(grep -c "Used [0-9]* registers" "$OUT/build.log") kernels (build.log)"
else
  echo "BUILD FAILED"; grep -n -E "error|Error" "$OUT/build.log" | head -40; tail -40 "$OUT/build.log"; exit 1
fi
python -c "import torch, fastcm._C; assert torch.ops.fastcm.has_cuda(), 'built without CUDA'; print('has_cuda: True')" \
  2>&1 | tee "$OUT/import.txt" || { echo "IMPORT FAILED"; exit 1; }

step "smoke: one small primal + JVP + backward call per kernel choice (a hang shows as the timeout)"
# Each kernel by the switch that forces it; a failing one is switched off (and its forced tests
# deselected) for the rest of the run, so one broken kernel does not cost the other results.
# bwd_sm80: every forward default, the mma.sync backward instead of the wgmma one.
# The smoke outcome of this build is kept beside its stamp; FORCE_SMOKE=1 runs it again.
if [ "${FORCE_SMOKE:-0}" != "1" ] && [ "$(head -1 build/smoke 2>/dev/null)" = "$STAMP" ]; then
  FAILED=$(sed -n 2p build/smoke)
  echo "smoke of this build already run: failed:${FAILED:- none} (FORCE_SMOKE=1 reruns it)"
else
  FAILED=""
  for variant in default: bwd_sm80:FASTCM_ATTN_SM90_BWD tma_serial:FASTCM_ATTN_SM90_OVERLAP \
                 tma_smem_q:FASTCM_ATTN_SM90_QREGS cp_async:FASTCM_ATTN_SM90_TMA sm_80:FASTCM_ATTN_SM90; do
    name=${variant%%:*}; switch=${variant#*:}
    if env ${switch:+$switch=0} timeout 90 python scripts/attention_smoke.py > "$OUT/smoke_$name.log" 2>&1; then
      echo "$name: ok"
    else
      echo "$name: FAILED (exit $?)"; tail -14 "$OUT/smoke_$name.log"; FAILED="$FAILED $name"
    fi
  done
  printf '%s\n%s\n' "$STAMP" "$FAILED" > build/smoke
fi
[ -n "$FAILED" ] && status=1
failed() { case " $FAILED " in *" $1 "*) return 0;; esac; return 1; }
if failed default && ! failed bwd_sm80; then export FASTCM_ATTN_SM90_BWD=0
elif failed default && ! failed tma_smem_q; then export FASTCM_ATTN_SM90_QREGS=0
elif failed default && ! failed tma_serial; then export FASTCM_ATTN_SM90_OVERLAP=0
elif failed default && ! failed cp_async; then export FASTCM_ATTN_SM90_TMA=0
elif failed default; then export FASTCM_ATTN_SM90=0; fi
DESELECT=""; BENCH_SKIP=""
for name in $FAILED; do
  DESELECT="${DESELECT:+$DESELECT and }not $name"
  case $name in
    tma_serial) BENCH_SKIP="$BENCH_SKIP,_serial";;
    tma_smem_q) BENCH_SKIP="$BENCH_SKIP,_smemq";;
    bwd_sm80) BENCH_SKIP="$BENCH_SKIP,_bwdsm80";;
    cp_async) BENCH_SKIP="$BENCH_SKIP,_cpasync";;
    sm_80) BENCH_SKIP="$BENCH_SKIP,_sm80";;
  esac
done
[ -n "$FAILED" ] && echo "switched off for the rest:$FAILED (env: $(env | grep FASTCM_ATTN | tr '\n' ' '))"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "tests (FASTCM_TEST_DEVICE=cuda)"
  TESTS="tests/test_attention_cuda.py"
  [ -f tests/test_attention.py ] && TESTS="$TESTS tests/test_attention.py"   # the part-1 suite, unchanged
  TESTS="$TESTS tests/cuda_index_model/test_attention_plans.py"   # this build's kernel choice vs the models'
  # A kernel that hangs on one test's shape cannot be interrupted: pytest-timeout (in the device
  # image) then names that test and ends the run after 120 s (a cold torch.compile stays well
  # inside it) instead of spending the whole timeout. -v: each outcome is in the log as it happens.
  PER_TEST=""; python -c "import pytest_timeout" 2> /dev/null && PER_TEST="-p timeout --timeout 120 --timeout-method thread"
  FASTCM_TEST_DEVICE=cuda timeout 360 python -m pytest $TESTS -v -rfE --maxfail=40 -p no:cacheprovider --durations=15 \
    $PER_TEST ${DESELECT:+-k "$DESELECT"} > "$OUT/pytest.log" 2>&1 || status=1
  grep -E "(FAILED|ERROR)" "$OUT/pytest.log" | head -20
  tail -25 "$OUT/pytest.log"
fi

if [ "${SKIP_SANITIZER:-0}" != "1" ]; then
  step "compute-sanitizer (memcheck, racecheck, synccheck: barrier use) on small shapes"
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  cat > "$OUT/sanitize_case.py" <<'PY'
import contextlib
import os
import torch
from fastcm._extension import extension_ops
ops = extension_ops()
torch.manual_seed(0)


@contextlib.contextmanager
def switched_off(variable):
    old = os.environ.get(variable)
    os.environ[variable] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[variable]
        else:
            os.environ[variable] = old


print("forward kernels (d 64 JVP):", ops.attention_forward_kernels(torch.empty(1, 1, 1, 64, device="cuda"), torch.empty(1, 1, 1, 64, device="cuda"), True, False, False))
for dtype in (torch.bfloat16, torch.float16):
    for (B, H, Hkv, Nq, Nk, D, Dv, causal) in [(1, 2, 1, 70, 45, 64, 64, True), (1, 2, 2, 33, 100, 128, 128, False),
                                             (1, 1, 1, 20, 20, 40, 24, False), (1, 2, 2, 64, 64, 96, 96, True),
                                             (1, 2, 1, 70, 45, 256, 200, True), (1, 2, 2, 33, 100, 192, 64, False),
                                             (1, 2, 1, 200, 300, 64, 64, True), (1, 1, 1, 130, 260, 128, 128, False)]:
        r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
        q, k, v = r(B, H, Nq, D), r(B, Hkv, Nk, D), r(B, Hkv, Nk, Dv)
        bias = torch.randn(1, 1, Nq, Nk, device="cuda").expand(B, H, Nq, Nk)
        qt, kt, vt = r(B, H, Nq, D), r(B, Hkv, Nk, D), r(B, Hkv, Nk, Dv)
        for b in (None, bias):   # on sm_90: the TMA kernel, with bias tiles at d 64 (the cp.async one's at d 128)
            ops.attention_forward_jvp(q, k, v, qt, kt, vt, b, b, 0.125, causal)
        # TMA without overlap; Q from shared memory; cp.async without bias
        for switch in ("FASTCM_ATTN_SM90_OVERLAP", "FASTCM_ATTN_SM90_QREGS", "FASTCM_ATTN_SM90_TMA"):
            with switched_off(switch):
                ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, 0.125, causal)
                ops.attention_forward(q, k, v, None, 0.125, causal)
        for b in (None, bias):   # the backward (wgmma on sm_90 at d 64 / 128, mma.sync with the switch off)
            out, lse = ops.attention_forward(q, k, v, b, 0.125, causal)
            ops.attention_backward(r(B, H, Nq, Dv), q, k, v, out, lse, b, 0.125, causal,
                                   torch.randn(B, H, Nq, device="cuda"))
            with switched_off("FASTCM_ATTN_SM90_BWD"):
                ops.attention_backward(r(B, H, Nq, Dv), q, k, v, out, lse, b, 0.125, causal)
torch.cuda.synchronize()
print("sanitize case done")
PY
  for tool in ${SAN_TOOLS:-memcheck racecheck synccheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_TIMEOUT:-240} "$SAN" --tool $tool --error-exitcode 9 \
      python "$OUT/sanitize_case.py" > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && status=1
    echo "$tool exit $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  done
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  step "benchmark"
  # No new shape after BENCH_BUDGET seconds (goal shapes run first), well inside the timeout.
  BENCH_ARGS="--out $OUT/bench --time-budget ${BENCH_BUDGET:-300}${BENCH_SKIP:+ --skip ${BENCH_SKIP#,}}"
  [ "${QUICK_BENCH:-0}" = "1" ] && BENCH_ARGS="$BENCH_ARGS --quick --no-compile"
  # The JSON / CSV are rewritten after every shape: a run cut short by the timeout keeps what it measured.
  timeout 420 python -m benchmarks.attention_gpu $BENCH_ARGS > "$OUT/bench.log" 2>&1 || status=1
  tail -30 "$OUT/bench.log"
  python -m benchmarks.attention_plot "$OUT/bench/attention_gpu.json" \
    || echo "no figure here (matplotlib?): python -m benchmarks.attention_plot on the fetched JSON"
fi

step "summary"
[ -f "$OUT/pytest.log" ] && grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)" "$OUT/pytest.log" | tail -1
echo "smoke failures:${FAILED:- none}"
exit $status
