"""Index-math check of the sm_90a (wgmma) attention backward (csrc/cuda/attention_bwd_sm90_kernel.cuh)
without a GPU.

A float64 transcription of the two wgmma kernels (dq, dkdv; δ is the mma.sync backward's kernel,
modelled in test_attention_bwd_index_model.py) and of the host's choice between the backward
kernels (plan_backward in attention_cuda.cu): BwdSm90Traits, the 1024-byte realignment of the
dynamic shared-memory base, the swizzled cp.async loader, the descriptors of the SS score chains
and of the RS gradient chains (B read MN-major), the accumulators packed as A operands, the shared
dS steps (dq_scores_to_ds, dkdv_scores_to_ds), the LSE / δ rows staged per stage, the causal skip,
the GQA loop and the stores, against torch autograd through fastcm.reference.attention in float64.
The PTX side (descriptor decoding, swizzled layouts, warpgroup fragments) is ptx_model.py's. What it
cannot check: the PTX readings themselves, barrier and proxy-fence placement, rounding, the compiler.
"""

import math

import numpy as np
import pytest
import torch
from ptx_model import G_, LOG2E, SharedMemory, Tensor, contiguous, desc_sw128, pack_a, stage_bias, wgmma_rs, wgmma_ss
from test_attention_bwd_index_model import (
    bwd_dkdv_block,
    bwd_dq_block,
    delta_kernel,
    dkdv_kernel,
    dkdv_scores_to_ds,
    dq_kernel,
    dq_scores_to_ds,
    lse_log2,
    store_dkdv,
    store_dq,
    traits,
)
from test_attention_fwd_sm90_index_model import SMEM_OPTIN_SM90, frags, load_tile_sw128

from fastcm.reference import attention as ref

SMEM_OPTIN_SM80 = 163 * 1024


# ---- traits and the host's choice (BwdSm90Traits, plan_backward) ------------------------------


def sm90_traits(kd, key_major, has_bias):
    own, tile = 128 * kd * 2, 64 * kd * 2
    stats = 2 * 2 * 64 * 4 if key_major else 0
    bm, bn = (64, 128) if key_major else (128, 64)  # the bias tile: query rows × keys
    bias = bm * bn * 4 if has_bias else 0
    return dict(
        kD=kd,
        key_major=key_major,
        kThreads=256,
        kOwnRows=128,
        kTileRows=64,
        kOwnBytes=own,
        kTileBytes=tile,
        kStageBytes=2 * tile,
        kRowStatBytes=stats,
        kBM=bm,
        kBN=bn,
        kBias=has_bias,
        kBiasBytes=bias,
        kSmemBytes=2 * own + 2 * 2 * tile + stats + bias + 1024,
    )


def bwd_smem_bytes(kd, has_bias):
    """The mma.sync backward's larger launch (bwd_smem_bytes in attention_bwd_kernel.cuh)."""

    def need(tr, key_major):
        once, stage = (tr["kBN"], tr["kBM"]) if key_major else (tr["kBM"], tr["kBN"])
        stats = 2 * tr["kBM"] * 4 if key_major else 0
        return (2 * once * tr["kS"] + 4 * stage * tr["kS"]) * 2 + stats + (tr["kBM"] * tr["kBN"] * 4 if has_bias else 0)

    return max(need(traits(kd, False), False), need(traits(kd, True), True))


def plan_backward(sm90_limit, sm90_bwd, Dqk, Dv, has_bias, smem_limit):
    """(kernel, padded head dim) of one backward call; sm90_limit: 0 where no sm_90a kernel may run."""
    if Dqk > 128 or Dv > 128:
        return "aten", 0
    d8 = max((Dqk + 7) // 8 * 8, (Dv + 7) // 8 * 8)
    kd = next(x for x in (32, 64, 96, 128) if x >= d8)
    if sm90_bwd and kd in (64, 128) and sm90_traits(kd, True, has_bias)["kSmemBytes"] <= sm90_limit:
        return "sm_90a", kd
    return ("sm_80", kd) if bwd_smem_bytes(kd, has_bias) <= smem_limit else ("aten", 0)


# ---- the two kernels -------------------------------------------------------------------------


def smem_tiles(tr, smem_raw):
    sm = SharedMemory(smem_raw, tr["kSmemBytes"])
    smem = smem_raw + ((1024 - (smem_raw & 1023)) & 1023)
    end = smem + 2 * tr["kOwnBytes"] + 2 * tr["kStageBytes"] + tr["kRowStatBytes"] + tr["kBiasBytes"]
    assert end <= smem_raw + tr["kSmemBytes"], "tiles (and the bias tile after them) past the allocation"
    return sm, smem, smem + tr["kOwnBytes"], smem + 2 * tr["kOwnBytes"]


def score_chain(sm, d, a_base, rows_a, b_base, rows_b, kd):
    """issue_score_chain: D = A·Bᵀ, SS, both K-major."""
    for ks in range(kd // 16):
        step = lambda rows: (ks // 4) * rows * 128 + (ks % 4) * 32  # noqa: E731  (sw128_k_step)
        wgmma_ss(
            sm, d, desc_sw128(a_base + step(rows_a), 16, 1024), desc_sw128(b_base + step(rows_b), 16, 1024), ks > 0
        )


def grad_chain(sm, acc, a, b_base):
    """issue_grad_chain: acc += A·B, A = packed fragments a[warp][kk], B 64 rows MN-major."""
    for kk in range(4):
        wgmma_rs(sm, acc, [a[w][kk] for w in range(4)], desc_sw128(b_base + kk * 2048, 64 * 128, 1024))


def dq_sm90_kernel(p, tr, block, smem_raw):
    kBM, kBN, kD = tr["kOwnRows"], tr["kTileRows"], tr["kD"]
    sm, sQ, sdO, sKV = smem_tiles(tr, smem_raw)
    bh, b, h, hkv, m0, n_tiles = bwd_dq_block(p, kBM, kBN, block)
    q, k, v, do = p["q"], p["k"], p["v"], p["dout"]
    gQ, gdO = b * q.st[0] + h * q.st[1], b * do.st[0] + h * do.st[1]
    gK, gV = b * k.st[0] + hkv * k.st[1], b * v.st[0] + hkv * v.st[1]

    def load_kv(stage, tile):
        base, n0 = sKV + stage * tr["kStageBytes"], tile * kBN
        load_tile_sw128(tr, sm, base, kBN, k.s, gK + n0 * k.st[2], k.st[2], p["Nk"] - n0, p["d_qk"])
        load_tile_sw128(tr, sm, base + tr["kTileBytes"], kBN, v.s, gV + n0 * v.st[2], v.st[2], p["Nk"] - n0, p["d_v"])

    load_tile_sw128(tr, sm, sQ, kBM, q.s, gQ + m0 * q.st[2], q.st[2], p["Nq"] - m0, p["d_qk"])
    load_tile_sw128(tr, sm, sdO, kBM, do.s, gdO + m0 * do.st[2], do.st[2], p["Nq"] - m0, p["d_v"])
    if n_tiles > 0:
        load_kv(0, 0)
    warps = []
    for warp in range(8):
        row_in_cta = 16 * warp + G_
        i = [m0 + row_in_cta + 8 * rr for rr in range(2)]
        li = [bh * p["Nq"] + x for x in i]
        warps.append(
            dict(
                row_in_cta=row_in_cta,
                acc=frags(kD // 8),
                lse2=[
                    np.array([lse_log2(p, a) if r < p["Nq"] else math.inf for a, r in zip(l_, i_)])
                    for l_, i_ in zip(li, i)
                ],
                dlt=[
                    np.array([p["delta"][a] if r < p["Nq"] else 0.0 for a, r in zip(l_, i_)]) for l_, i_ in zip(li, i)
                ],
            )
        )

    bias_base = b * p["bias"].st[0] + h * p["bias"].st[1] if tr["kBias"] else 0
    for tile in range(n_tiles):
        stage = tile & 1
        if tile + 1 < n_tiles:
            load_kv(stage ^ 1, tile + 1)
        sBias = stage_bias(kBM, kBN, p, p["bias"], bias_base, m0, tile * kBN, LOG2E) if tr["kBias"] else None
        k_base = sKV + stage * tr["kStageBytes"]
        v_base, n0 = k_base + tr["kTileBytes"], tile * kBN
        for wg in range(2):
            ws = warps[4 * wg : 4 * wg + 4]
            s = [frags(kBN // 8, np.nan) for _ in range(4)]  # uninitialised: scale_d = 0 overwrites
            dp = [frags(kBN // 8, np.nan) for _ in range(4)]
            score_chain(sm, s, sQ + wg * 64 * 128, kBM, k_base, kBN, kD)
            score_chain(sm, dp, sdO + wg * 64 * 128, kBM, v_base, kBN, kD)
            for w, sw, dpw in zip(ws, s, dp):
                dq_scores_to_ds(sw, dpw, p, sBias, w["row_in_cta"], m0, n0, w["lse2"], w["dlt"])
            grad_chain(sm, [w["acc"] for w in ws], [[pack_a(sw, kk) for kk in range(kBN // 16)] for sw in s], k_base)

    store_dq(p, warps, b, h, m0)


def dkdv_sm90_kernel(p, tr, block, smem_raw):
    kBN, kBM, kD = tr["kOwnRows"], tr["kTileRows"], tr["kD"]
    sm, sK, sV, sQdO = smem_tiles(tr, smem_raw)
    stats = np.full(2 * 2 * kBM, np.nan)  # sStat[stage][LSE | δ][kBM]
    b, hkv, n0, steps, head_of, row0_of = bwd_dkdv_block(p, kBN, kBM, block)
    q, k, v, do = p["q"], p["k"], p["v"], p["dout"]
    gK, gV = b * k.st[0] + hkv * k.st[1], b * v.st[0] + hkv * v.st[1]

    def load_qdo(stage, step):
        base, h, m0 = sQdO + stage * tr["kStageBytes"], head_of(step), row0_of(step)
        gQ, gdO = b * q.st[0] + h * q.st[1], b * do.st[0] + h * do.st[1]
        load_tile_sw128(tr, sm, base, kBM, q.s, gQ + m0 * q.st[2], q.st[2], p["Nq"] - m0, p["d_qk"])
        load_tile_sw128(
            tr, sm, base + tr["kTileBytes"], kBM, do.s, gdO + m0 * do.st[2], do.st[2], p["Nq"] - m0, p["d_v"]
        )
        for tid in range(kBM):
            i = m0 + tid
            li = (b * p["H"] + h) * p["Nq"] + i
            stats[stage * 2 * kBM + tid] = lse_log2(p, li) if i < p["Nq"] else math.inf
            stats[stage * 2 * kBM + kBM + tid] = p["delta"][li] if i < p["Nq"] else 0.0

    load_tile_sw128(tr, sm, sK, kBN, k.s, gK + n0 * k.st[2], k.st[2], p["Nk"] - n0, p["d_qk"])
    load_tile_sw128(tr, sm, sV, kBN, v.s, gV + n0 * v.st[2], v.st[2], p["Nk"] - n0, p["d_v"])
    if steps > 0:
        load_qdo(0, 0)
    acc_k = [frags(kD // 8) for _ in range(8)]
    acc_v = [frags(kD // 8) for _ in range(8)]

    for step in range(steps):
        stage = step & 1
        if step + 1 < steps:
            load_qdo(stage ^ 1, step + 1)
        q_base = sQdO + stage * tr["kStageBytes"]
        do_base = q_base + tr["kTileBytes"]
        sLse, sDelta = (
            stats[stage * 2 * kBM : stage * 2 * kBM + kBM],
            stats[stage * 2 * kBM + kBM : (stage + 1) * 2 * kBM],
        )
        sBias = None
        if tr["kBias"]:
            h = head_of(step)
            sBias = stage_bias(
                kBM, kBN, p, p["bias"], b * p["bias"].st[0] + h * p["bias"].st[1], row0_of(step), n0, LOG2E
            )
        for wg in range(2):
            st = [frags(kBM // 8, np.nan) for _ in range(4)]
            dpt = [frags(kBM // 8, np.nan) for _ in range(4)]
            score_chain(sm, st, sK + wg * 64 * 128, kBN, q_base, kBM, kD)
            score_chain(sm, dpt, sV + wg * 64 * 128, kBN, do_base, kBM, kD)
            for w in range(4):
                dkdv_scores_to_ds(
                    st[w], dpt[w], p, sBias, kBN, sLse, sDelta, 16 * (4 * wg + w) + G_, row0_of(step), n0, kBN
                )
            pa = [[pack_a(x, kk) for kk in range(kBM // 16)] for x in st]
            da = [[pack_a(x, kk) for kk in range(kBM // 16)] for x in dpt]
            grad_chain(sm, acc_v[4 * wg : 4 * wg + 4], pa, do_base)
            grad_chain(sm, acc_k[4 * wg : 4 * wg + 4], da, q_base)

    store_dkdv(p, acc_k, acc_v, b, hkv, n0)


def backward_model(grad, q, k, v, out, lse, bias, scale, causal, plan, grad_lse=None, smem_raw=0x410):
    """attention_backward_fused on float64 numpy data with the kernels `plan` names."""
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    kernel, kd = plan
    d8 = lambda d: (d + 7) // 8 * 8  # noqa: E731
    pad = lambda a, d: np.pad(a, [(0, 0)] * 3 + [(0, d8(d) - d)])  # noqa: E731
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
        grad_lse=None if grad_lse is None else np.ascontiguousarray(grad_lse).reshape(-1),
        dq=contiguous(np.full((B, H, Nq, d8(Dqk)), np.nan)),
        dk=contiguous(np.full((B, Hkv, Nk, d8(Dqk)), np.nan)),
        dv=contiguous(np.full((B, Hkv, Nk, d8(Dv)), np.nan)),
    )
    delta_kernel(p)
    if kernel == "sm_90a":
        tq, tkv = sm90_traits(kd, False, bias is not None), sm90_traits(kd, True, bias is not None)
        for blk in range((Nq + 127) // 128 * B * H):
            dq_sm90_kernel(p, tq, blk, smem_raw)
        for blk in range((Nk + 127) // 128 * B * Hkv):
            dkdv_sm90_kernel(p, tkv, blk, smem_raw)
    else:
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


def check_against_autograd(case, seed, bias_kind=None, sm90_bwd=True, lse_gradient=False):
    """The model on `case` (random inputs of `seed`; bias_kind: None, "broadcast" (one (Nq, Nk) tile
    with a −inf row), "full" or "head"; lse_gradient: an LSE term in the loss, passed as grad_lse)
    against autograd; returns the plan and the LSE."""
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal = case
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, grad = rnd(B, H, Nq, Dqk), rnd(B, Hkv, Nk, Dqk), rnd(B, Hkv, Nk, Dv), rnd(B, H, Nq, Dv)
    base = {"broadcast": (1, 1, Nq, Nk), "full": (B, H, Nq, Nk), "head": (1, H, 1, Nk), None: None}[bias_kind]
    base = None if base is None else rnd(*base)
    if bias_kind == "broadcast":
        base[..., min(3, Nq - 1), :] = -math.inf  # a row no key is visible to
    bias = None if base is None else base.expand(B, H, Nq, Nk)
    scale = 0.8 * Dqk**-0.5
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = ref.attention(qr, kr, vr, scale=scale, causal=causal, attn_bias=bias, return_lse=True)
    grad_lse = rnd(B, H, Nq) if lse_gradient else None
    loss = (out * grad).sum()
    if lse_gradient:  # rows that see no key have LSE = −inf and no gradient
        loss = loss + torch.where(torch.isfinite(lse), lse * grad_lse, 0).sum()
    expected = torch.autograd.grad(loss, (qr, kr, vr))
    plan = plan_backward(SMEM_OPTIN_SM90, sm90_bwd, Dqk, Dv, bias is not None, SMEM_OPTIN_SM90)
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
            plan,
            None if grad_lse is None else grad_lse.numpy(),
        )
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert not np.isnan(g).any(), f"{name}: unwritten element"
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
    return plan, lse


# ---- tests -----------------------------------------------------------------------------------


def test_traits_fit_hopper_shared_memory():
    for kd in (64, 128):
        for key_major in (False, True):
            for has_bias in (False, True):
                tr = sm90_traits(kd, key_major, has_bias)
                assert tr["kSmemBytes"] <= SMEM_OPTIN_SM90
                assert tr["kOwnBytes"] % 1024 == 0 and tr["kTileBytes"] % 1024 == 0
                assert tr["kBM"] * tr["kBN"] % tr["kThreads"] == 0  # stage_bias's loop
        for has_bias in (False, True):  # bwd_sm90_smem_bytes: the dK/dV launch is the larger
            assert sm90_traits(kd, True, has_bias)["kSmemBytes"] >= sm90_traits(kd, False, has_bias)["kSmemBytes"]


def test_plan_takes_sm90_at_its_head_dims():
    for d in range(8, 257, 8):
        for dv in range(8, 257, 24):
            for has_bias in (False, True):
                kernel, kd = plan_backward(SMEM_OPTIN_SM90, True, d, dv, has_bias, SMEM_OPTIN_SM90)
                assert (kernel == "aten") == (max(d, dv) > 128)
                assert (kernel == "sm_90a") == (kd in (64, 128))
                assert plan_backward(SMEM_OPTIN_SM90, False, d, dv, has_bias, SMEM_OPTIN_SM90)[0] != "sm_90a"
                assert plan_backward(0, True, d, dv, has_bias, SMEM_OPTIN_SM80)[0] != "sm_90a"
    assert plan_backward(SMEM_OPTIN_SM90, True, 40, 24, False, SMEM_OPTIN_SM90) == ("sm_90a", 64)
    assert plan_backward(SMEM_OPTIN_SM90, True, 104, 32, True, SMEM_OPTIN_SM90) == ("sm_90a", 128)
    assert plan_backward(SMEM_OPTIN_SM90, True, 96, 96, False, SMEM_OPTIN_SM90) == ("sm_80", 96)
    assert plan_backward(SMEM_OPTIN_SM90, False, 64, 64, True, SMEM_OPTIN_SM90) == ("sm_80", 64)


# (B, H, Hkv, Nq, Nk, Dqk, Dv, causal), bias kind
CASES = [
    ((1, 2, 1, 150, 70, 64, 64, True), None),  # GQA, causal Nq > Nk: dead rows; query tiles 128 + 22
    ((1, 3, 3, 40, 90, 40, 24, False), "broadcast"),  # padded dims 40 / 24 -> 64, stride-0 bias with a −inf row
    ((1, 2, 2, 70, 260, 104, 120, True), None),  # kd 128, causal Nq < Nk: key tiles 128, 128, 4; skipped query tiles
    (
        (2, 1, 1, 130, 129, 128, 128, True),
        "full",
    ),  # B = 2, kd 128: the key block at 128 starts inside the second query tile
    ((1, 3, 1, 17, 200, 64, 48, False), "head"),  # G = 3: three heads' query tiles into one kv head's dK, dV
]


@pytest.mark.parametrize(
    "case,bias_kind", CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c)
)
def test_sm90_backward_index_model_matches_autograd(case, bias_kind):
    # The unbiased cases also carry an LSE gradient (case 0 with dead rows).
    plan, lse = check_against_autograd(case, seed=0, bias_kind=bias_kind, lse_gradient=bias_kind is None)
    assert plan[0] == "sm_90a"
    if (case[7] and case[3] > case[4]) or bias_kind == "broadcast":
        assert torch.isneginf(lse).any()  # the case exercises a dead row


@pytest.mark.parametrize("seed", range(4))
def test_sm90_backward_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    Hkv = int(rng.integers(1, 3))
    d = 8 * int(rng.choice([rng.integers(5, 9), rng.integers(13, 17)]))  # pads to 64 or to 128
    case = (
        1,
        Hkv * int(rng.integers(1, 3)),
        Hkv,
        int(rng.integers(1, 300)),
        int(rng.integers(1, 300)),
        d,
        d,
        bool(rng.integers(2)),
    )
    plan, _ = check_against_autograd(case, seed=10 + seed, bias_kind=[None, "full"][seed % 2], lse_gradient=seed >= 2)
    assert plan[0] == "sm_90a"
