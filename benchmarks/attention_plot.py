"""The figure of an attention GPU benchmark run: TFLOP/s against N, one panel per (H, d), one line
per implementation, from the attention_gpu.json that `python -m benchmarks.attention_gpu` wrote.
The title names the GPU, the commit, the floor's matmul rate and the command of the run.

    python -m benchmarks.attention_plot benchmarks/results/<run>/attention_gpu.json [--out figure.png]
"""

import argparse
import json
import pathlib


def plot(run: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["rows"] if r["status"] == "ok" and r.get("block") != "bias"]  # the bias block: in the table
    panels = sorted({(r["H"], r["d"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (heads, d) in zip(axes[0], panels):
        for impl in sorted({r["impl"] for r in rows if (r["H"], r["d"]) == (heads, d)}):
            points = sorted((r["N"], r["tflops"]) for r in rows if (r["H"], r["d"], r["impl"]) == (heads, d, impl))
            style = "-o" if impl.startswith("fastcm") and impl.count("_") == 1 else "--."
            ax.plot([n for n, _ in points], [t for _, t in points], style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (queries = keys)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"B=1, H={heads}, d={d}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    meta = run["meta"]
    fig.suptitle(
        f"{meta['gpu']}, torch {meta['torch']}, commit {meta['commit'][:10]}, "
        f"matmul {meta.get('matmul_tflops', float('nan')):.0f} TFLOP/s; FLOPs per head: JVP 12·N²·d, "
        f"forward 4·N²·d, backward 10·N²·d\n{meta['command']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=pathlib.Path, help="attention_gpu.json of one run")
    parser.add_argument("--out", type=pathlib.Path, help="PNG to write (default: beside the JSON)")
    args = parser.parse_args()
    out = args.out or args.json.with_suffix(".png")
    plot(json.loads(args.json.read_text()), out)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
