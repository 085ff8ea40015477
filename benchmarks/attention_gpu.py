"""GPU benchmark of the CUDA attention kernels against flash SDPA and the MATH-backend JVP.

For B=1, H=32, d=64 and B=1, H=16, d=128 at N in {1024, 4096, 8192, 16384} (bf16, non-causal
unless --causal), times
  fastcm JVP      torch.ops.fastcm.attention_forward_jvp (primal + tangent, one kernel)
  fastcm fwd      torch.ops.fastcm.attention_forward
  ..._serial      the same with FASTCM_ATTN_SM90_OVERLAP=0 (TMA kernel, no intra-warpgroup overlap), on sm_90 only
  ..._smemq       the same with FASTCM_ATTN_SM90_QREGS=0 (TMA kernel, Q read from shared memory), sm_90, d=64 only
  ..._cpasync     the same with FASTCM_ATTN_SM90_TMA=0 (the cp.async wgmma kernel), on sm_90 only
  ..._sm80        the same with FASTCM_ATTN_SM90=0 (the mma.sync kernel), on sm_90 only
  fastcm jvp_bias the JVP with a (1, 1, N, N) fp32 bias (a broadcast mask-like term) at d = 64, on sm_90
                  with its _cpasync row (bias tiles in the TMA kernel against the cp.async one's)
  fastcm bwd      torch.ops.fastcm.attention_backward (fused kernels, wgmma on sm_90; TFLOP/s on 10·N²·d per head)
  fastcm bwd_sm80 the same with FASTCM_ATTN_SM90_BWD=0 (the mma.sync kernels), on sm_90 only (--skip _bwdsm80)
  triton fwd, triton jvp, triton bwd
                  the Triton kernels (fastcm.kernels.attention) on the same calls; triton jvp_q the JVP with
                  a tangent on Q only (K̇ = V̇ = None: conditioning tokens), whose skipped work is the saving
  jvp-flash-attn  torch.func.jvp of jvp_flash_attention's Triton attention (the PyPI package, if importable)
  sdpa fwd        F.scaled_dot_product_attention (PyTorch's default backend choice, flash on H100)
  sdpa bwd        the backward of that SDPA call alone (torch.autograd.grad on a kept graph)
  math jvp        torch.func.jvp of SDPA on the MATH backend (the baseline of the issue)
  compiled jvp    the same under torch.compile, at N = 8192 only (one compile per shape; --no-compile skips it)
  peer fwd        the forward of an attention library that imports here (FlashAttention 3's
                  flash_attn_interface, else flash_attn), where one does
First of all, at N = 8192 and both head dims, the bias block: fastcm fwd and JVP without a bias,
with a (1, 1, N, N) fp32 bias under the default (scalar) bias staging, and with
FASTCM_ATTN_BIAS_STAGE=vector (rows ..._bias_vector; --skip _biasvec drops them); it prints
"bias/unbiased" ratios.
The table reports TFLOP/s (JVP: 12·N²·d per head, forward: 4·N²·d), the time over the compute floor
(FLOPs over the rate of an 8192³ matmul in the same dtype, measured at the start of the run), time
relative to the SDPA forward (backward rows also to the SDPA backward) and peak memory above the inputs.
Writes attention_gpu.json and attention_gpu.csv into --out.

    python -m benchmarks.attention_gpu --out results_dir [--causal] [--quick] [--no-compile] [--time-budget S]
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .common import matmul_rate, peak_memory_mb, time_ms

DEVICE = torch.device("cuda")
CONFIGS = [(1, 32, 64), (1, 16, 128)]  # (B, H, d)
LENGTHS = [1024, 4096, 8192, 16384]
COMPILE_LENGTH = 8192  # the goal shapes: where the compiled baseline runs


def shape_order(lengths):
    """(B, H, d, N) in the order they run: the goal length first, then the shorter ones, then the
    longer ones, both head dims at each, so a run cut short by its time budget has measured the
    shapes that matter most."""
    by_priority = sorted(lengths, key=lambda n: (n != COMPILE_LENGTH, n > COMPILE_LENGTH, n))
    return [(B, H, d, N) for N in by_priority for B, H, d in CONFIGS]


# Row suffix -> the kernel switch that selects it on sm_90 (read by the extension at every call).
SM90_VARIANTS = {
    "_serial": "FASTCM_ATTN_SM90_OVERLAP",
    "_smemq": "FASTCM_ATTN_SM90_QREGS",
    "_cpasync": "FASTCM_ATTN_SM90_TMA",
    "_sm80": "FASTCM_ATTN_SM90",
}
D64_ONLY = {"_smemq"}  # at d = 128 Q is read from shared memory anyway: the default kernel


def with_env(variable, value, fn):
    """fn run with the environment variable `variable` set to `value`."""

    def run():
        old = os.environ.get(variable)
        os.environ[variable] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[variable]
            else:
                os.environ[variable] = old

    return run


def with_switch_off(variable, fn):
    """fn run with the environment variable `variable` set to 0."""
    return with_env(variable, "0", fn)


def peer_forward(q, k, v, causal):
    """(name, fn) of the forward of an attention library that imports here, else None."""
    for module, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N, H, d)
        return f"peer_{name}_fwd", lambda: lib.flash_attn_func(qf, kf, vf, causal=causal)
    return None


def bias_block(ops, dtype, causal, rate, skip_vector):
    """Biased vs unbiased rows at the goal length, both bias staging modes: the first rows measured."""
    rows = []
    for B, H, d in CONFIGS:
        N = COMPILE_LENGTH
        torch.manual_seed(0)
        q, k, v, qt, kt, vt = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(6))
        bias = torch.randn(1, 1, N, N, device="cuda").expand(B, H, N, N)  # contiguous rows: vector loads
        scale = d**-0.5
        factor = 0.5 if causal else 1.0
        f_fwd, f_jvp = 4 * B * H * N * N * d * factor, 12 * B * H * N * N * d * factor
        fwd = lambda b: lambda: ops.attention_forward(q, k, v, b, scale, causal)  # noqa: E731
        jvp = lambda b: lambda: ops.attention_forward_jvp(q, k, v, qt, kt, vt, b, None, scale, causal)  # noqa: E731
        cases = [
            ("fastcm_fwd", fwd(None), f_fwd),
            ("fastcm_fwd_bias", fwd(bias), f_fwd),
            ("fastcm_jvp", jvp(None), f_jvp),
            ("fastcm_jvp_bias", jvp(bias), f_jvp),
        ]
        if not skip_vector:
            cases += [
                ("fastcm_fwd_bias_vector", with_env("FASTCM_ATTN_BIAS_STAGE", "vector", fwd(bias)), f_fwd),
                ("fastcm_jvp_bias_vector", with_env("FASTCM_ATTN_BIAS_STAGE", "vector", jvp(bias)), f_jvp),
            ]
        ms = {}
        for name, fn, flops in cases:
            r = measure(name, fn, flops)
            jvp_call = "jvp" in name
            r.update(
                {
                    "B": B,
                    "H": H,
                    "N": N,
                    "d": d,
                    "dtype": str(dtype).split(".")[-1],
                    "causal": causal,
                    "kernel": " + ".join(ops.attention_forward_kernels(q, v, jvp_call, "bias" in name, False)),
                    "x_floor": r["ms"] / (flops / rate * 1e3) if r["ms"] else None,
                    "vs_sdpa_fwd": None,
                    "block": "bias",
                }
            )
            rows.append(r)
            ms[name] = r["ms"]
            print(
                f"  bias block B={B} H={H} N={N} d={d:3d} {name:23s} "
                + (f"{r['ms']:9.3f} ms" if r["status"] == "ok" else r["status"]),
                flush=True,
            )
        for kind in ("fwd", "jvp"):
            plain = ms.get(f"fastcm_{kind}")
            ratios = [
                f"{mode} {ms[f'fastcm_{kind}_bias{suffix}'] / plain:.2f}x"
                for mode, suffix in (("scalar", ""), ("vector", "_vector"))
                if plain and ms.get(f"fastcm_{kind}_bias{suffix}")
            ]
            print(f"bias/unbiased d={d} {kind} N={N}: {', '.join(ratios) or 'not measured'}", flush=True)
        del q, k, v, qt, kt, vt, bias
        torch.cuda.empty_cache()
    return rows


def triton_cases(q, k, v, qt, kt, vt, grad, out, lse, scale, causal, f_fwd, f_jvp, f_bwd, backward=True):
    """(name, fn, flops) of the Triton kernels on one shape: forward, forward + JVP, the JVP with a tangent on
    Q only, and the backward (from the given out, LSE)."""
    from fastcm.kernels import attention as triton_attention

    cases = [
        ("triton_fwd", lambda: triton_attention.attention_forward(q, k, v, None, scale, causal), f_fwd),
        (
            "triton_jvp",
            lambda: triton_attention.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, causal),
            f_jvp,
        ),
        (
            "triton_jvp_q",
            lambda: triton_attention.attention_forward_jvp(q, k, v, qt, None, None, None, None, scale, causal),
            f_jvp,
        ),
    ]
    if backward:
        cases.append(
            (
                "triton_bwd",
                lambda: triton_attention.attention_backward(grad, q, k, v, out, lse, None, scale, causal),
                f_bwd,
            )
        )
    return cases


def jvp_flash_attention_case(q, k, v, qt, kt, vt, causal, f_jvp):
    """(name, fn, flops) of torch.func.jvp through the jvp_flash_attention package's attention (non-causal: its
    causal convention is not checked here), or None where the package is not importable (a peer to compare
    with, not a dependency) or causal is asked for."""
    if causal:
        return None
    try:
        from jvp_flash_attention.jvp_attention import attention as peer_attention
    except ImportError:
        return None
    return (
        "jvp_flash_attn",
        lambda: torch.func.jvp(lambda a, b, c: peer_attention(a, b, c), (q, k, v), (qt, kt, vt)),
        f_jvp,
    )


def measure(name, fn, flops):
    try:
        ms = time_ms(fn, DEVICE)
        mem = peak_memory_mb(fn, DEVICE)
        return {"impl": name, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mib": mem, "status": "ok"}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"impl": name, "ms": None, "tflops": None, "peak_mib": None, "status": "OOM"}
    except Exception as error:  # noqa: BLE001 - a failing baseline (or its compile) must not stop the table
        torch.cuda.empty_cache()
        return {"impl": name, "ms": None, "tflops": None, "peak_mib": None, "status": f"error: {error}"[:200]}


def write_results(out, rows, meta):
    """attention_gpu.json and .csv of the rows so far (rewritten after every shape, so a run cut
    short still leaves its measurements)."""
    with open(os.path.join(out, "attention_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys = [
        "block",
        "B",
        "H",
        "N",
        "d",
        "dtype",
        "causal",
        "impl",
        "kernel",
        "ms",
        "tflops",
        "x_floor",
        "vs_sdpa_fwd",
        "peak_mib",
        "status",
    ]

    keys = [
        "B",
        "H",
        "N",
        "d",
        "dtype",
        "causal",
        "impl",
        "kernel",
        "ms",
        "tflops",
        "x_floor",
        "vs_sdpa_fwd",
        "vs_sdpa_bwd",
        "peak_mib",
        "status",
    ]
    with open(os.path.join(out, "attention_gpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for attention_gpu.json / .csv")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="N in {4096, 8192} only")
    parser.add_argument("--no-math", action="store_true", help="skip the MATH-backend JVP baseline")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd MATH-backend JVP")
    parser.add_argument(
        "--skip", default="", help="comma-separated sm_90 row suffixes not to run (e.g. _serial,_cpasync)"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no new shape after this much time (the table so far is still printed)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.attention_gpu needs a CUDA GPU; GPU figures need a GPU.")

    from fastcm._extension import extension_ops

    ops = extension_ops()
    assert ops.has_cuda(), "fastcm._C was built without CUDA kernels"
    dtype = getattr(torch, args.dtype)
    hopper = torch.cuda.get_device_capability()[0] == 9
    lengths = [4096, COMPILE_LENGTH] if args.quick else LENGTHS
    os.makedirs(args.out, exist_ok=True)
    rate = matmul_rate(DEVICE, dtype)  # FLOP/s: the compute floor of every row
    print(f"{args.dtype} 8192^3 matmul: {rate / 1e12:.1f} TFLOP/s (the floor's rate)", flush=True)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "matmul_tflops": rate / 1e12,
        "command": " ".join(["python -m benchmarks.attention_gpu"] + sys.argv[1:]),
    }
    rows, started = [], time.monotonic()
    rows += bias_block(ops, dtype, args.causal, rate, "_biasvec" in args.skip.split(","))
    write_results(args.out, rows, meta)
    for B, H, d, N in shape_order(lengths):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(
                f"time budget of {args.time_budget:.0f} s spent: B={B} H={H} N={N} d={d} "
                "and the shapes after it not run",
                flush=True,
            )
            meta["cut_short_at"] = {"B": B, "H": H, "N": N, "d": d}
            write_results(args.out, rows, meta)
            break
        torch.manual_seed(0)
        q, k, v, qt, kt, vt = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(6))
        grad = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
        scale = d**-0.5
        causal_factor = 0.5 if args.causal else 1.0
        f_fwd = 4 * B * H * N * N * d * causal_factor
        f_jvp = 12 * B * H * N * N * d * causal_factor
        f_bwd = 10 * B * H * N * N * d * causal_factor  # dV, dP, dQ, dK + S recompute

        def sdpa_math_jvp():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(
                    lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=args.causal),
                    (q, k, v),
                    (qt, kt, vt),
                )

        out, lse = ops.attention_forward(q, k, v, None, scale, args.causal)

        def fastcm_fwd():
            return ops.attention_forward(q, k, v, None, scale, args.causal)

        def fastcm_jvp():
            return ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, args.causal)

        cases = [
            ("sdpa_fwd", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), f_fwd),
            ("fastcm_fwd", fastcm_fwd, f_fwd),
            ("fastcm_jvp", fastcm_jvp, f_jvp),
        ]
        kernels = {
            "fastcm_fwd": ops.attention_forward_kernels(q, v, False, False, False),
            "fastcm_jvp": ops.attention_forward_kernels(q, v, True, False, False),
        }
        if hopper and d == 64:  # bias tiles: staged per warpgroup (TMA) against the cp.async kernel's
            bias = torch.randn(1, 1, N, N, device="cuda").expand(B, H, N, N)

            def fastcm_jvp_bias():
                return ops.attention_forward_jvp(q, k, v, qt, kt, vt, bias, None, scale, args.causal)

            cases.append(("fastcm_jvp_bias", fastcm_jvp_bias, f_jvp))
            kernels["fastcm_jvp_bias"] = ops.attention_forward_kernels(q, v, True, True, False)
            if "_cpasync" not in args.skip.split(","):
                cases.append(
                    ("fastcm_jvp_bias_cpasync", with_switch_off("FASTCM_ATTN_SM90_TMA", fastcm_jvp_bias), f_jvp)
                )
                kernels["fastcm_jvp_bias_cpasync"] = with_switch_off(
                    "FASTCM_ATTN_SM90_TMA", lambda: ops.attention_forward_kernels(q, v, True, True, False)
                )()
        if hopper:  # the other forward kernels beside the default in the same run
            for suffix, variable in SM90_VARIANTS.items():
                if suffix in args.skip.split(",") or (suffix in D64_ONLY and d != 64):
                    continue
                cases += [
                    ("fastcm_fwd" + suffix, with_switch_off(variable, fastcm_fwd), f_fwd),
                    ("fastcm_jvp" + suffix, with_switch_off(variable, fastcm_jvp), f_jvp),
                ]
                for name, jvp in (("fastcm_fwd", False), ("fastcm_jvp", True)):
                    kernels[name + suffix] = with_switch_off(
                        variable, lambda jvp=jvp: ops.attention_forward_kernels(q, v, jvp, False, False)
                    )()
        cases += triton_cases(
            q, k, v, qt, kt, vt, grad, out, lse, scale, args.causal, f_fwd, f_jvp, f_bwd, backward=not args.no_backward
        )
        peer = jvp_flash_attention_case(q, k, v, qt, kt, vt, args.causal, f_jvp)
        if peer is not None:
            cases.append(peer)
        sdpa_graph = None
        if not args.no_backward:

            def fastcm_bwd():
                return ops.attention_backward(grad, q, k, v, out, lse, None, scale, args.causal)

            cases.append(("fastcm_bwd", fastcm_bwd, f_bwd))
            kernels["fastcm_bwd"] = ops.attention_backward_kernels(q, v, False)
            if hopper and "_bwdsm80" not in args.skip.split(","):
                cases.append(("fastcm_bwd_sm80", with_switch_off("FASTCM_ATTN_SM90_BWD", fastcm_bwd), f_bwd))
                kernels["fastcm_bwd_sm80"] = with_switch_off(
                    "FASTCM_ATTN_SM90_BWD", lambda: ops.attention_backward_kernels(q, v, False)
                )()
            # The baseline backward alone: one SDPA forward graph, differentiated on every call.
            sdpa_graph = [t.detach().requires_grad_(True) for t in (q, k, v)]
            sdpa_graph.append(F.scaled_dot_product_attention(*sdpa_graph, is_causal=args.causal))
            cases.append(
                ("sdpa_bwd", lambda: torch.autograd.grad(sdpa_graph[3], sdpa_graph[:3], grad, retain_graph=True), f_bwd)
            )
        peer = peer_forward(q, k, v, args.causal)
        if peer is not None:
            cases.append((*peer, f_fwd))
        if not args.no_math:
            cases.append(("math_jvp", sdpa_math_jvp, f_jvp))
        if not args.no_compile and N == COMPILE_LENGTH:
            compiled_jvp = torch.compile(sdpa_math_jvp)
            cases.append(("compiled_math_jvp", compiled_jvp, f_jvp))
        results = {}
        for name, fn, flops in cases:
            r = measure(name, fn, flops)
            r.update(
                {
                    "B": B,
                    "H": H,
                    "N": N,
                    "d": d,
                    "dtype": args.dtype,
                    "causal": args.causal,
                    "kernel": " + ".join(kernels.get(name, [])),
                    "x_floor": r["ms"] / (flops / rate * 1e3) if r["ms"] else None,
                }
            )
            results[name] = r
            rows.append(r)
            print(
                f"  B={B} H={H} N={N:5d} d={d:3d} {name:23s} "
                + (
                    f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s {r['x_floor']:5.2f}x floor {r['peak_mib']:9.1f} MiB"
                    if r["status"] == "ok"
                    else r["status"]
                )
                + (f"  [{r['kernel']}]" if r["kernel"] else ""),
                flush=True,
            )
        ref_ms = results["sdpa_fwd"]["ms"]
        ref_bwd_ms = results["sdpa_bwd"]["ms"] if "sdpa_bwd" in results else None
        for name, r in results.items():
            r["vs_sdpa_fwd"] = (r["ms"] / ref_ms) if (r["ms"] and ref_ms) else None
            r["vs_sdpa_bwd"] = (r["ms"] / ref_bwd_ms) if (name.endswith("bwd") and r["ms"] and ref_bwd_ms) else None
        del q, k, v, qt, kt, vt, grad, out, lse, sdpa_graph, cases
        torch.cuda.empty_cache()
        write_results(args.out, rows, meta)

    rows.sort(key=lambda r: (r.get("block") != "bias", r["d"], r["N"]))  # the bias block first
    write_results(args.out, rows, meta)
    print(
        f"\n{meta['gpu']}, torch {meta['torch']}, commit {commit[:10]}, {args.dtype} matmul {rate / 1e12:.1f} TFLOP/s"
    )
    print(
        f"{'H':>3} {'N':>6} {'d':>4} {'impl':>23} {'ms':>9} {'TFLOP/s':>8} {'x floor':>7} {'x sdpa':>7} {'MiB':>9} "
        f"{'x sdpa bwd':>10}"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['H']:>3} {r['N']:>6} {r['d']:>4} {r['impl']:>23} {r['status'][:40]}")
            continue
        vs_sdpa = f"{r['vs_sdpa_fwd']:7.2f}" if r["vs_sdpa_fwd"] is not None else f"{'-':>7}"  # SDPA failed
        print(
            f"{r['H']:>3} {r['N']:>6} {r['d']:>4} {r['impl']:>23} {r['ms']:9.3f} {r['tflops']:8.1f} "
            f"{r['x_floor']:7.2f} {vs_sdpa} {r['peak_mib']:9.1f}"
            + (f" {r['vs_sdpa_bwd']:10.2f}" if r.get("vs_sdpa_bwd") is not None else "")
        )


if __name__ == "__main__":
    main()
