"""Index-math check of the CUDA attention forward (csrc/cuda/attention_fwd_kernel.cuh) without a GPU.

A line-by-line float64 transcription of the forward / forward-JVP kernel with decoupled padded
head dims (kDqk for Q/K, kDv for one V/O slice) and of the host side that picks them
(forward_impl / fwd_padded_head_dims / launch_fwd_dispatch in attention_cuda.cu and
attention_fwd_launch.cuh): FwdTraits (BN, smem row lengths, one flat shared-memory buffer with the
Q, Q̇ tiles and the 2-stage K, V, K̇, V̇ ring at the kernel's offsets), the tile loader's thread
mapping, the ldmatrix / ldmatrix.trans row addresses (each 8-row phase checked for distinct 16-B
bank groups), the mma.m16n8k16 fragments (PTX ISA tables, as the kernel header states them), the
S → P register reuse, masks, the base-2 online softmax with its quad shuffles, the epilogue and the
128-column V slicing, against fastcm.reference.attention in float64.

It checks the layout and indexing reasoning, not the hardware: PTX semantics modelled wrongly,
races, cp.async ordering, bf16/fp16 rounding and the compiler stay for tests/test_attention_cuda.py.
Keep it in step with the kernel when the kernel changes.
"""

import math

import numpy as np
import pytest
from fwd_steps import (
    assert_matches_reference,
    case_inputs,
    fwd_block,
    online_softmax,
    reference_outputs,
    rescale_accumulators,
    scores_to_log2,
    write_outputs,
)
from ptx_model import ELEM, G_, LANE, LOG2E, Tensor, contiguous, ldmatrix_x4, load_tile, mma16816, pack_a, zeros_frags
from ptx_model import stage_bias as stage_bias_tile

SMEM_OPTIN = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


# ---- traits and dispatch (FwdTraits, launch_fwd_dispatch, fwd_padded_head_dims) ----------------

INSTANTIATED = [(32, 32), (64, 64), (96, 96), (128, 128), (192, 64), (192, 128), (256, 64), (256, 128)]


def fwd_traits(kdqk, kdv, jvp):
    bn = (16 if jvp else 32) if kdqk > 128 else (32 if (jvp and kdv > 64) else 64)
    sqk, sv = kdqk + 8, kdv + 8
    qe, ke, ve = 64 * sqk, bn * sqk, bn * sv
    stage = (2 if jvp else 1) * (ke + ve)
    elems = (2 if jvp else 1) * qe + 2 * stage
    return dict(
        kDqk=kdqk,
        kDv=kdv,
        jvp=jvp,
        kBM=64,
        kBN=bn,
        kSqk=sqk,
        kSv=sv,
        kQElems=qe,
        kKElems=ke,
        kVElems=ve,
        kOffV=ke,
        kOffKt=ke + ve,
        kOffVt=2 * ke + ve,
        kStageElems=stage,
        kSmemElems=elems,
        kThreads=128,
        kNTileS=bn // 8,
        kNTileO=kdv // 8,
    )


def bias_smem_bytes(tr, has_bias, has_bias_t):
    return ((1 if has_bias else 0) + (1 if (tr["jvp"] and has_bias_t) else 0)) * tr["kBM"] * tr["kBN"] * 4


def padded_head_dim(d):
    return next(x for x in (32, 64, 96, 128) if d <= x)


def fwd_padded_head_dims(dqk8, dv_cols):
    if dqk8 <= 128:
        kd = padded_head_dim(max(dqk8, dv_cols))
        return kd, kd
    return (192 if dqk8 <= 192 else 256), (64 if dv_cols <= 64 else 128)


# ---- kernel helpers --------------------------------------------------------------------------


def stage_bias(tr, p, bias, base, m0, n0, mult):
    return stage_bias_tile(tr["kBM"], tr["kBN"], p, bias, base, m0, n0, mult)


# ---- the kernel ------------------------------------------------------------------------------


def fwd_kernel(p, tr, block):
    threads = tr["kThreads"]
    kBM, kBN, kDqk, kDv, kSqk, kSv = tr["kBM"], tr["kBN"], tr["kDqk"], tr["kDv"], tr["kSqk"], tr["kSv"]
    jvp = tr["jvp"]
    smem = np.full(tr["kSmemElems"], np.nan)  # stale shared memory is NaN
    sQ, sQt, sKV = 0, tr["kQElems"], (2 if jvp else 1) * tr["kQElems"]

    bh, b, h, m0, off, n_tiles, (gQ, gK, gV, gQt, gKt, gVt) = fwd_block(p, kBM, kBN, block)
    q, k, v, qt, kt, vt = (p[x] for x in ("q", "k", "v", "q_t", "k_t", "v_t"))

    def load_kv(stage, tile):
        base = sKV + stage * tr["kStageElems"]
        n0 = tile * kBN
        rows = p["Nk"] - n0
        load_tile(
            threads, smem, base, base + tr["kOffV"], k.s, gK + n0 * k.st[2], k.st[2], kBN, rows, p["d_qk"], kDqk, kSqk
        )
        load_tile(
            threads,
            smem,
            base + tr["kOffV"],
            base + tr["kOffV"] + tr["kVElems"],
            v.s,
            gV + n0 * v.st[2],
            v.st[2],
            kBN,
            rows,
            p["d_v"],
            kDv,
            kSv,
        )
        if jvp:
            load_tile(
                threads,
                smem,
                base + tr["kOffKt"],
                base + tr["kOffVt"],
                kt.s,
                gKt + n0 * kt.st[2],
                kt.st[2],
                kBN,
                rows,
                p["d_qk"],
                kDqk,
                kSqk,
            )
            load_tile(
                threads,
                smem,
                base + tr["kOffVt"],
                base + tr["kStageElems"],
                vt.s,
                gVt + n0 * vt.st[2],
                vt.st[2],
                kBN,
                rows,
                p["d_v"],
                kDv,
                kSv,
            )

    load_tile(
        threads, smem, sQ, sQ + tr["kQElems"], q.s, gQ + m0 * q.st[2], q.st[2], kBM, p["Nq"] - m0, p["d_qk"], kDqk, kSqk
    )
    if jvp:
        load_tile(
            threads,
            smem,
            sQt,
            sQt + tr["kQElems"],
            qt.s,
            gQt + m0 * qt.st[2],
            qt.st[2],
            kBM,
            p["Nq"] - m0,
            p["d_qk"],
            kDqk,
            kSqk,
        )
    if n_tiles > 0:
        load_kv(0, 0)

    warps = []
    for warp in range(4):
        warps.append(
            dict(
                row_in_cta=16 * warp + G_,
                acc_o=zeros_frags(tr["kNTileO"]),
                acc_t=zeros_frags(tr["kNTileO"]),
                row_max=[np.full(32, -math.inf)] * 2,
                row_sum=[np.zeros(32)] * 2,
                row_r=[np.zeros(32)] * 2,
            )
        )
    has_bias, has_bias_t = p["bias"] is not None, jvp and p["bias_t"] is not None
    bias_base = b * p["bias"].st[0] + h * p["bias"].st[1] if has_bias else 0
    bias_t_base = b * p["bias_t"].st[0] + h * p["bias_t"].st[1] if has_bias_t else 0

    for tile in range(n_tiles):
        stage = tile & 1
        if tile + 1 < n_tiles:
            load_kv(stage ^ 1, tile + 1)
        sBias = stage_bias(tr, p, p["bias"], bias_base, m0, tile * kBN, LOG2E) if has_bias else None
        sBiasT = stage_bias(tr, p, p["bias_t"], bias_t_base, m0, tile * kBN, 1.0) if has_bias_t else None
        sK = sKV + stage * tr["kStageElems"]
        sV, sKt, sVt = sK + tr["kOffV"], sK + tr["kOffKt"], sK + tr["kOffVt"]
        n0 = tile * kBN
        for warp, w in enumerate(warps):
            s, sd = zeros_frags(tr["kNTileS"]), zeros_frags(tr["kNTileS"])
            for ks in range(kDqk // 16):
                a_off = (16 * warp + LANE % 16) * kSqk + ks * 16 + (LANE // 16) * 8
                qa = ldmatrix_x4(smem, sQ + a_off)
                qta = ldmatrix_x4(smem, sQt + a_off) if jvp else None
                for np_ in range(tr["kNTileS"] // 2):
                    b_off = (np_ * 16 + LANE % 8 + (LANE // 16) * 8) * kSqk + ks * 16 + ((LANE // 8) % 2) * 8
                    kb = ldmatrix_x4(smem, sK + b_off)
                    mma16816(s[2 * np_], qa, kb[:, 0], kb[:, 1])
                    mma16816(s[2 * np_ + 1], qa, kb[:, 2], kb[:, 3])
                    if jvp:
                        ktb = ldmatrix_x4(smem, sKt + b_off)
                        mma16816(sd[2 * np_], qta, kb[:, 0], kb[:, 1])
                        mma16816(sd[2 * np_ + 1], qta, kb[:, 2], kb[:, 3])
                        mma16816(sd[2 * np_], qa, ktb[:, 0], ktb[:, 1])
                        mma16816(sd[2 * np_ + 1], qa, ktb[:, 2], ktb[:, 3])

            need_mask = (n0 + kBN > p["Nk"]) or (p["causal"] and n0 + kBN - 1 > m0 + off)
            scores_to_log2(s, sd, p, jvp, kBN, sBias, sBiasT, w["row_in_cta"], m0, n0, off, need_mask)
            rescale_accumulators(w, online_softmax(s, sd, jvp, w))

            for kk in range(kBN // 16):
                pa = pack_a(s, kk)
                ha = pack_a(sd, kk) if jvp else None
                for dp in range(kDv // 16):
                    v_off = (kk * 16 + LANE % 8 + ((LANE // 8) % 2) * 8) * kSv + dp * 16 + (LANE // 16) * 8
                    vb = ldmatrix_x4(smem, sV + v_off, trans=True)
                    mma16816(w["acc_o"][2 * dp], pa, vb[:, 0], vb[:, 1])
                    mma16816(w["acc_o"][2 * dp + 1], pa, vb[:, 2], vb[:, 3])
                    if jvp:
                        vtb = ldmatrix_x4(smem, sVt + v_off, trans=True)
                        mma16816(w["acc_t"][2 * dp], pa, vtb[:, 0], vtb[:, 1])
                        mma16816(w["acc_t"][2 * dp + 1], pa, vtb[:, 2], vtb[:, 3])
                        mma16816(w["acc_t"][2 * dp], ha, vb[:, 0], vb[:, 1])
                        mma16816(w["acc_t"][2 * dp + 1], ha, vb[:, 2], vb[:, 3])

    for w in warps:
        write_outputs(p, w, jvp, m0, bh, b, h)


def forward_model(q, k, v, qt, kt, vt, bias, bias_t, scale, causal, launches=None):
    """forward_impl on float64 numpy data: padding to multiples of 8, the V slicing, dispatch."""
    jvp = qt is not None
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Dqk > 256:
        raise ValueError(f"q.size(-1) (the q/k head dim D_qk) is {Dqk}; the CUDA kernel supports D_qk up to 256")
    d8 = lambda d: (d + 7) // 8 * 8  # noqa: E731
    pad = lambda a, d: np.pad(a, [(0, 0)] * 3 + [(0, d8(d) - d)])  # noqa: E731
    p = dict(
        B=B,
        H=H,
        Hkv=Hkv,
        Nq=Nq,
        Nk=Nk,
        d_qk=d8(Dqk),
        scale=scale,
        scale_log2=scale * LOG2E,
        causal=bool(causal),
        num_m_blocks=(Nq + 63) // 64,
        q=contiguous(pad(q, Dqk)),
        k=contiguous(pad(k, Dqk)),
        v=contiguous(pad(v, Dv)),
        q_t=contiguous(pad(qt, Dqk)) if jvp else None,
        k_t=contiguous(pad(kt, Dqk)) if jvp else None,
        v_t=contiguous(pad(vt, Dv)) if jvp else None,
        bias=None if bias is None else Tensor(*bias),
        bias_t=None if bias_t is None else Tensor(*bias_t),
        lse=np.full(B * H * Nq, np.nan),
        lse_t=np.full(B * H * Nq, np.nan),
    )
    # NaN-poisoned outputs: an element no launch writes fails the comparison.
    p["out"] = contiguous(np.full((B, H, Nq, d8(Dv)), np.nan))
    p["out_t"] = contiguous(np.full((B, H, Nq, d8(Dv)), np.nan)) if jvp else None
    v_full, vt_full, o_full, ot_full = p["v"], p["v_t"], p["out"], p["out_t"]
    for c0 in range(0, d8(Dv), 128):
        cols = min(128, d8(Dv) - c0)
        p["d_v"] = cols
        p["v"] = Tensor(v_full.s, v_full.st, c0)
        p["out"] = Tensor(o_full.s, o_full.st, c0)
        if jvp:
            p["v_t"] = Tensor(vt_full.s, vt_full.st, c0)
            p["out_t"] = Tensor(ot_full.s, ot_full.st, c0)
        kdqk, kdv = fwd_padded_head_dims(p["d_qk"], cols)
        assert (kdqk, kdv) in INSTANTIATED, "launch_fwd_dispatch has no kernel for this pair"
        assert p["d_qk"] <= kdqk and cols <= kdv
        tr = fwd_traits(kdqk, kdv, jvp)
        if launches is not None:
            launches.append((kdqk, kdv, tr["kBN"]))
        for blk in range(p["num_m_blocks"] * B * H):
            fwd_kernel(p, tr, blk)
    out = o_full.s.reshape(B, H, Nq, -1)[..., :Dv]
    out_t = ot_full.s.reshape(B, H, Nq, -1)[..., :Dv] if jvp else None
    return out, out_t, p["lse"].reshape(B, H, Nq), p["lse_t"].reshape(B, H, Nq) if jvp else None


# ---- tests -----------------------------------------------------------------------------------


def test_traits_fit_shared_memory_and_keep_v1_tiles():
    """Every instantiated pair fits sm_80's and sm_90's opt-in shared memory with both bias tiles,
    its tiles are 16-byte aligned, and the v1 pairs keep their v1 BN."""
    v1_bn = {
        (32, False): 64,
        (64, False): 64,
        (96, False): 64,
        (128, False): 64,
        (32, True): 64,
        (64, True): 64,
        (96, True): 32,
        (128, True): 32,
    }
    for kdqk, kdv in INSTANTIATED:
        for jvp in (False, True):
            tr = fwd_traits(kdqk, kdv, jvp)
            total = tr["kSmemElems"] * ELEM + bias_smem_bytes(tr, True, True)
            assert total <= SMEM_OPTIN["sm_80"] <= SMEM_OPTIN["sm_90"], (kdqk, kdv, jvp, total)
            for key in ("kQElems", "kKElems", "kVElems", "kStageElems"):
                assert tr[key] % 8 == 0
            if kdqk == kdv:
                assert tr["kBN"] == v1_bn[(kdqk, jvp)]


def test_dispatch_covers_every_head_dim():
    for dqk8 in range(8, 257, 8):
        for dv in range(8, 513, 8):
            for c0 in range(0, dv, 128):
                cols = min(128, dv - c0)
                kdqk, kdv = fwd_padded_head_dims(dqk8, cols)
                assert (kdqk, kdv) in INSTANTIATED and dqk8 <= kdqk and cols <= kdv


def test_head_dim_limit():
    z = np.zeros((1, 1, 4, 264))
    with pytest.raises(ValueError, match="supports D_qk up to 256"):
        forward_model(z, z, z, None, None, None, None, None, 0.1, False)


# (B, H, Hkv, Nq, Nk, Dqk, Dv, causal, jvp, bias kind)
CASES = [
    (1, 2, 1, 70, 90, 256, 64, True, True, None),  # (256, 64), GQA, causal Nq < Nk, tails
    (1, 2, 2, 45, 33, 256, 128, True, True, "broadcast"),  # (256, 128), causal Nq > Nk: dead rows, -inf bias row
    (1, 3, 1, 20, 70, 256, 200, False, True, "full"),  # D_v = 200: slices 128 + 72 -> (256, 128) twice, G = 3
    (1, 3, 1, 20, 70, 256, 200, True, False, None),  # the same primal-only (BN = 32)
    (1, 1, 1, 17, 40, 184, 96, True, False, "head"),  # D_qk 184 -> 192, D_v 96 -> 128, primal
    (1, 2, 2, 33, 47, 160, 40, True, True, None),  # D_qk 160 -> 192, D_v 40 -> 64, JVP
    (1, 2, 2, 65, 130, 40, 24, False, True, "broadcast"),  # a v1 pair (64, 64), for comparison
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_index_model_matches_reference(case):
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal, jvp, bias_kind = case
    tensors, bias, bias_t, bias_m, bias_t_m = case_inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, jvp, bias_kind, seed=0)
    q, k, v, qt, kt, vt = (t.numpy() for t in tensors)
    scale = 0.8 * Dqk**-0.5
    launches = []
    with np.errstate(invalid="raise", over="raise", divide="raise"):
        got = forward_model(
            q,
            k,
            v,
            qt if jvp else None,
            kt if jvp else None,
            vt if jvp else None,
            bias_m,
            bias_t_m,
            scale,
            causal,
            launches,
        )
    names, expected = reference_outputs(tensors, bias, bias_t, scale, causal, jvp)
    if not jvp:
        got = (got[0], got[2])
    if Dqk > 128:
        assert all(kdqk in (192, 256) for kdqk, _, _ in launches)
    assert len(launches) == (Dv + 127) // 128
    assert_matches_reference(names, got, expected)
