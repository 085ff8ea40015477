#!/usr/bin/env bash
# The whole GPU verdict in ONE device call: machine facts, the build (sm_90a only), a smoke call per
# attention kernel choice, the whole test suite on cuda, the benchmarks (Triton families, then the
# attention table), compute-sanitizer on the smallest shape, and a one-screen summary.
#
# HOW TO RUN IT (the run tool copies the git working tree, tracked and untracked-not-ignored files,
# to the GPU machine and runs the command in the repository root with $OUT an empty folder):
#
#   run(command="bash scripts/device_run.sh", timeout_s=590)
#
#   Nothing ignored needs to travel (no carry): the script builds the extension itself. On a machine
#   still warm from an earlier call it reuses the build (stamp in build/) and the smoke outcome.
#   It ends by itself within DEVICE_BUDGET (540 s) plus a few seconds; timeout_s=590 leaves the rest
#   of the 600 s call limit for the tool. The machine start (1-2 min) comes on top, outside the call.
#   Results come back as at most 8 files under $OUT (run.log, summary.txt, build.log, smoke.log,
#   pytest.log, bench.log, sanitizer.log, results.tar.gz). Afterwards, on this machine:
#
#     gpu=$(sed -n 's/^gpu: //p' <files_at>/summary.txt | tr ' ' '-')      # e.g. NVIDIA-H200
#     run=benchmarks/results/$gpu/$(date +%F)-run1                          # one folder per call
#     mkdir -p $run && tar -xzf <files_at>/results.tar.gz -C $run
#     cp <files_at>/{summary,smoke,bench}.* $run/   # the phase table and verdict; add a README.md
#
#   (results.tar.gz holds triton/results.{json,csv} (every family) and attention/attention_gpu.{json,csv},
#   each JSON with the command, commit and device inside.)
#
# Time: phases run in this order, each under its own `timeout`, each given
#   min(its cap, DEVICE_BUDGET - elapsed - the minimum of every later phase - 10 s for the summary),
# so a phase that runs long shrinks the later ones and one that exceeds its budget is cut and
# reported (CUT) instead of costing the call; every later phase keeps its minimum, and the last,
# compute-sanitizer, gets what is left. The build's time on the H200 (MAX_JOBS=16, sm_90a only): 59 s and 55 s in the first two
# calls (benchmarks/results/NVIDIA-H200), so MEASURED_BUILD_S = 60; a warm machine reuses the build.
# The planned budget table: `bash scripts/device_run.sh --plan` (tests/test_device_run.py checks that
# it adds to <= 540 s, and that the header's two calls fit one session's device time).
#
# Switches (environment): DEVICE_BUDGET=seconds (540); DEVICE_RUN_CAPS="tests=200 bench=120" (phase
# caps); TEST_TIMEOUT=seconds per test (120); TEST_SHARDS=parallel pytest processes (14, of 16 cores);
# FORCE_SMOKE=1 reruns the smoke on a warm machine; DEVICE_RUN_SKIP="smoke bench sanitizer" leaves those
# phases out (facts and build always run: a second call of a session spends its minutes on the rest);
# DEVICE_RUN_SIMULATE=1 runs every phase on this CPU machine with stand-ins (tests/test_device_run.py;
# see "simulation" below).
#
# Test oracles the machine lacks (diffusers, k-diffusion) travel as wheels: once, here,
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl diffusers==0.42.1 k-diffusion==0.1.1.post1 importlib_metadata
# and call run(..., carry=[".whl"]): the script installs them under $WORK before the tests.
#
# Triton's JIT: the suite launches ~2300 kernel specialisations and each costs about a second of
# compile on first launch, most of the test phase. A cache compiled on the CPU machine with the GPU
# machine's Python 3.12 and Triton 3.6 loads instead (scripts/build_gpu_cache.sh writes
# .gpu-cache/triton-cache.tar.xz; carry ".gpu-cache"). The summary says how many kernels were
# carried and how many still compiled there. The cache lives in build/triton-cache, so a second call
# on the warm machine reuses what the first compiled.
#
# One call holds the verdict (build, smoke, tests, sanitizer) or the measurements, not both: the
# whole suite needs ~400 s there and the benchmarks with torch.compile as long. With a 15-minute
# device session, two calls back to back on the same warm machine (the second reuses the build):
#   run(command='DEVICE_BUDGET=400 DEVICE_RUN_SKIP="bench" bash scripts/device_run.sh', carry=[".whl", ".gpu-cache"], timeout_s=450)
#   run(command='DEVICE_BUDGET=360 DEVICE_RUN_SKIP="smoke tests sanitizer" bash scripts/device_run.sh', carry=[".gpu-cache"], timeout_s=410)
# (400 + 360 s, a machine start of ~30-60 s and the transfers fit the 900 s; call the second at once:
# the machine is given back after 30 s idle.)
set -uo pipefail
export PYTHONUNBUFFERED=1   # a phase cut by its timeout still leaves its output in the logs
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MEASURED_BUILD_S=60         # the sm_90a-only build on the H200 (above)

SIMULATE=${DEVICE_RUN_SIMULATE:-0}
if [ "$SIMULATE" = 1 ]; then
  # Wall times on a loaded 2-core CI machine are mostly Python start-ups (torch imports).
  DEVICE_BUDGET=${DEVICE_BUDGET:-290}
  declare -A CAP=([facts]=30 [build]=20 [smoke]=70 [tests]=90 [bench]=110 [sanitizer]=20)
  declare -A MIN=([facts]=2 [build]=2 [smoke]=5 [tests]=10 [bench]=5 [sanitizer]=5)
  TEST_TIMEOUT=${TEST_TIMEOUT:-4}; SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-60}
else
  DEVICE_BUDGET=${DEVICE_BUDGET:-540}
  declare -A CAP=([facts]=20 [build]=330 [smoke]=150 [tests]=420 [bench]=400 [sanitizer]=60)
  declare -A MIN=([facts]=5 [build]=60 [smoke]=40 [tests]=60 [bench]=45 [sanitizer]=20)
  TEST_TIMEOUT=${TEST_TIMEOUT:-120}; SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-35}
fi
for kv in ${DEVICE_RUN_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done
PHASES=(facts build)
for phase in smoke tests bench sanitizer; do
  case " ${DEVICE_RUN_SKIP:-} " in *" $phase "*) ;; *) PHASES+=("$phase");; esac
done
SUMMARY_RESERVE=10

# The budget of phase $1 when $2 seconds have elapsed.
budget_for() {
  local phase=$1 elapsed=$2 later=0 seen=0 q
  for q in "${PHASES[@]}"; do
    [ $seen = 1 ] && later=$((later + MIN[$q]))
    [ "$q" = "$phase" ] && seen=1
  done
  local left=$((DEVICE_BUDGET - elapsed - SUMMARY_RESERVE - later))
  echo $((left < CAP[$phase] ? left : CAP[$phase]))
}

if [ "${1:-}" = "--plan" ]; then
  # The budgets the phases get when each uses what it is expected to: facts 10 s, the build its
  # measured time, the smoke 6 kernel choices x 15 s, every later phase its whole budget.
  declare -A EXPECT=([facts]=10 [build]=${PLAN_BUILD_S:-$MEASURED_BUILD_S} [smoke]=90)
  t=0
  printf '%-10s %8s %8s %8s\n' phase start budget planned
  for phase in "${PHASES[@]}"; do
    b=$(budget_for "$phase" $t); [ "$b" -lt 0 ] && b=0
    use=${EXPECT[$phase]:-$b}; [ "$use" -gt "$b" ] && use=$b
    printf '%-10s %8d %8d %8d\n' "$phase" $t "$b" "$use"
    t=$((t + use))
  done
  printf '%-10s %8d %8d %8d\n' summary $t $SUMMARY_RESERVE $SUMMARY_RESERVE
  echo "total planned: $((t + SUMMARY_RESERVE)) s of DEVICE_BUDGET $DEVICE_BUDGET s"
  exit 0
fi

OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")   # everything but the <= 8 files that come back
STATE=$ROOT/build                                        # warm-machine stamps (ignored by git)
exec > >(tee "$OUT/run.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
declare -A USED STATUS BUDGET
# run_phase NAME FUNCTION: FUNCTION in a child bash under `timeout <budget>`; it sees PHASE_END (epoch
# seconds) to size its own inner timeouts.
run_phase() {
  local name=$1 fn=$2 b start rc
  case " ${PHASES[*]} " in *" $name "*) ;; *) echo "=== $name: skipped (DEVICE_RUN_SKIP)"; return;; esac
  b=$(budget_for "$name" "$(now)")
  BUDGET[$name]=$b
  echo; echo "=== $name: budget ${b} s (elapsed $(now) s)"
  if [ "$b" -lt "${MIN[$name]}" ]; then
    USED[$name]=0; STATUS[$name]="skipped: no time left"; echo "=== $name: skipped (no time left)"; return
  fi
  start=$(date +%s)
  PHASE_END=$((start + b)) timeout --kill-after=5 "$b" bash -c "$fn"
  rc=$?
  USED[$name]=$(( $(date +%s) - start ))
  case $rc in
    0) STATUS[$name]=ok;;
    124|137) STATUS[$name]="CUT at its budget (${b} s)";;
    *) STATUS[$name]="failed (exit $rc)";;
  esac
  echo "=== $name: ${USED[$name]} s (budget $b s): ${STATUS[$name]}"
}
export ROOT OUT WORK STATE SIMULATE TEST_TIMEOUT SMOKE_TIMEOUT
left_in_phase() { echo $(( PHASE_END - $(date +%s) )); }
export -f left_in_phase

# ---- simulation: stand-ins for the GPU machine's tools --------------------------------------------
if [ "$SIMULATE" = 1 ]; then
  mkdir -p "$WORK/stubs" "$WORK/state"
  STATE=$WORK/state
  cat > "$WORK/stubs/nvidia-smi" <<'SH'
#!/usr/bin/env bash
case "$*" in
  *noheader*) echo "Simulated H200";;
  *) echo "name, driver_version, memory.total [MiB], clocks.max.sm [MHz]"; echo "Simulated H200, 0.0, 143771 MiB, 1980 MHz";;
esac
SH
  # compute-sanitizer as refused on one of the device machines' runtimes, or (ok) running the case.
  cat > "$WORK/stubs/compute-sanitizer" <<'SH'
#!/usr/bin/env bash
if [ "${DEVICE_RUN_SIM_SANITIZER:-refused}" = refused ]; then
  echo "========= Error: Device not supported"; exit 1
fi
while [ "${1#-}" != "$1" ]; do [ "$1" = --tool ] || [ "$1" = --error-exitcode ] && shift; shift; done
"$@" && echo "========= ERROR SUMMARY: 0 errors"
SH
  chmod +x "$WORK/stubs/"*
  export PATH=$WORK/stubs:$PATH
fi
export STATE

# ---- phase 1: machine facts -----------------------------------------------------------------------
phase_facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python - <<'PY'
import importlib.util
import torch
import triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "pytest-timeout:", "yes" if importlib.util.find_spec("pytest_timeout") else "no (the plugin's watchdog)")
PY
  (command -v nvcc > /dev/null && nvcc --version | tail -2) || echo "nvcc: not on PATH"
  # The tool copies the working tree; the .git beside it may predate it (a session's later commits).
  echo "cores: $(nproc), .git HEAD: $(git rev-parse --short HEAD 2> /dev/null || echo unknown)," \
    "files differing from it: $(git status --porcelain 2> /dev/null | wc -l)"
}
export -f phase_facts

# ---- phase 2: build, sm_90a only, with the ptxas report -------------------------------------------
export FASTCM_CUDA_ARCH_LIST=${FASTCM_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export FASTCM_NVCC_FLAGS=${FASTCM_NVCC_FLAGS:--Xptxas -v}   # the register / spill report of this nvcc
STAMP=$( (echo "$FASTCM_CUDA_ARCH_LIST $FASTCM_NVCC_FLAGS"; cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) \
  | sha1sum | cut -c1-16)
export STAMP
phase_build() {
  # A warm machine keeps ignored build outputs between calls: rebuilt only when the sources changed.
  if [ "$(cat "$STATE/ext_stamp" 2> /dev/null)" = "$STAMP" ] && python -c "import fastcm._C" 2> /dev/null; then
    echo "extension up to date (sources $STAMP): not rebuilt"; return 0
  fi
  if [ "$SIMULATE" = 1 ]; then
    # The CPU machine's extension is already built (scripts/bootstrap.sh); what is simulated is the
    # log this phase reads: a ptxas report with one C75xx diagnostic and one spill.
    { echo "ptxas info    : Used 168 registers, 0 bytes spill stores, 0 bytes spill loads (simulated)"
      echo "ptxas info    : Used 255 registers, 24 bytes spill stores, 24 bytes spill loads (simulated)"
      echo "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized (simulated)"
    } > "$OUT/build.log"
    sleep "${DEVICE_RUN_SIM_BUILD_S:-1}"
  elif ! python -m pip install --no-build-isolation --no-deps -e . -v > "$OUT/build.log" 2>&1; then
    echo "BUILD FAILED"; grep -n -E "error|Error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; return 1
  fi
  mkdir -p "$STATE" && echo "$STAMP" > "$STATE/ext_stamp"
}
export -f phase_build
ptxas_report() {
  [ -f "$OUT/build.log" ] || { echo "ptxas: no build log (build reused)"; return; }
  echo "ptxas: $(grep -c "Used [0-9]* registers" "$OUT/build.log") kernel reports," \
       "$(grep -c -E "C75[0-9][0-9]" "$OUT/build.log") C75xx diagnostics," \
       "$(grep -c -E "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log") reports with spills (build.log)"
  grep -E "C75[0-9][0-9]|[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log" | sed 's/^ *//' | sort | uniq -c | head -12
}
ptxas_table() {   # the register / spill table per kernel (run.log)
  [ "$SIMULATE" = 1 ] || [ ! -f "$OUT/build.log" ] || timeout 30 python scripts/ptxas_report.py "$OUT/build.log" || true
}

# ---- phase 3: a smoke call per kernel choice -------------------------------------------------------
# Each kernel choice by the switch that forces it, under its own timeout (a hang shows as exit 124).
# Order: the kernels without TMA first, the TMA ones last; once a TMA kernel hangs while cp_async
# (the same wgmma steps without TMA) passed, the remaining TMA-only choices are not run, so a TMA hang
# costs one slot. bias_vector: the vectorised bias staging (FASTCM_ATTN_BIAS_STAGE=vector).
# A failing choice is switched off for the rest of the run (its forced tests deselected, its
# benchmark rows skipped). Outcome kept beside the build stamp: a warm machine reuses it.
SMOKE_VARIANTS="sm_80:FASTCM_ATTN_SM90=0 cp_async:FASTCM_ATTN_SM90_TMA=0 default: bwd_sm80:FASTCM_ATTN_SM90_BWD=0
  bias_vector:FASTCM_ATTN_BIAS_STAGE=vector tma_serial:FASTCM_ATTN_SM90_OVERLAP=0 tma_smem_q:FASTCM_ATTN_SM90_QREGS=0"
export SMOKE_VARIANTS
phase_smoke() {
  if [ "${FORCE_SMOKE:-0}" != 1 ] && [ "$(head -1 "$STATE/smoke" 2> /dev/null)" = "$STAMP" ]; then
    echo "smoke of this build already run: failed:$(sed -n 2p "$STATE/smoke") (FORCE_SMOKE=1 reruns it)"; return 0
  fi
  local failed="" tma_hung=0 cp_async_ok=0 device=cuda
  [ "$SIMULATE" = 1 ] && device=cpu
  : > "$OUT/smoke.log"
  for variant in $SMOKE_VARIANTS; do
    local name=${variant%%:*} setting=${variant#*:} limit
    case $name in
      tma_serial|tma_smem_q)
        if [ $tma_hung = 1 ]; then echo "$name: not run (a TMA kernel hung)"; failed="$failed $name"; continue; fi;;
    esac
    limit=$(left_in_phase); [ "$limit" -gt "$SMOKE_TIMEOUT" ] && limit=$SMOKE_TIMEOUT
    if [ "$limit" -lt 3 ]; then echo "$name: not run (phase budget spent)"; failed="$failed $name"; continue; fi
    local extra=""; [ "$name" = bwd_sm80 ] && [ $tma_hung = 1 ] && extra="FASTCM_ATTN_SM90_TMA=0"
    echo "--- $name ($setting${extra:+ $extra}), limit $limit s" >> "$OUT/smoke.log"
    local smoke="python scripts/attention_smoke.py --device $device --bias"
    if [ "$SIMULATE" = 1 ]; then
      # The switches change nothing on the CPU kernels: one real CPU smoke (default), stand-ins for the
      # rest; DEVICE_RUN_SIM_HANG names a choice that hangs (the timeout and TMA-skip path).
      smoke=true; [ "$name" = default ] && smoke="python scripts/attention_smoke.py --device cpu --bias --small"
      [ "$name" = "${DEVICE_RUN_SIM_HANG:-}" ] && smoke="sleep 1000"
    fi
    if env $setting $extra timeout "$limit" $smoke >> "$OUT/smoke.log" 2>&1; then
      echo "$name: ok"; [ "$name" = cp_async ] && cp_async_ok=1
    else
      local rc=$?
      echo "$name: FAILED (exit $rc$([ $rc = 124 ] && echo ": hung, cut at $limit s"))"
      tail -6 "$OUT/smoke.log" | sed 's/^/    /'
      failed="$failed $name"
      case $name in default|bwd_sm80|bias_vector) [ $rc = 124 ] && [ $cp_async_ok = 1 ] && tma_hung=1;; esac
    fi
  done
  printf '%s\n%s\n' "$STAMP" "$failed" > "$STATE/smoke"
}
export -f phase_smoke

# ---- phase 4: the whole test suite on cuda ---------------------------------------------------------
# TEST_SHARDS pytest processes in parallel (the Triton JIT compiles on the CPU cores), test files
# spread by size. Per test: pytest-timeout where installed, else scripts/device_run_plugin.py's
# watchdog; either ends the process on a hung test, and the plugin's record of finished tests lets
# the shard resume after it (the hung or crashed test named in pytest.log), while time is left.
phase_tests() {
  local shards=${TEST_SHARDS:-14} i
  # One CPU thread per shard: 14 processes each with torch's default of 16 threads would oversubscribe
  # the cores that the Triton JIT and the CPU-side tests need.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  mkdir -p "$WORK/tests"
  local per_test=""
  python -c "import pytest_timeout" 2> /dev/null && per_test="-p timeout --timeout $TEST_TIMEOUT --timeout-method thread"
  export DEVICE_RUN_TEST_TIMEOUT=$([ -z "$per_test" ] && echo "$TEST_TIMEOUT" || echo 0)
  export PYTHONPATH=$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}
  if [ -d "$ROOT/.whl" ] && [ "$SIMULATE" != 1 ]; then   # the carried test oracles (header)
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$ROOT"/.whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:$WORK/site && echo "test oracles from .whl: $(ls "$ROOT/.whl" | tr '\n' ' ')"
  fi
  if [ "$SIMULATE" = 1 ]; then
    # Stand-ins: the GPU tests' logic on the CPU kernels (scripts/gpu_tests_dry_run.py, a slice of
    # it), a Triton family on CPU, and a shard with a test that hangs (the resume path).
    mkdir -p "$WORK/hang"
    printf '%s\n' "import time" "def test_before(): pass" "def test_hangs(): time.sleep(600)" "def test_after(): pass" \
      > "$WORK/hang/test_sim_hang.py"
    echo "python scripts/gpu_tests_dry_run.py --run sm_90:model -k 'test_forward_kernel_choice or test_empty_keys'" \
      > "$WORK/tests/cmd0"
    echo "python -m pytest tests/test_schedules.py -k 'not compile'" > "$WORK/tests/cmd1"
    echo "python -m pytest $WORK/hang/test_sim_hang.py" > "$WORK/tests/cmd2"
    shards=3
  else
    # Largest files first onto the least-loaded shard; tests/test_device_run.py is this script's
    # own CPU simulation (not a device test).
    local files
    files=$(find tests -name "test_*.py" ! -name test_device_run.py -printf '%s %p\n' | sort -rn | awk '{print $2}')
    declare -a load names
    for ((i = 0; i < shards; i++)); do load[i]=0; names[i]=""; done
    for f in $files; do
      local best=0; for ((i = 1; i < shards; i++)); do [ "${load[i]}" -lt "${load[best]}" ] && best=$i; done
      load[best]=$((load[best] + $(stat -c %s "$f"))); names[best]="${names[best]} $f"
    done
    for ((i = 0; i < shards; i++)); do
      echo "FASTCM_TEST_DEVICE=cuda python -m pytest${names[i]}" > "$WORK/tests/cmd$i"
    done
  fi
  for ((i = 0; i < shards; i++)); do
    (
      export DEVICE_RUN_DONE=$WORK/tests/done$i DEVICE_RUN_CURRENT=$WORK/tests/current$i \
        DEVICE_RUN_HUNG=$WORK/tests/hung$i DEVICE_RUN_FAILURES=$WORK/tests/failures$i \
        DEVICE_RUN_DURATIONS=$WORK/tests/durations$i
      : > "$DEVICE_RUN_DONE"; : > "$DEVICE_RUN_HUNG"; : > "$WORK/tests/log$i"
      for attempt in 1 2 3 4; do
        : > "$DEVICE_RUN_CURRENT"
        echo "### shard $i attempt $attempt: $(cat "$WORK/tests/cmd$i")" >> "$WORK/tests/log$i"
        eval "$(cat "$WORK/tests/cmd$i") -v -rfE -p no:cacheprovider -p device_run_plugin $per_test ${PYTEST_DESELECT:-}" \
          >> "$WORK/tests/log$i" 2>&1
        rc=$?
        current=$(cat "$DEVICE_RUN_CURRENT")
        # Ended inside a test (hung past its limit, or crashed): record it and resume after it.
        if [ -n "$current" ] && ! grep -qxF "$current" "$DEVICE_RUN_DONE"; then
          echo "$current" >> "$DEVICE_RUN_HUNG"
          echo "### shard $i: ended inside $current (exit $rc): HUNG or CRASHED; resuming after it" >> "$WORK/tests/log$i"
          [ "$(left_in_phase)" -gt 15 ] && continue
        fi
        break
      done
    ) &
  done
  wait
}
export -f phase_tests
merge_test_logs() {
  [ -d "$WORK/tests" ] || return
  cat "$WORK"/tests/log* > "$OUT/pytest.log" 2> /dev/null
  cat "$WORK"/tests/hung* 2> /dev/null | sed 's/^/HUNG or CRASHED (ended the process) /' >> "$OUT/pytest.log"
  { echo "### the 40 slowest tests (seconds, setup + call + teardown)"
    cat "$WORK"/tests/durations* 2> /dev/null | sort -rn | head -40
    echo "### failures, as they happened (the last lines of each traceback)"; cat "$WORK"/tests/failures* 2> /dev/null; } \
    >> "$OUT/pytest.log"
}
test_totals() {
  # Sum of pytest's final lines over every shard and attempt ("3 failed, 120 passed, 5 skipped in 30.1s").
  grep -E "^=* ?[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)(,| in ).*[0-9.]+s" "$OUT/pytest.log" 2> /dev/null |
    grep -oE "[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed)" |
    awk '{n[$2] += $1} END {s = ""; for (k in n) s = s n[k] " " k ", "
                            print (s == "" ? "no pytest totals" : substr(s, 1, length(s) - 2))}'
  echo "hung / crashed: $(cat "$WORK"/tests/hung* 2> /dev/null | wc -l)"
}

# ---- phase 5: benchmarks ------------------------------------------------------------------------
# The Triton families (--compile: eager, torch.compile and fastcm in one run) in one process, which
# writes its JSON after every case, get half of the phase; the attention table 3/5 of the rest, under
# its own --time-budget (it too writes after every shape; its first block is biased vs unbiased with
# both bias staging modes); the Triton attention tile sweep (benchmarks/attention_triton_tiles.py)
# what is left.
phase_bench() {
  exec > >(tee -a "$OUT/bench.log") 2>&1
  mkdir -p "$WORK/results"
  local limit rc status=0 families
  families=$(ls benchmarks/bench_*.py | sed 's|.*/bench_||; s|\.py$||' | grep -vx attention | paste -sd, -)
  limit=$(( $(left_in_phase) / 2 ))
  if [ "$SIMULATE" = 1 ]; then   # one CPU case of one family
    families=precondition
    timeout "$limit" python -m benchmarks --families "$families" --no-compile --no-plot \
      --filter "${DEVICE_RUN_SIM_FILTER:-edm fwd/8x4x32x32/float32}" --out "$WORK/results/triton"
  else
    timeout "$limit" python -m benchmarks --families "$families" --compile --no-plot --out "$WORK/results/triton"
  fi
  rc=$?; [ $rc = 0 ] || status=1
  echo "bench $families: exit $rc$([ $rc = 124 ] && echo ": cut at $limit s, the rows measured by then kept")"
  limit=$(( ($(left_in_phase) - 5) * 3 / 5 ))
  if [ "$SIMULATE" = 1 ]; then
    # attention_gpu.py needs a GPU: the CPU attention cases stand in for it.
    timeout "$limit" python -m benchmarks --families attention --no-compile --no-plot \
      --filter "${DEVICE_RUN_SIM_ATTN_FILTER:-primal/1x4x256x64}" --out "$WORK/results/attention"
  else
    timeout "$limit" python -m benchmarks.attention_gpu --out "$WORK/results/attention" --quick \
      --time-budget $(( limit * 3 / 4 )) ${BENCH_SKIP:+--skip "$BENCH_SKIP"}
  fi
  rc=$?; [ $rc = 0 ] || status=1
  echo "bench attention: exit $rc$([ $rc = 124 ] && echo ": cut at $limit s")"
  limit=$(( $(left_in_phase) - 5 ))
  if [ "$SIMULATE" != 1 ] && [ "$limit" -gt 20 ]; then
    timeout "$limit" python -m benchmarks.attention_triton_tiles --out "$WORK/results/attention" \
      --time-budget $(( limit - 15 ))
    echo "bench triton tiles: exit $?"
  fi
  return $status
}
export -f phase_bench

# ---- phase 6: compute-sanitizer, once, smallest shape ---------------------------------------------
phase_sanitizer() {
  local san device=cuda
  [ "$SIMULATE" = 1 ] && device=cpu
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
  [ -n "$san" ] || { echo "compute-sanitizer: not found: skipped" | tee "$OUT/sanitizer.log"; return 0; }
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(( $(left_in_phase) - 2 )) "$san" --tool memcheck --error-exitcode 9 \
    python scripts/attention_smoke.py --device $device --bias --small > "$OUT/sanitizer.log" 2>&1
  local rc=$?
  if grep -q -i "device not supported\|not supported on this device" "$OUT/sanitizer.log"; then
    echo "compute-sanitizer refused the device (Device not supported): skipped"; return 0
  fi
  echo "memcheck exit $rc: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  return $rc
}
export -f phase_sanitizer

# ---- the Triton cache (header) --------------------------------------------------------------------
export TRITON_CACHE_DIR=$STATE/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
TRITON_CARRIED=0
if [ -f "$ROOT/.gpu-cache/triton-cache.tar.xz" ] && [ "$SIMULATE" != 1 ]; then
  TRITON_CARRIED=$(python scripts/compile_triton_kernels.py --unpack-cache "$ROOT/.gpu-cache/triton-cache.tar.xz" \
    "$TRITON_CACHE_DIR" | grep -oE "^[0-9]+")
fi
cubins() { find "$TRITON_CACHE_DIR" -name "*.cubin" 2> /dev/null | wc -l; }
CUBINS_START=$(cubins)

# ---- the run ------------------------------------------------------------------------------------
echo "device_run: DEVICE_BUDGET ${DEVICE_BUDGET} s$([ "$SIMULATE" = 1 ] && echo ", SIMULATED on CPU stand-ins")"
run_phase facts phase_facts
run_phase build phase_build
if [ "${STATUS[build]}" = ok ] && [ "$SIMULATE" != 1 ]; then
  python -c "import torch, fastcm._C; assert torch.ops.fastcm.has_cuda(), 'built without CUDA'; print('has_cuda: True')" \
    || STATUS[build]="failed (import)"
fi
ptxas_report
ptxas_table
if [ "${STATUS[build]}" != ok ]; then
  for phase in smoke tests bench sanitizer; do USED[$phase]=0; BUDGET[$phase]=0; STATUS[$phase]="not run: build failed"; done
else
  run_phase smoke phase_smoke
  FAILED=$(sed -n 2p "$STATE/smoke" 2> /dev/null)
  failed() { case " $FAILED " in *" $1 "*) return 0;; esac; return 1; }
  # The kernels the later phases use when the default failed (as the tests' switches name them).
  if failed default && failed tma_serial && ! failed cp_async; then export FASTCM_ATTN_SM90_TMA=0
  elif failed default && ! failed bwd_sm80; then export FASTCM_ATTN_SM90_BWD=0
  elif failed default && ! failed tma_smem_q; then export FASTCM_ATTN_SM90_QREGS=0
  elif failed default && ! failed tma_serial; then export FASTCM_ATTN_SM90_OVERLAP=0
  elif failed default && ! failed cp_async; then export FASTCM_ATTN_SM90_TMA=0
  elif failed default; then export FASTCM_ATTN_SM90=0; fi
  DESELECT=""; BENCH_SKIP=""
  for name in $FAILED; do
    # The forced tests of that choice (test ids name the kernel; the staging mode as "vector").
    keyword=$name; [ "$name" = bias_vector ] && keyword=vector
    [ "$name" = default ] || DESELECT="${DESELECT:+$DESELECT and }not $keyword"
    case $name in
      tma_serial) BENCH_SKIP="$BENCH_SKIP,_serial";; tma_smem_q) BENCH_SKIP="$BENCH_SKIP,_smemq";;
      bwd_sm80) BENCH_SKIP="$BENCH_SKIP,_bwdsm80";; cp_async) BENCH_SKIP="$BENCH_SKIP,_cpasync";;
      sm_80) BENCH_SKIP="$BENCH_SKIP,_sm80";; bias_vector) BENCH_SKIP="$BENCH_SKIP,_biasvec";;
    esac
  done
  export BENCH_SKIP=${BENCH_SKIP#,}
  [ "$SIMULATE" != 1 ] && [ -n "$DESELECT" ] && export PYTEST_DESELECT="-k '$DESELECT'"
  [ -n "$FAILED" ] && echo "switched off for the rest:$FAILED ($(env | grep '^FASTCM_ATTN' | tr '\n' ' '))"
  run_phase tests phase_tests
  merge_test_logs
  run_phase bench phase_bench
  run_phase sanitizer phase_sanitizer
fi
[ -d "$WORK/results" ] && tar -czf "$OUT/results.tar.gz" -C "$WORK/results" .
[ -f "$OUT/smoke.log" ] || echo "(smoke reused from the warm machine's stamp)" > "$OUT/smoke.log"

# ---- summary (one screen, also $OUT/summary.txt) ------------------------------------------------
{
  echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)"
  echo "commit: $(git rev-parse --short HEAD 2> /dev/null), DEVICE_BUDGET ${DEVICE_BUDGET} s, total $(now) s" \
       "$([ "$SIMULATE" = 1 ] && echo "(SIMULATED)")"
  printf '%-10s %7s %7s  %s\n' phase budget used status
  for phase in "${PHASES[@]}"; do
    printf '%-10s %7s %7s  %s\n' "$phase" "${BUDGET[$phase]:-0}" "${USED[$phase]:-0}" "${STATUS[$phase]:-not run}"
  done
  ptxas_report
  echo "smoke failed:${FAILED:- none}"
  echo "triton: ${TRITON_CARRIED:-0} kernels carried, $(( $(cubins) - CUBINS_START )) compiled on this machine in this call"
  echo "tests: $(test_totals | head -1); $(test_totals | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" 2> /dev/null | sort -u | head -12 | cut -c1-150
  grep -h -E "bias/unbiased" "$OUT/bench.log" 2> /dev/null | head -4
  grep -h -E "^(compute-sanitizer|memcheck)" "$OUT/sanitizer.log" "$OUT/run.log" 2> /dev/null | tail -1
  echo "files in \$OUT: $(( $(ls "$OUT" | grep -vcx summary.txt) + 1 )) with this summary (at most 8)"
} > "$WORK/summary.txt"
echo; echo "=== summary"; cp "$WORK/summary.txt" "$OUT/summary.txt"; cat "$OUT/summary.txt"
[ "$SIMULATE" = 1 ] || rm -rf "$WORK"
status=0
for phase in "${PHASES[@]}"; do [ "${STATUS[$phase]:-}" = ok ] || [ "$phase" = sanitizer ] || status=1; done
exec >&- 2>&-; wait $TEE_PID 2> /dev/null   # run.log complete before the call returns
exit $status
