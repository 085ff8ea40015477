"""The benchmark harness measures what it says: host peak memory on CPU, and a CLI run that
writes finite times and memory for every implementation it runs."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host peak memory reads /proc")


@linux_only
def test_host_peak_memory_sees_a_temporary_and_nothing_else():
    assert common.track_host_peak_memory()
    cpu = torch.device("cpu")
    mib = 2**20

    def temporary():
        torch.ones(32 * mib // 4).sum()  # 32 MiB, written, then freed before returning

    def nothing():
        return None

    peak = common.peak_memory_mb(temporary, cpu)
    assert 30 <= peak <= 40, peak
    assert common.peak_memory_mb(nothing, cpu) < 2


def test_cli_writes_times_and_memory(tmp_path):
    out = tmp_path / "bench"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--families",
            "precondition",
            "--filter",
            "edm fwd+bwd",
            "--no-plot",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and {row["case"] for row in rows} == {"edm fwd+bwd"}
    for row in rows:
        assert row["fastcm_ms"] > 0 and row["eager_ms"] > 0 and row["floor_ms"] > 0
        assert row["fastcm_error"] is None and row["eager_error"] is None
        if sys.platform.startswith("linux"):
            assert row["fastcm_peak_mb"] is not None and row["fastcm_peak_mb"] >= 0


def test_attention_plot_draws_one_panel_per_config(tmp_path):
    """benchmarks.attention_plot turns an attention_gpu.json into a PNG of one panel per (H, d)."""
    pytest.importorskip("matplotlib")
    rows = [
        {"H": h, "d": d, "N": n, "impl": impl, "tflops": t, "status": "ok"}
        for h, d in ((32, 64), (16, 128))
        for n in (1024, 4096)
        for impl, t in (("fastcm_jvp", 300.0), ("math_jvp", 12.0), ("fastcm_jvp_sm80", 200.0))
    ]
    rows.append({"H": 32, "d": 64, "N": 8192, "impl": "math_jvp", "tflops": None, "status": "OOM"})
    run = {
        "meta": {
            "gpu": "test GPU",
            "torch": "x",
            "commit": "0123456789abcdef",
            "matmul_tflops": 800.0,
            "command": "python -m benchmarks.attention_gpu --out x",
        },
        "rows": rows,
    }
    (tmp_path / "attention_gpu.json").write_text(json.dumps(run))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.attention_plot", str(tmp_path / "attention_gpu.json")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    png = (tmp_path / "attention_gpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height  # two panels side by side


def test_attention_gpu_runs_the_goal_shapes_first():
    """Every (config, length) runs once, the issue's goal length (8192) at both head dims first."""
    from benchmarks import attention_gpu

    order = attention_gpu.shape_order(attention_gpu.LENGTHS)
    assert sorted(order) == sorted((B, H, d, N) for B, H, d in attention_gpu.CONFIGS for N in attention_gpu.LENGTHS)
    assert [shape[3] for shape in order[:2]] == [attention_gpu.COMPILE_LENGTH] * 2
    assert {shape[2] for shape in order[:2]} == {64, 128}


def test_attention_gpu_triton_rows_run_and_match_the_reference(monkeypatch):
    """The Triton rows of benchmarks.attention_gpu (on DEVICE: CPU tensors run in the interpreter;
    tiles shrunk): each case runs and returns what the reference gives; the jvp-flash-attention
    peer is skipped for causal calls and where the package is missing."""
    import importlib.util

    import fastcm.kernels.attention as triton_attention
    from benchmarks import attention_gpu
    from fastcm.reference import attention as ref
    from helpers import DEVICE, assert_close, randn, to64

    monkeypatch.setattr(triton_attention, "BLOCK_OVERRIDE", (16, 16))
    inputs = [randn(1, 2, 20, 16, dtype=torch.float64) for _ in range(7)]  # on DEVICE: the kernels' inputs
    q, k, v, qt, kt, vt, grad = inputs
    q64, k64, v64, qt64, kt64, vt64, grad64 = map(to64, inputs)  # on the CPU: the reference's
    out, lse = ref.attention(q64, k64, v64, causal=True, return_lse=True)
    cases = attention_gpu.triton_cases(
        q, k, v, qt, kt, vt, grad, out.to(DEVICE), lse.to(DEVICE), 0.25, True, 1.0, 3.0, 2.5
    )
    assert [(name, flops) for name, _, flops in cases] == [
        ("triton_fwd", 1.0),
        ("triton_jvp", 3.0),
        ("triton_jvp_q", 3.0),
        ("triton_bwd", 2.5),
    ]
    results = {name: fn() for name, fn, _ in cases}
    want = ref.attention_jvp(q64, k64, v64, qt64, kt64, vt64, scale=0.25, causal=True, return_lse=True)
    want_q = ref.attention_jvp(q64, k64, v64, qt64, 0 * kt64, 0 * vt64, scale=0.25, causal=True, return_lse=True)
    assert_close(results["triton_fwd"][0], want[0], torch.float64)
    for got, expected in zip(results["triton_jvp"], want):
        assert_close(got, expected, torch.float64)
    for got, expected in zip(results["triton_jvp_q"], want_q):
        assert_close(got, expected, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    expected_grads = torch.autograd.grad(ref.attention(*leaves, scale=0.25, causal=True), leaves, grad64)
    for got, expected in zip(results["triton_bwd"], expected_grads):
        assert_close(got, expected, torch.float64)
    assert attention_gpu.jvp_flash_attention_case(q, k, v, qt, kt, vt, True, 3.0) is None
    if importlib.util.find_spec("jvp_flash_attention") is None:
        assert attention_gpu.jvp_flash_attention_case(q, k, v, qt, kt, vt, False, 3.0) is None


def test_triton_tile_sweep_starts_from_the_shipped_configs():
    from benchmarks import attention_triton_tiles as tiles
    from fastcm.kernels import attention

    assert set(tiles.CANDIDATES) == {key for key in attention.CONFIGS if key[1] in tiles.HEADS}
    for key, candidates in tiles.CANDIDATES.items():
        assert candidates[0] == attention.CONFIGS[key], key
        assert len(set(candidates)) == len(candidates), key


def test_triton_tile_sweep_best_ignores_mismatches_and_reports_the_shipped_time():
    from benchmarks.attention_triton_tiles import best_per_kernel

    def row(config, ms, status="ok", shipped=False):
        return {
            "kernel": "jvp",
            "head_dim": 128,
            "config": list(config),
            "ms": ms,
            "status": status,
            "shipped": shipped,
        }

    rows = [row((32, 32, 4, 1), 3.0, shipped=True), row((64, 64, 4, 2), 1.0, "MISMATCH"), row((64, 32, 4, 2), 2.0)]
    assert best_per_kernel(rows) == {("jvp", 128): ((64, 32, 4, 2), 2.0, 3.0)}
