"""The steps both CUDA forward kernels share (fwd_block, scores_to_log2, online_softmax,
rescale_accumulators, write_outputs in csrc/cuda/attention_fwd_kernel.cuh), transcribed for one
warp: fragments are lists of (32, 4) arrays, lane L holding rows row_in_cta[L] and row_in_cta[L] + 8."""

import math

import numpy as np
import torch
from ptx_model import C_, LANE, LOG2E

from fastcm.reference import attention as ref


def shfl_xor(x, m):
    return x[LANE ^ m]


def fwd_block(p, kbm, kbn, block):
    """The CTA's (bh, b, h, m0, off, n_tiles) and the element offsets of its q, k, v, q_t, k_t, v_t heads
    (None for the tangents of a primal launch, which has none)."""
    mb = p["num_m_blocks"] - 1 - block % p["num_m_blocks"]
    bh = block // p["num_m_blocks"]
    b, h = bh // p["H"], bh % p["H"]
    hkv = h // (p["H"] // p["Hkv"])
    m0, off = mb * kbm, p["Nk"] - p["Nq"]
    heads = []
    for name, head in (("q", h), ("k", hkv), ("v", hkv), ("q_t", h), ("k_t", hkv), ("v_t", hkv)):
        t = p[name]
        heads.append(None if t is None else t.base + b * t.st[0] + head * t.st[1])
    n_end = max(0, min(p["Nk"], m0 + kbm + off)) if p["causal"] else p["Nk"]
    return bh, b, h, m0, off, (n_end + kbn - 1) // kbn, heads


def scores_to_log2(s, sd, p, jvp, kbn, sBias, sBiasT, row_in_cta, m0, n0, off, need_mask):
    """s ← s·scale·log2e + bias tile (already × log2e), −inf where masked; ṡ ← ṡ·scale + bias_t."""
    for nt in range(len(s)):
        for e in range(4):
            ri, jl = row_in_cta + 8 * (e // 2), nt * 8 + 2 * C_ + e % 2
            x = s[nt][:, e] * p["scale_log2"]
            if sBias is not None:
                x = x + sBias[ri * kbn + jl]
            if need_mask:
                i, j = m0 + ri, n0 + jl
                x = np.where((j >= p["Nk"]) | (p["causal"] & (j > i + off)), -math.inf, x)
            s[nt][:, e] = x
            if jvp:
                xd = sd[nt][:, e] * p["scale"]
                if sBiasT is not None:
                    xd = xd + sBiasT[ri * kbn + jl]
                sd[nt][:, e] = xd


def online_softmax(s, sd, jvp, w):
    """One key tile: updates w's row_max / row_sum / row_r, turns s into p and ṡ into h; returns alpha."""
    alpha = [None, None]
    row_max, row_sum, row_r = list(w["row_max"]), list(w["row_sum"]), list(w["row_r"])
    for rr in range(2):
        mx = row_max[rr]
        for nt in range(len(s)):
            mx = np.maximum(mx, np.maximum(s[nt][:, 2 * rr], s[nt][:, 2 * rr + 1]))
        mx = np.maximum(mx, shfl_xor(mx, 1))
        mx = np.maximum(mx, shfl_xor(mx, 2))
        m_use = np.where(mx == -math.inf, 0.0, mx)
        alpha[rr] = np.exp2(row_max[rr] - m_use)
        row_max[rr] = mx
        ps, hs = np.zeros(32), np.zeros(32)
        for nt in range(len(s)):
            for e in (2 * rr, 2 * rr + 1):
                pe = np.exp2(s[nt][:, e] - m_use)
                s[nt][:, e] = pe
                ps = ps + pe
                if jvp:
                    he = np.where(pe > 0, pe * np.where(pe > 0, sd[nt][:, e], 0.0), 0.0)
                    sd[nt][:, e] = he
                    hs = hs + he
        row_sum[rr] = alpha[rr] * row_sum[rr] + ps
        if jvp:
            row_r[rr] = alpha[rr] * row_r[rr] + hs
    w["row_max"], w["row_sum"], w["row_r"] = row_max, row_sum, row_r
    return alpha


def rescale_accumulators(w, alpha):
    for nt in range(len(w["acc_o"])):
        for e in range(4):
            w["acc_o"][nt][:, e] *= alpha[e // 2]
            w["acc_t"][nt][:, e] *= alpha[e // 2]


def write_outputs(p, w, jvp, m0, bh, b, h):
    """Quad-reduce ℓ and r; LSE (μ) and O = A/ℓ (Ȯ = T/ℓ − μ·O) of the warp's rows."""
    out, out_t = p["out"], p["out_t"]
    gO = out.base + b * out.st[0] + h * out.st[1]
    gOt = out_t.base + b * out_t.st[0] + h * out_t.st[1] if jvp else 0
    inv_l, mu = [None, None], [None, None]
    for rr in range(2):
        l, r = w["row_sum"][rr], w["row_r"][rr]
        l = l + shfl_xor(l, 1)
        l = l + shfl_xor(l, 2)
        if jvp:
            r = r + shfl_xor(r, 1)
            r = r + shfl_xor(r, 2)
        inv_l[rr] = np.where(l > 0, 1.0 / np.where(l > 0, l, 1.0), 0.0)
        mu[rr] = r * inv_l[rr] if jvp else np.zeros(32)
        i = m0 + w["row_in_cta"] + 8 * rr
        ok = (C_ == 0) & (i < p["Nq"])
        li = bh * p["Nq"] + i
        lse = np.where(l > 0, (w["row_max"][rr] + np.log2(np.where(l > 0, l, 1.0))) / LOG2E, -math.inf)
        p["lse"][li[ok]] = lse[ok]
        if jvp:
            p["lse_t"][li[ok]] = mu[rr][ok]
    for nt in range(len(w["acc_o"])):
        col = nt * 8 + 2 * C_
        for rr in range(2):
            i = m0 + w["row_in_cta"] + 8 * rr
            ok = (col < p["d_v"]) & (i < p["Nq"])
            o = [w["acc_o"][nt][:, 2 * rr + j] * inv_l[rr] for j in range(2)]
            for j in range(2):
                out.s[(gO + i * out.st[2] + col + j)[ok]] = o[j][ok]
                if jvp:
                    t = w["acc_t"][nt][:, 2 * rr + j] * inv_l[rr] - mu[rr] * o[j]
                    out_t.s[(gOt + i * out_t.st[2] + col + j)[ok]] = t[ok]


def assert_matches_reference(names, got, expected):
    """Every element written (no NaN), non-finite entries exact, the rest to 1e-10 (float64 model)."""
    for name, g, e in zip(names, got, expected):
        e = e.numpy()
        assert not np.isnan(g).any(), f"{name}: unwritten element"
        fin = np.isfinite(e)
        assert np.array_equal(g[~fin], e[~fin]), f"{name}: non-finite entries differ"
        np.testing.assert_allclose(g[fin], e[fin], rtol=1e-10, atol=1e-10, err_msg=name)


def case_inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, jvp, bias_kind, seed):
    """float64 q, k, v, q_t, k_t, v_t and the bias / bias_t as prepare_bias hands them to the kernel:
    (B, H, Nq, Nk) views of a smaller tensor ("broadcast" (1, 1, Nq, Nk) with a −inf row in the bias
    and +inf in bias_t, "full", "head" (1, H, 1, Nk), or None). Returns (tensors, bias, bias_t, the
    models' (storage, strides) of both)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    tensors = (
        rnd(B, H, Nq, Dqk),
        rnd(B, Hkv, Nk, Dqk),
        rnd(B, Hkv, Nk, Dv),
        rnd(B, H, Nq, Dqk),
        rnd(B, Hkv, Nk, Dqk),
        rnd(B, Hkv, Nk, Dv),
    )
    shape = {"broadcast": (1, 1, Nq, Nk), "full": (B, H, Nq, Nk), "head": (1, H, 1, Nk), None: None}[bias_kind]
    base = None if shape is None else rnd(*shape)
    base_t = None if shape is None or not jvp else rnd(*shape)
    if bias_kind == "broadcast":
        base[..., 3, :] = -math.inf  # a row no key is visible to
        base_t[..., 3, :] = math.inf  # h = 0 there even though ṡ is infinite
    bias = None if base is None else base.expand(B, H, Nq, Nk)
    bias_t = None if base_t is None else base_t.expand(B, H, Nq, Nk)
    strided = lambda t, bt: None if t is None else (bt.numpy().reshape(-1), list(t.stride()))  # noqa: E731
    return tensors, bias, bias_t, strided(bias, base), strided(bias_t, base_t)


def reference_outputs(tensors, bias, bias_t, scale, causal, jvp):
    """(names, outputs) of fastcm.reference.attention for a case; bias_t's infinities sit where p = 0."""
    q, k, v, qt, kt, vt = tensors
    if jvp:
        bt_ref = None if bias_t is None else torch.where(torch.isinf(bias_t), 0.0, bias_t)
        return ("out", "out_t", "lse", "lse_t"), ref.attention_jvp(
            q, k, v, qt, kt, vt, scale=scale, causal=causal, attn_bias=bias, bias_t=bt_ref, return_lse=True
        )
    return ("out", "lse"), ref.attention(q, k, v, scale=scale, causal=causal, attn_bias=bias, return_lse=True)
