"""diffusers schedulers whose update runs fastcm's fused steps: drop-in subclasses of diffusers' own.

    pipe.scheduler = fastcm.diffusers.LCMScheduler.from_config(pipe.scheduler.config)

Each class subclasses the diffusers scheduler of the same name, so its config, from_config, set_timesteps,
timesteps, sigmas, scale_model_input, add_noise, init_noise_sigma and order are diffusers' own; only the
update is replaced. Every output of step(...) is one fused pass over (sample, model_output[, the previous
model output], noise), on fastcm.steps' kernel, with the coefficients computed on the host in float64 from
the scheduler's (CPU) tables, and step returns diffusers' output class (or tuple). Covered:
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, DDIMScheduler,
LCMScheduler, TCDScheduler (all prediction types these support) and DPMSolverMultistepScheduler's
"dpmsolver++" and "sde-dpmsolver++" updates (first and second order; third order, "dpmsolver" and
"sde-dpmsolver" run diffusers' code). Configurations whose update is not linear in the model output
(clip_sample, thresholding, FlowMatch's per_token_timesteps and stochastic_sampling) run diffusers' step.

Noise: with generator= (or DDIM's variance_noise=) the noise is drawn exactly as diffusers draws it
(diffusers.utils.torch_utils.randn_tensor), so a run reproduces diffusers' to rounding. Without a generator
diffusers draws torch.randn from the global RNG; fastcm instead draws one seed from the global RNG per step
and the kernel generates the noise in-kernel (Philox, see fastcm.steps): reproducible under torch.manual_seed,
not diffusers' stream. DPMSolverMultistep's SDE noise is drawn by diffusers' own step (randn_tensor) and passed in.

Computes in float32 (float64 for float64 samples); prev_sample is returned in the dtype diffusers returns.
Needs diffusers (`pip install diffusers`); fastcm itself does not depend on it.
"""

import math

import torch

try:
    import diffusers as _diffusers
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("fastcm.diffusers needs diffusers: pip install diffusers") from error

from . import sde_steps as _sde_steps
from . import steps as _steps
from ._backend import select_backend
from ._checks import compute_dtype
from .reference.steps import draw_seed, standard_noise

_OP = "diffusers_step"


def _combine(like, terms, coefs, noise_args=None):
    """c0·t0 + c1·t1 + c2·t2 + c3·z in one pass (fastcm.steps' kernel; torch ops on the reference backend).
    terms: up to three tensors of like's shape (None to skip); coefs: four Python floats; noise_args: {"noise": z}
    or {"seed": s} (in-kernel noise at offset 0) or None when c3 = 0."""
    work = compute_dtype(like)
    terms = tuple(None if t is None else t.to(work) for t in terms) + (None,) * (3 - len(terms))
    noise_args = dict(noise_args or {})
    if noise_args.get("noise") is not None:
        noise_args["noise"] = noise_args["noise"].to(work)
    stochastic = coefs[3] != 0
    if select_backend(_OP, like.device) == "reference":
        out = torch.zeros(like.shape, dtype=work, device=like.device)
        z = (
            standard_noise(out, noise=noise_args.get("noise"), seed=noise_args.get("seed"), offset=0)
            if stochastic
            else None
        )
        for c, t in zip(coefs, terms + (z,)):
            if t is not None and c != 0:
                out = out + c * t
        return out
    x = next(t for t in terms if t is not None)
    return _steps._run(
        _OP,
        x,
        terms,
        list(coefs),
        None,
        stochastic=stochastic,
        noise=noise_args.get("noise"),
        seed=noise_args.get("seed"),
        offset=0,
    )


def _noise_args(like, generator, explicit=None):
    """How a step gets its noise: the explicit tensor, diffusers' randn_tensor from `generator`, or a seed
    for the in-kernel stream drawn from torch's global generator."""
    if explicit is not None:
        return {"noise": explicit}
    if generator is not None:
        return {"noise": randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)}
    return {"seed": draw_seed()}


def _value(t) -> float:
    return float(t) if not isinstance(t, torch.Tensor) else float(t.double().item())


def _x0_eps(prediction_type, alpha_bar):
    """(x0, ε) as (coefficient of sample, coefficient of model output) pairs in ᾱ space."""
    a, b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (1 / a, -b / a), (0.0, 1.0)
    if prediction_type == "sample":
        return (0.0, 1.0), (1 / b, -a / b)
    if prediction_type == "v_prediction":
        return (a, -b), (b, a)
    raise ValueError(
        f"fastcm.diffusers: prediction_type={prediction_type!r} is not supported; expected one of "
        "('epsilon', 'sample', 'v_prediction')"
    )


def _mix(*pairs):
    """Σ w·(c_sample, c_model) over (w, pair) arguments."""
    return (sum(w * p[0] for w, p in pairs), sum(w * p[1] for w, p in pairs))


def _nonlinear(config) -> bool:
    return bool(getattr(config, "thresholding", False) or getattr(config, "clip_sample", False))


class EulerDiscreteScheduler(_diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler with a fused step (churn included)."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        return_dict=True,
    ):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or self.config.prediction_type not in (
            "epsilon",
            "v_prediction",
            "sample",
            "original_sample",
        ):
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = _value(self.sigmas[self.step_index]), _value(self.sigmas[self.step_index + 1])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        churn = s_noise * (sigma_hat**2 - sigma**2) ** 0.5 if gamma > 0 else 0.0
        noise = _noise_args(model_output, generator) if gamma > 0 else None
        # D = α·x̂ + β·m with x̂ = x + churn·z; prev = x̂ + (σ' − σ̂)·(x̂ − D)/σ̂.
        if self.config.prediction_type == "epsilon":
            alpha, beta = 1.0, -sigma_hat
        elif self.config.prediction_type == "v_prediction":
            alpha, beta = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        else:
            alpha, beta = 0.0, 1.0
        ratio = (sigma_next - sigma_hat) / sigma_hat
        sample32 = sample.to(torch.float32) if sample.dtype != torch.float64 else sample
        pred = _combine(sample32, (sample32, model_output), (alpha, beta, 0.0, alpha * churn), noise)
        c_x = 1 + ratio * (1 - alpha)
        prev = _combine(sample32, (sample32, model_output), (c_x, -ratio * beta, 0.0, c_x * churn), noise)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, pred
        return _diffusers.schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=pred
        )


class EulerAncestralDiscreteScheduler(_diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler with a fused step."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or self.config.prediction_type not in (
            "epsilon",
            "v_prediction",
        ):
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = _value(self.sigmas[self.step_index]), _value(self.sigmas[self.step_index + 1])
        up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        down = (sigma_next**2 - up**2) ** 0.5
        if self.config.prediction_type == "epsilon":
            alpha, beta = 1.0, -sigma
        else:
            alpha, beta = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        ratio = (down - sigma) / sigma
        sample32 = sample.to(torch.float32) if sample.dtype != torch.float64 else sample
        pred = _combine(sample32, (sample32, model_output), (alpha, beta, 0.0, 0.0))
        prev = _combine(
            sample32,
            (sample32, model_output),
            (1 + ratio * (1 - alpha), -ratio * beta, 0.0, up),
            _noise_args(model_output, generator),
        )
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return prev, pred
        return _diffusers.schedulers.scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=pred
        )


class FlowMatchEulerDiscreteScheduler(_diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler with the fused flow_euler_step update."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        per_token_timesteps=None,
        return_dict=True,
    ):
        if (
            isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))
            or per_token_timesteps is not None
            or self.config.stochastic_sampling
        ):
            return super().step(
                model_output,
                timestep,
                sample,
                s_churn,
                s_tmin,
                s_tmax,
                s_noise,
                generator,
                per_token_timesteps,
                return_dict,
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = _value(self.sigmas[self.step_index]), _value(self.sigmas[self.step_index + 1])
        sample32 = sample.to(torch.float32) if sample.dtype != torch.float64 else sample
        prev = _combine(sample32, (sample32, model_output), (1.0, sigma_next - sigma, 0.0, 0.0))
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return _diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(
            prev_sample=prev
        )


class DDIMScheduler(_diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler with a fused step (η > 0 included)."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta=0.0,
        use_clipped_model_output=False,
        generator=None,
        variance_noise=None,
        return_dict=True,
    ):
        if (
            self.num_inference_steps is None
            or _nonlinear(self.config)
            or (variance_noise is not None and generator is not None)
        ):
            return super().step(
                model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict
            )
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_bar = _value(self.alphas_cumprod[timestep])
        alpha_bar_prev = _value(self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod)
        x0, eps = _x0_eps(self.config.prediction_type, alpha_bar)
        std = eta * _value(self._get_variance(timestep, prev_timestep)) ** 0.5
        prev_pair = _mix((alpha_bar_prev**0.5, x0), ((1 - alpha_bar_prev - std**2) ** 0.5, eps))
        noise = _noise_args(model_output, generator, variance_noise) if eta > 0 else None
        pred = _combine(sample, (sample, model_output), (*x0, 0.0, 0.0)).to(sample.dtype)
        prev = _combine(sample, (sample, model_output), (*prev_pair, 0.0, std if eta > 0 else 0.0), noise)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return prev, pred
        return _diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)


class LCMScheduler(_diffusers.LCMScheduler):
    """diffusers' LCMScheduler with a fused step: the boundary-condition denoise and the re-noise to ᾱ'."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.num_inference_steps is None or _nonlinear(self.config):
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        prev_index = self.step_index + 1
        prev_timestep = self.timesteps[prev_index] if prev_index < len(self.timesteps) else timestep
        alpha_bar = _value(self.alphas_cumprod[timestep])
        alpha_bar_prev = _value(self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod)
        c_skip, c_out = (_value(c) for c in self.get_scalings_for_boundary_condition_discrete(timestep))
        x0, _ = _x0_eps(self.config.prediction_type, alpha_bar)
        denoised_pair = _mix((c_out, x0), (c_skip, (1.0, 0.0)))
        denoised = _combine(sample, (sample, model_output), (*denoised_pair, 0.0, 0.0)).to(sample.dtype)
        if self.step_index != self.num_inference_steps - 1:
            prev_pair = _mix((alpha_bar_prev**0.5, denoised_pair))
            prev = _combine(
                sample,
                (sample, model_output),
                (*prev_pair, 0.0, (1 - alpha_bar_prev) ** 0.5),
                _noise_args(model_output, generator),
            ).to(sample.dtype)
        else:
            prev = denoised
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return _diffusers.schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev, denoised=denoised)


class TCDScheduler(_diffusers.TCDScheduler):
    """diffusers' TCDScheduler with a fused step: the jump to ᾱ_s (s = ⌊(1 − γ)·t'⌋) and the γ-stochastic
    re-noise to ᾱ'."""

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        if self.num_inference_steps is None or not 0 <= eta <= 1:
            return super().step(model_output, timestep, sample, eta, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        prev_index = self.step_index + 1
        prev_timestep = self.timesteps[prev_index] if prev_index < len(self.timesteps) else torch.tensor(0)
        timestep_s = torch.floor((1 - eta) * prev_timestep).to(dtype=torch.long)
        alpha_bar = _value(self.alphas_cumprod[timestep])
        alpha_bar_prev = _value(self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod)
        alpha_bar_s = _value(self.alphas_cumprod[timestep_s])
        x0, eps = _x0_eps(self.config.prediction_type, alpha_bar)
        noised_pair = _mix((alpha_bar_s**0.5, x0), ((1 - alpha_bar_s) ** 0.5, eps))
        noised = _combine(sample, (sample, model_output), (*noised_pair, 0.0, 0.0)).to(sample.dtype)
        if eta > 0 and self.step_index != self.num_inference_steps - 1:
            ratio = alpha_bar_prev / alpha_bar_s
            prev = _combine(
                sample,
                (sample, model_output),
                (*_mix((ratio**0.5, noised_pair)), 0.0, (1 - ratio) ** 0.5),
                _noise_args(model_output, generator),
            ).to(sample.dtype)
        else:
            prev = noised
        self._step_index += 1
        if not return_dict:
            return prev, noised
        return _diffusers.schedulers.scheduling_tcd.TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)


class DPMSolverMultistepScheduler(_diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler whose first- and second-order "dpmsolver++" and "sde-dpmsolver++"
    updates (DPM-Solver++(2M) and its SDE variant, midpoint or heun) are one fused pass over the sample, the
    last two data predictions and the noise."""

    _FUSED = ("dpmsolver++", "sde-dpmsolver++")

    def _alpha_sigma_lambda(self, index):
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        alpha, sigma = _value(alpha), _value(sigma)
        return alpha, sigma, torch.log(torch.tensor(alpha / sigma, dtype=torch.float64)).item()

    def _ends_at_zero(self):
        return _value(self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])[1]) == 0

    def _fused_update(self, sample, noise, m0, m1=None):
        if self._ends_at_zero():  # λ' = ∞: every term but the data prediction vanishes, x' = α'·D
            alpha_t = _value(self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])[0])
            return _combine(sample, (sample, m0), (0.0, alpha_t, 0.0, 0.0)).to(sample.dtype)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        h = lambda_t - lambda_s0
        e = torch.tensor(-h, dtype=torch.float64)
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        if sde:
            c_x, c_d0 = sigma_t / sigma_s0 * e.exp().item(), alpha_t * -torch.expm1(2 * e).item()
            c_z = sigma_t * (-torch.expm1(2 * e)).sqrt().item()
        else:
            c_x, c_d0, c_z = sigma_t / sigma_s0, -alpha_t * torch.expm1(e).item(), 0.0
        c_d1 = 0.0
        if m1 is not None:
            _, _, lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)
            r0 = (lambda_s0 - lambda_s1) / h
            if self.config.solver_type == "midpoint":
                c_d1 = 0.5 * c_d0
            elif sde:
                c_d1 = alpha_t * (-torch.expm1(2 * e).item() / (-2.0 * h) + 1.0)
            else:
                c_d1 = alpha_t * (torch.expm1(e).item() / h + 1.0)
            c_d1 = c_d1 / r0
        coefs = (c_x, c_d0 + c_d1, -c_d1, c_z)
        noise_args = {"noise": noise} if sde else None
        return _combine(sample, (sample, m0, m1), coefs, noise_args).to(sample.dtype)

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if self.config.algorithm_type not in self._FUSED or args or kwargs or sample is None:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._fused_update(sample, noise, model_output)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if self.config.algorithm_type not in self._FUSED or args or kwargs or sample is None or self._ends_at_zero():
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._fused_update(sample, noise, model_output_list[-1], model_output_list[-2])


def _combine5(like, terms, coefs):
    """Σ c_k·t_k over up to five tensors in one pass: fastcm.sde_steps' kernel (four terms and its noise slot,
    here a given tensor); torch ops on the reference backend."""
    work = compute_dtype(like)
    if len(terms) > 5 or len(coefs) != 5:
        raise ValueError(
            f"fastcm.diffusers: {len(terms)} terms with {len(coefs)} coefficients; expected at most 5 "
            "terms and 5 coefficients"
        )
    terms = tuple(None if t is None else t.to(work).contiguous() for t in terms) + (None,) * (5 - len(terms))
    if select_backend(_OP, like.device) == "reference":
        out = torch.zeros(like.shape, dtype=work, device=like.device)
        for c, t in zip(coefs, terms):
            if t is not None and c != 0:
                out = out + c * t
        return out
    noise = terms[4] if coefs[4] != 0 else None
    return _sde_steps._run(_OP, terms[0], terms[:4], tuple(coefs), None, noise=noise)


class UniPCMultistepScheduler(_diffusers.UniPCMultistepScheduler):
    """diffusers' UniPCMultistepScheduler (Zhao et al. 2023) with fused bh2 updates of order ≤ 3.

    Data prediction (predict_x0=True, the default): step is one pass per call, the UniC correction of the previous
    step and this step's UniP prediction together (fastcm.sde_steps.unipc_step's coefficients, rescaled from σ
    space to diffusers' x = α·x_σ), so the corrected sample is never materialised and `last_sample` holds the
    sample the model saw. Where the last level is σ = 0 the update is x' = D at every order (diffusers' own
    solve is singular there above order 1). Noise prediction: the UniP predictor and UniC corrector are one fused
    pass each over the sample, the model outputs they read and (corrector) the new model output; the coefficients,
    including the small linear solve for ρ, are computed on the host in float64, and the predictor's step to
    σ = 0 runs diffusers' code. bh1, a custom solver_p, order > 3 and flow sigmas run diffusers' code."""

    def _fused_step(self):
        return (
            self.predict_x0
            and self.solver_p is None
            and self.config.solver_type == "bh2"
            and 1 <= self.config.solver_order <= _sde_steps.UNIPC_MAX_ORDER
            and not getattr(self.config, "use_flow_sigmas", False)
        )

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None or not self._fused_step():
            return super().step(model_output, timestep, sample, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        use_corrector = index > 0 and index - 1 not in self.disable_corrector and self.last_sample is not None
        corrector_order = self.this_order if use_corrector else 0
        converted = self.convert_model_output(model_output, sample=sample)
        earlier = [self.model_outputs[-(k + 1)] for k in range(self.config.solver_order)]
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
            self.timestep_list[i] = self.timestep_list[i + 1]
        self.model_outputs[-1] = converted
        self.timestep_list[-1] = timestep
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - index)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        reads = max(self.this_order - 1, corrector_order)

        def alpha_and_level(i):
            alpha, sigma = (_value(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[i]))
            return alpha, sigma / alpha

        alpha, level = alpha_and_level(index)
        alpha_next, level_next = alpha_and_level(index + 1)
        past = [alpha_and_level(index - 1 - k)[1] for k in range(reads)]
        coefs = _sde_steps._unipc_coefficients(level, level_next, past, self.this_order, corrector_order)
        # diffusers' sample is α·x_σ: x'_σ = c0·x_σ + Σ c_k·D_k becomes x' = (α'/α)·c0·x + α'·Σ c_k·D_k
        coefs = [alpha_next / alpha * coefs[0]] + [alpha_next * c for c in coefs[1:]]
        terms = [sample, converted] + earlier[:reads]
        prev = _combine5(sample, terms, coefs + [0.0] * (5 - len(coefs))).to(sample.dtype)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return _diffusers.schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev)

    def _lambda(self, index):
        alpha, sigma = (_value(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[index]))
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def _uni_coefficients(self, t_index, s0_index, previous, order, corrector):
        """Coefficients of (x, m0, m_prev…, model_t) for the UniP (corrector=False) or UniC update."""
        alpha_t, sigma_t, lambda_t = self._lambda(t_index)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(s0_index)
        h = lambda_t - lambda_s0
        rks = [(self._lambda(index)[2] - lambda_s0) / h for index in previous] + [1.0]
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        b_h = hh if self.config.solver_type == "bh1" else math.expm1(hh)
        rows, rhs = [], []
        for i in range(1, order + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if corrector:
            rhos = (
                [0.5]
                if order == 1
                else torch.linalg.solve(
                    torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
                ).tolist()
            )
        elif order == 1:
            rhos = []
        elif order == 2:
            rhos = [0.5]
        else:
            rhos = torch.linalg.solve(
                torch.tensor(rows, dtype=torch.float64)[:-1, :-1], torch.tensor(rhs[:-1], dtype=torch.float64)
            ).tolist()
        lead, c_x = (alpha_t, sigma_t / sigma_s0) if self.predict_x0 else (sigma_t, alpha_t / alpha_s0)
        gain = lead * b_h
        c_prev = [-gain * rho / rk for rho, rk in zip(rhos, rks[:-1])]
        c_m0 = -lead * h_phi_1 - sum(c_prev)
        c_t = 0.0
        if corrector:
            c_t = -gain * rhos[-1]
            c_m0 -= c_t
        return c_x, c_m0, c_prev, c_t

    def _fusable(self, order, args, kwargs):
        return (
            self.solver_p is None
            and not args
            and not kwargs
            and order is not None
            and 1 <= order <= 3
            and self.config.solver_type == "bh2"
        )

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        ends_at_zero = _value(self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])[1]) == 0
        if sample is None or ends_at_zero or not self._fusable(order, args, kwargs):  # λ' = ∞: diffusers' limit
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        previous = [self.step_index - i for i in range(1, order)]
        c_x, c_m0, c_prev, _ = self._uni_coefficients(self.step_index + 1, self.step_index, previous, order, False)
        outputs = self.model_outputs
        terms = [sample, outputs[-1]] + [outputs[-(i + 1)] for i in range(1, order)]
        coefs = [c_x, c_m0] + c_prev + [0.0] * (5 - 2 - len(c_prev))
        return _combine5(sample, terms, coefs).to(sample.dtype)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        if last_sample is None or this_sample is None or not self._fusable(order, args, kwargs):
            return super().multistep_uni_c_bh_update(
                this_model_output, *args, last_sample=last_sample, this_sample=this_sample, order=order, **kwargs
            )
        previous = [self.step_index - (i + 1) for i in range(1, order)]
        c_x, c_m0, c_prev, c_t = self._uni_coefficients(self.step_index, self.step_index - 1, previous, order, True)
        outputs = self.model_outputs
        middle = [outputs[-(i + 1)] for i in range(1, order)]
        # (x, m0, up to two earlier outputs, model_t): model_t rides in the kernel's fifth (noise) slot
        terms = [last_sample, outputs[-1]] + middle + [None] * (2 - len(middle)) + [this_model_output]
        coefs = [c_x, c_m0] + c_prev + [0.0] * (2 - len(c_prev)) + [c_t]
        return _combine5(last_sample, terms, coefs).to(last_sample.dtype)


__all__ = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "DDIMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]
