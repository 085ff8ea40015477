"""Reference flow-matching sampler steps (rectified flow, x_t = (1 − t)·x0 + t·ε, velocity v = ε − x0, the
parameterisation of SD3/FLUX-style models): the specification the fused steps are tested against.
Plain PyTorch, differentiable; computes in the dtype of the inputs. Per-sample parameters: float, 0-d,
(B,) or (B, 1, ..., 1)."""

from .steps import _param


def flow_euler_step(x, velocity, t, t_next):
    """x' = x + (t' − t)·v."""
    t = _param("flow_euler_step", "t", t, x)
    t_next = _param("flow_euler_step", "t_next", t_next, x)
    return x + (t_next - t) * velocity


def flow_heun_step(x, velocity, t, t_next, *, velocity_next=None):
    """x̃ = x + (t' − t)·v, v' = v(x̃; t'), x' = x + (t' − t)·(v + v')/2; Euler (x̃) when velocity_next is None."""
    t = _param("flow_heun_step", "t", t, x)
    t_next = _param("flow_heun_step", "t_next", t_next, x)
    if velocity_next is None:
        return x + (t_next - t) * velocity
    return x + (t_next - t) * (velocity + velocity_next) / 2


__all__ = ["flow_euler_step", "flow_heun_step"]
