"""Reference (specification) of fastcm.ema: the per-step decay β_t of every EMA profile, the update
of K shadows, and EDM2's post-hoc reconstruction from the profiles' inner products. Float64 throughout.

Update of profile k at step t (t = 1, 2, …: the number of updates including this one):
    shadow_k ← β_k(t)·shadow_k + (1 − β_k(t))·θ          (written as shadow + (1 − β)·(θ − shadow))

Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): β(t) = (1 − 1/t)^(γ+1). Its weights on the parameter θ_τ of step τ ≤ t telescope:
    Π_{s=τ+1..t} β(s) = Π ((s−1)/s)^(γ+1) = (τ/t)^(γ+1),  so  w_t(τ) = (τ/t)^(γ+1) − ((τ−1)/t)^(γ+1),
the discrete form of the profile p_t(τ) = (γ+1)·τ^γ / t^(γ+1) on [0, t]. Its relative width
σ_rel (standard deviation over t) is σ_rel² = (γ+1) / ((γ+2)²·(γ+3)).

Post-hoc EMA (EDM2, sec. 3): snapshots i of power EMAs (t_i, γ_i) are combined as Σ x_i·θ̂_i with
x the least-squares solution of A x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩, where for
two profiles (t_a, γ_a), (t_b, γ_b), with m = min(t_a, t_b):
    ⟨p_a, p_b⟩ = ∫_0^m (γ_a+1)(γ_b+1)·τ^(γ_a+γ_b) dτ / (t_a^(γ_a+1)·t_b^(γ_b+1))
               = (γ_a+1)(γ_b+1)·m^(γ_a+γ_b+1) / ((γ_a+γ_b+1)·t_a^(γ_a+1)·t_b^(γ_b+1)).
"""

import math
from typing import Sequence

import torch


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power profile of exponent γ > −1."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# σ_rel(γ) rises from 0 at γ = −1 to its maximum at γ+1 = (√5 − 1)/2 (where d/dγ of
# (γ+1)/((γ+2)²(γ+3)) vanishes: (γ+1)² + (γ+1) − 1 = 0) and falls to 0 as γ → ∞; EDM2 takes the root
# on the falling branch (the largest real root of the cubic), where longer averages have larger γ.
GAMMA_OF_MAX_SIGMA_REL = (math.sqrt(5.0) - 3.0) / 2.0
MAX_SIGMA_REL = math.sqrt(
    (GAMMA_OF_MAX_SIGMA_REL + 1) / ((GAMMA_OF_MAX_SIGMA_REL + 2) ** 2 * (GAMMA_OF_MAX_SIGMA_REL + 3))
)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The γ of relative width σ_rel ∈ (0, MAX_SIGMA_REL ≈ 0.3003]: the largest real root of
    σ_rel²·(γ+2)²(γ+3) − (γ+1) = 0, found by bisection in float64 on the branch where σ_rel(γ) falls."""
    low, high = GAMMA_OF_MAX_SIGMA_REL, 1.0
    while gamma_to_sigma_rel(high) > sigma_rel:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if gamma_to_sigma_rel(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def power_beta(step: int, gamma: float) -> float:
    """β(t) = (1 − 1/t)^(γ+1); 0 at t = 1 (the first update copies the parameters)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


def constant_beta(step: int, decay: float) -> float:
    return decay


def halflife_beta(step: int, batch: int, halflife_samples: float, rampup_ratio: float) -> float:
    """EDM's EMA (Karras et al. 2022, training code): half-life h = min(halflife_samples, rampup_ratio·n)
    samples, n = (t − 1)·batch the samples seen before this step; β = 0.5^(batch / h) (0 when h = 0)."""
    halflife = halflife_samples if rampup_ratio is None else min(halflife_samples, (step - 1) * batch * rampup_ratio)
    return 0.0 if halflife <= 0 else 0.5 ** (batch / halflife)


def ct_target_beta(step: int, total_steps: int, mu0: float, s0: int, s1: int) -> float:
    """The consistency-training target EMA of Song et al. 2023 (Consistency Models, CT):
    μ(k) = exp(s0·ln μ0 / N(k)), N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1, k = t − 1, K = total_steps.
    iCT (Song & Dhariwal 2023) drops the target EMA, which is μ0 = 0 here (β = 0)."""
    if mu0 == 0:
        return 0.0
    k = step - 1
    num_timesteps = math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    return math.exp(s0 * math.log(mu0) / num_timesteps)


def ema_update(
    shadows: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor], betas: Sequence[float]
) -> None:
    """In place, for every profile k and parameter j: shadows[k][j] ← shadows[k][j] + (1 − β_k)·(θ_j −
    shadows[k][j]), computed in float64 and rounded once to the shadow's dtype."""
    for shadow_set, beta in zip(shadows, betas):
        for shadow, param in zip(shadow_set, params):
            s64 = shadow.detach().to(torch.float64)
            shadow.copy_(s64 + (1.0 - beta) * (param.detach().to(torch.float64) - s64))


def power_ema_weights(step: int, gamma: float) -> torch.Tensor:
    """(step,) float64: the weight w_t(τ), τ = 1 … t, of θ_τ in the power EMA after t updates."""
    tau = torch.arange(1, step + 1, dtype=torch.float64)
    return (tau / step) ** (gamma + 1) - ((tau - 1) / step) ** (gamma + 1)


def power_profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """⟨p_a, p_b⟩ of two continuous power profiles (module docstring)."""
    m = min(t_a, t_b)
    exponent = gamma_a + gamma_b + 1
    # In logs: t^(γ+1) overflows float64 for long runs and large γ.
    log_value = (
        math.log(gamma_a + 1)
        + math.log(gamma_b + 1)
        + exponent * math.log(m)
        - math.log(exponent)
        - (gamma_a + 1) * math.log(t_a)
        - (gamma_b + 1) * math.log(t_b)
    )
    return math.exp(log_value)


def posthoc_coefficients(
    snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float, target_gamma: float
) -> torch.Tensor:
    """(S,) float64 coefficients x of the snapshots whose combination Σ x_i·θ̂_i best approximates the
    power EMA (target_step, target_gamma), in the least-squares sense over profiles (EDM2, sec. 3)."""
    profiles = list(zip(snapshot_steps, snapshot_gammas))
    gram = torch.tensor(
        [[power_profile_inner_product(*a, *b) for b in profiles] for a in profiles], dtype=torch.float64
    )
    rhs = torch.tensor(
        [power_profile_inner_product(*a, target_step, target_gamma) for a in profiles], dtype=torch.float64
    )
    return torch.linalg.lstsq(gram, rhs[:, None], driver="gelsd").solution[:, 0]


def posthoc_reconstruct(
    snapshots: Sequence[Sequence[torch.Tensor]],
    snapshot_steps: Sequence[float],
    snapshot_gammas: Sequence[float],
    target_step: float,
    target_gamma: float,
):
    """The reconstructed parameters: Σ_i x_i·snapshots[i][j] for every parameter j, in float64."""
    coefficients = posthoc_coefficients(snapshot_steps, snapshot_gammas, target_step, target_gamma)
    return [
        sum(c.item() * snapshot[j].to(torch.float64) for c, snapshot in zip(coefficients, snapshots))
        for j in range(len(snapshots[0]))
    ]
