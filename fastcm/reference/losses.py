"""Reference consistency-model losses (pseudo-Huber, sCM, MeanFlow): the specification the fused
kernels are tested against. Plain PyTorch, differentiable by autograd and torch.func.jvp.

bf16/fp16 inputs are computed in float32 (a per-sample sum of 64K squares overflows fp16) and
the loss is returned in the input dtype; float64 stays float64.
"""

import math

import torch

from .._params import per_sample, view_per_sample

REDUCTIONS = ("none", "mean", "sum")
TANGENT_NORMS = ("l2", "rms", "none")


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_sum(t):
    return t.flatten(1).sum(dim=1)


def _reduce(per_sample_loss, reduction):
    if reduction == "mean":
        return per_sample_loss.mean()
    if reduction == "sum":
        return per_sample_loss.sum()
    return per_sample_loss


def default_huber_c(per_sample_numel):
    """iCT's c = 0.00054·√D for D elements per sample."""
    return 0.00054 * math.sqrt(per_sample_numel)


def pseudo_huber_loss(input, target, *, c=None, weight=None, reduction="mean"):
    """loss_b = w_b·(√(‖input_b − target_b‖² + c²) − c), reduced over the batch."""
    compute = _compute_dtype(input)
    if c is None:
        c = default_huber_c(input[0].numel())
    sq_dist = _per_sample_sum((input.to(compute) - target.to(compute)) ** 2)
    # √(s + c²) − c = s / (√(s + c²) + c): the same value without cancellation for s ≪ c².
    # c = 0 (ECT's √L): a zero distance is 0 with gradient 0 (the where keeps autograd off 0/0).
    positive = sq_dist + c * c > 0
    safe = torch.where(positive, sq_dist, torch.ones_like(sq_dist))
    distance = torch.where(positive, safe / (torch.sqrt(safe + c * c) + c), torch.zeros_like(sq_dist))
    if weight is not None:
        distance = per_sample("pseudo_huber_loss", "weight", weight, input, dtype=compute) * distance
    return _reduce(distance, reduction).to(input.dtype)


def scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, *, sigma_data=0.5, r=1.0, tangent_norm_c=0.1, tangent_norm="l2"):
    """Normalised sCM tangent ĝ (stop-gradient), in the input dtype:
    g = −cos²t·(σd·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σd·F_jvp),  ĝ = g / (‖g‖ + c)."""
    return _scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, sigma_data, r, tangent_norm_c, tangent_norm).to(F_minus.dtype)


def _scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, sigma_data, r, tangent_norm_c, tangent_norm):
    compute = _compute_dtype(F_minus)
    F_minus, F_jvp, x_t, dx_dt = (v.detach().to(compute) for v in (F_minus, F_jvp, x_t, dx_dt))
    t_b = view_per_sample(per_sample("scm_tangent", "t", t, F_minus, dtype=compute).detach(), F_minus)
    r_b = view_per_sample(per_sample("scm_tangent", "r", r, F_minus, dtype=compute).detach(), F_minus)
    cos_t, sin_t = torch.cos(t_b), torch.sin(t_b)
    g = -cos_t * cos_t * (sigma_data * F_minus - dx_dt) - r_b * (cos_t * sin_t * x_t + sigma_data * F_jvp)
    if tangent_norm == "none":
        return g
    g_norm = torch.sqrt(_per_sample_sum(g * g))
    if tangent_norm == "rms":
        g_norm = g_norm / math.sqrt(g[0].numel())
    return g / (view_per_sample(g_norm, g) + tangent_norm_c)


def scm_loss(
    F,
    F_minus,
    F_jvp,
    x_t,
    dx_dt,
    t,
    *,
    sigma_data=0.5,
    r=1.0,
    tangent_norm_c=0.1,
    tangent_norm="l2",
    weight=None,
    logvar=None,
    reduction="mean",
):
    """loss_b = w_b·e^{−logvar_b}·‖F_b − F⁻_b − ĝ_b‖²/D + logvar_b; gradients to F and logvar only."""
    compute = _compute_dtype(F)
    g = _scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, sigma_data, r, tangent_norm_c, tangent_norm)
    residual = F.to(compute) - F_minus.detach().to(compute) - g
    loss = _per_sample_sum(residual * residual) / F[0].numel()
    if weight is not None:
        loss = per_sample("scm_loss", "weight", weight, F, dtype=compute).detach() * loss
    if logvar is not None:
        logvar_b = per_sample("scm_loss", "logvar", logvar, F, dtype=compute)
        loss = torch.exp(-logvar_b) * loss + logvar_b
    return _reduce(loss, reduction).to(F.dtype)


def meanflow_loss(u, v, dudt, t, r, *, eps=1e-3, p=0.75, reduction="mean"):
    """u_tgt = sg(v − (t − r)·dudt),  L_b = ‖u_b − u_tgt,b‖²,  loss_b = L_b / sg(L_b + ε)^p."""
    compute = _compute_dtype(u)
    t_b = per_sample("meanflow_loss", "t", t, u, dtype=compute).detach()
    r_b = per_sample("meanflow_loss", "r", r, u, dtype=compute).detach()
    u_target = v.detach().to(compute) - view_per_sample(t_b - r_b, u) * dudt.detach().to(compute)
    error = u.to(compute) - u_target
    sq_error = _per_sample_sum(error * error)
    loss = sq_error / (sq_error.detach() + eps) ** p
    return _reduce(loss, reduction).to(u.dtype)


__all__ = [
    "pseudo_huber_loss",
    "scm_loss",
    "scm_tangent",
    "meanflow_loss",
    "default_huber_c",
    "REDUCTIONS",
    "TANGENT_NORMS",
]
