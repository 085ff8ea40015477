"""Reference preconditioning (EDM, CM boundary condition, TrigFlow): the specification the
fused kernels are tested against. Plain PyTorch, differentiable by autograd and torch.func.jvp."""

import torch

from .._params import per_sample, view_per_sample

PARAMS = ("edm", "cm", "trigflow")


def precondition_scalings(sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """(c_skip, c_out, c_in) for noise level `sigma` (TrigFlow: time t), elementwise.

    edm:       c_skip = σd²/(σ²+σd²),          c_out = σ·σd/√(σ²+σd²),        c_in = 1/√(σ²+σd²)
    cm:        c_skip = σd²/((σ−σmin)²+σd²),   c_out = (σ−σmin)·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²)
    trigflow:  c_skip = cos t,                  c_out = −σd·sin t,            c_in = 1/σd
    `sigma` may be a float or a tensor of any shape; the results have its shape.
    """
    if param not in PARAMS:
        raise ValueError(f"fastcm.precondition_scalings: param={param!r} is not supported; expected one of {PARAMS}")
    sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype()) if not isinstance(sigma, torch.Tensor) else sigma
    if param == "trigflow":
        return torch.cos(sigma), -sigma_data * torch.sin(sigma), torch.full_like(sigma, 1.0 / sigma_data)
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
    """
    c_skip, _, c_in = precondition_scalings(sigma, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    if param == "trigflow":
        return -torch.sin(sigma), -sigma_data * torch.cos(sigma)
    variance = sigma**2 + sigma_data**2
    shifted = sigma if param == "edm" else sigma - sigma_min
    d_c_skip = -2.0 * shifted * c_skip / (shifted**2 + sigma_data**2)
    d_c_out = sigma_data * c_in * (variance - shifted * sigma) / variance
    return d_c_skip, d_c_out


def precondition(x, net_out, sigma, *, param="edm", sigma_data=0.5, sigma_min=0.002):
    """out = c_skip(σ)·x + c_out(σ)·net_out with σ per sample (float, 0-d, (B,) or (B,1,..,1)).
    Computes in the dtype of x (call it with float64 tensors for the float64 reference)."""
    sigma_b = per_sample("precondition", "sigma", sigma, x, dtype=x.dtype)
    c_skip, c_out, _ = precondition_scalings(sigma_b, param=param, sigma_data=sigma_data, sigma_min=sigma_min)
    return view_per_sample(c_skip, x) * x + view_per_sample(c_out, x) * net_out


__all__ = ["precondition", "precondition_scalings", "precondition_scaling_derivatives", "PARAMS"]
