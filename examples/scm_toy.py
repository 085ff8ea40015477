"""Train and sample a small continuous-time consistency model (sCM, TrigFlow) with fastcm.

Data: a ring of 8 Gaussians in 2-D. The network F_θ(x/σd, t) is a small MLP; the consistency
function is f(x_t, t) = cos(t)·x_t − sin(t)·σd·F_θ (fastcm.precondition, param="trigflow").
Training is sCM consistency training (arXiv 2410.11081, Alg. 1): the tangent dF⁻/dt comes from
torch.func.jvp under no_grad, and fastcm.scm_loss fuses the tangent normalisation and the loss.
Sampling takes 1 or 2 network calls (fastcm.trigflow_step re-noises between them).

    python examples/scm_toy.py --plot samples.png    # 4000 steps, ~2 minutes on a 2-core CPU

With the defaults (seed 0, CPU) the mean distance of a sample to the nearest mode is 0.087 in
1 step and 0.079 in 2 steps, against 0.050 for the data itself and 0.33 for Gaussian noise.
"""

import math

import torch
import toy
from toy import SIGMA_DATA

import fastcm
from fastcm.schedules import scm_sample_t, tangent_warmup


def consistency_function(net, x_t, t):
    """f(x_t, t) = cos t·x_t − sin t·σd·F_θ(x_t/σd, t)."""
    return fastcm.precondition(x_t, net(x_t / SIGMA_DATA, t), t, param="trigflow", sigma_data=SIGMA_DATA)


def train_step(net, optimizer, x0, step, warmup_steps, generator):
    batch = x0.shape[0]
    t = scm_sample_t(batch, sigma_data=SIGMA_DATA, generator=generator, device=x0.device)
    z = SIGMA_DATA * torch.randn(x0.shape, generator=generator).to(x0.device)
    per_sample = (-1,) + (1,) * (x0.dim() - 1)
    cos_t, sin_t = torch.cos(t).reshape(per_sample), torch.sin(t).reshape(per_sample)
    x_t = cos_t * x0 + sin_t * z
    dx_dt = cos_t * z - sin_t * x0
    with torch.no_grad():  # the sCM pattern: tangent without a graph, then a separate forward
        F_minus, F_jvp = torch.func.jvp(
            net, (x_t / SIGMA_DATA, t), (cos_t * sin_t * dx_dt / SIGMA_DATA, torch.cos(t) * torch.sin(t))
        )
    F = net(x_t / SIGMA_DATA, t)
    loss = fastcm.scm_loss(
        F, F_minus, F_jvp, x_t, dx_dt, t, sigma_data=SIGMA_DATA, r=tangent_warmup(step, warmup_steps)
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def sample(net, num, steps, generator, device="cpu", shape=(2,)):
    """num samples of `shape`. 1 step: f(σd·z, π/2). 2 steps: re-noise to an intermediate time
    t = 1.1 and denoise again."""
    times = [math.pi / 2, 1.1][:steps]
    x = SIGMA_DATA * torch.randn(num, *shape, generator=generator).to(device)
    for i, t in enumerate(times):
        denoised = consistency_function(net, x, torch.full((num,), t, device=device))
        if i + 1 == len(times):
            return denoised
        noise = torch.randn(num, *shape, generator=generator).to(device)
        x = fastcm.trigflow_step(denoised, times[i + 1], sigma_data=SIGMA_DATA, noise=noise)
    return x


def main(argv=None):
    def step_with_warmup(net, optimizer, x0, step, total_steps, generator):
        return train_step(net, optimizer, x0, step, max(1, total_steps // 5), generator)

    return toy.main(argv, __doc__.splitlines()[0], 4000, step_with_warmup, sample, "sCM loss")


if __name__ == "__main__":
    main()
