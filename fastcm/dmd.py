"""Distribution-matching losses, fused: DMD2's generator loss and the fake-score denoising loss, the two
extra terms that rCM adds to the sCM objective.

rCM = sCM + DMD. The student f_θ is trained with fastcm.scm_loss (consistency, the "forward"
divergence) plus λ·dmd_loss on its own samples x = f_θ(x_t, t) (the reverse divergence): x is re-noised
to x_s at a random time, the frozen teacher gives D_real = denoise(x_s) and a second "fake-score"
network, trained alongside with denoising_loss on detached student samples, gives D_fake; dmd_loss
then pulls x along D_real − D_fake. The two networks update in alternation (DMD2's two time-scale
rule: several fake-score steps per student step).

Each forward is one pass over the inputs writing per-sample partial sums (kernels/dmd.py) and a
B-sized epilogue; each backward is one elementwise pass (the linear-combination kernel of
kernels/steps.py) reading what the gradient needs.
"""

import torch

from . import _checks
from ._backend import select_backend
from ._checks import compute_dtype
from ._library import kernel_ops
from ._params import per_sample, view_per_sample
from .reference import dmd as reference
from .reference.dmd import REDUCTIONS
from .reference.flow import PREDICTIONS, SCHEDULES, prediction_coefficients
from .steps import _check_tensors, _run


def _fake_dmd_sums(x, real_denoised, fake_denoised):
    return x.new_empty((x.shape[0], 2), dtype=compute_dtype(x))


def _fake_denoising_sums(net_out, x0, noise, coefs):
    return net_out.new_empty((net_out.shape[0],), dtype=coefs.dtype)


_ops = kernel_ops(
    "dmd",
    {
        "dmd_sums": ("dmd_sums", _fake_dmd_sums),
        "denoising_sums": ("denoising_sums", _fake_denoising_sums),
    },
)


def _upstream(grad_out, reduction, batch):
    """The gradient reaching each per-sample loss, shape (B,)."""
    if reduction == "none":
        return grad_out
    return grad_out.expand(batch) / batch if reduction == "mean" else grad_out.expand(batch)


def _reduce(per_sample_loss, reduction):
    if reduction == "none":
        return per_sample_loss
    return per_sample_loss.sum() if reduction == "sum" else per_sample_loss.mean()


class _DMDLoss(torch.autograd.Function):
    @staticmethod
    def forward(x, real_denoised, fake_denoised, weight, reduction):
        sums = _ops.dmd_sums(x, real_denoised, fake_denoised)
        size = x[0].numel()
        normaliser = sums[:, 0] / size
        unweighted = 0.5 * sums[:, 1] / (normaliser.square() * size)
        per_sample_loss = unweighted if weight is None else unweighted * weight
        return _reduce(per_sample_loss, reduction).to(x.dtype), normaliser, unweighted

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, real_denoised, fake_denoised, weight, reduction = inputs
        _, normaliser, unweighted = output
        ctx.reduction = reduction
        ctx.mark_non_differentiable(normaliser, unweighted)
        ctx.save_for_backward(real_denoised, fake_denoised, weight, normaliser, unweighted)

    @staticmethod
    def backward(ctx, grad_out, *_):
        real, fake, weight, normaliser, unweighted = ctx.saved_tensors
        upstream = _upstream(grad_out.to(normaliser.dtype), ctx.reduction, real.shape[0])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            scale = upstream / (normaliser * real[0].numel())
            if weight is not None:
                scale = scale * weight
            if torch.is_grad_enabled():
                grad_x = (view_per_sample(scale, real) * (fake.to(scale.dtype) - real)).to(real.dtype)
            else:
                grad_x = _run("dmd_loss", real, (fake, real, None), (scale, -scale, 0.0, 0.0), None)
        if weight is not None and ctx.needs_input_grad[3]:
            grad_weight = upstream * unweighted
        return grad_x, None, None, grad_weight, None


class _DenoisingLoss(torch.autograd.Function):
    @staticmethod
    def forward(net_out, x0, noise, coefs, weight, reduction):
        unweighted = _ops.denoising_sums(net_out, x0, noise, coefs) / net_out[0].numel()
        per_sample_loss = unweighted if weight is None else unweighted * weight
        return _reduce(per_sample_loss, reduction).to(net_out.dtype), unweighted

    @staticmethod
    def setup_context(ctx, inputs, output):
        net_out, x0, noise, coefs, weight, reduction = inputs
        ctx.reduction = reduction
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(net_out, x0, noise, coefs, weight, output[1])

    @staticmethod
    def backward(ctx, grad_out, _):
        net_out, x0, noise, coefs, weight, unweighted = ctx.saved_tensors
        upstream = _upstream(grad_out.to(coefs.dtype), ctx.reduction, net_out.shape[0])
        grad_net_out = grad_weight = None
        if ctx.needs_input_grad[0]:
            scale = 2.0 * upstream / net_out[0].numel()
            if weight is not None:
                scale = scale * weight
            p, q = coefs[:, 0], coefs[:, 1]
            if torch.is_grad_enabled():
                residual = net_out.to(scale.dtype) - view_per_sample(p, x0) * x0 - view_per_sample(q, x0) * noise
                grad_net_out = (view_per_sample(scale, residual) * residual).to(net_out.dtype)
            else:
                grad_net_out = _run(
                    "denoising_loss", net_out, (x0, net_out, noise), (-scale * p, scale, -scale * q, 0.0), None
                )
        if weight is not None and ctx.needs_input_grad[4]:
            grad_weight = upstream * unweighted
        return grad_net_out, None, None, None, grad_weight, None


def _weight(op, weight, x):
    return None if weight is None else per_sample(op, "weight", weight, x, dtype=compute_dtype(x))


def dmd_loss(
    x: torch.Tensor, real_denoised: torch.Tensor, fake_denoised: torch.Tensor, *, weight=None, reduction: str = "mean"
) -> torch.Tensor:
    """DMD2's distribution-matching loss on generator samples x, fused.

    Per sample b with D elements: g_b = (D_fake − D_real)/mean|x_b − D_real| (DMD2's normalisation of
    the score difference) and loss_b = w_b·½·‖g_b‖²/D, the value of the surrogate
    ½·‖x_b − sg(x_b − g_b)‖²/D, whose gradient in x_b is w_b·g_b/D (gradient descent moves x along
    D_real − D_fake). reduction: "mean" (over the batch, DMD2's mse), "sum" or "none" ((B,) losses).

    Args:
        x: generator samples (B, ...), float32, bfloat16, float16 or float64.
        real_denoised, fake_denoised: the teacher's and the fake-score network's denoised estimates of a
            re-noised x, same shape / dtype / device as x; treated as constants (no gradient).
        weight: optional per-sample weight (float, 0-d tensor or B values).
    Returns: the loss in x's dtype, computed in float32 (float64 for float64).
    Gradients flow to x and a tensor weight; forward: one pass; backward: one pass (reads D_real, D_fake).
    """
    op = "dmd_loss"
    _check_tensors(op, "x", x, real_denoised=real_denoised, fake_denoised=fake_denoised)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if x[0].numel() == 0:
        raise ValueError(f"fastcm.{op}: x has shape {tuple(x.shape)}; expected at least one element per sample")
    if select_backend(op, x.device) == "reference":
        return reference.dmd_loss(x, real_denoised, fake_denoised, weight=weight, reduction=reduction)
    loss, _, _ = _DMDLoss.apply(
        x.contiguous(),
        real_denoised.detach().contiguous(),
        fake_denoised.detach().contiguous(),
        _weight(op, weight, x),
        reduction,
    )
    return loss


def denoising_loss(
    net_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    time,
    *,
    schedule: str,
    prediction: str,
    sigma_data: float = 0.5,
    weight=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The denoising loss of a network predicting `prediction` in `schedule` (DMD's fake-score loss, or a
    flow-matching teacher's), fused: loss_b = w_b·‖net_out_b − (p·x0_b + q·ε_b)‖²/D with the target's
    (p, q) at time τ (fastcm.reference.flow lists them; e.g. schedule="flow", prediction="flow":
    target ε − x0), the target never materialised.

    Args:
        net_out, x0, noise: same shape (B, ...) / dtype / device; x0 the (detached) clean sample, noise ε
            with x_t = α·x0 + s·ε the network's input.
        time: τ of `schedule` per sample; weight: optional per-sample weight.
    Returns: the loss (reduction "mean", "sum" or "none") in net_out's dtype, computed in float32
    (float64 for float64). Gradients flow to net_out and a tensor weight only.
    """
    op = "denoising_loss"
    _check_tensors(op, "net_out", net_out, x0=x0, noise=noise)
    _checks.check_choice(op, "schedule", schedule, SCHEDULES)
    _checks.check_choice(op, "prediction", prediction, PREDICTIONS)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if select_backend(op, net_out.device) == "reference":
        return reference.denoising_loss(
            net_out,
            x0,
            noise,
            time,
            schedule=schedule,
            prediction=prediction,
            sigma_data=sigma_data,
            weight=weight,
            reduction=reduction,
        )
    tau = per_sample(op, "time", time, net_out, dtype=torch.float64).detach()
    coefs = torch.stack(prediction_coefficients(tau, schedule, prediction, sigma_data), dim=1).to(
        compute_dtype(net_out)
    )
    loss, _ = _DenoisingLoss.apply(
        net_out.contiguous(),
        x0.detach().contiguous(),
        noise.detach().contiguous(),
        coefs.contiguous(),
        _weight(op, weight, net_out),
        reduction,
    )
    return loss


__all__ = ["dmd_loss", "denoising_loss"]
