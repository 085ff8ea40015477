"""Triton kernels for attention with forward-mode JVP: forward, forward + JVP in one pass, backward.

The launchers keep the contract of the extension's ops (csrc/attention.cpp): q (B, H, Nq, Dqk),
k (B, Hkv, Nk, Dqk), v (B, Hkv, Nk, Dv) with H % Hkv == 0 and any strides whose last one is 1,
bias None or a float / boolean (B, H, Nq, Nk) view (broadcast dims have stride 0), causal
bottom-right aligned (query i sees key j iff j <= i + Nk − Nq). O and its tangent come back in
q's dtype, LSE and μ in float32 (float64 for float64 inputs); every sum runs in that dtype.

Forward (one program per (query block, batch·head), online softmax over key blocks, natural-log
units so that float64 needs no rounded constant): per key block, with S = scale·QKᵀ + bias and
Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ) + ḃias,
    m' = max(m, rowmax S), α = e^{m − m'}, P = e^{S − m'},
    l ← α·l + ΣP,  A ← α·A + P·V,
    r ← α·r + Σ P⊙(Ṡ − c),  T ← α·T + (P⊙(Ṡ − c))·V + P·V̇,
and at the end O = A/l, LSE = m + ln l, μ = c + r/l, Ȯ = T/l − (r/l)·O. The per-row shift c (the
first live key block's estimate of μ) leaves the result unchanged for any c, and keeps T and r
small so that T/l − (r/l)·O cancels little in float32. Every tangent accumulator is rescaled by
the same α as the primal ones, so the online rescaling is exact. An absent tangent (None) is a
constexpr switch: its loads and products are not in the compiled kernel.

Backward (deterministic, no atomics): a row pass δ = rowsum(dO⊙O) − dLSE, one kernel over key
blocks for dK, dV (each program sums over the query heads of its kv head and over the query
blocks a causal mask leaves visible) and one over query blocks for dQ, both recomputing
P = e^{S − LSE} and dS = P⊙(dO·Vᵀ − δ).

Block sizes: CONFIGS per kernel and padded head dim (GPU defaults for sm_80 / sm_90); tests set
BLOCK_OVERRIDE to shrink the tiles so that small shapes cover several blocks, tails and the causal
skip. The table is the place an autotuner's measured choice goes.
"""

import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type


class Config(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# (kernel, padded head dim bucket) -> launch configuration on a GPU. Chosen for sm_80 / sm_90 without
# a timing (none has been made), held to no spill by ptxas on both (scripts/compile_triton_kernels.py):
# 128-row query tiles where the accumulators fit the registers; where the JVP's two (BLOCK_M, D)
# accumulators with the Q, Q̇ tiles (d 128 / 256), or the backward's dK, dV, spilled in larger tiles,
# the largest tried that did not.
CONFIGS = {
    ("forward", 64): Config(128, 64, 4, 3),
    ("forward", 128): Config(128, 64, 8, 3),
    ("forward", 256): Config(64, 32, 8, 2),
    ("jvp", 64): Config(128, 64, 8, 2),
    ("jvp", 128): Config(32, 32, 4, 1),
    ("jvp", 256): Config(16, 16, 4, 2),
    ("dkdv", 64): Config(32, 128, 8, 2),
    ("dkdv", 128): Config(32, 64, 8, 2),
    ("dkdv", 256): Config(32, 32, 8, 2),
    ("dq", 64): Config(128, 32, 8, 2),
    ("dq", 128): Config(64, 64, 4, 2),
    ("dq", 256): Config(32, 16, 4, 2),
}
# float64 (a correctness path: no tensor-core rate to chase) in small tiles, whose float64 accumulators fit
# the registers of every kernel.
FLOAT64_CONFIG = Config(32, 32, 4, 1)
# (block_m, block_n) for every kernel when set: tests shrink the tiles with it and run them on 4 warps,
# the 16- and 32-bit backward kernels on 2 (ptxas spilled those on 4 warps, the float64 ones on 2, and
# the forward kernels on 1).
BLOCK_OVERRIDE: Optional[Tuple[int, int]] = None
# Rows of the δ pass per program.
DELTA_BLOCK_M = 64
MAX_HEAD_DIM = 256
# Triton's interpreter (TRITON_INTERPRET=1 when triton was imported) runs the kernels on CPU tensors; its
# 16-bit arithmetic differs from the GPU's (_mma, _rounded). A compiled kernel sees False.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def config(kernel: str, head_dim: int, dtype: torch.dtype) -> Config:
    """The launch configuration of `kernel` ("forward", "jvp", "dkdv", "dq") for a padded head dim and
    the inputs' dtype."""
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    chosen = FLOAT64_CONFIG if dtype == torch.float64 else CONFIGS[(kernel, bucket)]
    if BLOCK_OVERRIDE is not None:
        warps = 2 if kernel in ("dkdv", "dq") and dtype != torch.float64 else 4
        chosen = Config(BLOCK_OVERRIDE[0], BLOCK_OVERRIDE[1], warps, chosen.num_stages)
    return chosen


@triton.jit
def _scaled(x, scale_hi, scale_lo, EXACT_SCALE: tl.constexpr):
    """x·scale. Float arguments reach a kernel as float32, so float64 kernels get the scale as
    hi + lo (both float32) and multiply by both: about 2^-48 relative, float64-level."""
    if EXACT_SCALE:
        return x * scale_hi + x * scale_lo
    return x * scale_hi


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a·b. In the interpreter, whose NumPy dot has no bfloat16, 16-bit operands are multiplied
    as their exact float32 values, as the GPU's tensor cores do."""
    if _INTERPRETED:
        if a.dtype.primitive_bitwidth == 16:
            a = a.to(tl.float32)
        if b.dtype.primitive_bitwidth == 16:
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _rounded(x, dtype):
    """x rounded to `dtype`, the dtype of an MMA operand or of a stored output. The interpreter converts
    float32 to bfloat16 by truncation: there the value is rounded to nearest even by hand and kept in
    float32 (exact there), so the interpreter rounds as the GPU does."""
    if _INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        if dtype == tl.float16:
            return x.to(dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _tile(ptr, rows, row_stride, cols, col_stride, row_ok, col_ok):
    return tl.load(
        ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=row_ok[:, None] & col_ok[None, :], other=0.0
    )


@triton.jit
def _visible_key_end(block_start, num_queries, num_keys, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of the query block [block_start, block_start + BLOCK_M) sees."""
    if CAUSAL:
        last_row = tl.minimum(block_start + BLOCK_M, num_queries) - 1
        return tl.maximum(0, tl.minimum(num_keys, last_row + num_keys - num_queries + 1))
    return num_keys


@triton.jit
def _query_block(
    n_q_blocks,
    heads,
    groups,
    num_queries,
    dim_qk,
    dim_v,
    BLOCK_M: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """This program's (batch, head, kv head, first row, rows, output rows, row mask, head-dim ranges and
    masks) in the
    kernels that own one query block: the heaviest causal blocks first, a (batch, head)'s blocks adjacent
    (its K, V stay in L2)."""
    pid = tl.program_id(0)
    q_block = n_q_blocks - 1 - pid % n_q_blocks
    bh = pid // n_q_blocks
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = (h // groups).to(tl.int64)
    block_start = q_block * BLOCK_M
    rows = block_start + tl.arange(0, BLOCK_M)
    d_qk = tl.arange(0, BLOCK_DQK)
    d_v = tl.arange(0, BLOCK_DV)
    out_rows = bh.to(tl.int64) * num_queries + rows  # rows of the (B·H·Nq, ·) outputs and statistics
    row_ok = rows < num_queries
    return b, h.to(tl.int64), kvh, block_start, rows, out_rows, row_ok, d_qk, d_v, d_qk < dim_qk, d_v < dim_v


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_t_ptr,
    k_t_ptr,
    v_t_ptr,
    bias_ptr,
    bias_t_ptr,
    out_ptr,
    out_t_ptr,
    lse_ptr,
    lse_t_ptr,
    q_sb,
    q_sh,
    q_sn,
    k_sb,
    k_sh,
    k_sn,
    v_sb,
    v_sh,
    v_sn,
    qt_sb,
    qt_sh,
    qt_sn,
    kt_sb,
    kt_sh,
    kt_sn,
    vt_sb,
    vt_sh,
    vt_sn,
    bias_sb,
    bias_sh,
    bias_sm,
    bias_sn,
    biast_sb,
    biast_sh,
    biast_sm,
    biast_sn,
    heads,
    groups,
    num_queries,
    num_keys,
    dim_qk,
    dim_v,
    n_q_blocks,
    scale_hi,
    scale_lo,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_IS_MASK: tl.constexpr,
    HAS_Q_T: tl.constexpr,
    HAS_K_T: tl.constexpr,
    HAS_V_T: tl.constexpr,
    HAS_BIAS_T: tl.constexpr,
    JVP: tl.constexpr,
    EXACT_SCALE: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b, h, kvh, block_start, rows, out_rows, row_ok, d_qk, d_v, dqk_ok, dv_ok = _query_block(
        n_q_blocks, heads, groups, num_queries, dim_qk, dim_v, BLOCK_M, BLOCK_DQK, BLOCK_DV
    )
    cols0 = tl.arange(0, BLOCK_N)

    q = _tile(q_ptr + b * q_sb + h * q_sh, rows, q_sn, d_qk, 1, row_ok, dqk_ok)
    k_base = k_ptr + b * k_sb + kvh * k_sh
    v_base = v_ptr + b * v_sb + kvh * v_sh
    bias_base = bias_ptr + b * bias_sb + h * bias_sh
    if HAS_Q_T:
        q_t = _tile(q_t_ptr + b * qt_sb + h * qt_sh, rows, qt_sn, d_qk, 1, row_ok, dqk_ok)
    kt_base = k_t_ptr + b * kt_sb + kvh * kt_sh
    vt_base = v_t_ptr + b * vt_sb + kvh * vt_sh
    biast_base = bias_t_ptr + b * biast_sb + h * biast_sh

    m = tl.full([BLOCK_M], float("-inf"), COMPUTE)
    l = tl.zeros([BLOCK_M], COMPUTE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], COMPUTE)
    r = tl.zeros([BLOCK_M], COMPUTE)
    shift = tl.zeros([BLOCK_M], COMPUTE)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], COMPUTE)

    key_end = _visible_key_end(block_start, num_queries, num_keys, BLOCK_M, CAUSAL)
    for start in range(0, key_end, BLOCK_N):
        cols = start + cols0
        col_ok = cols < num_keys
        k_tr = _tile(k_base, d_qk, 1, cols, k_sn, dqk_ok, col_ok)  # (Dqk, N): Kᵀ
        v = _tile(v_base, cols, v_sn, d_v, 1, col_ok, dv_ok)
        s = _scaled(
            _mma(q, k_tr, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DOT_PRECISION), scale_hi, scale_lo, EXACT_SCALE
        )
        allowed = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + (num_keys - num_queries))
        if HAS_BIAS:
            bias = _tile(bias_base, rows, bias_sm, cols, bias_sn, row_ok, col_ok)
            if BIAS_IS_MASK:
                allowed = allowed & (bias != 0)
            else:
                s += bias.to(COMPUTE)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row with no live key so far keeps m = −inf: shift by 0 there (e^{−inf − (−inf)} is NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        block_sum = tl.sum(p, 1)
        if JVP:
            s_t = tl.zeros([BLOCK_M, BLOCK_N], COMPUTE)
            if HAS_Q_T:
                s_t = _mma(q_t, k_tr, s_t, DOT_PRECISION)
            if HAS_K_T:
                k_t_tr = _tile(kt_base, d_qk, 1, cols, kt_sn, dqk_ok, col_ok)
                s_t = _mma(q, k_t_tr, s_t, DOT_PRECISION)
            s_t = _scaled(s_t, scale_hi, scale_lo, EXACT_SCALE)
            if HAS_BIAS_T:
                s_t += _tile(biast_base, rows, biast_sm, cols, biast_sn, row_ok, col_ok).to(COMPUTE)
            weighted = tl.sum(p * s_t, 1)
            # l > 0 iff an earlier block had a live key, whose estimate of μ is the shift already;
            # otherwise this block holds the row maximum (ΣP ≥ 1) and gives it.
            shift = tl.where(l > 0, shift, weighted / tl.where(block_sum > 0, block_sum, 1.0))
            r = r * alpha + weighted - shift * block_sum
            h_t = p * (s_t - shift[:, None])
            acc_t = _mma(_rounded(h_t, v.dtype), v, acc_t * alpha[:, None], DOT_PRECISION)
            if HAS_V_T:
                v_t = _tile(vt_base, cols, vt_sn, d_v, 1, col_ok, dv_ok)
                acc_t = _mma(_rounded(p, v.dtype), v_t, acc_t, DOT_PRECISION)
        l = l * alpha + block_sum
        acc = _mma(_rounded(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m = m_new

    live = l > 0
    l_safe = tl.where(live, l, 1.0)
    out = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & dv_ok[None, :]
    out_offsets = out_rows[:, None] * dim_v + d_v[None, :]
    tl.store(out_ptr + out_offsets, _rounded(out, out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptr + out_rows, tl.where(live, m + tl.log(l_safe), float("-inf")), mask=row_ok)
    if JVP:
        shifted_mu = r / l_safe
        out_t = acc_t / l_safe[:, None] - shifted_mu[:, None] * out
        tl.store(out_t_ptr + out_offsets, _rounded(out_t, out_t_ptr.dtype.element_ty), mask=out_mask)
        tl.store(lse_t_ptr + out_rows, tl.where(live, shift + shifted_mu, 0.0), mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    grad_out_ptr,
    out_ptr,
    grad_lse_ptr,
    delta_ptr,
    go_sb,
    go_sh,
    go_sn,
    o_sb,
    o_sh,
    o_sn,
    heads,
    num_queries,
    dim_v,
    n_q_blocks,
    HAS_GRAD_LSE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """δ = rowsum(dO⊙O) − dLSE: the row term of the softmax backward."""
    pid = tl.program_id(0)
    bh = pid // n_q_blocks
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = (pid % n_q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    d_v = tl.arange(0, BLOCK_DV)
    dv_ok = d_v < dim_v
    grad_out = _tile(grad_out_ptr + b * go_sb + h * go_sh, rows, go_sn, d_v, 1, row_ok, dv_ok).to(COMPUTE)
    out = _tile(out_ptr + b * o_sb + h * o_sh, rows, o_sn, d_v, 1, row_ok, dv_ok).to(COMPUTE)
    delta = tl.sum(grad_out * out, 1)
    out_rows = bh.to(tl.int64) * num_queries + rows
    if HAS_GRAD_LSE:
        delta -= tl.load(grad_lse_ptr + out_rows, mask=row_ok, other=0.0).to(COMPUTE)
    tl.store(delta_ptr + out_rows, delta, mask=row_ok)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, out_rows, row_ok):
    """LSE with −inf (a fully masked row) turned into +inf, so e^{S − LSE} is 0 there, and δ."""
    lse = tl.load(lse_ptr + out_rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, tl.load(delta_ptr + out_rows, mask=row_ok, other=0.0)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_sb,
    q_sh,
    q_sn,
    k_sb,
    k_sh,
    k_sn,
    v_sb,
    v_sh,
    v_sn,
    bias_sb,
    bias_sh,
    bias_sm,
    bias_sn,
    go_sb,
    go_sh,
    go_sn,
    heads,
    kv_heads,
    groups,
    num_queries,
    num_keys,
    dim_qk,
    dim_v,
    n_k_blocks,
    scale_hi,
    scale_lo,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_IS_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dK = scale·Σ dSᵀQ, dV = Σ PᵀdO for one key block of one kv head, over its query heads."""
    pid = tl.program_id(0)
    k_block = pid % n_k_blocks
    bkv = pid // n_k_blocks
    b = (bkv // kv_heads).to(tl.int64)
    kvh = bkv % kv_heads
    cols = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_keys
    d_qk = tl.arange(0, BLOCK_DQK)
    d_v = tl.arange(0, BLOCK_DV)
    dqk_ok = d_qk < dim_qk
    dv_ok = d_v < dim_v
    k = _tile(k_ptr + b * k_sb + kvh.to(tl.int64) * k_sh, cols, k_sn, d_qk, 1, col_ok, dqk_ok)
    v = _tile(v_ptr + b * v_sb + kvh.to(tl.int64) * v_sh, cols, v_sn, d_v, 1, col_ok, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], COMPUTE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], COMPUTE)
    offset = num_keys - num_queries
    first_row = 0
    if CAUSAL:
        # Query i sees key j iff i >= j − offset: blocks above the key block's first key are skipped.
        first_row = (tl.maximum(0, k_block * BLOCK_N - offset) // BLOCK_M) * BLOCK_M
    rows0 = tl.arange(0, BLOCK_M)
    for g in range(groups):
        h = (kvh * groups + g).to(tl.int64)
        q_base = q_ptr + b * q_sb + h * q_sh
        go_base = grad_out_ptr + b * go_sb + h * go_sh
        bias_base = bias_ptr + b * bias_sb + h * bias_sh
        for start in range(first_row, num_queries, BLOCK_M):
            rows = start + rows0
            row_ok = rows < num_queries
            q = _tile(q_base, rows, q_sn, d_qk, 1, row_ok, dqk_ok)
            grad_out = _tile(go_base, rows, go_sn, d_v, 1, row_ok, dv_ok)
            out_rows = (b * heads + h) * num_queries + rows
            lse, delta = _row_stats(lse_ptr, delta_ptr, out_rows, row_ok)
            s_tr = _scaled(
                _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], COMPUTE), DOT_PRECISION),
                scale_hi,
                scale_lo,
                EXACT_SCALE,
            )  # (N, M): Sᵀ
            allowed = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[:, None] <= rows[None, :] + offset)
            if HAS_BIAS:
                bias = _tile(bias_base, cols, bias_sn, rows, bias_sm, col_ok, row_ok)
                if BIAS_IS_MASK:
                    allowed = allowed & (bias != 0)
                else:
                    s_tr += bias.to(COMPUTE)
            p_tr = tl.where(allowed, tl.exp(s_tr - lse[None, :]), 0.0)
            dv = _mma(_rounded(p_tr, grad_out.dtype), grad_out, dv, DOT_PRECISION)
            dp_tr = _mma(v, tl.trans(grad_out), tl.zeros([BLOCK_N, BLOCK_M], COMPUTE), DOT_PRECISION)
            ds_tr = p_tr * (dp_tr - delta[None, :])
            dk = _mma(_rounded(ds_tr, q.dtype), q, dk, DOT_PRECISION)
    key_rows = bkv.to(tl.int64) * num_keys + cols
    tl.store(
        dk_ptr + key_rows[:, None] * dim_qk + d_qk[None, :],
        _rounded(_scaled(dk, scale_hi, scale_lo, EXACT_SCALE), dk_ptr.dtype.element_ty),
        mask=col_ok[:, None] & dqk_ok[None, :],
    )
    tl.store(
        dv_ptr + key_rows[:, None] * dim_v + d_v[None, :],
        _rounded(dv, dv_ptr.dtype.element_ty),
        mask=col_ok[:, None] & dv_ok[None, :],
    )


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    q_sb,
    q_sh,
    q_sn,
    k_sb,
    k_sh,
    k_sn,
    v_sb,
    v_sh,
    v_sn,
    bias_sb,
    bias_sh,
    bias_sm,
    bias_sn,
    go_sb,
    go_sh,
    go_sn,
    heads,
    groups,
    num_queries,
    num_keys,
    dim_qk,
    dim_v,
    n_q_blocks,
    scale_hi,
    scale_lo,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_IS_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dQ = scale·Σ dS·K for one query block."""
    b, h, kvh, block_start, rows, out_rows, row_ok, d_qk, d_v, dqk_ok, dv_ok = _query_block(
        n_q_blocks, heads, groups, num_queries, dim_qk, dim_v, BLOCK_M, BLOCK_DQK, BLOCK_DV
    )
    q = _tile(q_ptr + b * q_sb + h * q_sh, rows, q_sn, d_qk, 1, row_ok, dqk_ok)
    grad_out = _tile(grad_out_ptr + b * go_sb + h * go_sh, rows, go_sn, d_v, 1, row_ok, dv_ok)
    lse, delta = _row_stats(lse_ptr, delta_ptr, out_rows, row_ok)
    k_base = k_ptr + b * k_sb + kvh * k_sh
    v_base = v_ptr + b * v_sb + kvh * v_sh
    bias_base = bias_ptr + b * bias_sb + h * bias_sh
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], COMPUTE)
    cols0 = tl.arange(0, BLOCK_N)
    key_end = _visible_key_end(block_start, num_queries, num_keys, BLOCK_M, CAUSAL)
    for start in range(0, key_end, BLOCK_N):
        cols = start + cols0
        col_ok = cols < num_keys
        k_tr = _tile(k_base, d_qk, 1, cols, k_sn, dqk_ok, col_ok)
        v_tr = _tile(v_base, d_v, 1, cols, v_sn, dv_ok, col_ok)
        s = _scaled(
            _mma(q, k_tr, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DOT_PRECISION), scale_hi, scale_lo, EXACT_SCALE
        )
        allowed = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + (num_keys - num_queries))
        if HAS_BIAS:
            bias = _tile(bias_base, rows, bias_sm, cols, bias_sn, row_ok, col_ok)
            if BIAS_IS_MASK:
                allowed = allowed & (bias != 0)
            else:
                s += bias.to(COMPUTE)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = _mma(grad_out, v_tr, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(_rounded(ds, k_tr.dtype), tl.trans(k_tr), dq, DOT_PRECISION)
    tl.store(
        dq_ptr + out_rows[:, None] * dim_qk + d_qk[None, :],
        _rounded(_scaled(dq, scale_hi, scale_lo, EXACT_SCALE), dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dqk_ok[None, :],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get IEEE products (no TF32 rounding); 16-bit inputs multiply exactly anyway.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _scale_parts(scale: float) -> Tuple[float, float]:
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(torch.tensor(scale - hi, dtype=torch.float32))


def _head_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _check_call(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: q has dtype {q.dtype}; supported: float32, float64, bfloat16, float16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: k, v have dtypes {k.dtype}, {v.dtype} but q has {q.dtype}; they must match")
    if (
        k.shape[1] == 0
        or q.shape[1] % k.shape[1]
        or k.shape[:3] != v.shape[:3]
        or k.shape[0] != q.shape[0]
        or k.shape[3] != q.shape[3]
    ):
        raise ValueError(
            f"{op}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
            f"(B, H, Nq, Dqk), (B, Hkv, Nk, Dqk), (B, Hkv, Nk, Dv) with H % Hkv == 0"
        )
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: head dims {q.shape[3]} (q, k) and {v.shape[3]} (v); the Triton kernels take up to {MAX_HEAD_DIM}"
        )
    if bias is not None:
        expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if tuple(bias.shape) != expected:
            raise ValueError(
                f"{op}: bias has shape {tuple(bias.shape)}; expected (B, H, Nq, Nk) = {expected} "
                "(broadcast views are accepted)"
            )


def _last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _strides3(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _strides4(t: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def _forward(q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal, jvp):
    op = "fastcm.kernels.attention.attention_forward" + ("_jvp" if jvp else "")
    _check_call(op, q, k, v, bias)
    q, k, v, q_t, k_t, v_t = map(_last_dim_contiguous, (q, k, v, q_t, k_t, v_t))
    for name, t, primal in (("q_t", q_t, q), ("k_t", k_t, k), ("v_t", v_t, v)):
        if t is not None and (t.shape != primal.shape or t.dtype != primal.dtype or t.device != primal.device):
            raise ValueError(
                f"{op}: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) must match its primal "
                f"({tuple(primal.shape)}, {primal.dtype}, {primal.device})"
            )
    if bias_t is not None and (bias is None or bias.dtype == torch.bool or bias_t.shape != bias.shape):
        raise ValueError(f"{op}: bias_t needs a float bias of the same shape (B, H, Nq, Nk)")
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    stats = compute_dtype(q.dtype)
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=stats, device=q.device)
    out_t = torch.empty_like(out) if jvp else out
    lse_t = torch.empty_like(lse) if jvp else lse
    block_dqk, block_dv = _head_block(Dqk), _head_block(Dv)
    cfg = config("jvp" if jvp else "forward", max(block_dqk, block_dv), q.dtype)
    n_q_blocks = triton.cdiv(Nq, cfg.block_m)
    scale_hi, scale_lo = _scale_parts(scale)
    if B * H * n_q_blocks == 0:
        return out, out_t, lse, lse_t
    _attention_fwd_kernel[(n_q_blocks * B * H,)](
        q,
        k,
        v,
        q if q_t is None else q_t,
        k if k_t is None else k_t,
        v if v_t is None else v_t,
        q if bias is None else bias,
        q if bias_t is None else bias_t,
        out,
        out_t,
        lse,
        lse_t,
        *_strides3(q),
        *_strides3(k),
        *_strides3(v),
        *_strides3(q_t),
        *_strides3(k_t),
        *_strides3(v_t),
        *_strides4(bias),
        *_strides4(bias_t),
        H,
        H // Hkv,
        Nq,
        Nk,
        Dqk,
        Dv,
        n_q_blocks,
        scale_hi,
        scale_lo,
        CAUSAL=bool(causal),
        HAS_BIAS=bias is not None,
        BIAS_IS_MASK=bias is not None and bias.dtype == torch.bool,
        HAS_Q_T=jvp and q_t is not None,
        HAS_K_T=jvp and k_t is not None,
        HAS_V_T=jvp and v_t is not None,
        HAS_BIAS_T=jvp and bias_t is not None,
        JVP=jvp,
        EXACT_SCALE=q.dtype == torch.float64,
        COMPUTE=compute_type(q.dtype),
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, out_t, lse, lse_t


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float, causal: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE): O = softmax(scale·QKᵀ + bias)·V (B, H, Nq, Dv) in q's dtype, LSE (B, H, Nq) in
    float32 (float64 for float64); a fully masked row gives O = 0, LSE = −inf."""
    out, _, lse, _ = _forward(q, k, v, None, None, None, bias, None, scale, causal, jvp=False)
    return out, lse


def attention_forward_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: Optional[torch.Tensor],
    k_t: Optional[torch.Tensor],
    v_t: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bias_t: Optional[torch.Tensor],
    scale: float,
    causal: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, Ȯ, LSE, μ) in one pass: Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ) + ḃias, μ = rowsum(P⊙Ṡ),
    Ȯ = (P⊙Ṡ)V + PV̇ − μ⊙O. A tangent given as None is zero, and its work is skipped."""
    return _forward(q, k, v, q_t, k_t, v_t, bias, bias_t, scale, causal, jvp=True)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    grad_lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), contiguous, for the loss gradients grad_out (of O) and grad_lse (of LSE, None = 0):
    δ = rowsum(dO⊙O) − dLSE, dS = P⊙(dO·Vᵀ − δ), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO."""
    op = "fastcm.kernels.attention.attention_backward"
    _check_call(op, q, k, v, bias)
    grad_out, q, k, v, out = map(_last_dim_contiguous, (grad_out, q, k, v, out))
    B, H, Nq, Dqk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    stats = compute_dtype(q.dtype)
    bad_grad_lse = grad_lse is not None and (grad_lse.shape != lse.shape or grad_lse.dtype != stats)
    if (
        grad_out.shape != (B, H, Nq, Dv)
        or out.shape != grad_out.shape
        or lse.shape != (B, H, Nq)
        or lse.dtype != stats
        or bad_grad_lse
    ):
        raise ValueError(
            f"{op}: grad_out and out must be (B, H, Nq, Dv) = {(B, H, Nq, Dv)}, lse and grad_lse "
            f"(B, H, Nq) in {stats}; got {tuple(grad_out.shape)}, {tuple(out.shape)}, "
            f"{tuple(lse.shape)} {lse.dtype}"
        )
    lse = lse.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq = torch.empty((B, H, Nq, Dqk), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, Dqk), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Nk, Dv), dtype=q.dtype, device=q.device)
    if dq.numel() + dk.numel() + dv.numel() == 0 or min(B, H) == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if Nq == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Nq), dtype=stats, device=q.device)
    block_dqk, block_dv = _head_block(Dqk), _head_block(Dv)
    compute, precision = compute_type(q.dtype), _dot_precision(q.dtype)
    n_delta_blocks = triton.cdiv(Nq, DELTA_BLOCK_M)
    _attention_bwd_delta_kernel[(n_delta_blocks * B * H,)](
        grad_out,
        out,
        delta if grad_lse is None else grad_lse,
        delta,
        *_strides3(grad_out),
        *_strides3(out),
        H,
        Nq,
        Dv,
        n_delta_blocks,
        HAS_GRAD_LSE=grad_lse is not None,
        COMPUTE=compute,
        BLOCK_M=DELTA_BLOCK_M,
        BLOCK_DV=block_dv,
        num_warps=4,
    )
    scale_hi, scale_lo = _scale_parts(scale)
    common = dict(
        CAUSAL=bool(causal),
        HAS_BIAS=bias is not None,
        BIAS_IS_MASK=bias is not None and bias.dtype == torch.bool,
        EXACT_SCALE=q.dtype == torch.float64,
        COMPUTE=compute,
        DOT_PRECISION=precision,
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
    )
    bias_arg = q if bias is None else bias
    if Nk > 0:
        cfg = config("dkdv", max(block_dqk, block_dv), q.dtype)
        n_k_blocks = triton.cdiv(Nk, cfg.block_n)
        _attention_bwd_dkdv_kernel[(n_k_blocks * B * Hkv,)](
            q,
            k,
            v,
            bias_arg,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            *_strides3(q),
            *_strides3(k),
            *_strides3(v),
            *_strides4(bias),
            *_strides3(grad_out),
            H,
            Hkv,
            H // Hkv,
            Nq,
            Nk,
            Dqk,
            Dv,
            n_k_blocks,
            scale_hi,
            scale_lo,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **common,
        )
    cfg = config("dq", max(block_dqk, block_dv), q.dtype)
    n_q_blocks = triton.cdiv(Nq, cfg.block_m)
    _attention_bwd_dq_kernel[(n_q_blocks * B * H,)](
        q,
        k,
        v,
        bias_arg,
        grad_out,
        lse,
        delta,
        dq,
        *_strides3(q),
        *_strides3(k),
        *_strides3(v),
        *_strides4(bias),
        *_strides3(grad_out),
        H,
        H // Hkv,
        Nq,
        Nk,
        Dqk,
        Dv,
        n_q_blocks,
        scale_hi,
        scale_lo,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **common,
    )
    return dq, dk, dv


__all__ = ["attention_forward", "attention_forward_jvp", "attention_backward", "config", "CONFIGS", "Config"]
