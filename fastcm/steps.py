"""Sampler steps, each one fused pass: Euler, Heun, DPM-Solver++(2M), DDIM, CM and TrigFlow
re-noising, classifier-free guidance.

Each step is linear in its tensor inputs, x' = c_x·x + c_D·D + c_E·E + c_z·z, with per-sample
coefficients computed here (in float64, from Python floats without any launch, or from per-sample
tensors with differentiable torch ops) and one Triton kernel doing the memory-bound part.

Noise (cm_step, trigflow_step, ddim_step with eta > 0): `noise=` (a tensor like x, z ~ N(0, I))
is used by every backend as given. Without it, the Triton kernel draws z in-kernel (Philox, key
`seed`, element i of the flattened tensor at counter offset + i; nothing is materialised) and the
reference backend draws torch.randn from a generator seeded with (seed, offset). Both streams are
deterministic (same seed and offset → bitwise the same result) but they differ from each other.
Without `seed`, a seed is drawn from `generator` (a torch.Generator) or torch's global CPU
generator, so torch.manual_seed makes calls reproducible. A call that needs N noise elements
uses counters [offset, offset + N): pass offset + N to the next call for fresh noise.

Gradients and forward-mode tangents flow to every tensor input (x, denoised, denoised_next,
old_denoised, eps, eps_cond, eps_uncond, noise) and to per-sample parameters given as tensors
(sigma, sigma_next, sigma_prev, t_next, alpha_bar, alpha_bar_next, eta, guidance_scale,
guidance_rescale). `out=` writes the result in place (it may be x itself) and is for
no-grad use only.
"""

import math

import torch

from . import _checks
from ._backend import select_backend
from ._checks import compute_dtype
from ._library import kernel_ops
from ._params import per_sample, view_per_sample
from .reference import steps as reference
from .reference.steps import draw_seed


def _fake_linear_combination(like, t0, t1, t2, noise, coefs, scalar_coefs, seed, offset, philox):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _fake_guided_moments(eps_cond, eps_uncond, scale, scalar_scale):
    work = compute_dtype(eps_cond)
    return eps_cond.new_empty((eps_cond.shape[0], 4), dtype=work)


def _launchers():
    """The launchers themselves: out= writes in place, which the (non-mutating) custom op cannot."""
    from .kernels import steps as launchers

    return launchers


_ops = kernel_ops(
    "steps",
    {
        "linear_combination": ("linear_combination", _fake_linear_combination),
        "guided_moments": ("guided_moments", _fake_guided_moments),
    },
)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _coef_view(coefs, scalar_coefs, k, like):
    """Coefficient k broadcastable against `like`: a (B, 1, ..., 1) tensor or a float."""
    return scalar_coefs[k] if coefs is None else view_per_sample(coefs[:, k], like).to(like.dtype)


def _per_sample_dot(a, b):
    work = compute_dtype(a)
    return (a.to(work) * b.to(work)).reshape(a.shape[0], -1).sum(1)


def _combine_differentiable(like, terms, noise, coefs, scalar_coefs):
    """The same linear combination in torch ops (for double backward / jvp under grad)."""
    out = torch.zeros_like(like)
    for k, term in enumerate(terms + (noise,)):
        if term is not None:
            out = out + _coef_view(coefs, scalar_coefs, k, like) * term
    return out


def _philox_noise(like, seed, offset):
    """The kernel's own noise z for (seed, offset), shaped like `like`: the noise term alone, as the
    forward drew it (needed by the gradient and tangent of the noise coefficient)."""
    return _ops.linear_combination(like, None, None, None, None, None, _NOISE_ONLY, seed, offset, True)


_NOISE_ONLY = [0.0, 0.0, 0.0, 1.0]  # coefficients of (t0, t1, t2, z)


class _LinearStep(torch.autograd.Function):
    """out = c0·t0 + c1·t1 + c2·t2 + c3·z; coefs (B, 4) tensor or None with scalar_coefs."""

    @staticmethod
    def forward(coefs, t0, t1, t2, noise, scalar_coefs, seed, offset, philox):
        return _ops.linear_combination(t1, t0, t1, t2, noise, coefs, scalar_coefs, seed, offset, philox)

    @staticmethod
    def setup_context(ctx, inputs, output):
        coefs, t0, t1, t2, noise, scalar_coefs, seed, offset, philox = inputs
        ctx.options = (list(scalar_coefs), seed, offset, philox)
        ctx.save_for_backward(coefs, t0, t1, t2, noise)
        ctx.save_for_forward(coefs, t0, t1, t2, noise)

    @staticmethod
    def backward(ctx, grad_out):
        coefs, t0, t1, t2, noise = ctx.saved_tensors
        scalar_coefs, seed, offset, philox = ctx.options
        needs = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grads = [None] * 9
        for k in range(4):
            if not needs[k + 1]:
                continue
            if torch.is_grad_enabled():
                grads[k + 1] = grad_out * _coef_view(coefs, scalar_coefs, k, grad_out)
            else:
                # One-term combination: slot k holds the gradient, so it is scaled by coefficient k.
                slots = [grad_out if j == k else None for j in range(4)]
                grads[k + 1] = _ops.linear_combination(grad_out, *slots, coefs, scalar_coefs, 0, 0, False)
        if needs[0]:
            if philox and noise is None:
                noise = _philox_noise(grad_out, seed, offset)
            columns = [
                torch.zeros(grad_out.shape[0], dtype=coefs.dtype, device=coefs.device)
                if t is None
                else _per_sample_dot(grad_out, t).to(coefs.dtype)
                for t in (t0, t1, t2, noise)
            ]
            grads[0] = torch.stack(columns, dim=1)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, coefs_t, t0_t, t1_t, t2_t, noise_t, *_):
        coefs, t0, t1, t2, noise = ctx.saved_tensors
        scalar_coefs, seed, offset, philox = ctx.options
        like = t1
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (coefs, t0, t1, t2, noise, coefs_t, t0_t, t1_t, t2_t, noise_t)
        )
        tangents = (t0_t, t1_t, t2_t)
        has_term_tangents = any(t is not None for t in tangents + (noise_t,))
        # With both parts, each is kept in the compute dtype and rounded to the output dtype once.
        both = has_term_tangents and coefs_t is not None
        part_like = like.new_empty(like.shape, dtype=compute_dtype(like)) if both else like
        out_t = None
        if has_term_tangents:
            if differentiable:
                out_t = _combine_differentiable(like, tangents, noise_t, coefs, scalar_coefs)
            else:
                out_t = _ops.linear_combination(
                    part_like, *map(_contiguous, tangents), _contiguous(noise_t), coefs, scalar_coefs, 0, 0, False
                )
        if coefs_t is not None:
            if philox and noise is None:
                noise = _philox_noise(like, seed, offset)
            if differentiable:
                from_coefs = _combine_differentiable(like, (t0, t1, t2), noise, coefs_t, None)
            else:
                from_coefs = _ops.linear_combination(
                    part_like, t0, t1, t2, noise, coefs_t.contiguous(), [0.0] * 4, 0, 0, False
                )
            out_t = from_coefs if out_t is None else (out_t + from_coefs).to(like.dtype)
        return torch.zeros_like(like) if out_t is None else out_t


class _GuidedStd(torch.autograd.Function):
    """Per-sample unbiased std of ε_c and of ε̃ = ε_u + w·(ε_c − ε_u): a (B, 2) tensor."""

    @staticmethod
    def forward(eps_cond, eps_uncond, scale, scalar_scale):
        return _ops.guided_moments(eps_cond, eps_uncond, scale, scalar_scale)[:, 1::2].clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        eps_cond, eps_uncond, scale, scalar_scale = inputs
        ctx.scalar_scale = scalar_scale
        ctx.save_for_backward(eps_cond, eps_uncond, scale, output)
        ctx.save_for_forward(eps_cond, eps_uncond, scale, output)

    @staticmethod
    def _centered(ctx):
        eps_cond, eps_uncond, scale, std = ctx.saved_tensors
        work = std.dtype
        cond, uncond = eps_cond.to(work), eps_uncond.to(work)
        w = ctx.scalar_scale if scale is None else view_per_sample(scale.to(work), cond)
        guided = uncond + w * (cond - uncond)
        dims = tuple(range(1, cond.dim()))
        denominator = (cond[0].numel() - 1) * std
        return (
            cond - cond.mean(dims, keepdim=True),
            guided - guided.mean(dims, keepdim=True),
            cond - uncond,
            w,
            denominator,
            work,
        )

    @staticmethod
    def backward(ctx, grad_std):
        eps_cond, eps_uncond, scale, _ = ctx.saved_tensors
        cond_centered, guided_centered, difference, w, denominator, work = _GuidedStd._centered(ctx)
        gain = grad_std / denominator
        grad_guided = view_per_sample(gain[:, 1], guided_centered) * guided_centered
        grad_cond = view_per_sample(gain[:, 0], cond_centered) * cond_centered + w * grad_guided
        grad_uncond = (1 - w) * grad_guided
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[2]:
            grad_scale = _per_sample_dot(grad_guided, difference).to(scale.dtype)
        return grad_cond.to(eps_cond.dtype), grad_uncond.to(eps_uncond.dtype), grad_scale, None

    @staticmethod
    def jvp(ctx, cond_t, uncond_t, scale_t, _):
        cond_centered, guided_centered, difference, w, denominator, work = _GuidedStd._centered(ctx)
        zero = torch.zeros_like(cond_centered)
        cond_t = zero if cond_t is None else cond_t.to(work)
        uncond_t = zero if uncond_t is None else uncond_t.to(work)
        guided_t = uncond_t + w * (cond_t - uncond_t)
        if scale_t is not None:
            guided_t = guided_t + view_per_sample(scale_t.to(work), difference) * difference
        std_t = torch.stack([_per_sample_dot(cond_centered, cond_t), _per_sample_dot(guided_centered, guided_t)], 1)
        return std_t / denominator


def _is_tensor(*values):
    return any(isinstance(v, torch.Tensor) for v in values)


def _lib(*values):
    """math for Python floats (no launches, full float64), torch for per-sample tensors."""
    return torch if _is_tensor(*values) else math


def _params(op, x, **named):
    """The per-sample parameters as floats if all are numbers, else as (B,) float64 tensors."""
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            per_sample(op, name, value, x)  # raises the shared TypeError
    if not _is_tensor(*named.values()):
        return [float(v) for v in named.values()]
    return [per_sample(op, name, value, x, dtype=torch.float64) for name, value in named.items()]


def _pack(coefs, x):
    """(coef tensor (B, 4) or None, four floats) for the kernel."""
    if not _is_tensor(*coefs):
        return None, [float(c) for c in coefs]
    reference_column = next(c for c in coefs if isinstance(c, torch.Tensor))
    columns = [c if isinstance(c, torch.Tensor) else torch.full_like(reference_column, c) for c in coefs]
    return torch.stack(columns, dim=1).to(compute_dtype(x)), [0.0] * 4


def _check_tensors(op, main_name, main, **others):
    _checks.check_tensor(op, main_name, main, min_dim=1)
    for name, value in others.items():
        if value is None:
            continue
        _checks.check_like(op, name, value, main_name, main, min_dim=1)


def _check_out(op, out, main_name, main):
    if out is None:
        return
    _check_tensors(op, main_name, main, out=out)


def _check_noise_args(op, seed, generator, offset):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"fastcm.{op}: seed={seed!r} is not supported; expected an int in [0, 2**63) or None")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"fastcm.{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None and generator is not None:
        raise ValueError(f"fastcm.{op}: pass seed or generator, not both (got seed={seed} and a generator)")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"fastcm.{op}: offset={offset!r} is not supported; expected an int >= 0")


def _require_positive(op, name, value, *, allow_zero=False):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (value >= 0 if allow_zero else value > 0):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected {bound}")


def _run(op, x, terms, coefs, out, *, stochastic=False, noise=None, seed=None, generator=None, offset=0):
    """Launch x' = Σ coefs·terms (+ the noise term) on the fast path; terms = (t0, t1, t2).
    `stochastic`: the noise coefficient may be nonzero, so draw z in-kernel unless `noise` is given."""
    coef_tensor, scalar_coefs = _pack(coefs, x)
    philox = stochastic and noise is None
    if philox and seed is None:
        seed = draw_seed(generator)
    seed = 0 if seed is None else seed
    terms = tuple(_contiguous(t) for t in terms)
    noise = _contiguous(noise)
    if out is not None:
        tracked = [t for t in terms + (noise, coef_tensor) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
            raise RuntimeError(
                f"fastcm.{op}: out= does not support autograd (an input requires grad); "
                "call it under torch.no_grad() or drop out="
            )
        if torch.compiler.is_compiling() or not out.is_contiguous():
            out.copy_(_ops.linear_combination(terms[1], *terms, noise, coef_tensor, scalar_coefs, seed, offset, philox))
        else:
            _launchers().linear_combination_into(out, *terms, noise, coef_tensor, scalar_coefs, seed, offset, philox)
        return out
    return _LinearStep.apply(coef_tensor, *terms, noise, scalar_coefs, seed, offset, philox)


def _finish_reference(result, out):
    if out is None:
        return result
    return out.copy_(result)


def euler_step(x, denoised, sigma, sigma_next, *, out=None):
    """EDM Euler step of the probability-flow ODE from σ to σ'.

    d = (x − D)/σ, x' = x + (σ'−σ)·d  (= (σ'/σ)·x + (1 − σ'/σ)·D, one pass).
    x, denoised: (B, ...), same shape/dtype/device (float32, bfloat16, float16, float64); computed
    in float32 (float64 for float64). sigma > 0, sigma_next ≥ 0: float, 0-d, (B,) or (B,1,..,1).
    Returns a tensor like x (or `out`). Gradients/tangents: x, denoised, tensor sigma/sigma_next.
    """
    op = "euler_step"
    _check_tensors(op, "x", x, denoised=denoised)
    _check_out(op, out, "x", x)
    _require_positive(op, "sigma", sigma)
    _require_positive(op, "sigma_next", sigma_next, allow_zero=True)
    if select_backend(op, x.device) == "reference":
        return _finish_reference(reference.euler_step(x, denoised, sigma, sigma_next), out)
    s, s_next = _params(op, x, sigma=sigma, sigma_next=sigma_next)
    ratio = s_next / s
    return _run(op, x, (x, denoised, None), (ratio, 1 - ratio, 0.0, 0.0), out)


def heun_step(x, denoised, sigma, sigma_next, *, denoised_next=None, out=None):
    """EDM Heun (second-order) step from σ to σ', given D = D(x; σ) and D̃ = D(x̃; σ') at the Euler
    prediction x̃ = euler_step(x, denoised, sigma, sigma_next).

    d = (x − D)/σ, d̃ = (x̃ − D̃)/σ', x' = x + (σ'−σ)·(d + d̃)/2, fused as x' = x̃ + (σ'−σ)/(2σ')·(D − D̃)
    without reading x̃. Where σ' = 0 the step is Euler's (x' = D) and D̃ is ignored;
    denoised_next=None is accepted only when every σ' is 0 (checked; a tensor sigma_next syncs).
    Shapes, dtypes and gradients as euler_step (plus denoised_next).
    """
    op = "heun_step"
    _check_tensors(op, "x", x, denoised=denoised, denoised_next=denoised_next)
    _check_out(op, out, "x", x)
    _require_positive(op, "sigma", sigma)
    _require_positive(op, "sigma_next", sigma_next, allow_zero=True)
    if denoised_next is None:
        final = bool((sigma_next == 0).all()) if isinstance(sigma_next, torch.Tensor) else sigma_next == 0
        if not final:
            raise ValueError(
                f"fastcm.{op}: denoised_next is None but sigma_next={sigma_next!r} is not 0; "
                "denoised_next=D(x̃; sigma_next) is required unless every sigma_next is 0"
            )
        return euler_step(x, denoised, sigma, sigma_next, out=out)
    if select_backend(op, x.device) == "reference":
        return _finish_reference(reference.heun_step(x, denoised, sigma, sigma_next, denoised_next=denoised_next), out)
    s, s_next = _params(op, x, sigma=sigma, sigma_next=sigma_next)
    ratio = s_next / s
    final = (s_next == 0) * 1.0
    correction = (s_next - s) / (2 * (s_next + final)) * (1 - final)  # (σ'−σ)/(2σ'), 0 where σ' = 0
    return _run(op, x, (x, denoised, denoised_next), (ratio, 1 - ratio + correction, -correction, 0.0), out)


def dpmpp_2m_step(x, denoised, sigma, sigma_next, *, old_denoised=None, sigma_prev=None, out=None):
    """DPM-Solver++(2M) step (k-diffusion sample_dpmpp_2m, σ-space) from σ to σ'.

    λ = −log σ, h = λ' − λ, expm1(−h) = σ'/σ − 1.
    First step (old_denoised and sigma_prev None): x' = (σ'/σ)·x − expm1(−h)·D.
    Later steps: r = h_prev/h with h_prev = λ − λ_prev, D̄ = (1 + 1/(2r))·D − (1/(2r))·old_denoised,
    x' = (σ'/σ)·x − expm1(−h)·D̄. Where σ' = 0 the first-order update (x' = D) is used.
    sigma, sigma_prev > 0, sigma_next ≥ 0. Shapes, dtypes, gradients as euler_step (plus old_denoised).
    """
    op = "dpmpp_2m_step"
    _check_tensors(op, "x", x, denoised=denoised, old_denoised=old_denoised)
    _check_out(op, out, "x", x)
    if (old_denoised is None) != (sigma_prev is None):
        raise ValueError(
            f"fastcm.{op}: old_denoised and sigma_prev go together (the multistep branch) or are "
            f"both None (first step); got old_denoised={'None' if old_denoised is None else 'a tensor'}"
            f" and sigma_prev={sigma_prev!r}"
        )
    _require_positive(op, "sigma", sigma)
    _require_positive(op, "sigma_next", sigma_next, allow_zero=True)
    if sigma_prev is not None:
        _require_positive(op, "sigma_prev", sigma_prev)
        if not _is_tensor(sigma, sigma_prev) and sigma_prev == sigma:
            raise ValueError(
                f"fastcm.{op}: sigma_prev={sigma_prev!r} equals sigma; the previous step must have "
                "moved (h_prev = log(sigma_prev/sigma) is the divisor of 1/(2r))"
            )
    if select_backend(op, x.device) == "reference":
        return _finish_reference(
            reference.dpmpp_2m_step(x, denoised, sigma, sigma_next, old_denoised=old_denoised, sigma_prev=sigma_prev),
            out,
        )
    if old_denoised is None:
        s, s_next = _params(op, x, sigma=sigma, sigma_next=sigma_next)
        ratio = s_next / s
        return _run(op, x, (x, denoised, None), (ratio, 1 - ratio, 0.0, 0.0), out)
    s, s_next, s_prev = _params(op, x, sigma=sigma, sigma_next=sigma_next, sigma_prev=sigma_prev)
    m = _lib(s, s_next, s_prev)
    ratio = s_next / s
    em = ratio - 1
    final = (s_next == 0) * 1.0
    h = m.log(s / (s_next + final * s))
    half_inv_r = h / (2 * m.log(s_prev / s)) * (1 - final)  # 1/(2r); 0 where σ' = 0
    return _run(op, x, (x, denoised, old_denoised), (ratio, -em * (1 + half_inv_r), em * half_inv_r, 0.0), out)


def ddim_step(x, eps, alpha_bar, alpha_bar_next, *, eta=0.0, noise=None, seed=None, generator=None, offset=0, out=None):
    """DDIM step for an ε-prediction model, from ᾱ to ᾱ' (cumulative alphas, ᾱ < ᾱ' ≤ 1).

    x0 = (x − √(1−ᾱ)·ε)/√ᾱ, x' = √ᾱ'·x0 + √(1−ᾱ'−s²)·ε + s·z, s = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ').
    eta ≥ 0 (0: deterministic DDIM; 1: DDPM-like; > 1 can make 1−ᾱ'−s² negative and the result NaN).
    alpha_bar in (0, 1), alpha_bar_next in (0, 1]; floats, 0-d, (B,) or (B,1,..,1).
    z: `noise` or in-kernel noise from (seed | generator, offset), see the module docstring.
    x, eps: same shape/dtype/device. Gradients/tangents: x, eps, noise and tensor parameters.
    """
    op = "ddim_step"
    _check_tensors(op, "x", x, eps=eps, noise=noise)
    _check_noise_args(op, seed, generator, offset)
    _check_out(op, out, "x", x)
    for name, value, upper in (("alpha_bar", alpha_bar, "< 1"), ("alpha_bar_next", alpha_bar_next, "<= 1")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (0 < value < 1 if upper == "< 1" else 0 < value <= 1):
                raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected > 0 and {upper}")
    _require_positive(op, "eta", eta, allow_zero=True)
    if select_backend(op, x.device) == "reference":
        return _finish_reference(
            reference.ddim_step(
                x, eps, alpha_bar, alpha_bar_next, eta=eta, noise=noise, seed=seed, generator=generator, offset=offset
            ),
            out,
        )
    ab, ab_next, eta_b = _params(op, x, alpha_bar=alpha_bar, alpha_bar_next=alpha_bar_next, eta=eta)
    m = _lib(ab, ab_next, eta_b)
    s = eta_b * m.sqrt((1 - ab_next) / (1 - ab)) * m.sqrt(1 - ab / ab_next)
    c_x = m.sqrt(ab_next) / m.sqrt(ab)
    c_eps = m.sqrt(1 - ab_next - s * s) - c_x * m.sqrt(1 - ab)
    return _run(
        op,
        x,
        (x, eps, None),
        (c_x, c_eps, 0.0, s),
        out,
        stochastic=_is_tensor(eta) or eta != 0,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def cm_step(denoised, sigma_next, *, sigma_min=0.002, noise=None, seed=None, generator=None, offset=0, out=None):
    """Consistency-model multistep re-noising (Consistency Models, Algorithm 1; openai/consistency_models):
    x' = D + √(σ'² − σmin²)·z, z ~ N(0, I).

    denoised: (B, ...) float32/bfloat16/float16/float64; sigma_next ≥ sigma_min (float, 0-d, (B,),
    (B,1,..,1)). z: `noise` or in-kernel noise from (seed | generator, offset), see the module
    docstring; at σ' = σmin (float) no noise is drawn and x' = D. Gradients/tangents: denoised,
    noise, tensor sigma_next.
    """
    op = "cm_step"
    _check_tensors(op, "denoised", denoised, noise=noise)
    _check_noise_args(op, seed, generator, offset)
    _check_out(op, out, "denoised", denoised)
    _require_positive(op, "sigma_min", sigma_min, allow_zero=True)
    if isinstance(sigma_next, (int, float)) and not isinstance(sigma_next, bool) and not sigma_next >= sigma_min:
        raise ValueError(f"fastcm.{op}: sigma_next={sigma_next!r} is not supported; expected >= sigma_min={sigma_min}")
    if select_backend(op, denoised.device) == "reference":
        return _finish_reference(
            reference.cm_step(
                denoised, sigma_next, sigma_min=sigma_min, noise=noise, seed=seed, generator=generator, offset=offset
            ),
            out,
        )
    (s_next,) = _params(op, denoised, sigma_next=sigma_next)
    noise_scale = _lib(s_next).sqrt(s_next * s_next - sigma_min * sigma_min)
    stochastic = _is_tensor(sigma_next) or sigma_next != sigma_min
    return _run(
        op,
        denoised,
        (None, denoised, None),
        (0.0, 1.0, 0.0, noise_scale),
        out,
        stochastic=stochastic,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def trigflow_step(denoised, t_next, *, sigma_data=0.5, noise=None, seed=None, generator=None, offset=0, out=None):
    """TrigFlow (sCM) multistep re-noising: x' = cos(t')·D + sin(t')·σd·z, z ~ N(0, I).

    denoised: (B, ...) float32/bfloat16/float16/float64; t_next ∈ [0, π/2] (float, 0-d, (B,),
    (B,1,..,1)); at t' = 0 (float) no noise is drawn. z: `noise` or in-kernel noise, see the
    module docstring. Gradients/tangents: denoised, noise, tensor t_next.
    """
    op = "trigflow_step"
    _check_tensors(op, "denoised", denoised, noise=noise)
    _check_noise_args(op, seed, generator, offset)
    _check_out(op, out, "denoised", denoised)
    _require_positive(op, "sigma_data", sigma_data)
    if select_backend(op, denoised.device) == "reference":
        return _finish_reference(
            reference.trigflow_step(
                denoised, t_next, sigma_data=sigma_data, noise=noise, seed=seed, generator=generator, offset=offset
            ),
            out,
        )
    (t,) = _params(op, denoised, t_next=t_next)
    m = _lib(t)
    return _run(
        op,
        denoised,
        (None, denoised, None),
        (0.0, m.cos(t), 0.0, m.sin(t) * sigma_data),
        out,
        stochastic=_is_tensor(t_next) or t_next != 0,
        noise=noise,
        seed=seed,
        generator=generator,
        offset=offset,
    )


def cfg(eps_cond, eps_uncond, guidance_scale, *, guidance_rescale=0.0, out=None):
    """Classifier-free guidance: ε̃ = ε_u + w·(ε_c − ε_u) (w = 1: no guidance), one pass.

    guidance_rescale φ > 0 (diffusers' rescale_noise_cfg): ε̃ ← φ·ε̃·std(ε_c)/std(ε̃) + (1−φ)·ε̃,
    std per sample over all non-batch dims, unbiased; costs a second pass (per-sample moments).
    eps_cond, eps_uncond: (B, ...) same shape/dtype/device; w, φ: float, 0-d, (B,) or (B,1,..,1).
    Gradients/tangents: both eps and tensor w, φ (the rescale's std derivative in torch ops).
    """
    op = "cfg"
    _check_tensors(op, "eps_cond", eps_cond, eps_uncond=eps_uncond)
    _check_out(op, out, "eps_cond", eps_cond)
    _require_positive(op, "guidance_rescale", guidance_rescale, allow_zero=True)
    if select_backend(op, eps_cond.device) == "reference":
        return _finish_reference(
            reference.cfg(eps_cond, eps_uncond, guidance_scale, guidance_rescale=guidance_rescale), out
        )
    rescale = _is_tensor(guidance_rescale) or guidance_rescale != 0
    w, phi = _params(op, eps_cond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    if not rescale:
        return _run(op, eps_cond, (eps_uncond, eps_cond, None), (1 - w, w, 0.0, 0.0), out)
    cond, uncond = eps_cond.contiguous(), eps_uncond.contiguous()
    work = compute_dtype(eps_cond)
    scale_tensor = w.to(work) if isinstance(w, torch.Tensor) else None
    std = _GuidedStd.apply(cond, uncond, scale_tensor, 0.0 if scale_tensor is not None else w)
    gain = phi * std[:, 0].to(torch.float64) / std[:, 1].to(torch.float64) + 1 - phi
    return _run(op, eps_cond, (uncond, cond, None), (gain * (1 - w), gain * w, 0.0, 0.0), out)


__all__ = ["euler_step", "heun_step", "dpmpp_2m_step", "ddim_step", "cm_step", "trigflow_step", "cfg"]
