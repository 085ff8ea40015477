"""Consistency-model losses, fused: pseudo-Huber (iCT/ECT), the sCM objective and MeanFlow.

Each forward is one pass over the inputs plus a one-program per-sample epilogue; each backward
is one elementwise pass writing the input gradient (see kernels/losses.py). When the input that
receives gradient requires it and grad mode is on, the sCM forward (samples of up to 8192
elements) and the MeanFlow forward (float32, float64) also save their per-element residual, so
that the backward reads that one tensor instead of all the inputs.
"""

import torch

from . import _checks
from ._backend import select_backend
from ._checks import compute_dtype
from ._library import gradients, kernel_ops
from ._params import per_sample, view_per_sample
from .reference import losses as reference
from .reference.losses import REDUCTIONS, TANGENT_NORMS, default_huber_c


def _stats_like(x, rows):
    return torch.empty((rows, x.shape[0]), dtype=compute_dtype(x), device=x.device)


def _loss_like(x, reduction):
    return x.new_empty((x.shape[0],) if reduction == "none" else ())


def _fake_huber_forward(input, target, weight, c, reduction):
    return _loss_like(input, reduction), _stats_like(input, 2)


def _fake_huber_backward(grad_out, input, target, weight, stats, reduction, need_input, need_target):
    return (
        torch.empty_like(input) if need_input else input.new_empty(0),
        torch.empty_like(target) if need_target else target.new_empty(0),
    )


def _fake_scm_forward(
    F,
    F_minus,
    F_jvp,
    x_t,
    dx_dt,
    t,
    r,
    weight,
    logvar,
    sigma_data,
    tangent_norm_c,
    tangent_norm,
    reduction,
    save_residual,
):
    from .kernels.losses import scm_saves_residual

    residual = _stats_like(F, 1).new_empty(F.shape) if scm_saves_residual(F, save_residual) else F.new_empty(0)
    return _loss_like(F, reduction), _stats_like(F, 3), residual


def _fake_scm_backward(grad_out, F, F_minus, F_jvp, x_t, dx_dt, t, r, stats, sigma_data, reduction):
    return torch.empty_like(F)


def _fake_scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, r, sigma_data, tangent_norm_c, tangent_norm):
    return torch.empty_like(F_minus)


def _fake_meanflow_forward(u, v, dudt, t, r, eps, p, reduction, save_residual):
    from .kernels.losses import meanflow_saves_residual

    residual = _stats_like(u, 1).new_empty(u.shape) if meanflow_saves_residual(u, save_residual) else u.new_empty(0)
    return _loss_like(u, reduction), _stats_like(u, 1)[0], residual


def _fake_meanflow_backward(grad_out, u, v, dudt, t, r, inv_weight, reduction):
    return torch.empty_like(u)


def _fake_residual_backward(grad_out, residual, coef, coef_scale, reduction, dtype):
    return residual.new_empty(residual.shape, dtype=dtype)


_ops = kernel_ops(
    "losses",
    {
        name: (name, fake)
        for name, fake in (
            ("pseudo_huber_forward", _fake_huber_forward),
            ("pseudo_huber_backward", _fake_huber_backward),
            ("scm_forward", _fake_scm_forward),
            ("scm_backward", _fake_scm_backward),
            ("scm_tangent", _fake_scm_tangent),
            ("meanflow_forward", _fake_meanflow_forward),
            ("meanflow_backward", _fake_meanflow_backward),
            ("residual_backward", _fake_residual_backward),
        )
    },
)


def _wants_residual(x) -> bool:
    """Whether the forward may also write the residual for the backward (the kernels decide where it
    pays): x, the input that receives gradient, will get one. Otherwise nothing per element is written."""
    return torch.is_grad_enabled() and x.requires_grad


def _differentiable(*tensors) -> bool:
    """The backward/jvp must itself be differentiable (create_graph=True, torch.func.grad, or a
    jvp taken with grad enabled): then it is written in torch ops, not a kernel."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _per_sample_upstream(grad_out, reduction, batch, dtype):
    """The gradient reaching each per-sample loss, shape (B,)."""
    grad_out = grad_out.to(dtype)
    if reduction == "none":
        return grad_out
    return grad_out.expand(batch) / batch if reduction == "mean" else grad_out.expand(batch)


def _reduce(per_sample_values, reduction, dtype):
    if reduction == "mean":
        per_sample_values = per_sample_values.mean()
    elif reduction == "sum":
        per_sample_values = per_sample_values.sum()
    return per_sample_values.to(dtype)


def _dot(a, b):
    """Per-sample ⟨a_b, b_b⟩ in a's dtype, shape (B,)."""
    return (a * b.to(a.dtype)).flatten(1).sum(dim=1)


def _ones(x):
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------- pseudo-Huber


def _huber_terms(input, target, weight, c):
    """(∂loss_b/∂input per element, distance_b), in differentiable torch ops."""
    diff = input.to(compute_dtype(input)) - target.to(compute_dtype(input))
    sq_dist = diff.flatten(1).pow(2).sum(dim=1)
    # With c = 0 (ECT's √L) a zero distance has no defined gradient: it is taken as 0, so the root is
    # replaced where it vanishes by 1 (leaving autograd a finite branch to differentiate).
    positive = sq_dist + c * c > 0
    root = torch.sqrt(torch.where(positive, sq_dist + c * c, torch.ones_like(sq_dist)))
    inv_root = torch.where(positive, 1.0 / root, torch.zeros_like(root))
    coef = inv_root if weight is None else weight * inv_root
    return view_per_sample(coef, diff) * diff, torch.where(positive, sq_dist / (root + c), torch.zeros_like(root))


class _PseudoHuber(torch.autograd.Function):
    @staticmethod
    def forward(input, target, weight, c, reduction):
        return _ops.pseudo_huber_forward(input, target, weight, c, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ctx.c, ctx.reduction = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, target, weight, output[1])
        ctx.save_for_forward(input, target, weight, output[1])

    @staticmethod
    def backward(ctx, grad_out, _):
        input, target, weight, stats = ctx.saved_tensors
        c, reduction = ctx.c, ctx.reduction
        need_input, need_target, need_weight = ctx.needs_input_grad[:3]
        upstream = _per_sample_upstream(grad_out, reduction, input.shape[0], stats.dtype)
        if _differentiable(input, target, weight, grad_out):
            per_element, distance = _huber_terms(input, target, weight, c)
            grad_input = (view_per_sample(upstream, per_element) * per_element).to(input.dtype)
            return (
                grad_input if need_input else None,
                -grad_input if need_target else None,
                upstream * distance if need_weight else None,
                None,
                None,
            )
        grad_input, grad_target = None, None
        if need_input or need_target:
            grad_input, grad_target = _ops.pseudo_huber_backward(
                grad_out, input, target, weight, stats, reduction, need_input, need_target
            )
        return (
            grad_input if need_input else None,
            grad_target if need_target else None,
            upstream * stats[0] if need_weight else None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, input_t, target_t, weight_t, *_):
        input, target, weight, stats = ctx.saved_tensors
        c, reduction = ctx.c, ctx.reduction
        if _differentiable(input, target, weight, input_t, target_t, weight_t):
            per_element, distance = _huber_terms(input, target, weight, c)
        else:
            per_element = _ops.pseudo_huber_backward(_ones(input), input, target, weight, stats, "none", True, False)[
                0
            ].to(stats.dtype)
            distance = stats[0]
        loss_t = torch.zeros_like(distance)
        if input_t is not None:
            loss_t = loss_t + _dot(per_element, input_t)
        if target_t is not None:
            loss_t = loss_t - _dot(per_element, target_t)
        if weight_t is not None:
            loss_t = loss_t + weight_t * distance
        return _reduce(loss_t, reduction, input.dtype), None


# ---------------------------------------------------------------- sCM


def _scm_terms(F, F_minus, F_jvp, x_t, dx_dt, t, r, weight, logvar, sigma_data, tangent_norm_c, tangent_norm):
    """(∂loss_b/∂F per element, ∂loss_b/∂logvar_b), in differentiable torch ops."""
    g_hat = reference._scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, sigma_data, r, tangent_norm_c, tangent_norm)
    residual = F.to(g_hat.dtype) - F_minus.to(g_hat.dtype) - g_hat
    per_sample_numel = F[0].numel()
    scale = torch.ones_like(t) if weight is None else weight
    if logvar is not None:
        scale = scale * torch.exp(-logvar)
    mse = residual.flatten(1).pow(2).sum(dim=1) / per_sample_numel
    return view_per_sample(2.0 * scale / per_sample_numel, residual) * residual, 1.0 - scale * mse


class _ScmLoss(torch.autograd.Function):
    INPUTS = (
        "F",
        "F_minus",
        "F_jvp",
        "x_t",
        "dx_dt",
        "t",
        "r",
        "weight",
        "logvar",
        "sigma_data",
        "tangent_norm_c",
        "tangent_norm",
        "reduction",
        "save_residual",
    )

    @staticmethod
    def forward(
        F,
        F_minus,
        F_jvp,
        x_t,
        dx_dt,
        t,
        r,
        weight,
        logvar,
        sigma_data,
        tangent_norm_c,
        tangent_norm,
        reduction,
        save_residual,
    ):
        return _ops.scm_forward(
            F,
            F_minus,
            F_jvp,
            x_t,
            dx_dt,
            t,
            r,
            weight,
            logvar,
            sigma_data,
            tangent_norm_c,
            tangent_norm,
            reduction,
            save_residual,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, ctx.sigma_data, ctx.tangent_norm_c, ctx.tangent_norm, ctx.reduction, _ = inputs
        _, stats, residual = output
        ctx.mark_non_differentiable(stats, residual)
        ctx.save_for_backward(*tensors, stats, residual)
        ctx.save_for_forward(*tensors, stats)

    @staticmethod
    def backward(ctx, grad_out, *_):
        F, F_minus, F_jvp, x_t, dx_dt, t, r, weight, logvar, stats, residual = ctx.saved_tensors
        sigma_data, reduction = ctx.sigma_data, ctx.reduction
        needs = dict(zip(_ScmLoss.INPUTS, ctx.needs_input_grad))
        need_F, need_logvar = needs["F"], needs["logvar"]
        upstream = _per_sample_upstream(grad_out, reduction, F.shape[0], stats.dtype)
        if _differentiable(F, logvar, grad_out):
            per_element, logvar_grad = _scm_terms(
                F, F_minus, F_jvp, x_t, dx_dt, t, r, weight, logvar, sigma_data, ctx.tangent_norm_c, ctx.tangent_norm
            )
            grad_F = (view_per_sample(upstream, per_element) * per_element).to(F.dtype) if need_F else None
            grad_logvar = upstream * logvar_grad if need_logvar else None
        else:
            grad_F = None
            if need_F and residual.numel():
                grad_F = _ops.residual_backward(grad_out, residual, stats[1], 2.0 / F[0].numel(), reduction, F.dtype)
            elif need_F:
                grad_F = _ops.scm_backward(grad_out, F, F_minus, F_jvp, x_t, dx_dt, t, r, stats, sigma_data, reduction)
            grad_logvar = upstream * (1.0 - stats[1] * stats[2]) if need_logvar else None
        return gradients(_ScmLoss.INPUTS, F=grad_F, logvar=grad_logvar)

    @staticmethod
    def jvp(ctx, F_t, _F_minus_t, _F_jvp_t, _x_t_t, _dx_dt_t, _t_t, _r_t, _weight_t, logvar_t, *_):
        F, F_minus, F_jvp, x_t, dx_dt, t, r, weight, logvar, stats = ctx.saved_tensors
        sigma_data, reduction = ctx.sigma_data, ctx.reduction
        if _differentiable(F, logvar, F_t, logvar_t):
            per_element, logvar_grad = _scm_terms(
                F, F_minus, F_jvp, x_t, dx_dt, t, r, weight, logvar, sigma_data, ctx.tangent_norm_c, ctx.tangent_norm
            )
        else:
            per_element = (
                _ops.scm_backward(_ones(F), F, F_minus, F_jvp, x_t, dx_dt, t, r, stats, sigma_data, "none").to(
                    stats.dtype
                )
                if F_t is not None
                else None
            )
            logvar_grad = 1.0 - stats[1] * stats[2]
        loss_t = torch.zeros_like(logvar_grad)
        if F_t is not None:
            loss_t = loss_t + _dot(per_element, F_t)
        if logvar_t is not None:
            loss_t = loss_t + logvar_t * logvar_grad
        return _reduce(loss_t, reduction, F.dtype), None, None


# ---------------------------------------------------------------- MeanFlow


def _meanflow_per_element(u, v, dudt, t, r, eps, p):
    """∂loss_b/∂u = 2·(u − u_tgt)/(L_b + ε)^p, in differentiable torch ops."""
    error = u.to(t.dtype) - (v.to(t.dtype) - view_per_sample(t - r, u) * dudt.to(t.dtype))
    sq_error = error.flatten(1).pow(2).sum(dim=1)
    return view_per_sample(2.0 / (sq_error.detach() + eps) ** p, error) * error


class _MeanFlowLoss(torch.autograd.Function):
    INPUTS = ("u", "v", "dudt", "t", "r", "eps", "p", "reduction", "save_residual")

    @staticmethod
    def forward(u, v, dudt, t, r, eps, p, reduction, save_residual):
        return _ops.meanflow_forward(u, v, dudt, t, r, eps, p, reduction, save_residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, ctx.eps, ctx.p, ctx.reduction, _ = inputs
        _, inv_weight, residual = output
        ctx.mark_non_differentiable(inv_weight, residual)
        ctx.save_for_backward(*tensors, inv_weight, residual)
        ctx.save_for_forward(*tensors, inv_weight)

    @staticmethod
    def backward(ctx, grad_out, *_):
        u, v, dudt, t, r, inv_weight, residual = ctx.saved_tensors
        eps, p, reduction = ctx.eps, ctx.p, ctx.reduction
        if _differentiable(u, grad_out):
            upstream = _per_sample_upstream(grad_out, reduction, u.shape[0], t.dtype)
            per_element = _meanflow_per_element(u, v, dudt, t, r, eps, p)
            grad_u = (view_per_sample(upstream, per_element) * per_element).to(u.dtype)
        elif residual.numel():
            grad_u = _ops.residual_backward(grad_out, residual, inv_weight, 2.0, reduction, u.dtype)
        else:
            grad_u = _ops.meanflow_backward(grad_out, u, v, dudt, t, r, inv_weight, reduction)
        return gradients(_MeanFlowLoss.INPUTS, u=grad_u)

    @staticmethod
    def jvp(ctx, u_t, *_):
        u, v, dudt, t, r, inv_weight = ctx.saved_tensors
        eps, p, reduction = ctx.eps, ctx.p, ctx.reduction
        if _differentiable(u, u_t):
            per_element = _meanflow_per_element(u, v, dudt, t, r, eps, p)
        else:
            per_element = _ops.meanflow_backward(_ones(u), u, v, dudt, t, r, inv_weight, "none").to(t.dtype)
        loss_t = _dot(per_element, u_t) if u_t is not None else torch.zeros_like(t)
        return _reduce(loss_t, reduction, u.dtype), None, None


# ---------------------------------------------------------------- checks and public functions


def _check_inputs(op, named_tensors):
    """Every per-element input: a floating tensor of rank ≥ 1 with at least one element, all of one
    shape, dtype and device (the first is the reference)."""
    (first_name, first), *rest = named_tensors
    _checks.check_tensor(op, first_name, first, min_dim=1)
    if first.numel() == 0:
        raise ValueError(
            f"fastcm.{op}: {first_name} has shape {tuple(first.shape)}; expected at least one "
            f"sample with at least one element"
        )
    for name, value in rest:
        _checks.check_like(op, name, value, first_name, first, min_dim=1)


def pseudo_huber_loss(input, target, *, c=None, weight=None, reduction="mean"):
    """Pseudo-Huber distance of iCT/ECT per sample, optionally weighted, reduced over the batch.

    loss_b = w_b·(√(‖input_b − target_b‖² + c²) − c),  ‖·‖ over all non-batch dims (D elements),
    c = 0.00054·√D by default (iCT's 0.00054 for 3·32·32 images, scaled with √D).

    Args:
        input, target: same shape (B, ...), rank ≥ 1, same dtype (float32, bfloat16, float16,
            float64) and device. Non-contiguous inputs are copied to contiguous ones.
        c: float ≥ 0, or None for the default. c = 0 is ECT's √L, the L2 distance ‖input_b − target_b‖
            (its gradient at a zero distance is taken as 0); ECT weights it with schedules.ect_weight.
        weight: None, or per-sample weights: a float, 0-d tensor, or B values ((B,) or (B, 1, ..., 1)).
        reduction: "mean" (over the batch), "sum", or "none" (returns the (B,) per-sample losses).
    Returns: the loss in the input dtype, computed in float32 (float64 for float64 inputs).
    Gradients flow to input, target and a tensor weight; forward-mode tangents of all three are
    supported (torch.func.jvp). The backward is one pass: ∂loss_b/∂input = w_b·(input_b − target_b)/√(‖·‖² + c²).
    """
    op = "pseudo_huber_loss"
    _check_inputs(op, (("input", input), ("target", target)))
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if c is not None:
        _checks.check_positive(op, "c", c, allow_zero=True, hint=" (or None for 0.00054·sqrt(D))")
    if select_backend(op, input.device) == "reference":
        return reference.pseudo_huber_loss(input, target, c=c, weight=weight, reduction=reduction)
    weight_b = None if weight is None else per_sample(op, "weight", weight, input)
    c = default_huber_c(input[0].numel()) if c is None else float(c)
    return _PseudoHuber.apply(input.contiguous(), target.contiguous(), weight_b, c, reduction)[0]


def _scm_parameters(op, F_minus, t, r, sigma_data, tangent_norm_c, tangent_norm):
    _checks.check_positive(op, "sigma_data", sigma_data)
    _checks.check_positive(op, "tangent_norm_c", tangent_norm_c)
    _checks.check_choice(op, "tangent_norm", tangent_norm, TANGENT_NORMS)
    return (per_sample(op, "t", t, F_minus).detach(), per_sample(op, "r", r, F_minus).detach())


def scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, *, sigma_data=0.5, r=1.0, tangent_norm_c=0.1, tangent_norm="l2"):
    """The normalised sCM tangent ĝ (arXiv 2410.11081, Alg. 1), for users who build their own loss.

    g = −cos²t·(σd·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σd·F_jvp),  ĝ = g/(‖g‖ + c) per sample,
    ‖g‖ the L2 norm ("l2"), the RMS norm ‖g‖/√D ("rms"), or no normalisation ("none").

    Args:
        F_minus: F_θ⁻(x_t/σd, t), the detached network output; F_jvp: cos t·sin t·dF⁻/dt (the JVP
            output); x_t, dx_dt: the noisy sample and its time derivative. Same shape (B, ...),
            dtype and device; non-contiguous inputs are copied.
        t, r: per-sample (float, 0-d, (B,) or (B, 1, ..., 1)); r is the tangent warm-up factor.
    Returns: ĝ in the input dtype (computed in float32; float64 for float64), without gradient.
    """
    op = "scm_tangent"
    _check_inputs(op, (("F_minus", F_minus), ("F_jvp", F_jvp), ("x_t", x_t), ("dx_dt", dx_dt)))
    t_b, r_b = _scm_parameters(op, F_minus, t, r, sigma_data, tangent_norm_c, tangent_norm)
    if select_backend(op, F_minus.device) == "reference":
        return reference.scm_tangent(
            F_minus,
            F_jvp,
            x_t,
            dx_dt,
            t_b,
            sigma_data=sigma_data,
            r=r_b,
            tangent_norm_c=tangent_norm_c,
            tangent_norm=tangent_norm,
        )
    with torch.no_grad():
        return _ops.scm_tangent(
            *(v.detach().contiguous() for v in (F_minus, F_jvp, x_t, dx_dt)),
            t_b,
            r_b,
            float(sigma_data),
            float(tangent_norm_c),
            tangent_norm,
        )


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
    """The sCM objective (arXiv 2410.11081, Alg. 1) in the order of the public sCM/rCM code.

    g = −cos²t·(σd·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σd·F_jvp),  ĝ = g/(‖g‖ + c),
    loss_b = w_b·e^{−logvar_b}·‖F_b − F⁻_b − ĝ_b‖²/D + logvar_b   (D elements per sample).

    Args:
        F: F_θ(x_t/σd, t), the network output with gradient; F_minus: the same output detached
            (or another network's); F_jvp: cos t·sin t·dF⁻/dt; x_t, dx_dt: noisy sample and its
            time derivative. Same shape (B, ...), dtype (float32, bfloat16, float16, float64) and
            device; non-contiguous inputs are copied.
        t, r: per-sample time and tangent warm-up factor (float, 0-d, (B,) or (B, 1, ..., 1)).
        tangent_norm: "l2" (the paper), "rms" or "none"; tangent_norm_c: the c > 0 above.
        weight: optional per-sample prior weight, e.g. 1/(σd·tan t) (stop-gradient).
        logvar: optional learned per-sample log-weight (0 when None).
        reduction: "mean" (over the batch), "sum" or "none" ((B,) per-sample losses).
    Returns: the loss in F's dtype, computed in float32 (float64 for float64).
    Gradients (and forward-mode tangents) flow to F and logvar only; every other input is
    stop-gradient. ∂loss_b/∂F = 2·w_b·e^{−logvar_b}·(F − F⁻ − ĝ)/D, written in one pass.
    Memory: when F requires grad (grad mode on) and a sample has at most 8192 elements (4096 for
    float64), the forward holds each sample on chip and also writes the residual F − F⁻ − ĝ, one
    extra tensor of F's shape in float32 (float64 for float64), kept until the backward; the
    backward then reads only it. Otherwise nothing per element is saved and the backward re-reads
    the five inputs, and the forward assembles ‖F − F⁻ − ĝ‖² from ‖F − F⁻‖², ⟨F − F⁻, g⟩ and ‖g‖²
    (exact when F⁻ = F; when F − F⁻ ≈ ĝ its absolute error is about the dtype's epsilon times
    ‖F − F⁻‖²/D).
    """
    op = "scm_loss"
    _check_inputs(op, (("F", F), ("F_minus", F_minus), ("F_jvp", F_jvp), ("x_t", x_t), ("dx_dt", dx_dt)))
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    t_b, r_b = _scm_parameters(op, F, t, r, sigma_data, tangent_norm_c, tangent_norm)
    weight_b = None if weight is None else per_sample(op, "weight", weight, F).detach()
    logvar_b = None if logvar is None else per_sample(op, "logvar", logvar, F)
    if select_backend(op, F.device) == "reference":
        return reference.scm_loss(
            F,
            F_minus,
            F_jvp,
            x_t,
            dx_dt,
            t_b,
            sigma_data=sigma_data,
            r=r_b,
            tangent_norm_c=tangent_norm_c,
            tangent_norm=tangent_norm,
            weight=weight_b,
            logvar=logvar_b,
            reduction=reduction,
        )
    stop_gradient = (v.detach().contiguous() for v in (F_minus, F_jvp, x_t, dx_dt))
    return _ScmLoss.apply(
        F.contiguous(),
        *stop_gradient,
        t_b,
        r_b,
        weight_b,
        logvar_b,
        float(sigma_data),
        float(tangent_norm_c),
        tangent_norm,
        reduction,
        _wants_residual(F),
    )[0]


def meanflow_loss(u, v, dudt, t, r, *, eps=1e-3, p=0.75, reduction="mean"):
    """The MeanFlow objective (arXiv 2505.13447) with its adaptive loss weight.

    u_tgt = sg(v − (t − r)·du/dt),  L_b = ‖u_b − u_tgt,b‖² (sum over the D elements),
    loss_b = L_b / sg(L_b + ε)^p.

    Args:
        u: the average-velocity prediction u_θ(z, r, t) with gradient; v: the instantaneous
            velocity e − x; dudt: the JVP of u along (v, 1, 0). Same shape (B, ...), dtype (float32,
            bfloat16, float16, float64) and device; non-contiguous inputs are copied.
        t, r: per-sample times, r ≤ t (float, 0-d, (B,) or (B, 1, ..., 1)).
        eps > 0, p: the adaptive-weight constants (official code: 1e-3, 0.75).
        reduction: "mean" (over the batch), "sum" or "none" ((B,) per-sample losses).
    Returns: the loss in u's dtype, computed in float32 (float64 for float64).
    Gradients and forward-mode tangents flow to u only: ∂loss_b/∂u = 2·(u − u_tgt)/(L_b + ε)^p,
    written in one pass.
    Memory: for float32/float64 u that requires grad (grad mode on), the forward also writes
    u − u_tgt, one extra tensor of u's shape and dtype kept until the backward, which then reads
    only it. For bf16/fp16 (whose residual would be kept in float32 and cost more bytes than it
    saves) and without grad, nothing per element is saved and the backward re-reads u, v, du/dt.
    """
    op = "meanflow_loss"
    _check_inputs(op, (("u", u), ("v", v), ("dudt", dudt)))
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    _checks.check_positive(op, "eps", eps)
    _checks.check_finite(op, "p", p)
    t_b = per_sample(op, "t", t, u).detach()
    r_b = per_sample(op, "r", r, u).detach()
    if select_backend(op, u.device) == "reference":
        return reference.meanflow_loss(u, v, dudt, t_b, r_b, eps=eps, p=p, reduction=reduction)
    return _MeanFlowLoss.apply(
        u.contiguous(),
        v.detach().contiguous(),
        dudt.detach().contiguous(),
        t_b,
        r_b,
        float(eps),
        float(p),
        reduction,
        _wants_residual(u),
    )[0]


__all__ = ["pseudo_huber_loss", "scm_loss", "scm_tangent", "meanflow_loss"]
