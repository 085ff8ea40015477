"""Reference attention: explicit softmax attention in plain PyTorch, the specification the
C++/CUDA kernels are tested against. Differentiable by autograd and torch.func.jvp; call it with
float64 tensors for the float64 reference. Materialises the (B, H, Nq, Nk) score matrix.

S = scale·QKᵀ + bias (causal and boolean masks enter as -inf), P = softmax(S), O = PV,
LSE = logsumexp(S). A fully masked row (every score -inf) gives O = 0, LSE = -inf and zero
gradients and tangents.
"""

import math

import torch


def causal_allowed(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """(Nq, Nk) boolean: query i sees key j iff j <= i + (Nk - Nq) (bottom-right aligned)."""
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    return cols <= rows + (num_keys - num_queries)


def additive_bias(attn_bias, dtype) -> torch.Tensor:
    """A boolean mask (True = attend) becomes 0 / -inf in `dtype`; a float bias is returned as is."""
    if attn_bias is None or attn_bias.dtype != torch.bool:
        return attn_bias
    zeros = torch.zeros((), dtype=dtype, device=attn_bias.device)
    return torch.where(attn_bias, zeros, torch.full_like(zeros, -math.inf))


def _scores(q, k, scale, causal, attn_bias):
    groups = q.shape[1] // k.shape[1]
    # GQA: query head h uses kv head h // groups.
    k = k.repeat_interleave(groups, dim=1)
    scores = scale * (q @ k.transpose(-1, -2))
    bias = additive_bias(attn_bias, q.dtype)
    if bias is not None:
        scores = scores + bias
    if causal:
        allowed = causal_allowed(q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores


def attention(q, k, v, *, scale=None, causal=False, attn_bias=None, return_lse=False):
    """Softmax attention, O = softmax(scale·QKᵀ + bias)·V, computed in the dtype of the inputs.

    q (B, H, Nq, Dqk), k (B, Hkv, Nk, Dqk), v (B, Hkv, Nk, Dv) with H % Hkv == 0; attn_bias a
    float tensor or boolean mask (True = attend) broadcastable to (B, H, Nq, Nk); causal is
    bottom-right aligned. Returns O (B, H, Nq, Dv), and LSE (B, H, Nq) if return_lse.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _scores(q, k, scale, causal, attn_bias)
    # The row maximum only keeps exp() in range; the result does not depend on it, so it is
    # detached (its exact derivative contributions cancel).
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    live = row_sum > 0
    safe_sum = torch.where(live, row_sum, torch.ones_like(row_sum))
    groups = q.shape[1] // k.shape[1]
    out = (weights / safe_sum) @ v.repeat_interleave(groups, dim=1)
    if not return_lse:
        return out
    lse = torch.where(live, row_max + torch.log(safe_sum), torch.full_like(row_sum, -math.inf))
    return out, lse.squeeze(-1)


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, causal=False, attn_bias=None, bias_t=None,
                  return_lse=False):
    """(O, Ȯ) or (O, Ȯ, LSE, μ): attention and its tangent along (q_t, k_t, v_t, bias_t), by
    torch.func.jvp of `attention`. A boolean attn_bias has no tangent."""
    float_bias = attn_bias is not None and attn_bias.dtype != torch.bool
    if bias_t is not None and float_bias:
        def fn(q_, k_, v_, b_):
            return attention(q_, k_, v_, scale=scale, causal=causal, attn_bias=b_, return_lse=True)
        # Forward-mode AD needs primal and tangent with one dense layout (no broadcast views).
        shape = torch.broadcast_shapes(attn_bias.shape, bias_t.shape)
        primals = (q, k, v, attn_bias.expand(shape).contiguous())
        tangents = (q_t, k_t, v_t, bias_t.expand(shape).contiguous())
    else:
        def fn(q_, k_, v_):
            return attention(q_, k_, v_, scale=scale, causal=causal, attn_bias=attn_bias, return_lse=True)
        primals, tangents = (q, k, v), (q_t, k_t, v_t)
    (out, lse), (out_t, lse_t) = torch.func.jvp(fn, primals, tangents)
    return (out, out_t, lse, lse_t) if return_lse else (out, out_t)


def merge_attention_partials(outs, lses, out_tangents=None, lse_tangents=None):
    """Merge attention over disjoint key shards: LSE = logsumexp_s LSE_s,
    O = Σ_s exp(LSE_s − LSE)·O_s. Tangents (if given) by torch.func.jvp of that formula.

    outs: sequence of (..., Nq, Dv); lses: sequence of (..., Nq). Returns (O, LSE) or
    (O, Ȯ, LSE, μ). Shards whose rows are fully masked (LSE_s = -inf) contribute nothing.
    """
    def merge(outs_, lses_):
        lse_stack = torch.stack(list(lses_))
        lse = torch.logsumexp(lse_stack, dim=0)
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        weights = torch.exp(lse_stack - safe_lse)
        out = (weights.unsqueeze(-1) * torch.stack(list(outs_))).sum(dim=0)
        return out, lse

    if out_tangents is None:
        return merge(outs, lses)
    (out, lse), (out_t, lse_t) = torch.func.jvp(
        merge, (tuple(outs), tuple(lses)), (tuple(out_tangents), tuple(lse_tangents)))
    return out, out_t, lse, lse_t


__all__ = ["attention", "attention_jvp", "merge_attention_partials", "causal_allowed", "additive_bias"]
