#!/usr/bin/env bash
# Builds fastcm's CUDA extension on a machine without a GPU, against the torch the device machines
# run (torch 2.11, CUDA 13.0, from PyPI), imports it and checks that every op of the extension has its
# CUDA kernel registered, checks the SASS of the TMA forward kernels that keep Q in registers
# (scripts/check_sass_fragments.py), then runs the attention tests (CPU) against that build and compares the
# build's kernel choice (plan_attention_forward / _backward) with the index models'; last, it compiles
# every Triton kernel specialisation the tests launch with that torch's Triton for sm_80 and sm_90
# (scripts/compile_triton_kernels.py). Compile, link and registration errors show here instead of in
# the first minutes of a device session.
#
#   bash scripts/check_cuda_build.sh
#
# Needs nvcc 13 (CUDA_HOME, or nvcc on PATH) and about 6 GB of disk under FASTCM_CUDA_CHECK_DIR
# (default /tmp/fastcm_cuda_check; the venv is kept there and reused). Where there is no nvcc, too
# little disk, or the torch wheel cannot be downloaded, it says so and exits 0: it checks the build,
# not the machine. FASTCM_CUDA_ARCH_LIST as in setup.py (default "8.0;9.0a": both kernel families).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${FASTCM_CUDA_CHECK_DIR:-/tmp/fastcm_cuda_check}
TORCH_SPEC=${FASTCM_CUDA_CHECK_TORCH:-torch==2.11.0}
skip() { echo "check_cuda_build: skipped: $*"; exit 0; }

# The toolkit: CUDA_HOME, else /usr/local/cuda, else where nvcc on PATH lives (nvcc there may be a
# wrapper script, so the toolkit is the first candidate with nvcc and the runtime library).
NVCC_DIR=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")
TOOLKIT=""
for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$NVCC_DIR"; do
  if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -e "$candidate/lib64/libcudart.so" ]; then
    TOOLKIT=$candidate; break
  fi
done
[ -n "$TOOLKIT" ] || skip "no CUDA toolkit (bin/nvcc and lib64/libcudart.so) in CUDA_HOME, /usr/local/cuda or nvcc's folder"
export CUDA_HOME=$TOOLKIT
mkdir -p "$DIR"
# One check at a time per DIR: they share the venv and its editable install of $DIR/src.
exec 9> "$DIR/lock"
if command -v flock > /dev/null; then flock 9; fi
free_gb=$(df -Pk "$DIR" | awk 'NR == 2 { print int($4 / 1048576) }')
if [ ! -x "$DIR/venv/bin/python" ] && [ "$free_gb" -lt 8 ]; then
  skip "$free_gb GB free under $DIR, the CUDA torch venv needs about 6"
fi

# numpy < 2.4: triton 3.6's interpreter (the recording run of compile_triton_kernels) fails on 2.4.
# diffusers and k-diffusion: the oracles of test files whose Triton launches the recording run needs.
# k-diffusion is installed without its dependencies, so its package cannot be imported: only found.
if ! "$DIR/venv/bin/python" -c "import importlib.util, torch, ninja, numpy, diffusers
assert importlib.util.find_spec('k_diffusion') is not None
assert tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4)" 2>/dev/null; then
  python3 -m venv "$DIR/venv"
  # setuptools 81: the device machines' version (torch 2.11 asks for < 82).
  if ! "$DIR/venv/bin/pip" install --quiet "$TORCH_SPEC" "setuptools==81.*" wheel ninja "numpy<2.4" pytest \
      "diffusers==0.42.1" > "$DIR/venv.log" 2>&1 ||
    ! "$DIR/venv/bin/pip" install --quiet --no-deps "k-diffusion==0.1.1.post1" >> "$DIR/venv.log" 2>&1; then
    tail -5 "$DIR/venv.log"; skip "could not install $TORCH_SPEC and the test oracles from the package index"
  fi
fi
"$DIR/venv/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The working tree (tracked and untracked, not ignored files), so uncommitted changes are checked.
rm -rf "$DIR/src" && mkdir -p "$DIR/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$DIR/src"
cd "$DIR/src"
echo "build (FASTCM_CUDA_ARCH_LIST=${FASTCM_CUDA_ARCH_LIST:-8.0;9.0a}), log: $DIR/build.log"
start=$(date +%s)
# CPU seconds too (user + sys of the compilers): on a shared machine the wall time says little.
TIMER=(); [ -x /usr/bin/time ] && TIMER=(/usr/bin/time -f "%U %S" -o "$DIR/build.cpu")
if ! "${TIMER[@]}" "$DIR/venv/bin/pip" install --no-build-isolation --no-deps -e . -v > "$DIR/build.log" 2>&1; then
  grep -n -E "error|Error" "$DIR/build.log" | head -40; tail -20 "$DIR/build.log"
  echo "check_cuda_build: BUILD FAILED"; exit 1
fi
cpu=$(awk '{printf "%.0f", $1 + $2}' "$DIR/build.cpu" 2> /dev/null)
echo "built in $(( $(date +%s) - start )) s${cpu:+ ($cpu CPU s)}; $(grep -c -E 'warning' "$DIR/build.log" || true) warning lines"

"$DIR/venv/bin/python" - <<'PY'
import torch
import fastcm._C  # noqa: F401  (registers torch.ops.fastcm.*)

assert torch.ops.fastcm.has_cuda(), "the extension was built without its CUDA part"
ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastcm::"))
kernels = {name: torch._C._dispatch_dump(name) for name in ops}
missing = [name for name, dump in kernels.items() if "\nCPU:" in dump and "\nCUDA:" not in dump]
assert ops and not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
print("CUDA kernels registered:", ", ".join(name for name, dump in kernels.items() if "\nCUDA:" in dump))
PY
# The SASS of the TMA forward kernels that keep Q in registers: no fragment register overwritten
# inside the tile loop (a ptxas register reuse no CPU model sees; scripts/check_sass_fragments.py).
# cuobjdump: the one on PATH, else the one the venv's Triton bundles.
case ";${FASTCM_CUDA_ARCH_LIST:-8.0;9.0a};" in
  *";9.0a;"*) "$DIR/venv/bin/python" scripts/check_sass_fragments.py fastcm/_C*.so ;;
esac
# The attention tests on CPU against this build, and its kernel choice against the index models.
FASTCM_NO_JIT=1 "$DIR/venv/bin/python" -m pytest tests/test_attention.py tests/cuda_index_model/test_attention_plans.py \
  -q -x -p no:cacheprovider
# The Triton kernels through the device's Triton compiler (3.6, with torch 2.11) for sm_80 and sm_90.
"$DIR/venv/bin/python" scripts/compile_triton_kernels.py
echo "check_cuda_build: ok"
