"""Index-math check of the CUDA attention backward (csrc/cuda/attention_bwd_kernel.cuh) without a GPU.

A line-by-line float64 transcription of the three kernels (delta, dq, dkdv): the tile loaders,
the ldmatrix / ldmatrix.trans row addresses, the mma.m16n8k16 fragment layouts (modelled from the
PTX ISA tables as the kernel header states them), the accumulator-as-A-operand reuse, masks, the
base-2 P with LSE staged as +inf on dead rows, the GQA group loop and the epilogue stores. It runs
on CPU and is compared with torch autograd through fastcm.reference.attention in float64.

It checks the layout and indexing reasoning, not the hardware: PTX semantics modelled wrongly,
races, cp.async ordering and compiler issues stay for the GPU tests (tests/test_attention_cuda.py).
Keep it in step with the kernel when the kernel changes.
"""

import math

import numpy as np
import pytest
import torch
from ptx_model import C_, G_, LANE, LOG2E, Tensor, contiguous, ldmatrix_x4, load_tile, mma16816, pack_a, zeros_frags
from ptx_model import stage_bias as stage_bias_tile

from fastcm.reference import attention as ref

# ---- host side and kernel helpers ------------------------------------------------------------


def traits(kd, key_major):
    bm = 32 if (key_major and kd > 64) else 64
    return dict(kD=kd, kBM=bm, kBN=64, kS=kd + 8, kThreads=128)


def load_tile_into(tr, smem, src, base, stride, rows, rows_valid, d_valid):
    """The backward's tiles each own a buffer of kS-element rows."""
    load_tile(tr["kThreads"], smem, 0, smem.size, src, base, stride, rows, rows_valid, d_valid, tr["kD"], tr["kS"])


def stage_bias(tr, p, base, m0, n0):
    return stage_bias_tile(tr["kBM"], tr["kBN"], p, p["bias"], base, m0, n0, LOG2E)


def lse_log2(p, li):
    lv = p["lse"][li]
    return math.inf if lv == -math.inf else lv * LOG2E


# ---- the three kernels -----------------------------------------------------------------------


def delta_kernel(p):
    rows = p["B"] * p["H"] * p["Nq"]
    o, d = p["out"], p["dout"]
    for row in range(rows):
        i, bh = row % p["Nq"], row // p["Nq"]
        b, h = bh // p["H"], bh % p["H"]
        ob = b * o.st[0] + h * o.st[1] + i * o.st[2]
        db = b * d.st[0] + h * d.st[1] + i * d.st[2]
        acc = np.zeros(32)
        for lane in range(32):
            for c0 in range(lane * 8, p["d_v"], 256):
                acc[lane] += np.dot(o.s[ob + c0 : ob + c0 + 8], d.s[db + c0 : db + c0 + 8])
        for s in (16, 8, 4, 2, 1):
            acc = acc + acc[LANE ^ s]
        p["delta"][row] = acc[0] - p["grad_lse"][row] if p.get("grad_lse") is not None else acc[0]


def bwd_dq_block(p, kBM, kBN, block):
    """bwd_dq_block: (bh, b, h, hkv, m0, n_tiles) of a dQ CTA, heaviest (causal) tiles first."""
    num_m = (p["Nq"] + kBM - 1) // kBM
    bh = block // num_m
    b, h = bh // p["H"], bh % p["H"]
    m0 = (num_m - 1 - block % num_m) * kBM
    n_end = max(0, min(p["Nk"], m0 + kBM + p["Nk"] - p["Nq"])) if p["causal"] else p["Nk"]
    return bh, b, h, h // (p["H"] // p["Hkv"]), m0, (n_end + kBN - 1) // kBN


def bwd_dkdv_block(p, kBN, kBM, block):
    """bwd_dkdv_block: (b, hkv, n0, steps, head_of, row0_of) of a dK/dV CTA; causal: the query
    tiles before the first that sees key n0 skipped."""
    num_n = (p["Nk"] + kBN - 1) // kBN
    bhkv, G = block // num_n, p["H"] // p["Hkv"]
    b, hkv, n0 = bhkv // p["Hkv"], bhkv % p["Hkv"], (block % num_n) * kBN
    num_m = (p["Nq"] + kBM - 1) // kBM
    m_first = min(num_m, max(0, n0 - (p["Nk"] - p["Nq"])) // kBM) if p["causal"] else 0
    per_head = num_m - m_first
    return (
        b,
        hkv,
        n0,
        G * per_head,
        lambda step: hkv * G + step // per_head,
        lambda step: (m_first + step % per_head) * kBM,
    )


def dq_kernel(p, tr, block):
    kBM, kBN, kD, kS = tr["kBM"], tr["kBN"], tr["kD"], tr["kS"]
    bh, b, h, hkv, m0, n_tiles = bwd_dq_block(p, kBM, kBN, block)
    q, k, v, do = p["q"], p["k"], p["v"], p["dout"]
    gQ = b * q.st[0] + h * q.st[1]
    gdO = b * do.st[0] + h * do.st[1]
    gK = b * k.st[0] + hkv * k.st[1]
    gV = b * v.st[0] + hkv * v.st[1]
    sQ, sdO = np.zeros(kBM * kS), np.zeros(kBM * kS)
    sKV = [[np.zeros(kBN * kS), np.zeros(kBN * kS)] for _ in range(2)]

    def load_kv(stage, tile):
        n0 = tile * kBN
        load_tile_into(tr, sKV[stage][0], k.s, gK + n0 * k.st[2], k.st[2], kBN, p["Nk"] - n0, p["d_qk"])
        load_tile_into(tr, sKV[stage][1], v.s, gV + n0 * v.st[2], v.st[2], kBN, p["Nk"] - n0, p["d_v"])

    load_tile_into(tr, sQ, q.s, gQ + m0 * q.st[2], q.st[2], kBM, p["Nq"] - m0, p["d_qk"])
    load_tile_into(tr, sdO, do.s, gdO + m0 * do.st[2], do.st[2], kBM, p["Nq"] - m0, p["d_v"])
    if n_tiles > 0:
        load_kv(0, 0)

    warps = []
    for warp in range(4):
        row_in_cta = 16 * warp + G_
        lse2, dlt = [], []
        for rr in range(2):
            i = m0 + row_in_cta + 8 * rr
            li = bh * p["Nq"] + i
            lse2.append(np.array([lse_log2(p, x) if y < p["Nq"] else math.inf for x, y in zip(li, i)]))
            dlt.append(np.array([p["delta"][x] if y < p["Nq"] else 0.0 for x, y in zip(li, i)]))
        warps.append(dict(row_in_cta=row_in_cta, lse2=lse2, dlt=dlt, acc=zeros_frags(kD // 8)))
    bias_base = b * p["bias"].st[0] + h * p["bias"].st[1] if p["bias"] is not None else 0

    for tile in range(n_tiles):
        stage = tile & 1
        if tile + 1 < n_tiles:
            load_kv(stage ^ 1, tile + 1)
        sBias = stage_bias(tr, p, bias_base, m0, tile * kBN) if p["bias"] is not None else None
        sK, sV = sKV[stage]
        n0 = tile * kBN
        for warp, w in enumerate(warps):
            s, dp = zeros_frags(kBN // 8), zeros_frags(kBN // 8)
            for ks in range(kD // 16):
                a_off = (16 * warp + LANE % 16) * kS + ks * 16 + (LANE // 16) * 8
                qa, oa = ldmatrix_x4(sQ, a_off), ldmatrix_x4(sdO, a_off)
                for np_ in range(kBN // 16):
                    b_off = (np_ * 16 + LANE % 8 + (LANE // 16) * 8) * kS + ks * 16 + ((LANE // 8) % 2) * 8
                    kb, vb = ldmatrix_x4(sK, b_off), ldmatrix_x4(sV, b_off)
                    mma16816(s[2 * np_], qa, kb[:, 0], kb[:, 1])
                    mma16816(s[2 * np_ + 1], qa, kb[:, 2], kb[:, 3])
                    mma16816(dp[2 * np_], oa, vb[:, 0], vb[:, 1])
                    mma16816(dp[2 * np_ + 1], oa, vb[:, 2], vb[:, 3])
            dq_scores_to_ds(s, dp, p, sBias, w["row_in_cta"], m0, n0, w["lse2"], w["dlt"])
            for kk in range(kBN // 16):
                da = pack_a(s, kk)
                for dd in range(kD // 16):
                    k_off = (kk * 16 + LANE % 8 + ((LANE // 8) % 2) * 8) * kS + dd * 16 + (LANE // 16) * 8
                    kb = ldmatrix_x4(sK, k_off, trans=True)
                    mma16816(w["acc"][2 * dd], da, kb[:, 0], kb[:, 1])
                    mma16816(w["acc"][2 * dd + 1], da, kb[:, 2], kb[:, 3])

    store_dq(p, warps, b, h, m0)


def store_dq(p, warps, b, h, m0):
    """store_dq: each warp's rows row_in_cta, + 8 of the tile at m0, × scale."""
    dq = p["dq"]
    gdQ = b * dq.st[0] + h * dq.st[1]
    for w in warps:
        for nt in range(len(w["acc"])):
            col = nt * 8 + 2 * C_
            for rr in range(2):
                i = m0 + w["row_in_cta"] + 8 * rr
                ok = (col < p["d_qk"]) & (i < p["Nq"])
                for j in range(2):
                    dq.s[(gdQ + i * dq.st[2] + col + j)[ok]] = (w["acc"][nt][:, 2 * rr + j] * p["scale"])[ok]


def dq_scores_to_ds(s, dp, p, sBias, row_in_cta, m0, n0, lse2, dlt):
    """dq_scores_to_ds (both backward families): dS in place of s, query-major."""
    knt, off = len(s), p["Nk"] - p["Nq"]
    need_mask = (n0 + 8 * knt > p["Nk"]) or (p["causal"] and n0 + 8 * knt - 1 > m0 + off)
    for nt in range(knt):
        for e in range(4):
            ri, jl = row_in_cta + 8 * (e // 2), nt * 8 + 2 * C_ + e % 2
            x = s[nt][:, e] * p["scale_log2"]
            if sBias is not None:
                x = x + sBias[ri * 8 * knt + jl]
            if need_mask:
                i, j = m0 + ri, n0 + jl
                x = np.where((j >= p["Nk"]) | (p["causal"] & (j > i + off)), -math.inf, x)
            s[nt][:, e] = np.exp2(x - lse2[e // 2]) * (dp[nt][:, e] - dlt[e // 2])


def dkdv_scores_to_ds(st, dpt, p, sBias, bias_cols, sLse, sDelta, key_in_cta, m0, n0, cta_keys):
    """dkdv_scores_to_ds (both backward families): Pᵀ in place of st, dSᵀ in place of dpt, key-major."""
    off = p["Nk"] - p["Nq"]
    need_mask = (n0 + cta_keys > p["Nk"]) or (p["causal"] and n0 + cta_keys - 1 > m0 + off)
    for nt in range(len(st)):
        for e in range(4):
            kl, ql = key_in_cta + 8 * (e // 2), nt * 8 + 2 * C_ + e % 2
            x = st[nt][:, e] * p["scale_log2"]
            if sBias is not None:
                x = x + sBias[ql * bias_cols + kl]
            if need_mask:
                i, j = m0 + ql, n0 + kl
                x = np.where((j >= p["Nk"]) | (p["causal"] & (j > i + off)), -math.inf, x)
            pe = np.exp2(x - sLse[ql])
            st[nt][:, e] = pe
            dpt[nt][:, e] = pe * (dpt[nt][:, e] - sDelta[ql])


def dkdv_kernel(p, tr, block):
    kBM, kBN, kD, kS = tr["kBM"], tr["kBN"], tr["kD"], tr["kS"]
    b, hkv, n0, steps, head_of, row0_of = bwd_dkdv_block(p, kBN, kBM, block)
    q, k, v, do = p["q"], p["k"], p["v"], p["dout"]
    gK = b * k.st[0] + hkv * k.st[1]
    gV = b * v.st[0] + hkv * v.st[1]
    sK, sV = np.zeros(kBN * kS), np.zeros(kBN * kS)
    sQdO = [[np.zeros(kBM * kS), np.zeros(kBM * kS)] for _ in range(2)]

    def load_qdo(stage, step):
        h, m0 = head_of(step), row0_of(step)
        gQ = b * q.st[0] + h * q.st[1]
        gdO = b * do.st[0] + h * do.st[1]
        load_tile_into(tr, sQdO[stage][0], q.s, gQ + m0 * q.st[2], q.st[2], kBM, p["Nq"] - m0, p["d_qk"])
        load_tile_into(tr, sQdO[stage][1], do.s, gdO + m0 * do.st[2], do.st[2], kBM, p["Nq"] - m0, p["d_v"])

    load_tile_into(tr, sK, k.s, gK + n0 * k.st[2], k.st[2], kBN, p["Nk"] - n0, p["d_qk"])
    load_tile_into(tr, sV, v.s, gV + n0 * v.st[2], v.st[2], kBN, p["Nk"] - n0, p["d_v"])
    if steps > 0:
        load_qdo(0, 0)
    acc_k = [zeros_frags(kD // 8) for _ in range(4)]
    acc_v = [zeros_frags(kD // 8) for _ in range(4)]

    for step in range(steps):
        stage = step & 1
        h, m0 = head_of(step), row0_of(step)
        if step + 1 < steps:
            load_qdo(stage ^ 1, step + 1)
        sLse, sDelta = np.zeros(kBM), np.zeros(kBM)
        for tid in range(kBM):
            i = m0 + tid
            li = (b * p["H"] + h) * p["Nq"] + i
            sLse[tid] = lse_log2(p, li) if i < p["Nq"] else math.inf
            sDelta[tid] = p["delta"][li] if i < p["Nq"] else 0.0
        sBias = None
        if p["bias"] is not None:
            sBias = stage_bias(tr, p, b * p["bias"].st[0] + h * p["bias"].st[1], m0, n0)
        sQ, sdO = sQdO[stage]
        for warp in range(4):
            key_in_cta = 16 * warp + G_
            st, dpt = zeros_frags(kBM // 8), zeros_frags(kBM // 8)
            for ks in range(kD // 16):
                a_off = (16 * warp + LANE % 16) * kS + ks * 16 + (LANE // 16) * 8
                ka, va = ldmatrix_x4(sK, a_off), ldmatrix_x4(sV, a_off)
                for np_ in range(kBM // 16):
                    b_off = (np_ * 16 + LANE % 8 + (LANE // 16) * 8) * kS + ks * 16 + ((LANE // 8) % 2) * 8
                    qb, ob = ldmatrix_x4(sQ, b_off), ldmatrix_x4(sdO, b_off)
                    mma16816(st[2 * np_], ka, qb[:, 0], qb[:, 1])
                    mma16816(st[2 * np_ + 1], ka, qb[:, 2], qb[:, 3])
                    mma16816(dpt[2 * np_], va, ob[:, 0], ob[:, 1])
                    mma16816(dpt[2 * np_ + 1], va, ob[:, 2], ob[:, 3])
            dkdv_scores_to_ds(st, dpt, p, sBias, kBN, sLse, sDelta, key_in_cta, m0, n0, kBN)
            for kk in range(kBM // 16):
                pa, da = pack_a(st, kk), pack_a(dpt, kk)
                for dd in range(kD // 16):
                    t_off = (kk * 16 + LANE % 8 + ((LANE // 8) % 2) * 8) * kS + dd * 16 + (LANE // 16) * 8
                    ob, qb = ldmatrix_x4(sdO, t_off, trans=True), ldmatrix_x4(sQ, t_off, trans=True)
                    mma16816(acc_v[warp][2 * dd], pa, ob[:, 0], ob[:, 1])
                    mma16816(acc_v[warp][2 * dd + 1], pa, ob[:, 2], ob[:, 3])
                    mma16816(acc_k[warp][2 * dd], da, qb[:, 0], qb[:, 1])
                    mma16816(acc_k[warp][2 * dd + 1], da, qb[:, 2], qb[:, 3])

    store_dkdv(p, acc_k, acc_v, b, hkv, n0)


def store_dkdv(p, acc_k, acc_v, b, hkv, n0):
    """store_dkdv: warp w's keys 16w + g, + 8 of the CTA's keys at n0; dK × scale."""
    dk, dv = p["dk"], p["dv"]
    gdK = b * dk.st[0] + hkv * dk.st[1]
    gdV = b * dv.st[0] + hkv * dv.st[1]
    for warp in range(len(acc_k)):
        key_in_cta = 16 * warp + G_
        for nt in range(len(acc_k[warp])):
            col = nt * 8 + 2 * C_
            for rr in range(2):
                j = n0 + key_in_cta + 8 * rr
                for jj in range(2):
                    ok = (j < p["Nk"]) & (col < p["d_qk"])
                    dk.s[(gdK + j * dk.st[2] + col + jj)[ok]] = (acc_k[warp][nt][:, 2 * rr + jj] * p["scale"])[ok]
                    ok = (j < p["Nk"]) & (col < p["d_v"])
                    dv.s[(gdV + j * dv.st[2] + col + jj)[ok]] = acc_v[warp][nt][:, 2 * rr + jj][ok]


def backward_model(grad, q, k, v, out, lse, bias, scale, causal):
    """The host wrapper (attention_backward_fused) and the three launches, on float64 numpy data."""
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    d8 = lambda d: (d + 7) // 8 * 8  # noqa: E731
    pad = lambda a, d: np.pad(a, [(0, 0)] * 3 + [(0, d8(d) - d)])  # noqa: E731
    kd = next(x for x in (32, 64, 96, 128) if x >= max(d8(Dqk), d8(Dv)))
    p = dict(
        B=B,
        H=H,
        Hkv=Hkv,
        Nq=Nq,
        Nk=Nk,
        d_qk=d8(Dqk),
        d_v=d8(Dv),
        scale=scale,
        scale_log2=scale * LOG2E,
        causal=bool(causal),
        q=contiguous(pad(q, Dqk)),
        k=contiguous(pad(k, Dqk)),
        v=contiguous(pad(v, Dv)),
        dout=contiguous(pad(grad, Dv)),
        out=contiguous(pad(out, Dv)),
        lse=np.ascontiguousarray(lse).reshape(-1),
        delta=np.full(B * H * Nq, np.nan),
        bias=None if bias is None else Tensor(*bias),
    )
    # NaN-poisoned outputs: an element no kernel writes fails the comparison.
    p["dq"] = contiguous(np.full((B, H, Nq, d8(Dqk)), np.nan))
    p["dk"] = contiguous(np.full((B, Hkv, Nk, d8(Dqk)), np.nan))
    p["dv"] = contiguous(np.full((B, Hkv, Nk, d8(Dv)), np.nan))
    delta_kernel(p)
    tq, tkv = traits(kd, False), traits(kd, True)
    for blk in range((Nq + tq["kBM"] - 1) // tq["kBM"] * B * H):
        dq_kernel(p, tq, blk)
    for blk in range((Nk + tkv["kBN"] - 1) // tkv["kBN"] * B * Hkv):
        dkdv_kernel(p, tkv, blk)
    return (
        p["dq"].s.reshape(B, H, Nq, -1)[..., :Dqk],
        p["dk"].s.reshape(B, Hkv, Nk, -1)[..., :Dqk],
        p["dv"].s.reshape(B, Hkv, Nk, -1)[..., :Dv],
    )


# (B, H, Hkv, Nq, Nk, Dqk, Dv, causal, bias kind)
CASES = [
    (1, 2, 1, 70, 45, 64, 64, True, None),  # GQA, causal Nq > Nk: dead rows, tails
    (1, 2, 2, 33, 100, 40, 24, False, "broadcast"),  # padded dims (kd 64), stride-0 bias with a -inf row
    (1, 4, 2, 50, 77, 96, 80, True, "full"),  # kd 96 (dkdv kBM 32), causal Nq < Nk, D_qk != D_v
    (2, 1, 1, 100, 101, 128, 32, True, None),  # kd 128, B = 2; row 63 is the first to see key 64
    (1, 3, 1, 17, 130, 16, 32, False, "head"),  # kd 32, G = 3, key tiles with a tail
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_index_model_matches_autograd(case):
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal, bias_kind = case
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, grad = rnd(B, H, Nq, Dqk), rnd(B, Hkv, Nk, Dqk), rnd(B, Hkv, Nk, Dv), rnd(B, H, Nq, Dv)
    # The bias as prepare_bias hands it to the kernel: a (B, H, Nq, Nk) view of a smaller tensor.
    base = {"broadcast": (1, 1, Nq, Nk), "full": (B, H, Nq, Nk), "head": (1, H, 1, Nk), None: None}[bias_kind]
    base = None if base is None else rnd(*base)
    if bias_kind == "broadcast":
        base[..., 3, :] = -math.inf  # a row no key is visible to
    bias = None if base is None else base.expand(B, H, Nq, Nk)
    scale = 0.8 * Dqk**-0.5
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = ref.attention(qr, kr, vr, scale=scale, causal=causal, attn_bias=bias, return_lse=True)
    expected = torch.autograd.grad(out, (qr, kr, vr), grad)
    if causal and Nq > Nk or bias_kind == "broadcast":
        assert torch.isneginf(lse).any()  # the case exercises a dead row

    strided = None if bias is None else (base.numpy().reshape(-1), list(bias.stride()))
    with np.errstate(invalid="raise", over="raise"):
        got = backward_model(
            grad.numpy(),
            q.numpy(),
            k.numpy(),
            v.numpy(),
            out.detach().numpy(),
            lse.detach().numpy(),
            strided,
            scale,
            causal,
        )
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert not np.isnan(g).any(), f"{name}: unwritten element"
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
