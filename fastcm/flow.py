"""The flow family: prediction and time conversions between flow-matching, TrigFlow, VP and EDM
schedules, fused forward noising, the two-time flow map and the flow-map loss.

Each op here is linear in its tensor inputs once a few per-sample coefficients are known (see
fastcm.reference.flow for the schedules and predictions), so the fused path computes the (B,)
coefficients with torch ops and launches one kernel: the per-sample linear combination of the sampler
steps (kernels/steps.py) for conversions and flow maps, the two-output noising kernel of kernels/flow.py
for add_noise. One read of each input and one write of each output, with gradients and tangents of the
inputs and, through the coefficients, of the times (torch.func.jvp, forward-AD dual tensors, autograd,
double backward).
"""

from typing import Optional, Tuple

import torch

from . import _checks
from ._backend import select_backend
from ._checks import compute_dtype
from ._library import kernel_ops
from ._params import per_sample, view_per_sample
from .reference import flow as reference
from .reference.flow import PREDICTIONS, SCHEDULES, prediction_coefficients, schedule_coefficients
from .reference.steps import draw_seed, standard_noise
from .steps import _check_noise_args, _check_tensors, _run


def _fake_add_noise(x0, noise, coefs, seed, offset):
    return torch.empty_like(x0), torch.empty_like(x0)


_ops = kernel_ops("flow", {"add_noise": ("add_noise", _fake_add_noise)})


def _run_noise(like, seed, offset):
    """ε of a Philox (seed, offset) call, materialised: the gradients and tangents of the times need it."""
    from .steps import _ops as step_ops

    return step_ops.linear_combination(like, None, None, None, None, None, [0.0, 0.0, 0.0, 1.0], seed, offset, True)


def _pair(op, like, first, second, coefs, column_first, column_second):
    """coefs[:, column_first]·first + coefs[:, column_second]·second, either term possibly None, one launch."""
    if first is None:
        first, second, column_first, column_second = second, None, column_second, column_first
    if second is None:
        return _run(op, like, (None, first, None), (0.0, coefs[:, column_first], 0.0, 0.0), None)
    return _run(op, like, (second, first, None), (coefs[:, column_second], coefs[:, column_first], 0.0, 0.0), None)


class _AddNoise(torch.autograd.Function):
    """(x_t, target) = (α·x0 + s·ε, p·x0 + q·ε); coefs (B, 4) = (α, s, p, q); ε a tensor or Philox."""

    @staticmethod
    def forward(coefs, x0, noise, seed, offset):
        return _ops.add_noise(x0, noise, coefs, seed, offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        coefs, x0, noise, seed, offset = inputs
        ctx.stream = (seed, offset)
        ctx.save_for_backward(coefs, x0, noise)
        ctx.save_for_forward(coefs, x0, noise)

    @staticmethod
    def _noise(ctx, x0, noise):
        return _run_noise(x0, *ctx.stream) if noise is None else noise

    @staticmethod
    def backward(ctx, grad_x_t, grad_target):
        coefs, x0, noise = ctx.saved_tensors
        need_coefs, need_x0, need_noise = ctx.needs_input_grad[:3]
        grads = [None] * 5
        if torch.is_grad_enabled():
            eps = _AddNoise._noise(ctx, x0, noise)
            column = [view_per_sample(coefs[:, k], x0).to(x0.dtype) for k in range(4)]
            zero = torch.zeros_like(x0)
            g1 = zero if grad_x_t is None else grad_x_t
            g2 = zero if grad_target is None else grad_target
            if need_x0:
                grads[1] = column[0] * g1 + column[2] * g2
            if need_noise:
                grads[2] = column[1] * g1 + column[3] * g2
        else:
            g1 = None if grad_x_t is None else grad_x_t.contiguous()
            g2 = None if grad_target is None else grad_target.contiguous()
            if need_x0:
                grads[1] = _pair("add_noise", x0, g1, g2, coefs, 0, 2)
            if need_noise:
                grads[2] = _pair("add_noise", x0, g1, g2, coefs, 1, 3)
            eps = _AddNoise._noise(ctx, x0, noise) if need_coefs else None
        if need_coefs:
            work = coefs.dtype

            def dot(a, b):
                return (
                    torch.zeros(x0.shape[0], dtype=work, device=x0.device)
                    if a is None
                    else ((a.to(work) * b.to(work)).reshape(x0.shape[0], -1).sum(1))
                )

            grads[0] = torch.stack(
                [dot(grad_x_t, x0), dot(grad_x_t, eps), dot(grad_target, x0), dot(grad_target, eps)], dim=1
            )
        return tuple(grads)

    @staticmethod
    def jvp(ctx, coefs_t, x0_t, noise_t, *_):
        coefs, x0, noise = ctx.saved_tensors
        seed, offset = ctx.stream
        outputs = []
        for value, slope in ((0, 1), (2, 3)):
            if torch.is_grad_enabled():
                eps = _AddNoise._noise(ctx, x0, noise)
                out_t = torch.zeros_like(x0)
                for tangent, k in ((x0_t, value), (noise_t, slope)):
                    if tangent is not None:
                        out_t = out_t + view_per_sample(coefs[:, k], x0).to(x0.dtype) * tangent
                if coefs_t is not None:
                    out_t = (
                        out_t
                        + view_per_sample(coefs_t[:, value], x0).to(x0.dtype) * x0
                        + view_per_sample(coefs_t[:, slope], x0).to(x0.dtype) * eps
                    )
                outputs.append(out_t)
                continue
            zero = torch.zeros_like(coefs[:, 0])
            rate_value = zero if coefs_t is None else coefs_t[:, value]
            rate_slope = zero if coefs_t is None else coefs_t[:, slope]
            # ẋ = c_value·ẋ0 + c_slope·ε̇ + ċ_value·x0 + ċ_slope·ε, one launch (ε redrawn in-kernel if Philox).
            terms = (None if x0_t is None else x0_t.contiguous(), x0, None if noise_t is None else noise_t.contiguous())
            outputs.append(
                _run(
                    "add_noise",
                    x0,
                    terms,
                    (coefs[:, value], rate_value, coefs[:, slope], rate_slope),
                    None,
                    stochastic=True,
                    noise=noise,
                    seed=seed,
                    offset=offset,
                )
            )
        return tuple(outputs)


def _check_options(op, schedule, sigma_data, **predictions):
    _checks.check_choice(op, "schedule", schedule, SCHEDULES)
    for name, value in predictions.items():
        _checks.check_choice(op, name, value, PREDICTIONS)
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
        raise ValueError(f"fastcm.{op}: sigma_data={sigma_data!r} is not supported; expected a float > 0")


def _per_sample_time(op, name, value, x):
    """(B,) float64 time, differentiable: the coefficients are computed in float64 and rounded once."""
    return per_sample(op, name, value, x, dtype=torch.float64)


def convert_prediction(
    x_t: torch.Tensor, pred: torch.Tensor, time, *, schedule: str, source: str, target: str, sigma_data: float = 0.5
) -> torch.Tensor:
    """Re-express a network prediction at (x_t, τ) as another kind of prediction, in one fused pass.

    With x_t = α(τ)·x0 + s(τ)·ε and pred = p·x0 + q·ε (fastcm.reference.flow lists α, s, p, q per
    schedule and prediction), x0 = (q·x_t − s·pred)/det, ε = (α·pred − p·x_t)/det, det = α·q − s·p,
    and out = p'·x0 + q'·ε = A(τ)·x_t + B(τ)·pred for the target's (p', q').
    schedule: "flow" (τ = t ∈ [0, 1]), "trigflow" (τ = t ∈ [0, π/2]), "vp" (τ = ᾱ ∈ (0, 1]), "edm" (τ = σ).
    source, target: "x0", "eps", "v", "flow" (ε − x0), "trigflow" (TrigFlow F), "velocity" (dx_t/dτ).
    Undefined where det = 0 (e.g. from x0 to ε at s = 0).

    Args:
        x_t, pred: same shape (B, ...), dtype (float32, bfloat16, float16, float64) and device.
        time: τ per sample: a float, a 0-d tensor or B values.
    Returns: a tensor like x_t, computed in float32 (float64 for float64 inputs).
    Gradients and tangents flow to x_t, pred and a tensor `time`.
    """
    op = "convert_prediction"
    _check_tensors(op, "x_t", x_t, pred=pred)
    _check_options(op, schedule, sigma_data, source=source, target=target)
    if select_backend(op, x_t.device) == "reference":
        return reference.convert_prediction(
            x_t, pred, time, schedule=schedule, source=source, target=target, sigma_data=sigma_data
        )
    tau = _per_sample_time(op, "time", time, x_t)
    alpha, noise, _, _ = schedule_coefficients(tau, schedule, sigma_data)
    p, q = prediction_coefficients(tau, schedule, source, sigma_data)
    p_out, q_out = prediction_coefficients(tau, schedule, target, sigma_data)
    det = alpha * q - noise * p
    coef_x = (p_out * q - q_out * p) / det
    coef_pred = (q_out * alpha - p_out * noise) / det
    return _run(op, x_t, (x_t, pred, None), (coef_x, coef_pred, 0.0, 0.0), None)


def convert_time(time, *, source: str, target: str, sigma_data: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """The time of schedule `target` with the same signal-to-noise ratio as `time` in `source`, and the
    scale k with x_t(target) = k·x_t(source) (SANA-Sprint's map from a flow teacher's time to sCM's).

    Through the angle φ = atan2(s, α): flow t = sin φ/(sin φ + cos φ), trigflow t = atan2(sin φ, σd·cos φ),
    vp ᾱ = cos² φ, edm σ = tan φ; k = (α' + s')/(α + s). flow → trigflow: u = atan2(t, σd·(1 − t)),
    k = σd/√(σd²·(1 − t)² + t²). Plain torch on the time tensor (any shape; a float becomes a 0-d
    tensor): B numbers need no kernel, and torch.func.jvp / autograd give the tangent dτ'/dτ·τ̇ and
    the tangent of k directly. Returns (new_time, scale), each shaped like `time`.
    """
    op = "convert_time"
    _checks.check_choice(op, "source", source, SCHEDULES)
    _checks.check_choice(op, "target", target, SCHEDULES)
    _check_options(op, "flow", sigma_data)
    if isinstance(time, bool) or not isinstance(time, (int, float, torch.Tensor)):
        raise TypeError(f"fastcm.{op}: time must be a float or a tensor, got {type(time).__name__}")
    return reference.convert_time(time, source=source, target=target, sigma_data=sigma_data)


def add_noise(
    x0: torch.Tensor,
    time,
    *,
    schedule: str,
    target: str,
    noise: Optional[torch.Tensor] = None,
    sigma_data: float = 0.5,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward noising with the training target: (x_t, target) = (α·x0 + s·ε, p·x0 + q·ε).

    E.g. schedule="flow", target="flow": x_t = (1 − t)·x0 + t·ε and v = ε − x0 (flow matching);
    schedule="trigflow", target="velocity": x_t = cos t·x0 + sin t·σd·ε and dx_t/dt (sCM);
    target="eps": ε. ε is `noise` (a tensor like x0) or, without it, drawn in the kernel from
    (seed, offset) with Philox (seed drawn from `generator` / torch's global generator if None),
    never written to memory: both outputs come from one pass over x0 (and ε). The reference backend
    draws a different, also deterministic, stream (fastcm.steps explains both).

    Args:
        x0: (B, ...) float32, bfloat16, float16 or float64; noise: like x0 or None.
        time: τ of `schedule` per sample (float, 0-d tensor or B values).
    Returns: (x_t, target), each like x0; computed in float32 (float64 for float64).
    Gradients and tangents flow to x0, noise and a tensor `time`.
    """
    op = "add_noise"
    _check_tensors(op, "x0", x0, noise=noise)
    _check_options(op, schedule, sigma_data, target=target)
    _check_noise_args(op, seed, generator, offset)
    if noise is None and seed is None:
        seed = draw_seed(generator)
    if select_backend(op, x0.device) == "reference":
        eps = standard_noise(x0, noise=noise, seed=seed, offset=offset)
        return reference.add_noise(x0, eps, time, schedule=schedule, target=target, sigma_data=sigma_data)
    tau = _per_sample_time(op, "time", time, x0)
    alpha, sigma, _, _ = schedule_coefficients(tau, schedule, sigma_data)
    p, q = prediction_coefficients(tau, schedule, target, sigma_data)
    coefs = torch.stack([alpha, sigma, p, q], dim=1).to(compute_dtype(x0))
    return _AddNoise.apply(
        coefs, x0.contiguous(), None if noise is None else noise.contiguous(), int(seed or 0), int(offset)
    )


def flow_map(x_t: torch.Tensor, u: torch.Tensor, t, r) -> torch.Tensor:
    """Two-time flow map (MeanFlow, Align Your Flow): f(x_t, t, r) = x_t − (t − r)·u, one fused pass.

    x_t, u: same shape (B, ...) / dtype / device; u the average velocity from t to r of the flow
    x_t = (1 − t)·x0 + t·ε. t, r: per sample (float, 0-d tensor or B values).
    Returns a tensor like x_t (computed in float32; float64 for float64). Gradients and tangents
    flow to x_t, u and tensor t, r.
    """
    op = "flow_map"
    _check_tensors(op, "x_t", x_t, u=u)
    if select_backend(op, x_t.device) == "reference":
        return reference.flow_map(x_t, u, t, r)
    t_b, r_b = _per_sample_time(op, "t", t, x_t), _per_sample_time(op, "r", r, x_t)
    return _run(op, x_t, (x_t, u, None), (1.0, r_b - t_b, 0.0, 0.0), None)


def flow_map_loss(
    u: torch.Tensor,
    u_minus: torch.Tensor,
    u_jvp: torch.Tensor,
    v: torch.Tensor,
    *,
    r=1.0,
    tangent_norm_c: float = 0.1,
    tangent_norm: str = "l2",
    weight=None,
    logvar=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Align Your Flow's flow-map (Eulerian map distillation) loss in sCM's tangent-normalised, adaptively
    weighted form, on the fused sCM loss kernels.

    g = (v − u⁻) − r·u_jvp,  ĝ = g/(‖g‖ + c),  loss_b = w_b·e^{−logvar_b}·‖u_b − u⁻_b − ĝ_b‖²/D + logvar_b,
    i.e. a normalised step towards MeanFlow's target u_tgt = v − (t − s)·du/dt.

    Args:
        u: the average velocity u_θ(x_t, t, s) with gradient (flow map f = x_t − (t − s)·u); u_minus: u
            detached; u_jvp: (t − s)·du⁻/dt, the jvp of u⁻ along (v, 1, 0) with tangents scaled by
            (t − s), i.e. tangents ((t − s)·v, t − s, 0) (jvp is linear in them, so this costs nothing;
            fastcm.fd_tangent gives it without a jvp); v: the flow velocity dx_t/dt (ε − x0 for
            training, the teacher's velocity for distillation). Same shape / dtype / device.
        r: the tangent warm-up factor; tangent_norm ("l2", "rms", "none"), tangent_norm_c, weight,
            logvar, reduction: as in fastcm.scm_loss.
    Returns the loss; gradients flow to u and logvar only. This is scm_loss at t = 0, σd = 1, with
    dx_t/dt = v and F_jvp = u_jvp (sCM's g reduces to the one above there); the kernel reads v twice
    (once as sCM's x_t, whose coefficient is cos t·sin t = 0).
    """
    from .losses import scm_loss

    return scm_loss(
        u,
        u_minus,
        u_jvp,
        v,
        v,
        0.0,
        sigma_data=1.0,
        r=r,
        tangent_norm_c=tangent_norm_c,
        tangent_norm=tangent_norm,
        weight=weight,
        logvar=logvar,
        reduction=reduction,
    )


__all__ = ["convert_prediction", "convert_time", "add_noise", "flow_map", "flow_map_loss", "SCHEDULES", "PREDICTIONS"]
