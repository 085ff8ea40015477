"""The CUDA attention kernels' arithmetic at the matrix level, in float32 on CPU: which values they
round to the input dtype (bf16 / fp16) and where, with everything else in float32. It stands in
for the CUDA ops in scripts/gpu_tests_dry_run.py (--stand-in model), so the GPU tests' criteria
(at most 2x PyTorch's own low-precision error) are checked against the kernels' numerics before a
GPU runs them. Index math, tiling order and fp32 summation order are not modelled (the index
models check the first two; the last is below the criteria's resolution).

Forward / JVP (attention_fwd_kernel.cuh, shared by the sm_90a kernels), per key tile of BLOCK_KEYS:
  s = scale·q·kᵀ + bias, ṡ = scale·(q̇·kᵀ + q·k̇ᵀ) + bias_t            float32 (tensor-core sums)
  m' = max(m, max s); α = e^(m − m'); p = e^(s − m'); h = p·ṡ
  ℓ ← αℓ + Σp; r ← αr + Σ rnd(h); A ← αA + rnd(p)·V; T ← αT + rnd(p)·V̇ + rnd(h)·V
  O = rnd(A/ℓ), μ = r/ℓ, Ȯ = rnd(T/ℓ − μ·A/ℓ), LSE = m + ln ℓ (float32)
Backward (attention_bwd_kernel.cuh, attention_bwd_sm90_kernel.cuh; padded head dims ≤ 128):
  P = e^(s − LSE); dV = Σ rnd(P)ᵀ·dO; dP = dO·Vᵀ; δ = rowsum(dO ⊙ O) − dLSE; dS = P·(dP − δ)
  dQ = rnd(scale·rnd(dS)·K), dK = rnd(scale·Σ rnd(dS)ᵀ·Q), dV = rnd(dV); sums over the query
  heads of a kv head in float32. Above 128 the ATen path: the same in float32, no rnd inside.
"""

import math

import torch

BLOCK_KEYS = 64
MAX_FUSED_BWD_HEAD_DIM = 128


def _rnd(x, dtype):
    return x.to(dtype).float()


def _scores(q, k, bias, scale, causal):
    """float32 (B, H, Nq, Nk) scores with GQA, bias and the bottom-right causal mask."""
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale * (q.float() @ k.transpose(-1, -2))
    if bias is not None:
        s = s + (torch.where(bias, 0.0, -math.inf) if bias.dtype == torch.bool else bias.float())
    if causal:
        nq, nk = s.shape[-2:]
        visible = torch.arange(nk).view(1, nk) <= torch.arange(nq).view(nq, 1) + (nk - nq)
        s = s.masked_fill(~visible, -math.inf)
    return s


def _tangent_scores(q, k, q_t, k_t, bias_t, scale):
    group = q.shape[1] // k.shape[1]
    k, k_t = (t.float().repeat_interleave(group, dim=1) for t in (k, k_t))
    s_t = scale * (q_t.float() @ k.transpose(-1, -2) + q.float() @ k_t.transpose(-1, -2))
    return s_t if bias_t is None else s_t + bias_t.float()


def forward(q, k, v, q_t=None, k_t=None, v_t=None, bias=None, bias_t=None, scale=1.0, causal=False):
    """(O, Ȯ, LSE, μ) as the forward (q_t None: Ȯ, μ None) / forward-JVP kernels compute them."""
    dtype, group = q.dtype, q.shape[1] // k.shape[1]
    jvp = q_t is not None
    s = _scores(q, k, bias, scale, causal)
    s_t = _tangent_scores(q, k, q_t, k_t, bias_t, scale) if jvp else None
    v32 = v.float().repeat_interleave(group, dim=1)
    v_t32 = v_t.float().repeat_interleave(group, dim=1) if jvp else None
    rows = s.shape[:-1] + (1,)
    m = torch.full(rows, -math.inf)
    ell, r = torch.zeros(rows), torch.zeros(rows)
    acc = torch.zeros(rows[:-1] + (v.shape[-1],))
    acc_t = torch.zeros_like(acc)
    for j0 in range(0, s.shape[-1], BLOCK_KEYS):
        tile = slice(j0, j0 + BLOCK_KEYS)
        m_new = torch.maximum(m, s[..., tile].amax(-1, keepdim=True))
        m_use = torch.where(torch.isinf(m_new), 0.0, m_new)  # a row with no visible key yet
        alpha = torch.exp(m - m_use)
        p = torch.exp(s[..., tile] - m_use)
        ell = alpha * ell + p.sum(-1, keepdim=True)
        acc = alpha * acc + _rnd(p, dtype) @ v32[..., tile, :]
        if jvp:
            h = torch.where(p > 0, p * s_t[..., tile], 0.0)
            r = alpha * r + _rnd(h, dtype).sum(-1, keepdim=True)
            acc_t = alpha * acc_t + _rnd(p, dtype) @ v_t32[..., tile, :] + _rnd(h, dtype) @ v32[..., tile, :]
        m = m_new
    live = ell > 0
    inv = torch.where(live, 1.0 / torch.where(live, ell, 1.0), 0.0)
    out32 = acc * inv
    lse = torch.where(live, m + torch.log(torch.where(live, ell, 1.0)), -math.inf).squeeze(-1)
    if not jvp:
        return out32.to(dtype), None, lse, None
    mu = r * inv
    return out32.to(dtype), (acc_t * inv - mu * out32).to(dtype), lse, mu.squeeze(-1)


def backward(grad_out, q, k, v, out, lse, bias=None, scale=1.0, causal=False, grad_lse=None):
    """(dQ, dK, dV) as the backward kernels (or, above head dim 128, the ATen path) compute them."""
    dtype, group = q.dtype, q.shape[1] // k.shape[1]
    fused = max(q.shape[-1], v.shape[-1]) <= MAX_FUSED_BWD_HEAD_DIM
    rnd = (lambda x: _rnd(x, dtype)) if fused else (lambda x: x)
    s = _scores(q, k, bias, scale, causal)
    lse = lse.unsqueeze(-1)
    p = torch.where(torch.isinf(lse), 0.0, torch.exp(s - lse))
    k32, v32 = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    do = grad_out.float()
    delta = (do * out.float()).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.float().unsqueeze(-1)
    ds = rnd(p * (do @ v32.transpose(-1, -2) - delta))
    dq = scale * ds @ k32
    dk = scale * ds.transpose(-1, -2) @ q.float()
    dv = rnd(p).transpose(-1, -2) @ do

    def per_kv_head(x):
        return x.view(x.shape[0], x.shape[1] // group, group, *x.shape[2:]).sum(2)

    return dq.to(dtype), per_kv_head(dk).to(dtype), per_kv_head(dv).to(dtype)


class ModelOps:
    """torch.ops.fastcm with the three CUDA ops computed by this model (for bf16 / fp16 inputs only
    with lowp_only: the CUDA path of fastcm.attention; float32 / float64 stay on `ops`)."""

    def __init__(self, ops, lowp_only=False):
        self.ops, self.lowp_only = ops, lowp_only

    def _model(self, q):
        return not self.lowp_only or q.dtype in (torch.bfloat16, torch.float16)

    def attention_forward(self, q, k, v, bias, scale, causal):
        if not self._model(q):
            return self.ops.attention_forward(q, k, v, bias, scale, causal)
        out, _, lse, _ = forward(q, k, v, bias=bias, scale=scale, causal=causal)
        return out, lse

    def attention_forward_jvp(self, q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal):
        if not self._model(q):
            return self.ops.attention_forward_jvp(q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal)
        # The CUDA entry point fills an absent tangent with zeros before its kernels run.
        q_t, k_t, v_t = (torch.zeros_like(p) if t is None else t for p, t in ((q, q_t), (k, k_t), (v, v_t)))
        return forward(q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal)

    def attention_backward(self, grad_out, q, *args):
        if not self._model(q):
            return self.ops.attention_backward(grad_out, q, *args)
        return backward(grad_out, q, *args)

    def __getattr__(self, name):
        return getattr(self.ops, name)
