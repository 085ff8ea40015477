"""Compile every Triton kernel specialisation the tests launch, for real GPU targets, on a machine
without a GPU.

The CPU test suite runs the Triton kernels in Triton's interpreter, which executes the kernel
bodies as NumPy code: it never builds the IR, so it accepts programs the compiler rejects (a
loop-carried variable that changes type, a non-power-of-two block, an op the backend lacks) and
never runs ptxas. This script closes that gap in two steps:

1. record: the Triton-family tests run in the interpreter with a hook on the kernel launch that
   writes down each launch's kernel, argument types, constexpr values and launch options, reduced
   to the distinct specialisations Triton's JIT would compile (an integer argument only matters as
   1, a multiple of 16 or neither, and as 32 or 64 bits; a float argument not at all);
2. compile: each specialisation goes through Triton's own JIT front end (the same binder,
   specialisation and compile pipeline a CUDA launch takes: ttir, ttgir, llir, PTX, ptxas) for
   sm_80 and sm_90, with a stand-in driver that names the target and launches nothing. ptxas's
   report on each is held to what a launch needs: registers × threads within the register file,
   shared memory within the arch's limit, and no spills. Stack frames are listed, not failed:
   libdevice's sinf / cosf keep a 32-byte array there for the reduction of huge arguments.

    python scripts/compile_triton_kernels.py [--arch 80 --arch 90] [--keep launches.json]

It also makes the Triton cache a GPU machine can start from, so its tests and benchmarks do not
spend their minutes in the JIT: `--launches launches.json` compiles a recorded set (recorded by
another Python, say), `--cache-out triton-cache.tar.xz` packs what was compiled, each kernel's
metadata and cubin only (the IR stages are not needed to load it). The cache is valid only for the
same Triton build: its key hashes libtriton, which differs per Python version, so compile with the
GPU machine's Python and Triton (scripts/device_run.sh says how it is used).

Exit status 1 if a specialisation fails to compile or breaks a limit. Needs a triton with its
NVIDIA backend (the PyPI wheel ships ptxas); no GPU, no CUDA driver.
"""

import argparse
import collections
import contextlib
import importlib
import inspect
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every test file that launches Triton kernels (one a line, so that families add theirs without conflicts).
TESTS = [
    "tests/test_precondition.py",
    "tests/test_losses.py",
    "tests/test_steps.py",
    "tests/test_sampling.py",
    "tests/test_sde_steps.py",
    "tests/test_unipc.py",
    "tests/test_kdiffusion_compat.py",
    "tests/test_flow_steps.py",
    "tests/test_diffusers_compat.py",
    "tests/test_vp_steps.py",
    "tests/test_ema.py",
    "tests/test_blocks.py",
    "tests/test_embeddings.py",
    "tests/test_flow.py",
    "tests/test_dmd.py",
    "tests/test_tangents.py",
    "tests/test_attention.py",
]
# Per-block opt-in shared memory (bytes): A100 (sm_80) and H100 / H200 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGISTER_FILE = 65536


def _is_constexpr(annotation) -> bool:
    return "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _canonical_int(value: int) -> int:
    """The representative of `value`'s JIT specialisation: 1, a multiple of 16, or neither; i32, i64 or u64."""
    if value == 1:
        return 1
    base = 0 if -(2**31) <= value < 2**31 else 2**32 if value < 2**63 else 2**63
    return base + (16 if value % 16 == 0 else 7)


def _describe(value, constexpr: bool, where: str):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, bool):
        return {"value": value}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if constexpr:
        return {"value": value}
    if isinstance(value, int):
        return {"int": _canonical_int(value)}
    if isinstance(value, float):
        return {"float": 1.5}
    if isinstance(value, tl.tensor) and value.dtype.is_floating():
        return {"float": 1.5}  # a float already typed as a CUDA launch types it (tests' cuda_float_arguments)
    raise TypeError(f"{where}: cannot record an argument of type {type(value).__name__}")


def _record_launches(launches: dict, execute: bool) -> None:
    """Hook the interpreter's launch: each launch is added to `launches`, and run only if `execute`."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        where = f"{self.fn.__module__}.{self.fn.__name__}"
        parameters = inspect.signature(self.fn).parameters
        bound = dict(zip(parameters, args))
        bound.update((name, value) for name, value in kwargs.items() if name in parameters)
        # In signature order: the compile step passes them positionally, and keywords may come in any order.
        bound = {name: bound[name] for name in parameters if name in bound}
        entry = {
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "args": {
                name: _describe(value, _is_constexpr(parameters[name].annotation), f"{where}({name})")
                for name, value in bound.items()
            },
            "options": {name: value for name, value in kwargs.items() if name not in parameters},
        }
        launches[json.dumps(entry, sort_keys=True)] = entry
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    InterpretedFunction.run = recording_run


def _write_launches(path: str, launches: dict) -> None:
    pathlib.Path(path).write_text(json.dumps(list(launches.values()), indent=1))
    print(
        f"recorded {len(launches)} distinct launches of "
        f"{len({(e['module'], e['name']) for e in launches.values()})} kernels"
    )


def record(path: str, pytest_args: list) -> int:
    """Run the tests in the interpreter; write the distinct launches to `path` as JSON."""
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest

    launches = {}
    _record_launches(launches, execute=True)
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:warnings", *pytest_args])
    _write_launches(path, launches)
    return int(status)


def record_benchmarks(path: str) -> int:
    """The launches of every benchmark case at its GPU shape (python -m benchmarks on a GPU), recorded
    on CPU tensors of those shapes without running the kernels (their outputs are left unwritten):
    the same dtypes, sizes and alignment, so the same specialisations."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTCM_BACKEND"] = "triton"
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.run import discover_families

    launches = {}
    _record_launches(launches, execute=False)
    for family in discover_families():
        for case in importlib.import_module(f"benchmarks.bench_{family}").cases(torch.device("cpu"), False):
            if family == "attention":
                continue  # its GPU table is benchmarks/attention_gpu.py, whose Triton rows run at N = 8192
            try:
                case.fastcm(*case.make_inputs())
            except Exception as error:  # a path that reads an unwritten output (NaN checks): say so, go on
                print(f"{case.id}: {type(error).__name__}: {str(error)[:200]}")
    _write_launches(path, launches)
    return 0


class _CompileOnlyDriver:
    """What Triton's JIT asks the driver for before it compiles; a warmup call launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # the JIT keeps one kernel cache per device: one per arch here

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _argument(desc):
    import torch
    import triton.language as tl
    from triton.runtime.jit import MockTensor

    if "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        if desc["aligned"]:
            return MockTensor(dtype)  # data_ptr 0: divisible by 16
        return torch.empty(2, dtype=dtype)[1:]  # one element past a 16-byte aligned allocation
    if "tl_dtype" in desc:
        return tl.dtype(desc["tl_dtype"])
    return desc.get("int", desc.get("float", desc.get("value")))


def _signature(args: dict) -> str:
    """The launch as the JIT sees it: pointer dtypes, integer classes, constexpr values."""

    def show(desc):
        if "tensor" in desc:
            return f"*{desc['tensor']}" + ("" if desc["aligned"] else " (unaligned)")
        if "int" in desc:
            value = desc["int"]
            width = "i32" if value < 2**31 else "i64" if value < 2**63 else "u64"
            return "1" if value == 1 else width + (" (multiple of 16)" if value % 16 == 0 else "")
        if "float" in desc:
            return "fp32"
        return str(desc.get("tl_dtype", desc.get("value")))

    return ", ".join(f"{name}={show(desc)}" for name, desc in args.items())


def _ptxas_report(log: str) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v output."""
    numbers = {
        "registers": r"Used (\d+) registers",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
        "stack": r"(\d+) bytes stack frame",
    }
    found = {key: re.search(pattern, log) for key, pattern in numbers.items()}
    if found["registers"] is None:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {key: int(match.group(1)) if match else 0 for key, match in found.items()}


def _compile(kernel, entry) -> tuple:
    """The JIT's compiled kernel for one recorded launch and ptxas's report on it (None when the
    JIT found the specialisation in its cache: an earlier entry compiled the same one)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas -v there (TRITON_DUMP_PTXAS_LOG)
        compiled = kernel.warmup(*map(_argument, entry["args"].values()), grid=(1,), **entry["options"])
    return compiled, (_ptxas_report(log.getvalue()) if log.getvalue() else None)


def compile_all(launches: list, arches: list) -> int:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.runtime.driver import driver

    failures = 0
    per_kernel = collections.defaultdict(list)
    for arch in arches:
        driver.set_active(_CompileOnlyDriver(arch))
        for entry in launches:
            kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
            label = f"sm_{arch} {entry['name']}({_signature(entry['args'])})"
            try:
                compiled, report = _compile(kernel, entry)
            except Exception as error:  # any compiler error is the finding: report it and go on
                print(f"FAILED {label}: {type(error).__name__}: {str(error).strip()[:1500]}")
                failures += 1
                continue
            if report is None:
                continue
            threads = 32 * compiled.metadata.num_warps
            shared = compiled.metadata.shared
            problems = (
                [f"{report['registers']} registers × {threads} threads exceed the register file"]
                if report["registers"] * threads > REGISTER_FILE
                else []
            )
            problems += (
                [f"{shared} B shared memory, over sm_{arch}'s {SHARED_LIMIT[arch]}"]
                if shared > SHARED_LIMIT[arch]
                else []
            )
            problems += (
                [f"spills ({report['spill_stores']} B stored, {report['spill_loads']} B loaded)"]
                if report["spill_stores"] or report["spill_loads"]
                else []
            )
            if problems:
                print(f"FAILED {label}: {'; '.join(problems)}")
                failures += 1
            per_kernel[(arch, entry["name"])].append((report["registers"], shared, report["stack"]))
    for (arch, name), uses in sorted(per_kernel.items()):
        print(
            f"sm_{arch} {name}: {len(uses)} specialisations, registers {min(u[0] for u in uses)}–"
            f"{max(u[0] for u in uses)}, shared ≤ {max(u[1] for u in uses)} B, "
            f"stack frame ≤ {max(u[2] for u in uses)} B"
        )
    compiled_count = sum(len(uses) for uses in per_kernel.values())
    print(
        f"compile_triton_kernels: {compiled_count} compiled, {failures} failed "
        f"(triton {triton.__version__}, sm_{', sm_'.join(map(str, arches))})"
    )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SHARED_LIMIT),
        help="compute capability to compile for (repeatable; default 80 and 90)",
    )
    parser.add_argument("--keep", help="also write the recorded launches to this JSON file")
    parser.add_argument(
        "--launches",
        action="append",
        help="compile the launches recorded in this JSON file (repeatable; no recording run)",
    )
    parser.add_argument("--cache-out", help="pack the compiled kernels into this .tar.xz (a Triton cache)")
    parser.add_argument("--record-only", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--record-benchmarks", metavar="JSON", help="record the launches of the GPU benchmark cases")
    parser.add_argument("--unpack-cache", nargs=2, metavar=("ARCHIVE", "DIR"), help="unpack a --cache-out archive")
    args, pytest_args = parser.parse_known_args()
    if args.unpack_cache:
        print(f"{unpack_cache(*args.unpack_cache)} compiled kernels unpacked into {args.unpack_cache[1]}")
        return 0
    if args.record_only:
        return record(args.record_only, pytest_args or TESTS)
    if args.record_benchmarks:
        return record_benchmarks(args.record_benchmarks)

    with tempfile.TemporaryDirectory() as scratch:
        launches_path = args.keep or os.path.join(scratch, "launches.json")
        if not args.launches:
            # The interpreter is chosen when triton is imported, so the tests run in their own process.
            env = dict(os.environ, FASTCM_TEST_DEVICE="cpu", TRITON_INTERPRET="1")
            status = subprocess.run(
                [sys.executable, __file__, "--record-only", launches_path, *pytest_args], cwd=ROOT, env=env
            ).returncode
            if status:
                print(f"compile_triton_kernels: the recording test run failed (exit {status})")
                return 1
        recorded = [json.loads(pathlib.Path(path).read_text()) for path in args.launches or [launches_path]]
        launches = list({json.dumps(entry, sort_keys=True): entry for group in recorded for entry in group}.values())
        cache = os.path.join(scratch, "triton-cache")
        os.environ["TRITON_CACHE_DIR"] = cache  # compile, never reuse
        status = compile_all(launches, args.arch or sorted(SHARED_LIMIT))
        if args.cache_out:
            pack_cache(cache, args.cache_out)
        return status


def pack_cache(cache: str, out: str) -> None:
    """Each compiled kernel's metadata (.json), binary (.cubin) and group file, the group's paths
    made relative to the cache (scripts/device_run.sh roots them where it unpacks)."""
    import tarfile

    kept = 0
    with tarfile.open(out, "w:xz") as tar:
        for entry in sorted(pathlib.Path(cache).iterdir()):
            groups = list(entry.glob("__grp__*.json"))
            if not groups or not list(entry.glob("*.cubin")):
                continue  # a launcher or a failed compile: nothing a launch can load
            for path in entry.iterdir():
                if path.name.startswith("__grp__"):
                    children = json.loads(path.read_text())["child_paths"]
                    children = {
                        name: os.path.relpath(child, cache)
                        for name, child in children.items()
                        if name.endswith((".json", ".cubin"))
                    }
                    data = json.dumps({"child_paths": children}).encode()
                    info = tarfile.TarInfo(os.path.relpath(path, cache))
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                elif path.suffix in (".json", ".cubin"):
                    tar.add(path, arcname=os.path.relpath(path, cache))
            kept += 1
    print(f"compile_triton_kernels: {kept} kernels packed into {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


def unpack_cache(archive: str, cache: str) -> int:
    """Unpack a pack_cache archive into the Triton cache directory `cache`, rooting each group's
    paths there (Triton loads a group's files by absolute path). Returns the number of kernels."""
    import tarfile

    root = pathlib.Path(cache).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    groups = list(root.glob("*/__grp__*.json"))
    for group in groups:
        children = json.loads(group.read_text())["child_paths"]
        group.write_text(json.dumps({"child_paths": {name: str(root / child) for name, child in children.items()}}))
    return len(groups)


if __name__ == "__main__":
    sys.exit(main())
