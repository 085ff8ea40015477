"""Reference distribution-matching losses (DMD / DMD2, the regulariser of rCM): the specification the
fused kernels are tested against. Plain PyTorch, differentiable by autograd; computes in the dtype of
its inputs (float64 for the reference)."""

from .._params import per_sample
from .flow import prediction_coefficients

REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample_loss, weight, x, op, reduction):
    if weight is not None:
        per_sample_loss = per_sample_loss * per_sample(op, "weight", weight, x, dtype=per_sample_loss.dtype)
    if reduction == "none":
        return per_sample_loss
    return per_sample_loss.sum() if reduction == "sum" else per_sample_loss.mean()


def dmd_loss(x, real_denoised, fake_denoised, *, weight=None, reduction="mean"):
    """DMD2's distribution-matching loss on generator samples x.

    Per sample b (D elements): g_b = (D_fake − D_real)/mean|x_b − D_real| (the score difference
    s_real − s_fake = (D_real − D_fake)/σ² up to its sign and scale, normalised as in DMD2), and
    loss_b = w_b·½·‖x_b − sg(x_b − g_b)‖²/D = w_b·½·‖g_b‖²/D, whose gradient in x_b is w_b·g_b/D:
    descending it moves x along D_real − D_fake. D_real and D_fake are detached.
    """
    real, fake = real_denoised.detach(), fake_denoised.detach()
    dims = tuple(range(1, x.dim()))
    normaliser = (x.detach() - real).abs().mean(dims, keepdim=True)
    direction = (fake - real) / normaliser
    per_sample_loss = 0.5 * (x - (x - direction).detach()).square().mean(dims)
    return _reduce(per_sample_loss, weight, x, "dmd_loss", reduction)


def denoising_loss(net_out, x0, noise, time, *, schedule, prediction, sigma_data=0.5, weight=None, reduction="mean"):
    """The denoising (score-matching) loss of a network predicting `prediction` in `schedule`, e.g. DMD's
    fake-score network on detached generator samples x0: loss_b = w_b·‖net_out_b − (p·x0_b + q·ε_b)‖²/D
    with (p, q) of fastcm.reference.flow.prediction_coefficients. Only net_out (and weight) get gradients."""
    tau = per_sample("denoising_loss", "time", time, net_out, dtype=net_out.dtype)
    p, q = prediction_coefficients(tau, schedule, prediction, sigma_data)
    shape = (-1,) + (1,) * (net_out.dim() - 1)
    target = (p.reshape(shape) * x0 + q.reshape(shape) * noise).detach()
    per_sample_loss = (net_out - target).square().mean(tuple(range(1, net_out.dim())))
    return _reduce(per_sample_loss, weight, net_out, "denoising_loss", reduction)
