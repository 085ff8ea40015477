"""Train and sample a small discrete-time consistency model (iCT) with fastcm.

Data: a ring of 8 Gaussians in 2-D. The consistency function is the CM parametrisation
f(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, ¼·ln σ) (fastcm.precondition, param="cm"), exact
at σ = σmin. Training is improved consistency training (Song & Dhariwal 2023): the discretisation
curriculum N(k), lognormal σ pairs on the Karras grid, the target f(x + σ_i·z, σ_i) without a
gradient (no EMA teacher), the pseudo-Huber distance weighted by 1/(σ_{i+1} − σ_i) — all fastcm
ops. Sampling is fastcm.sampling.sample_cm in 1 and 2 network calls.

    python examples/ict_toy.py --plot samples.png    # 10000 steps, ~1 minute on a 2-core CPU

With the defaults (seed 0, CPU) the mean distance of a sample to the nearest mode is 0.126 in
1 step and 0.071 in 2 steps, against 0.050 for the data itself and 0.33 for Gaussian noise.
"""

import torch
import toy
from toy import SIGMA_DATA

import fastcm
from fastcm.schedules import ct_loss_weight, ict_num_timesteps, ict_sample_sigmas

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
TWO_STEP_SIGMAS = (SIGMA_MAX, 0.8, SIGMA_MIN)


def consistency_function(net, x, sigma):
    """f(x, σ) = c_skip·x + c_out·F_θ(c_in·x, ¼·ln σ), with the boundary condition f(x, σmin) = x."""
    _, _, c_in = fastcm.precondition_scalings(sigma, param="cm", sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN)
    net_out = net(x * c_in.to(x.dtype).reshape(-1, 1), 0.25 * sigma.log())
    return fastcm.precondition(x, net_out, sigma, param="cm", sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN)


def train_step(net, optimizer, x0, step, total_steps, generator):
    num_timesteps = ict_num_timesteps(step, total_steps)
    sigma, sigma_next = ict_sample_sigmas(
        x0.shape[0], num_timesteps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, generator=generator, device=x0.device
    )
    z = torch.randn(x0.shape, generator=generator).to(x0.device)
    with torch.no_grad():
        target = consistency_function(net, x0 + sigma.reshape(-1, 1) * z, sigma)
    prediction = consistency_function(net, x0 + sigma_next.reshape(-1, 1) * z, sigma_next)
    loss = fastcm.pseudo_huber_loss(prediction, target, weight=ct_loss_weight(sigma, sigma_next))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def sample(net, num, steps, seed, device="cpu"):
    """1 step: f(σmax·z, σmax). 2 steps: re-noise to σ = 0.8 (fastcm.cm_step) and denoise again."""
    sigmas = (SIGMA_MAX, SIGMA_MIN) if steps == 1 else TWO_STEP_SIGMAS
    x = SIGMA_MAX * torch.randn(num, 2, generator=torch.Generator().manual_seed(seed)).to(device)
    return fastcm.sampling.sample_cm(
        lambda x, sigma: consistency_function(net, x, sigma), x, list(sigmas), sigma_min=SIGMA_MIN, seed=seed
    )


def main(argv=None):
    def sample_seeded(net, num, steps, generator, device):
        return sample(net, num, steps, int(torch.randint(2**31, (1,), generator=generator)), device)

    return toy.main(argv, __doc__.splitlines()[0], 10000, train_step, sample_seeded, "iCT loss")


if __name__ == "__main__":
    main()
