"""scripts/check_sass_fragments.py: in a SASS listing of the sm_90a TMA forward kernel with Q in
registers, a write to a fragment register that a later S-chain HGMMA can read (through the loop's
back edge) is reported, with the instruction that wrote it; writes before the load (the zeroing),
after the loop (the epilogue), reads by stores and barriers, and other kernels are not; a listing
whose fragments are not the expected count, or that has no such kernel, fails.

The listings are small hand-written ones in cuobjdump's format, shaped like the kernel's: the
fragments loaded by LDSM under a branch (n_tiles > 0), then a loop whose S chain reads them.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_sass_fragments as csf  # noqa: E402

# FwdSm90WsTraits<T, kD = 64, kJvp, kOverlap, kQRegs, kBias>: the primal serial kernel with Q in registers.
QREGS = (
    "_ZN6fastcm4attn28attention_fwd_sm90_ws_kernelINS0_15FwdSm90WsTraitsI13__nv_bfloat16Li64ELb0ELb0ELb1ELb0EEEEEv"
    "NS0_9FwdParamsENS0_10FwdTmaMapsE"
)
SMEM_Q = QREGS.replace("Lb0ELb0ELb1ELb0E", "Lb0ELb0ELb0ELb0E")


def listing(name, body=(), epilogue=(), loads=4):
    """A cuobjdump -sass style function: zeroing, 4 LDSM (Q's 16 registers) skipped when P0, an S
    chain loop (back edge at `body`'s end) and an epilogue; addresses 0x10 apart."""
    lines = ["CS2R R152, SRZ", "CS2R R154, SRZ", "@P0 BRA {skip}"]
    lines += [f"LDSM.16.M88.4 R{152 + 4 * k}, [R6+{hex(32 * k)}]" for k in range(loads)]
    top = len(lines) + 1
    lines += ["@!P1 BRA {after}", "WARPGROUP.ARRIVE"]
    lines += [
        f"HGMMA.64x64x16.F32.BF16 R24, R{152 + 4 * k}, gdesc[UR{12 + 4 * k}], {'RZ, !UPT' if k == 0 else 'R24'}"
        for k in range(4)
    ]
    lines += ["WARPGROUP.DEPBAR.LE gsb0, 0x0", "FADD.FTZ R20, R24, R25", *body, f"@!P2 BRA {hex(16 * top)}"]
    after = len(lines)
    lines += [*epilogue, "EXIT", "BRA {self}"]
    skip = 3 + loads
    text = [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for i, line in enumerate(lines):
        line = line.format(skip=hex(16 * skip), after=hex(16 * after), self=hex(16 * i))
        text.append(f"        /*{16 * i:04x}*/                   {line} ;{' ' * 20}/* 0x0000000000000000 */")
        text.append(f"{' ' * 100}/* 0x000fe20000000000 */")
    return "\n".join(text) + "\n"


def problems(text):
    (result,) = csf.check_listing(text)
    assert len(result.fragments) == 16
    return result.problems


def test_intact_fragments_pass():
    """Zeroing before the load and a path that skips it (n_tiles == 0) are not overwrites."""
    assert problems(listing(QREGS)) == []


def test_write_in_the_loop_is_reported_at_the_hgmma_it_reaches():
    (problem,) = problems(listing(QREGS, body=["FMNMX.FTZ R161, R21, R75, !PT"]))
    assert "HGMMA" in problem and "R24, R160" in problem and "R161" in problem and "FMNMX.FTZ R161" in problem


def test_write_after_the_loop_passes():
    assert problems(listing(QREGS, epilogue=["FADD.FTZ R152, R24, R25", "IMAD.WIDE R154, R2, 0x4, R8"])) == []


def test_reads_by_stores_barriers_and_predicate_writes_pass():
    body = ["STS [R1], R152", "BAR.SYNC.DEFER_BLOCKING R153, 0x100", "ISETP.GT.AND P3, PT, R154, R8, P1"]
    assert problems(listing(QREGS, body=body)) == []


def test_destination_after_a_predicate_operand_is_a_write():
    (problem,) = problems(listing(QREGS, body=["SHFL.BFLY PT, R166, R58, 0x2, 0x1f"]))
    assert "R164" in problem and "SHFL.BFLY PT, R166" in problem


def test_hgmma_accumulator_over_the_fragments_is_a_write():
    """An m64n64 HGMMA writes 32 accumulator registers: from R136 they cover R152..R167."""
    found = problems(listing(QREGS, body=["HGMMA.64x64x16.F32.BF16 R136, R88, gdesc[UR8].tnspB, R136"]))
    assert len(found) == 4  # every S-chain k-step reads an overwritten fragment


def test_wrong_fragment_count_fails():
    (result,) = csf.check_listing(listing(QREGS, loads=3))
    assert result.problems and "expected 16" in result.problems[0]


def test_other_kernels_and_stubs_are_not_checked():
    stub = f"\t\tFunction : {QREGS}\n        /*0000*/                   BPT.TRAP 0x1 ;\n        /*0010*/   EXIT ;\n"
    assert csf.check_listing(listing(SMEM_Q) + stub) == []


def test_main_exit_status(tmp_path, capsys):
    good, bad, none = tmp_path / "good.sass", tmp_path / "bad.sass", tmp_path / "none.sass"
    good.write_text(listing(QREGS))
    bad.write_text(listing(QREGS, body=["FADD.FTZ R152, R24, R25"]))
    none.write_text(listing(SMEM_Q))
    assert csf.main(["--sass", str(good)]) == 0
    assert csf.main(["--sass", str(bad)]) == 1
    assert "FAIL d=64 fwd serial" in capsys.readouterr().out
    assert csf.main(["--sass", str(none)]) == 1
