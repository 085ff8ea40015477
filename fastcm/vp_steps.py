"""Discrete-VP sampler steps in ᾱ space, each one fused pass over (x, model output, noise) on fastcm.steps'
kernel: LCM multistep (Luo et al. 2023), TCD (Zheng et al. 2024) and DDPM ancestral with the exact posterior
variance (Ho et al. 2020). x_t = √ᾱ·x0 + √(1 − ᾱ)·ε; the model output is ε, x0 or v per prediction_type
("epsilon", "sample", "v_prediction"). ᾱ: cumulative alphas (diffusers' alphas_cumprod entries).

Noise: `noise=` is used as given (pass diffusers' randn_tensor draw to reproduce a diffusers run); otherwise
in-kernel Philox from (seed | generator | torch's global generator, offset), as fastcm.steps documents (not a
torch.Generator stream). Gradients and tangents flow to x, model_output, noise and tensor parameters; `out=`
writes in place (no-grad use only).
"""

import torch

from . import steps as _steps
from ._backend import select_backend
from .reference import vp_steps as reference
from .reference.vp_steps import PREDICTION_TYPES


def _check(op, x, model_output, noise, seed, generator, offset, out, prediction_type, **levels):
    _steps._check_tensors(op, "x", x, model_output=model_output, noise=noise)
    _steps._check_noise_args(op, seed, generator, offset)
    _steps._check_out(op, out, "x", x)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"fastcm.{op}: prediction_type={prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}"
        )
    for name, value in levels.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 < value <= 1:
            raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected a cumulative alpha in (0, 1]")


def _x0_eps(m, alpha_bar, prediction_type):
    """(x0, ε) as (coefficient of x, coefficient of the model output) pairs."""
    a, b = m.sqrt(alpha_bar), m.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (1 / a, -b / a), (0.0 * a, 1.0 + 0.0 * a)
    if prediction_type == "sample":
        return (0.0 * a, 1.0 + 0.0 * a), (1 / b, -a / b)
    return (a, -b), (b, a)


def _noisy(value) -> bool:
    return isinstance(value, torch.Tensor) or value != 0


def lcm_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar,
    alpha_bar_next,
    *,
    c_skip,
    c_out,
    prediction_type: str = "epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
    out=None,
) -> torch.Tensor:
    """LCM multistep update: the consistency boundary condition D = c_out·x0 + c_skip·x, then the re-noise
    x' = √ᾱ'·D + √(1 − ᾱ')·z to the next level (ᾱ' = 1: x' = D, no noise; LCM's last step).

    x, model_output: (B, ...) same shape/dtype/device, computed in float32 (float64 for float64).
    alpha_bar, alpha_bar_next ∈ (0, 1], c_skip, c_out (diffusers' LCM boundary scalings at t): float, 0-d, (B,)
    or (B,1,..,1).
    """
    op = "lcm_step"
    _check(
        op,
        x,
        model_output,
        noise,
        seed,
        generator,
        offset,
        out,
        prediction_type,
        alpha_bar=alpha_bar,
        alpha_bar_next=alpha_bar_next,
    )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.lcm_step(
                x,
                model_output,
                alpha_bar,
                alpha_bar_next,
                c_skip=c_skip,
                c_out=c_out,
                prediction_type=prediction_type,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    ab, ab_next, skip, gain = _steps._params(
        op, x, alpha_bar=alpha_bar, alpha_bar_next=alpha_bar_next, c_skip=c_skip, c_out=c_out
    )
    m = _steps._lib(ab, ab_next, skip, gain)
    (x0_x, x0_m), _ = _x0_eps(m, ab, prediction_type)
    scale = m.sqrt(ab_next)
    noise_scale = m.sqrt(1 - ab_next)
    return _steps._run(
        op,
        x,
        (x, model_output, None),
        (scale * (gain * x0_x + skip), scale * gain * x0_m, 0.0, noise_scale),
        out,
        stochastic=_noisy(noise_scale),
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def tcd_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar,
    alpha_bar_s,
    alpha_bar_next,
    *,
    prediction_type: str = "epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
    out=None,
) -> torch.Tensor:
    """TCD update: the jump to the intermediate level s = ⌊(1 − γ)·t'⌋, x_s = √ᾱ_s·x0 + √(1 − ᾱ_s)·ε, then the
    γ-stochastic re-noise x' = √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z (γ = 0: ᾱ_s = ᾱ', deterministic).
    alpha_bar ≤ alpha_bar_next ≤ alpha_bar_s. Shapes and dtypes as lcm_step."""
    op = "tcd_step"
    _check(
        op,
        x,
        model_output,
        noise,
        seed,
        generator,
        offset,
        out,
        prediction_type,
        alpha_bar=alpha_bar,
        alpha_bar_s=alpha_bar_s,
        alpha_bar_next=alpha_bar_next,
    )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.tcd_step(
                x,
                model_output,
                alpha_bar,
                alpha_bar_s,
                alpha_bar_next,
                prediction_type=prediction_type,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    ab, ab_s, ab_next = _steps._params(
        op, x, alpha_bar=alpha_bar, alpha_bar_s=alpha_bar_s, alpha_bar_next=alpha_bar_next
    )
    m = _steps._lib(ab, ab_s, ab_next)
    (x0_x, x0_m), (eps_x, eps_m) = _x0_eps(m, ab, prediction_type)
    a_s, b_s = m.sqrt(ab_s), m.sqrt(1 - ab_s)
    ratio = ab_next / ab_s
    scale = m.sqrt(ratio)
    noise_scale = m.sqrt(1 - ratio)
    return _steps._run(
        op,
        x,
        (x, model_output, None),
        (scale * (a_s * x0_x + b_s * eps_x), scale * (a_s * x0_m + b_s * eps_m), 0.0, noise_scale),
        out,
        stochastic=_noisy(noise_scale),
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def ddpm_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar,
    alpha_bar_next,
    *,
    prediction_type: str = "epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
    out=None,
) -> torch.Tensor:
    """DDPM ancestral step with the exact posterior q(x' | x, x0) (diffusers' DDPMScheduler, "fixed_small"
    variance, no clipping): α = ᾱ/ᾱ', β = 1 − α,
    x' = (√ᾱ'·β/(1 − ᾱ))·x0 + (√α·(1 − ᾱ')/(1 − ᾱ))·x + √((1 − ᾱ')/(1 − ᾱ)·β)·z. alpha_bar < alpha_bar_next.
    Shapes and dtypes as lcm_step."""
    op = "ddpm_step"
    _check(
        op,
        x,
        model_output,
        noise,
        seed,
        generator,
        offset,
        out,
        prediction_type,
        alpha_bar=alpha_bar,
        alpha_bar_next=alpha_bar_next,
    )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.ddpm_step(
                x,
                model_output,
                alpha_bar,
                alpha_bar_next,
                prediction_type=prediction_type,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    ab, ab_next = _steps._params(op, x, alpha_bar=alpha_bar, alpha_bar_next=alpha_bar_next)
    m = _steps._lib(ab, ab_next)
    (x0_x, x0_m), _ = _x0_eps(m, ab, prediction_type)
    alpha = ab / ab_next
    beta = 1 - alpha
    c_x0 = m.sqrt(ab_next) * beta / (1 - ab)
    c_x = m.sqrt(alpha) * (1 - ab_next) / (1 - ab)
    noise_scale = m.sqrt((1 - ab_next) / (1 - ab) * beta)
    return _steps._run(
        op,
        x,
        (x, model_output, None),
        (c_x0 * x0_x + c_x, c_x0 * x0_m, 0.0, noise_scale),
        out,
        stochastic=_noisy(noise_scale),
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


__all__ = ["lcm_step", "tcd_step", "ddpm_step", "PREDICTION_TYPES"]
