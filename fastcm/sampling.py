"""Few-step samplers built on the fused steps: noise schedules, CM / TrigFlow multistep loops,
EDM Euler and Heun, DPM-Solver++(2M), and the self-consistency metric.

Conventions (k-diffusion's): `denoiser(x, sigma) -> denoised` takes the noisy batch x (B, ...)
and a (B,) tensor of noise levels (TrigFlow: times t); `x` is the starting noise at the first
schedule entry (EDM: x = σ_max·randn; TrigFlow: x = σd·randn); the last schedule entry is where
sampling ends and is never passed to the denoiser. A loop over a schedule of n + 1 entries calls
the denoiser n times (Heun: up to 2n − 1 times). Loops run under torch.no_grad().

Stochastic loops (sample_cm, sample_trigflow) draw one seed (from `seed`, `generator` or torch's
global CPU generator) and advance the Philox offset by x.numel() per re-noising, so a loop is
deterministic given its seed.

k-diffusion's calling convention: sample_euler, sample_heun, sample_dpmpp_2m and the stochastic
loops (sample_euler_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_dpmpp_2m_sde,
sample_dpmpp_3m_sde) take k_diffusion.sampling's arguments in its order: model(x, sigma, **extra_args),
extra_args, callback (called with k-diffusion's dict: x, i, sigma = sigmas[i], sigma_hat, denoised),
disable, and s_churn / s_tmin / s_tmax / s_noise, eta, noise_sampler, r, solver_type where k-diffusion
has them, so a script swaps k_diffusion.sampling.sample_X for fastcm.sampling.sample_X. Differences:
disable=False shows fastcm's one-line progress bar (k-diffusion's default None shows a tqdm bar on a
terminal; fastcm shows none unless progress=True), and the noise. With noise_sampler given it is called
exactly where k-diffusion calls it (same arguments, same order), so the same noise_sampler reproduces a
k-diffusion run to rounding; sample_euler / sample_heun call noise_sampler(sigma, sigma_hat) for the churn
(k-diffusion draws torch.randn_like there). Without it the noise is fastcm's in-kernel Philox stream from
one seed (`seed`, `generator` or torch's global CPU generator), offsets advancing by x.numel() per draw:
deterministic per seed, not a torch.Generator stream, and not k-diffusion's default Brownian-tree noise
(torchsde), whose increments are the same N(0, I) per step on a fixed grid but correlated across grids.
sample_unipc (UniPC, which k-diffusion lacks) takes the same model, extra_args, callback and disable, and
steps as diffusers' UniPCMultistepScheduler (tested against it).

capture=True (CUDA tensors only) runs the loop once to warm up (compiling the kernels), captures
the whole fixed-step loop, denoiser included, into one CUDA graph and replays it: same result as
capture=False, with one launch for the loop. The denoiser must be capturable (no host syncs, no
CPU-side randomness between calls). On CPU tensors capture=True raises ValueError.
"""

import math
import sys

import torch

from . import flow_steps, sde_steps, steps, vp_steps
from ._checks import compute_dtype
from .reference.steps import draw_seed
from .schedules import karras_sigmas

TRIGFLOW_MID_T = 1.1  # sCM's 2-step intermediate time


# arctan(σmax/σd) for EDM's σmax = 80 and σd = 0.5: the TrigFlow time of pure noise.
_TRIGFLOW_T_MAX = math.atan(80.0 / 0.5)


def trigflow_times(num_steps, *, t_max=_TRIGFLOW_T_MAX, intermediate=None, device=None):
    """TrigFlow time grid [t_max, t_1, ..., t_{n−1}, 0] for sample_trigflow.

    1 step: [t_max, 0]; 2 steps: [t_max, 1.1, 0] (sCM); `intermediate` (num_steps − 1 decreasing
    times) overrides the inner times; otherwise more steps are spaced uniformly in t.
    t_max defaults to arctan(σmax/σd) with σmax = 80, σd = 0.5. Returns a float64 tensor.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"fastcm.trigflow_times: num_steps={num_steps!r} is not supported; expected an int >= 1")
    if not 0 < t_max <= math.pi / 2:
        raise ValueError(f"fastcm.trigflow_times: t_max={t_max!r} is not supported; expected in (0, pi/2]")
    if intermediate is not None:
        inner = [float(t) for t in intermediate]
        if len(inner) != num_steps - 1:
            raise ValueError(
                f"fastcm.trigflow_times: intermediate has {len(inner)} times; expected num_steps - 1 = {num_steps - 1}"
            )
    elif num_steps == 2:
        inner = [TRIGFLOW_MID_T]
    else:
        inner = [t_max * (1 - i / num_steps) for i in range(1, num_steps)]
    times = [t_max] + inner + [0.0]
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"fastcm.trigflow_times: times {times} must decrease strictly from t_max to 0")
    return torch.tensor(times, dtype=torch.float64, device=device)


def _schedule(op, name, values):
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"fastcm.{op}: {name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"fastcm.{op}: {name} needs at least 2 entries (start and end), got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"fastcm.{op}: {name} must be finite and >= 0, got {values}")
    return values


def _levels(schedule, x):
    """Every schedule entry as a (B,) tensor, made before the loop so no copy happens inside it."""
    dtype = compute_dtype(x)
    return torch.tensor(schedule, dtype=dtype, device=x.device)[:, None].expand(-1, x.shape[0]).contiguous()


def _reporter(op, total, progress, callback):
    """A per-step hook: a one-line stderr progress bar and/or the user's callback(info dict)."""

    def report(i, **info):
        if progress:
            filled = (i + 1) * 20 // total
            sys.stderr.write(f"\r{op} [{'#' * filled}{'.' * (20 - filled)}] {i + 1}/{total}")
            if i + 1 == total:
                sys.stderr.write("\n")
        if callback is not None:
            callback(dict(i=i, **info))

    return report


def _prepare(op, name, values, x, progress, callback):
    """Checks a loop's schedule and x; returns the schedule (floats), its (B,) level tensors and
    the per-step reporter."""
    schedule = _schedule(op, name, values)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(
            f"fastcm.{op}: x must be a tensor of shape (B, ...), got "
            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}"
        )
    return schedule, _levels(schedule, x), _reporter(op, len(schedule) - 1, progress, callback)


def _entries(values, schedule):
    """What k-diffusion's callback and noise_sampler see as sigmas[i]: the caller's tensor entries
    (0-d tensors) when sigmas is a tensor, else the floats."""
    if isinstance(values, torch.Tensor):
        return list(values.unbind(0))
    return list(schedule)


def _show_progress(progress, disable):
    return progress or disable is False


def _call_model(denoiser, extra_args):
    extra_args = {} if extra_args is None else extra_args
    if not isinstance(extra_args, dict):
        raise TypeError(
            f"fastcm.sampling: extra_args must be a dict of keyword arguments for the model or None, "
            f"got {type(extra_args).__name__}"
        )
    return lambda x, sigma: denoiser(x, sigma, **extra_args)


def _run(op, loop, x, capture, progress, callback):
    if not capture:
        return loop(x)
    if x.device.type != "cuda":
        raise ValueError(
            f"fastcm.{op}: capture=True records a CUDA graph and needs CUDA tensors; x is on "
            f"{x.device}. Use capture=False on this device"
        )
    if progress or callback is not None:
        raise ValueError(
            f"fastcm.{op}: progress and callback run on the host between steps and cannot be part of "
            "a CUDA graph; use them with capture=False"
        )
    static_x = x.clone()
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        loop(static_x.clone())  # warm-up outside the graph: compiles kernels, settles the allocator
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    graph.replay()
    return static_out.clone()


def _resolve_seed(op, seed, generator):
    if seed is not None and generator is not None:
        raise ValueError(f"fastcm.{op}: pass seed or generator, not both")
    return draw_seed(generator) if seed is None else seed


def _denoise_renoise_loop(denoiser, schedule, levels, report, renoise):
    """The few-step CM loop: denoise at each level, re-noise to the next (but after the last);
    each re-noise draws fresh Philox counters (offset advances by the elements drawn)."""

    def loop(x):
        offset = 0
        for i in range(len(schedule) - 1):
            denoised = denoiser(x, levels[i])
            report(i, x=x, sigma=schedule[i], denoised=denoised)
            if i == len(schedule) - 2:
                return denoised
            x = renoise(denoised, schedule[i + 1], offset)
            offset += x.numel()

    return loop


@torch.no_grad()
def sample_cm(
    denoiser, x, sigmas, *, sigma_min=0.002, seed=None, generator=None, capture=False, progress=False, callback=None
):
    """Consistency-model sampling: D = f(x, σ_0), then for each later level σ_i (but the last)
    x = D + √(σ_i² − σmin²)·z (cm_step), D = f(x, σ_i). Returns the last D.

    sigmas = [σmax, σmin] is 1-step sampling; [σmax, σ_1, ..., σmin] multistep (Consistency Models, Algorithm 1).
    openai/consistency_models' stochastic iterative sampler with indices ts on a 40-level grid is
    sigmas = karras_sigmas(40, append_zero=False)[ts]. x: (B, ...), x = σmax·randn.
    """
    op = "sample_cm"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, progress, callback)
    if any(s < sigma_min for s in schedule[1:-1]):
        raise ValueError(f"fastcm.{op}: intermediate sigmas {schedule[1:-1]} must be >= sigma_min={sigma_min}")
    seed = _resolve_seed(op, seed, generator)

    renoise = lambda denoised, sigma_next, offset: steps.cm_step(  # noqa: E731
        denoised, sigma_next, sigma_min=sigma_min, seed=seed, offset=offset
    )
    return _run(op, _denoise_renoise_loop(denoiser, schedule, levels, report, renoise), x, capture, progress, callback)


@torch.no_grad()
def sample_trigflow(
    denoiser, x, times, *, sigma_data=0.5, seed=None, generator=None, capture=False, progress=False, callback=None
):
    """sCM (TrigFlow) sampling: D = f(x, t_0), then for each later time t_i (but the last)
    x = cos(t_i)·D + sin(t_i)·σd·z (trigflow_step), D = f(x, t_i). Returns the last D.

    times from trigflow_times (1 step: [t_max, 0]; 2 steps: [t_max, 1.1, 0]). x = σd·randn, and
    denoiser(x, t) returns the clean estimate (e.g. precondition(x, net(x/σd, t), t, param="trigflow")).
    """
    op = "sample_trigflow"
    schedule, levels, report = _prepare(op, "times", times, x, progress, callback)
    seed = _resolve_seed(op, seed, generator)

    renoise = lambda denoised, t_next, offset: steps.trigflow_step(  # noqa: E731
        denoised, t_next, sigma_data=sigma_data, seed=seed, offset=offset
    )
    return _run(op, _denoise_renoise_loop(denoiser, schedule, levels, report, renoise), x, capture, progress, callback)


def _churn_levels(schedule, s_churn, s_tmin, s_tmax):
    """σ̂_i = σ_i·(1 + γ_i), γ_i = min(s_churn/N, √2 − 1) for σ_i in [s_tmin, s_tmax], else 0 (Karras et al.
    2022, Algorithm 2; N = len(sigmas) − 1 as k-diffusion counts it)."""
    steps_count = len(schedule) - 1
    gammas = [min(s_churn / steps_count, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0 for sigma in schedule[:-1]]
    return gammas, [sigma * (gamma + 1) for sigma, gamma in zip(schedule, gammas)]


class _Noise:
    """The noise of one loop: noise_sampler's tensors when given (k-diffusion's), else in-kernel Philox
    draws from one seed, each at fresh counters (offset advancing by x.numel() per draw)."""

    def __init__(self, op, noise_sampler, seed, generator):
        self.noise_sampler = noise_sampler
        self.seed = None if noise_sampler is not None else _resolve_seed(op, seed, generator)
        self.offset = 0

    def restart(self):
        """Back to the first counters: each run of a loop (capture's warm-up, then the captured run) draws the
        same noise, so capture=True reproduces capture=False."""
        self.offset = 0

    def __call__(self, x, sigma, sigma_next):
        """Keyword arguments for a step's noise: noise= from the sampler, or seed= and offset=."""
        if self.noise_sampler is not None:
            return {"noise": self.noise_sampler(sigma, sigma_next)}
        offset, self.offset = self.offset, self.offset + x.numel()
        return {"seed": self.seed, "offset": offset}


def _check_churn(op, s_churn, s_noise):
    for name, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected a float >= 0")


@torch.no_grad()
def sample_euler(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    *,
    noise_sampler=None,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """EDM Euler sampling of the probability-flow ODE over sigmas (e.g. karras_sigmas(n, append_zero=True));
    returns x at the last level (x = D at σ = 0). k-diffusion's sample_euler, arguments and callback
    included (module docstring). s_churn > 0: EDM stochastic churn before each step whose σ is in
    [s_tmin, s_tmax]: x̂ = churn_step(x, σ, σ̂, s_noise), D = model(x̂, σ̂), x = euler_step(x̂, D, σ̂, σ')."""
    op = "sample_euler"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, _show_progress(progress, disable), callback)
    _check_churn(op, s_churn, s_noise)
    entries = _entries(sigmas, schedule)
    gammas, hats = _churn_levels(schedule, s_churn, s_tmin, s_tmax)
    hat_levels = _levels(hats, x)
    model = _call_model(denoiser, extra_args)
    noise = _Noise(op, noise_sampler, seed, generator) if any(gammas) else None

    def loop(x):
        if noise is not None:
            noise.restart()
        for i in range(len(schedule) - 1):
            if gammas[i] > 0:
                sigma_hat = entries[i] * (gammas[i] + 1)
                x = sde_steps.churn_step(x, schedule[i], hats[i], s_noise=s_noise, **noise(x, entries[i], sigma_hat))
            else:
                sigma_hat = entries[i]
            denoised = model(x, hat_levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=sigma_hat, denoised=denoised)
            x = steps.euler_step(x, denoised, hats[i], schedule[i + 1])
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_heun(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    *,
    noise_sampler=None,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """EDM Heun sampling (2nd order; Euler on the step to σ = 0): per step D = f(x, σ̂),
    x̃ = euler_step(x, D, σ̂, σ'), D̃ = f(x̃, σ'), x = heun_step(x, D, σ̂, σ', denoised_next=D̃); σ̂ = σ unless
    s_churn > 0 (churn as in sample_euler). k-diffusion's sample_heun, arguments and callback included."""
    op = "sample_heun"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, _show_progress(progress, disable), callback)
    _check_churn(op, s_churn, s_noise)
    entries = _entries(sigmas, schedule)
    gammas, hats = _churn_levels(schedule, s_churn, s_tmin, s_tmax)
    hat_levels = _levels(hats, x)
    model = _call_model(denoiser, extra_args)
    noise = _Noise(op, noise_sampler, seed, generator) if any(gammas) else None

    def loop(x):
        if noise is not None:
            noise.restart()
        for i in range(len(schedule) - 1):
            sigma_hat, sigma_next = hats[i], schedule[i + 1]
            if gammas[i] > 0:
                reported_hat = entries[i] * (gammas[i] + 1)
                x = sde_steps.churn_step(
                    x, schedule[i], sigma_hat, s_noise=s_noise, **noise(x, entries[i], reported_hat)
                )
            else:
                reported_hat = entries[i]
            denoised = model(x, hat_levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=reported_hat, denoised=denoised)
            x_euler = steps.euler_step(x, denoised, sigma_hat, sigma_next)
            if sigma_next == 0:
                x = x_euler
                continue
            x = steps.heun_step(x, denoised, sigma_hat, sigma_next, denoised_next=model(x_euler, levels[i + 1]))
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser, x, sigmas, extra_args=None, callback=None, disable=None, *, capture=False, progress=False
):
    """DPM-Solver++(2M) sampling (k-diffusion sample_dpmpp_2m, arguments and callback included):
    first-order first step, then multistep with the previous D; returns x at the last level."""
    op = "sample_dpmpp_2m"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, _show_progress(progress, disable), callback)
    entries = _entries(sigmas, schedule)
    model = _call_model(denoiser, extra_args)

    def loop(x):
        old_denoised = None
        for i in range(len(schedule) - 1):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            previous = None if old_denoised is None else schedule[i - 1]
            x = steps.dpmpp_2m_step(
                x, denoised, schedule[i], schedule[i + 1], old_denoised=old_denoised, sigma_prev=previous
            )
            old_denoised = denoised
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


def _prepare_stochastic(
    op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
):
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, _show_progress(progress, disable), callback)
    for name, value in (("eta", eta), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected a float >= 0")
    if any(a < b for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"fastcm.{op}: sigmas {schedule} must not increase")
    return (
        schedule,
        levels,
        report,
        _entries(sigmas, schedule),
        _call_model(denoiser, extra_args),
        _Noise(op, noise_sampler, seed, generator),
    )


@torch.no_grad()
def sample_euler_ancestral(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    *,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """Ancestral sampling with Euler steps (k-diffusion sample_euler_ancestral): per step
    D = model(x, σ), x = euler_ancestral_step(x, D, σ, σ', eta, s_noise) (noise where σ' > 0)."""
    op = "sample_euler_ancestral"
    schedule, levels, report, entries, model, noise = _prepare_stochastic(
        op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
    )

    def loop(x):
        noise.restart()
        for i in range(len(schedule) - 1):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            drawn = noise(x, entries[i], entries[i + 1]) if schedule[i + 1] > 0 else {}
            x = sde_steps.euler_ancestral_step(
                x, denoised, schedule[i], schedule[i + 1], eta=eta, s_noise=s_noise, **drawn
            )
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    *,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion sample_dpmpp_2s_ancestral): per step
    D = model(x, σ); unless σ_down = 0, x_mid = dpmpp_2m_step(x, D, σ, σ_mid) and D_mid = model(x_mid, σ_mid)
    (σ_mid = √(σ·σ_down)); x = dpmpp_2s_ancestral_step(...) with the noise where σ' > 0. Up to 2 model calls
    per step."""
    op = "sample_dpmpp_2s_ancestral"
    schedule, levels, report, entries, model, noise = _prepare_stochastic(
        op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
    )
    mids = [sde_steps.dpmpp_2s_ancestral_sigma_mid(a, b, eta) for a, b in zip(schedule, schedule[1:])]
    mid_levels = _levels(mids, x)

    def loop(x):
        noise.restart()
        for i in range(len(schedule) - 1):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            denoised_mid = None
            if mids[i] > 0:
                x_mid = steps.dpmpp_2m_step(x, denoised, schedule[i], mids[i])
                denoised_mid = model(x_mid, mid_levels[i])
            drawn = noise(x, entries[i], entries[i + 1]) if schedule[i + 1] > 0 else {}
            x = sde_steps.dpmpp_2s_ancestral_step(
                x, denoised, schedule[i], schedule[i + 1], denoised_mid=denoised_mid, eta=eta, s_noise=s_noise, **drawn
            )
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    r=1 / 2,
    *,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """DPM-Solver++ SDE sampling (k-diffusion sample_dpmpp_sde): per step D = model(x, σ); unless σ' = 0
    (then x = D), x_mid = euler_ancestral_step(x, D, σ, σ_s) with σ_s = σ^(1−r)·σ'^r, D_mid = model(x_mid, σ_s),
    x = dpmpp_sde_step(x, D, σ, σ', denoised_mid=D_mid, r). Two noise draws and two model calls per step."""
    op = "sample_dpmpp_sde"
    schedule, levels, report, entries, model, noise = _prepare_stochastic(
        op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
    )
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"fastcm.{op}: r={r!r} is not supported; expected a float in (0, 1]")
    mids = [sde_steps.dpmpp_sde_sigma_mid(a, b, r) for a, b in zip(schedule, schedule[1:])]
    mid_levels = _levels(mids, x)
    # noise_sampler's σ_s, made here: inside a captured loop a host-to-device copy is not allowed
    mid_entries = [e.new_tensor(m) if isinstance(e, torch.Tensor) else m for e, m in zip(entries, mids)]

    def loop(x):
        noise.restart()
        for i in range(len(schedule) - 1):
            sigma, sigma_next = schedule[i], schedule[i + 1]
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            if sigma_next == 0:
                x = steps.euler_step(x, denoised, sigma, 0.0)
                continue
            x_mid = sde_steps.euler_ancestral_step(
                x, denoised, sigma, mids[i], eta=eta, s_noise=s_noise, **noise(x, entries[i], mid_entries[i])
            )
            denoised_mid = model(x_mid, mid_levels[i])
            x = sde_steps.dpmpp_sde_step(
                x,
                denoised,
                sigma,
                sigma_next,
                denoised_mid=denoised_mid,
                r=r,
                eta=eta,
                s_noise=s_noise,
                **noise(x, entries[i], entries[i + 1]),
            )
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
    *,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """DPM-Solver++(2M) SDE sampling (k-diffusion sample_dpmpp_2m_sde): per step D = model(x, σ),
    x = dpmpp_2m_sde_step(x, D, σ, σ', old_denoised, σ_prev, eta, s_noise, solver_type); noise drawn where
    eta > 0 and σ' > 0; eta = 0 is deterministic."""
    op = "sample_dpmpp_2m_sde"
    schedule, levels, report, entries, model, noise = _prepare_stochastic(
        op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
    )
    if solver_type not in sde_steps.SOLVER_TYPES:
        raise ValueError(
            f"fastcm.{op}: solver_type={solver_type!r} is not supported; expected one of {sde_steps.SOLVER_TYPES}"
        )

    def loop(x):
        noise.restart()
        old_denoised = None
        for i in range(len(schedule) - 1):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            drawn = noise(x, entries[i], entries[i + 1]) if eta and schedule[i + 1] > 0 else {}
            previous = None if old_denoised is None else schedule[i - 1]
            x = sde_steps.dpmpp_2m_sde_step(
                x,
                denoised,
                schedule[i],
                schedule[i + 1],
                old_denoised=old_denoised,
                sigma_prev=previous,
                eta=eta,
                s_noise=s_noise,
                solver_type=solver_type,
                **drawn,
            )
            old_denoised = denoised
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    *,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """DPM-Solver++(3M) SDE sampling (k-diffusion sample_dpmpp_3m_sde): per step D = model(x, σ),
    x = dpmpp_3m_sde_step(x, D, σ, σ', D_1, D_2, σ_prev, σ_prev2, eta, s_noise) (first, second, then third
    order as the history fills); noise drawn where eta > 0 and σ' > 0."""
    op = "sample_dpmpp_3m_sde"
    schedule, levels, report, entries, model, noise = _prepare_stochastic(
        op, sigmas, x, denoiser, extra_args, eta, s_noise, progress, disable, callback, noise_sampler, seed, generator
    )

    def loop(x):
        noise.restart()
        denoised_1 = denoised_2 = None
        for i in range(len(schedule) - 1):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            drawn = noise(x, entries[i], entries[i + 1]) if eta and schedule[i + 1] > 0 else {}
            x = sde_steps.dpmpp_3m_sde_step(
                x,
                denoised,
                schedule[i],
                schedule[i + 1],
                denoised_1=denoised_1,
                denoised_2=denoised_2,
                sigma_prev=None if denoised_1 is None else schedule[i - 1],
                sigma_prev2=None if denoised_2 is None else schedule[i - 2],
                eta=eta,
                s_noise=s_noise,
                **drawn,
            )
            denoised_1, denoised_2 = denoised, denoised_1
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_unipc(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    order=3,
    lower_order_final=True,
    disable_corrector=(),
    capture=False,
    progress=False,
):
    """UniPC sampling (Zhao et al. 2023; bh2, data prediction) as diffusers' UniPCMultistepScheduler steps it, in
    k-diffusion's calling convention: per step D = model(x, σ), then one fused pass
    x = unipc_step(x, D, σ, σ', D_1.., σ_prev.., order=p, corrector_order=c), which corrects x with D (UniC of the
    previous predictor's order; none at the first step and after the steps listed in disable_corrector) and
    predicts x at σ'. The predictor's order p = min(order, steps so far + 1), and with lower_order_final also
    ≤ the number of steps left. Returns x at the last level (D there when it is 0); the callback's x is the point
    the model saw (before its correction). order in {1, 2, 3}."""
    op = "sample_unipc"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, _show_progress(progress, disable), callback)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= sde_steps.UNIPC_MAX_ORDER:
        raise ValueError(f"fastcm.{op}: order={order!r} is not supported; expected 1, 2 or 3")
    if any(a <= b for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"fastcm.{op}: sigmas {schedule} must decrease strictly")
    skipped = set(disable_corrector)
    entries = _entries(sigmas, schedule)
    model = _call_model(denoiser, extra_args)
    steps_total = len(schedule) - 1

    def loop(x):
        history, previous_order = [], 0
        for i in range(steps_total):
            denoised = model(x, levels[i])
            report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=denoised)
            this_order = min(order, len(history) + 1)
            if lower_order_final:
                this_order = min(this_order, steps_total - i)
            corrector_order = previous_order if i > 0 and i - 1 not in skipped else 0
            named = {f"denoised_{k + 1}": d for k, d in enumerate(history)}
            named.update({f"sigma_prev{'' if k == 0 else k + 1}": schedule[i - 1 - k] for k in range(len(history))})
            x = sde_steps.unipc_step(
                x, denoised, schedule[i], schedule[i + 1], order=this_order, corrector_order=corrector_order, **named
            )
            history = [denoised] + history[: sde_steps.UNIPC_MAX_ORDER - 1]
            previous_order = this_order
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


def _flow_loop(op, velocity_model, x, times, extra_args, callback, disable, capture, progress, second_order):
    schedule, levels, report = _prepare(op, "times", times, x, _show_progress(progress, disable), callback)
    if any(t > 1 for t in schedule) or any(a <= b for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"fastcm.{op}: times {schedule} must decrease strictly within [0, 1]")
    entries = _entries(times, schedule)
    model = _call_model(velocity_model, extra_args)

    def loop(x):
        for i in range(len(schedule) - 1):
            t, t_next = schedule[i], schedule[i + 1]
            velocity = model(x, levels[i])
            if callback is not None:  # the clean estimate x0 = x − t·v, as the callback's denoised
                report(i, x=x, sigma=entries[i], sigma_hat=entries[i], denoised=x - t * velocity)
            else:
                report(i)
            if second_order and t_next > 0:
                x_euler = flow_steps.flow_euler_step(x, velocity, t, t_next)
                x = flow_steps.flow_heun_step(x, velocity, t, t_next, velocity_next=model(x_euler, levels[i + 1]))
            else:
                x = flow_steps.flow_euler_step(x, velocity, t, t_next)
        return x

    return _run(op, loop, x, capture, _show_progress(progress, disable), callback)


@torch.no_grad()
def sample_flow_euler(
    velocity_model, x, times, extra_args=None, callback=None, disable=None, *, capture=False, progress=False
):
    """Euler sampling of a flow-matching model (velocity prediction, x_t = (1 − t)·x0 + t·ε) over `times`
    from 1 to 0 (fastcm.schedules.flow_times, optionally shifted): per step v = model(x, t, **extra_args),
    x = flow_euler_step(x, v, t, t'). The callback gets k-diffusion's dict with sigma = t and denoised = x − t·v.
    diffusers' FlowMatchEulerDiscreteScheduler runs the same update."""
    return _flow_loop(
        "sample_flow_euler",
        velocity_model,
        x,
        times,
        extra_args,
        callback,
        disable,
        capture,
        progress,
        second_order=False,
    )


@torch.no_grad()
def sample_flow_heun(
    velocity_model, x, times, extra_args=None, callback=None, disable=None, *, capture=False, progress=False
):
    """Heun sampling of a flow-matching model: per step v = model(x, t), x̃ = x + (t' − t)·v, v' = model(x̃, t'),
    x = flow_heun_step(x, v, t, t', velocity_next=v'); Euler on a last step to t' = 0. As sample_flow_euler
    otherwise (2 model calls per step)."""
    return _flow_loop(
        "sample_flow_heun",
        velocity_model,
        x,
        times,
        extra_args,
        callback,
        disable,
        capture,
        progress,
        second_order=True,
    )


def lcm_boundary_scalings(timestep, *, sigma_data=0.5, timestep_scaling=10.0):
    """LCM's boundary-condition scalings at a discrete timestep t (diffusers' LCMScheduler):
    c_skip = σd²/((s·t)² + σd²), c_out = s·t/√((s·t)² + σd²), s = timestep_scaling. Floats."""
    scaled = float(timestep) * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def _vp_grid(op, alphas_cumprod, timesteps, x):
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1:
        raise TypeError(
            f"fastcm.{op}: alphas_cumprod must be a 1-D tensor of cumulative alphas (diffusers' "
            "scheduler.alphas_cumprod)"
        )
    steps_list = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if (
        not steps_list
        or any(a <= b for a, b in zip(steps_list, steps_list[1:]))
        or steps_list[-1] < 0
        or steps_list[0] >= alphas_cumprod.numel()
    ):
        raise ValueError(
            f"fastcm.{op}: timesteps {steps_list} must decrease strictly within [0, {alphas_cumprod.numel() - 1}]"
        )
    table = alphas_cumprod.detach().double().cpu()
    alpha_bars = [float(table[t]) for t in steps_list]
    return steps_list, alpha_bars, table, _levels([float(t) for t in steps_list], x)


def _vp_loop(op, model, x, steps_list, levels, extra_args, callback, report, noise, update, capture, progress):
    """The discrete-VP loop shared by LCM, TCD and DDPM: m = model(x, t_i), x = update(i, x, m)."""
    model = _call_model(model, extra_args)

    def loop(x):
        noise.restart()
        for i, t in enumerate(steps_list):
            output = model(x, levels[i])
            x_next, denoised = update(i, x, output, want_denoised=callback is not None)
            report(i, x=x, sigma=t, sigma_hat=t, denoised=denoised)
            x = x_next
        return x

    return _run(op, loop, x, capture, progress, callback)


@torch.no_grad()
def sample_lcm(
    model,
    x,
    alphas_cumprod,
    timesteps,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    prediction_type="epsilon",
    sigma_data=0.5,
    timestep_scaling=10.0,
    noise_sampler=None,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """LCM multistep sampling (diffusers' LCMScheduler loop): per timestep t_i, m = model(x, t_i, **extra_args),
    x = lcm_step(x, m, ᾱ(t_i), ᾱ(t_{i+1}), c_skip(t_i), c_out(t_i)) with fresh noise, and after the last timestep
    x = D (no noise). x: the starting noise (x = randn for ᾱ(t_0) ≈ 0). noise_sampler(t, t_next) -> z, when given,
    supplies each step's noise (e.g. diffusers' randn_tensor from a generator, to reproduce a diffusers run); the
    callback's denoised (one more fused pass) is D."""
    op = "sample_lcm"
    steps_list, alpha_bars, _, levels = _vp_grid(op, alphas_cumprod, timesteps, x)
    report = _reporter(op, len(steps_list), _show_progress(progress, disable), callback)
    noise = _Noise(op, noise_sampler, seed, generator)

    def update(i, x, output, want_denoised):
        c_skip, c_out = lcm_boundary_scalings(steps_list[i], sigma_data=sigma_data, timestep_scaling=timestep_scaling)
        kwargs = dict(c_skip=c_skip, c_out=c_out, prediction_type=prediction_type)
        denoised = vp_steps.lcm_step(x, output, alpha_bars[i], 1.0, **kwargs) if want_denoised else None
        if i == len(steps_list) - 1:
            return (
                denoised if denoised is not None else vp_steps.lcm_step(x, output, alpha_bars[i], 1.0, **kwargs)
            ), denoised
        drawn = noise(x, steps_list[i], steps_list[i + 1])
        return vp_steps.lcm_step(x, output, alpha_bars[i], alpha_bars[i + 1], **kwargs, **drawn), denoised

    return _vp_loop(
        op,
        model,
        x,
        steps_list,
        levels,
        extra_args,
        callback,
        report,
        noise,
        update,
        capture,
        _show_progress(progress, disable),
    )


@torch.no_grad()
def sample_tcd(
    model,
    x,
    alphas_cumprod,
    timesteps,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    gamma=0.3,
    prediction_type="epsilon",
    noise_sampler=None,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """TCD sampling (diffusers' TCDScheduler loop, eta = γ): per timestep t_i with next t' (0 after the last),
    s = ⌊(1 − γ)·t'⌋, x = tcd_step(x, m, ᾱ(t_i), ᾱ(s), ᾱ(t')); the last step has no noise (ᾱ' = ᾱ_s = ᾱ(0)).
    The callback's denoised is x_s, the prediction at s."""
    op = "sample_tcd"
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"fastcm.{op}: gamma={gamma!r} is not supported; expected a float in [0, 1]")
    steps_list, alpha_bars, table, levels = _vp_grid(op, alphas_cumprod, timesteps, x)
    report = _reporter(op, len(steps_list), _show_progress(progress, disable), callback)
    noise = _Noise(op, noise_sampler, seed, generator)

    def update(i, x, output, want_denoised):
        last = i == len(steps_list) - 1
        t_next = 0 if last else steps_list[i + 1]
        alpha_bar_s = float(table[math.floor((1 - gamma) * t_next)])
        alpha_bar_next = alpha_bar_s if last else float(table[t_next])
        kwargs = dict(prediction_type=prediction_type)
        denoised = (
            vp_steps.tcd_step(x, output, alpha_bars[i], alpha_bar_s, alpha_bar_s, **kwargs) if want_denoised else None
        )
        drawn = noise(x, steps_list[i], t_next) if gamma > 0 and not last else {}
        return vp_steps.tcd_step(x, output, alpha_bars[i], alpha_bar_s, alpha_bar_next, **kwargs, **drawn), denoised

    return _vp_loop(
        op,
        model,
        x,
        steps_list,
        levels,
        extra_args,
        callback,
        report,
        noise,
        update,
        capture,
        _show_progress(progress, disable),
    )


@torch.no_grad()
def sample_ddpm(
    model,
    x,
    alphas_cumprod,
    timesteps,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    prediction_type="epsilon",
    noise_sampler=None,
    seed=None,
    generator=None,
    capture=False,
    progress=False,
):
    """Ancestral DDPM sampling with the exact posterior variance (diffusers' DDPMScheduler loop, "fixed_small",
    no clipping) over `timesteps` (ᾱ' = 1 after the last, where x = x0). The callback's denoised is x0."""
    op = "sample_ddpm"
    steps_list, alpha_bars, _, levels = _vp_grid(op, alphas_cumprod, timesteps, x)
    report = _reporter(op, len(steps_list), _show_progress(progress, disable), callback)
    noise = _Noise(op, noise_sampler, seed, generator)

    def update(i, x, output, want_denoised):
        last = i == len(steps_list) - 1
        alpha_bar_next = 1.0 if last else alpha_bars[i + 1]
        kwargs = dict(prediction_type=prediction_type)
        denoised = vp_steps.ddpm_step(x, output, alpha_bars[i], 1.0, **kwargs) if want_denoised else None
        drawn = {} if last else noise(x, steps_list[i], steps_list[i + 1])
        return vp_steps.ddpm_step(x, output, alpha_bars[i], alpha_bar_next, **kwargs, **drawn), denoised

    return _vp_loop(
        op,
        model,
        x,
        steps_list,
        levels,
        extra_args,
        callback,
        report,
        noise,
        update,
        capture,
        _show_progress(progress, disable),
    )


@torch.no_grad()
def self_consistency_error(f, x_t_fn, times):
    """Self-consistency error of a consistency function f (the consistency property of Consistency
    Models): for each t in `times`, x_t = x_t_fn(t) (points of one trajectory) and prediction
    f(x_t, t·ones(B)); returns the
    unbiased variance across times of the predictions, averaged over all elements (0-d float tensor).
    0 for an exact consistency function. Streams over times (Welford): memory of two predictions.
    """
    op = "self_consistency_error"
    schedule = _schedule(op, "times", times)
    mean = m2 = None
    for count, t in enumerate(schedule, start=1):
        x_t = x_t_fn(t)
        if not isinstance(x_t, torch.Tensor) or x_t.dim() < 1:
            raise TypeError(f"fastcm.{op}: x_t_fn({t}) must return a tensor of shape (B, ...)")
        work = compute_dtype(x_t)
        prediction = f(x_t, torch.full((x_t.shape[0],), t, dtype=work, device=x_t.device)).to(work)
        if mean is None:
            mean, m2 = prediction.clone(), torch.zeros_like(prediction)
            continue
        delta = prediction - mean
        mean += delta / count
        m2 += delta * (prediction - mean)
    return (m2 / (len(schedule) - 1)).mean()


@torch.no_grad()
def sample_flow_map(model, x, times, *, capture=False, progress=False, callback=None):
    """Flow-map (MeanFlow / Align Your Flow) sampling over a time grid: for each step from t_i to t_{i+1},
    u = model(x, t, r) with (B,) tensors t = t_i, r = t_{i+1}, and x = x − (t − r)·u (fastcm.flow_map).

    times: decreasing flow times, e.g. [1, 0] (1 step) or [1, 0.5, 0] (2 steps); x = randn at t_0 = 1
    (flow matching: x_t = (1 − t)·x0 + t·ε). Deterministic: no noise is drawn. Returns x at the last time.
    capture=True records the whole loop, model included, in one CUDA graph (see the module docstring).
    """
    from .flow import flow_map

    op = "sample_flow_map"
    schedule, levels, report = _prepare(op, "times", times, x, progress, callback)
    if any(a <= b for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"fastcm.{op}: times {schedule} must decrease strictly")

    def loop(x):
        for i in range(len(schedule) - 1):
            u = model(x, levels[i], levels[i + 1])
            report(i, x=x, t=schedule[i], r=schedule[i + 1], u=u)
            x = flow_map(x, u, levels[i], levels[i + 1])
        return x

    return _run(op, loop, x, capture, progress, callback)


__all__ = [
    "karras_sigmas",
    "trigflow_times",
    "sample_cm",
    "sample_trigflow",
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "self_consistency_error",
    "sample_euler_ancestral",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_unipc",
    "sample_flow_euler",
    "sample_flow_heun",
    "sample_lcm",
    "sample_tcd",
    "sample_ddpm",
    "lcm_boundary_scalings",
    "sample_flow_map",
]
