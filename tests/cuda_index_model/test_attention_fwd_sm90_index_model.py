"""Index-math check of the sm_90a (wgmma) attention forward (csrc/cuda/attention_fwd_sm90_kernel.cuh)
without a GPU.

A float64 transcription of the kernel and of the host's kernel choice (plan_forward_launch in
attention_cuda.cu): FwdSm90Traits, the 1024-byte realignment of the dynamic shared-memory base
(modelled at a base that is only 16-byte aligned), the swizzled tile loader's thread map (every
16-byte chunk of a tile written exactly once, inside its tile), the descriptors the kernel builds
(start address, LBO, SBO per k-step, warpgroup and stage), S/Ṡ accumulators that the first wgmma
overwrites (scale_d = 0; they start as NaN), the P/H register fragments and the RS products, with
the shared softmax steps and epilogue (fwd_steps.py), against fastcm.reference.attention in float64.

The hardware side (ptx_model.py: descriptor decoding, the canonical K-major / MN-major 128-byte
swizzle layouts, the warpgroup accumulator and A-fragment layouts) is written from the PTX ISA
apart from the kernel's encoding. What it cannot check: that those PTX readings are right, the
proxy fence and barrier placement, wgmma/cp.async ordering, rounding, the compiler.
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
from ptx_model import (
    G_,
    LANE,
    LOG2E,
    SharedMemory,
    Tensor,
    TensorMap,
    contiguous,
    desc_sw128,
    ldmatrix_x4,
    pack_a,
    stage_bias,
    tma_load,
    wgmma_rs,
    wgmma_ss,
)
from test_attention_fwd_index_model import bias_smem_bytes, fwd_kernel, fwd_padded_head_dims, fwd_traits

SMEM_OPTIN_SM90 = 227 * 1024


# ---- traits and the host's choice (FwdSm90Traits, plan_forward_launch) -------------------------


def sm90_traits(kd, jvp):
    bn = 64 if jvp else 128
    qb, kvb = 128 * kd * 2, bn * kd * 2
    stage = (4 if jvp else 2) * kvb
    qtiles = 2 if jvp else 1
    return dict(
        kD=kd,
        jvp=jvp,
        kBM=128,
        kBN=bn,
        kThreads=256,
        kQBytes=qb,
        kKVBytes=kvb,
        kQTiles=qtiles,
        kOffV=kvb,
        kOffKt=2 * kvb,
        kOffVt=3 * kvb,
        kStageBytes=stage,
        kSmemBytes=qtiles * qb + 2 * stage + 1024,
        kNTileS=bn // 8,
        kNTileO=kd // 8,
    )


def sm90_ws_traits(kd, jvp, overlap=False, q_regs=False):
    """FwdSm90WsTraits: the cp.async kernel's tiles, 3 warpgroups, a kStages ring and its mbarriers."""
    assert not q_regs or kd == 64, "Q in registers only at d = 64"
    tr = sm90_traits(kd, jvp)
    tr.update(kOverlap=overlap, kQRegs=q_regs)
    stages = 2 if (kd == 128 and jvp) else 3
    tile_bytes = tr["kQTiles"] * tr["kQBytes"] + stages * tr["kStageBytes"]
    tr.update(
        kThreads=384,
        kConsumerWarps=8,
        kStages=stages,
        kTileBytes=tile_bytes,
        kBarriers=1 + 3 * stages,
        kSmemBytes=tile_bytes + 8 * (1 + 3 * stages) + 1024,
    )
    return tr


def sm90_smem_bytes(kd, jvp, has_bias, has_bias_t):
    tr = sm90_traits(kd, jvp)
    return tr["kSmemBytes"] + bias_smem_bytes(tr, has_bias, has_bias_t)


def sm90_ws_smem_bytes(kd, jvp, has_bias, has_bias_t):
    """fwd_sm90_ws_smem_bytes: with the bias tiles after the mbarriers; -1 where the TMA kernel
    takes no bias (d 128)."""
    tr = sm90_ws_traits(kd, jvp)
    if kd == 128 and (has_bias or (jvp and has_bias_t)):
        return -1
    return tr["kSmemBytes"] + bias_smem_bytes(tr, has_bias, has_bias_t)


def plan_forward_launch(sm90_smem_limit, tma_ok, overlap, q_regs, dqk8, cols, jvp, has_bias, has_bias_t):
    """(kernel name, padded D_qk, padded D_v) of one launch; overlap, q_regs: the switches."""
    kdqk, kdv = fwd_padded_head_dims(dqk8, cols)
    sm90 = kdqk == kdv and kdqk in (64, 128) and sm90_smem_bytes(kdqk, jvp, has_bias, has_bias_t) <= sm90_smem_limit
    ws_smem = sm90_ws_smem_bytes(kdqk, jvp, has_bias, has_bias_t) if sm90 else -1
    panels_hold_data = dqk8 > kdqk - 64 and cols > kdv - 64  # no TMA box wholly outside the tensor
    tma = sm90 and tma_ok and panels_hold_data and 0 <= ws_smem <= sm90_smem_limit
    if not sm90:
        return "sm_80", kdqk, kdv
    if not tma:
        return "sm_90a", kdqk, kdv
    name = "sm_90a_tma_overlap" if overlap and not (kdqk == 128 and jvp) else "sm_90a_tma"
    return name + ("_qregs" if q_regs and kdqk == 64 else ""), kdqk, kdv


def tma_strides_ok(t, sizes):
    """The host's tma_ready: tma_strides_ok of tma.cuh for the (B, heads, rows) strides of a
    kernel-ready tensor, and no empty dimension."""
    return min(sizes) > 0 and all(
        size <= 1 or (0 < stride and stride % 8 == 0 and stride < 2**39) for stride, size in zip(t.st[:3], sizes)
    )


def tma_map_4d(t, B, heads, rows, cols, box_rows):
    """The host's tma_map_4d: a (B, heads, rows, cols) view in boxes of 64 columns × box_rows."""
    sb, sh, sn = t.st[:3]
    if rows <= 1:
        sn = cols
    if heads <= 1:
        sh = sn * rows
    if B <= 1:
        sb = sh * heads
    return TensorMap(t.s, t.base, (cols, rows, heads, B), (2 * sn, 2 * sh, 2 * sb), (64, box_rows, 1, 1))


# ---- the kernel ------------------------------------------------------------------------------


def load_tile_sw128(tr, sm, dst0, rows, src, base, stride, rows_valid, d_valid):
    """The swizzled cp.async loader: one call's 16-byte chunks, each written once, inside its tile."""
    kchunks = tr["kD"] // 8
    kstep = tr["kThreads"] // kchunks
    assert rows % kstep == 0, "tile loader layout"
    written = set()
    for tid in range(tr["kThreads"]):
        c, r0 = tid % kchunks, tid // kchunks
        panel, cc = c // 8, c % 8
        for it in range(rows // kstep):
            r = r0 + it * kstep
            dst = dst0 + panel * (rows * 128) + r * 128 + ((cc ^ (r & 7)) << 4)
            assert dst % 16 == 0 and dst0 <= dst and dst + 16 <= dst0 + rows * tr["kD"] * 2, "chunk outside its tile"
            assert dst not in written, "two chunks of one tile written to the same 16 bytes"
            written.add(dst)
            ok = c * 8 < d_valid and r < rows_valid
            sm.e[sm.index(dst + 2 * np.arange(8))] = src[base + r * stride + c * 8 + np.arange(8)] if ok else 0.0
    assert len(written) == rows * kchunks


def frags(n, fill=0.0):
    return [np.full((32, 4), fill) for _ in range(n)]


def tma_producer(p, tr, sm, sQ, sQt, sKV, block, n_tiles, maps):
    """The producer thread of the warp-specialised kernel, with every load run at once: Q (+ Q̇) on
    q_full, then per tile K (+ K̇) on k_full, V (+ V̇) on v_full of stage tile % kStages. Checks that
    each barrier's announced bytes (arrive.expect_tx) equal the bytes its loads complete."""
    kBM, kBN, jvp = tr["kBM"], tr["kBN"], tr["jvp"]
    _, b, h, m0, _, _, _ = fwd_block(p, kBM, kBN, block)
    hkv = h // (p["H"] // p["Hkv"])
    if n_tiles == 0:
        return
    q_bytes = 0
    for panel in range(tr["kD"] // 64):
        q_bytes += tma_load(sm, sQ + panel * kBM * 128, maps["q"], (64 * panel, m0, h, b))
        if jvp:
            q_bytes += tma_load(sm, sQt + panel * kBM * 128, maps["q_t"], (64 * panel, m0, h, b))
    assert q_bytes == tr["kQTiles"] * tr["kQBytes"], "q_full: expect_tx bytes != bytes loaded"
    for tile in range(n_tiles):
        stage, n0 = sKV + (tile % tr["kStages"]) * tr["kStageBytes"], tile * kBN
        k_bytes = v_bytes = 0
        for panel in range(tr["kD"] // 64):
            k_bytes += tma_load(sm, stage + panel * kBN * 128, maps["k"], (64 * panel, n0, hkv, b))
            if jvp:
                k_bytes += tma_load(sm, stage + tr["kOffKt"] + panel * kBN * 128, maps["k_t"], (64 * panel, n0, hkv, b))
        for panel in range(tr["kD"] // 64):
            v_bytes += tma_load(sm, stage + tr["kOffV"] + panel * kBN * 128, maps["v"], (64 * panel, n0, hkv, b))
            if jvp:
                v_bytes += tma_load(sm, stage + tr["kOffVt"] + panel * kBN * 128, maps["v_t"], (64 * panel, n0, hkv, b))
        expect = (2 if jvp else 1) * tr["kKVBytes"]
        assert k_bytes == expect and v_bytes == expect, "k_full / v_full: expect_tx bytes != bytes loaded"
        yield tile


def sm90_kernel(p, tr, block, smem_raw, maps=None):
    """One CTA of the cp.async kernel, or with tensor maps `maps` (and FwdSm90WsTraits) of the
    warp-specialised one; the consumer math is the same code."""
    kBM, kBN, kD, jvp = tr["kBM"], tr["kBN"], tr["kD"], tr["jvp"]
    sm = SharedMemory(smem_raw, tr["kSmemBytes"])
    smem = smem_raw + ((1024 - (smem_raw & 1023)) & 1023)
    sQ, sQt, sKV = smem, smem + tr["kQBytes"], smem + tr["kQTiles"] * tr["kQBytes"]
    stages = tr.get("kStages", 2)
    assert sKV + stages * tr["kStageBytes"] <= smem_raw + tr["kSmemBytes"], "tiles past the allocation"
    if maps is not None:
        bars = smem + tr["kTileBytes"]
        assert bars == sKV + stages * tr["kStageBytes"] and bars % 8 == 0, "mbarriers 8-byte aligned after the ring"
        assert bars + 8 * tr["kBarriers"] <= smem_raw + tr["kSmemBytes"], "mbarriers past the allocation"

    bh, b, h, m0, off, n_tiles, (gQ, gK, gV, gQt, gKt, gVt) = fwd_block(p, kBM, kBN, block)
    q, k, v, qt, kt, vt = (p[x] for x in ("q", "k", "v", "q_t", "k_t", "v_t"))
    producer = tma_producer(p, tr, sm, sQ, sQt, sKV, block, n_tiles, maps) if maps is not None else None

    def load_kv(stage, tile):
        base, n0 = sKV + stage * tr["kStageBytes"], tile * kBN
        rows = p["Nk"] - n0
        load_tile_sw128(tr, sm, base, kBN, k.s, gK + n0 * k.st[2], k.st[2], rows, p["d_qk"])
        load_tile_sw128(tr, sm, base + tr["kOffV"], kBN, v.s, gV + n0 * v.st[2], v.st[2], rows, p["d_v"])
        if jvp:
            load_tile_sw128(tr, sm, base + tr["kOffKt"], kBN, kt.s, gKt + n0 * kt.st[2], kt.st[2], rows, p["d_qk"])
            load_tile_sw128(tr, sm, base + tr["kOffVt"], kBN, vt.s, gVt + n0 * vt.st[2], vt.st[2], rows, p["d_v"])

    if producer is None:
        load_tile_sw128(tr, sm, sQ, kBM, q.s, gQ + m0 * q.st[2], q.st[2], p["Nq"] - m0, p["d_qk"])
        if jvp:
            load_tile_sw128(tr, sm, sQt, kBM, qt.s, gQt + m0 * qt.st[2], qt.st[2], p["Nq"] - m0, p["d_qk"])
        if n_tiles > 0:
            load_kv(0, 0)

    has_bias, has_bias_t = p["bias"] is not None, jvp and p["bias_t"] is not None
    bias_base = b * p["bias"].st[0] + h * p["bias"].st[1] if has_bias else 0
    bias_t_base = b * p["bias_t"].st[0] + h * p["bias_t"].st[1] if has_bias_t else 0
    warps = [
        dict(
            row_in_cta=16 * warp + G_,
            acc_o=frags(tr["kNTileO"]),
            acc_t=frags(tr["kNTileO"]),
            row_max=[np.full(32, -math.inf)] * 2,
            row_sum=[np.zeros(32)] * 2,
            row_r=[np.zeros(32)] * 2,
        )
        for warp in range(8)
    ]

    def k_step(ks, rows):
        return (ks // 4) * rows * 128 + (ks % 4) * 32

    def load_a_fragments(a_base, warp_in_wg):
        """load_a_fragments<kBM>: one ldmatrix.x4 per k-step from the swizzled tile."""
        row = 16 * warp_in_wg + LANE % 8 + 8 * ((LANE // 8) % 2)
        frags_ = []
        for ks in range(kD // 16):
            chunk = 2 * (ks % 4) + LANE // 16
            addr = a_base + (ks // 4) * kBM * 128 + row * 128 + ((chunk ^ (row % 8)) * 16)
            frags_.append(ldmatrix_x4(sm.e, sm.index(addr)))
        return frags_

    def s_chain(d, a_base, a_frags, b_base, ks, scale_d):
        """One k-step of an S chain (s_chain_k_step): SS from a_base, or RS from this warpgroup's
        fragments a_frags[warp][ks]; B = K or K̇ K-major."""
        desc_b = desc_sw128(b_base + k_step(ks, kBN), 16, 1024)
        if a_frags is None:
            wgmma_ss(sm, d, desc_sw128(a_base + k_step(ks, kBM), 16, 1024), desc_b, scale_d)
        else:
            wgmma_rs(sm, d, [a_frags[w][ks] for w in range(4)], desc_b, b_mn_major=False, scale_d=scale_d)

    def pv_chain(ws, pa, ha, v_base, vt_base):
        """A += P·V, T += P·V̇ + H·V of one warpgroup (issue_pv_chain)."""
        acc_o, acc_t = [w["acc_o"] for w in ws], [w["acc_t"] for w in ws]
        for kk in range(kBN // 16):
            dv = desc_sw128(v_base + kk * 2048, kBN * 128, 1024)
            wgmma_rs(sm, acc_o, [pa[w][kk] for w in range(4)], dv)
            if jvp:
                wgmma_rs(sm, acc_t, [pa[w][kk] for w in range(4)], desc_sw128(vt_base + kk * 2048, kBN * 128, 1024))
                wgmma_rs(sm, acc_t, [ha[w][kk] for w in range(4)], dv)

    overlap = tr.get("kOverlap", False)
    pending = [None, None]  # per warpgroup: P, H fragments, V stage and α of a P·V chain not yet issued
    q_frags = [None, None]  # kQRegs: per warpgroup, [Q fragments, Q̇ fragments] of its 4 warps

    for tile in range(n_tiles):
        if producer is None:
            stage = tile & 1
            if tile + 1 < n_tiles:
                load_kv(stage ^ 1, tile + 1)
        else:
            stage = tile % stages
            assert next(producer) == tile  # the tile's K and V have landed (k_full, v_full of its phase)
        if producer is None:  # all 256 threads stage the CTA's tile between the tile barriers
            sBias = stage_bias(kBM, kBN, p, p["bias"], bias_base, m0, tile * kBN, LOG2E) if has_bias else None
            sBiasT = stage_bias(kBM, kBN, p, p["bias_t"], bias_t_base, m0, tile * kBN, 1.0) if has_bias_t else None
        else:  # each warpgroup stages its own rows (below); unstaged rows read as NaN
            assert kD == 64 or not (has_bias or has_bias_t), "the TMA kernel takes bias tiles only at d 64"
            sBias = np.full(kBM * kBN, np.nan) if has_bias else None
            sBiasT = np.full(kBM * kBN, np.nan) if has_bias_t else None
        k_base = sKV + stage * tr["kStageBytes"]
        v_base, kt_base, vt_base = k_base + tr["kOffV"], k_base + tr["kOffKt"], k_base + tr["kOffVt"]
        n0 = tile * kBN
        for wg in range(2):
            ws = warps[4 * wg : 4 * wg + 4]
            q_base, qt_base = sQ + wg * 64 * 128, sQt + wg * 64 * 128
            if producer is not None:  # stage_bias_rows: rows 64·wg.. of the tile, from query m0 + 64·wg
                rows = slice(64 * wg * kBN, (64 * wg + 64) * kBN)
                if has_bias:
                    sBias[rows] = stage_bias(64, kBN, p, p["bias"], bias_base, m0 + 64 * wg, n0, LOG2E)
                if has_bias_t:
                    sBiasT[rows] = stage_bias(64, kBN, p, p["bias_t"], bias_t_base, m0 + 64 * wg, n0, 1.0)
            s = [frags(tr["kNTileS"], np.nan) for _ in range(4)]  # uninitialised: scale_d = 0 overwrites
            sd = [frags(tr["kNTileS"], np.nan) for _ in range(4)]
            qa = qta = None
            if tr.get("kQRegs"):
                if q_frags[wg] is None:  # once Q (and Q̇) have landed
                    q_frags[wg] = (
                        [load_a_fragments(q_base, w) for w in range(4)],
                        [load_a_fragments(qt_base, w) for w in range(4)] if jvp else None,
                    )
                qa, qta = q_frags[wg]
            for ks in range(kD // 16):
                s_chain(s, q_base, qa, k_base, ks, ks > 0)
            if jvp:
                for ks in range(kD // 16):
                    s_chain(sd, qt_base, qta, k_base, ks, ks > 0)
                for ks in range(kD // 16):
                    s_chain(sd, q_base, qa, kt_base, ks, 1)
            if overlap and pending[wg] is not None:
                # tile - 1's P·V, issued after this tile's S chain, on A, T rescaled by tile - 1's α
                *chain, alphas = pending[wg]
                for w, alpha in zip(ws, alphas):
                    rescale_accumulators(w, alpha)
                pv_chain(ws, *chain)
            need_mask = (n0 + kBN > p["Nk"]) or (p["causal"] and n0 + kBN - 1 > m0 + off)
            alphas = []
            for w, sw, sdw in zip(ws, s, sd):
                scores_to_log2(sw, sdw, p, jvp, kBN, sBias, sBiasT, w["row_in_cta"], m0, n0, off, need_mask)
                alphas.append(online_softmax(sw, sdw, jvp, w))
            pa = [[pack_a(sw, kk) for kk in range(kBN // 16)] for sw in s]
            ha = [[pack_a(sdw, kk) for kk in range(kBN // 16)] for sdw in sd] if jvp else None
            pending[wg] = (pa, ha, v_base, vt_base, alphas)
            if not overlap:
                for w, alpha in zip(ws, alphas):
                    rescale_accumulators(w, alpha)
                pv_chain(ws, pa, ha, v_base, vt_base)
                pending[wg] = None
    for wg in range(2):
        if pending[wg] is not None:
            *chain, alphas = pending[wg]
            for w, alpha in zip(warps[4 * wg : 4 * wg + 4], alphas):
                rescale_accumulators(w, alpha)
            pv_chain(warps[4 * wg : 4 * wg + 4], *chain)
    for w in warps:
        write_outputs(p, w, jvp, m0, bh, b, h)


def strided(a, layout):
    """a (B, H, N, D) as a kernel-ready Tensor: stored as is ("bhnd") or as (B, N, H, D) ("bnhd")."""
    if layout == "bhnd":
        return contiguous(a)
    B, H, N, D = a.shape
    return Tensor(np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(-1), [N * H * D, D, H * D, 1])


def forward_model(
    q,
    k,
    v,
    qt,
    kt,
    vt,
    bias,
    bias_t,
    scale,
    causal,
    sm90_smem_limit,
    launches,
    smem_raw=0x410,
    tma_enabled=True,
    overlap=True,
    q_regs=True,
    layout="bhnd",
):
    """forward_impl on float64 numpy data with the sm_90 choice: padding to multiples of 8, the
    128-column V slices, each launched on the kernel plan_forward_launch picks. bias, bias_t:
    (storage, strides) of (B, H, Nq, Nk) views, or None. layout: how q, k, v (and tangents) are
    stored (strided)."""
    jvp = qt is not None
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    d8 = lambda d: (d + 7) // 8 * 8  # noqa: E731
    pad = lambda a, d: np.pad(a, [(0, 0)] * 3 + [(0, d8(d) - d)])  # noqa: E731
    t = lambda a, d: strided(pad(a, d), layout) if a is not None else None  # noqa: E731
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
        q=t(q, Dqk),
        k=t(k, Dqk),
        v=t(v, Dv),
        q_t=t(qt, Dqk),
        k_t=t(kt, Dqk),
        v_t=t(vt, Dv),
        bias=None if bias is None else Tensor(*bias),
        bias_t=None if bias_t is None else Tensor(*bias_t),
        lse=np.full(B * H * Nq, np.nan),
        lse_t=np.full(B * H * Nq, np.nan),
        out=contiguous(np.full((B, H, Nq, d8(Dv)), np.nan)),
        out_t=contiguous(np.full((B, H, Nq, d8(Dv)), np.nan)) if jvp else None,
    )
    inputs = [(p[n], (B, H, Nq)) for n in ("q", "q_t")] + [(p[n], (B, Hkv, Nk)) for n in ("k", "v", "k_t", "v_t")]
    tma_ok = tma_enabled and all(tma_strides_ok(x, sizes) for x, sizes in inputs if x is not None)
    v_full, vt_full, o_full, ot_full = p["v"], p["v_t"], p["out"], p["out_t"]
    for c0 in range(0, d8(Dv), 128):
        cols = min(128, d8(Dv) - c0)
        p["d_v"] = cols
        p["v"], p["out"] = Tensor(v_full.s, v_full.st, c0), Tensor(o_full.s, o_full.st, c0)
        if jvp:
            p["v_t"], p["out_t"] = Tensor(vt_full.s, vt_full.st, c0), Tensor(ot_full.s, ot_full.st, c0)
        kernel, kdqk, kdv = plan_forward_launch(
            sm90_smem_limit, tma_ok, overlap, q_regs, p["d_qk"], cols, jvp, bias is not None, jvp and bias_t is not None
        )
        launches.append((kernel, kdqk, kdv))
        if kernel == "sm_80":
            tr = fwd_traits(kdqk, kdv, jvp)
        elif kernel == "sm_90a":
            tr = sm90_traits(kdqk, jvp)
        else:
            tr = sm90_ws_traits(kdqk, jvp, overlap="_overlap" in kernel, q_regs=kernel.endswith("_qregs"))
        maps = None
        if kernel.startswith("sm_90a_tma"):  # launch_fwd_sm90_ws: the maps of this launch (V slice: its columns)
            maps = {
                n: tma_map_4d(p[n], B, heads, rows, cols_, box)
                for n, heads, rows, cols_, box in (
                    ("q", H, Nq, p["d_qk"], tr["kBM"]),
                    ("k", Hkv, Nk, p["d_qk"], tr["kBN"]),
                    ("v", Hkv, Nk, cols, tr["kBN"]),
                    ("q_t", H, Nq, p["d_qk"], tr["kBM"]),
                    ("k_t", Hkv, Nk, p["d_qk"], tr["kBN"]),
                    ("v_t", Hkv, Nk, cols, tr["kBN"]),
                )
                if p[n] is not None
            }
        p["num_m_blocks"] = (Nq + tr["kBM"] - 1) // tr["kBM"]
        for blk in range(p["num_m_blocks"] * B * H):
            if kernel == "sm_80":
                fwd_kernel(p, tr, blk)
            else:
                sm90_kernel(p, tr, blk, smem_raw, maps)
    out = o_full.s.reshape(B, H, Nq, -1)[..., :Dv]
    out_t = ot_full.s.reshape(B, H, Nq, -1)[..., :Dv] if jvp else None
    return out, out_t, p["lse"].reshape(B, H, Nq), p["lse_t"].reshape(B, H, Nq) if jvp else None


# ---- tests -----------------------------------------------------------------------------------


def test_traits_fit_hopper_shared_memory():
    for kd in (64, 128):
        for jvp in (False, True):
            for tr in (sm90_traits(kd, jvp), sm90_ws_traits(kd, jvp)):
                assert tr["kSmemBytes"] <= SMEM_OPTIN_SM90, (kd, jvp, tr["kSmemBytes"])
                assert tr["kQBytes"] % 1024 == 0 and tr["kKVBytes"] % 1024 == 0
                # Accumulators per thread (A, T: kD/2; S, Ṡ: BN/2) leave room under the 240 registers
                # a consumer thread of the TMA kernel gets.
                assert (2 if jvp else 1) * (kd + tr["kBN"]) // 2 <= 192
    # setmaxnreg: 128 producer threads at 24 + 256 consumer threads at 240 within the register file.
    assert 128 * 24 + 256 * 240 <= 65536 and 384 * 168 <= 65536


def test_plan_takes_sm90_only_for_its_head_dims():
    for dqk8 in range(8, 257, 8):
        for cols in range(8, 129, 8):
            for jvp, has_bias, has_bias_t in [(j, b, t) for j in (0, 1) for b in (0, 1) for t in (0, 1)]:
                for tma_ok, overlap, q_regs in (
                    (False, True, True),
                    (True, False, True),
                    (True, True, True),
                    (True, True, False),
                ):
                    args = (tma_ok, overlap, q_regs, dqk8, cols, jvp, has_bias, has_bias_t)
                    kernel, kdqk, kdv = plan_forward_launch(SMEM_OPTIN_SM90, *args)
                    if kernel != "sm_80":
                        assert kdqk == kdv and kdqk in (64, 128) and dqk8 <= kdqk and cols <= kdv
                        assert sm90_smem_bytes(kdqk, jvp, has_bias, has_bias_t) <= SMEM_OPTIN_SM90
                    # The TMA kernel: with bias tiles only at d 64 (next to the d 128 ring they do not fit).
                    # ... and where each 64-column panel of Q/K and of V holds data.
                    tma = (
                        kernel != "sm_80"
                        and tma_ok
                        and (kdqk == 64 or not (has_bias or (jvp and has_bias_t)))
                        and min(dqk8, cols) > kdqk - 64
                    )
                    assert kernel.startswith("sm_90a_tma") == tma
                    assert kernel.startswith("sm_90a_tma_overlap") == (tma and overlap and not (kdqk == 128 and jvp))
                    assert kernel.endswith("_qregs") == (tma and q_regs and kdqk == 64)
                    assert plan_forward_launch(0, *args)[0] == "sm_80"
    plan = lambda *a: plan_forward_launch(SMEM_OPTIN_SM90, True, True, True, *a)[0]  # noqa: E731
    assert plan(128, 104, True, True, False) == "sm_90a"  # 225 KB: fits
    assert plan(128, 128, True, True, True) == "sm_80"  # 257 KB
    assert plan(64, 64, True, True, True) == "sm_90a_tma_overlap_qregs"  # bias tiles staged per warpgroup
    assert plan(128, 128, False, True, False) == "sm_90a"
    assert plan(128, 128, True, False, False) == "sm_90a_tma"  # S, Ṡ and P, H of two tiles: too many registers
    assert plan(128, 128, False, False, False) == "sm_90a_tma_overlap"
    assert plan(64, 64, True, False, False) == "sm_90a_tma_overlap_qregs"
    assert plan(40, 24, False, False, False) == "sm_90a_tma_overlap_qregs"
    assert plan(64, 128, False, False, False) == "sm_90a"  # Q/K's second 64-column panel: no data
    assert plan(128, 64, True, False, False) == "sm_90a"  # V's
    assert plan(72, 104, True, False, False) == "sm_90a_tma"  # a partial second panel: TMA zero-fills it


# (B, H, Hkv, Nq, Nk, Dqk, Dv, causal, jvp, bias kind)
CASES = [
    (1, 2, 1, 150, 200, 64, 64, True, True, None),  # d 64 JVP: GQA, causal Nq < Nk, 2 query tiles, key tail
    (2, 1, 1, 140, 70, 128, 128, True, True, None),  # d 128 JVP: causal Nq > Nk (dead rows), B = 2
    (1, 1, 1, 130, 300, 128, 128, False, False, None),  # d 128 primal (BN = 128), key tail 44, query tail 2
    (1, 3, 3, 40, 90, 40, 24, True, False, None),  # D_qk 40, D_v 24 -> padded 64 (zero-filled columns), primal
    (1, 2, 2, 70, 129, 104, 120, False, True, None),  # D_qk 104, D_v 120 -> 128, JVP
    (1, 1, 1, 33, 65, 64, 200, False, True, None),  # D_v 200: slice 128 on sm_90a (cp.async: Q/K's second
    # panel holds no data), slice 72 on sm_80 (96, 96)
    (1, 2, 1, 150, 140, 64, 64, True, True, "broadcast"),  # bias and bias_t tiles, a -inf bias row, +inf bias_t row
    (1, 2, 1, 200, 300, 48, 64, False, False, "head"),  # d 64 primal bias (BN 128), a query tail in WG1's rows
    (1, 2, 2, 70, 200, 128, 128, False, False, "full"),  # d 128 primal with a full bias (225 KB of smem)
    (1, 2, 2, 60, 100, 128, 128, True, True, "head"),  # d 128 JVP with bias and bias_t: too big, sm_80 takes it
]


# The switches of each kernel choice: (tma_enabled, overlap, q_regs); the default is the first.
KERNELS = {
    "tma_overlap": (True, True, True),
    "tma": (True, False, True),
    "tma_smem_q": (True, True, False),
    "cp_async": (False, False, False),
}


def _expected_kernel(case, kernel, kd):
    """The plan's name for the first launch of `case` (padded head dim kd) under `kernel`'s switches."""
    Dqk, Dv, jvp, bias_kind = case[5], case[6], case[8], case[9]
    if jvp and kd > 64 and bias_kind is not None:
        return "sm_80"  # d 128 JVP with bias and bias_t: too big for sm_90a
    empty_panel = min(-(-Dqk // 8), -(-min(Dv, 128) // 8)) * 8 <= kd - 64  # a TMA box with no data
    if (bias_kind is not None and kd == 128) or kernel == "cp_async" or empty_panel:
        return "sm_90a"
    name = "sm_90a_tma_overlap" if kernel != "tma" and not (jvp and kd == 128) else "sm_90a_tma"
    return name + ("_qregs" if kernel != "tma_smem_q" and kd == 64 else "")


# Q from shared memory differs from the default only where Q would be in registers: d 64.
@pytest.mark.parametrize(
    "case,kernel",
    [(c, k) for c in CASES for k in KERNELS if k != "tma_smem_q" or max(c[5], c[6]) <= 64],
    ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)),
)
def test_sm90_forward_index_model_matches_reference(case, kernel):
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal, jvp, bias_kind = case
    tensors, bias, bias_t, bias_m, bias_t_m = case_inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, jvp, bias_kind, seed=1)
    q, k, v, qt, kt, vt = (t.numpy() for t in tensors)
    scale = 0.8 * Dqk**-0.5
    launches = []
    tma_enabled, overlap, q_regs = KERNELS[kernel]
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
            SMEM_OPTIN_SM90,
            launches,
            tma_enabled=tma_enabled,
            overlap=overlap,
            q_regs=q_regs,
        )
    assert launches[0][0] == _expected_kernel(case, kernel, launches[0][1])
    names, expected = reference_outputs(tensors, bias, bias_t, scale, causal, jvp)
    if not jvp:
        got = (got[0], got[2])
    assert_matches_reference(names, got, expected)


@pytest.mark.parametrize("case", [(2, 4, 2, 130, 200, 64, 64, True), (1, 2, 1, 70, 140, 128, 120, False)])
def test_tma_kernel_reads_strided_layouts(case):
    """(B, N, H, D) storage read as (B, H, N, D): head stride below the row stride in the tensor maps
    (JVP, so the d 128 case runs the TMA kernel without the overlap)."""
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal = case
    tensors, *_ = case_inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, True, None, seed=2)
    launches = []
    got = forward_model(
        *(t.numpy() for t in tensors), None, None, Dqk**-0.5, causal, SMEM_OPTIN_SM90, launches, layout="bnhd"
    )
    kd = 64 if Dqk <= 64 else 128
    assert launches == [("sm_90a_tma_overlap_qregs" if kd == 64 else "sm_90a_tma", kd, kd)]
    names, expected = reference_outputs(tensors, None, None, Dqk**-0.5, causal, True)
    assert_matches_reference(names, got, expected)


def _random_case(seed):
    """A random call the sm_90a kernels take: any lengths (tails of the 64 / 128-key and 128-row
    tiles), GQA, causal either way, head dims padding to 64 or 128; JVP for odd seeds; a full bias
    (and bias_t) for seeds 2 and 5."""
    rng = np.random.default_rng(seed)
    Hkv = int(rng.integers(1, 3))
    H = Hkv * int(rng.integers(1, 3))
    d = 8 * int(rng.choice([rng.integers(5, 9), rng.integers(13, 17)]))  # pads to 64 or to 128
    return (
        1,
        H,
        Hkv,
        int(rng.integers(1, 300)),
        int(rng.integers(1, 400)),
        d,
        d,
        bool(rng.integers(2)),
        seed % 2 == 1,
        "full" if seed in (2, 5) else None,
    )


@pytest.mark.parametrize("seed", range(8))
def test_sm90_kernels_on_random_shapes(seed):
    case = _random_case(seed)
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal, jvp, bias_kind = case
    tensors, bias, bias_t, bias_m, bias_t_m = case_inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, jvp, bias_kind, seed=100 + seed)
    names, expected = reference_outputs(tensors, bias, bias_t, Dqk**-0.5, causal, jvp)
    for kernel, (tma_enabled, overlap, q_regs) in KERNELS.items():
        if kernel == "tma_smem_q" and Dqk > 64:
            continue  # the same kernel as the default at d 128
        launches = []
        q, k, v, qt, kt, vt = (t.numpy() for t in tensors)
        got = forward_model(
            q,
            k,
            v,
            qt if jvp else None,
            kt if jvp else None,
            vt if jvp else None,
            bias_m,
            bias_t_m,
            Dqk**-0.5,
            causal,
            SMEM_OPTIN_SM90,
            launches,
            tma_enabled=tma_enabled,
            overlap=overlap,
            q_regs=q_regs,
        )
        assert launches[0][0] == _expected_kernel(case, kernel, launches[0][1]), (case, launches)
        assert_matches_reference(names, got if jvp else (got[0], got[2]), expected)
