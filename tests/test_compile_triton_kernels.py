"""scripts/compile_triton_kernels.py: its reduction of the recorded launches keeps every
specialisation Triton's JIT tells apart, and it fails on a kernel the interpreter runs but the
compiler rejects."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compile_triton_kernels  # noqa: E402

INTEGERS = [0, 1, 2, 7, 15, 16, 17, 48, -1, -16, 2**31 - 1, 2**31, 2**32 + 3, 2**63 - 1, 2**63, 2**64 - 16]


@pytest.mark.parametrize("value", INTEGERS)
def test_canonical_int_has_the_jit_specialisation_of_its_value(value):
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.compiler import BaseBackend

    def specialisation(v):
        return libtriton.native_specialize_impl(BaseBackend, v, False, True, True)

    assert specialisation(compile_triton_kernels._canonical_int(value)) == specialisation(value)


KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = {init}
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + cols, mask=cols < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
'''

TEST = '''
import torch
from probe_kernels import sum_kernel


def test_sum():
    x = torch.arange(100, dtype=torch.float32)
    out = torch.empty(1)
    sum_kernel[(1,)](x, out, x.numel(), BLOCK=32)
    assert out.item() == x.sum().item()
'''


def _check(tmp_path, init, *options):
    (tmp_path / "probe_kernels.py").write_text(KERNEL.format(init=init))
    (tmp_path / "test_probe.py").write_text(TEST)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "compile_triton_kernels.py"),
            "--arch",
            "90",
            *options,
            str(tmp_path / "test_probe.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    "init, compiles",
    [
        ("tl.zeros([BLOCK], dtype=tl.float32)", True),
        # The interpreter broadcasts the float; the compiler
        # refuses a loop-carried value that changes type.
        ("0.0", False),
    ],
)
def test_script_compiles_what_the_tests_launch(tmp_path, init, compiles):
    pytest.importorskip("triton.backends.nvidia")
    result = _check(tmp_path, init)
    output = result.stdout + result.stderr
    assert "1 passed" in output, output  # the interpreter ran the kernel and the test passed
    assert "recorded 1 distinct launches of 1 kernels" in output, output
    if compiles:
        assert result.returncode == 0, output
        assert "sm_90 sum_kernel: 1 specialisations" in output, output
    else:
        assert result.returncode == 1, output
        assert "FAILED sm_90 sum_kernel(x_ptr=*float32, out_ptr=*float32, n=i32, BLOCK=32)" in output, output
        assert "CompilationError" in output, output


# In a fresh process: Triton's JIT, pointed at the unpacked cache, asked for the recorded launch.
LOAD_FROM_CACHE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import compile_triton_kernels as c
from triton.runtime.driver import driver
driver.set_active(c._CompileOnlyDriver(90))
entry = json.load(open(sys.argv[2]))[0]
compiled, report = c._compile(getattr(importlib.import_module(entry["module"]), entry["name"]), entry)
print("loaded", sorted(compiled.asm), "ptxas ran:", report is not None)
"""


def test_packed_cache_is_what_the_jit_loads(tmp_path):
    """--cache-out keeps metadata and cubin only; --unpack-cache roots it elsewhere, and the JIT then
    loads the kernel from it instead of compiling (no ptxas run, no IR stages present)."""
    pytest.importorskip("triton.backends.nvidia")
    launches, archive, cache = tmp_path / "launches.json", tmp_path / "cache.tar.xz", tmp_path / "moved" / "cache"
    result = _check(
        tmp_path, "tl.zeros([BLOCK], dtype=tl.float32)", "--keep", str(launches), "--cache-out", str(archive)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kernels packed" in result.stdout, result.stdout
    script = [sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--unpack-cache", str(archive)]
    unpacked = subprocess.run([*script, str(cache)], capture_output=True, text=True, timeout=120)
    assert "1 compiled kernels unpacked" in unpacked.stdout, unpacked.stdout + unpacked.stderr
    env = dict(
        os.environ,
        TRITON_CACHE_DIR=str(cache),
        TRITON_INTERPRET="0",
        TRITON_DUMP_PTXAS_LOG="1",
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    )
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_CACHE, str(ROOT / "scripts"), str(launches)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "loaded ['cubin'] ptxas ran: False" in loaded.stdout, loaded.stdout + loaded.stderr
