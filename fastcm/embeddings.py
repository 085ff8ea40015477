"""DiT position and time embeddings that carry tangents: RoPE and the float32 sinusoidal
timestep embedding, each with a plain form (autograd.Function with a one-pass jvp rule) and an
explicit-tangent form. Backends as in fastcm.blocks."""

from typing import Tuple

import torch

from . import _checks
from ._checks import compute_dtype
from ._library import kernel_ops
from .blocks import _no_grad, differentiable, differentiated, implementation
from .reference import embeddings as reference
from .reference.embeddings import grid_positions, rope_tables

Tensor = torch.Tensor


def _fake_rope(x, x_t, cos, sin, inverse, want_y, want_y_t):
    return [x.new_empty(x.shape if want_y else (0,)), x.new_empty(x.shape if want_y_t else (0,))]


def _fake_timestep(t, t_t, dim, max_period, want_y, want_y_t):
    dtype = compute_dtype(t)
    return [t.new_empty((t.shape[0], dim) if want else (0,), dtype=dtype) for want in (want_y, want_y_t)]


def _fake_timestep_backward(grad, t, dim, max_period):
    return torch.empty_like(t)


_ops = kernel_ops(
    "embeddings",
    {
        "rope": ("rope_launch", _fake_rope),
        "timestep": ("timestep_embedding_launch", _fake_timestep),
        "timestep_backward": ("timestep_embedding_backward", _fake_timestep_backward),
    },
)


def _none_if_unwanted(pair, wants):
    return tuple(t if want else None for t, want in zip(pair, wants))


class _Triton:
    @staticmethod
    def rope(x, x_t, cos, sin, inverse, want_y, want_y_t):
        return _none_if_unwanted(
            _ops.rope(x, None if x_t is None else x_t.contiguous(), cos, sin, inverse, want_y, want_y_t),
            (want_y, want_y_t),
        )

    @staticmethod
    def timestep(t, t_t, dim, max_period, want_y, want_y_t):
        return _none_if_unwanted(
            _ops.timestep(t, None if t_t is None else t_t.contiguous(), dim, max_period, want_y, want_y_t),
            (want_y, want_y_t),
        )

    @staticmethod
    def timestep_backward(grad, t, dim, max_period):
        return _ops.timestep_backward(grad.contiguous(), t, dim, max_period)


class _Closed:
    rope = staticmethod(reference.rope_closed)
    timestep = staticmethod(reference.timestep_embedding_closed)
    timestep_backward = staticmethod(reference.timestep_embedding_backward)


_Triton.closed = _Closed.closed = _Closed


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(x, cos, sin, impl):
        return impl.rope(x, None, cos, sin, False, True, False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, cos, sin, impl = inputs
        ctx.impl = impl
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        impl = differentiable(ctx.impl)
        return impl.rope(grad.contiguous(), None, cos, sin, True, True, False)[0], None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        cos, sin = ctx.saved_tensors
        return differentiable(ctx.impl).rope(x_t.contiguous(), None, cos, sin, False, True, False)[0]


class _TimestepEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(t, dim, max_period, impl):
        return impl.timestep(t, None, dim, max_period, True, False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, dim, max_period, impl = inputs
        ctx.options = (dim, max_period, impl)
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        dim, max_period, impl = ctx.options
        return differentiable(impl).timestep_backward(grad, t, dim, max_period), None, None, None

    @staticmethod
    def jvp(ctx, t_t, *_):
        (t,) = ctx.saved_tensors
        dim, max_period, impl = ctx.options
        return differentiable(impl).timestep(t, t_t, dim, max_period, False, True)[1]


def _check_rope(op, q, k, cos, sin):
    for name, x in (("q", q), ("k", k)):
        _checks.check_tensor(op, name, x)
        if x.dim() != 4 or x.shape[-1] % 2:
            raise ValueError(f"fastcm.{op}: {name} must be (B, H, N, d) with an even d, got shape {tuple(x.shape)}")
    _checks.check_same_device(op, "k", k, "q", q)
    if k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"fastcm.{op}: k has shape {tuple(k.shape)}; its (N, d) must match q's {tuple(q.shape[-2:])}")
    table = (q.shape[-2], q.shape[-1] // 2)
    for name, value in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(op, name, value)
        if value.shape != table:
            raise ValueError(f"fastcm.{op}: {name} must have shape (N, d/2) = {table}, got {tuple(value.shape)}")
        _checks.check_same_device(op, name, value, "q", q)


def _tables(cos, sin, dtype):
    compute = compute_dtype(dtype)
    return cos.to(compute).contiguous(), sin.to(compute).contiguous()


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotary position embedding of queries and keys (half-split convention):
    x = (x₁, x₂) along the head dim -> (x₁·cos − x₂·sin, x₂·cos + x₁·sin).

    Args:
        q: (B, H, N, d), k: (B, Hk, N, d), d even; float32 / bfloat16 / float16 / float64.
        cos, sin: (N, d/2) tables, e.g. from rope_tables(grid_positions(h, w), d) for 2-D patches.
    Returns: (q', k') like q and k, computed in float32 (float64).
    Gradients and forward-mode tangents flow to q and k (the rotation by the negated angle, and
    the same rotation of the tangent, one pass each); cos and sin are treated as constants
    (no gradient, no tangent) except under FASTCM_BACKEND=reference.
    """
    _check_rope("rope", q, k, cos, sin)
    impl = implementation("rope", q.device, _Triton, _Closed)
    if impl is None:
        return reference.rope(q, k, cos, sin)
    cos, sin = _tables(cos, sin, q.dtype)
    if not differentiated():
        return (
            impl.rope(q.contiguous(), None, cos, sin, False, True, False)[0],
            impl.rope(k.contiguous(), None, cos, sin, False, True, False)[0],
        )
    return _Rope.apply(q.contiguous(), cos, sin, impl), _Rope.apply(k.contiguous(), cos, sin, impl)


def rope_jvp(
    q: Tensor, k: Tensor, q_t: Tensor, k_t: Tensor, cos: Tensor, sin: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """rope and its tangent: (q', k', q̇', k̇'), each tensor and its tangent rotated in one pass.
    No autograd graph."""
    op = "rope_jvp"
    _check_rope(op, q, k, cos, sin)
    for name, tangent, primal in (("q_t", q_t, q), ("k_t", k_t, k)):
        _checks.check_tensor(op, name, tangent)
        _checks.check_same_shape(op, name, tangent, name[0], primal)
    impl = implementation(op, q.device, _Triton, _Closed)
    with _no_grad():
        if impl is None:
            (q_out, k_out), (q_out_t, k_out_t) = torch.func.jvp(
                lambda a, b: reference.rope(a, b, cos, sin), (q, k), (q_t, k_t)
            )
            return q_out, k_out, q_out_t, k_out_t
        cos, sin = _tables(cos, sin, q.dtype)
        q_out, q_out_t = impl.rope(q.contiguous(), q_t, cos, sin, False, True, True)
        k_out, k_out_t = impl.rope(k.contiguous(), k_t, cos, sin, False, True, True)
    return q_out, k_out, q_out_t, k_out_t


def _check_timestep(op, t, dim, max_period):
    _checks.check_tensor(op, "t", t, min_dim=1)
    if t.dim() != 1:
        raise ValueError(f"fastcm.{op}: t must be (B,) times, got shape {tuple(t.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"fastcm.{op}: dim must be a positive int, got {dim!r}")
    if not max_period > 0:
        raise ValueError(f"fastcm.{op}: max_period must be > 0, got {max_period}")


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal timestep embedding, always computed in float32 (low-precision time
    embeddings destabilise continuous-time consistency training).

    e(t) = [cos(t·f), sin(t·f)], f_j = max_period^(−j/half), half = dim // 2 (a zero column
    appended for odd dim). t: (B,) floating; returns (B, dim) float32 (float64 for float64 t).
    Gradient to t: Σ_j g_j·∂e_j/∂t (one reduction per sample); its exact tangent in t,
    ė = ṫ·[−f·sin(t·f), f·cos(t·f)], in one pass.
    """
    _check_timestep("timestep_embedding", t, dim, max_period)
    impl = implementation("timestep_embedding", t.device, _Triton, _Closed)
    if impl is None:
        return reference.timestep_embedding(t.to(reference.compute_dtype(t.dtype)), dim, max_period=max_period)
    if not differentiated():
        return impl.timestep(t.contiguous(), None, dim, float(max_period), True, False)[0]
    return _TimestepEmbedding.apply(t.contiguous(), dim, float(max_period), impl)


def timestep_embedding_jvp(t: Tensor, t_t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tuple[Tensor, Tensor]:
    """(timestep_embedding(t), its tangent for ṫ = t_t) from one pass; no autograd graph."""
    op = "timestep_embedding_jvp"
    _check_timestep(op, t, dim, max_period)
    _checks.check_tensor(op, "t_t", t_t)
    _checks.check_same_shape(op, "t_t", t_t, "t", t)
    impl = implementation(op, t.device, _Triton, _Closed)
    with _no_grad():
        if impl is None:
            dtype = reference.compute_dtype(t.dtype)
            return torch.func.jvp(
                lambda s: reference.timestep_embedding(s, dim, max_period=max_period), (t.to(dtype),), (t_t.to(dtype),)
            )
        return impl.timestep(t.contiguous(), t_t, dim, float(max_period), True, True)


__all__ = ["rope", "rope_jvp", "rope_tables", "grid_positions", "timestep_embedding", "timestep_embedding_jvp"]
