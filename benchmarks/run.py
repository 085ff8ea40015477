"""The benchmark CLI: `python -m benchmarks [--families precondition,losses] [--out DIR]`.

For each case: eager reference ms, torch.compile(reference) ms, fastcm ms, the floor ms
(minimal bytes / copy bandwidth, or FLOPs / matmul rate, measured in this run) and each
time ÷ floor. Writes results.json, results.csv and results.png under --out.
"""

import argparse
import csv
import datetime
import importlib
import json
import math
import pathlib
import platform
import subprocess
import sys

import torch

from .common import (
    bench_device,
    copy_bandwidth,
    input_sets_for,
    matmul_rate,
    peak_memory_mb,
    rotating,
    time_ms,
    track_host_peak_memory,
)

HERE = pathlib.Path(__file__).resolve().parent
IMPLEMENTATIONS = ("eager", "compiled", "fastcm")


def discover_families():
    return sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fastcm

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "fastcm": fastcm.__version__,
        "commit": _commit(),
        "command": " ".join([pathlib.Path(sys.executable).name, "-m", "benchmarks"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _timed(fn, case, input_sets, device):
    try:
        call = rotating(fn, input_sets)
        return time_ms(call, device), peak_memory_mb(call, device), None
    except Exception as error:  # a failing implementation is reported, not fatal to the run
        return math.nan, None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def run_case(case, device, bandwidth, compile_reference):
    input_sets = input_sets_for(case)
    row = {
        "family": case.family,
        "case": case.name,
        "shape": "x".join(map(str, case.shape)),
        "dtype": str(case.dtype).replace("torch.", ""),
        "min_bytes": case.min_bytes,
        "flops": case.flops,
    }
    floors = [case.min_bytes / bandwidth * 1e3]
    if case.flops:
        floors.append(case.flops / matmul_rate(device, case.dtype) * 1e3)
    row["floor_ms"] = max(floors)
    implementations = {"eager": case.reference, "fastcm": case.fastcm}
    if compile_reference and case.compile_reference:
        torch._dynamo.reset()
        implementations["compiled"] = torch.compile(case.reference)
    for name in IMPLEMENTATIONS:
        if name not in implementations:
            row[f"{name}_ms"], row[f"{name}_peak_mb"], row[f"{name}_error"] = math.nan, None, "not run"
            continue
        row[f"{name}_ms"], row[f"{name}_peak_mb"], row[f"{name}_error"] = _timed(
            implementations[name], case, input_sets, device
        )
    for name in IMPLEMENTATIONS:
        row[f"{name}_over_floor"] = row[f"{name}_ms"] / row["floor_ms"]
    if case.flops:
        row["fastcm_tflops"] = case.flops / (row["fastcm_ms"] * 1e-3) / 1e12
    return row


def print_table(rows, env):
    print(
        f"\nfastcm benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})"
    )
    header = (
        f"{'case':58s} {'eager':>9s} {'compile':>9s} {'fastcm':>9s} {'floor':>9s} {'fastcm/fl':>9s} "
        f"{'eager/fl':>9s} {'comp/fl':>9s} {'eager MiB':>10s} {'fastcm MiB':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        label = f"{r['family']}/{r['case']} {r['shape']} {r['dtype']}"
        print(
            f"{label[:58]:58s} {r['eager_ms']:9.4f} {r['compiled_ms']:9.4f} {r['fastcm_ms']:9.4f} {r['floor_ms']:9.4f} "
            f"{r['fastcm_over_floor']:9.2f} {r['eager_over_floor']:9.2f} {r['compiled_over_floor']:9.2f} "
            f"{_mib(r['eager_peak_mb']):>10s} {_mib(r['fastcm_peak_mb']):>10s}"
        )
        for name in IMPLEMENTATIONS:
            error = r[f"{name}_error"]
            if error and error != "not run":
                print(f"    {name} failed: {error}")
    print(
        "(times in ms, medians; floor = min bytes / copy bandwidth or FLOPs / matmul rate, measured in this run;\n"
        " MiB = peak memory of one call above what was allocated before it: CUDA allocator on GPU,\n"
        " resident-set high-water mark on CPU)"
    )


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def write_results(rows, env, out: pathlib.Path, plot: bool):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return plot and plot_results(rows, env, out / "results.png")


def plot_results(rows, env, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    labels = [f"{r['family']}/{r['case']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    height = 0.27
    for i, name in enumerate(IMPLEMENTATIONS):
        values = [r[f"{name}_over_floor"] for r in rows]
        ax.barh([y + (i - 1) * height for y in range(len(rows))], values, height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time / floor (lower is better; 1 = memory or compute floor)")
    ax.set_title(f"fastcm on {env['device']} ({env['commit']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    families = discover_families()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(families), help=f"comma-separated subset of {families}")
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile(reference) (default: on GPU only; CPU compiles take minutes)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--filter", default="", help="only cases whose id contains this text")
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="output folder (default benchmarks/out/<device>-<time>)"
    )
    parser.add_argument("--no-plot", dest="plot", action="store_false", default=True)
    args = parser.parse_args(argv)

    device = bench_device()
    compile_reference = device.type == "cuda" if args.compile is None else args.compile
    env = environment(device)
    small = device.type != "cuda"
    if small:
        print(
            "No CUDA device: running small CPU cases (fastcm's CPU path is the reference or the C++ "
            "extension). GPU figures need a GPU: run this same command on one."
        )
    if small and not track_host_peak_memory():
        print("Peak host memory is not measurable here (needs Linux /proc and glibc): MiB columns are n/a.")
    bandwidth = copy_bandwidth(device)
    env["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "out" / f"{device.type}-{stamp}"
    rows = []
    for family in [f for f in args.families.split(",") if f]:
        if family not in families:
            parser.error(f"--families: unknown family {family!r}; available: {families}")
        module = importlib.import_module(f"benchmarks.bench_{family}")
        for case in module.cases(device, small):
            if args.filter in case.id:
                rows.append(run_case(case, device, bandwidth, compile_reference))
                print(
                    f"  {case.id}: fastcm {rows[-1]['fastcm_ms']:.4f} ms, {rows[-1]['fastcm_over_floor']:.2f}x floor",
                    flush=True,
                )
                write_results(rows, env, out, plot=False)  # a run cut short keeps the rows it measured
    print_table(rows, env)
    plotted = write_results(rows, env, out, args.plot)
    print(f"results: {out}/results.json, results.csv" + (", results.png" if plotted else ""))
    return rows
