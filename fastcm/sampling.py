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

capture=True (CUDA tensors only) runs the loop once to warm up (compiling the kernels), captures
the whole fixed-step loop, denoiser included, into one CUDA graph and replays it: same result as
capture=False, with one launch for the loop. The denoiser must be capturable (no host syncs, no
CPU-side randomness between calls). On CPU tensors capture=True raises ValueError.
"""

import math
import sys

import torch

from . import steps
from .schedules import karras_sigmas
from .reference.steps import draw_seed

TRIGFLOW_MID_T = 1.1  # sCM's 2-step intermediate time


def trigflow_times(num_steps, *, t_max=math.atan(80.0 / 0.5), intermediate=None, device=None):
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
            raise ValueError(f"fastcm.trigflow_times: intermediate has {len(inner)} times; expected "
                             f"num_steps - 1 = {num_steps - 1}")
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
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
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
        raise TypeError(f"fastcm.{op}: x must be a tensor of shape (B, ...), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    return schedule, _levels(schedule, x), _reporter(op, len(schedule) - 1, progress, callback)


def _run(op, loop, x, capture, progress, callback):
    if not capture:
        return loop(x)
    if x.device.type != "cuda":
        raise ValueError(f"fastcm.{op}: capture=True records a CUDA graph and needs CUDA tensors; x is on "
                         f"{x.device}. Use capture=False on this device")
    if progress or callback is not None:
        raise ValueError(f"fastcm.{op}: progress and callback run on the host between steps and cannot be part of "
                         "a CUDA graph; use them with capture=False")
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
def sample_cm(denoiser, x, sigmas, *, sigma_min=0.002, seed=None, generator=None, capture=False, progress=False,
              callback=None):
    """Consistency-model sampling: D = f(x, σ_0), then for each later level σ_i (but the last)
    x = D + √(σ_i² − σmin²)·z (cm_step), D = f(x, σ_i). Returns the last D.

    sigmas = [σmax, σmin] is 1-step sampling; [σmax, σ_1, ..., σmin] multistep (seed 004 §3).
    openai/consistency_models' stochastic iterative sampler with indices ts on a 40-level grid is
    sigmas = karras_sigmas(40, append_zero=False)[ts]. x: (B, ...), x = σmax·randn.
    """
    op = "sample_cm"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, progress, callback)
    if any(s < sigma_min for s in schedule[1:-1]):
        raise ValueError(f"fastcm.{op}: intermediate sigmas {schedule[1:-1]} must be >= sigma_min={sigma_min}")
    seed = _resolve_seed(op, seed, generator)

    renoise = lambda denoised, sigma_next, offset: steps.cm_step(  # noqa: E731
        denoised, sigma_next, sigma_min=sigma_min, seed=seed, offset=offset)
    return _run(op, _denoise_renoise_loop(denoiser, schedule, levels, report, renoise), x, capture, progress,
                callback)


@torch.no_grad()
def sample_trigflow(denoiser, x, times, *, sigma_data=0.5, seed=None, generator=None, capture=False, progress=False,
                    callback=None):
    """sCM (TrigFlow) sampling: D = f(x, t_0), then for each later time t_i (but the last)
    x = cos(t_i)·D + sin(t_i)·σd·z (trigflow_step), D = f(x, t_i). Returns the last D.

    times from trigflow_times (1 step: [t_max, 0]; 2 steps: [t_max, 1.1, 0]). x = σd·randn, and
    denoiser(x, t) returns the clean estimate (e.g. precondition(x, net(x/σd, t), t, param="trigflow")).
    """
    op = "sample_trigflow"
    schedule, levels, report = _prepare(op, "times", times, x, progress, callback)
    seed = _resolve_seed(op, seed, generator)

    renoise = lambda denoised, t_next, offset: steps.trigflow_step(  # noqa: E731
        denoised, t_next, sigma_data=sigma_data, seed=seed, offset=offset)
    return _run(op, _denoise_renoise_loop(denoiser, schedule, levels, report, renoise), x, capture, progress,
                callback)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, capture=False, progress=False, callback=None):
    """EDM Euler sampling of the probability-flow ODE over sigmas (e.g. karras_sigmas(n, append_zero=True)); returns x at
    the last level (x = D at σ = 0)."""
    op = "sample_euler"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, progress, callback)

    def loop(x):
        for i in range(len(schedule) - 1):
            denoised = denoiser(x, levels[i])
            report(i, x=x, sigma=schedule[i], denoised=denoised)
            x = steps.euler_step(x, denoised, schedule[i], schedule[i + 1])
        return x

    return _run(op, loop, x, capture, progress, callback)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, capture=False, progress=False, callback=None):
    """EDM Heun sampling (2nd order; Euler on the step to σ = 0): per step D = f(x, σ),
    x̃ = euler_step(...), D̃ = f(x̃, σ'), x = heun_step(x, D, σ, σ', denoised_next=D̃)."""
    op = "sample_heun"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, progress, callback)

    def loop(x):
        for i in range(len(schedule) - 1):
            sigma, sigma_next = schedule[i], schedule[i + 1]
            denoised = denoiser(x, levels[i])
            report(i, x=x, sigma=sigma, denoised=denoised)
            x_euler = steps.euler_step(x, denoised, sigma, sigma_next)
            if sigma_next == 0:
                x = x_euler
                continue
            x = steps.heun_step(x, denoised, sigma, sigma_next, denoised_next=denoiser(x_euler, levels[i + 1]))
        return x

    return _run(op, loop, x, capture, progress, callback)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, capture=False, progress=False, callback=None):
    """DPM-Solver++(2M) sampling (k-diffusion sample_dpmpp_2m): first-order first step, then
    multistep with the previous D; returns x at the last level."""
    op = "sample_dpmpp_2m"
    schedule, levels, report = _prepare(op, "sigmas", sigmas, x, progress, callback)

    def loop(x):
        old_denoised = None
        for i in range(len(schedule) - 1):
            denoised = denoiser(x, levels[i])
            report(i, x=x, sigma=schedule[i], denoised=denoised)
            previous = None if old_denoised is None else schedule[i - 1]
            x = steps.dpmpp_2m_step(x, denoised, schedule[i], schedule[i + 1], old_denoised=old_denoised,
                                    sigma_prev=previous)
            old_denoised = denoised
        return x

    return _run(op, loop, x, capture, progress, callback)


@torch.no_grad()
def self_consistency_error(f, x_t_fn, times):
    """Self-consistency error of a consistency function f (seed 000 §5.2): for each t in `times`,
    x_t = x_t_fn(t) (points of one trajectory) and prediction f(x_t, t·ones(B)); returns the
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
        work = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        prediction = f(x_t, torch.full((x_t.shape[0],), t, dtype=work, device=x_t.device)).to(work)
        if mean is None:
            mean, m2 = prediction.clone(), torch.zeros_like(prediction)
            continue
        delta = prediction - mean
        mean += delta / count
        m2 += delta * (prediction - mean)
    return (m2 / (len(schedule) - 1)).mean()


__all__ = ["karras_sigmas", "trigflow_times", "sample_cm", "sample_trigflow", "sample_euler", "sample_heun",
           "sample_dpmpp_2m", "self_consistency_error"]


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


__all__ += ["sample_flow_map"]
