"""Fused DiT block ops that carry tangents: adaLN modulated norm, gated residual, MLP activations.

Each op has a plain form (autograd and forward-mode AD through a torch.autograd.Function whose
jvp rule is one fused pass) and an explicit-tangent form `<op>_jvp(primals..., tangents...)`
returning (output, output tangent) from one pass with no functorch machinery in between.

Backends: CUDA tensors (and CPU tensors under FASTCM_BACKEND=triton with TRITON_INTERPRET=1) run
the Triton kernels; CPU tensors under FASTCM_BACKEND=auto run the closed forms of
fastcm.reference.blocks (the same formulas in ATen ops) inside the same autograd.Function, so a
jvp through them costs one closed-form pass per op; FASTCM_BACKEND=reference runs the plain
reference ops (autograd / functorch differentiate them op by op).
"""

import contextlib
from typing import Optional, Tuple

import torch
from torch.autograd import forward_ad

from . import _checks
from ._backend import requested_backend, select_backend
from ._checks import compute_dtype
from ._library import kernel_ops
from .reference import blocks as reference
from .reference.blocks import ACTIVATIONS, NORMS

Tensor = torch.Tensor


def _fake_pair(want_first, want_second, like, shape=None):
    shape = like.shape if shape is None else shape
    return [like.new_empty(shape if want_first else (0,)), like.new_empty(shape if want_second else (0,))]


def _fake_norm(x, shift, scale, weight, x_t, shift_t, scale_t, weight_t, norm, eps, want_y, want_y_t):
    return _fake_pair(want_y, want_y_t, x)


def _fake_norm_backward(grad, x, scale, weight, norm, eps, need_x, need_shift, need_scale, need_weight):
    accumulate = compute_dtype(x)
    batch, _, channels = x.shape
    return [
        x.new_empty(x.shape if need_x else (0,)),
        x.new_empty((batch, channels) if need_shift else (0,), dtype=accumulate),
        x.new_empty((batch, channels) if need_scale else (0,), dtype=accumulate),
        x.new_empty((channels,) if need_weight else (0,), dtype=accumulate),
    ]


def _fake_gated(x, gate, y, x_t, gate_t, y_t, want_out, want_out_t):
    return _fake_pair(want_out, want_out_t, x)


def _fake_gated_backward(grad, gate, y, need_y, need_gate):
    accumulate = compute_dtype(y)
    return [
        y.new_empty(y.shape if need_y else (0,)),
        y.new_empty((y.shape[0], y.shape[2]) if need_gate else (0,), dtype=accumulate),
    ]


def _fake_activation(x, x_t, kind, want_y, want_y_t):
    shape = x.shape[:-1] + (x.shape[-1] // 2,) if kind == "swiglu" else x.shape
    return _fake_pair(want_y, want_y_t, x, shape)


def _fake_activation_backward(grad, x, kind):
    return torch.empty_like(x)


_ops = kernel_ops(
    "blocks",
    {
        "norm": ("modulated_norm_launch", _fake_norm),
        "norm_backward": ("modulated_norm_backward", _fake_norm_backward),
        "gated": ("gated_residual_launch", _fake_gated),
        "gated_backward": ("gated_residual_backward", _fake_gated_backward),
        "activation": ("activation_launch", _fake_activation),
        "activation_backward": ("activation_backward", _fake_activation_backward),
    },
)


_NO_OP = contextlib.nullcontext()


def _no_grad():
    """torch.no_grad(), or nothing when grad mode is already off (entering one costs host time)."""
    return torch.no_grad() if torch.is_grad_enabled() else _NO_OP


def _contiguous(t):
    return t if t is None else t.contiguous()


def _rows(vector):
    """A (B, C) per-sample vector with unit channel stride; strided rows (the chunks of one adaLN
    linear output) are read in place by the kernels."""
    return vector if vector is None or vector.stride(-1) == 1 else vector.contiguous()


class _Triton:
    """The kernels behind the closed forms' signatures (absent results as None)."""

    @staticmethod
    def norm(x, shift, scale, weight, x_t, shift_t, scale_t, weight_t, norm, eps, want_y, want_y_t):
        y, y_t = _ops.norm(
            x,
            _rows(shift),
            _rows(scale),
            weight,
            _contiguous(x_t),
            _rows(shift_t),
            _rows(scale_t),
            _contiguous(weight_t),
            norm,
            eps,
            want_y,
            want_y_t,
        )
        return (y if want_y else None), (y_t if want_y_t else None)

    @staticmethod
    def norm_backward(grad, x, shift, scale, weight, norm, eps, needs):
        grads = _ops.norm_backward(grad.contiguous(), x, _rows(scale), weight, norm, eps, *needs)
        return tuple(
            g.view(p.shape).to(p.dtype) if need else None for g, p, need in zip(grads, (x, shift, scale, weight), needs)
        )

    @staticmethod
    def gated(x, gate, y, x_t, gate_t, y_t, want_out, want_out_t):
        out, out_t = _ops.gated(
            x, _rows(gate), y, _contiguous(x_t), _rows(gate_t), _contiguous(y_t), want_out, want_out_t
        )
        return (out if want_out else None), (out_t if want_out_t else None)

    @staticmethod
    def gated_backward(grad, gate, y, needs):
        grad_y, grad_gate = _ops.gated_backward(grad.contiguous(), _rows(gate), y, needs[2], needs[1])
        return (
            grad if needs[0] else None,
            grad_gate.view(gate.shape).to(gate.dtype) if needs[1] else None,
            grad_y if needs[2] else None,
        )

    @staticmethod
    def activation(kind, x, x_t, want_y, want_y_t):
        y, y_t = _ops.activation(x, _contiguous(x_t), kind, want_y, want_y_t)
        return (y if want_y else None), (y_t if want_y_t else None)

    @staticmethod
    def activation_backward(kind, grad, x):
        return _ops.activation_backward(grad.contiguous(), x, kind)


class _Closed:
    """The ATen closed forms (differentiable torch ops)."""

    norm = staticmethod(reference.modulated_norm_closed)
    gated = staticmethod(reference.gated_residual_closed)
    activation = staticmethod(reference.activation_closed)
    activation_backward = staticmethod(reference.activation_backward)

    @staticmethod
    def norm_backward(grad, x, shift, scale, weight, norm, eps, needs):
        return reference.modulated_norm_backward(grad, x, shift, scale, weight, norm, eps, needs)

    gated_backward = staticmethod(reference.gated_residual_backward)


_Triton.closed = _Closed.closed = _Closed


def implementation(op: str, device: torch.device, triton_impl, closed_impl):
    """triton_impl, closed_impl (CPU tensors under FASTCM_BACKEND=auto), or None for the plain reference."""
    if select_backend(op, device) == "triton":
        return triton_impl
    return closed_impl if requested_backend() == "auto" else None


def _implementation(op: str, device: torch.device):
    return implementation(op, device, _Triton, _Closed)


def differentiated() -> bool:
    """Whether a call may be differentiated: grad mode on, a forward-AD level open (dual tensors,
    torch.func.jvp) or any functorch transform. When none is, the ops call their implementation
    directly: an autograd.Function costs ~10-20 µs of host time per call even under no_grad."""
    return (
        torch.is_grad_enabled()
        or forward_ad._current_level >= 0
        or torch._C._functorch.maybe_current_level() is not None
    )


def differentiable(impl):
    """The implementation for a backward / jvp rule. Grad mode on inside one means a second-order
    use (create_graph, a tangent that will be backpropagated): the closed forms are differentiable
    torch ops, the kernels are not."""
    return impl.closed if torch.is_grad_enabled() else impl


class _ModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, shift, scale, weight, norm, eps, impl):
        return impl.norm(x, shift, scale, weight, None, None, None, None, norm, eps, True, False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, weight, norm, eps, impl = inputs
        ctx.options = (norm, eps, impl)
        ctx.save_for_backward(x, shift, scale, weight)
        ctx.save_for_forward(x, shift, scale, weight)

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale, weight = ctx.saved_tensors
        norm, eps, impl = ctx.options
        grads = differentiable(impl).norm_backward(grad, x, shift, scale, weight, norm, eps, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, shift_t, scale_t, weight_t, *_):
        x, shift, scale, weight = ctx.saved_tensors
        norm, eps, impl = ctx.options
        return differentiable(impl).norm(
            x, shift, scale, weight, x_t, shift_t, scale_t, weight_t, norm, eps, False, True
        )[1]


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(x, gate, y, impl):
        return impl.gated(x, gate, y, None, None, None, True, False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, y, impl = inputs
        ctx.impl = impl
        ctx.save_for_backward(gate, y)
        ctx.save_for_forward(x, gate, y)

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        return (*differentiable(ctx.impl).gated_backward(grad, gate, y, ctx.needs_input_grad[:3]), None)

    @staticmethod
    def jvp(ctx, x_t, gate_t, y_t, _):
        x, gate, y = ctx.saved_tensors
        return differentiable(ctx.impl).gated(x, gate, y, x_t, gate_t, y_t, False, True)[1]


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(x, kind, impl):
        return impl.activation(kind, x, None, True, False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kind, impl = inputs
        ctx.options = (kind, impl)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kind, impl = ctx.options
        return differentiable(impl).activation_backward(kind, grad, x), None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        (x,) = ctx.saved_tensors
        kind, impl = ctx.options
        return differentiable(impl).activation(kind, x, x_t, False, True)[1]


# ---- checks --------------------------------------------------------------------------------


def _check_like(op, name, value, ref_name, ref):
    _checks.check_tensor(op, name, value)
    _checks.check_same_shape(op, name, value, ref_name, ref)
    _checks.check_same_device(op, name, value, ref_name, ref)


def _check_tokens(op, name, x):
    _checks.check_tensor(op, name, x)
    if x.dim() != 3:
        raise ValueError(f"fastcm.{op}: {name} must be (B, N, C) tokens, got shape {tuple(x.shape)}")


def _check_per_sample(op, name, value, x):
    _checks.check_tensor(op, name, value)
    if value.shape != (x.shape[0], x.shape[2]) and value.shape != (x.shape[0], 1, x.shape[2]):
        raise ValueError(
            f"fastcm.{op}: {name} must have shape (B, C) = {(x.shape[0], x.shape[2])} or (B, 1, C) to "
            f"broadcast over the tokens of x {tuple(x.shape)}, got {tuple(value.shape)}"
        )
    _checks.check_same_device(op, name, value, "x", x)


def _check_norm(op, x, shift, scale, weight, norm, eps):
    _check_tokens(op, "x", x)
    _check_per_sample(op, "shift", shift, x)
    _check_per_sample(op, "scale", scale, x)
    if weight is not None:
        _checks.check_tensor(op, "weight", weight)
        if weight.shape != (x.shape[2],):
            raise ValueError(f"fastcm.{op}: weight must have shape (C,) = ({x.shape[2]},), got {tuple(weight.shape)}")
        _checks.check_same_device(op, "weight", weight, "x", x)
    _checks.check_choice(op, "norm", norm, NORMS)
    if not eps > 0:
        raise ValueError(f"fastcm.{op}: eps must be > 0, got {eps}")


def _check_tangents(op, pairs):
    for name, tangent, primal_name, primal in pairs:
        if tangent is not None:
            if primal is None:
                raise ValueError(f"fastcm.{op}: {name} is given but {primal_name} is None")
            _check_like(op, name, tangent, primal_name, primal)


# ---- public ops ----------------------------------------------------------------------------


def modulated_norm(
    x: Tensor, shift: Tensor, scale: Tensor, *, norm: str = "layer", weight: Optional[Tensor] = None, eps: float = 1e-6
) -> Tensor:
    """adaLN modulation of a normalised token tensor in one pass: y = norm(x)·w·(1 + scale) + shift.

    norm="layer": norm(x) = (x − mean)/√(var + eps); norm="rms": x/√(mean(x²) + eps), over C.
    Args:
        x: (B, N, C) tokens; float32, bfloat16, float16 or float64.
        shift, scale: (B, C) or (B, 1, C) per-sample modulation, broadcast over the N tokens
            (any float dtype; rows may be strided, e.g. chunks of one adaLN linear output).
        weight: optional (C,) elementwise affine weight w of the norm (None: w = 1).
    Returns: y like x, computed in float32 (float64 for float64 x).
    Gradients flow to x, shift, scale and weight (the per-sample sums over tokens are per-tile
    partials summed afterwards: deterministic); forward-mode tangents of all four give ẏ in one
    pass (LayerNorm: ẋ̂ = (ẋ − mean(ẋ) − x̂·mean(x̂⊙ẋ))/σ). Non-contiguous inputs are copied.
    """
    _check_norm("modulated_norm", x, shift, scale, weight, norm, eps)
    impl = _implementation("modulated_norm", x.device)
    if impl is None:
        return reference.modulated_norm(x, shift, scale, norm=norm, weight=weight, eps=eps)
    if not differentiated():
        return impl.norm(
            x.contiguous(), shift, scale, _contiguous(weight), None, None, None, None, norm, float(eps), True, False
        )[0]
    return _ModulatedNorm.apply(x.contiguous(), shift, scale, _contiguous(weight), norm, float(eps), impl)


def modulated_norm_jvp(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    x_t: Optional[Tensor] = None,
    shift_t: Optional[Tensor] = None,
    scale_t: Optional[Tensor] = None,
    *,
    norm: str = "layer",
    weight: Optional[Tensor] = None,
    weight_t: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor]:
    """modulated_norm and its tangent from one pass: returns (y, ẏ). Tangents shaped like their
    primals; None means zero. Outputs carry no autograd graph."""
    op = "modulated_norm_jvp"
    _check_norm(op, x, shift, scale, weight, norm, eps)
    _check_tangents(
        op,
        (
            ("x_t", x_t, "x", x),
            ("shift_t", shift_t, "shift", shift),
            ("scale_t", scale_t, "scale", scale),
            ("weight_t", weight_t, "weight", weight),
        ),
    )
    impl = _implementation(op, x.device)
    with _no_grad():
        if impl is None:
            tangents = [
                torch.zeros_like(p) if t is None else t for p, t in ((x, x_t), (shift, shift_t), (scale, scale_t))
            ]
            return torch.func.jvp(
                lambda a, b, c: reference.modulated_norm(a, b, c, norm=norm, weight=weight, eps=eps),
                (x, shift, scale),
                tuple(tangents),
            )
        return impl.norm(
            x.contiguous(),
            shift,
            scale,
            _contiguous(weight),
            x_t,
            shift_t,
            scale_t,
            weight_t,
            norm,
            float(eps),
            True,
            True,
        )


def _check_gated(op, x, gate, y):
    _check_tokens(op, "x", x)
    _check_like(op, "y", y, "x", x)
    _check_per_sample(op, "gate", gate, x)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Gated residual update of adaLN-Zero: out = x + gate·y.

    Args: x, y (B, N, C) tokens of one float dtype; gate (B, C) or (B, 1, C) per-sample, broadcast
    over tokens.
    Returns: out like x, computed in float32 (float64 for float64).
    Gradients flow to x, gate (a per-sample token sum, deterministic) and y; forward-mode
    tangents of all three (ȯut = ẋ + ġ·y + gate·ẏ) in one pass.
    """
    _check_gated("gated_residual", x, gate, y)
    _checks.check_same_dtype("gated_residual", "y", y, "x", x)
    impl = _implementation("gated_residual", x.device)
    if impl is None:
        return reference.gated_residual(x, gate, y)
    if not differentiated():
        return impl.gated(x.contiguous(), gate, y.contiguous(), None, None, None, True, False)[0]
    return _GatedResidual.apply(x.contiguous(), gate, y.contiguous(), impl)


def gated_residual_jvp(
    x: Tensor,
    gate: Tensor,
    y: Tensor,
    x_t: Optional[Tensor] = None,
    gate_t: Optional[Tensor] = None,
    y_t: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """gated_residual and its tangent from one pass: (out, ȯut); None tangents are zero. No autograd graph."""
    op = "gated_residual_jvp"
    _check_gated(op, x, gate, y)
    _check_tangents(op, (("x_t", x_t, "x", x), ("gate_t", gate_t, "gate", gate), ("y_t", y_t, "y", y)))
    impl = _implementation(op, x.device)
    with _no_grad():
        if impl is None:
            tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in ((x, x_t), (gate, gate_t), (y, y_t)))
            return torch.func.jvp(reference.gated_residual, (x, gate, y), tangents)
        return impl.gated(x.contiguous(), gate, y.contiguous(), x_t, gate_t, y_t, True, True)


def _check_activation(op, kind, x):
    _checks.check_tensor(op, "x", x, min_dim=1)
    if kind == "swiglu" and x.shape[-1] % 2:
        raise ValueError(f"fastcm.{op}: x's last dim must be even (two halves a, b), got shape {tuple(x.shape)}")


def _activation(kind: str, x: Tensor) -> Tensor:
    _check_activation(kind, kind, x)
    impl = _implementation(kind, x.device)
    if impl is None:
        return reference.ACTIVATION_FUNCTIONS[kind](x)
    if not differentiated():
        return impl.activation(kind, x.contiguous(), None, True, False)[0]
    return _Activation.apply(x.contiguous(), kind, impl)


def _activation_jvp(kind: str, x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor]:
    op = f"{kind}_jvp"
    _check_activation(op, kind, x)
    _check_like(op, "x_t", x_t, "x", x)
    impl = _implementation(op, x.device)
    with _no_grad():
        if impl is None:
            return torch.func.jvp(reference.ACTIVATION_FUNCTIONS[kind], (x,), (x_t,))
        return impl.activation(kind, x.contiguous(), x_t.contiguous(), True, True)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (DiT's MLP): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    x any shape, float32 / bfloat16 / float16 / float64, computed in float32 (float64). Gradient and
    forward-mode tangent: f'(x)·ẋ, one pass."""
    return _activation("gelu_tanh", x)


def silu(x: Tensor) -> Tensor:
    """SiLU x·sigmoid(x) (the adaLN conditioning input); as gelu_tanh for shapes, dtypes, derivatives."""
    return _activation("silu", x)


def swiglu(x: Tensor) -> Tensor:
    """SwiGLU gate: silu(a)·b with a, b = x.chunk(2, dim=-1); x (..., 2H) -> (..., H).
    Gradient to x; tangent silu'(a)·ȧ·b + silu(a)·ḃ in one pass."""
    return _activation("swiglu", x)


def gelu_tanh_jvp(x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor]:
    """(gelu_tanh(x), its tangent) from one pass; no autograd graph."""
    return _activation_jvp("gelu_tanh", x, x_t)


def silu_jvp(x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor]:
    """(silu(x), its tangent) from one pass; no autograd graph."""
    return _activation_jvp("silu", x, x_t)


def swiglu_jvp(x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor]:
    """(swiglu(x), its tangent) from one pass; no autograd graph."""
    return _activation_jvp("swiglu", x, x_t)


__all__ = [
    "modulated_norm",
    "modulated_norm_jvp",
    "gated_residual",
    "gated_residual_jvp",
    "gelu_tanh",
    "gelu_tanh_jvp",
    "silu",
    "silu_jvp",
    "swiglu",
    "swiglu_jvp",
    "ACTIVATIONS",
    "NORMS",
]
