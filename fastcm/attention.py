"""Attention with forward-mode JVP: one flash-style pass returns the output and its tangent.

PyTorch's flash / memory-efficient / cuDNN SDPA backends have no forward-mode derivative, so
torch.func.jvp through a network falls back to the O(N²)-memory MATH backend. fastcm.attention
is a torch.autograd.Function whose jvp runs a fused kernel (the C++/CUDA extension in csrc/ or the
Triton kernels in kernels/attention.py, see _backend): when the inputs carry forward-mode tangents
(torch.func.jvp, forward_ad dual tensors) the primal and the tangent come out of the same kernel call.

Formulas (docs/DESIGN.md): S = scale·QKᵀ + bias (causal and boolean masks enter as −inf),
P = softmax(S), O = PV, LSE = logsumexp(S); Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ) + ḃias,
μ = rowsum(P⊙Ṡ) (the LSE tangent), Ȯ = (P⊙Ṡ)V + PV̇ − μ⊙O.
"""

import functools
import math
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from . import _checks
from ._backend import requested_backend, select_backend, triton_runs_on
from ._extension import ExtensionUnavailable, extension_ops
from ._library import kernel_ops
from .reference import attention as reference

_OP = "attention"
_CUDA_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Where the extension's CUDA kernels were built and tuned (csrc/cuda): sm_80 and sm_90, D_qk <= 256.
_CUDA_KERNEL_CAPABILITIES = ((8, 0), (9, 0))
_CUDA_MAX_HEAD_DIM = 256
_TRITON_MAX_HEAD_DIM = 256  # fastcm.kernels.attention.MAX_HEAD_DIM (not imported: triton may be missing)
# Rows of the (B, H, rows, Nk) probability block recomputed at a time for the bias gradient.
_SCORE_CHUNK_ELEMENTS = 1 << 24
# The same for the backward through the tangent, which holds about six such blocks at a time.
_TANGENT_CHUNK_ELEMENTS = 1 << 22


def _fake_forward(q, k, v, bias, scale, causal):
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    return out, q.new_empty(q.shape[:-1], dtype=_checks.compute_dtype(q))


def _fake_forward_jvp(q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal):
    out, lse = _fake_forward(q, k, v, bias, scale, causal)
    return out, torch.empty_like(out), lse, torch.empty_like(lse)


def _fake_backward(grad_out, q, k, v, out, lse, bias, scale, causal, grad_lse=None):
    # Contiguous, as the kernels return them (empty_like would copy a transposed input's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_ops_loaded = False


# Registration cannot be traced: a torch.compile whose first fastcm call is compiled breaks the
# graph once here; later traces see _ops_loaded = True and skip it.
@torch.compiler.disable
def _load_ops():
    """Load (or JIT-build) the extension and register the ops' fake (meta) implementations,
    so torch.compile traces them without running them."""
    global _ops_loaded
    extension_ops()
    torch.library.register_fake("fastcm::attention_forward")(_fake_forward)
    torch.library.register_fake("fastcm::attention_forward_jvp")(_fake_forward_jvp)
    torch.library.register_fake("fastcm::attention_backward")(_fake_backward)
    _ops_loaded = True


def _ops():
    """torch.ops.fastcm, loaded."""
    if not _ops_loaded:
        _load_ops()
    return torch.ops.fastcm


_triton = kernel_ops(
    "attention",
    {
        "triton_forward": ("attention_forward", _fake_forward),
        "triton_forward_jvp": ("attention_forward_jvp", _fake_forward_jvp),
        "triton_backward": ("attention_backward", _fake_backward),
    },
)


class _TritonOps:
    """The Triton kernels (custom ops fastcm::attention_triton_*) under the extension's op names."""

    def __getattr__(self, name):
        return getattr(_triton, name.replace("attention_", "triton_", 1))


_TRITON_OPS = _TritonOps()


def _ops_for(q, v):
    """The ops that run a call on q, v: the Triton kernels where _backend picks them, the extension's
    torch.ops.fastcm otherwise."""
    if _backend(q.device, q.dtype, q.shape[-1], v.shape[-1]) == "triton":
        return _TRITON_OPS
    return _ops()


def _score_gradient(grad_out, q, k, v, out, lse, bias, scale, causal, grad_lse):
    """dL/dS = P⊙(dO·Vᵀ − rowsum(dO⊙O) + dLSE) for a bias that requires grad: (B, H, Nq, Nk).

    P is recomputed from the saved LSE in chunks of query rows, so the extra memory beyond the
    (B, H, Nq, Nk) result is one chunk of ~2^24 elements."""
    acc = _checks.compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    k_all = k.to(acc).repeat_interleave(groups, dim=1)
    v_all = v.to(acc).repeat_interleave(groups, dim=1)
    grad_out, q = grad_out.to(acc), q.to(acc)
    delta = (grad_out * out.to(acc)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    # A fully masked row has LSE = -inf and zero probabilities: subtracting +inf gives exp(.) = 0.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    num_queries, num_keys = q.shape[2], k.shape[2]
    rows = max(1, _SCORE_CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * num_keys))
    grad_scores = torch.empty(q.shape[:3] + (num_keys,), dtype=bias.dtype, device=q.device)
    allowed = reference.causal_allowed(num_queries, num_keys, q.device) if causal else None
    for start in range(0, num_queries, rows):
        stop = min(num_queries, start + rows)
        scores = scale * (q[:, :, start:stop] @ k_all.transpose(-1, -2)) + bias[:, :, start:stop].to(acc)
        if causal:
            scores = scores.masked_fill(~allowed[start:stop], -math.inf)
        prob = torch.exp(scores - lse[:, :, start:stop, None])
        grad_prob = grad_out[:, :, start:stop] @ v_all.transpose(-1, -2)
        grad_scores[:, :, start:stop] = prob * (grad_prob - delta[:, :, start:stop, None])
    return grad_scores


def _tangent_backward(grad_out_t, grad_lse_t, saved, scale, causal, needs):
    """Gradients of a loss on the tangents (Ȯ, μ) w.r.t. (q, k, v, bias, q_t, k_t, v_t, bias_t)
    (formulas in _AttentionTangent), entries not in `needs` may be None.

    Ȯ and μ are linear in the tangents, so their gradients alone are the attention backward with
    output gradient gȮ and LSE gradient gμ: the fused kernel. The primals' gradients recompute P
    and Ṡ from the saved LSE and μ in chunks of query rows (O(N) memory beyond one chunk and a
    bias gradient), in float32 (float64 for float64), as plain ATen ops on any device."""
    q, k, v, bias, q_t, k_t, v_t, bias_t, out, lse, out_t, lse_t = saved
    grad_out_t = torch.zeros_like(out_t) if grad_out_t is None else grad_out_t
    if not any(needs[:4]):
        grads = _backward_of(grad_out_t, grad_lse_t, q, k, v, bias, out, lse, scale, causal, needs[4:])
        return (None,) * 4 + grads
    acc = _checks.compute_dtype(q)
    batch, heads, num_queries, _ = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]

    def grouped(t):
        """(B, H, ...) as (B, Hkv, G, ...) in acc: query head h reads kv head h // G."""
        return None if t is None else t.to(acc).unflatten(1, (kv_heads, heads // kv_heads))

    def per_kv_head(t):
        return None if t is None else t.to(acc).unsqueeze(2)

    k_, v_, k_t_, v_t_ = (per_kv_head(t) for t in (k, v, k_t, v_t))
    grad_out_t, out = grouped(grad_out_t), grouped(out)
    delta_t = (grad_out_t * out).sum(-1)
    if grad_lse_t is not None:
        delta_t = delta_t - grouped(grad_lse_t)
    rho = (grad_out_t * grouped(out_t)).sum(-1)
    mu = grouped(lse_t)
    # A fully masked row has LSE = -inf and zero probabilities: subtracting +inf gives exp(.) = 0.
    lse = grouped(torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse))
    allowed = reference.causal_allowed(num_queries, num_keys, q.device) if causal else None
    query_grad = grad_out_t.shape[:-1] + q.shape[-1:]
    dq, dq_t = (torch.empty(query_grad, dtype=acc, device=q.device) if need else None for need in (needs[0], needs[4]))
    dk, dk_t = (torch.zeros_like(k_.squeeze(2)) if need else None for need in (needs[1], needs[5]))
    dv, dv_t = (torch.zeros_like(v_.squeeze(2)) if need else None for need in (needs[2], needs[6]))
    score_shape = q.shape[:3] + (num_keys,)
    dbias = torch.empty(score_shape, dtype=bias.dtype, device=q.device) if needs[3] else None
    dbias_t = torch.empty(score_shape, dtype=bias_t.dtype, device=q.device) if needs[7] else None
    rows = max(1, _TANGENT_CHUNK_ELEMENTS // max(1, batch * heads * num_keys))
    for start in range(0, num_queries, rows):
        chunk = slice(start, min(num_queries, start + rows))
        q_c, grad_c = grouped(q[:, :, chunk]), grad_out_t[..., chunk, :]
        q_t_c = None if q_t is None else grouped(q_t[:, :, chunk])
        prob = scale * (q_c @ k_.transpose(-1, -2))
        if bias is not None:
            prob += grouped(bias[:, :, chunk])
        if causal:
            prob.masked_fill_(~allowed[chunk], -math.inf)
        prob = prob.sub_(lse[..., chunk, None]).exp_()
        # Ṡ − μ: masked entries keep a finite value there, and P = 0 zeroes them below.
        centred_t = -mu[..., chunk, None].expand_as(prob)
        if q_t is not None:
            centred_t = centred_t + scale * (q_t_c @ k_.transpose(-1, -2))
        if k_t is not None:
            centred_t = centred_t + scale * (q_c @ k_t_.transpose(-1, -2))
        if bias_t is not None:
            centred_t = centred_t + grouped(bias_t[:, :, chunk])
        grad_scores_t = (grad_c @ v_.transpose(-1, -2)).sub_(delta_t[..., chunk, None]).mul_(prob)
        grad_prob = (
            -rho[..., chunk, None] if v_t is None else (grad_c @ v_t_.transpose(-1, -2)).sub_(rho[..., chunk, None])
        )
        grad_scores = (grad_scores_t * centred_t).addcmul_(prob, grad_prob)
        if dq is not None:
            dq[..., chunk, :] = grad_scores @ k_ if k_t is None else grad_scores @ k_ + grad_scores_t @ k_t_
        if dk is not None:
            dk += (grad_scores.transpose(-1, -2) @ q_c).sum(2)
            if q_t is not None:
                dk += (grad_scores_t.transpose(-1, -2) @ q_t_c).sum(2)
        if dv is not None:
            dv += ((prob * centred_t).transpose(-1, -2) @ grad_c).sum(2)
        if dq_t is not None:
            dq_t[..., chunk, :] = grad_scores_t @ k_
        if dk_t is not None:
            dk_t += (grad_scores_t.transpose(-1, -2) @ q_c).sum(2)
        if dv_t is not None:
            dv_t += (prob.transpose(-1, -2) @ grad_c).sum(2)
        if dbias is not None:
            dbias[:, :, chunk] = grad_scores.flatten(1, 2)
        if dbias_t is not None:
            dbias_t[:, :, chunk] = grad_scores_t.flatten(1, 2)

    def cast(grad, like, factor=1.0):
        """The gradient in like's layout and dtype; factor applies the scale of the Q, K products once."""
        if grad is None:
            return None
        grad = grad.flatten(1, 2) if grad.dim() == 5 else grad
        return (grad * factor).to(like.dtype)

    return (
        cast(dq, q, scale),
        cast(dk, k, scale),
        cast(dv, v),
        dbias,
        cast(dq_t, q, scale),
        cast(dk_t, k, scale),
        cast(dv_t, v),
        dbias_t,
    )


def _backward_of(grad_out, grad_lse, q, k, v, bias, out, lse, scale, causal, needs):
    """(dq, dk, dv, dbias) of the attention backward, those in `needs` (the rest None)."""
    grad_q = grad_k = grad_v = grad_bias = None
    if any(needs[:3]):
        # An LSE gradient g enters the kernels' row term: δ = rowsum(dO⊙O) − g.
        grad_q, grad_k, grad_v = _ops_for(q, v).attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            bias,
            scale,
            causal,
            None if grad_lse is None else grad_lse.to(lse.dtype).contiguous(),
        )
    if needs[3]:
        grad_bias = _score_gradient(grad_out, q, k, v, out, lse, bias, scale, causal, grad_lse)
    return grad_q, grad_k, grad_v, grad_bias


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return _backward_of(grad_out, grad_lse, q, k, v, bias, out, lse, *ctx.options, ctx.needs_input_grad[:4])


class _AttentionPrimal(torch.autograd.Function):
    """(q, k, v, bias, scale, causal) -> (out, lse). Inputs: q, k, v last-dim contiguous,
    bias None or (B, H, Nq, Nk) in q's dtype (broadcast views allowed). No jvp: this is the
    form torch.compile traces (Dynamo graph-breaks on Functions that define one)."""

    @staticmethod
    def forward(q, k, v, bias, scale, causal):
        return _ops_for(q, v).attention_forward(q, k, v, bias, scale, causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, scale, causal = inputs
        out, lse = output
        ctx.options = (scale, causal)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.save_for_forward(q, k, v, bias)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse) + (None, None)


class _Attention(_AttentionPrimal):
    """_AttentionPrimal with a jvp, for eager forward-mode AD."""

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, bias_t, *_):
        # Reached only when the tangents were not visible to attention() up front (so the
        # fused _AttentionWithTangent could not be used): one more fused pass gives them.
        q, k, v, bias = ctx.saved_tensors
        tangents = (q_t, k_t, v_t, bias_t)
        with torch.no_grad():  # the graph of the tangents, if any, is _AttentionTangent's
            out, out_t, lse, lse_t = _ops_for(q, v).attention_forward_jvp(
                q, k, v, *(None if t is None else t.contiguous() for t in (q_t, k_t, v_t)), bias, bias_t, *ctx.options
            )
        return _differentiable_tangents(out_t, lse_t, (q, k, v, bias), tangents, out, lse, ctx.options)


class _AttentionWithTangent(torch.autograd.Function):
    """(q, k, v, bias, q_t, k_t, v_t, bias_t, scale, causal) -> (out, lse, out_t, lse_t) in one
    kernel call; its jvp hands out the tangents computed there. q_t, k_t, v_t, bias_t are the
    tangents that attention() read off the dual inputs."""

    @staticmethod
    def forward(q, k, v, bias, q_t, k_t, v_t, bias_t, scale, causal):
        out, out_t, lse, lse_t = _ops_for(q, v).attention_forward_jvp(
            q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal
        )
        return out, lse, out_t, lse_t

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, _, _, _, _, scale, causal = inputs
        out, lse, out_t, lse_t = output
        ctx.options = (scale, causal)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out_t, lse_t)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.save_for_forward(out_t, lse_t, q, k, v, bias, out, lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_out_t, _grad_lse_t):
        return _backward(ctx, grad_out, grad_lse) + (None,) * 6

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, bias_t, *_tangents_of_tangents):
        out_t, lse_t, q, k, v, bias, out, lse = ctx.saved_tensors
        out_t, lse_t = _differentiable_tangents(
            out_t, lse_t, (q, k, v, bias), (q_t, k_t, v_t, bias_t), out, lse, ctx.options
        )
        return out_t, lse_t, None, None


def _differentiable_tangents(out_t, lse_t, primals, tangents, out, lse, options):
    """(Ȯ, μ), linked by _AttentionTangent to the primals and tangents whose graph they come
    from when grad mode is on (backward through the tangent); as they are otherwise."""
    # Under torch.func.jvp the primals' requires_grad reads False even when an outer graph
    # (torch.func.grad, torch.autograd.grad) tracks them, so grad mode alone decides.
    if not torch.is_grad_enabled():
        return out_t, lse_t
    return _AttentionTangent.apply(out_t, lse_t, *primals, *tangents, out.detach(), lse.detach(), *options)


class _AttentionTangent(torch.autograd.Function):
    """(out_t, lse_t, q, k, v, bias, q_t, k_t, v_t, bias_t, out, lse, scale, causal) -> views of
    (out_t, lse_t), the fused tangents Ȯ and μ, whose backward differentiates them w.r.t.
    q, k, v, bias and the tangents (None tangents are zero).

    With S = scale·QKᵀ + b, P = softmax(S), Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ) + ḃ, Ṗ = P⊙(Ṡ − μ), and
    upstream gradients gȮ, gμ:
        δ̇ = rowsum(gȮ⊙O) − gμ,   gṠ = P⊙(gȮVᵀ − δ̇),   ρ = rowsum(gȮ⊙Ȯ),
        gS = P⊙(gȮV̇ᵀ − ρ) + gṠ⊙(Ṡ − μ),
        dQ = scale·(gS·K + gṠ·K̇), dK = scale·(gSᵀ·Q + gṠᵀ·Q̇), dV = Ṗᵀ·gȮ, db = gS,
        dQ̇ = scale·gṠ·K, dK̇ = scale·gṠᵀ·Q, dV̇ = Pᵀ·gȮ, dḃ = gṠ
    (fastcm.reference.attention.attention_jvp_backward derives them)."""

    @staticmethod
    def forward(out_t, lse_t, q, k, v, bias, q_t, k_t, v_t, bias_t, out, lse, scale, causal):
        return out_t.view_as(out_t), lse_t.view_as(lse_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        out_t, lse_t, *tensors, scale, causal = inputs
        ctx.options = (scale, causal)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, out_t, lse_t)

    @staticmethod
    def backward(ctx, grad_out_t, grad_lse_t):
        needs = ctx.needs_input_grad[2:10]
        if (grad_out_t is None and grad_lse_t is None) or not any(needs):
            return (None,) * 14
        grads = _tangent_backward(grad_out_t, grad_lse_t, ctx.saved_tensors, *ctx.options, needs)
        return (None, None) + tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 4


def _tangent(x):
    """The forward-mode tangent attached to x at the current level (None if none)."""
    return None if x is None else fwAD.unpack_dual(x).tangent


def _compiled_forward_ad_guard():
    """torch.compile around torch.func.jvp may drop a custom Function's jvp silently (pytorch
    issue 192985). Inside a compiled region the tangents are invisible here, so refuse rather
    than return a tangent that may be wrong."""
    if torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(
            "fastcm.attention: torch.func transforms inside torch.compile are not supported "
            "(a compiled graph can drop the custom jvp and return a wrong tangent, pytorch "
            "issue 192985). Compile the model without the jvp, wrap the jvp call in "
            "torch.compiler.disable, or use fastcm.attention_jvp."
        )


def _check(q, k, v, attn_bias, scale, causal):
    for name, t, layout in (("q", q, "(B, H, Nq, Dqk)"), ("k", k, "(B, Hkv, Nk, Dqk)"), ("v", v, "(B, Hkv, Nk, Dv)")):
        _checks.check_tensor(_OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"fastcm.{_OP}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        _checks.check_same_dtype(_OP, name, t, "q", q)
        _checks.check_same_device(_OP, name, t, "q", q)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"fastcm.{_OP}: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"fastcm.{_OP}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same heads and keys (B, Hkv, Nk, .)"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"fastcm.{_OP}: q has {q.shape[1]} heads, not a multiple of the {k.shape[1]} "
            f"heads of k and v (grouped-query attention needs H % Hkv == 0)"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"fastcm.{_OP}: k has head dim {k.shape[3]} but q has {q.shape[3]}; they must match")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise TypeError(f"fastcm.{_OP}: scale must be a finite float or None, got {scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"fastcm.{_OP}: causal must be a bool, got {type(causal).__name__}")
    if attn_bias is not None:
        _checks.check_tensor(_OP, "attn_bias", attn_bias, dtypes=_checks.FLOAT_DTYPES + (torch.bool,))
        _checks.check_same_device(_OP, "attn_bias", attn_bias, "q", q)
        _expanded_shape(attn_bias, q, k, "attn_bias")


def _expanded_shape(t, q, k, name):
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        if torch.broadcast_shapes(t.shape, target) == torch.Size(target):
            return target
    except RuntimeError:
        pass
    raise ValueError(f"fastcm.{_OP}: {name} has shape {tuple(t.shape)}, not broadcastable to (B, H, Nq, Nk) = {target}")


def _kernel_bias(attn_bias, q, k):
    """attn_bias as the kernels take it, expanded (a view) to (B, H, Nq, Nk): in q's dtype, except
    a float32 bias of CUDA inputs, which the CUDA kernels read unrounded (bf16 would round an
    ALiBi-sized bias of 300 to steps of 2)."""
    if attn_bias is None:
        return None
    if not (q.is_cuda and attn_bias.dtype == torch.float32):
        attn_bias = reference.additive_bias(attn_bias, q.dtype).to(q.dtype)
    return attn_bias.expand(_expanded_shape(attn_bias, q, k, "attn_bias"))


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# _backend runs inside torch.compile traces of CUDA calls: Dynamo ignores the lru_cache and traces
# these bodies, and the extension's has_cuda op returns a bool, which it cannot trace (fullgraph
# raises). Both are fixed for the process, so Dynamo calls them at trace time and keeps the result.
@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result
def _extension_has_cuda() -> bool:
    try:
        return bool(extension_ops().has_cuda())
    except ExtensionUnavailable:
        return False


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result
def _cuda_capability(device_index) -> tuple:
    return torch.cuda.get_device_capability(device_index)


def _backend(device, dtype, dim_qk, dim_v) -> str:
    """Which kernels run a call on `device` in `dtype` with head dims `dim_qk` (q, k) and `dim_v`:
    "cuda" (the extension: its C++ kernel for CPU tensors, its CUDA kernels), "triton" or "reference".

    FASTCM_BACKEND=auto: CPU tensors run the C++ kernel; CUDA tensors run the extension's CUDA kernels
    where they serve the call (built with CUDA, an sm_80 / sm_90 device, bfloat16 / float16,
    D_qk <= 256), the Triton kernels otherwise (another architecture, no CUDA build, float32 /
    float64; head dims up to 256), and the O(N²)-memory reference, with a warning, where neither can
    run. An explicit FASTCM_BACKEND is obeyed or raises (select_backend)."""
    kernels = (
        "the CUDA kernels take bfloat16 or float16 (cast q, k, v; fastcm.nn.Attention does it with "
        "cuda_dtype=torch.bfloat16)"
    )
    if requested_backend() != "auto" or device.type != "cuda":
        choice = select_backend(_OP, device, implemented=("triton", "cuda"))
        if choice == "cuda" and device.type == "cuda" and dtype not in _CUDA_KERNEL_DTYPES:
            raise RuntimeError(f"fastcm.{_OP}: FASTCM_BACKEND='cuda' cannot run {dtype} CUDA tensors: {kernels}")
        return choice
    extension_serves = dtype in _CUDA_KERNEL_DTYPES and dim_qk <= _CUDA_MAX_HEAD_DIM and _extension_has_cuda()
    if extension_serves and _cuda_capability(device.index) in _CUDA_KERNEL_CAPABILITIES:
        return "cuda"
    triton_serves = max(dim_qk, dim_v) <= _TRITON_MAX_HEAD_DIM
    if triton_serves and triton_runs_on(device):
        return "triton"
    if extension_serves:
        return "cuda"
    triton = (
        "triton is not installed"
        if triton_serves
        else f"the Triton kernels take head dims up to {_TRITON_MAX_HEAD_DIM}, not {dim_qk} and {dim_v}"
    )
    warnings.warn(
        f"fastcm.{_OP}: {dtype} CUDA inputs run the PyTorch reference (O(N²) memory): {triton}, and "
        f"{kernels} with D_qk <= {_CUDA_MAX_HEAD_DIM}",
        stacklevel=3,
    )
    return "reference"


def attention(q, k, v, *, scale=None, causal=False, attn_bias=None, return_lse=False):
    """Scaled dot-product attention with a fused forward-mode derivative.

    O = softmax(scale·QKᵀ + bias)·V, LSE = logsumexp(scale·QKᵀ + bias) over keys.

    Args:
        q: (B, H, Nq, Dqk); k: (B, Hkv, Nk, Dqk); v: (B, Hkv, Nk, Dv), the layout of
            F.scaled_dot_product_attention. Nq ≠ Nk (cross-attention) and Dqk ≠ Dv allowed.
            H % Hkv == 0 (GQA/MQA): query head h uses kv head h // (H // Hkv).
            One dtype for all: float32, float64, bfloat16, float16; one device. The extension's
            CUDA kernels take bfloat16 and float16; float32 / float64 CUDA inputs run the Triton
            kernels (without triton: the O(N²)-memory reference, with a warning).
        scale: defaults to Dqk ** -0.5.
        causal: query i sees key j iff j <= i + (Nk − Nq) (bottom-right aligned, as
            flash-attention; equals the usual lower triangle when Nq == Nk).
        attn_bias: additive float bias, or boolean mask (True = attend), broadcastable to
            (B, H, Nq, Nk). It is cast to q's dtype (cheap: before broadcasting), except that
            the CUDA kernels read a float32 bias as it is.
        return_lse: also return LSE (B, H, Nq) in float32 (float64 for float64 inputs).
    Returns: O (B, H, Nq, Dv) in q's dtype [, LSE]. A fully masked row gives O = 0, LSE = −inf,
    zero tangents and zero gradients.

    Gradients flow to q, k, v and a float attn_bias (the bias gradient materialises the
    (B, H, Nq, Nk) score gradient, O(B·H·Nq·Nk) memory, recomputed in row chunks). Forward-mode
    tangents of q, k, v and a float attn_bias (torch.func.jvp, forward_ad dual tensors) are
    computed in the same kernel call as O: Ȯ = (P⊙Ṡ)V + PV̇ − μ⊙O, μ = rowsum(P⊙Ṡ) is LSE's
    tangent. An input without a tangent (text K/V of cross-attention, register tokens) costs no
    zeros: the CPU kernel skips its share (the CUDA kernels read zeros in its place). With grad
    enabled the tangents are differentiable (second order: losses on the tangent, Hessian-vector
    products): their gradients w.r.t. q, k, v, the bias and the tangents recompute P and Ṗ from
    the saved LSE and μ in query-row chunks (formulas in
    fastcm.reference.attention.attention_jvp_backward; O(N) memory beyond a chunk, except a bias
    gradient). The sCM pattern (the jvp under torch.no_grad(), a separate differentiated forward)
    and MeanFlow's stop-gradient of the tangent need none of it.
    torch.compile around torch.func.jvp raises (see fastcm.attention_jvp for compiled code).
    Non-last-dim-contiguous inputs are copied.
    """
    _check(q, k, v, attn_bias, scale, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _backend(q.device, q.dtype, q.shape[-1], v.shape[-1]) == "reference":
        return reference.attention(q, k, v, scale=scale, causal=causal, attn_bias=attn_bias, return_lse=return_lse)
    _compiled_forward_ad_guard()
    bias = _kernel_bias(attn_bias, q, k)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    tangents = [_tangent(t) for t in (q, k, v)]
    bias_t = _tangent(bias) if bias is not None and bias.is_floating_point() else None
    if all(t is None for t in tangents) and bias_t is None:
        function = _AttentionPrimal if torch.compiler.is_compiling() else _Attention
        out, lse = function.apply(q, k, v, bias, scale, causal)
    else:
        # An input without a tangent (conditioning tokens) passes None: the kernel skips it.
        q_t, k_t, v_t = (None if t is None else _last_dim_contiguous(t) for t in tangents)
        out, lse, _, _ = _AttentionWithTangent.apply(q, k, v, bias, q_t, k_t, v_t, bias_t, scale, causal)
    return (out, lse) if return_lse else out


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, causal=False, attn_bias=None, bias_t=None, return_lse=False):
    """Attention and its tangent in one kernel call, for code that propagates tangents by hand.

    Same arguments as fastcm.attention, plus the tangents q_t, k_t, v_t (shapes and dtype of
    q, k, v; None means zero, e.g. k_t = v_t = None for conditioning tokens in cross-attention:
    the CPU kernel then skips their products instead of reading zeros) and bias_t (a float
    tangent of a float attn_bias, broadcastable to (B, H, Nq, Nk); None means zero). Returns
    (O, Ȯ) or (O, Ȯ, LSE, μ): Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ) + ḃias, μ = rowsum(P⊙Ṡ),
    Ȯ = (P⊙Ṡ)V + PV̇ − μ⊙O. Ȯ in q's dtype, μ like LSE. With grad enabled and an input that
    requires grad, O and LSE are differentiable as in fastcm.attention and Ȯ, μ w.r.t. the
    primals and the tangents (fastcm.reference.attention.attention_jvp_backward); otherwise the
    outputs carry no graph and it works under torch.compile (one opaque node).
    """
    _check(q, k, v, attn_bias, scale, causal)
    for name, t, p in (("q_t", q_t, q), ("k_t", k_t, k), ("v_t", v_t, v)):
        if t is None:
            continue
        _checks.check_tensor("attention_jvp", name, t)
        _checks.check_same_shape("attention_jvp", name, t, name[0], p)
        _checks.check_same_dtype("attention_jvp", name, t, "q", q)
        _checks.check_same_device("attention_jvp", name, t, "q", q)
    if bias_t is not None:
        if attn_bias is None or attn_bias.dtype == torch.bool:
            raise ValueError("fastcm.attention_jvp: bias_t needs a float attn_bias")
        _checks.check_tensor("attention_jvp", "bias_t", bias_t)
        _checks.check_same_device("attention_jvp", "bias_t", bias_t, "q", q)
        _expanded_shape(bias_t, q, k, "bias_t")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _backend(q.device, q.dtype, q.shape[-1], v.shape[-1]) == "reference":
        return reference.attention_jvp(
            q,
            k,
            v,
            q_t,
            k_t,
            v_t,
            scale=scale,
            causal=causal,
            attn_bias=attn_bias,
            bias_t=bias_t,
            return_lse=return_lse,
        )
    bias = _kernel_bias(attn_bias, q, k)
    kernel_bias_t = None if bias_t is None else bias_t.to(bias.dtype).expand(bias.shape)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tangents = tuple(None if t is None else _last_dim_contiguous(t) for t in (q_t, k_t, v_t))
    inputs = (q, k, v, bias) + tangents + (kernel_bias_t,)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        out, lse, out_t, lse_t = _AttentionWithTangent.apply(q, k, v, bias, *tangents, kernel_bias_t, scale, causal)
        out_t, lse_t = _differentiable_tangents(
            out_t, lse_t, (q, k, v, bias), tangents + (kernel_bias_t,), out, lse, (scale, causal)
        )
    else:
        with torch.no_grad():
            out, out_t, lse, lse_t = _ops_for(q, v).attention_forward_jvp(
                q, k, v, *tangents, bias, kernel_bias_t, scale, causal
            )
    return (out, out_t, lse, lse_t) if return_lse else (out, out_t)


def merge_attention_partials(outs, lses, out_tangents=None, lse_tangents=None):
    """Exact merge of attention computed over disjoint key shards (split-KV, ring attention).

    LSE = logsumexp_s LSE_s, w_s = exp(LSE_s − LSE), O = Σ w_s O_s; with tangents
    μ = Σ w_s μ_s, Ȯ = Σ w_s (Ȯ_s + (μ_s − μ)·O_s).

    outs / out_tangents: sequences of (..., Nq, Dv); lses / lse_tangents: sequences of (..., Nq)
    (float32 or float64). Shards with LSE_s = −inf (fully masked rows) weigh 0; a row masked in
    every shard gives O = 0, LSE = −inf, zero tangents. Returns (O, LSE) or (O, Ȯ, LSE, μ), O and
    Ȯ in the dtype of outs[0], computed in the dtype of the LSEs. Differentiable by autograd.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"fastcm.merge_attention_partials: need one LSE per output and at least one "
            f"shard, got {len(outs)} outputs and {len(lses)} LSEs"
        )
    if (out_tangents is None) != (lse_tangents is None):
        raise ValueError("fastcm.merge_attention_partials: give both out_tangents and lse_tangents, or neither")
    if out_tangents is not None and not (len(out_tangents) == len(lse_tangents) == len(outs)):
        raise ValueError(
            f"fastcm.merge_attention_partials: {len(outs)} shards but {len(out_tangents)} "
            f"out_tangents and {len(lse_tangents)} lse_tangents"
        )
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != lse.shape:
            raise ValueError(
                f"fastcm.merge_attention_partials: outs[{i}] has shape {tuple(o.shape)} but "
                f"lses[{i}] has shape {tuple(lse.shape)}; expected (..., Nq, Dv) and (..., Nq)"
            )
    acc = lses[0].dtype
    lse_stack = torch.stack(list(lses))
    lse = torch.logsumexp(lse_stack, dim=0)
    live = torch.isfinite(lse)
    weights = torch.exp(lse_stack - torch.where(live, lse, torch.zeros_like(lse))).unsqueeze(-1)
    out_stack = torch.stack([o.to(acc) for o in outs])
    out = (weights * out_stack).sum(0)
    if out_tangents is None:
        return out.to(outs[0].dtype), lse
    lse_t_stack = torch.stack([t.to(acc) for t in lse_tangents]).unsqueeze(-1)
    lse_t = (weights * lse_t_stack).sum(0)
    out_t_stack = torch.stack([t.to(acc) for t in out_tangents])
    out_t = (weights * (out_t_stack + (lse_t_stack - lse_t) * out_stack)).sum(0)
    return out.to(outs[0].dtype), out_t.to(outs[0].dtype), lse, lse_t.squeeze(-1)


__all__ = ["attention", "attention_jvp", "merge_attention_partials"]
