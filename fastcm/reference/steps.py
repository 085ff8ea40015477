"""Reference sampler steps (EDM Euler/Heun, DPM-Solver++(2M), DDIM, CM and TrigFlow re-noising,
classifier-free guidance): the specification the fused kernels are tested against.

Plain PyTorch, differentiable by autograd and torch.func.jvp, written as docs/DESIGN.md states the
formulas. Computes in the dtype of the inputs (call with float64 tensors for the float64
reference). Per-sample parameters: float, 0-d tensor, (B,) or (B, 1, ..., 1).

Noise for the stochastic steps: `noise=` (a tensor like x, z ~ N(0, I)) is used as given;
otherwise z = torch.randn from a generator seeded with (seed, offset) mixed into one 63-bit
seed. That stream is deterministic but differs from the Triton kernels' in-kernel Philox stream.
"""

import torch

from .._params import per_sample, view_per_sample

_MASK63 = (1 << 63) - 1


def _param(op, name, value, x):
    return view_per_sample(per_sample(op, name, value, x, dtype=x.dtype), x)


def stream_seed(seed: int, offset: int) -> int:
    """One torch.Generator seed for the reference noise of call (seed, offset)."""
    return (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 1) & _MASK63


def draw_seed(generator=None) -> int:
    """A fresh 62-bit seed from `generator` (default: torch's global CPU generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 1 << 62, (), generator=generator, device=device))


def standard_noise(like, *, noise=None, seed=None, generator=None, offset=0):
    """z ~ N(0, I) shaped like `like`: `noise` if given, else drawn from (seed, offset)."""
    if noise is not None:
        return noise
    if seed is None:
        seed = draw_seed(generator)
    stream = torch.Generator(device=like.device)
    stream.manual_seed(stream_seed(seed, offset))
    return torch.randn(like.shape, generator=stream, device=like.device, dtype=like.dtype)


def euler_step(x, denoised, sigma, sigma_next):
    """d = (x − D)/σ; x' = x + (σ'−σ)·d."""
    sigma = _param("euler_step", "sigma", sigma, x)
    sigma_next = _param("euler_step", "sigma_next", sigma_next, x)
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(x, denoised, sigma, sigma_next, *, denoised_next=None):
    """x̃ = x + (σ'−σ)·d; d̃ = (x̃ − D(x̃;σ'))/σ'; x' = x + (σ'−σ)·(d + d̃)/2; Euler (x' = x̃) where σ' = 0.
    `denoised_next` = D(x̃; σ'); it may be None only where every σ' is 0."""
    sigma = _param("heun_step", "sigma", sigma, x)
    sigma_next = _param("heun_step", "sigma_next", sigma_next, x)
    d = (x - denoised) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if denoised_next is None:
        return x_euler
    final = sigma_next == 0
    safe_sigma_next = torch.where(final, torch.ones_like(sigma_next), sigma_next)
    d_next = (x_euler - denoised_next) / safe_sigma_next
    x_heun = x + (sigma_next - sigma) * (d + d_next) / 2
    return torch.where(final, x_euler, x_heun)


def dpmpp_2m_step(x, denoised, sigma, sigma_next, *, old_denoised=None, sigma_prev=None):
    """λ = −log σ, h = λ' − λ. First step (old_denoised None): x' = (σ'/σ)·x − expm1(−h)·D.
    Later steps: r = h_prev/h, h_prev = λ − λ_prev, D̄ = (1 + 1/(2r))·D − (1/(2r))·D_prev,
    x' = (σ'/σ)·x − expm1(−h)·D̄. Where σ' = 0 the first-order update is used (as k-diffusion)."""
    sigma = _param("dpmpp_2m_step", "sigma", sigma, x)
    sigma_next = _param("dpmpp_2m_step", "sigma_next", sigma_next, x)
    final = sigma_next == 0
    safe_sigma_next = torch.where(final, sigma, sigma_next)
    lam, lam_next = -torch.log(sigma), -torch.log(safe_sigma_next)
    h = lam_next - lam
    ratio = sigma_next / sigma
    em = torch.where(final, torch.full_like(h, -1.0), torch.expm1(-h))
    if old_denoised is None:
        return ratio * x - em * denoised
    sigma_prev = _param("dpmpp_2m_step", "sigma_prev", sigma_prev, x)
    h_prev = lam - (-torch.log(sigma_prev))
    half_inv_r = torch.where(final, torch.zeros_like(h), h / (2 * h_prev))  # 1/(2r)
    blended = (1 + half_inv_r) * denoised - half_inv_r * old_denoised
    return ratio * x - em * blended


def ddim_step(x, eps, alpha_bar, alpha_bar_next, *, eta=0.0, noise=None, seed=None, generator=None, offset=0):
    """x0 = (x − √(1−ᾱ)·ε)/√ᾱ; x' = √ᾱ'·x0 + √(1−ᾱ'−s²)·ε + s·z,
    s = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')."""
    alpha_bar = _param("ddim_step", "alpha_bar", alpha_bar, x)
    alpha_bar_next = _param("ddim_step", "alpha_bar_next", alpha_bar_next, x)
    deterministic = not isinstance(eta, torch.Tensor) and eta == 0
    eta = _param("ddim_step", "eta", eta, x)
    x0 = (x - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)
    s = eta * torch.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_next)
    out = torch.sqrt(alpha_bar_next) * x0 + torch.sqrt(1 - alpha_bar_next - s**2) * eps
    if deterministic:
        return out
    return out + s * standard_noise(x, noise=noise, seed=seed, generator=generator, offset=offset)


def cm_step(denoised, sigma_next, *, sigma_min=0.002, noise=None, seed=None, generator=None, offset=0):
    """Consistency-model multistep re-noising: x' = D + √(σ'² − σmin²)·z."""
    sigma_next = _param("cm_step", "sigma_next", sigma_next, denoised)
    z = standard_noise(denoised, noise=noise, seed=seed, generator=generator, offset=offset)
    return denoised + torch.sqrt(sigma_next**2 - sigma_min**2) * z


def trigflow_step(denoised, t_next, *, sigma_data=0.5, noise=None, seed=None, generator=None, offset=0):
    """TrigFlow multistep re-noising: x' = cos(t')·D + sin(t')·σd·z."""
    t_next = _param("trigflow_step", "t_next", t_next, denoised)
    z = standard_noise(denoised, noise=noise, seed=seed, generator=generator, offset=offset)
    return torch.cos(t_next) * denoised + torch.sin(t_next) * sigma_data * z


def cfg(eps_cond, eps_uncond, guidance_scale, *, guidance_rescale=0.0):
    """ε̃ = ε_u + w·(ε_c − ε_u); with rescale φ: ε̃ ← φ·ε̃·std(ε_c)/std(ε̃) + (1−φ)·ε̃
    (std per sample over all non-batch dims, unbiased, as diffusers' rescale_noise_cfg)."""
    w = _param("cfg", "guidance_scale", guidance_scale, eps_cond)
    guided = eps_uncond + w * (eps_cond - eps_uncond)
    if not isinstance(guidance_rescale, torch.Tensor) and guidance_rescale == 0:
        return guided
    phi = _param("cfg", "guidance_rescale", guidance_rescale, eps_cond)
    dims = tuple(range(1, eps_cond.dim()))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return phi * guided * (std_cond / std_guided) + (1 - phi) * guided


__all__ = [
    "euler_step",
    "heun_step",
    "dpmpp_2m_step",
    "ddim_step",
    "cm_step",
    "trigflow_step",
    "cfg",
    "standard_noise",
    "stream_seed",
    "draw_seed",
]
