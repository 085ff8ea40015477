// Attention backward for sm_80 and later: dQ, dK, dV of O = softmax(scale·QKᵀ + bias)·V from the
// saved LSE, FA2-style recomputation of P, tensor-core mma.sync m16n8k16, fp32 accumulators.
//
//   P  = exp(scale·QKᵀ + bias − LSE)       (0 where masked, and on rows with LSE = −inf)
//   δ  = rowsum(dO ⊙ O)                    (kernel 1, fp32)
//   dS = P ⊙ (dO·Vᵀ − δ);  dQ = scale·dS·K;  dK = scale·dSᵀ·Q;  dV = Pᵀ·dO
// In base 2 with the forward's folding: P = 2^(s·scale·log2e + bias·log2e − LSE·log2e). The saved
// LSE is natural-log (the forward writes (m + log2 ℓ)·ln2); a row with LSE = −inf is staged as
// +inf so every P of it is 2^(−inf) = 0 without a branch.
//
// Three kernels, no atomics, deterministic (same bits every run, as the forward):
//   delta: one warp per query row.
//   dq:    one CTA per (b, h, 64 query rows), 4 warps × 16 rows; loops over key tiles
//          (the forward's shape): S = Q·Kᵀ, dP = dO·Vᵀ, dS, dQ += dS·K.
//   dkdv:  one CTA per (b, kv head, 64 keys), 4 warps × 16 keys; loops over the G query heads of
//          the group and their query tiles: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q.
//          GQA sums land in the same registers: no fp32 scratch, no reduction pass.
// Why a separate dQ kernel instead of FA2's fp32 atomicAdd: it recomputes S and dP (7 GEMMs of
// Nq·Nk·d instead of 5), but needs no (B, H, Nq, D) fp32 scratch, no smem round trip of dSᵀ, no
// cast pass, and its results do not depend on atomic ordering (tests compare bits run to run).
#pragma once

#include <algorithm>

#include "attention_fwd_kernel.cuh"

namespace fastcm {
namespace attn {

// Strides in elements; the same alignment / multiple-of-8 guarantees as FwdParams.
struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const void* out;
  const void* bias;       // may be null
  const float* lse;       // (B, H, Nq) contiguous, natural log
  const float* grad_lse;  // (B, H, Nq) contiguous, or null
  float* delta;           // (B, H, Nq) contiguous scratch
  void* dq;
  void* dk;
  void* dv;

  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t do_sb, do_sh, do_sn;
  int64_t o_sb, o_sh, o_sn;
  int64_t b_sb, b_sh, b_sm, b_sn;  // bias strides (0 allowed)
  int64_t dq_sb, dq_sh, dq_sn;
  int64_t dk_sb, dk_sh, dk_sn;
  int64_t dv_sb, dv_sh, dv_sn;

  int B, H, Hkv, Nq, Nk;
  int d_qk, d_v;  // actual head dims (multiples of 8, ≤ kD; the delta kernel: any multiple of 8)
  float scale, scale_log2;
  int causal;
  int bias_is_f32;
};

// kBM query rows × kBN keys per tile; load_tile and stage_bias of the forward read these names.
// dkdv holds dK, dV (kD/2 fp32 each per thread) for the whole kernel plus Sᵀ, dPᵀ (kBM/2 each):
// kBM = 32 above kD = 64 keeps that at 160 accumulator registers, as the forward JVP does.
template <typename T_, int kD_, bool kKeyMajor_>
struct BwdTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr bool kKeyMajor = kKeyMajor_;  // true: the dkdv kernel
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = (kKeyMajor && kD > 64) ? 32 : 64;
  static constexpr int kBN = 64;
  static constexpr int kStride = kD + 8;  // +16 B per row: conflict-free ldmatrix
  // dq: Q, dO once + 2 stages of (K, V). dkdv: K, V once + 2 stages of (Q, dO) + LSE, δ rows.
  static constexpr int kOnceRows = kKeyMajor ? kBN : kBM;
  static constexpr int kStageRows = kKeyMajor ? kBM : kBN;
  static constexpr int kSmemElems = 2 * kOnceRows * kStride + 2 * 2 * kStageRows * kStride;
  static constexpr int kRowStatBytes = kKeyMajor ? 2 * kBM * (int)sizeof(float) : 0;
  static constexpr int kSmemBytes = kSmemElems * (int)sizeof(T) + kRowStatBytes;
  static constexpr int kBiasBytes = kBM * kBN * (int)sizeof(float);
  static_assert(kD % 16 == 0 && kBM % 16 == 0 && kBN % 16 == 0, "mma k-steps are 16 wide");
};

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}

// δ[bh, i] = Σ_d dO·O over the stored (rounded) O, as the reference differentiates it, − dLSE[bh, i]
// where an LSE gradient is given (∂LSE_i/∂s_ij = P_ij: it enters dS = P ⊙ (dP − δ) through δ).
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * 8 + threadIdx.x / 32;
  if (row >= (int64_t)p.B * p.H * p.Nq) return;
  const int i = (int)(row % p.Nq);
  const int bh = (int)(row / p.Nq), b = bh / p.H, h = bh % p.H;
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sn;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sn;
  float acc = 0.f;
  for (int c0 = lane * 8; c0 < p.d_v; c0 += 32 * 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + c0);
    const uint4 dv = *reinterpret_cast<const uint4*>(d + c0);
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float2 a = unpack2<T>(ow[w]), e = unpack2<T>(dw[w]);
      acc += a.x * e.x + a.y * e.y;
    }
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) p.delta[row] = p.grad_lse != nullptr ? acc - p.grad_lse[row] : acc;
}

// LSE of row i in base 2, +inf for a row that sees no key (P = 0 there).
__device__ __forceinline__ float lse_log2(const BwdParams& p, int64_t li) {
  const float l = p.lse[li];
  return l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
}

// Row 0 of head h of batch entry b of a (B, heads, N, D) tensor with strides (sb, sh, ·, 1).
template <typename T>
__device__ __forceinline__ const T* head_rows(const void* base, int64_t sb, int64_t sh, int b, int h) {
  return static_cast<const T*>(base) + b * sb + h * sh;
}

// The CTA of a dQ kernel: (b, h, kBM query rows at m0), heaviest (causal) tiles first, the key tiles
// of kBN it visits (causal: up to the last visible key), and its heads of q, dO, k, v.
template <typename T>
struct BwdDqBlock {
  int bh, b, h, hkv, m0, n_tiles;
  const T *q, *dout, *k, *v;
};
template <typename T, int kBM, int kBN>
__device__ __forceinline__ BwdDqBlock<T> bwd_dq_block(const BwdParams& p) {
  BwdDqBlock<T> w;
  const int num_m = (p.Nq + kBM - 1) / kBM;
  w.bh = (int)(blockIdx.x / num_m);
  w.b = w.bh / p.H;
  w.h = w.bh % p.H;
  w.hkv = w.h / (p.H / p.Hkv);
  w.m0 = (num_m - 1 - (int)(blockIdx.x % num_m)) * kBM;
  const int n_end = p.causal ? max(0, min(p.Nk, w.m0 + kBM + p.Nk - p.Nq)) : p.Nk;
  w.n_tiles = (n_end + kBN - 1) / kBN;
  w.q = head_rows<T>(p.q, p.q_sb, p.q_sh, w.b, w.h);
  w.dout = head_rows<T>(p.dout, p.do_sb, p.do_sh, w.b, w.h);
  w.k = head_rows<T>(p.k, p.k_sb, p.k_sh, w.b, w.hkv);
  w.v = head_rows<T>(p.v, p.v_sb, p.v_sh, w.b, w.hkv);
  return w;
}

// The CTA of a dK/dV kernel: (b, kv head, kBN keys at n0), low key tiles (the longest) first, its
// heads of k, v, and its steps: the G query heads of the group × their query tiles of kBM rows;
// causal: query i sees key n0 only if i ≥ n0 − (Nk − Nq), so the tiles before m_first are skipped.
template <typename T>
struct BwdDkdvBlock {
  int b, hkv, G, n0, m_first, per_head, steps;
  const T *k, *v;
  __device__ int head_of(int step) const { return hkv * G + step / per_head; }
  __device__ int row0_of(int step, int kBM) const { return (m_first + step % per_head) * kBM; }
};
template <typename T, int kBN, int kBM>
__device__ __forceinline__ BwdDkdvBlock<T> bwd_dkdv_block(const BwdParams& p) {
  BwdDkdvBlock<T> w;
  const int num_n = (p.Nk + kBN - 1) / kBN;
  const int bhkv = (int)(blockIdx.x / num_n);
  w.b = bhkv / p.Hkv;
  w.hkv = bhkv % p.Hkv;
  w.G = p.H / p.Hkv;
  w.n0 = (int)(blockIdx.x % num_n) * kBN;
  const int num_m = (p.Nq + kBM - 1) / kBM;
  w.m_first = p.causal ? min(num_m, max(0, w.n0 - (p.Nk - p.Nq)) / kBM) : 0;
  w.per_head = num_m - w.m_first;
  w.steps = w.G * w.per_head;
  w.k = head_rows<T>(p.k, p.k_sb, p.k_sh, w.b, w.hkv);
  w.v = head_rows<T>(p.v, p.v_sb, p.v_sh, w.b, w.hkv);
  return w;
}

// LSE (base 2) and δ of this thread's rows row_in_cta, + 8 of the dQ tile at m0 (+inf and 0 past Nq).
__device__ __forceinline__ void dq_row_stats(const BwdParams& p, int bh, int m0, int row_in_cta, float (&lse2)[2],
                                             float (&dlt)[2]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = m0 + row_in_cta + 8 * rr;
    const int64_t li = (int64_t)bh * p.Nq + i;
    lse2[rr] = i < p.Nq ? lse_log2(p, li) : INFINITY;
    dlt[rr] = i < p.Nq ? p.delta[li] : 0.f;
  }
}

// dS = P ⊙ (dP − δ) in place of s, query-major (the dQ kernels): element (nt, e) is row
// row_in_cta + 8(e/2) of the tile at m0, key n0 + 8nt + 2c + e%2. sBias: the staged fp32 tile
// (row stride 8·kNT), read only if has_bias.
template <int kNT>
__device__ __forceinline__ void dq_scores_to_ds(float (&s)[kNT][4], const float (&dp)[kNT][4], const BwdParams& p,
                                                bool has_bias, const float* sBias, int row_in_cta, int m0, int n0,
                                                const float (&lse2)[2], const float (&dlt)[2], int c) {
  const int off = p.Nk - p.Nq;
  const bool need_mask = (n0 + 8 * kNT > p.Nk) || (p.causal && (n0 + 8 * kNT - 1 > m0 + off));
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int ri = row_in_cta + 8 * (e / 2), jl = nt * 8 + 2 * c + (e % 2);
      float x = s[nt][e] * p.scale_log2;
      if (has_bias) x += sBias[ri * 8 * kNT + jl];
      if (need_mask) {
        const int i = m0 + ri, j = n0 + jl;
        if ((j >= p.Nk) || (p.causal && j > i + off)) x = -INFINITY;
      }
      s[nt][e] = exp2f(x - lse2[e / 2]) * (dp[nt][e] - dlt[e / 2]);
    }
  }
}

// Pᵀ in place of st and dSᵀ = Pᵀ ⊙ (dPᵀ − δ) in place of dpt, key-major (the dK/dV kernels): element
// (nt, e) is key key_in_cta + 8(e/2) of the CTA's cta_keys keys at n0, query m0 + 8nt + 2c + e%2;
// sLse, sDelta: the query tile's staged rows. sBias: the staged fp32 tile (query rows of bias_cols
// keys), read only if has_bias.
template <int kNT>
__device__ __forceinline__ void dkdv_scores_to_ds(float (&st)[kNT][4], float (&dpt)[kNT][4], const BwdParams& p,
                                                  bool has_bias, const float* sBias, int bias_cols, const float* sLse,
                                                  const float* sDelta, int key_in_cta, int m0, int n0, int cta_keys,
                                                  int c) {
  const int off = p.Nk - p.Nq;
  const bool need_mask = (n0 + cta_keys > p.Nk) || (p.causal && (n0 + cta_keys - 1 > m0 + off));
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kl = key_in_cta + 8 * (e / 2), ql = nt * 8 + 2 * c + (e % 2);
      float x = st[nt][e] * p.scale_log2;
      if (has_bias) x += sBias[ql * bias_cols + kl];
      if (need_mask) {
        const int i = m0 + ql, j = n0 + kl;
        if ((j >= p.Nk) || (p.causal && j > i + off)) x = -INFINITY;
      }
      const float pe = exp2f(x - sLse[ql]);
      st[nt][e] = pe;
      dpt[nt][e] = pe * (dpt[nt][e] - sDelta[ql]);
    }
  }
}

// dQ (× scale) of this thread's rows row_in_cta, + 8 of the tile at m0: the m16n8 C layout.
template <typename T, int kNT>
__device__ __forceinline__ void store_dq(const BwdParams& p, const float (&acc)[kNT][4], int b, int h, int m0,
                                         int row_in_cta, int c) {
  T* gdQ = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = nt * 8 + 2 * c;
    if (col >= p.d_qk) continue;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int i = m0 + row_in_cta + 8 * rr;
      if (i >= p.Nq) continue;
      *reinterpret_cast<uint32_t*>(gdQ + (int64_t)i * p.dq_sn + col) =
          pack2<T>(acc[nt][2 * rr] * p.scale, acc[nt][2 * rr + 1] * p.scale);
    }
  }
}

// dK (× scale) and dV of this thread's keys key_in_cta, + 8 of the CTA's keys at n0.
template <typename T, int kNT>
__device__ __forceinline__ void store_dkdv(const BwdParams& p, const float (&acc_k)[kNT][4],
                                           const float (&acc_v)[kNT][4], int b, int hkv, int n0, int key_in_cta,
                                           int c) {
  T* gdK = static_cast<T*>(p.dk) + b * p.dk_sb + hkv * p.dk_sh;
  T* gdV = static_cast<T*>(p.dv) + b * p.dv_sb + hkv * p.dv_sh;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = nt * 8 + 2 * c;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int j = n0 + key_in_cta + 8 * rr;
      if (j >= p.Nk) continue;
      if (col < p.d_qk)
        *reinterpret_cast<uint32_t*>(gdK + (int64_t)j * p.dk_sn + col) =
            pack2<T>(acc_k[nt][2 * rr] * p.scale, acc_k[nt][2 * rr + 1] * p.scale);
      if (col < p.d_v)
        *reinterpret_cast<uint32_t*>(gdV + (int64_t)j * p.dv_sn + col) =
            pack2<T>(acc_v[nt][2 * rr], acc_v[nt][2 * rr + 1]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// dQ: the forward's tiling. Element (nt, e) of S / dP is row 16·warp + g + 8(e/2) of the CTA
// tile, key n0 + 8nt + 2c + e%2.
// ----------------------------------------------------------------------------------------------
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dq_kernel(const BwdParams p) {
  using T = typename Tr::T;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD, kS = Tr::kStride;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * kS;
  T* sKV = sdO + kBM * kS;  // stage s: K at sKV + 2s·kBN·kS, then V
  float* sBias = reinterpret_cast<float*>(smem_raw + Tr::kSmemBytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const BwdDqBlock<T> blk = bwd_dq_block<T, kBM, kBN>(p);
  const int bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0, n_tiles = blk.n_tiles;

  const T *gQ = blk.q, *gdO = blk.dout, *gK = blk.k, *gV = blk.v;

  auto load_kv = [&](int stage, int tile) {
    T* base = sKV + stage * 2 * kBN * kS;
    const int n0 = tile * kBN, rows = p.Nk - n0;
    load_tile<Tr, kBN>(base, gK + n0 * p.k_sn, (int)p.k_sn, rows, p.d_qk, tid);
    load_tile<Tr, kBN>(base + kBN * kS, gV + n0 * p.v_sn, (int)p.v_sn, rows, p.d_v, tid);
  };
  load_tile<Tr, kBM>(sQ, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
  load_tile<Tr, kBM>(sdO, gdO + m0 * p.do_sn, (int)p.do_sn, p.Nq - m0, p.d_v, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int row_in_cta = 16 * warp + g;
  float lse2[2], dlt[2];
  dq_row_stats(p, bh, m0, row_in_cta, lse2, dlt);
  float acc[kD / 8][4];
  zero_accumulators<false>(acc, acc);

  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = (int64_t)b * p.b_sb + (int64_t)h * p.b_sh;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();
    if (has_bias)
      stage_bias<Tr>(sBias, p.bias, bias_base, p.b_sm, p.b_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_is_f32, kLog2e, tid);
    cp_async_wait<1>();
    __syncthreads();
    const T* sK = sKV + stage * 2 * kBN * kS;
    const T* sV = sK + kBN * kS;
    const int n0 = tile * kBN;

    // S = Q·Kᵀ and dP = dO·Vᵀ share the k loop (Dqk and Dv share the padded kD).
    float s[kBN / 8][4], dp[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll 1
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t qa[4], oa[4];
      const int a_off = (16 * warp + (lane % 16)) * kS + ks * 16 + (lane / 16) * 8;
      ldmatrix_x4(qa, sQ + a_off);
      ldmatrix_x4(oa, sdO + a_off);
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        const int b_off = (np * 16 + (lane % 8) + (lane / 16) * 8) * kS + ks * 16 + ((lane / 8) % 2) * 8;
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, sK + b_off);
        ldmatrix_x4(vb, sV + b_off);
        mma16816<T>(s[2 * np], qa, kb[0], kb[1]);
        mma16816<T>(s[2 * np + 1], qa, kb[2], kb[3]);
        mma16816<T>(dp[2 * np], oa, vb[0], vb[1]);
        mma16816<T>(dp[2 * np + 1], oa, vb[2], vb[3]);
      }
    }

    dq_scores_to_ds(s, dp, p, has_bias, sBias, row_in_cta, m0, n0, lse2, dlt, c);

    // dQ += dS·K: the S accumulator layout is the A-operand layout (as P·V in the forward);
    // K[key][dim] is the k × n operand, read with .trans as V in the forward.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t da[4];
      pack_a_operand<T>(da, s, kk);
#pragma unroll
      for (int dd = 0; dd < kD / 16; ++dd) {
        const int k_off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kS + dd * 16 + (lane / 16) * 8;
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, sK + k_off);
        mma16816<T>(acc[2 * dd], da, kb[0], kb[1]);
        mma16816<T>(acc[2 * dd + 1], da, kb[2], kb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  store_dq<T>(p, acc, b, h, m0, row_in_cta, c);
}

// ----------------------------------------------------------------------------------------------
// dK, dV: the transposed tiling. Element (nt, e) of Sᵀ / dPᵀ is key n0 + 16·warp + g + 8(e/2),
// query m0 + 8nt + 2c + e%2. Keys that no query of this CTA sees still get their zeros stored.
// ----------------------------------------------------------------------------------------------
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dkdv_kernel(const BwdParams p) {
  using T = typename Tr::T;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD, kS = Tr::kStride;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * kS;
  T* sQdO = sV + kBN * kS;  // stage s: Q at sQdO + 2s·kBM·kS, then dO
  float* sLse = reinterpret_cast<float*>(smem_raw + Tr::kSmemElems * sizeof(T));
  float* sDelta = sLse + kBM;
  float* sBias = reinterpret_cast<float*>(smem_raw + Tr::kSmemBytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const BwdDkdvBlock<T> blk = bwd_dkdv_block<T, kBN, kBM>(p);
  const int b = blk.b, hkv = blk.hkv, n0 = blk.n0, steps = blk.steps;

  const T *gK = blk.k, *gV = blk.v;
  auto head_of = [&](int step) { return blk.head_of(step); };
  auto row0_of = [&](int step) { return blk.row0_of(step, kBM); };
  auto load_qdo = [&](int stage, int step) {
    T* base = sQdO + stage * 2 * kBM * kS;
    const int h = head_of(step), m0 = row0_of(step);
    const T* gQ = head_rows<T>(p.q, p.q_sb, p.q_sh, b, h);
    const T* gdO = head_rows<T>(p.dout, p.do_sb, p.do_sh, b, h);
    load_tile<Tr, kBM>(base, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
    load_tile<Tr, kBM>(base + kBM * kS, gdO + m0 * p.do_sn, (int)p.do_sn, p.Nq - m0, p.d_v, tid);
  };
  load_tile<Tr, kBN>(sK, gK + n0 * p.k_sn, (int)p.k_sn, p.Nk - n0, p.d_qk, tid);
  load_tile<Tr, kBN>(sV, gV + n0 * p.v_sn, (int)p.v_sn, p.Nk - n0, p.d_v, tid);
  if (steps > 0) load_qdo(0, 0);
  cp_async_commit();

  float acc_k[kD / 8][4], acc_v[kD / 8][4];
  zero_accumulators<true>(acc_k, acc_v);

  const bool has_bias = p.bias != nullptr;
  const int key_in_cta = 16 * warp + g;

  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    const int h = head_of(step), m0 = row0_of(step);
    if (step + 1 < steps) load_qdo(stage ^ 1, step + 1);
    cp_async_commit();
    // Row statistics and bias are single-buffered: the barrier ending the previous step retired
    // their readers; the barrier below publishes them.
    if (tid < kBM) {
      const int i = m0 + tid;
      const int64_t li = ((int64_t)b * p.H + h) * p.Nq + i;
      sLse[tid] = i < p.Nq ? lse_log2(p, li) : INFINITY;
      sDelta[tid] = i < p.Nq ? p.delta[li] : 0.f;
    }
    if (has_bias)
      stage_bias<Tr>(sBias, p.bias, (int64_t)b * p.b_sb + (int64_t)h * p.b_sh, p.b_sm, p.b_sn, m0, n0, p.Nq, p.Nk,
                     p.bias_is_f32, kLog2e, tid);
    cp_async_wait<1>();
    __syncthreads();
    const T* sQ = sQdO + stage * 2 * kBM * kS;
    const T* sdO = sQ + kBM * kS;

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warp's 16 keys are the A operand, queries the n dimension.
    float st[kBM / 8][4], dpt[kBM / 8][4];
#pragma unroll
    for (int i = 0; i < kBM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll 1
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t ka[4], va[4];
      const int a_off = (16 * warp + (lane % 16)) * kS + ks * 16 + (lane / 16) * 8;
      ldmatrix_x4(ka, sK + a_off);
      ldmatrix_x4(va, sV + a_off);
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        const int b_off = (np * 16 + (lane % 8) + (lane / 16) * 8) * kS + ks * 16 + ((lane / 8) % 2) * 8;
        uint32_t qb[4], ob[4];
        ldmatrix_x4(qb, sQ + b_off);
        ldmatrix_x4(ob, sdO + b_off);
        mma16816<T>(st[2 * np], ka, qb[0], qb[1]);
        mma16816<T>(st[2 * np + 1], ka, qb[2], qb[3]);
        mma16816<T>(dpt[2 * np], va, ob[0], ob[1]);
        mma16816<T>(dpt[2 * np + 1], va, ob[2], ob[3]);
      }
    }

    dkdv_scores_to_ds(st, dpt, p, has_bias, sBias, kBN, sLse, sDelta, key_in_cta, m0, n0, kBN, c);

    // dV += Pᵀ·dO and dK += dSᵀ·Q: k runs over queries; dO, Q [query][dim] read with .trans.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t pa[4], da[4];
      pack_a_operand<T>(pa, st, kk);
      pack_a_operand<T>(da, dpt, kk);
#pragma unroll
      for (int dd = 0; dd < kD / 16; ++dd) {
        const int t_off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kS + dd * 16 + (lane / 16) * 8;
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, sdO + t_off);
        ldmatrix_x4_trans(qb, sQ + t_off);
        mma16816<T>(acc_v[2 * dd], pa, ob[0], ob[1]);
        mma16816<T>(acc_v[2 * dd + 1], pa, ob[2], ob[3]);
        mma16816<T>(acc_k[2 * dd], da, qb[0], qb[1]);
        mma16816<T>(acc_k[2 * dd + 1], da, qb[2], qb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  store_dkdv<T>(p, acc_k, acc_v, b, hkv, n0, key_in_cta, c);
}

// Largest dynamic shared memory of the dq / dkdv launches at padded head dim kd (bytes); the host
// falls back to the ATen backward where the device's opt-in limit is smaller (99 KB on sm_86/89).
inline int bwd_smem_bytes(int kd, bool has_bias) {
  auto need = [&](auto dq, auto dkdv) {
    using Dq = decltype(dq);
    using Dkv = decltype(dkdv);
    return std::max(Dq::kSmemBytes + (has_bias ? Dq::kBiasBytes : 0),
                    Dkv::kSmemBytes + (has_bias ? Dkv::kBiasBytes : 0));
  };
  switch (kd) {
    case 32:
      return need(BwdTraits<__half, 32, false>{}, BwdTraits<__half, 32, true>{});
    case 64:
      return need(BwdTraits<__half, 64, false>{}, BwdTraits<__half, 64, true>{});
    case 96:
      return need(BwdTraits<__half, 96, false>{}, BwdTraits<__half, 96, true>{});
    default:
      return need(BwdTraits<__half, 128, false>{}, BwdTraits<__half, 128, true>{});
  }
}

// Dispatch on the padded head dim (32, 64, 96 or 128): delta, dq and dkdv launches, each checked.
// Instantiated in attention_bwd_<dtype>.cu.
template <typename T>
void launch_bwd_dispatch(const BwdParams& p, int kd, cudaStream_t stream);

}  // namespace attn
}  // namespace fastcm
