// Attention backward for sm_90a: the dQ and dK/dV kernels of attention_bwd_kernel.cuh (same
// formulas, block order, causal skip, GQA loop, dS step and epilogues) on wgmma. Two warpgroups per
// CTA, each owning 64 of the CTA's 128 rows (dQ: query rows; dK/dV: keys); the streamed tiles of 64
// rows (dQ: K, V; dK/dV: Q, dO) go through a 2-stage cp.async ring in the 128-byte-swizzled layout the
// descriptors read (load_tile_sw128, as the cp.async forward). Per tile:
//   dQ:   S = Q·Kᵀ, dP = dO·Vᵀ      SS wgmma m64n64k16 (B = K, V read K-major)
//         dS in the S registers     dq_scores_to_ds
//         dQ += dS·K                RS wgmma m64n{kD}k16 (dS packed as the A operand, K read MN-major)
//   dK/dV: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ   SS (A = this warpgroup's keys of the resident K, V)
//         Pᵀ, dSᵀ                   dkdv_scores_to_ds, LSE and δ rows staged with each Q, dO stage
//         dV += Pᵀ·dO, dK += dSᵀ·Q  RS (dO, Q read MN-major)
// Padded head dim kD ∈ {64, 128} (D_qk, D_v both padded to it). kBias: the kernels stage an fp32 bias
// tile per step as the mma.sync ones do (stage_bias, between the ring's barriers); a separate
// instantiation, so unbiased calls carry no bias reads. Accumulators per thread at kD = 128: dK, dV 64 + 64 (dQ: 64),
// Sᵀ, dPᵀ 32 + 32, the packed operands 16 + 16: the register budget of the cp.async forward's d 128 JVP.
#pragma once

#include "attention_bwd_kernel.cuh"
#include "attention_fwd_sm90_kernel.cuh"

namespace fastcm {
namespace attn {

// kKeyMajor: the dK/dV kernel. kThreads, kD: what load_tile_sw128 reads; kBM, kBN: the bias tile
// (query rows × keys of one step) stage_bias reads.
template <typename T_, int kD_, bool kKeyMajor_, bool kBias_>
struct BwdSm90Traits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr bool kKeyMajor = kKeyMajor_;
  static constexpr bool kBias = kBias_;
  static constexpr int kThreads = 256;                 // 2 warpgroups
  static constexpr int kOwnRows = 128;                 // the CTA's rows, 64 per warpgroup
  static constexpr int kTileRows = 64;                 // rows of a streamed tile
  static constexpr int kOwnBytes = kOwnRows * kD * 2;  // one of Q, dO (dQ) or K, V (dK/dV)
  static constexpr int kTileBytes = kTileRows * kD * 2;
  static constexpr int kBM = kKeyMajor ? kTileRows : kOwnRows, kBN = kKeyMajor ? kOwnRows : kTileRows;
  static constexpr int kBiasBytes = kBias ? kBM * kBN * 4 : 0;
  static constexpr int kStages = 2;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K, V (dQ) or Q, dO (dK/dV)
  // dK/dV: LSE (base 2) and δ of each stage's 64 query rows, after the ring.
  static constexpr int kRowStatBytes = kKeyMajor ? kStages * 2 * kTileRows * 4 : 0;
  // The bias tile after them; + 1024: the dynamic shared-memory base is realigned to the 1024-byte
  // swizzle period.
  static constexpr int kSmemBytes = 2 * kOwnBytes + kStages * kStageBytes + kRowStatBytes + kBiasBytes + 1024;
  static_assert(kD == 64 || kD == 128, "wgmma backward head dims");
};

// Dynamic shared memory of the larger of the two launches at padded head dim kd (64 or 128).
inline int bwd_sm90_smem_bytes(int kd, bool has_bias) {
  if (kd == 64) {
    return has_bias ? BwdSm90Traits<__half, 64, true, true>::kSmemBytes
                    : BwdSm90Traits<__half, 64, true, false>::kSmemBytes;
  }
  return has_bias ? BwdSm90Traits<__half, 128, true, true>::kSmemBytes
                  : BwdSm90Traits<__half, 128, true, false>::kSmemBytes;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// D = A·Bᵀ over kD/16 k-steps, SS: a_base = this warpgroup's rows of a tile of kRowsA rows, b_base a
// tile of kRowsB rows (both K-major, the head dim contiguous). Issued and committed, not waited on.
template <class Tr, int kRowsA, int kRowsB, int kNT>
__device__ __forceinline__ void issue_score_chain(float (&d)[kNT][4], uint32_t a_base, uint32_t b_base) {
#pragma unroll
  for (int ks = 0; ks < Tr::kD / 16; ++ks) {
    s_chain_k_step<typename Tr::T, kRowsA>(d, a_base, ks, sm90::desc_sw128(b_base + sw128_k_step(ks, kRowsB), 16, 1024),
                                           ks > 0);
  }
}

// acc += A·B over 64 rows of B (k = the streamed tile's rows): A = the packed fragments a[kk], B a
// tile of 64 rows read MN-major (k-step kk = 16 rows = 2048 bytes down each panel).
template <class Tr, int kNTO>
__device__ __forceinline__ void issue_grad_chain(float (&acc)[kNTO][4], const uint32_t (&a)[4][4], uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    sm90::WgmmaRS<typename Tr::T, kNTO, true>::run(acc, a[kk], sm90::desc_sw128(b_base + kk * 2048, 64 * 128, 1024), 1);
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// dQ: one CTA per (b, h, 128 query rows), heaviest (causal) tiles first as the mma.sync kernel.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_bwd_dq_sm90_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using namespace sm90;
  constexpr int kBM = Tr::kOwnRows, kBN = Tr::kTileRows, kD = Tr::kD;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = swizzle_aligned(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sdO = smem + Tr::kOwnBytes;
  unsigned char* sKV = smem + 2 * Tr::kOwnBytes;  // stage s: K at sKV + s·kStageBytes, then V
  float* sBias = reinterpret_cast<float*>(sKV + Tr::kStages * Tr::kStageBytes);  // kBias: [kBM][kBN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);  // warp-uniform: descriptors in uniform registers
  const int g = lane / 4, c = lane % 4;
  const BwdDqBlock<T> blk = bwd_dq_block<T, kBM, kBN>(p);
  const int bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0, n_tiles = blk.n_tiles;

  const T *gQ = blk.q, *gdO = blk.dout, *gK = blk.k, *gV = blk.v;

  auto load_kv = [&](int stage, int tile) {
    unsigned char* base = sKV + stage * Tr::kStageBytes;
    const int n0 = tile * kBN, rows = p.Nk - n0;
    load_tile_sw128<Tr, kBN>(base, gK + n0 * p.k_sn, (int)p.k_sn, rows, p.d_qk, tid);
    load_tile_sw128<Tr, kBN>(base + Tr::kTileBytes, gV + n0 * p.v_sn, (int)p.v_sn, rows, p.d_v, tid);
  };
  load_tile_sw128<Tr, kBM>(sQ, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
  load_tile_sw128<Tr, kBM>(sdO, gdO + m0 * p.do_sn, (int)p.do_sn, p.Nq - m0, p.d_v, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int row_in_cta = 16 * warp + g;  // = 64·wg + 16·(warp % 4) + g
  float lse2[2], dlt[2];
  dq_row_stats(p, bh, m0, row_in_cta, lse2, dlt);
  float acc[kD / 8][4];
  zero_accumulators<false>(acc, acc);
  const uint32_t q_base = smem_addr(sQ) + wg * 64 * 128, do_base = smem_addr(sdO) + wg * 64 * 128;
  const int64_t bias_base = (int64_t)b * p.b_sb + (int64_t)h * p.b_sh;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();
    // The barrier below publishes the bias tile; the one ending the previous tile retired its readers.
    if constexpr (Tr::kBias)
      stage_bias<Tr>(sBias, p.bias, bias_base, p.b_sm, p.b_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_is_f32,
                     1.4426950408889634f, tid);
    cp_async_wait<1>();  // everything but the group just committed has landed
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_base = smem_addr(sKV + stage * Tr::kStageBytes), v_base = k_base + Tr::kTileBytes;

    float s[kBN / 8][4], dp[kBN / 8][4];
    fence_regs(s);
    fence_regs(dp);
    wgmma_fence();
    issue_score_chain<Tr, kBM, kBN>(s, q_base, k_base);
    issue_score_chain<Tr, kBM, kBN>(dp, do_base, v_base);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    fence_regs(dp);

    dq_scores_to_ds(s, dp, p, Tr::kBias, sBias, row_in_cta, m0, tile * kBN, lse2, dlt, c);
    uint32_t da[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) pack_a_operand<T>(da[kk], s, kk);
    fence_regs(da);
    fence_regs(acc);
    wgmma_fence();
    issue_grad_chain<Tr>(acc, da, k_base);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
    __syncthreads();  // both warpgroups are done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (n_tiles == 0 leaves Q's group)
  store_dq<T>(p, acc, b, h, m0, row_in_cta, c);
#else
  __trap();  // launched only on sm_90 devices, from a build with sm_90a code (FASTCM_WITH_SM90A)
#endif
}

// dK, dV: one CTA per (b, kv head, 128 keys); loops over the G query heads of the group × their
// query tiles of 64 rows, skipping (causal) the tiles before the first that sees key n0.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_bwd_dkdv_sm90_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using namespace sm90;
  constexpr int kBN = Tr::kOwnRows, kBM = Tr::kTileRows, kD = Tr::kD;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = swizzle_aligned(smem_raw);
  unsigned char* sK = smem;
  unsigned char* sV = smem + Tr::kOwnBytes;
  unsigned char* sQdO = smem + 2 * Tr::kOwnBytes;  // stage s: Q at sQdO + s·kStageBytes, then dO
  float* sStat = reinterpret_cast<float*>(sQdO + Tr::kStages * Tr::kStageBytes);  // [stage][LSE | δ][kBM]
  float* sBias = sStat + Tr::kStages * 2 * kBM;                                   // kBias: [kBM][kBN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int g = lane / 4, c = lane % 4;
  const BwdDkdvBlock<T> blk = bwd_dkdv_block<T, kBN, kBM>(p);
  const int b = blk.b, hkv = blk.hkv, n0 = blk.n0, steps = blk.steps;

  const T *gK = blk.k, *gV = blk.v;
  auto head_of = [&](int step) { return blk.head_of(step); };
  auto row0_of = [&](int step) { return blk.row0_of(step, kBM); };
  // Q, dO by cp.async; the rows' LSE and δ by plain stores, published by the same barrier.
  auto load_qdo = [&](int stage, int step) {
    unsigned char* base = sQdO + stage * Tr::kStageBytes;
    const int h = head_of(step), m0 = row0_of(step);
    const T* gQ = head_rows<T>(p.q, p.q_sb, p.q_sh, b, h);
    const T* gdO = head_rows<T>(p.dout, p.do_sb, p.do_sh, b, h);
    load_tile_sw128<Tr, kBM>(base, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
    load_tile_sw128<Tr, kBM>(base + Tr::kTileBytes, gdO + m0 * p.do_sn, (int)p.do_sn, p.Nq - m0, p.d_v, tid);
    if (tid < kBM) {
      const int i = m0 + tid;
      const int64_t li = ((int64_t)b * p.H + h) * p.Nq + i;
      sStat[stage * 2 * kBM + tid] = i < p.Nq ? lse_log2(p, li) : INFINITY;
      sStat[stage * 2 * kBM + kBM + tid] = i < p.Nq ? p.delta[li] : 0.f;
    }
  };
  load_tile_sw128<Tr, kBN>(sK, gK + n0 * p.k_sn, (int)p.k_sn, p.Nk - n0, p.d_qk, tid);
  load_tile_sw128<Tr, kBN>(sV, gV + n0 * p.v_sn, (int)p.v_sn, p.Nk - n0, p.d_v, tid);
  if (steps > 0) load_qdo(0, 0);
  cp_async_commit();

  float acc_k[kD / 8][4], acc_v[kD / 8][4];
  zero_accumulators<true>(acc_k, acc_v);
  const int key_in_cta = 16 * warp + g;  // = 64·wg + 16·(warp % 4) + g
  const uint32_t k_base = smem_addr(sK) + wg * 64 * 128, v_base = smem_addr(sV) + wg * 64 * 128;

  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < steps) load_qdo(stage ^ 1, step + 1);
    cp_async_commit();
    if constexpr (Tr::kBias) {
      stage_bias<Tr>(sBias, p.bias, (int64_t)b * p.b_sb + (int64_t)head_of(step) * p.b_sh, p.b_sm, p.b_sn,
                     row0_of(step), n0, p.Nq, p.Nk, p.bias_is_f32, 1.4426950408889634f, tid);
    }
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t q_base = smem_addr(sQdO + stage * Tr::kStageBytes), do_base = q_base + Tr::kTileBytes;
    const float* sLse = sStat + stage * 2 * kBM;

    float st[kBM / 8][4], dpt[kBM / 8][4];
    fence_regs(st);
    fence_regs(dpt);
    wgmma_fence();
    issue_score_chain<Tr, kBN, kBM>(st, k_base, q_base);
    issue_score_chain<Tr, kBN, kBM>(dpt, v_base, do_base);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(st);
    fence_regs(dpt);

    dkdv_scores_to_ds(st, dpt, p, Tr::kBias, sBias, kBN, sLse, sLse + kBM, key_in_cta, row0_of(step), n0, kBN, c);
    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      pack_a_operand<T>(pa[kk], st, kk);
      pack_a_operand<T>(da[kk], dpt, kk);
    }
    fence_regs(pa);
    fence_regs(da);
    fence_regs(acc_v);
    fence_regs(acc_k);
    wgmma_fence();
    issue_grad_chain<Tr>(acc_v, pa, do_base);
    issue_grad_chain<Tr>(acc_k, da, q_base);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc_v);
    fence_regs(acc_k);
    __syncthreads();
  }
  cp_async_wait<0>();
  store_dkdv<T>(p, acc_k, acc_v, b, hkv, n0, key_in_cta, c);
#else
  __trap();
#endif
}

// δ, dQ and dK/dV launches at padded head dim kd ∈ {64, 128}, with bias tiles where p.bias is set;
// instantiated in attention_bwd_sm90_<dtype>.cu. The caller checks the device (sm_90) and the
// shared memory (bwd_sm90_smem_bytes).
template <typename T>
void launch_bwd_sm90_dispatch(const BwdParams& p, int kd, cudaStream_t stream);

}  // namespace attn
}  // namespace fastcm
