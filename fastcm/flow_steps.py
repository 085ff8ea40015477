"""Flow-matching sampler steps (rectified flow: x_t = (1 − t)·x0 + t·ε, the model predicts the velocity
v = ε − x0, as SD3/FLUX-style models and diffusers' FlowMatchEulerDiscreteScheduler), each one fused pass
on fastcm.steps' linear-combination kernel. Time runs from t = 1 (noise) down to t = 0 (data); shifted
grids come from fastcm.schedules.flow_times. Gradients and tangents flow to x, the velocities and tensor
t / t_next; `out=` writes in place (no-grad use only).
"""

import torch

from . import steps as _steps
from ._backend import select_backend
from .reference import flow_steps as reference


def _check(op, x, out, t, t_next, **tensors):
    _steps._check_tensors(op, "x", x, **tensors)
    _steps._check_out(op, out, "x", x)
    for name, value in (("t", t), ("t_next", t_next)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= 1:
            raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected a time in [0, 1]")


def flow_euler_step(x: torch.Tensor, velocity: torch.Tensor, t, t_next, *, out=None) -> torch.Tensor:
    """Euler step of the flow-matching ODE dx/dt = v from t to t': x' = x + (t' − t)·v.

    x, velocity: (B, ...) same shape/dtype/device (float32, bfloat16, float16, float64); computed in float32
    (float64 for float64). t, t_next in [0, 1]: float, 0-d, (B,) or (B,1,..,1). Returns a tensor like x.
    """
    op = "flow_euler_step"
    _check(op, x, out, t, t_next, velocity=velocity)
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(reference.flow_euler_step(x, velocity, t, t_next), out)
    t_b, t_next_b = _steps._params(op, x, t=t, t_next=t_next)
    return _steps._run(op, x, (x, velocity, None), (1.0, t_next_b - t_b, 0.0, 0.0), out)


def flow_heun_step(x: torch.Tensor, velocity: torch.Tensor, t, t_next, *, velocity_next=None, out=None) -> torch.Tensor:
    """Heun step of the flow-matching ODE: with x̃ = flow_euler_step(x, v, t, t') and v' = v(x̃; t'),
    x' = x + (t' − t)·(v + v')/2, fused over x, v, v'. velocity_next=None gives the Euler step (for the last
    step to t' = 0, where a Heun loop does not evaluate the model again). Shapes/dtypes as flow_euler_step.
    """
    op = "flow_heun_step"
    _check(op, x, out, t, t_next, velocity=velocity, velocity_next=velocity_next)
    if velocity_next is None:
        return flow_euler_step(x, velocity, t, t_next, out=out)
    if select_backend(op, x.device) == "reference":
        return _steps._finish_reference(
            reference.flow_heun_step(x, velocity, t, t_next, velocity_next=velocity_next), out
        )
    t_b, t_next_b = _steps._params(op, x, t=t, t_next=t_next)
    half = (t_next_b - t_b) / 2
    return _steps._run(op, x, (x, velocity, velocity_next), (1.0, half, half, 0.0), out)


__all__ = ["flow_euler_step", "flow_heun_step"]
