"""Reference flow family: schedules, prediction and time conversions, forward noising and flow maps.
The specification the fused paths are tested against; plain PyTorch, differentiable by autograd and
torch.func.jvp; computes in the dtype of its inputs (float64 for the reference).

Every schedule writes x_t = α(τ)·x0 + s(τ)·ε with ε ~ N(0, I), in its own time variable τ:

    flow:      τ = t ∈ [0, 1],   α = 1 − t,  s = t               (rectified flow / flow matching)
    trigflow:  τ = t ∈ [0, π/2], α = cos t,  s = σd·sin t          (sCM; its noise z = σd·ε)
    vp:        τ = ᾱ ∈ (0, 1],   α = √ᾱ,     s = √(1 − ᾱ)          (DDPM; ᾱ = alphas_cumprod)
    edm:       τ = σ ≥ 0,        α = 1,      s = σ                 (EDM / CM, unscaled x)

Every prediction is linear in (x0, ε): pred = p·x0 + q·ε with

    x0:        (1, 0)            eps:     (0, 1)               flow:  (−1, 1)  (velocity ε − x0)
    v:         (−ŝ, α̂), α̂ = α/√(α²+s²), ŝ = s/√(α²+s²)           (Salimans & Ho; for vp α̂ = α, ŝ = s)
    trigflow:  F = cos(u)·ε − sin(u)·x0/σd at the TrigFlow time u of the same SNR, tan u = s/(α·σd)
    velocity:  dx_t/dτ = α'·x0 + s'·ε in the given schedule (flow: ε − x0; trigflow: σd·F)
"""

import torch

from .._params import per_sample, view_per_sample

SCHEDULES = ("flow", "trigflow", "vp", "edm")
PREDICTIONS = ("x0", "eps", "v", "flow", "trigflow", "velocity")


def schedule_coefficients(time, schedule, sigma_data=0.5):
    """(α, s, dα/dτ, ds/dτ) of x_t = α·x0 + s·ε at time τ of `schedule`, elementwise on a tensor."""
    if schedule == "flow":
        return 1.0 - time, time, -torch.ones_like(time), torch.ones_like(time)
    if schedule == "trigflow":
        return torch.cos(time), sigma_data * torch.sin(time), -torch.sin(time), sigma_data * torch.cos(time)
    if schedule == "vp":
        signal, noise = torch.sqrt(time), torch.sqrt(1.0 - time)
        return signal, noise, 0.5 / signal, -0.5 / noise
    if schedule == "edm":
        return torch.ones_like(time), time, torch.zeros_like(time), torch.ones_like(time)
    raise ValueError(
        f"fastcm.schedule_coefficients: schedule={schedule!r} is not supported; expected one of {SCHEDULES}"
    )


def prediction_coefficients(time, schedule, prediction, sigma_data=0.5):
    """(p, q) with prediction = p·x0 + q·ε at time τ of `schedule` (see the module docstring)."""
    alpha, noise, d_alpha, d_noise = schedule_coefficients(time, schedule, sigma_data)
    if prediction == "x0":
        return torch.ones_like(time), torch.zeros_like(time)
    if prediction == "eps":
        return torch.zeros_like(time), torch.ones_like(time)
    if prediction == "flow":
        return -torch.ones_like(time), torch.ones_like(time)
    if prediction == "v":
        norm = torch.sqrt(alpha**2 + noise**2)
        return -noise / norm, alpha / norm
    if prediction == "trigflow":
        norm = torch.sqrt((alpha * sigma_data) ** 2 + noise**2)
        return -noise / (sigma_data * norm), alpha * sigma_data / norm
    if prediction == "velocity":
        return d_alpha, d_noise
    raise ValueError(
        f"fastcm.prediction_coefficients: prediction={prediction!r} is not supported; expected one of {PREDICTIONS}"
    )


def _time(op, time, x, name="time"):
    return view_per_sample(per_sample(op, name, time, x, dtype=x.dtype), x)


def convert_prediction(x_t, pred, time, *, schedule, source, target, sigma_data=0.5):
    """A `source` prediction at (x_t, τ) of `schedule` re-expressed as a `target` prediction:
    x0 = (q·x_t − s·pred)/det, ε = (α·pred − p·x_t)/det, det = α·q − s·p, out = p'·x0 + q'·ε."""
    tau = _time("convert_prediction", time, x_t)
    alpha, noise, _, _ = schedule_coefficients(tau, schedule, sigma_data)
    p, q = prediction_coefficients(tau, schedule, source, sigma_data)
    p_out, q_out = prediction_coefficients(tau, schedule, target, sigma_data)
    det = alpha * q - noise * p
    x0 = (q * x_t - noise * pred) / det
    eps = (alpha * pred - p * x_t) / det
    return p_out * x0 + q_out * eps


def _angle(time, schedule, sigma_data):
    alpha, noise, _, _ = schedule_coefficients(time, schedule, sigma_data)
    return torch.atan2(noise, alpha)


def _time_from_angle(angle, schedule, sigma_data):
    sin, cos = torch.sin(angle), torch.cos(angle)
    if schedule == "flow":
        return sin / (sin + cos)
    if schedule == "trigflow":
        return torch.atan2(sin, sigma_data * cos)
    if schedule == "vp":
        return cos**2
    return torch.tan(angle)


def convert_time(time, *, source, target, sigma_data=0.5):
    """The time of `target` with the signal-to-noise ratio of `time` in `source`, and the scale k
    with x_t(target) = k·x_t(source): both schedules go through the angle φ = atan2(s, α), and
    k = (α' + s')/(α + s) (equal SNR makes α'/α = s'/s; the sum stays finite at both ends).
    flow → trigflow (SANA-Sprint): u = atan2(t, σd·(1 − t)), k = σd/√(σd²·(1 − t)² + t²)."""
    time = torch.as_tensor(time, dtype=torch.get_default_dtype()) if not isinstance(time, torch.Tensor) else time
    new_time = _time_from_angle(_angle(time, source, sigma_data), target, sigma_data)
    alpha, noise, _, _ = schedule_coefficients(time, source, sigma_data)
    new_alpha, new_noise, _, _ = schedule_coefficients(new_time, target, sigma_data)
    return new_time, (new_alpha + new_noise) / (alpha + noise)


def add_noise(x0, noise, time, *, schedule, target, sigma_data=0.5):
    """(x_t, training target) = (α·x0 + s·ε, p·x0 + q·ε) for the `target` prediction."""
    tau = _time("add_noise", time, x0)
    alpha, sigma, _, _ = schedule_coefficients(tau, schedule, sigma_data)
    p, q = prediction_coefficients(tau, schedule, target, sigma_data)
    return alpha * x0 + sigma * noise, p * x0 + q * noise


def flow_map(x_t, u, t, r):
    """Two-time flow map f(x_t, t, r) = x_t − (t − r)·u (MeanFlow's average velocity u)."""
    t_b, r_b = _time("flow_map", t, x_t, "t"), _time("flow_map", r, x_t, "r")
    return x_t - (t_b - r_b) * u


def flow_map_loss(
    u, u_minus, u_jvp, v, *, r=1.0, tangent_norm_c=0.1, tangent_norm="l2", weight=None, logvar=None, reduction="mean"
):
    """Align Your Flow's Eulerian map-distillation loss in sCM's tangent-normalised, adaptively weighted form.

    With u_jvp = (t − s)·du⁻/dt (the jvp of u⁻ along (v, 1, 0), tangents scaled by t − s) and the
    Eulerian target u_tgt = v − (t − s)·du/dt (MeanFlow's identity):
    g = (v − u⁻) − r·u_jvp,  ĝ = g/(‖g‖ + c) ("l2"), g/(‖g‖/√D + c) ("rms") or g ("none"),
    loss_b = w_b·e^{−logvar_b}·‖u_b − u⁻_b − ĝ_b‖²/D + logvar_b; r the tangent warm-up (1 after it).
    """

    def view(value):
        return view_per_sample(per_sample("flow_map_loss", "value", value, u, dtype=u.dtype), u)

    dims = tuple(range(1, u.dim()))
    g = (v - u_minus) - view(r) * u_jvp
    norm = g.square().sum(dims, keepdim=True).sqrt()
    if tangent_norm == "l2":
        g = g / (norm + tangent_norm_c)
    elif tangent_norm == "rms":
        g = g / (norm / u[0].numel() ** 0.5 + tangent_norm_c)
    g = g.detach()
    per_sample_loss = (u - u_minus.detach() - g).square().mean(dims)
    if weight is not None:
        per_sample_loss = per_sample("flow_map_loss", "weight", weight, u, dtype=u.dtype).detach() * per_sample_loss
    if logvar is not None:
        logvar_b = per_sample("flow_map_loss", "logvar", logvar, u, dtype=u.dtype)
        per_sample_loss = torch.exp(-logvar_b) * per_sample_loss + logvar_b
    if reduction == "none":
        return per_sample_loss
    return per_sample_loss.sum() if reduction == "sum" else per_sample_loss.mean()
