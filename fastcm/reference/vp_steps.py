"""Reference discrete-VP sampler steps in ᾱ space (x_t = √ᾱ·x0 + √(1 − ᾱ)·ε): LCM multistep, TCD and DDPM
ancestral with the exact posterior variance. The specification the fused steps are tested against; plain
PyTorch, differentiable, computing in the dtype of the inputs. The model output is read per prediction_type:
"epsilon" (ε), "sample" (x0) or "v_prediction" (v = √ᾱ·ε − √(1 − ᾱ)·x0)."""

import torch

from .steps import _param, standard_noise

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def predicted_x0_eps(x, model_output, alpha_bar, prediction_type):
    """(x0, ε) implied by the model output at ᾱ."""
    a, b = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    return a * x - b * model_output, a * model_output + b * x


def lcm_step(
    x,
    model_output,
    alpha_bar,
    alpha_bar_next,
    *,
    c_skip,
    c_out,
    prediction_type="epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """D = c_out·x0 + c_skip·x (the consistency boundary condition), x' = √ᾱ'·D + √(1 − ᾱ')·z."""
    op = "lcm_step"
    alpha_bar, alpha_bar_next = _param(op, "alpha_bar", alpha_bar, x), _param(op, "alpha_bar_next", alpha_bar_next, x)
    c_skip, c_out = _param(op, "c_skip", c_skip, x), _param(op, "c_out", c_out, x)
    x0, _ = predicted_x0_eps(x, model_output, alpha_bar, prediction_type)
    denoised = c_out * x0 + c_skip * x
    z = standard_noise(x, noise=noise, seed=seed, generator=generator, offset=offset)
    return torch.sqrt(alpha_bar_next) * denoised + torch.sqrt(1 - alpha_bar_next) * z


def tcd_step(
    x,
    model_output,
    alpha_bar,
    alpha_bar_s,
    alpha_bar_next,
    *,
    prediction_type="epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """x_s = √ᾱ_s·x0 + √(1 − ᾱ_s)·ε (the jump to s = ⌊(1 − γ)·t'⌋), x' = √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z."""
    op = "tcd_step"
    alpha_bar, alpha_bar_s = _param(op, "alpha_bar", alpha_bar, x), _param(op, "alpha_bar_s", alpha_bar_s, x)
    alpha_bar_next = _param(op, "alpha_bar_next", alpha_bar_next, x)
    x0, eps = predicted_x0_eps(x, model_output, alpha_bar, prediction_type)
    x_s = torch.sqrt(alpha_bar_s) * x0 + torch.sqrt(1 - alpha_bar_s) * eps
    ratio = alpha_bar_next / alpha_bar_s
    z = standard_noise(x, noise=noise, seed=seed, generator=generator, offset=offset)
    return torch.sqrt(ratio) * x_s + torch.sqrt(1 - ratio) * z


def ddpm_step(
    x,
    model_output,
    alpha_bar,
    alpha_bar_next,
    *,
    prediction_type="epsilon",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """Ancestral DDPM step with the exact posterior q(x' | x, x0): α = ᾱ/ᾱ', β = 1 − α,
    x' = (√ᾱ'·β/(1 − ᾱ))·x0 + (√α·(1 − ᾱ')/(1 − ᾱ))·x + √((1 − ᾱ')/(1 − ᾱ)·β)·z."""
    op = "ddpm_step"
    alpha_bar, alpha_bar_next = _param(op, "alpha_bar", alpha_bar, x), _param(op, "alpha_bar_next", alpha_bar_next, x)
    x0, _ = predicted_x0_eps(x, model_output, alpha_bar, prediction_type)
    alpha = alpha_bar / alpha_bar_next
    beta = 1 - alpha
    mean = (
        torch.sqrt(alpha_bar_next) * beta / (1 - alpha_bar) * x0
        + torch.sqrt(alpha) * (1 - alpha_bar_next) / (1 - alpha_bar) * x
    )
    z = standard_noise(x, noise=noise, seed=seed, generator=generator, offset=offset)
    return mean + torch.sqrt((1 - alpha_bar_next) / (1 - alpha_bar) * beta) * z


__all__ = ["lcm_step", "tcd_step", "ddpm_step", "predicted_x0_eps", "PREDICTION_TYPES"]
