"""Training-side schedules for consistency models: the Karras σ grid, the iCT discretisation
curriculum and lognormal σ sampling, the iCT/ECT loss weighting, sCM time sampling and the sCM
tangent warm-up. Plain PyTorch and Python: these run once per step on a handful of numbers.
"""

import math

import torch

from ._checks import check_positive, compute_dtype


def karras_sigmas(
    num, *, sigma_min=0.002, sigma_max=80.0, rho=7.0, append_zero=False, device=None, dtype=torch.float64
):
    """The Karras/EDM σ grid, descending from σmax to σmin, shape (num,) (num + 1 with append_zero,
    the final 0 a sampling loop ends at): σ_i = (σmax^{1/ρ} + i/(num−1)·(σmin^{1/ρ} − σmax^{1/ρ}))^ρ."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"fastcm.karras_sigmas: num={num!r} is not supported; expected an int >= 1")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive("karras_sigmas", name, value)
    if not sigma_min <= sigma_max:
        raise ValueError(f"fastcm.karras_sigmas: sigma_min={sigma_min} must not exceed sigma_max={sigma_max}")
    ramp = torch.linspace(0.0, 1.0, num, dtype=torch.float64) if num > 1 else torch.zeros(1, dtype=torch.float64)
    max_root, min_root = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_root + ramp * (min_root - max_root)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def ict_num_timesteps(step, total_steps, *, s0=10, s1=1280):
    """iCT's exponential discretisation curriculum (Song & Dhariwal 2023):
    N(k) = min(s0·2^⌊k/K'⌋, s1) + 1,  K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, k = step, K = total_steps."""
    for name, value in (("step", step), ("total_steps", total_steps), ("s0", s0), ("s1", s1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "step" else 1):
            raise ValueError(
                f"fastcm.ict_num_timesteps: {name}={value!r} is not supported; expected an int "
                f"{'>= 0' if name == 'step' else '>= 1'}"
            )
    if s1 < s0:
        raise ValueError(f"fastcm.ict_num_timesteps: s1={s1} must be >= s0={s0}")
    stage_length = max(1, total_steps // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (step // stage_length), s1) + 1


def ict_sample_sigmas(
    batch,
    num_timesteps,
    *,
    p_mean=-1.1,
    p_std=2.0,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    generator=None,
    device=None,
    dtype=torch.float32,
):
    """iCT lognormal σ sampling on the Karras grid σ_1 < … < σ_N (N = num_timesteps): draws
    i ∈ {1 … N−1} with p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std))
    and returns (sigma_lower, sigma_upper) = (σ_i, σ_{i+1}), each of shape (batch,)."""
    check_positive("ict_sample_sigmas", "p_std", p_std)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"fastcm.ict_sample_sigmas: batch={batch!r} is not supported; expected an int >= 1")
    sigmas = karras_sigmas(num_timesteps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).flip(0)
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    probabilities = cdf[1:] - cdf[:-1]
    index = torch.multinomial(probabilities, batch, replacement=True, generator=generator)
    return sigmas[index].to(device=device, dtype=dtype), sigmas[index + 1].to(device=device, dtype=dtype)


def ct_loss_weight(sigma_lower, sigma_upper):
    """iCT/ECT loss weighting λ = 1/(σ_upper − σ_lower) (iCT: 1/(σ_{i+1} − σ_i); ECT: 1/(t − r)),
    elementwise on tensors or floats."""
    return 1.0 / (sigma_upper - sigma_lower)


def scm_sample_t(batch, *, sigma_data=0.5, p_mean=-1.0, p_std=1.4, generator=None, device=None, dtype=torch.float32):
    """sCM training times t = arctan(e^τ/σd), τ ~ N(P_mean, P_std²), shape (batch,), t ∈ (0, π/2).
    Drawn in float64 from a CPU generator and copied to `device`; trigflow_sample_t draws the same
    distribution on the device itself."""
    check_positive("scm_sample_t", "sigma_data", sigma_data)
    check_positive("scm_sample_t", "p_std", p_std)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"fastcm.scm_sample_t: batch={batch!r} is not supported; expected an int >= 1")
    tau = p_mean + p_std * torch.randn(batch, generator=generator, dtype=torch.float64)
    return torch.atan(torch.exp(tau) / sigma_data).to(device=device, dtype=dtype)


def tangent_warmup(step, warmup_steps=10000):
    """sCM tangent warm-up r(step) = min(1, step / warmup_steps), the r of fastcm.scm_loss."""
    check_positive("tangent_warmup", "warmup_steps", warmup_steps)
    if step < 0:
        raise ValueError(f"fastcm.tangent_warmup: step={step!r} is not supported; expected step >= 0")
    return min(1.0, step / warmup_steps)


def exponential_sigmas(num, *, sigma_min, sigma_max, append_zero=True, device=None, dtype=torch.float64):
    """σ grid uniform in log σ from σmax to σmin, shape (num,) (+ a final 0 with append_zero), as
    k-diffusion's get_sigmas_exponential."""
    return polyexponential_sigmas(
        num, sigma_min=sigma_min, sigma_max=sigma_max, rho=1.0, append_zero=append_zero, device=device, dtype=dtype
    )


def polyexponential_sigmas(num, *, sigma_min, sigma_max, rho=1.0, append_zero=True, device=None, dtype=torch.float64):
    """σ_i = exp(r_i^ρ·(log σmax − log σmin) + log σmin), r_i = 1 − i/(num − 1): polynomial in log σ (ρ = 1:
    exponential), as k-diffusion's get_sigmas_polyexponential; (num,) (+ a final 0 with append_zero)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"fastcm.polyexponential_sigmas: num={num!r} is not supported; expected an int >= 2")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive("polyexponential_sigmas", name, value)
    ramp = torch.linspace(1.0, 0.0, num, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def flow_shift(t, shift):
    """The time shift of SD3-style flow-matching schedules, t ↦ s·t/(1 + (s − 1)·t) (s > 1 spends more steps
    at high noise); elementwise on floats or tensors."""
    check_positive("flow_shift", "shift", shift)
    return shift * t / (1 + (shift - 1) * t)


def flow_times(num_steps, *, shift=1.0, device=None, dtype=torch.float64):
    """Flow-matching time grid for fastcm.sampling.sample_flow_euler / sample_flow_heun: t_i = flow_shift(1 − i/n,
    shift) for i = 0 … n, from 1 (noise) to 0 (data), shape (num_steps + 1,)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"fastcm.flow_times: num_steps={num_steps!r} is not supported; expected an int >= 1")
    return flow_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).to(
        device=device, dtype=dtype
    )


VP_BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def vp_betas(
    num_train_timesteps=1000,
    *,
    schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    max_beta=0.999,
    zero_terminal_snr=False,
    dtype=torch.float64,
):
    """The β_1 … β_T of a discrete VP (DDPM) process, shape (T,), as diffusers builds them:
    "linear": linspace(β_start, β_end); "scaled_linear" (Stable Diffusion): linspace(√β_start, √β_end)²;
    "cosine" (Nichol & Dhariwal 2021, diffusers' squaredcos_cap_v2): β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta),
    ᾱ(t) = cos²((t + 0.008)/1.008 · π/2). zero_terminal_snr: rescale_zero_terminal_snr on the result."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(
            f"fastcm.vp_betas: num_train_timesteps={num_train_timesteps!r} is not supported; expected an int >= 2"
        )
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif schedule == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = num_train_timesteps
        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
            dtype=torch.float64,
        )
    else:
        raise ValueError(
            f"fastcm.vp_betas: schedule={schedule!r} is not supported; expected one of {VP_BETA_SCHEDULES}"
        )
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.to(dtype)


def rescale_zero_terminal_snr(betas):
    """β rescaled so that the last step is pure noise (Lin et al. 2024, Common Diffusion Noise Schedules and Sample
    Steps are Flawed, Algorithm 1): √ᾱ is shifted so √ᾱ_T = 0 and scaled so √ᾱ_1 is unchanged. (T,) → (T,)."""
    root = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def vp_sigmas(alphas_cumprod):
    """The EDM noise levels of a VP process, σ = √((1 − ᾱ)/ᾱ), elementwise (k-diffusion / diffusers' Euler
    schedulers use these for ε-prediction models)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# ---- time samplers on the device -----------------------------------------------------------------
# Each draws B normals (or uniforms) with one torch call on `device` and maps them with a few
# elementwise torch ops: no kernel is worth its launch for B numbers, and nothing waits on the host.
# `seed` makes a fresh generator on the device (deterministic); `generator` continues a stream.


def _normals(op, batch, generator, seed, device, dtype, count=1):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"fastcm.{op}: batch={batch!r} is not supported; expected an int >= 1")
    if seed is not None and generator is not None:
        raise ValueError(f"fastcm.{op}: pass seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"fastcm.{op}: seed={seed!r} is not supported; expected an int >= 0")
        generator = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    work = compute_dtype(dtype)
    return torch.randn((count, batch), generator=generator, device=device, dtype=work)


def resolution_shift(num_tokens, *, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15):
    """The resolution-dependent shift of FLUX: e^μ with μ linear in the token count, from base_shift at
    base_tokens to max_shift at max_tokens (SD3 uses a fixed shift, e.g. 3.0 at 1024²)."""
    for name, value in (("num_tokens", num_tokens), ("base_tokens", base_tokens), ("max_tokens", max_tokens)):
        check_positive("resolution_shift", name, value)
    if not max_tokens > base_tokens:
        raise ValueError(f"fastcm.resolution_shift: max_tokens={max_tokens} must exceed base_tokens={base_tokens}")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (num_tokens - base_tokens))


def logit_normal_t(batch, *, mean=0.0, std=1.0, shift=1.0, generator=None, seed=None, device=None, dtype=torch.float32):
    """Flow-matching times t = flow_shift(sigmoid(mean + std·n), shift), n ~ N(0, 1) (SD3's logit-normal;
    shift = 1 is the plain logit-normal). Shape (batch,), t ∈ (0, 1)."""
    check_positive("logit_normal_t", "std", std)
    check_positive("logit_normal_t", "shift", shift)
    normal = _normals("logit_normal_t", batch, generator, seed, device, dtype)[0]
    return flow_shift(torch.sigmoid(mean + std * normal), shift).to(dtype)


def lognormal_sigma(batch, *, p_mean=-1.2, p_std=1.2, generator=None, seed=None, device=None, dtype=torch.float32):
    """EDM / ECT noise levels σ = exp(P_mean + P_std·n), n ~ N(0, 1) (EDM: −1.2, 1.2; ECT: −1.1, 2.0)."""
    check_positive("lognormal_sigma", "p_std", p_std)
    normal = _normals("lognormal_sigma", batch, generator, seed, device, dtype)[0]
    return torch.exp(p_mean + p_std * normal).to(dtype)


def trigflow_sample_t(
    batch, *, sigma_data=0.5, p_mean=-1.0, p_std=1.4, generator=None, seed=None, device=None, dtype=torch.float32
):
    """sCM's TrigFlow times t = arctan(σ/σd) of lognormal σ (the distribution of scm_sample_t), drawn on
    `device`. Shape (batch,), t ∈ (0, π/2)."""
    check_positive("trigflow_sample_t", "sigma_data", sigma_data)
    check_positive("trigflow_sample_t", "p_std", p_std)
    normal = _normals("trigflow_sample_t", batch, generator, seed, device, dtype)[0]
    return torch.atan(torch.exp(p_mean + p_std * normal) / sigma_data).to(dtype)


def meanflow_sample_tr(
    batch,
    *,
    distribution="logit_normal",
    mean=-0.4,
    std=1.0,
    equal_fraction=0.75,
    generator=None,
    seed=None,
    device=None,
    dtype=torch.float32,
):
    """(t, r) pairs with r ≤ t for MeanFlow: two times from `distribution` ("logit_normal" with
    mean/std, or "uniform" on (0, 1)), t the larger, r the smaller, and r = t for the first
    ⌊equal_fraction·batch⌋ samples (MeanFlow's default 75 % turns those into flow matching; a fixed
    count keeps the batch shape static). Returns (t, r), each (batch,)."""
    if distribution not in ("logit_normal", "uniform"):
        raise ValueError(
            f"fastcm.meanflow_sample_tr: distribution={distribution!r} is not supported; expected "
            f"one of ('logit_normal', 'uniform')"
        )
    if isinstance(equal_fraction, bool) or not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(
            f"fastcm.meanflow_sample_tr: equal_fraction={equal_fraction!r} is not supported; "
            f"expected a number in [0, 1]"
        )
    check_positive("meanflow_sample_tr", "std", std)
    normal = _normals("meanflow_sample_tr", batch, generator, seed, device, dtype, count=2)
    # Uniforms as Φ(n): one draw call serves both distributions and the same seed stream.
    pair = torch.sigmoid(mean + std * normal) if distribution == "logit_normal" else torch.special.ndtr(normal)
    t, r = pair.max(dim=0).values, pair.min(dim=0).values
    equal = torch.arange(batch, device=t.device) < int(equal_fraction * batch)
    return t.to(dtype), torch.where(equal, t, r).to(dtype)


def ect_stage(step, stage_length):
    """ECT's curriculum stage ⌊step / stage_length⌋ (ECT doubles the resolution of r(t) each stage)."""
    for name, value in (("step", step), ("stage_length", stage_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "step" else 1):
            raise ValueError(
                f"fastcm.ect_stage: {name}={value!r} is not supported; expected an int "
                f"{'>= 0' if name == 'step' else '>= 1'}"
            )
    return step // stage_length


def ect_r(t, stage, *, q=2.0, k=8.0, b=1.0):
    """ECT's mapping from σ = t to the earlier σ = r of stage s: r = max(0, t·(1 − (1 + k·sigmoid(−b·t))/q^{s+1}))
    (Geng et al., "Consistency Models Made Easy"); r → t as the stages go on. Elementwise on a tensor."""
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise ValueError(f"fastcm.ect_r: stage={stage!r} is not supported; expected an int >= 0")
    check_positive("ect_r", "q", q)
    return torch.clamp(t * (1.0 - (1.0 + k * torch.sigmoid(-b * t)) / q ** (stage + 1)), min=0.0)


def ect_weight(t, *, sigma_data=0.5):
    """ECT's "SNR + k" loss weight SNR(t) + 1/σd² = 1/t² + 1/σd² = (t² + σd²)/(t·σd)², elementwise (σ = t;
    ct_loss_weight gives the 1/(t − r) weighting instead)."""
    check_positive("ect_weight", "sigma_data", sigma_data)
    return 1.0 / t**2 + 1.0 / sigma_data**2


__all__ = [
    "karras_sigmas",
    "ict_num_timesteps",
    "ict_sample_sigmas",
    "ct_loss_weight",
    "scm_sample_t",
    "tangent_warmup",
    "exponential_sigmas",
    "polyexponential_sigmas",
    "flow_shift",
    "flow_times",
    "vp_betas",
    "rescale_zero_terminal_snr",
    "vp_sigmas",
    "VP_BETA_SCHEDULES",
    "resolution_shift",
    "logit_normal_t",
    "lognormal_sigma",
    "trigflow_sample_t",
    "meanflow_sample_tr",
    "ect_stage",
    "ect_r",
    "ect_weight",
]
