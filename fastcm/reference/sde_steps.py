"""Reference stochastic and higher-order sampler steps (EDM churn, Euler ancestral, DPM-Solver++ 2S
ancestral, DPM-Solver++ SDE, 2M SDE and 3M SDE, UniPC): the specification the fused kernels are tested against.

Written as k-diffusion's sampling loops write the update (Karras et al. 2022, Algorithm 2; Lu et
al., DPM-Solver++), one function per update between two denoiser calls, in σ space (EDM
parameterisation, x = x0 + σ·n). Plain PyTorch, differentiable by autograd and torch.func.jvp;
computes in the dtype of the inputs (call with float64 tensors for the float64 reference).
Per-sample parameters: float, 0-d tensor, (B,) or (B, 1, ..., 1).

Noise: `noise=` (a tensor like x, z ~ N(0, I)) is used as given; otherwise z comes from
fastcm.reference.steps.standard_noise(seed, offset), deterministic but not the Triton kernels' stream.
"""

import torch

from .steps import _param, standard_noise


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """(σ_down, σ_up) of an ancestral step from σ to σ' (k-diffusion get_ancestral_step):
    σ_up = min(σ', η·√(σ'²·(σ² − σ'²)/σ²)), σ_down = √(σ'² − σ_up²). Tensors or floats, elementwise."""
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor) or isinstance(eta, torch.Tensor):
        sigma, sigma_next, eta = (
            torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) else v
            for v in (sigma, sigma_next, eta)
        )
        up = torch.minimum(sigma_next, eta * torch.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        # σ_down = 0 where σ_up = σ' (it stays 0 nearby): the where keeps √'s infinite slope at 0 out of gradients.
        square = sigma_next**2 - up**2
        positive = square > 0
        return torch.where(
            positive, torch.sqrt(torch.where(positive, square, torch.ones_like(square))), torch.zeros_like(square)
        ), up
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _noise(x, noise, seed, generator, offset):
    return standard_noise(x, noise=noise, seed=seed, generator=generator, offset=offset)


def churn_step(x, sigma, sigma_hat, *, s_noise=1.0, noise=None, seed=None, generator=None, offset=0):
    """EDM stochastic churn: x̂ = x + s_noise·√(σ̂² − σ²)·z, raising the noise level from σ to σ̂ ≥ σ."""
    sigma = _param("churn_step", "sigma", sigma, x)
    sigma_hat = _param("churn_step", "sigma_hat", sigma_hat, x)
    s_noise = _param("churn_step", "s_noise", s_noise, x)
    return x + s_noise * torch.sqrt(sigma_hat**2 - sigma**2) * _noise(x, noise, seed, generator, offset)


def euler_ancestral_step(
    x, denoised, sigma, sigma_next, *, eta=1.0, s_noise=1.0, noise=None, seed=None, generator=None, offset=0
):
    """(σ_down, σ_up) = ancestral_sigmas(σ, σ', η); x' = x + (σ_down − σ)·(x − D)/σ + s_noise·σ_up·z,
    the noise term only where σ' > 0."""
    sigma = _param("euler_ancestral_step", "sigma", sigma, x)
    sigma_next = _param("euler_ancestral_step", "sigma_next", sigma_next, x)
    eta = _param("euler_ancestral_step", "eta", eta, x)
    s_noise = _param("euler_ancestral_step", "s_noise", s_noise, x)
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    out = x + (down - sigma) * (x - denoised) / sigma
    z = _noise(x, noise, seed, generator, offset)
    return out + torch.where(sigma_next > 0, s_noise * up, torch.zeros_like(up)) * z


def dpmpp_2s_ancestral_step(
    x,
    denoised,
    sigma,
    sigma_next,
    *,
    denoised_mid=None,
    eta=1.0,
    s_noise=1.0,
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """DPM-Solver++(2S) ancestral, the second half: (σ_down, σ_up) = ancestral_sigmas(σ, σ', η),
    λ = −log σ, h = λ(σ_down) − λ(σ); with D_mid = D(x_mid; √(σ·σ_down)) at the midpoint
    x_mid = (√(σ·σ_down)/σ)·x − expm1(−h/2)·D, x' = (σ_down/σ)·x − expm1(−h)·D_mid + s_noise·σ_up·z.
    Where σ_down = 0 the update is Euler's, x' = D (+ noise), and D_mid is not used (may be None)."""
    sigma = _param("dpmpp_2s_ancestral_step", "sigma", sigma, x)
    sigma_next = _param("dpmpp_2s_ancestral_step", "sigma_next", sigma_next, x)
    eta = _param("dpmpp_2s_ancestral_step", "eta", eta, x)
    s_noise = _param("dpmpp_2s_ancestral_step", "s_noise", s_noise, x)
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    euler = x + (down - sigma) * (x - denoised) / sigma
    if denoised_mid is None:
        out = euler
    else:
        safe_down = torch.where(down == 0, sigma, down)
        h = torch.log(sigma) - torch.log(safe_down)
        out = torch.where(down == 0, euler, (down / sigma) * x - torch.expm1(-h) * denoised_mid)
    z = _noise(x, noise, seed, generator, offset)
    return out + torch.where(sigma_next > 0, s_noise * up, torch.zeros_like(up)) * z


def dpmpp_sde_step(
    x,
    denoised,
    sigma,
    sigma_next,
    *,
    denoised_mid=None,
    r=0.5,
    eta=1.0,
    s_noise=1.0,
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """DPM-Solver++ SDE (k-diffusion sample_dpmpp_sde), the second stage: with D_mid = D(x_mid; σ_s),
    σ_s = σ^(1−r)·σ'^r and x_mid = euler_ancestral_step(x, D, σ, σ_s, eta, s_noise) (the first stage),
    (σ_down, σ_up) = ancestral_sigmas(σ, σ', η), D̄ = (1 − 1/(2r))·D + 1/(2r)·D_mid,
    x' = (σ_down/σ)·x + (1 − σ_down/σ)·D̄ + s_noise·σ_up·z. Where σ' = 0: x' = D (D_mid unused)."""
    sigma = _param("dpmpp_sde_step", "sigma", sigma, x)
    sigma_next = _param("dpmpp_sde_step", "sigma_next", sigma_next, x)
    eta = _param("dpmpp_sde_step", "eta", eta, x)
    s_noise = _param("dpmpp_sde_step", "s_noise", s_noise, x)
    if denoised_mid is None:  # only valid where every σ' is 0 (fastcm.sde_steps checks)
        return denoised
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    fac = 1 / (2 * r)
    blended = (1 - fac) * denoised + fac * denoised_mid
    ratio = down / sigma
    stepped = ratio * x + (1 - ratio) * blended + s_noise * up * _noise(x, noise, seed, generator, offset)
    return torch.where(sigma_next == 0, denoised, stepped)


def dpmpp_2m_sde_step(
    x,
    denoised,
    sigma,
    sigma_next,
    *,
    old_denoised=None,
    sigma_prev=None,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """DPM-Solver++(2M) SDE (k-diffusion sample_dpmpp_2m_sde): h = log(σ/σ'), ηh = η·h,
    x' = (σ'/σ)·e^(−ηh)·x − expm1(−h − ηh)·D
         + [multistep, r = log(σ_prev/σ)/h]  midpoint: −½·expm1(−h − ηh)/r·(D − D_prev)
                                            heun:     (−expm1(−h − ηh)/(−h − ηh) + 1)/r·(D − D_prev)
         + s_noise·σ'·√(−expm1(−2ηh))·z.
    Where σ' = 0: x' = D."""
    op = "dpmpp_2m_sde_step"
    sigma, sigma_next = _param(op, "sigma", sigma, x), _param(op, "sigma_next", sigma_next, x)
    eta, s_noise = _param(op, "eta", eta, x), _param(op, "s_noise", s_noise, x)
    final = sigma_next == 0
    safe_next = torch.where(final, sigma, sigma_next)
    h = torch.log(sigma) - torch.log(safe_next)
    eta_h = eta * h
    gain = -torch.expm1(-h - eta_h)
    out = sigma_next / sigma * torch.exp(-eta_h) * x + gain * denoised
    if old_denoised is not None:
        sigma_prev = _param(op, "sigma_prev", sigma_prev, x)
        r = (torch.log(sigma_prev) - torch.log(sigma)) / h
        if solver_type == "heun":
            out = out + (gain / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
        else:
            out = out + 0.5 * gain * (1 / r) * (denoised - old_denoised)
    out = out + sigma_next * torch.sqrt(-torch.expm1(-2 * eta_h)) * s_noise * _noise(x, noise, seed, generator, offset)
    return torch.where(final, denoised, out)


def dpmpp_3m_sde_step(
    x,
    denoised,
    sigma,
    sigma_next,
    *,
    denoised_1=None,
    denoised_2=None,
    sigma_prev=None,
    sigma_prev2=None,
    eta=1.0,
    s_noise=1.0,
    noise=None,
    seed=None,
    generator=None,
    offset=0,
):
    """DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde): h = log(σ/σ'), h_η = (η + 1)·h,
    x' = e^(−h_η)·x − expm1(−h_η)·D + correction + s_noise·σ'·√(−expm1(−2ηh))·z, where with
    D_1 = D at σ_prev, D_2 = D at σ_prev2, h_1 = log(σ_prev/σ), h_2 = log(σ_prev2/σ_prev),
    φ2 = expm1(−h_η)/h_η + 1, φ3 = φ2/h_η − ½:
      third order (D_1, D_2 given): r0 = h_1/h, r1 = h_2/h, d1_0 = (D − D_1)/r0, d1_1 = (D_1 − D_2)/r1,
        correction = φ2·(d1_0 + (d1_0 − d1_1)·r0/(r0 + r1)) − φ3·(d1_0 − d1_1)/(r0 + r1);
      second order (D_1 only): correction = φ2·(D − D_1)·h/h_1; first order: 0.
    Where σ' = 0: x' = D."""
    op = "dpmpp_3m_sde_step"
    sigma, sigma_next = _param(op, "sigma", sigma, x), _param(op, "sigma_next", sigma_next, x)
    eta, s_noise = _param(op, "eta", eta, x), _param(op, "s_noise", s_noise, x)
    final = sigma_next == 0
    safe_next = torch.where(final, sigma, sigma_next)
    h = torch.log(sigma) - torch.log(safe_next)
    h_eta = h * (eta + 1)
    out = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
    if denoised_1 is not None:
        sigma_prev = _param(op, "sigma_prev", sigma_prev, x)
        h_1 = torch.log(sigma_prev) - torch.log(sigma)
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if denoised_2 is not None:
            sigma_prev2 = _param(op, "sigma_prev2", sigma_prev2, x)
            h_2 = torch.log(sigma_prev2) - torch.log(sigma_prev)
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            out = out + phi_2 * d1 - phi_3 * d2
        else:
            out = out + phi_2 * (denoised - denoised_1) / (h_1 / h)
    out = out + sigma_next * torch.sqrt(-torch.expm1(-2 * h * eta)) * s_noise * _noise(
        x, noise, seed, generator, offset
    )
    return torch.where(final, denoised, out)


def _uni_interval(sigma, sigma_next, order):
    """What UniP and UniC share on an interval σ → σ' (λ = −log σ, h = λ' − λ > 0), bh2 variant:
    φ1 = expm1(−h), B(h) = expm1(−h), and b_i = i!·φ_(i+1)(h)/B(h) for i = 1..order with
    φ_2 = φ1/(−h) − 1, φ_(i+1) = φ_i/(−h) − 1/i! (diffusers' h_phi_k recursion)."""
    h = torch.log(sigma) - torch.log(sigma_next)
    phi_1 = torch.expm1(-h)
    b_h = torch.expm1(-h)
    phi_k, factorial, rhs = phi_1 / -h - 1, 1, []
    for i in range(1, order + 1):
        rhs.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / -h - 1 / factorial
    return h, phi_1, b_h, rhs


def _solve_rhos(nodes, rhs, like):
    """ρ with Σ_k ρ_k·r_k^(i−1) = b_i, i = 1..n, per sample (torch.linalg.solve on the (B, n, n) system)."""
    batch = like.shape[0]
    flat_nodes = [r.expand(batch, *r.shape[1:]).reshape(batch) for r in nodes]
    flat_rhs = [b.expand(batch, *b.shape[1:]).reshape(batch) for b in rhs]
    rows = torch.stack([torch.stack([r ** (i - 1) for r in flat_nodes], -1) for i in range(1, len(nodes) + 1)], -2)
    # solved in float64 whatever the inputs (LAPACK has no half-precision solve)
    rhos = torch.linalg.solve(rows.double(), torch.stack(flat_rhs, -1).double()).to(rows.dtype)
    return [rhos[:, k].reshape(rhs[0].expand(batch, *rhs[0].shape[1:]).shape) for k in range(len(nodes))]


def _history(op, history, sigma_history, x):
    if len(history) != len(sigma_history):
        raise ValueError(f"{op}: {len(history)} denoised outputs but {len(sigma_history)} levels in the history")
    return list(history), [_param(op, "sigma_history", s, x) for s in sigma_history]


def unipc_predictor_step(x, denoised, sigma, sigma_next, *, denoised_history=(), sigma_history=()):
    """UniP-p, bh2, data prediction (Zhao et al. 2023), from σ to σ' in σ space (α = 1, λ = −log σ), of order
    p = 1 + len(denoised_history): the history is D_k at σ_k > σ, most recent first. With h = λ' − λ,
    r_k = (λ_k − λ)/h and D1_k = (D_k − D)/r_k:
        x' = (σ'/σ)·x − φ1·D − B(h)·Σ_k ρ_k·D1_k,
    ρ = (½) for p = 2 and for p = 3 the solution of Σ_k ρ_k·r_k^(i−1) = b_i, i = 1, 2 (_uni_interval); p = 1 is
    DDIM. Where σ' = 0 the update is the first-order limit x' = D (λ' = ∞; higher orders have no finite limit)."""
    op = "unipc_predictor_step"
    sigma, sigma_next = _param(op, "sigma", sigma, x), _param(op, "sigma_next", sigma_next, x)
    history, levels = _history(op, denoised_history, sigma_history, x)
    final = sigma_next == 0
    safe_next = torch.where(final, sigma / 2, sigma_next)
    h, phi_1, b_h, rhs = _uni_interval(sigma, safe_next, max(len(history), 1))
    out = safe_next / sigma * x - phi_1 * denoised
    if history:
        nodes = [(torch.log(sigma) - torch.log(level)) / h for level in levels]
        rhos = [torch.full_like(h, 0.5)] if len(history) == 1 else _solve_rhos(nodes, rhs[: len(nodes)], x)
        out = out - b_h * sum(rho * (d - denoised) / r for rho, d, r in zip(rhos, history, nodes))
    return torch.where(final, denoised, out)


def unipc_corrector_step(x, denoised, sigma, sigma_next, denoised_next, *, denoised_history=(), sigma_history=()):
    """UniC-p, bh2, data prediction (Zhao et al. 2023): corrects the point at σ' that UniP reached from x (at σ,
    with D = D(x; σ)), using D' = the model's data prediction at that predicted point, of order
    p = 1 + len(denoised_history) (history as unipc_predictor_step). With the nodes r_1..r_(p−1) and r_p = 1:
        x'_c = (σ'/σ)·x − φ1·D − B(h)·(Σ_(k<p) ρ_k·(D_k − D)/r_k + ρ_p·(D' − D)),
    ρ = (½) for p = 1, else the solution of Σ_k ρ_k·r_k^(i−1) = b_i, i = 1..p. σ' > 0 (the model ran there)."""
    op = "unipc_corrector_step"
    sigma, sigma_next = _param(op, "sigma", sigma, x), _param(op, "sigma_next", sigma_next, x)
    history, levels = _history(op, denoised_history, sigma_history, x)
    order = len(history) + 1
    h, phi_1, b_h, rhs = _uni_interval(sigma, sigma_next, order)
    nodes = [(torch.log(sigma) - torch.log(level)) / h for level in levels]
    rhos = [torch.full_like(h, 0.5)] if order == 1 else _solve_rhos(nodes + [torch.ones_like(h)], rhs, x)
    correction = rhos[-1] * (denoised_next - denoised)
    for rho, d, r in zip(rhos, history, nodes):
        correction = correction + rho * (d - denoised) / r
    return sigma_next / sigma * x - phi_1 * denoised - b_h * correction


def unipc_step(
    x,
    denoised,
    sigma,
    sigma_next,
    *,
    denoised_1=None,
    denoised_2=None,
    denoised_3=None,
    sigma_prev=None,
    sigma_prev2=None,
    sigma_prev3=None,
    order=1,
    corrector_order=0,
):
    """One UniPC model call's update: UniC of the previous step, then UniP from the corrected point.

    x is the point the previous UniP reached (at σ, where the model gave D), D_1, D_2, D_3 the data predictions
    at σ_prev > σ_prev2 > σ_prev3 > σ. With corrector_order = c > 0 (the previous UniP's order), the corrected
    point is x_c = UniC_c(x_1, D_1 → D) with x_1 the previous (corrected) point; because UniC_c and the UniP_c
    that reached x share (σ/σ_prev)·x_1, x_c = x + UniC_c(x_1) − UniP_c(x_1) for any x_1, so x_1 is not needed
    (evaluated here at x_1 = 0). Then x' = UniP_order(x_c, D; history D_1..D_(order−1)) from σ to σ'."""
    history = [d for d in (denoised_1, denoised_2, denoised_3) if d is not None]
    levels = [s for s in (sigma_prev, sigma_prev2, sigma_prev3) if s is not None]
    if corrector_order:
        zero = torch.zeros_like(x)
        past = dict(denoised_history=history[1:corrector_order], sigma_history=levels[1:corrector_order])
        corrected = unipc_corrector_step(zero, history[0], levels[0], sigma, denoised, **past)
        x = x + corrected - unipc_predictor_step(zero, history[0], levels[0], sigma, **past)
    return unipc_predictor_step(
        x, denoised, sigma, sigma_next, denoised_history=history[: order - 1], sigma_history=levels[: order - 1]
    )


__all__ = [
    "ancestral_sigmas",
    "churn_step",
    "euler_ancestral_step",
    "dpmpp_2s_ancestral_step",
    "dpmpp_sde_step",
    "dpmpp_2m_sde_step",
    "dpmpp_3m_sde_step",
    "unipc_predictor_step",
    "unipc_corrector_step",
    "unipc_step",
]
