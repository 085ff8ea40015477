"""Tile sweep of the Triton attention kernels on a GPU: the timing behind kernels/attention.py's CONFIGS.

The shipped CONFIGS were chosen without a timing (held to no spill by ptxas for sm_80 and sm_90). For
each (kernel, head dim) this times the call with each candidate Config patched in (bf16, B=1, N=8192;
H=32 at d=64, H=16 at d=128; forward and JVP time their own call, dkdv and dq the whole backward,
whose other kernels stay as shipped), checks every candidate's result against the shipped Config's (a
tile that computes something else shows as a mismatch, not as a speed) and prints, per kernel, the
time of each and the best. Rows are written to attention_triton_tiles.json after every candidate, so
a run cut by --time-budget keeps what it measured; the kernels run in the order of CANDIDATES.

    python -m benchmarks.attention_triton_tiles --out DIR [--time-budget S] [--kernels jvp,forward]
"""

import argparse
import json
import pathlib
import subprocess
import time

import torch

from fastcm.kernels import attention

from .common import time_ms

# (kernel, head dim) -> candidates as (block_m, block_n, num_warps, num_stages), the shipped one first; the
# worst-placed kernels of the first H200 run first (the d=128 JVP ran at 5.5x its floor
# in 32x32 tiles).
CANDIDATES = {
    ("jvp", 128): [(32, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    ("jvp", 64): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 32, 8, 2), (64, 128, 8, 2), (128, 64, 8, 3)],
    ("forward", 64): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("forward", 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 8, 2)],
    ("dkdv", 64): [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 3)],
    ("dkdv", 128): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
    ("dq", 64): [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 3)],
    ("dq", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
HEADS = {64: 32, 128: 16}
LENGTH = 8192
MISMATCH = 2e-2  # max |candidate - shipped| / max |shipped| beyond bf16 reassociation


def _inputs(head_dim: int):
    shape = (1, HEADS[head_dim], LENGTH, head_dim)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(7)]


def _call(kernel: str, tensors, scale: float):
    """The call that runs `kernel`, as a function returning the outputs to compare."""
    q, k, v, qt, kt, vt, grad = tensors
    if kernel == "forward":
        return lambda: attention.attention_forward(q, k, v, None, scale, False)
    if kernel == "jvp":
        return lambda: attention.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, False)
    out, lse = attention.attention_forward(q, k, v, None, scale, False)
    return lambda: attention.attention_backward(grad, q, k, v, out, lse, None, scale, False)


def _mismatch(got, want) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(got, want))


def sweep(kernels, deadline: float, write):
    rows = []
    for (kernel, head_dim), candidates in CANDIDATES.items():
        if kernel not in kernels:
            continue
        shipped = attention.CONFIGS[(kernel, head_dim)]
        tensors = _inputs(head_dim)
        call = _call(kernel, tensors, head_dim**-0.5)
        reference = [t.clone() for t in call()]
        for candidate in candidates:
            if time.monotonic() > deadline:
                print("time budget spent: the remaining candidates are not measured")
                return rows
            attention.CONFIGS[(kernel, head_dim)] = attention.Config(*candidate)
            row = {"kernel": kernel, "head_dim": head_dim, "config": list(candidate), "shipped": candidate == shipped}
            try:
                row["mismatch"] = _mismatch(call(), reference)
                row["ms"] = time_ms(call, torch.device("cuda"))
                row["status"] = "ok" if row["mismatch"] <= MISMATCH else "MISMATCH"
            except Exception as error:  # noqa: BLE001 - a tile the compiler or the device refuses is a finding
                row.update(ms=None, mismatch=None, status=f"error: {type(error).__name__}: {error}"[:200])
            finally:
                attention.CONFIGS[(kernel, head_dim)] = shipped
            rows.append(row)
            ms = f"{row['ms']:.3f} ms" if row["ms"] else "-"
            print(
                f"  {kernel:8s} d={head_dim:3d} {str(candidate):18s} {ms:>10s}  {row['status']}"
                f"{'  (shipped)' if row['shipped'] else ''}",
                flush=True,
            )
            write(rows)
        del tensors, reference
        torch.cuda.empty_cache()
    return rows


def best_per_kernel(rows):
    """(kernel, head dim) -> (best config, its ms, the shipped config's ms or None), over the rows that passed."""
    passed = [row for row in rows if row["status"] == "ok"]
    best = {}
    for key in dict.fromkeys((row["kernel"], row["head_dim"]) for row in passed):
        mine = [row for row in passed if (row["kernel"], row["head_dim"]) == key]
        fastest = min(mine, key=lambda row: row["ms"])
        shipped = next((row["ms"] for row in mine if row["shipped"]), None)
        best[key] = (tuple(fastest["config"]), fastest["ms"], shipped)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds; the rest is not measured")
    parser.add_argument("--kernels", default="jvp,forward,dkdv,dq")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_triton_tiles: needs a CUDA device")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": commit,
        "command": "python -m benchmarks.attention_triton_tiles "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }

    def write(rows):
        (out / "attention_triton_tiles.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    rows = sweep(args.kernels.split(","), time.monotonic() + args.time_budget, write)
    for (kernel, head_dim), (config, ms, shipped_ms) in best_per_kernel(rows).items():
        gain = f", {shipped_ms / ms:.2f}x the shipped config's speed" if shipped_ms else ""
        print(f"best {kernel} d={head_dim}: {config} at {ms:.3f} ms{gain}")


if __name__ == "__main__":
    main()
