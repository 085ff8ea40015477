"""The GPU tests' own logic on a machine without a GPU: tests/test_attention_cuda.py on CPU tensors,
the CUDA ops answered by a stand-in and the kernel-name ops as an sm_80 device (A100: 163 KB of
shared memory) or an sm_90 one (H100 / H200: 227 KB, the wgmma and TMA kernels) would, through
the index models' plans and the FASTCM_ATTN_* switches (read and checked per call, as the CUDA
ops do). Stand-ins: "cpu", the C++ CPU kernels (float32 inside: the tests' plumbing), or "model",
tests/cuda_index_model/rounding_model.py (the CUDA kernels' rounding: the tests' criteria against
the kernels' numerics). It checks the tests, not the kernels, before device time is spent on them.

    .venv/bin/python scripts/gpu_tests_dry_run.py [--run sm_80:cpu --run sm_90:model --run part1] [pytest args]

part1: tests/test_attention.py (the part-1 suite the device also runs on CUDA) with the model for
its bf16 / fp16 calls and float16 as its KERNEL_DTYPE, as on CUDA.

Deselected: the CUDA ops' error messages; with the cpu stand-in also what only the CUDA ops accept
(fp32 and bool bias tensors with bf16/fp16 inputs); with the model the public API tests
(fastcm.attention runs the C++ CPU kernels on CPU tensors, not the stand-in).
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESELECT = {
    "cpu": (
        "not f32 and not bool_mask and not with_tangent and not bad_input"
        " and not aten_fallback and not fully_masked and not dqk256_bias"
    ),
    "model": "not bad_input and not public_api",
}
SMEM_LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
RUNS = ["sm_80:cpu", "sm_90:model", "part1"]

CONFTEST = '''
import os
import sys
import pytest
import torch
sys.path.insert(0, MODELS)
torch.cuda.synchronize = lambda *a, **k: None


@pytest.fixture(autouse=True)
def _seed():   # as tests/conftest.py does
    torch.manual_seed(0)


def _switch(variable):
    value = os.environ.get(variable, "1")
    if value not in ("0", "1"):
        raise RuntimeError(f"fastcm attention (CUDA): {variable} must be 0 or 1 (or unset), got '{value}'")
    return value == "1"


FORWARD_SWITCHES = ("SM90", "SM90_TMA", "SM90_OVERLAP", "SM90_QREGS")
BACKWARD_SWITCHES = ("SM90", "SM90_BWD")


def _switches(names):
    return {name: _switch("FASTCM_ATTN_" + name) for name in names}


def _tma_ready(t):
    """The host's tma_ready after kernel_view: not empty, no broadcast (stride 0) dimension."""
    return t.numel() > 0 and all(size <= 1 or stride != 0 for size, stride in zip(t.shape[:3], t.stride()[:3]))


def pytest_collection_modifyitems(config, items):
    import test_attention_cuda as m
    from test_attention_bwd_sm90_index_model import plan_backward
    from test_attention_fwd_sm90_index_model import plan_forward_launch
    from fastcm._extension import extension_ops
    real = extension_ops()
    if STAND_IN == "model":
        import rounding_model
        real = rounding_model.ModelOps(real)
    hopper = ARCH == "sm_90"
    d8 = lambda d: (d + 7) // 8 * 8

    class Ops:
        def __getattr__(self, name):
            op = getattr(real, name)
            if not name.startswith("attention_"):
                return op

            def checked(*args):   # the CUDA ops read (and check) their switches on every call
                _switches(BACKWARD_SWITCHES if "backward" in name else FORWARD_SWITCHES)
                return op(*args)
            return checked

        def attention_forward_kernels(self, q, v, jvp, has_bias, has_bias_t):
            sw = _switches(FORWARD_SWITCHES)
            sm90_limit = SMEM_LIMIT if hopper and sw["SM90"] else 0
            tma_ok = sw["SM90_TMA"] and sm90_limit > 0 and _tma_ready(q) and _tma_ready(v)
            names = []
            for c0 in range(0, d8(v.shape[3]), 128):
                name, a, b = plan_forward_launch(
                    sm90_limit, tma_ok, sw["SM90_OVERLAP"], sw["SM90_QREGS"], d8(q.shape[3]),
                    min(128, d8(v.shape[3]) - c0), jvp, has_bias, jvp and has_bias_t)
                names.append(f"{name} ({a}, {b})")
            return names

        def attention_backward_kernels(self, q, v, has_bias):
            sw = _switches(BACKWARD_SWITCHES)
            sm90_limit = SMEM_LIMIT if hopper and sw["SM90"] else 0
            kernel, kd = plan_backward(sm90_limit, sw["SM90_BWD"], q.shape[3], v.shape[3], has_bias, SMEM_LIMIT)
            return ["aten" if kd == 0 else f"{kernel} ({kd})"]

    ops = Ops()
    m._ops = lambda: ops
    m._hopper = lambda: hopper
    m._poison_allocator = lambda *a, **k: None
'''

# The part-1 suite (tests/test_attention.py, with tests/conftest.py) as it runs on CUDA: bf16 / fp16
# calls on the model, the float64 / float32 ones on the CPU kernels (on CUDA they take the
# reference), the autograd / forward-AD / compile tests in float16 (their KERNEL_DTYPE on CUDA).
PART1_PLUGIN = '''
import importlib
import sys
import torch
sys.path.insert(0, MODELS)


def pytest_collection_modifyitems(config, items):
    import rounding_model
    import test_attention
    fa = importlib.import_module("fastcm.attention")
    ops = rounding_model.ModelOps(fa._ops(), lowp_only=True)
    fa._ops = lambda: ops
    test_attention.KERNEL_DTYPE = torch.float16
'''


def run_part1(pytest_args):
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("test_attention.py", "helpers.py", "conftest.py"):
            shutil.copy(ROOT / "tests" / name, tmp)
        (pathlib.Path(tmp) / "stand_in.py").write_text(
            f"MODELS = {str(ROOT / 'tests' / 'cuda_index_model')!r}\n" + PART1_PLUGIN
        )
        print("--- the part-1 suite with the model standing in for the CUDA kernels", flush=True)
        # opcheck needs the registered op overloads, which the stand-in does not replace; the Triton
        # kernels' tests model no CUDA kernel (they run in the interpreter in the suite itself).
        command = [
            sys.executable,
            "-m",
            "pytest",
            "test_attention.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "stand_in",
            "-k",
            "not fake_implementations and not triton",
        ] + pytest_args
        return subprocess.run(command, cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}).returncode


def run(spec, pytest_args):
    if spec == "part1":
        return run_part1(pytest_args)
    arch, stand_in = spec.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("test_attention_cuda.py", "helpers.py"):
            shutil.copy(ROOT / "tests" / name, tmp)
        header = (
            f"MODELS = {str(ROOT / 'tests' / 'cuda_index_model')!r}\nARCH = {arch!r}\n"
            f"STAND_IN = {stand_in!r}\nSMEM_LIMIT = {SMEM_LIMITS[arch]}\n"
        )
        (pathlib.Path(tmp) / "conftest.py").write_text(header + CONFTEST)
        print(f"--- the GPU tests as on an {arch} device, with the {stand_in} stand-in for its kernels", flush=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "test_attention_cuda.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            "-k",
            DESELECT[stand_in],
        ] + pytest_args
        return subprocess.run(command, cwd=tmp).returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        action="append",
        choices=[f"{a}:{s}" for a in SMEM_LIMITS for s in DESELECT] + ["part1"],
        help=f"device:stand-in or part1, repeatable (default: {' '.join(RUNS)})",
    )
    args, pytest_args = parser.parse_known_args()
    sys.exit(max(run(spec, pytest_args) for spec in args.run or RUNS))


if __name__ == "__main__":
    main()
