"""What the toy examples share: a ring of 8 Gaussians in 2-D, the distance-to-mode metric, a
small MLP with Fourier features of its time input, the command line (train, sample, evaluate)
and the scatter plot."""

import argparse
import math
import sys

import torch

MODES = 8
RADIUS = 0.7
MODE_STD = 0.04
SIGMA_DATA = 0.5  # ≈ the per-coordinate std of the ring: the σd of both examples
BATCH = 512  # training batch


def sample_data(batch, generator=None, device="cpu"):
    angle = 2 * math.pi * torch.randint(0, MODES, (batch,), generator=generator) / MODES
    centers = RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return (centers + MODE_STD * torch.randn(batch, 2, generator=generator)).to(device)


def distance_to_nearest_mode(points):
    angle = 2 * math.pi * torch.arange(MODES, dtype=points.dtype, device=points.device) / MODES
    centers = RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return torch.cdist(points, centers).min(dim=1).values


class Net(torch.nn.Module):
    """F_θ(x_in, t): an MLP on the input and Fourier features of the time (or noise) input t."""

    def __init__(self, width=128, frequencies=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(frequencies) * 4.0)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * frequencies, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x_in, t):
        phase = t.reshape(-1, 1) * self.freqs
        return self.mlp(torch.cat([x_in, torch.sin(phase), torch.cos(phase)], dim=1))


def evaluate(sample_sets, generator):
    """Mean distance to the nearest mode of each sample set, with Gaussian noise of the data's
    scale (σd·z) and the data itself as the two ends of the scale."""
    results = {
        "noise": distance_to_nearest_mode(SIGMA_DATA * torch.randn(4096, 2, generator=generator)).mean().item(),
        "data": distance_to_nearest_mode(sample_data(4096, generator)).mean().item(),
    }
    for name, points in sample_sets.items():
        results[name] = distance_to_nearest_mode(points.float().cpu()).mean().item()
    print("mean distance to the nearest mode: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def main(argv, description, default_steps, train_step, sample, loss_name, problem=None):
    """Trains problem.Net with Adam and a cosine learning-rate decay, calling
    train_step(net, optimizer, x0, step, total_steps, generator) -> loss, then draws 4096 samples
    in 1 and 2 network calls with sample(net, num, steps, generator, device) and scores them with
    problem.evaluate. problem: a module with Net, sample_data, evaluate, plot and BATCH (default: this
    one, the ring of Gaussians). Returns {name: score}."""
    problem = problem or sys.modules[__name__]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--batch", type=int, default=problem.BATCH)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default=None, help="write a scatter plot of data and samples to this PNG")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    net = problem.Net().to(args.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    for step in range(args.steps):
        loss = train_step(
            net, optimizer, problem.sample_data(args.batch, generator, args.device), step, args.steps, generator
        )
        scheduler.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:6d}  {loss_name} {loss:.4f}")

    sample_sets = {"data": problem.sample_data(4096, generator)}
    for steps in (1, 2):
        sample_sets[f"{steps}-step"] = sample(net, 4096, steps, generator, args.device)
    results = problem.evaluate({k: v for k, v in sample_sets.items() if k != "data"}, generator)
    if args.plot:
        problem.plot(sample_sets, results, args.plot)
    return results


def plot(sample_sets, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sample_sets), figsize=(4 * len(sample_sets), 4), sharex=True, sharey=True)
    for ax, (name, points) in zip(axes, sample_sets.items()):
        points = points.float().cpu()
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set_title(f"{name} (distance to mode {results[name]:.3f})", fontsize=9)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")
