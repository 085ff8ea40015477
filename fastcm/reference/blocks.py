"""Reference DiT block ops (adaLN modulated norm, gated residual, MLP activations): the
specification the fused kernels are tested against, plain PyTorch, differentiable by autograd
and torch.func.jvp, exact in float64.

Below the specification are the closed forms of each op's tangent and gradient (the formulas
the kernels implement), written with ATen ops: fastcm.blocks runs them on CPU tensors under
FASTCM_BACKEND=auto, and the tests check them against autograd / torch.func.jvp of the spec.
"""

import math

import torch

NORMS = ("layer", "rms")
ACTIVATIONS = ("gelu_tanh", "silu", "swiglu")
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def normalize(x, norm="layer", eps=1e-6):
    """LayerNorm (x − mean)/√(var + eps) or RMS norm x/√(mean(x²) + eps) over the last dim, no affine."""
    if norm == "layer":
        centred = x - x.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _broadcast(vector):
    """A per-sample vector, (B, C) or (B, 1, C), as (B, 1, C)."""
    return vector.reshape(vector.shape[0], 1, vector.shape[-1])


def modulated_norm(x, shift, scale, *, norm="layer", weight=None, eps=1e-6):
    """adaLN: y = norm(x)·w·(1 + scale) + shift; x (B, N, C), shift / scale (B, C) or (B, 1, C) broadcast over
    the N tokens, weight (C,) or None (w = 1). Computes in x's dtype."""
    normed = normalize(x, norm, eps)
    if weight is not None:
        normed = normed * weight
    return normed * (1 + _broadcast(scale)) + _broadcast(shift)


def gated_residual(x, gate, y):
    """x + gate·y; x, y (B, N, C), gate (B, C) or (B, 1, C) broadcast over the N tokens."""
    return x + _broadcast(gate) * y


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1 + torch.tanh(_GELU_K * (x + _GELU_C * x.pow(3))))


def silu(x):
    """x·sigmoid(x)."""
    return x * torch.sigmoid(x)


def swiglu(x):
    """silu(a)·b with (a, b) the two halves of the last dim of x: (..., 2H) -> (..., H)."""
    a, b = x.chunk(2, dim=-1)
    return silu(a) * b


# ---- closed forms (ATen; the formulas the kernels implement) ---------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t, dtype):
    """t in dtype (no call when it already is: Tensor.to costs a few µs of host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t, dtype):
    return None if t is None else _as(t, dtype)


def _statistics(x, norm, eps):
    """(x̂, mean, rstd) in x's dtype (mean None for RMS), one ATen call for LayerNorm."""
    if norm == "layer":
        return torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, None, rstd


def _normalize_transposed(vector, x, normed, mean, rstd, norm):
    """J·v for the Jacobian J = ∂x̂/∂x of one row. J is symmetric (LayerNorm:
    r·(I − 11ᵀ/C − x̂x̂ᵀ/C); RMS: r·(I − x̂x̂ᵀ/C)), so this is both the tangent of x̂ along v and
    the gradient of x from the gradient v of x̂: LayerNorm's own backward kernel computes it."""
    if norm == "layer":
        return torch.ops.aten.native_layer_norm_backward(
            vector, x, (x.shape[-1],), mean, rstd, None, None, [True, False, False]
        )[0]
    return (vector - normed * (normed * vector).mean(-1, keepdim=True)) * rstd


def over_tokens(vector, dtype=None):
    """A per-sample (B, C) vector as (B, 1, C), broadcasting over tokens ((B, 1, C) is kept)."""
    vector = vector if dtype is None else _as(vector, dtype)
    return vector if vector.dim() == 3 else vector.unsqueeze(1)


def _sum_tokens(values, like):
    """Σ over tokens of (B, N, C) values, shaped and typed like the per-sample vector `like`."""
    return _as(values.sum(1, keepdim=like.dim() == 3), like.dtype)


def modulated_norm_closed(x, shift, scale, weight, x_t, shift_t, scale_t, weight_t, norm, eps, want_y, want_y_t):
    """(y or None, ẏ or None) in x's dtype, computed in float32 (float64 for float64).

    With x̂ the normalised row and r = rstd: LayerNorm ẋ̂ = r·(ẋ − mean(ẋ) − x̂·mean(x̂⊙ẋ)),
    RMS ẋ̂ = r·(ẋ − x̂·mean(x̂⊙ẋ)); n = x̂·w, ṅ = ẋ̂·w + x̂·ẇ; ẏ = ṅ·(1 + s) + n·ṡ + ḣ.
    Absent tangents (None) are zero. shift / scale (and tangents): (B, C) or (B, 1, C).
    """
    dtype = compute_dtype(x.dtype)
    xf, weight, weight_t = _as(x, dtype), _cast(weight, dtype), _cast(weight_t, dtype)
    normed, mean, rstd = _statistics(xf, norm, eps)
    affine = normed if weight is None else normed * weight
    one_plus_scale = over_tokens(scale, dtype) + 1
    y = _as(torch.addcmul(over_tokens(shift, dtype), affine, one_plus_scale), x.dtype) if want_y else None
    if not want_y_t:
        return y, None
    # ẏ accumulated as ḣ + n·ṡ + ṅ·(1 + s), one addcmul per term
    y_t = torch.zeros_like(xf) if shift_t is None else over_tokens(shift_t, dtype)
    if scale_t is not None:  # broadcasts a (B, 1, C) ḣ to (B, N, C)
        y_t = torch.addcmul(y_t, affine, over_tokens(scale_t, dtype))
    elif shift_t is not None:
        y_t = y_t.expand_as(xf)
    if weight_t is not None:
        y_t = torch.addcmul(y_t, normed * weight_t, one_plus_scale)
    if x_t is not None:
        normed_t = _normalize_transposed(_as(x_t, dtype), xf, normed, mean, rstd, norm)
        y_t = torch.addcmul(y_t, normed_t if weight is None else normed_t * weight, one_plus_scale)
    return y, _as(y_t, x.dtype)


def modulated_norm_backward(grad, x, shift, scale, weight, norm, eps, needs):
    """(grad_x, grad_shift, grad_scale, grad_weight), None where `needs` is False:
    with ĝ = g·(1 + s)·w, grad_x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ⊙x̂)) (RMS: without mean(ĝ)),
    grad_shift = Σ_tokens g, grad_scale = Σ_tokens g⊙x̂·w, grad_weight = Σ_{samples, tokens} g⊙(1 + s)⊙x̂."""
    dtype = compute_dtype(x.dtype)
    xf, g = _as(x, dtype), _as(grad, dtype)
    normed, mean, rstd = _statistics(xf, norm, eps)
    weight_c = _cast(weight, dtype)
    one_plus_scale = over_tokens(scale, dtype) + 1
    grad_x = grad_shift = grad_scale = grad_weight = None
    if needs[0]:
        grad_normed = g * one_plus_scale
        if weight_c is not None:
            grad_normed = grad_normed * weight_c
        grad_x = _as(_normalize_transposed(grad_normed, xf, normed, mean, rstd, norm), x.dtype)
    if needs[1]:
        grad_shift = _sum_tokens(g, shift)
    if needs[2]:
        grad_scale = _sum_tokens(g * (normed if weight_c is None else normed * weight_c), scale)
    if needs[3]:
        grad_weight = _as((g * one_plus_scale * normed).sum((0, 1)), weight.dtype)
    return grad_x, grad_shift, grad_scale, grad_weight


def gated_residual_closed(x, gate, y, x_t, gate_t, y_t, want_out, want_out_t):
    """(out or None, ȯut or None): out = x + g·y, ȯut = ẋ + ġ·y + g·ẏ (absent tangents zero);
    gate (and its tangent) (B, C) or (B, 1, C)."""
    dtype = compute_dtype(x.dtype)
    gate_c, yf = over_tokens(gate, dtype), _as(y, dtype)
    out = _as(torch.addcmul(_as(x, dtype), gate_c, yf), x.dtype) if want_out else None
    if not want_out_t:
        return out, None
    out_t = torch.zeros_like(yf) if x_t is None else _as(x_t, dtype)
    if gate_t is not None:
        out_t = torch.addcmul(out_t, over_tokens(gate_t, dtype), yf)
    if y_t is not None:
        out_t = torch.addcmul(out_t, gate_c, _as(y_t, dtype))
    return out, _as(out_t, x.dtype)


def gated_residual_backward(grad, gate, y, needs):
    """(grad_x = g, grad_gate = Σ_tokens g⊙y, grad_y = gate·g), None where `needs` is False."""
    dtype = compute_dtype(y.dtype)
    grad_gate = _sum_tokens(_as(grad, dtype) * _as(y, dtype), gate) if needs[1] else None
    grad_y = _as(_as(grad, dtype) * over_tokens(gate, dtype), y.dtype) if needs[2] else None
    return grad if needs[0] else None, grad_gate, grad_y


def activation_derivative(kind, x):
    """(f(x), f'(x)) elementwise for gelu_tanh and silu, in x's dtype."""
    if kind == "silu":
        sig = torch.sigmoid(x)
        return x * sig, sig * (1 + x * (1 - sig))
    inner = _GELU_K * (x + _GELU_C * x.pow(3))
    th = torch.tanh(inner)
    value = 0.5 * x * (1 + th)
    return value, 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_K * (1 + 3 * _GELU_C * x * x)


def activation_closed(kind, x, x_t, want_y, want_y_t):
    """(y or None, ẏ or None); swiglu: ẏ = silu'(a)·ȧ·b + silu(a)·ḃ."""
    dtype = compute_dtype(x.dtype)
    xf = _as(x, dtype)
    if kind == "swiglu":
        a, b = xf.chunk(2, dim=-1)
        value, slope = activation_derivative("silu", a)
        y = _as(value * b, x.dtype) if want_y else None
        if not want_y_t:
            return y, None
        a_t, b_t = _as(x_t, dtype).chunk(2, dim=-1)
        return y, _as(slope * a_t * b + value * b_t, x.dtype)
    # f'(x)·v is what each activation's own backward kernel computes (one ATen call).
    y = _as(_ACTIVATION_ATEN[kind][0](xf), x.dtype) if want_y else None
    return y, (_as(_ACTIVATION_ATEN[kind][1](_as(x_t, dtype), xf), x.dtype) if want_y_t else None)


def activation_backward(kind, grad, x):
    """The input gradient: g·f'(x); swiglu: (g·b·silu'(a), g·silu(a)) concatenated."""
    dtype = compute_dtype(x.dtype)
    xf, g = _as(x, dtype), _as(grad, dtype)
    if kind == "swiglu":
        a, b = xf.chunk(2, dim=-1)
        value, slope = activation_derivative("silu", a)
        return _as(torch.cat((g * b * slope, g * value), dim=-1), x.dtype)
    return _as(_ACTIVATION_ATEN[kind][1](g, xf), x.dtype)


_ACTIVATION_ATEN = {
    "gelu_tanh": (
        lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        lambda v, x: torch.ops.aten.gelu_backward(v, x, approximate="tanh"),
    ),
    "silu": (torch.nn.functional.silu, torch.ops.aten.silu_backward),
}
ACTIVATION_FUNCTIONS = {"gelu_tanh": gelu_tanh, "silu": silu, "swiglu": swiglu}

__all__ = [
    "modulated_norm",
    "gated_residual",
    "gelu_tanh",
    "silu",
    "swiglu",
    "normalize",
    "NORMS",
    "ACTIVATIONS",
    "modulated_norm_closed",
    "modulated_norm_backward",
    "gated_residual_closed",
    "gated_residual_backward",
    "over_tokens",
    "activation_closed",
    "activation_backward",
    "activation_derivative",
    "ACTIVATION_FUNCTIONS",
]
