"""Preconditioning + skip combination, fused: out = c_skip(σ)·x + c_out(σ)·F in one pass."""

import torch

from . import _checks
from ._backend import select_backend
from ._library import kernel_ops
from ._params import per_sample, view_per_sample
from .reference import precondition as reference
from .reference.precondition import PARAMS, precondition_scaling_derivatives, precondition_scalings

_OP = "precondition"


def _fake_forward(x, net_out, sigma, param, sigma_data, sigma_min):
    return torch.empty_like(x)


def _fake_backward(grad_out, x, net_out, sigma, param, sigma_data, sigma_min, need_x, need_net_out, need_sigma):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(net_out) if need_net_out else net_out.new_empty(0),
        sigma.new_empty(sigma.shape if need_sigma else (0,)),
    )


def _fake_jvp(x, net_out, sigma, x_t, net_out_t, sigma_t, param, sigma_data, sigma_min):
    return torch.empty_like(x)


_ops = kernel_ops(
    "precondition",
    {
        "forward": ("precondition_forward", _fake_forward),
        "backward": ("precondition_backward", _fake_backward),
        "jvp": ("precondition_jvp", _fake_jvp),
    },
)


def _coefficients(x, sigma, param, sigma_data, sigma_min):
    """(c_skip, c_out, dc_skip, dc_out), each shaped (B, 1, ..., 1), as differentiable torch ops."""
    c_skip, c_out, _ = precondition_scalings(sigma, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    d_c_skip, d_c_out = precondition_scaling_derivatives(sigma, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    return tuple(view_per_sample(c, x).to(x.dtype) for c in (c_skip, c_out, d_c_skip, d_c_out))


class _Precondition(torch.autograd.Function):
    @staticmethod
    def forward(x, net_out, sigma, param, sigma_data, sigma_min):
        return _ops.forward(x, net_out, sigma, param, sigma_data, sigma_min)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, net_out, sigma, param, sigma_data, sigma_min = inputs
        ctx.options = (param, sigma_data, sigma_min)
        ctx.save_for_backward(x, net_out, sigma)
        ctx.save_for_forward(x, net_out, sigma)

    @staticmethod
    def backward(ctx, grad_out):
        x, net_out, sigma = ctx.saved_tensors
        need_x, need_net_out, need_sigma = ctx.needs_input_grad[:3]
        # Grad mode on inside backward means create_graph=True or torch.func.grad: the gradient
        # must itself be differentiable, so it is built from torch ops instead of the kernel.
        if torch.is_grad_enabled():
            c_skip, c_out, d_c_skip, d_c_out = _coefficients(x, sigma, *ctx.options)
            grad_sigma = (grad_out * (d_c_skip * x + d_c_out * net_out)).flatten(1).sum(1) if need_sigma else None
            return (
                grad_out * c_skip if need_x else None,
                grad_out * c_out if need_net_out else None,
                grad_sigma.to(sigma.dtype) if need_sigma else None,
                None,
                None,
                None,
            )
        grad_x, grad_net_out, grad_sigma = _ops.backward(
            grad_out.contiguous(), x, net_out, sigma, *ctx.options, need_x, need_net_out, need_sigma
        )
        return (
            grad_x if need_x else None,
            grad_net_out if need_net_out else None,
            grad_sigma if need_sigma else None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, x_t, net_out_t, sigma_t, *_):
        x, net_out, sigma = ctx.saved_tensors
        # A jvp taken with grad enabled may be backpropagated through (MeanFlow does): then the
        # tangent is built from differentiable torch ops. Under no_grad (the sCM pattern) the
        # fused kernel computes it in one pass.
        if torch.is_grad_enabled():
            c_skip, c_out, d_c_skip, d_c_out = _coefficients(x, sigma, *ctx.options)
            out_t = torch.zeros_like(x)
            if x_t is not None:
                out_t = out_t + c_skip * x_t
            if net_out_t is not None:
                out_t = out_t + c_out * net_out_t
            if sigma_t is not None:
                out_t = out_t + view_per_sample(sigma_t, x).to(x.dtype) * (d_c_skip * x + d_c_out * net_out)
            return out_t
        contiguous = [t if t is None else t.contiguous() for t in (x_t, net_out_t, sigma_t)]
        return _ops.jvp(x, net_out, sigma, *contiguous, *ctx.options)


def _check(x, net_out, param, sigma_data, sigma_min):
    _checks.check_tensor(_OP, "x", x, min_dim=1)
    _checks.check_like(_OP, "net_out", net_out, "x", x, min_dim=1)
    _checks.check_choice(_OP, "param", param, PARAMS)
    if not sigma_data > 0:
        raise ValueError(f"fastcm.{_OP}: sigma_data must be > 0, got {sigma_data}")
    if param == "cm" and not sigma_min >= 0:
        raise ValueError(f"fastcm.{_OP}: sigma_min must be >= 0, got {sigma_min}")


def precondition(x, net_out, sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """Combine the network output with the skip connection: out = c_skip(σ)·x + c_out(σ)·net_out.

    param="edm":      c_skip = σd²/(σ²+σd²),        c_out = σ·σd/√(σ²+σd²)
    param="cm":       c_skip = σd²/((σ−σmin)²+σd²), c_out = (σ−σmin)·σd/√(σ²+σd²)  (out = x at σ = σmin)
    param="trigflow": out = cos(t)·x − sin(t)·σd·net_out, with `sigma` the TrigFlow time t ∈ [0, π/2]
    param="flow":     out = x − t·net_out: flow matching / rectified flow, x_t = (1−t)·x0 + t·ε, net_out the
                      velocity v = ε − x0, `sigma` the flow time t ∈ [0, 1]
    param="vp-eps" | "vp-x0" | "vp-v": VP, x_t = √ᾱ·x0 + √(1−ᾱ)·ε, `sigma` = ᾱ ∈ (0, 1] (diffusers'
                      alphas_cumprod at the step), net_out predicting ε, x0 or v = √ᾱ·ε − √(1−ᾱ)·x0:
                      out = (x − √(1−ᾱ)·ε̂)/√ᾱ, out = x̂0, out = √ᾱ·x − √(1−ᾱ)·v̂
    Every param returns the clean-sample estimate x̂0 (the consistency function for edm / cm / trigflow).
    sigma_data only enters edm, cm and trigflow. The σ-tangent of the VP forms is d/dᾱ, which is
    infinite at ᾱ = 1 for vp-eps and vp-v: take tangents at ᾱ < 1.

    Args:
        x, net_out: same shape (B, ...), rank ≥ 1, same dtype (float32, bfloat16, float16; float64
            too), same device. Non-contiguous inputs are copied to contiguous ones.
        sigma: per-sample noise level (or time t): a float, a 0-d tensor, or B values shaped (B,)
            or (B, 1, ..., 1).
    Returns: a tensor like x. Computed in float32 (float64 for float64 inputs).
    Gradients flow to x, net_out and a tensor sigma (the σ-gradient is a per-sample reduction
    fused into the same pass); forward-mode tangents of all three are supported
    (torch.func.jvp, forward-AD dual tensors). Under torch.no_grad the output tangent is one
    fused pass; with grad enabled (a tangent you will backpropagate through, or double backward)
    tangent and gradient are built from differentiable torch ops instead.
    torch.compile: traced as one custom-op node when no input requires grad; otherwise dynamo
    breaks the graph at this op (it cannot trace autograd.Functions with a custom jvp) and the
    op runs eagerly with the same result.
    """
    _check(x, net_out, param, sigma_data, sigma_min)
    backend = select_backend(_OP, x.device)
    if backend == "reference":
        return reference.precondition(x, net_out, sigma, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    sigma_b = per_sample(_OP, "sigma", sigma, x)
    return _Precondition.apply(
        x.contiguous(), net_out.contiguous(), sigma_b, param, float(sigma_data), float(sigma_min)
    )


__all__ = ["precondition", "precondition_scalings"]
