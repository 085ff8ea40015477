"""A JVP-free time tangent and a JVP checker.

Some networks cannot run under torch.func.jvp (custom ops without a jvp rule, FSDP-wrapped modules,
fused kernels from other libraries). fd_tangent estimates the tangent sCM and the flow-map losses need,
dF/dt along (dx_t/dt, 1), by finite differences with all evaluations batched into one call of the
network; check_jvp compares torch.func.jvp with the same finite difference to find where a jvp rule
is wrong (rCM debugged its instability this way).
"""

import math
from typing import Callable, List, Sequence, Tuple

import torch

from ._backend import select_backend
from ._checks import compute_dtype
from ._params import per_sample, view_per_sample
from .steps import _check_tensors, _run

SCHEMES = ("central", "forward", "backward")


def _offsets(t, eps, scheme, t_min, t_max):
    """Per-sample evaluation times (t + h_hi, t + h_lo): central where both fit in [t_min, t_max],
    one-sided where a step would leave it (so the network never sees a time outside its range)."""
    up = torch.full_like(t, eps) if scheme != "backward" else torch.zeros_like(t)
    down = torch.full_like(t, -eps) if scheme != "forward" else torch.zeros_like(t)
    if t_max is not None:
        over = t + up > t_max
        up, down = torch.where(over, torch.zeros_like(t), up), torch.where(over, torch.full_like(t, -eps), down)
    if t_min is not None:
        under = t + down < t_min
        up, down = torch.where(under, torch.full_like(t, eps), up), torch.where(under, torch.zeros_like(t), down)
    return up, down


def fd_tangent(
    f: Callable,
    x_t: torch.Tensor,
    t,
    dx_dt: torch.Tensor,
    *,
    eps: float = 1e-3,
    scheme: str = "central",
    t_min=None,
    t_max=None,
) -> torch.Tensor:
    """Finite-difference estimate of dF/dt = ∂F/∂x·dx_t/dt + ∂F/∂t for F = f(x_t, t), without a jvp.

    central:  (F(x_t + ε·ẋ, t + ε) − F(x_t − ε·ẋ, t − ε))/(2ε)    (error O(ε²))
    forward:  (F(x_t + ε·ẋ, t + ε) − F(x_t, t))/ε,  backward: (F(x_t, t) − F(x_t − ε·ẋ, t − ε))/ε  (O(ε))
    With t_min / t_max, a sample whose step would leave [t_min, t_max] uses the one-sided form
    that stays inside (sCM: t_min = 0, t_max = π/2). Both evaluations go through one call of f on the
    concatenated batch (2B samples), and the difference and its per-sample 1/(h_hi − h_lo) are one
    fused pass. For sCM's F_jvp pass the result times cos(t)·sin(t) (fastcm.scm_loss); in float32 pick
    ε ≈ 1e-3 (the truncation and the rounding errors balance near ε = ∛(float32 eps)).

    With scm_loss: F_jvp = cos t·sin t·fd_tangent(lambda x, s: net(x / σd, s), x_t, t, dx_dt, t_min=0,
    t_max=π/2). With flow_map_loss: u_jvp = (t − r)·fd_tangent(lambda x, s: net(x, s, torch.cat([r, r])),
    z, t, v, t_min=0, t_max=1) (other per-sample inputs of f are repeated for the 2B batch).

    Args:
        f: f(x, t) -> tensor (B, ...), called once with 2B samples; t is passed as a (2B,) tensor.
        x_t, dx_dt: same shape (B, ...) / dtype / device. t: per-sample time (float, 0-d or B values).
    Returns: a tensor like f's output. Runs f under whatever grad mode the caller has (sCM's tangent is
    a constant: call it under torch.no_grad()).
    """
    op = "fd_tangent"
    _check_tensors(op, "x_t", x_t, dx_dt=dx_dt)
    if scheme not in SCHEMES:
        raise ValueError(f"fastcm.{op}: scheme={scheme!r} is not supported; expected one of {SCHEMES}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"fastcm.{op}: eps={eps!r} is not supported; expected a finite float > 0")
    batch = x_t.shape[0]
    t_b = per_sample(op, "t", t, x_t, dtype=compute_dtype(x_t))
    up, down = _offsets(t_b, eps, scheme, t_min, t_max)
    x_both = torch.cat(
        [x_t + view_per_sample(up, x_t).to(x_t.dtype) * dx_dt, x_t + view_per_sample(down, x_t).to(x_t.dtype) * dx_dt]
    )
    out = f(x_both, torch.cat([t_b + up, t_b + down]))
    if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * batch:
        raise ValueError(
            f"fastcm.{op}: f must return a tensor with 2B = {2 * batch} samples for 2B inputs, got "
            f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
        )
    high, low = out[:batch], out[batch:]
    inverse_step = 1.0 / (up - down)
    if select_backend(op, out.device) == "reference" or torch.is_grad_enabled():
        return view_per_sample(inverse_step, high).to(high.dtype) * (high - low)
    return _run(op, high, (low, high, None), (-inverse_step, inverse_step, 0.0, 0.0), None)


def check_jvp(
    f: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], *, eps: float = 1e-3
) -> List[float]:
    """Relative error of torch.func.jvp(f, primals, tangents) against the central finite difference
    (f(p + ε·ṗ) − f(p − ε·ṗ))/(2ε), per output of f: ‖jvp − fd‖/max(‖fd‖, tiny).

    A jvp rule that is right gives errors of the finite difference's own size (≈ ε² times the third
    derivative plus rounding; use float64 primals for a sharp check: errors ~1e-8 at ε = 1e-4); a wrong
    rule gives errors of order 1. Synchronises with the device (it returns Python floats): a debugging
    tool, not for the training loop.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"fastcm.check_jvp: {len(primals)} primals but {len(tangents)} tangents; they must pair up")
    with torch.no_grad():
        _, jvp_out = torch.func.jvp(f, primals, tangents)
        plus = f(*(p + eps * d for p, d in zip(primals, tangents)))
        minus = f(*(p - eps * d for p, d in zip(primals, tangents)))
    outputs: Tuple = (jvp_out,) if isinstance(jvp_out, torch.Tensor) else tuple(jvp_out)
    plus = (plus,) if isinstance(plus, torch.Tensor) else tuple(plus)
    minus = (minus,) if isinstance(minus, torch.Tensor) else tuple(minus)
    errors = []
    for tangent, high, low in zip(outputs, plus, minus):
        work = torch.float64
        fd = (high.to(work) - low.to(work)) / (2 * eps)
        norm = fd.norm().item()
        errors.append((tangent.to(work) - fd).norm().item() / max(norm, torch.finfo(work).tiny))
    return errors


__all__ = ["fd_tangent", "check_jvp"]
