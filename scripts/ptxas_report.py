"""Register and memory table of the CUDA kernels, from ptxas's verbose output.

ptxas -v prints, per kernel and architecture, a block such as

    ptxas info    : Compiling entry function '_ZN6fastcm4attn...' for 'sm_90a'
    ptxas info    : Function properties for _ZN6fastcm4attn...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 168 registers, used 1 barriers, 896 bytes cmem[0]

This script turns those blocks into one Markdown table per architecture: the kernel (demangled with
c++filt where it is installed, namespaces and parameter lists dropped), registers per thread, static
shared memory, spill stores / loads and stack frame in bytes. Dynamic shared memory is set at launch
and does not appear in ptxas's output.

    python scripts/ptxas_report.py build.log [--match RE]   # a log of a build with FASTCM_NVCC_FLAGS="-Xptxas -v"
    python scripts/ptxas_report.py --build [--python P]  # builds a copy of the working tree first

--build copies the working tree (tracked and untracked, not ignored files) to a temporary folder
and runs `P setup.py build_ext` there with FASTCM_NVCC_FLAGS="-Xptxas -v" (added to the variable's
value), P defaulting to this interpreter; P must import a CUDA build of torch, and nvcc must be
found (CUDA_HOME, /usr/local/cuda or PATH), as for any build of the extension. Nothing is installed.
The venv scripts/check_cuda_build.sh keeps (torch 2.11 + CUDA 13) is such a P on a machine without
a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelReport:
    """ptxas's figures for one kernel compiled for one architecture (bytes unless named otherwise)."""

    mangled: str
    arch: str
    registers: int | None = None
    smem: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0


def parse_ptxas_log(text: str) -> list[KernelReport]:
    """Every entry function of a ptxas -v log, in the order ptxas compiled them.

    The stack / spill line belongs to the function named by the "Function properties" line before
    it; it counts for the entry function being compiled only when that name is the entry's own (a
    __noinline__ callee gets its own properties block). The "Used" line is the entry's. A kernel
    compiled twice for one architecture (the same instantiation in two translation units) is kept
    once."""
    reports: dict[tuple[str, str], KernelReport] = {}
    current: KernelReport | None = None
    properties_of: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            key = (m.group(1), m.group(2))
            current = reports.setdefault(key, KernelReport(mangled=key[0], arch=key[1]))
            properties_of = None
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif m := _FRAME.search(line):
            if current is not None and properties_of == current.mangled:
                current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            properties_of = None
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            smem = _SMEM.search(line)
            current.smem = int(smem.group(1)) if smem else 0
    return list(reports.values())


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled name -> readable name: c++filt's output (when c++filt is installed) without the return
    type, the fastcm::attn:: / fastcm::attn::sm90:: namespaces and the parameter list."""
    readable = dict(zip(names, names))
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        readable.update(zip(names, out.splitlines()))
    return {name: _shorten(full) for name, full in readable.items()}


def _shorten(name: str) -> str:
    name = name.removeprefix("void ")
    for namespace in ("fastcm::attn::sm90::", "fastcm::attn::", "fastcm::"):
        name = name.replace(namespace, "")
    if name.endswith(")"):  # drop the parameter list: the outermost (...) at the end
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    while "> >" in name:
        name = name.replace("> >", ">>")
    return name


def _natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a name by value (FwdTraits<T, 32, ...> before 128)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def markdown_tables(reports: list[KernelReport], match: str | None = None) -> str:
    """One Markdown table per architecture (sorted by arch, then by kernel name, numbers by value);
    `match`: only the kernels whose readable name contains a match of this regular expression."""
    names = demangle(sorted({r.mangled for r in reports}))
    if match is not None:
        reports = [r for r in reports if re.search(match, names[r.mangled])]
    lines: list[str] = []
    for arch in sorted({r.arch for r in reports}):
        rows = sorted((r for r in reports if r.arch == arch), key=lambda r: _natural_key(names[r.mangled]))
        lines += [
            f"### {arch}",
            "",
            "| kernel | registers | static smem | spill stores | spill loads | stack |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            regs = "?" if r.registers is None else str(r.registers)
            cells = [f"`{names[r.mangled]}`", regs, r.smem, r.spill_stores, r.spill_loads, r.stack]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _working_tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def build_log(python: str, keep: Path | None) -> str:
    """Builds the extension from a copy of the working tree with ptxas -v; returns the build output."""
    env = dict(os.environ)
    env["FASTCM_NVCC_FLAGS"] = (env.get("FASTCM_NVCC_FLAGS", "") + " -Xptxas -v").strip()
    env.pop("FASTCM_SKIP_CUDA", None)
    env.pop("FASTCM_SKIP_EXTENSION", None)
    # The interpreter's venv need not be activated: its bin/ (ninja) goes first on PATH, or torch
    # falls back to compiling one file at a time.
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    with tempfile.TemporaryDirectory(prefix="fastcm_ptxas_") as tmp:
        src = Path(tmp) / "src"
        for f in _working_tree_files():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
        build = Path(tmp) / "build"
        cmd = [python, "setup.py", "build_ext", "--build-temp", str(build / "temp"), "--build-lib", str(build / "lib")]
        proc = subprocess.run(
            cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
        if keep is not None:
            keep.write_text(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"ptxas_report: the build failed (exit {proc.returncode})")
        return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", type=Path, help="a build log with ptxas -v output")
    parser.add_argument("--build", action="store_true", help="build a copy of the working tree with ptxas -v first")
    parser.add_argument("--python", default=sys.executable, help="interpreter with a CUDA torch for --build")
    parser.add_argument("--save-log", type=Path, help="with --build: also write the build output here")
    parser.add_argument("--match", help="only kernels whose readable name matches this regular expression")
    parser.add_argument("-o", "--output", type=Path, help="write the tables here instead of stdout")
    args = parser.parse_args(argv)
    if args.build == (args.log is not None):
        parser.error("give either a log file or --build")
    text = build_log(args.python, args.save_log) if args.build else args.log.read_text(errors="replace")
    reports = parse_ptxas_log(text)
    if not reports:
        raise SystemExit("ptxas_report: no 'Compiling entry function' lines (was it built with -Xptxas -v?)")
    tables = markdown_tables(reports, args.match)
    if args.output:
        args.output.write_text(tables)
    else:
        sys.stdout.write(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
