"""Checks the SASS of the sm_90a TMA attention forward kernels that keep Q (and Q̇) in registers.

Those kernels (attention_fwd_sm90_ws_kernel with kQRegs, csrc/cuda/attention_fwd_sm90_ws_kernel.cuh)
load each consumer thread's Q, Q̇ fragments once with ldmatrix (LDSM in SASS) and read them as the A
operand of every S chain's wgmma (HGMMA) over the key-tile loop. Nothing in the source writes them
again, so any other instruction that writes one of their registers on a path from the LDSM to an
HGMMA that reads it is a miscompilation. ptxas (CUDA 13.0) produced one: in the serial (not
overlapped) d = 64 JVP kernel it handed 8 of the 32 fragment registers to the softmax's temporaries
inside the loop while the fragments were defined only under `n_tiles > 0` (wrong tangents from the
second key tile on, right primal). No CPU model of the kernel sees that; this check reads what the
hardware runs.

The analysis, per kernel: the control-flow graph of its instructions (branch targets, fall-through,
EXIT), and per fragment register the set of states a path can bring it in: not yet loaded, loaded by
the LDSM, overwritten after the load. An HGMMA that reads a register some path brings overwritten
is reported. Writes before the load (the kernel zeroes the fragments first) and after the last read
(the epilogue) are allowed.

    python scripts/check_sass_fragments.py BINARY [BINARY ...]  # the extension (.so) or a cubin
    python scripts/check_sass_fragments.py --sass FILE          # a saved `cuobjdump -sass` listing

cuobjdump: $CUOBJDUMP, else on PATH, else the one Triton bundles (triton/backends/nvidia/bin). Exit
status 1 when a fragment register is overwritten, when no such kernel is found (a renamed kernel
must not turn the check into a no-op), or when a kernel's fragments are not the expected count.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The TMA forward kernel's traits in the mangled name: FwdSm90WsTraits<T, kD, kJvp, kOverlap, kQRegs, kBias>.
_KERNEL = re.compile(r"attention_fwd_sm90_ws_kernel.*FwdSm90WsTraitsI\w+?Li(\d+)ELb([01])ELb([01])ELb([01])ELb([01])E")
_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P(?:T|\d)\s+")
_REG = re.compile(r"^R(\d+)$")
_HGMMA_N = re.compile(r"^HGMMA\.64x(\d+)x")
# Opcodes whose register operands are all read (barrier ids, branch targets, warp masks).
_NO_DEST = ("BAR", "BRA", "BRX", "JMP", "JMX", "RET", "CALL", "WARPSYNC", "NANOSLEEP", "EXIT")
UNLOADED, LOADED, OVERWRITTEN = "unloaded", "loaded", "overwritten"


@dataclass
class Instruction:
    addr: int
    text: str
    opcode: str
    operands: list[str]
    predicated: bool


@dataclass
class KernelCheck:
    """One kernel's result: its traits, fragment registers, and the reads that may see them overwritten."""

    mangled: str
    d: int
    jvp: bool
    overlap: bool
    fragments: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_instructions(body: str) -> list[Instruction]:
    """The instructions of one function's listing, in address order."""
    out = []
    for m in _INSTRUCTION.finditer(body):
        text = m.group(2).strip()
        predicated = False
        if p := _PREDICATE.match(text):
            predicated = p.group(0).strip() not in ("@PT",)
            text = text[p.end() :]
        parts = text.split(None, 1)
        operands = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
        out.append(Instruction(int(m.group(1), 16), m.group(2).strip(), parts[0], operands, predicated))
    return out


def written_registers(ins: Instruction) -> list[int]:
    """The general registers an instruction writes. Multi-register results (64/128-bit, LDSM.x4)
    start at an aligned register, and fragments are aligned blocks of 4, so the first register
    stands for them; an HGMMA writes its whole accumulator block, N/2 registers of m64nN."""
    if ins.opcode.startswith(_NO_DEST) or not ins.operands:
        return []
    ops = ins.operands
    first = 1 if re.match(r"^!?U?P(?:T|\d)$", ops[0]) and len(ops) > 1 else 0  # predicate destination first
    m = _REG.match(ops[first])
    if not m:
        return []
    base = int(m.group(1))
    if n := _HGMMA_N.match(ins.opcode):
        return list(range(base, base + int(n.group(1)) // 2))
    return [base]


def hgmma_a_registers(ins: Instruction) -> list[int]:
    """The A-operand registers of an HGMMA that reads A from registers (RS), else []."""
    if not ins.opcode.startswith("HGMMA") or len(ins.operands) < 2:
        return []
    m = _REG.match(ins.operands[1])
    return list(range(int(m.group(1)), int(m.group(1)) + 4)) if m else []


def successors(instructions: list[Instruction]) -> list[list[int]]:
    """Indices each instruction can pass control to (branch targets by address, fall-through)."""
    index = {ins.addr: i for i, ins in enumerate(instructions)}
    succ = []
    for i, ins in enumerate(instructions):
        nxt = [i + 1] if i + 1 < len(instructions) else []
        if ins.opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", ins.operands[-1] if ins.operands else "")
            if target is None or int(target.group(1), 16) not in index:
                raise ValueError(f"branch with no target in the listing: {ins.text!r}")
            to = [index[int(target.group(1), 16)]]
            succ.append(to + nxt if ins.predicated else to)
        elif ins.opcode.startswith(("EXIT", "RET")):
            succ.append(nxt if ins.predicated else [])
        elif ins.opcode.startswith(("BRX", "JMX")):
            raise ValueError(f"indirect branch: {ins.text!r}")
        else:
            succ.append(nxt)
    return succ


def check_kernel(mangled: str, body: str) -> KernelCheck | None:
    """The fragment check of one function, or None if it is not a Q-in-registers TMA forward kernel
    compiled for sm_90a (the other architectures' cubins hold a stub without wgmma)."""
    m = _KERNEL.search(mangled)
    if not m or m.group(4) != "1":
        return None
    d, jvp, overlap = int(m.group(1)), m.group(2) == "1", m.group(3) == "1"
    result = KernelCheck(mangled, d, jvp, overlap)
    instructions = parse_instructions(body)
    if not any(ins.opcode.startswith("HGMMA") for ins in instructions):
        return None  # the __trap() stub an sm_80 cubin of the same build holds
    loads = {i: written_registers(ins)[0] for i, ins in enumerate(instructions) if ins.opcode.startswith("LDSM")}
    fragments = sorted({base + k for base in loads.values() for k in range(4)})
    result.fragments = fragments
    expected = 4 * (d // 16) * (2 if jvp else 1)  # kD/16 k-steps of 4 registers, for Q (and Q̇)
    if len(fragments) != expected:
        result.problems.append(f"{len(fragments)} LDSM-loaded registers, expected {expected} (Q{', Q̇' if jvp else ''})")
        return result
    succ = successors(instructions)
    frag = set(fragments)
    # state[i]: register -> the states paths bring it in before instruction i.
    state: list[dict[int, frozenset[str]]] = [dict() for _ in instructions]
    state[0] = {r: frozenset({UNLOADED}) for r in frag}
    work = [0]
    while work:
        i = work.pop()
        ins, cur = instructions[i], dict(state[i])
        if i in loads:
            for r in range(loads[i], loads[i] + 4):
                cur[r] = frozenset({LOADED})
        else:
            # A write keeps a register unloaded on the paths where it was (the zeroing before the load);
            # on the others it overwrites the loaded fragment.
            for r in frag.intersection(written_registers(ins)):
                cur[r] = (cur[r] & {UNLOADED}) | ({OVERWRITTEN} if cur[r] - {UNLOADED} else frozenset())
        for j in succ[i]:
            merged = {r: state[j].get(r, frozenset()) | cur[r] for r in frag}
            if merged != state[j]:
                state[j] = merged
                work.append(j)
    for i, ins in enumerate(instructions):
        bad = [r for r in hgmma_a_registers(ins) if OVERWRITTEN in state[i].get(r, frozenset())]
        if bad:
            writers = [
                f"/*{w.addr:04x}*/ {w.text}"
                for w in instructions
                if w is not ins and not w.opcode.startswith("LDSM") and set(bad) & set(written_registers(w))
            ]
            result.problems.append(
                f"/*{ins.addr:04x}*/ {ins.text}: R{', R'.join(map(str, bad))} may be overwritten since the LDSM, by "
                + "; ".join(writers[:4])
                + (f" (+{len(writers) - 4} more)" if len(writers) > 4 else "")
            )
    return result


def check_listing(sass: str) -> list[KernelCheck]:
    """Every Q-in-registers TMA forward kernel of a cuobjdump -sass listing, checked."""
    heads = list(_FUNCTION.finditer(sass))
    results = []
    for k, head in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(sass)
        if (r := check_kernel(head.group(1), sass[head.end() : end])) is not None:
            results.append(r)
    return results


def find_cuobjdump() -> str:
    if env := os.environ.get("CUOBJDUMP"):
        return env
    if found := shutil.which("cuobjdump"):
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    raise FileNotFoundError("no cuobjdump: set CUOBJDUMP, put it on PATH, or install triton (which bundles one)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="*", help="the extension (.so) or cubins to disassemble")
    parser.add_argument("--sass", action="append", default=[], help="a saved cuobjdump -sass listing")
    args = parser.parse_args(argv)
    if not args.binaries and not args.sass:
        parser.error("give a binary or --sass")
    listings = [Path(p).read_text() for p in args.sass]
    if args.binaries:
        tool = find_cuobjdump()
        for b in args.binaries:
            run = subprocess.run([tool, "-sass", b], capture_output=True, text=True)
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
            listings.append(run.stdout)
    results = [r for text in listings for r in check_listing(text)]
    if not results:
        print("check_sass_fragments: no sm_90a TMA forward kernel with Q in registers in the listing")
        return 1
    failed = 0
    for r in results:
        name = f"d={r.d} {'jvp' if r.jvp else 'fwd'} {'overlap' if r.overlap else 'serial'} ({r.mangled[-60:]})"
        if r.problems:
            failed += 1
            print(f"FAIL {name}:")
            for p in r.problems:
                print("   ", p)
        else:
            print(f"ok   {name}: {len(r.fragments)} fragment registers kept")
    print(f"check_sass_fragments: {len(results) - failed} of {len(results)} kernels keep their Q fragments")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
