"""Train and sample a small continuous-time consistency model (sCM, TrigFlow) with fastcm.

Data: a ring of 8 Gaussians in 2-D. The network F_θ(x/σd, t) is a small MLP; the consistency
function is f(x_t, t) = cos(t)·x_t − sin(t)·σd·F_θ (fastcm.precondition, param="trigflow").
Training is sCM consistency training (arXiv 2410.11081, Alg. 1): the tangent dF⁻/dt comes from
torch.func.jvp under no_grad, and fastcm.scm_loss fuses the tangent normalisation and the loss.
Sampling takes 1 or 2 network calls (fastcm.trigflow_step re-noises between them).

    python examples/scm_toy.py --plot samples.png    # 4000 steps, ~2 minutes on a 2-core CPU

With the defaults (seed 0, CPU) the mean distance of a sample to the nearest mode is 0.087 in
1 step and 0.079 in 2 steps, against 0.051 for the data itself and 0.33 for Gaussian noise.
"""

import argparse
import math

import torch

import fastcm
from fastcm.schedules import scm_sample_t, tangent_warmup
from toy import SIGMA_DATA, Net, evaluate, plot, sample_data



def consistency_function(net, x_t, t):
    """f(x_t, t) = cos t·x_t − sin t·σd·F_θ(x_t/σd, t)."""
    return fastcm.precondition(x_t, net(x_t / SIGMA_DATA, t), t, param="trigflow", sigma_data=SIGMA_DATA)


def train_step(net, optimizer, x0, step, warmup_steps, generator):
    batch = x0.shape[0]
    t = scm_sample_t(batch, sigma_data=SIGMA_DATA, generator=generator, device=x0.device)
    z = SIGMA_DATA * torch.randn(x0.shape, generator=generator).to(x0.device)
    cos_t, sin_t = torch.cos(t).reshape(-1, 1), torch.sin(t).reshape(-1, 1)
    x_t = cos_t * x0 + sin_t * z
    dx_dt = cos_t * z - sin_t * x0
    with torch.no_grad():  # the sCM pattern: tangent without a graph, then a separate forward
        F_minus, F_jvp = torch.func.jvp(
            net, (x_t / SIGMA_DATA, t), (cos_t * sin_t * dx_dt / SIGMA_DATA, torch.cos(t) * torch.sin(t)))
    F = net(x_t / SIGMA_DATA, t)
    loss = fastcm.scm_loss(F, F_minus, F_jvp, x_t, dx_dt, t, sigma_data=SIGMA_DATA,
                           r=tangent_warmup(step, warmup_steps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def sample(net, num, steps, generator, device="cpu"):
    """1 step: f(σd·z, π/2). 2 steps: re-noise to an intermediate time t = 1.1 and denoise again."""
    times = [math.pi / 2, 1.1][:steps]
    x = SIGMA_DATA * torch.randn(num, 2, generator=generator).to(device)
    for i, t in enumerate(times):
        denoised = consistency_function(net, x, torch.full((num,), t, device=device))
        if i + 1 == len(times):
            return denoised
        noise = torch.randn(num, 2, generator=generator).to(device)
        x = fastcm.trigflow_step(denoised, times[i + 1], sigma_data=SIGMA_DATA, noise=noise)
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default=None, help="write a scatter plot of data and samples to this PNG")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    net = Net().to(args.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    for step in range(args.steps):
        loss = train_step(net, optimizer, sample_data(args.batch, generator, args.device), step,
                          warmup_steps=max(1, args.steps // 5), generator=generator)
        scheduler.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:6d}  sCM loss {loss:.4f}")

    sample_sets = {"data": sample_data(4096, generator)}
    for steps in (1, 2):
        sample_sets[f"{steps}-step"] = sample(net, 4096, steps, generator, args.device)
    results = evaluate({k: v for k, v in sample_sets.items() if k != "data"}, generator)
    if args.plot:
        plot(sample_sets, results, args.plot)
    return results

if __name__ == "__main__":
    main()
