"""Reference position and time embeddings of a DiT: rotary position embedding (RoPE) with 1-D,
2-D or 3-D position tables, and the sinusoidal timestep embedding. Plain PyTorch, the
specification the Triton kernels are tested against; below it the closed forms of the
tangents and gradients (ATen), which fastcm.embeddings runs on CPU tensors under
FASTCM_BACKEND=auto."""

import math

import torch


def grid_positions(*sizes: int, device=None) -> torch.Tensor:
    """Integer coordinates of a row-major grid as float32 (prod(sizes), len(sizes)): the token
    positions of a patchified image (h, w) or video (t, h, w)."""
    axes = [torch.arange(size, dtype=torch.float32, device=device) for size in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def rope_tables(positions: torch.Tensor, head_dim: int, *, base: float = 10000.0):
    """(cos, sin), each (N, head_dim/2) float32 (float64 for float64 positions), for positions (N, A).

    The head_dim/2 rotation frequencies are split evenly among the A axes: pair a·F + j
    (F = head_dim/(2A), j < F) rotates by positions[:, a]·base^(−j/F)."""
    if positions.dim() == 1:
        positions = positions[:, None]
    axes = positions.shape[1]
    if head_dim % (2 * axes):
        raise ValueError(f"fastcm.rope_tables: head_dim={head_dim} must be divisible by 2·axes = {2 * axes}")
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    per_axis = head_dim // (2 * axes)
    freqs = base ** (-torch.arange(per_axis, dtype=dtype, device=positions.device) / per_axis)
    angles = (positions.to(dtype)[:, :, None] * freqs).reshape(positions.shape[0], -1)
    return torch.cos(angles), torch.sin(angles)


def rope(q, k, cos, sin):
    """Rotate the halves (x₁, x₂) of the last dim of q and k: (x₁·cos − x₂·sin, x₂·cos + x₁·sin).
    q (B, H, N, d), k (B, Hk, N, d), cos / sin (N, d/2). Computes in q's dtype."""
    return _rotate(q, cos.to(q.dtype), sin.to(q.dtype)), _rotate(k, cos.to(k.dtype), sin.to(k.dtype))


def _rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def timestep_embedding(t, dim: int, *, max_period: float = 10000.0):
    """DiT's sinusoidal embedding: [cos(t·f), sin(t·f)] with f_j = max_period^(−j/half), j < half =
    dim // 2, a zero column appended for odd dim. t (B,) -> (B, dim) in t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs
    embedding = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        embedding = torch.cat((embedding, torch.zeros_like(embedding[:, :1])), dim=-1)
    return embedding


# ---- closed forms (ATen) -----------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_closed(x, x_t, cos, sin, inverse, want_y, want_y_t):
    """(rotated x or None, rotated x_t or None); inverse rotates by −angle (the transpose:
    the gradient). Computed in float32 (float64), returned in x's dtype."""
    dtype = compute_dtype(x.dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if inverse:
        sin = -sin
    y = _rotate(x.to(dtype), cos, sin).to(x.dtype) if want_y else None
    return y, (_rotate(x_t.to(dtype), cos, sin).to(x.dtype) if want_y_t else None)


def _timestep_terms(t, dim, max_period):
    dtype = compute_dtype(t.dtype)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=t.device) * (-math.log(max_period) / half))
    args = t.to(dtype)[:, None] * freqs
    return torch.cos(args), torch.sin(args), freqs


def timestep_embedding_closed(t, t_t, dim, max_period, want_y, want_y_t):
    """(embedding or None, tangent or None), float32 (float64 for float64 t):
    ė = ṫ·[−f·sin(t·f), f·cos(t·f)] (0 in the padding column)."""
    cos, sin, freqs = _timestep_terms(t, dim, max_period)
    pad = (0, dim % 2)
    y = torch.nn.functional.pad(torch.cat((cos, sin), dim=-1), pad) if want_y else None
    if not want_y_t:
        return y, None
    slope = torch.cat((-freqs * sin, freqs * cos), dim=-1)
    return y, torch.nn.functional.pad(slope * t_t.to(slope.dtype)[:, None], pad)


def timestep_embedding_backward(grad, t, dim, max_period):
    """grad_t = Σ_j g_j·∂e_j/∂t, in t's dtype."""
    cos, sin, freqs = _timestep_terms(t, dim, max_period)
    half = dim // 2
    g = grad.to(cos.dtype)
    return ((g[:, half : 2 * half] * cos - g[:, :half] * sin) * freqs).sum(-1).to(t.dtype)


__all__ = [
    "grid_positions",
    "rope_tables",
    "rope",
    "timestep_embedding",
    "rope_closed",
    "timestep_embedding_closed",
    "timestep_embedding_backward",
]
