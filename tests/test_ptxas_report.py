"""scripts/ptxas_report.py: the figures of a ptxas -v log land in the right kernel's row of the
right architecture's table, a __noinline__ callee's stack and spills stay out of its caller's row,
and a log without ptxas output is refused."""

import pathlib
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ptxas_report  # noqa: E402

FWD = "_ZN6fastcm4attn20attention_fwd_kernelINS0_9FwdTraitsI13__nv_bfloat16Li128ELi128ELb1EEEEEvNS0_9FwdParamsE"
STAGE_BIAS = "_ZN6fastcm4attn10stage_biasINS0_9FwdTraitsI13__nv_bfloat16Li128ELi128ELb1EEEEEvPfPKvllliiiiifi"
WS = (
    "_ZN6fastcm4attn28attention_fwd_sm90_ws_kernelINS0_15FwdSm90WsTraitsI6__halfLi64ELb1ELb1ELb1ELb0EEEEEv"
    "NS0_9FwdParamsENS0_10FwdTmaMapsE"
)
DELTA = "_ZN6fastcm4attn26attention_bwd_delta_kernelI6__halfEEvNS0_9BwdParamsE"
FWD32 = "_ZN6fastcm4attn20attention_fwd_kernelINS0_9FwdTraitsI13__nv_bfloat16Li32ELi32ELb0EEEEEvNS0_9FwdParamsE"

# As a ninja build prints it (the order of a real nvcc 13 log): the nvcc command, then per entry
# function its properties, registers and compile time, the properties of the __noinline__ callee
# stage_bias after it; sm_80 first, then sm_90a. The numbers differ from each other so that a
# figure read into the wrong column or row shows.
LOG = f"""\
[3/11] /usr/local/cuda/bin/nvcc -c attention_fwd_bf16.cu -O3 -Xptxas -v -gencode=arch=compute_80,code=sm_80
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{FWD}' for 'sm_80'
ptxas info    : Function properties for {FWD}
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 576 bytes cmem[0]
ptxas info    : Compile time = 376.928 ms
ptxas info    : Function properties for {STAGE_BIAS}
    16 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Compiling entry function '{FWD32}' for 'sm_80'
ptxas info    : Function properties for {FWD32}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 576 bytes cmem[0]
ptxas info    : Compile time = 116.503 ms
ptxas info    : Compiling entry function '{DELTA}' for 'sm_80'
ptxas info    : Function properties for {DELTA}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 48 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 20.112 ms
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{WS}' for 'sm_90a'
ptxas info    : Function properties for {WS}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 5 barriers, 912 bytes cmem[0]
ptxas info    : Compile time = 1201.335 ms
ptxas info    : Function properties for {STAGE_BIAS}
    40 bytes stack frame, 44 bytes spill stores, 52 bytes spill loads
ptxas info    : Compiling entry function '{FWD}' for 'sm_90a'
ptxas info    : Function properties for {FWD}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 231 registers, used 1 barriers, 576 bytes cmem[0]
ptxas info    : Compile time = 402.907 ms
[4/11] /usr/local/cuda/bin/nvcc -c attention_cuda.cu
"""


def by_key(reports):
    return {(r.mangled, r.arch): r for r in reports}


def test_parse_assigns_each_figure_to_its_kernel_and_arch():
    reports = by_key(ptxas_report.parse_ptxas_log(LOG))
    assert set(reports) == {(FWD, "sm_80"), (FWD32, "sm_80"), (DELTA, "sm_80"), (WS, "sm_90a"), (FWD, "sm_90a")}
    fwd80 = reports[(FWD, "sm_80")]
    assert (fwd80.registers, fwd80.smem, fwd80.spill_stores, fwd80.spill_loads, fwd80.stack) == (255, 0, 4, 12, 8)
    delta = reports[(DELTA, "sm_80")]
    assert (delta.registers, delta.smem, delta.spill_stores, delta.spill_loads, delta.stack) == (32, 48, 0, 0, 0)
    assert reports[(FWD32, "sm_80")].registers == 96
    # stage_bias's block follows the kernel's own: it is not the kernel's.
    ws = reports[(WS, "sm_90a")]
    assert (ws.registers, ws.smem, ws.spill_stores, ws.spill_loads, ws.stack) == (168, 0, 0, 0, 0)
    assert reports[(FWD, "sm_90a")].registers == 231


def test_readable_name_drops_namespaces_return_type_and_parameters():
    full = (
        "void fastcm::attn::attention_fwd_sm90_ws_kernel<fastcm::attn::FwdSm90WsTraits<__half, 64, true, true, "
        "true, false> >(fastcm::attn::FwdParams, fastcm::attn::FwdTmaMaps)"
    )
    expected = "attention_fwd_sm90_ws_kernel<FwdSm90WsTraits<__half, 64, true, true, true, false>>"
    assert ptxas_report._shorten(full) == expected
    assert ptxas_report._shorten("void f<a<b<int> > >(int (*)(int))") == "f<a<b<int>>>"


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) is not installed")
def test_tables_one_per_arch_with_demangled_rows():
    text = ptxas_report.markdown_tables(ptxas_report.parse_ptxas_log(LOG))
    sm80, sm90 = text.split("### sm_90a")
    assert sm80.startswith("### sm_80")
    assert "| `attention_fwd_kernel<FwdTraits<__nv_bfloat16, 128, 128, true>>` | 255 | 0 | 4 | 12 | 8 |" in sm80
    assert "| `attention_bwd_delta_kernel<__half>` | 32 | 48 | 0 | 0 | 0 |" in sm80
    assert "| `attention_fwd_kernel<FwdTraits<__nv_bfloat16, 128, 128, true>>` | 231 | 0 | 0 | 0 | 0 |" in sm90
    assert "| `attention_fwd_sm90_ws_kernel<FwdSm90WsTraits<__half, 64, true, true, true, false>>` | 168 |" in sm90
    assert "ws_kernel" not in sm80 and "delta" not in sm90
    # Rows sorted by kernel name, the numbers in it by value: bwd before fwd, head dim 32 before 128.
    assert sm80.index("attention_bwd_delta_kernel") < sm80.index("attention_fwd_kernel")
    assert sm80.index("<__nv_bfloat16, 32, 32, false>") < sm80.index("<__nv_bfloat16, 128, 128, true>")


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) is not installed")
def test_match_keeps_only_the_kernels_it_names():
    text = ptxas_report.markdown_tables(ptxas_report.parse_ptxas_log(LOG), match=r"fwd_kernel<FwdTraits<\w+, 32,")
    assert text.count("| `attention_fwd_kernel<") == 1 and "| 96 |" in text
    assert "### sm_90a" not in text


def test_tables_keep_mangled_names_without_cxxfilt(monkeypatch):
    monkeypatch.setattr(ptxas_report.shutil, "which", lambda name: None)
    text = ptxas_report.markdown_tables(ptxas_report.parse_ptxas_log(LOG))
    assert f"| `{DELTA}` | 32 | 48 | 0 | 0 | 0 |" in text


def test_main_writes_the_tables_and_refuses_a_log_without_ptxas_lines(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(LOG)
    out = tmp_path / "table.md"
    assert ptxas_report.main([str(log), "-o", str(out)]) == 0
    assert out.read_text().count("| kernel | registers |") == 2
    log.write_text("[1/1] c++ -c attention.cpp\n")
    with pytest.raises(SystemExit, match="no 'Compiling entry function' lines"):
        ptxas_report.main([str(log)])
