"""Reference preconditioning (EDM, CM boundary condition, TrigFlow, flow matching, VP with ε-, x0- or
v-prediction): the specification the fused kernels are tested against. Plain PyTorch, differentiable by
autograd and torch.func.jvp."""

import torch

from .._params import per_sample, view_per_sample

PARAMS = ("edm", "cm", "trigflow", "flow", "vp-eps", "vp-x0", "vp-v")


def precondition_scalings(sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """(c_skip, c_out, c_in) for noise level `sigma` (TrigFlow: time t), elementwise.

    edm:       c_skip = σd²/(σ²+σd²),          c_out = σ·σd/√(σ²+σd²),        c_in = 1/√(σ²+σd²)
    cm:        c_skip = σd²/((σ−σmin)²+σd²),   c_out = (σ−σmin)·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²)
    trigflow:  c_skip = cos t,                  c_out = −σd·sin t,            c_in = 1/σd
    flow:      c_skip = 1,                      c_out = −t,                   c_in = 1   (`sigma` = flow time t)
    vp-eps:    c_skip = 1/√ᾱ,                   c_out = −√(1−ᾱ)/√ᾱ,            c_in = 1   (`sigma` = ᾱ)
    vp-x0:     c_skip = 0,                      c_out = 1,                    c_in = 1
    vp-v:      c_skip = √ᾱ,                     c_out = −√(1−ᾱ),               c_in = 1
    `sigma` may be a float or a tensor of any shape; the results have its shape.
    """
    if param not in PARAMS:
        raise ValueError(f"fastcm.precondition_scalings: param={param!r} is not supported; expected one of {PARAMS}")
    sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype()) if not isinstance(sigma, torch.Tensor) else sigma
    if param == "trigflow":
        return torch.cos(sigma), -sigma_data * torch.sin(sigma), torch.full_like(sigma, 1.0 / sigma_data)
    if param == "flow" or param.startswith("vp"):
        return _flow_vp_scalings(sigma, param) + (torch.ones_like(sigma),)
    variance = sigma**2 + sigma_data**2
    c_in = torch.rsqrt(variance)
    if param == "edm":
        return sigma_data**2 / variance, sigma * sigma_data * c_in, c_in
    shifted = sigma - sigma_min
    return sigma_data**2 / (shifted**2 + sigma_data**2), shifted * sigma_data * c_in, c_in


def precondition_scaling_derivatives(sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """(dc_skip/dσ, dc_out/dσ), elementwise: the closed forms the fused backward and jvp use.

    edm:       dc_skip = −2σ·c_skip/(σ²+σd²),          dc_out = σd³/(σ²+σd²)^{3/2}
    cm:        dc_skip = −2(σ−σmin)·c_skip/((σ−σmin)²+σd²), dc_out = σd·(σ²+σd²−(σ−σmin)σ)/(σ²+σd²)^{3/2}
    trigflow:  dc_skip = −sin t,                        dc_out = −σd·cos t
    flow:      dc_skip = 0,                             dc_out = −1
    vp-eps:    dc_skip = −1/(2ᾱ^{3/2}),                 dc_out = 1/(2√(1−ᾱ)·ᾱ^{3/2})   (d/dᾱ)
    vp-x0:     dc_skip = 0,                             dc_out = 0
    vp-v:      dc_skip = 1/(2√ᾱ),                       dc_out = 1/(2√(1−ᾱ))
    """
    c_skip, _, c_in = precondition_scalings(sigma, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    if param == "trigflow":
        return -torch.sin(sigma), -sigma_data * torch.cos(sigma)
    if param == "flow" or param.startswith("vp"):
        return _flow_vp_scaling_derivatives(sigma, param)
    variance = sigma**2 + sigma_data**2
    shifted = sigma if param == "edm" else sigma - sigma_min
    d_c_skip = -2.0 * shifted * c_skip / (shifted**2 + sigma_data**2)
    d_c_out = sigma_data * c_in * (variance - shifted * sigma) / variance
    return d_c_skip, d_c_out


def _flow_vp_scalings(sigma, param):
    """(c_skip, c_out) of the x0 estimate for flow matching (x_t = (1−t)·x0 + t·ε, F = v = ε − x0,
    so x0 = x_t − t·v) and VP (x_t = √ᾱ·x0 + √(1−ᾱ)·ε; F = ε, x0, or v = √ᾱ·ε − √(1−ᾱ)·x0)."""
    if param == "flow":
        return torch.ones_like(sigma), -sigma
    if param == "vp-x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    signal, noise = torch.sqrt(sigma), torch.sqrt(1.0 - sigma)
    if param == "vp-eps":
        return 1.0 / signal, -noise / signal
    return signal, -noise


def _flow_vp_scaling_derivatives(sigma, param):
    if param == "flow":
        return torch.zeros_like(sigma), -torch.ones_like(sigma)
    if param == "vp-x0":
        return torch.zeros_like(sigma), torch.zeros_like(sigma)
    signal, noise = torch.sqrt(sigma), torch.sqrt(1.0 - sigma)
    if param == "vp-eps":
        return -0.5 / (sigma * signal), 0.5 / (noise * sigma * signal)
    return 0.5 / signal, 0.5 / noise


def precondition(x, net_out, sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """out = c_skip(σ)·x + c_out(σ)·net_out with σ per sample (float, 0-d, (B,) or (B,1,..,1)).
    Computes in the dtype of x (call it with float64 tensors for the float64 reference)."""
    sigma_b = per_sample("precondition", "sigma", sigma, x, dtype=x.dtype)
    c_skip, c_out, _ = precondition_scalings(sigma_b, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    return view_per_sample(c_skip, x) * x + view_per_sample(c_out, x) * net_out


__all__ = ["precondition", "precondition_scalings", "precondition_scaling_derivatives", "PARAMS"]
