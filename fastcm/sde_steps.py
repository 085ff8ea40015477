"""Stochastic and higher-order sampler steps, each one fused pass: EDM stochastic churn, Euler
ancestral, DPM-Solver++(2S) ancestral, DPM-Solver++ SDE, DPM-Solver++(2M) SDE (midpoint and Heun),
DPM-Solver++(3M) SDE, in σ space as k-diffusion's samplers (Karras et al. 2022; Lu et al. 2022), and UniPC's
predictor-corrector pair (Zhao et al. 2023) as one pass per model call.

Each update is linear in its tensor inputs, x' = c0·t0 + c1·t1 + c2·t2 + c3·t3 + c4·z, with per-sample
coefficients computed here (in float64, from Python floats without any launch, or from per-sample
tensors with differentiable torch ops) and one Triton kernel doing the memory-bound part.

Noise. `noise=` (a tensor like x, z ~ N(0, I)) is used by every backend as given: pass the tensor a
reference run drew (k-diffusion's noise_sampler(σ, σ'), torch.randn_like under a torch.Generator) to
reproduce that run to rounding. Without it the Triton kernel draws z in-kernel from Philox under key
`seed` at counter offset + i for element i of the flattened tensor (nothing is materialised; the same
stream as fastcm.steps), and the reference backend draws torch.randn from a generator seeded with
(seed, offset). Neither reproduces a torch.Generator's stream (torch's CPU generator is a Mersenne
Twister, its CUDA generator a Philox with its own counter layout and Box-Muller pairing), and the two
differ from each other; each is deterministic (same seed and offset → bitwise the same result).
Without `seed`, a seed is drawn from `generator` or torch's global CPU generator. A call that needs N
noise elements uses counters [offset, offset + N): pass offset + N to the next call for fresh noise.

Gradients and forward-mode tangents flow to every tensor input and to per-sample parameters given as
tensors. `out=` writes the result in place (it may be x itself) and is for no-grad use only.
"""

import torch

from . import steps as _steps
from ._backend import select_backend
from ._checks import compute_dtype
from ._library import kernel_ops
from ._params import view_per_sample
from .reference import sde_steps as reference
from .reference.steps import draw_seed

SOLVER_TYPES = ("midpoint", "heun")


def _fake_combination(like, t0, t1, t2, t3, noise, coefs, scalar_coefs, seed, offset, philox):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


_ops = kernel_ops("sde_steps", {"combination": ("combination", _fake_combination)})

_NUM_COEFS = 5


def _launchers():
    """The launchers themselves: out= writes in place, which the (non-mutating) custom op cannot."""
    from .kernels import sde_steps as launchers

    return launchers


def _coef_view(coefs, scalar_coefs, k, like):
    return scalar_coefs[k] if coefs is None else view_per_sample(coefs[:, k], like).to(like.dtype)


def _combine_differentiable(like, terms, coefs, scalar_coefs):
    """The same combination in torch ops (for double backward / jvp under grad)."""
    out = torch.zeros_like(like)
    for k, term in enumerate(terms):
        if term is not None:
            out = out + _coef_view(coefs, scalar_coefs, k, like) * term
    return out


def _philox_noise(like, seed, offset):
    return _ops.combination(like, None, None, None, None, None, None, [0.0] * 4 + [1.0], seed, offset, True)


class _Combination(torch.autograd.Function):
    """out = Σ_k c_k·t_k + c4·z over four terms and the noise; coefs (B, 5) tensor or None with scalar_coefs."""

    @staticmethod
    def forward(coefs, t0, t1, t2, t3, noise, scalar_coefs, seed, offset, philox):
        like = next(t for t in (t0, t1, t2, t3) if t is not None)
        return _ops.combination(like, t0, t1, t2, t3, noise, coefs, scalar_coefs, seed, offset, philox)

    @staticmethod
    def setup_context(ctx, inputs, output):
        coefs, t0, t1, t2, t3, noise, scalar_coefs, seed, offset, philox = inputs
        ctx.options = (list(scalar_coefs), seed, offset, philox)
        ctx.save_for_backward(coefs, t0, t1, t2, t3, noise)
        ctx.save_for_forward(coefs, t0, t1, t2, t3, noise)

    @staticmethod
    def backward(ctx, grad_out):
        coefs, *terms = ctx.saved_tensors
        scalar_coefs, seed, offset, philox = ctx.options
        needs = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grads = [None] * 10
        for k in range(_NUM_COEFS):
            if not needs[k + 1]:
                continue
            if torch.is_grad_enabled():
                grads[k + 1] = grad_out * _coef_view(coefs, scalar_coefs, k, grad_out)
            else:
                # One-term combination: slot k holds the gradient, so it is scaled by coefficient k.
                slots = [grad_out if j == k else None for j in range(_NUM_COEFS)]
                grads[k + 1] = _ops.combination(grad_out, *slots, coefs, scalar_coefs, 0, 0, False)
        if needs[0]:
            if philox and terms[4] is None:
                terms[4] = _philox_noise(grad_out, seed, offset)
            columns = [
                torch.zeros(grad_out.shape[0], dtype=coefs.dtype, device=coefs.device)
                if t is None
                else _steps._per_sample_dot(grad_out, t).to(coefs.dtype)
                for t in terms
            ]
            grads[0] = torch.stack(columns, dim=1)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, coefs_t, t0_t, t1_t, t2_t, t3_t, noise_t, *_):
        coefs, *terms = ctx.saved_tensors
        scalar_coefs, seed, offset, philox = ctx.options
        like = next(t for t in terms if t is not None)
        term_tangents = (t0_t, t1_t, t2_t, t3_t, noise_t)
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (coefs, coefs_t, *terms, *term_tangents)
        )
        has_term_tangents = any(t is not None for t in term_tangents)
        # With both parts, each is kept in the compute dtype and rounded to the output dtype once.
        both = has_term_tangents and coefs_t is not None
        part_like = like.new_empty(like.shape, dtype=compute_dtype(like)) if both else like
        out_t = None
        if has_term_tangents:
            if differentiable:
                out_t = _combine_differentiable(like, term_tangents, coefs, scalar_coefs)
            else:
                out_t = _ops.combination(
                    part_like, *map(_steps._contiguous, term_tangents), coefs, scalar_coefs, 0, 0, False
                )
        if coefs_t is not None:
            if philox and terms[4] is None:
                terms[4] = _philox_noise(like, seed, offset)
            if differentiable:
                from_coefs = _combine_differentiable(like, terms, coefs_t, None)
            else:
                from_coefs = _ops.combination(part_like, *terms, coefs_t.contiguous(), [0.0] * _NUM_COEFS, 0, 0, False)
            out_t = from_coefs if out_t is None else (out_t + from_coefs).to(like.dtype)
        return torch.zeros_like(like) if out_t is None else out_t


def _pack(coefs, x):
    """(coef tensor (B, 5) or None, five floats) for the kernel."""
    if not _steps._is_tensor(*coefs):
        return None, [float(c) for c in coefs]
    reference_column = next(c for c in coefs if isinstance(c, torch.Tensor))
    columns = [c if isinstance(c, torch.Tensor) else torch.full_like(reference_column, c) for c in coefs]
    return torch.stack(columns, dim=1).to(compute_dtype(x)), [0.0] * _NUM_COEFS


def _run(op, x, terms, coefs, out, *, noise=None, seed=None, generator=None, offset=0):
    """Launch x' = Σ coefs·terms + c4·z on the fast path; terms = (t0, t1, t2, t3). z is drawn in-kernel
    unless `noise` is given or c4 is the float 0."""
    coef_tensor, scalar_coefs = _pack(coefs, x)
    stochastic = isinstance(coefs[4], torch.Tensor) or coefs[4] != 0
    philox = stochastic and noise is None
    if philox and seed is None:
        seed = draw_seed(generator)
    seed = 0 if seed is None else seed
    noise = _steps._contiguous(noise) if stochastic else None
    terms = tuple(_steps._contiguous(t) for t in terms)
    if out is not None:
        tracked = [t for t in terms + (noise, coef_tensor) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
            raise RuntimeError(
                f"fastcm.{op}: out= does not support autograd (an input requires grad); "
                "call it under torch.no_grad() or drop out="
            )
        if torch.compiler.is_compiling() or not out.is_contiguous():
            out.copy_(_ops.combination(x, *terms, noise, coef_tensor, scalar_coefs, seed, offset, philox))
        else:
            _launchers().combination_into(out, *terms, noise, coef_tensor, scalar_coefs, seed, offset, philox)
        return out
    return _Combination.apply(coef_tensor, *terms, noise, scalar_coefs, seed, offset, philox)


def _check(op, x, tensors, seed, generator, offset, out, sigma=None, sigma_next=None, eta=None, s_noise=None):
    _steps._check_tensors(op, "x", x, **tensors)
    _steps._check_noise_args(op, seed, generator, offset)
    _steps._check_out(op, out, "x", x)
    if sigma is not None:
        _steps._require_positive(op, "sigma", sigma)
    if sigma_next is not None:
        _steps._require_positive(op, "sigma_next", sigma_next, allow_zero=True)
    if eta is not None:
        _steps._require_positive(op, "eta", eta, allow_zero=True)
    if s_noise is not None:
        _steps._require_positive(op, "s_noise", s_noise, allow_zero=True)
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)) and not sigma_next <= sigma:
        raise ValueError(
            f"fastcm.{op}: sigma_next={sigma_next!r} is not supported; expected <= sigma={sigma!r} "
            "(these steps go down in noise)"
        )


def _all_zero(value) -> bool:
    return bool((value == 0).all()) if isinstance(value, torch.Tensor) else value == 0


def churn_step(x, sigma, sigma_hat, *, s_noise=1.0, noise=None, seed=None, generator=None, offset=0, out=None):
    """EDM stochastic churn (Karras et al. 2022, Algorithm 2): raise the noise level from σ to σ̂ ≥ σ,
    x̂ = x + s_noise·√(σ̂² − σ²)·z. The sampler then evaluates D(x̂; σ̂) and steps from σ̂
    (euler_step / heun_step with sigma=σ̂); sample_euler / sample_heun with s_churn > 0 do this,
    with σ̂ = σ·(1 + min(s_churn/N, √2 − 1)) for σ in [s_tmin, s_tmax].

    x: (B, ...) float32/bfloat16/float16/float64, computed in float32 (float64 for float64).
    sigma > 0, sigma_hat ≥ sigma, s_noise ≥ 0: float, 0-d, (B,) or (B,1,..,1). z: `noise` or
    in-kernel noise from (seed | generator, offset), see the module docstring; with float σ̂ = σ no
    noise is drawn and x̂ = x. Gradients/tangents: x, noise, tensor sigma / sigma_hat / s_noise.
    """
    op = "churn_step"
    _check(op, x, {"noise": noise}, seed, generator, offset, out, sigma=sigma, s_noise=s_noise)
    if not _steps._is_tensor(sigma, sigma_hat) and not sigma_hat >= sigma:
        raise ValueError(f"fastcm.{op}: sigma_hat={sigma_hat!r} is not supported; expected >= sigma={sigma!r}")
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.churn_step(
                x, sigma, sigma_hat, s_noise=s_noise, noise=noise, seed=seed, generator=generator, offset=offset
            ),
            out,
        )
    s, s_hat, gain = _steps._params(op, x, sigma=sigma, sigma_hat=sigma_hat, s_noise=s_noise)
    noise_scale = gain * _steps._lib(s, s_hat, gain).sqrt(s_hat * s_hat - s * s)
    return _run(
        op,
        x,
        (x, None, None, None),
        (1.0, 0.0, 0.0, 0.0, noise_scale),
        out,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def _ancestral_coefs(op, x, sigma, sigma_next, eta, s_noise):
    """σ, σ', (σ_down/σ, s_noise·σ_up where σ' > 0 else 0) as floats or (B,) float64 tensors."""
    s, s_next, eta_b, gain = _steps._params(op, x, sigma=sigma, sigma_next=sigma_next, eta=eta, s_noise=s_noise)
    down, up = reference.ancestral_sigmas(s, s_next, eta_b)
    return s, s_next, down, gain * up * (s_next > 0)


def euler_ancestral_step(
    x, denoised, sigma, sigma_next, *, eta=1.0, s_noise=1.0, noise=None, seed=None, generator=None, offset=0, out=None
):
    """Euler ancestral step (k-diffusion sample_euler_ancestral) from σ to σ'.

    (σ_down, σ_up) = (√(σ'² − σ_up²), min(σ', η·√(σ'²·(σ² − σ'²)/σ²))),
    x' = x + (σ_down − σ)·(x − D)/σ + s_noise·σ_up·z  (= (σ_down/σ)·x + (1 − σ_down/σ)·D + …, one pass);
    no noise where σ' = 0. x, denoised: (B, ...) same shape/dtype/device; sigma > 0, 0 ≤ sigma_next ≤ sigma,
    eta ≥ 0, s_noise ≥ 0: float, 0-d, (B,) or (B,1,..,1). z: `noise` or in-kernel noise (module docstring).
    Gradients/tangents: x, denoised, noise, tensor parameters.
    """
    op = "euler_ancestral_step"
    _check(
        op,
        x,
        {"denoised": denoised, "noise": noise},
        seed,
        generator,
        offset,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
        eta=eta,
        s_noise=s_noise,
    )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.euler_ancestral_step(
                x,
                denoised,
                sigma,
                sigma_next,
                eta=eta,
                s_noise=s_noise,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    s, _, down, noise_scale = _ancestral_coefs(op, x, sigma, sigma_next, eta, s_noise)
    ratio = down / s
    return _run(
        op,
        x,
        (x, denoised, None, None),
        (ratio, 1 - ratio, 0.0, 0.0, noise_scale),
        out,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def dpmpp_2s_ancestral_sigma_mid(sigma, sigma_next, eta=1.0):
    """The midpoint level of a DPM-Solver++(2S) ancestral step, √(σ·σ_down) (λ halfway from σ to σ_down);
    0 where σ_down = 0 (that step is Euler's and has no midpoint). Floats or tensors."""
    down, _ = reference.ancestral_sigmas(sigma, sigma_next, eta)
    return (sigma * down) ** 0.5


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
    out=None,
):
    """DPM-Solver++(2S) ancestral step (k-diffusion sample_dpmpp_2s_ancestral), its second stage.

    The first stage is x_mid = dpmpp_2m_step(x, D, σ, σ_mid) with σ_mid = dpmpp_2s_ancestral_sigma_mid(σ, σ', η),
    and D_mid = D(x_mid; σ_mid). Then, with (σ_down, σ_up) as euler_ancestral_step and λ = −log σ,
    h = λ(σ_down) − λ(σ): x' = (σ_down/σ)·x − expm1(−h)·D_mid + s_noise·σ_up·z (no noise where σ' = 0).
    Where σ_down = 0 the step is Euler's, x' = D + s_noise·σ_up·z, and denoised_mid is not read; it may be
    None only if every σ_down is 0 (checked; tensor parameters sync). Shapes, dtypes and gradients as
    euler_ancestral_step (plus denoised_mid).
    """
    op = "dpmpp_2s_ancestral_step"
    _check(
        op,
        x,
        {"denoised": denoised, "denoised_mid": denoised_mid, "noise": noise},
        seed,
        generator,
        offset,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
        eta=eta,
        s_noise=s_noise,
    )
    if denoised_mid is None and not _all_zero(reference.ancestral_sigmas(sigma, sigma_next, eta)[0]):
        raise ValueError(
            f"fastcm.{op}: denoised_mid is None but sigma_down is not 0 (sigma={sigma!r}, "
            f"sigma_next={sigma_next!r}, eta={eta!r}); denoised_mid = D(x_mid; sigma_mid) is required"
        )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.dpmpp_2s_ancestral_step(
                x,
                denoised,
                sigma,
                sigma_next,
                denoised_mid=denoised_mid,
                eta=eta,
                s_noise=s_noise,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    s, _, down, noise_scale = _ancestral_coefs(op, x, sigma, sigma_next, eta, s_noise)
    euler = (down == 0) * 1.0
    ratio = down / s
    coefs = (ratio, euler, (1 - ratio) * (1 - euler), 0.0, noise_scale)
    return _run(
        op, x, (x, denoised, denoised_mid, None), coefs, out, noise=noise, seed=seed, generator=generator, offset=offset
    )


def dpmpp_sde_sigma_mid(sigma, sigma_next, r=0.5):
    """The intermediate level of a DPM-Solver++ SDE step, σ^(1−r)·σ'^r (λ a fraction r of the way)."""
    return sigma ** (1 - r) * sigma_next**r


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
    out=None,
):
    """DPM-Solver++ SDE step (k-diffusion sample_dpmpp_sde), its second stage.

    The first stage is x_mid = euler_ancestral_step(x, D, σ, σ_s, eta=η, s_noise=s_noise) with
    σ_s = dpmpp_sde_sigma_mid(σ, σ', r), and D_mid = D(x_mid; σ_s). Then with (σ_down, σ_up) of σ → σ'
    (euler_ancestral_step) and D̄ = (1 − 1/(2r))·D + 1/(2r)·D_mid:
    x' = (σ_down/σ)·x + (1 − σ_down/σ)·D̄ + s_noise·σ_up·z. Where σ' = 0: x' = D (denoised_mid not read;
    None is accepted only if every σ' is 0). r in (0, 1]. Shapes, dtypes, gradients as euler_ancestral_step.
    """
    op = "dpmpp_sde_step"
    _check(
        op,
        x,
        {"denoised": denoised, "denoised_mid": denoised_mid, "noise": noise},
        seed,
        generator,
        offset,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
        eta=eta,
        s_noise=s_noise,
    )
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"fastcm.{op}: r={r!r} is not supported; expected a float in (0, 1]")
    if denoised_mid is None and not _all_zero(sigma_next):
        raise ValueError(
            f"fastcm.{op}: denoised_mid is None but sigma_next={sigma_next!r} is not 0; "
            "denoised_mid = D(x_mid; sigma_mid) is required unless every sigma_next is 0"
        )
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.dpmpp_sde_step(
                x,
                denoised,
                sigma,
                sigma_next,
                denoised_mid=denoised_mid,
                r=r,
                eta=eta,
                s_noise=s_noise,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    s, s_next, down, noise_scale = _ancestral_coefs(op, x, sigma, sigma_next, eta, s_noise)
    final = (s_next == 0) * 1.0
    ratio = down / s
    fac = 1 / (2 * r)
    coefs = (ratio, (1 - ratio) * (1 - fac) * (1 - final) + final, (1 - ratio) * fac * (1 - final), 0.0, noise_scale)
    return _run(
        op, x, (x, denoised, denoised_mid, None), coefs, out, noise=noise, seed=seed, generator=generator, offset=offset
    )


def _log_steps(op, x, sigma, sigma_next, eta, s_noise, **previous):
    """Parameters as floats or (B,) float64 tensors, with final = [σ' = 0] and h = log(σ/σ') (1 where final,
    so that every coefficient formula stays finite; the final update is selected separately)."""
    names = dict(sigma=sigma, sigma_next=sigma_next, eta=eta, s_noise=s_noise, **previous)
    values = dict(zip(names, _steps._params(op, x, **names)))
    m = _steps._lib(*values.values())
    s, s_next = values["sigma"], values["sigma_next"]
    final = (s_next == 0) * 1.0
    h = m.log(s / (s_next + final * s)) + final
    return values, final, h, m


def _noise_amplitude(m, s_next, eta_h, s_noise):
    """s_noise·σ'·√(−expm1(−2ηh)), the SDE's noise amplitude over one step."""
    return s_noise * s_next * m.sqrt(-m.expm1(-2 * eta_h))


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
    out=None,
):
    """DPM-Solver++(2M) SDE step (k-diffusion sample_dpmpp_2m_sde) from σ to σ'.

    h = log(σ/σ'), ηh = η·h, g = −expm1(−h − ηh):
    x' = (σ'/σ)·e^(−ηh)·x + g·D + k·(D − D_prev) + s_noise·σ'·√(−expm1(−2ηh))·z, with r = log(σ_prev/σ)/h and
    k = g/(2r) (solver_type="midpoint") or (g/(−h − ηh) + 1)/r ("heun"); k = 0 on the first step
    (old_denoised and sigma_prev None). Where σ' = 0: x' = D. eta = 0 is the deterministic 2M variant.
    sigma, sigma_prev > 0, 0 ≤ sigma_next ≤ sigma. Shapes, dtypes, gradients as euler_ancestral_step.
    """
    op = "dpmpp_2m_sde_step"
    _check(
        op,
        x,
        {"denoised": denoised, "old_denoised": old_denoised, "noise": noise},
        seed,
        generator,
        offset,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
        eta=eta,
        s_noise=s_noise,
    )
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"fastcm.{op}: solver_type={solver_type!r} is not supported; expected one of {SOLVER_TYPES}")
    if (old_denoised is None) != (sigma_prev is None):
        raise ValueError(
            f"fastcm.{op}: old_denoised and sigma_prev go together (the multistep branch) or are both "
            f"None (first step); got sigma_prev={sigma_prev!r}"
        )
    if sigma_prev is not None:
        _steps._require_positive(op, "sigma_prev", sigma_prev)
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.dpmpp_2m_sde_step(
                x,
                denoised,
                sigma,
                sigma_next,
                old_denoised=old_denoised,
                sigma_prev=sigma_prev,
                eta=eta,
                s_noise=s_noise,
                solver_type=solver_type,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    previous = {} if sigma_prev is None else {"sigma_prev": sigma_prev}
    v, final, h, m = _log_steps(op, x, sigma, sigma_next, eta, s_noise, **previous)
    eta_h = v["eta"] * h
    gain = -m.expm1(-h - eta_h)
    k = 0.0
    if sigma_prev is not None:
        inv_r = h / m.log(v["sigma_prev"] / v["sigma"])
        k = (gain / 2 if solver_type == "midpoint" else gain / (-h - eta_h) + 1) * inv_r
    keep = 1 - final
    coefs = (
        v["sigma_next"] / v["sigma"] * m.exp(-eta_h) * keep,
        (gain + k) * keep + final,
        -k * keep,
        0.0,
        _noise_amplitude(m, v["sigma_next"], eta_h, v["s_noise"]) * keep,
    )
    return _run(
        op, x, (x, denoised, old_denoised, None), coefs, out, noise=noise, seed=seed, generator=generator, offset=offset
    )


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
    out=None,
):
    """DPM-Solver++(3M) SDE step (k-diffusion sample_dpmpp_3m_sde) from σ to σ'.

    h = log(σ/σ'), h_η = (η + 1)·h, φ2 = expm1(−h_η)/h_η + 1, φ3 = φ2/h_η − ½;
    x' = e^(−h_η)·x − expm1(−h_η)·D + correction + s_noise·σ'·√(−expm1(−2ηh))·z, where D_1, D_2 are the
    denoised outputs at σ_prev, σ_prev2 (h_1 = log(σ_prev/σ), h_2 = log(σ_prev2/σ_prev)):
      third order: r0 = h_1/h, r1 = h_2/h, d1_0 = (D − D_1)/r0, d1_1 = (D_1 − D_2)/r1,
        correction = φ2·(d1_0 + (d1_0 − d1_1)·r0/(r0 + r1)) − φ3·(d1_0 − d1_1)/(r0 + r1);
      second order (denoised_2 None): φ2·(D − D_1)·h/h_1; first order (both None): 0.
    Where σ' = 0: x' = D. One pass over x, D, D_1, D_2 (and z). Shapes, dtypes, gradients as
    euler_ancestral_step (plus denoised_1, denoised_2).
    """
    op = "dpmpp_3m_sde_step"
    _check(
        op,
        x,
        {"denoised": denoised, "denoised_1": denoised_1, "denoised_2": denoised_2, "noise": noise},
        seed,
        generator,
        offset,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
        eta=eta,
        s_noise=s_noise,
    )
    if (denoised_1 is None) != (sigma_prev is None) or (denoised_2 is None) != (sigma_prev2 is None):
        raise ValueError(
            f"fastcm.{op}: denoised_1 goes with sigma_prev and denoised_2 with sigma_prev2; got "
            f"sigma_prev={sigma_prev!r}, sigma_prev2={sigma_prev2!r}"
        )
    if denoised_2 is not None and denoised_1 is None:
        raise ValueError(f"fastcm.{op}: denoised_2 needs denoised_1 (the third-order branch uses both)")
    for name, value in (("sigma_prev", sigma_prev), ("sigma_prev2", sigma_prev2)):
        if value is not None:
            _steps._require_positive(op, name, value)
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.dpmpp_3m_sde_step(
                x,
                denoised,
                sigma,
                sigma_next,
                denoised_1=denoised_1,
                denoised_2=denoised_2,
                sigma_prev=sigma_prev,
                sigma_prev2=sigma_prev2,
                eta=eta,
                s_noise=s_noise,
                noise=noise,
                seed=seed,
                generator=generator,
                offset=offset,
            ),
            out,
        )
    previous = {
        name: value for name, value in (("sigma_prev", sigma_prev), ("sigma_prev2", sigma_prev2)) if value is not None
    }
    v, final, h, m = _log_steps(op, x, sigma, sigma_next, eta, s_noise, **previous)
    h_eta = h * (v["eta"] + 1)
    c_d, c_1, c_2 = -m.expm1(-h_eta), 0.0, 0.0
    if denoised_1 is not None:
        phi_2 = m.expm1(-h_eta) / h_eta + 1
        r0 = m.log(v["sigma_prev"] / v["sigma"]) / h
        if denoised_2 is None:
            c_d, c_1 = c_d + phi_2 / r0, -phi_2 / r0
        else:
            r1 = m.log(v["sigma_prev2"] / v["sigma_prev"]) / h
            phi_3 = phi_2 / h_eta - 0.5
            # correction = α·d1_0 + β·d1_1 with d1_0 = (D − D_1)/r0, d1_1 = (D_1 − D_2)/r1
            alpha = phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)
            beta = -phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1)
            c_d, c_1, c_2 = c_d + alpha / r0, -alpha / r0 + beta / r1, -beta / r1
    keep = 1 - final
    coefs = (
        m.exp(-h_eta) * keep,
        c_d * keep + final,
        c_1 * keep,
        c_2 * keep,
        _noise_amplitude(m, v["sigma_next"], v["eta"] * h, v["s_noise"]) * keep,
    )
    return _run(
        op,
        x,
        (x, denoised, denoised_1, denoised_2),
        coefs,
        out,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


UNIPC_MAX_ORDER = 3


def _rhos(nodes, rhs):
    """ρ with Σ_k ρ_k·r_k^(i−1) = b_i (i = 1..n ≤ 3) in closed form: the system is a transposed Vandermonde one,
    so ρ_k = Σ_i b_i·[r^(i−1)] L_k(r) with L_k the Lagrange basis polynomial of node k. Floats or tensors."""
    rhos = []
    for k, node in enumerate(nodes):
        others = nodes[:k] + nodes[k + 1 :]
        denominator = 1.0
        for other in others:
            denominator = denominator * (node - other)
        if len(others) == 0:
            numerator = rhs[0]
        elif len(others) == 1:
            numerator = rhs[1] - others[0] * rhs[0]
        else:
            numerator = rhs[2] - (others[0] + others[1]) * rhs[1] + others[0] * others[1] * rhs[0]
        rhos.append(numerator / denominator)
    return rhos


def _uni_coefs(m, sigma, sigma_next, levels, order, corrector):
    """(φ1, B(h), coefficients of (D_1, …, D_(order−1)) in −B(h)·Σ ρ_k·(D_k − D)/r_k, ρ_order) on σ → σ':
    UniP (corrector=False; levels = the order − 1 history levels) or UniC (ρ_order multiplies D' − D).
    bh2: φ1 = B(h) = expm1(−h), b_i = i!·φ_(i+1)/B(h) (fastcm.reference.sde_steps._uni_interval)."""
    h = m.log(sigma / sigma_next)
    phi_1 = m.expm1(-h)
    b_h = phi_1
    phi_k, factorial, rhs = phi_1 / -h - 1, 1, []
    for i in range(1, order + 1):
        rhs.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / -h - 1 / factorial
    nodes = [m.log(sigma / level) / h for level in levels]
    if corrector:
        rhos = [0.5] if order == 1 else _rhos(nodes + [1.0], rhs)
        rho_new = rhos[-1]
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else _rhos(nodes, rhs[:2])
        rho_new = 0.0
    return phi_1, b_h, [rho / r for rho, r in zip(rhos, nodes)], rho_new


def _unipc_coefficients(sigma, sigma_next, sigma_history, order, corrector_order):
    """The five coefficients of unipc_step's x' = c0·x + c1·D + c2·D_1 + c3·D_2 + c4·D_3 (σ space), from floats
    (math, float64) or per-sample float64 tensors; sigma_history = (σ_prev, σ_prev2, …) as far as the orders read."""
    m = _steps._lib(sigma, sigma_next, *sigma_history)
    s, s_next, past = sigma, sigma_next, list(sigma_history)
    final = (s_next == 0) * 1.0
    keep = 1 - final
    ratio = s_next / s
    # coefficients of (D, D_1, D_2, D_3) in the corrected point x_c − x
    shift = [0.0, 0.0, 0.0, 0.0]
    if corrector_order:
        _, b_h, corr, rho_new = _uni_coefs(m, past[0], s, past[1:corrector_order], corrector_order, True)
        _, _, pred, _ = _uni_coefs(m, past[0], s, past[1:corrector_order], corrector_order, False)
        pred = pred + [0.0] * (len(corr) - len(pred))
        # UniC − UniP: −B(h)·(Σ_k (ρc_k − ρp_k)·(D_(k+1) − D_1)/r_k + ρ_new·(D − D_1)); the D_1 terms collect.
        diffs = [c - p for c, p in zip(corr, pred)]
        shift[0] = -b_h * rho_new
        shift[1] = b_h * (rho_new + sum(diffs))
        for k, diff in enumerate(diffs):
            shift[k + 2] = -b_h * diff
    # the predictor from σ to σ' (σ' replaced by σ/2 where it is 0: finite coefficients, then not selected)
    safe_next = s_next + final * s / 2
    phi_1, b_h, pred, _ = _uni_coefs(m, s, safe_next, past[: order - 1], order, False)
    step = [-phi_1 + b_h * sum(pred)] + [-b_h * c for c in pred] + [0.0] * (3 - len(pred))
    coefs = [ratio * keep] + [(step[k] + ratio * shift[k]) * keep for k in range(4)]
    coefs[1] = coefs[1] + final
    return coefs


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
    out=None,
):
    """UniPC step (Zhao et al. 2023; bh2, data prediction): the UniC corrector of the previous step and the UniP
    predictor of this one in one pass, in σ space (λ = −log σ) from σ to σ'.

    x is the point the previous predictor reached (where the model gave D = denoised); D_1, D_2, D_3 the data
    predictions at σ_prev > σ_prev2 > σ_prev3 > σ (most recent first). The predictor of order p reads D_1..D_(p−1),
    the corrector of order c (0: none; the order of the predictor that reached x) reads D_1..D_c; history beyond
    that is ignored. With h = log(σ/σ'), φ1 = B(h) = expm1(−h), r_k = log(σ/σ_k)/h, D1_k = (D_k − D)/r_k:
        UniP_p:  x' = (σ'/σ)·x_c − φ1·D − B(h)·Σ_(k<p) ρ_k·D1_k
        UniC_c:  x_c = x + [UniC_c − UniP_c](σ_prev → σ)  (both start from the same previous point, whose
                 (σ/σ_prev)-term cancels, so the corrected point needs only x and D_1..D_c, D: one pass)
    with ρ from the order conditions Σ_k ρ_k·r_k^(i−1) = b_i (b from B(h), see fastcm.reference.sde_steps) and
    diffusers' / the UniPC code's fixed ρ = ½ for UniP_2 and UniC_1. Where σ' = 0: x' = D (the first-order limit,
    whatever the order). x' is linear in (x, D, D_1, D_2, D_3): one pass of the stochastic-step kernel, D_3 in
    its fifth slot. Orders: 1 ≤ order ≤ 3, 0 ≤ corrector_order ≤ 3.

    x, denoised, denoised_k: (B, ...) same shape/dtype/device (float32, bfloat16, float16, float64; computed in
    float32, float64 for float64). sigma > 0, sigma_next ≥ 0, sigma_prev* > 0: float, 0-d, (B,) or (B,1,..,1).
    Gradients/tangents: x, denoised, denoised_k and tensor sigmas. `out=` writes x' in place (no-grad only).
    """
    op = "unipc_step"
    history = (denoised_1, denoised_2, denoised_3)
    levels = (sigma_prev, sigma_prev2, sigma_prev3)
    _check(
        op,
        x,
        {"denoised": denoised, "denoised_1": denoised_1, "denoised_2": denoised_2, "denoised_3": denoised_3},
        None,
        None,
        0,
        out,
        sigma=sigma,
        sigma_next=sigma_next,
    )
    for name, value in (("order", order), ("corrector_order", corrector_order)):
        low = 1 if name == "order" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= UNIPC_MAX_ORDER:
            raise ValueError(
                f"fastcm.{op}: {name}={value!r} is not supported; expected an int in [{low}, {UNIPC_MAX_ORDER}]"
            )
    needed = max(order - 1, corrector_order)
    for k in range(3):
        suffix = "" if k == 0 else str(k + 1)
        if (history[k] is None) != (levels[k] is None):
            raise ValueError(
                f"fastcm.{op}: denoised_{k + 1} and sigma_prev{suffix} go together; got "
                f"sigma_prev{suffix}={levels[k]!r} with denoised_{k + 1} {'None' if history[k] is None else 'given'}"
            )
        if k < needed and history[k] is None:
            raise ValueError(
                f"fastcm.{op}: order={order}, corrector_order={corrector_order} read denoised_1..denoised_{needed} "
                f"and their sigma_prev levels; denoised_{k + 1} is None"
            )
        if levels[k] is not None:
            _steps._require_positive(op, f"sigma_prev{suffix}", levels[k])
    chain = [sigma_next, sigma] + list(levels[:needed])
    if all(isinstance(v, (int, float)) for v in chain) and any(a >= b for a, b in zip(chain, chain[1:])):
        raise ValueError(
            f"fastcm.{op}: the levels sigma_next={sigma_next!r}, sigma={sigma!r}, sigma_prev..="
            f"{list(levels[:needed])!r} are not supported; expected sigma_next < sigma < sigma_prev < sigma_prev2 "
            "< sigma_prev3 (a step goes down in noise; equal levels make h = 0)"
        )
    history, levels = history[:needed], levels[:needed]
    if select_backend(op, x.device) == "reference":
        named = {f"denoised_{k + 1}": d for k, d in enumerate(history)}
        named.update({f"sigma_prev{'' if k == 0 else k + 1}": s for k, s in enumerate(levels)})
        return _steps._finish_reference(
            reference.unipc_step(x, denoised, sigma, sigma_next, order=order, corrector_order=corrector_order, **named),
            out,
        )
    names = dict(sigma=sigma, sigma_next=sigma_next)
    names.update({f"level{k}": s for k, s in enumerate(levels)})
    values = _steps._params(op, x, **names)
    coefs = _unipc_coefficients(values[0], values[1], values[2:], order, corrector_order)
    tensors = (x, denoised) + tuple(history) + (None,) * (3 - len(history))
    if tensors[4] is None:
        coefs[4] = 0.0  # a tensor coefficient with no tensor would draw in-kernel noise into the fifth slot
    return _run(op, x, tensors[:4], tuple(coefs), out, noise=tensors[4])


__all__ = [
    "unipc_step",
    "UNIPC_MAX_ORDER",
    "churn_step",
    "euler_ancestral_step",
    "dpmpp_2s_ancestral_step",
    "dpmpp_2s_ancestral_sigma_mid",
    "dpmpp_sde_step",
    "dpmpp_sde_sigma_mid",
    "dpmpp_2m_sde_step",
    "dpmpp_3m_sde_step",
    "SOLVER_TYPES",
]
