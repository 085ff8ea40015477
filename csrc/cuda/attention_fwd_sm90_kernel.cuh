// Attention forward (primal, or primal + tangent) for sm_90a: the online softmax and the formula
// contract of attention_fwd_kernel.cuh, with the products on wgmma (warpgroup MMA) instead of
// mma.sync.
//
// Work split: one CTA = 2 warpgroups = one tile of BM = 128 query rows of one (b, h); warpgroup wg
// owns rows 64·wg..64·wg + 63 (one m64 wgmma tile), warp w of it rows 16w..16w + 15 of those, in the
// same per-thread layout as the sm_80 kernel (so the softmax, mask and epilogue helpers are shared).
// All 256 threads stream K, V (K̇, V̇) tiles of BN keys into a 2-stage cp.async ring.
//
// Per key tile and warpgroup:
//   S = Q·Kᵀ                          d/16 SS wgmma m64n{BN}k16 (Q, K K-major in smem)
//   Ṡ = Q̇·Kᵀ + Q·K̇ᵀ                  2·d/16 SS wgmma into one accumulator
//   softmax in registers; P, H = P·Ṡ converted to bf16/fp16 A fragments in place
//   A += P·V                          BN/16 RS wgmma m64n{d}k16 (V MN-major in smem: transposed read)
//   T += P·V̇ + H·V                   2·BN/16 RS wgmma into ONE accumulator (the [p | h]·[V̇ ; V] form)
// Each chain is committed and waited before its results are touched. Warpgroup 1 issues its S chain
// only after warpgroup 0 has issued its own (a named barrier), so the tensor cores run WG0's S, then
// WG1's S while WG0 does its softmax, then WG0's P·V while WG1 does its softmax, and so on: the
// softmax of one warpgroup overlaps the products of the other instead of both waiting together.
//
// Shared memory: every operand tile is stored in wgmma's 128-byte-swizzle canonical layout: 64-
// column panels (128 bytes of a row), each panel ROWS rows × 128 B, the 16-byte chunk c of row r at
// r·128 + ((c ⊕ (r mod 8))·16). Tiles start at 1024-byte boundaries (the swizzle period).
// cp.async writes through the generic proxy and wgmma reads through the async proxy: each thread
// runs fence.proxy.async after its copies land, before the barrier that publishes them.
//
// Head dims: one template parameter kD ∈ {64, 128} for Q/K and V (the host pads both to it, the
// sm_80 kernel's (d, d) rule); other head dims and non-sm_90 devices take the sm_80 kernel.
// Bias / bias_t: staged per key tile into fp32 [BM][BN] tiles after the ring, as in the sm_80
// kernel; the host sends a call whose tiles would pass the device's shared-memory limit (d = 128
// JVP with both bias and bias_t: 257 KB) to the sm_80 kernel.
#pragma once

#include "attention_fwd_kernel.cuh"
#include "wgmma.cuh"

namespace fastcm {
namespace attn {

// kBias: the kernel stages bias (and bias_t) tiles; a separate instantiation, so that unbiased calls
// carry no per-element bias reads (64 predicated LDS per thread and tile at d = 64 JVP).
template <typename T_, int kD_, bool kJvp_, bool kBias_>
struct FwdSm90Traits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr bool kJvp = kJvp_;
  static constexpr bool kBias = kBias_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBM = 64 * kWarpGroups;
  // Accumulator registers per thread: A, T = kD/2 each, S, Ṡ = BN/2 each. JVP at kD = 128 with
  // BN = 64 is 192 (plus the P, H fragments, which reuse S, Ṡ once converted); BN = 128 would be 256.
  static constexpr int kBN = kJvp ? 64 : 128;
  static constexpr int kPanels = kD / 64;        // 128-byte swizzle rows per tile row
  static constexpr int kQBytes = kBM * kD * 2;   // one Q-like tile
  static constexpr int kKVBytes = kBN * kD * 2;  // one K-, V-, K̇- or V̇-like tile
  static constexpr int kQTiles = kJvp ? 2 : 1;   // Q, Q̇
  // One ring stage holds K, V (+ K̇, V̇) in this order, each tile 1024-byte aligned.
  static constexpr int kOffV = kKVBytes, kOffKt = 2 * kKVBytes, kOffVt = 3 * kKVBytes;
  static constexpr int kStageBytes = (kJvp ? 4 : 2) * kKVBytes;
  static constexpr int kStages = 2;
  // + 1024: the dynamic shared-memory base is only guaranteed 16-byte aligned; the kernel rounds it up.
  // The optional fp32 bias tiles follow (bias_smem_bytes).
  static constexpr int kSmemBytes = kQTiles * kQBytes + kStages * kStageBytes + 1024;
  static constexpr int kNTileS = kBN / 8;  // n8 blocks of S per thread
  static constexpr int kNTileO = kD / 8;   // n8 blocks of O per thread
  static_assert(kD == 64 || kD == 128, "wgmma kernel head dims");
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "tiles keep the 1024-byte swizzle alignment");
};

// Dynamic shared memory of the sm_90a kernel for padded head dim kd (64 or 128), with the bias tiles.
inline int fwd_sm90_smem_bytes(int kd, bool jvp, bool has_bias, bool has_bias_t) {
  auto bytes = [&](auto tr) {
    using Tr = decltype(tr);
    return Tr::kSmemBytes + bias_smem_bytes<Tr>(has_bias, has_bias_t);
  };
  if (kd == 64)
    return jvp ? bytes(FwdSm90Traits<__half, 64, true, true>{}) : bytes(FwdSm90Traits<__half, 64, false, true>{});
  return jvp ? bytes(FwdSm90Traits<__half, 128, true, true>{}) : bytes(FwdSm90Traits<__half, 128, false, true>{});
}

// Copy a ROWS × kD tile whose first row starts at `g` (row stride `stride` elements) into the
// swizzled layout: element (r, col) goes to panel col/64, chunk (col%64)/8 of row r. Rows ≥
// rows_valid and columns ≥ d_valid are zero-filled. Consecutive threads take consecutive chunks of
// a row (coalesced global reads; the 8 chunks of a 128-byte row land in 8 distinct bank groups).
template <class Tr, int ROWS>
__device__ __forceinline__ void load_tile_sw128(unsigned char* smem, const typename Tr::T* g, int stride,
                                                int rows_valid, int d_valid, int tid) {
  constexpr int kChunks = Tr::kD / 8;
  constexpr int kRowStep = Tr::kThreads / kChunks;
  static_assert(ROWS % kRowStep == 0, "tile loader layout");
  const int c = tid % kChunks, r0 = tid / kChunks;
  const int panel = c / 8, cc = c % 8;
  const bool col_ok = c * 8 < d_valid;
#pragma unroll
  for (int it = 0; it < ROWS / kRowStep; ++it) {
    const int r = r0 + it * kRowStep;
    const bool ok = col_ok && r < rows_valid;
    const typename Tr::T* src = ok ? g + (r * stride + c * 8) : g;
    cp_async16(smem + panel * (ROWS * 128) + r * 128 + ((cc ^ (r & 7)) << 4), src, ok ? 16 : 0);
  }
}

// The dynamic shared-memory base rounded up to the 1024-byte period of the 128-byte swizzle (the
// base is only guaranteed 16-byte aligned; the kernels' kSmemBytes include the 1024 bytes of slack).
__device__ __forceinline__ unsigned char* swizzle_aligned(unsigned char* smem_raw) {
  return smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
}

// Byte offset of k-step ks (16 columns) in a K-major swizzled tile of `rows` rows: panel ks/4, byte
// (ks%4)·32 of each 128-byte row (8-row groups are 1024 bytes apart: the descriptors' SBO).
__device__ __forceinline__ uint32_t sw128_k_step(int ks, int rows) {
  return (uint32_t)((ks / 4) * rows * 128 + (ks % 4) * 32);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One k-step (16 columns of the head dim) of an S chain, D (+)= A·Bᵀ with B = K or K̇ read K-major
// (desc_b). A = this warpgroup's rows of Q or Q̇: a_base, the shared-memory tile (SS; kRows rows, so
// panels are kRows·128 bytes apart), or a, its fragments in registers (RS; load_a_fragments).
template <typename T, int kRows, int kNT>
__device__ __forceinline__ void s_chain_k_step(float (&d)[kNT][4], uint32_t a_base, int ks, uint64_t desc_b,
                                               int scale_d) {
  sm90::WgmmaSS<T, kNT>::run(d, sm90::desc_sw128(a_base + sw128_k_step(ks, kRows), 16, 1024), desc_b, scale_d);
}
template <typename T, int kRows, int kNT, int kKS>
__device__ __forceinline__ void s_chain_k_step(float (&d)[kNT][4], const uint32_t (&a)[kKS][4], int ks, uint64_t desc_b,
                                               int scale_d) {
  sm90::WgmmaRS<T, kNT, false>::run(d, a[ks], desc_b, scale_d);
}

// The RS A fragments of this warp's 16 rows of a swizzled tile (a_base: the warpgroup's row 0 of a
// tile of kRows rows), one per k-step: ldmatrix.x4 matrices 0..3 = (rows 0-7 | 8-15) × (columns
// 0-7 | 8-15) of the k-step, i.e. registers a[ks][0..3] in the m16k16 A order. Lane l addresses row
// l % 8 (+ 8 for odd l / 8) of the 16-byte chunk 2·(ks % 4) + l / 16, XOR the row's swizzle phase.
template <int kRows, int kKS>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[kKS][4], uint32_t a_base, int warp_in_wg, int lane) {
  const int row = 16 * warp_in_wg + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int ks = 0; ks < kKS; ++ks) {
    const int chunk = 2 * (ks % 4) + lane / 16;
    const uint32_t addr = a_base + (ks / 4) * kRows * 128 + row * 128 + ((chunk ^ (row % 8)) * 16);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a[ks][0]), "=r"(a[ks][1]), "=r"(a[ks][2]), "=r"(a[ks][3])
                 : "r"(addr));
  }
}

// Issues (and commits, without waiting) this warpgroup's S = Q·Kᵀ and Ṡ = Q̇·Kᵀ + Q·K̇ᵀ chains, 64 ×
// kBN each, over kD/16 k-steps. q, qt: this warpgroup's rows of Q, Q̇, as shared-memory addresses
// (SS wgmma) or register fragments (RS; s_chain_k_step); k_base: the stage (K, V, K̇, V̇ at Tr's
// offsets). The first k-step overwrites (scale_d = 0).
template <class Tr, int kNT, int kNTd, typename QOperand>
__device__ __forceinline__ void issue_s_chain(float (&s)[kNT][4], float (&sd)[kNTd][4], const QOperand& q,
                                              const QOperand& qt, uint32_t k_base) {
  using namespace sm90;
  using T = typename Tr::T;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN;
  const uint32_t kt_base = k_base + Tr::kOffKt;
  auto desc_k = [&](uint32_t base, int ks) { return desc_sw128(base + sw128_k_step(ks, kBN), 16, 1024); };
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < Tr::kD / 16; ++ks) s_chain_k_step<T, kBM>(s, q, ks, desc_k(k_base, ks), ks > 0);
  if constexpr (Tr::kJvp) {
#pragma unroll
    for (int ks = 0; ks < Tr::kD / 16; ++ks) s_chain_k_step<T, kBM>(sd, qt, ks, desc_k(k_base, ks), ks > 0);
#pragma unroll
    for (int ks = 0; ks < Tr::kD / 16; ++ks) s_chain_k_step<T, kBM>(sd, q, ks, desc_k(kt_base, ks), 1);
  }
  wgmma_commit();
}

// Scale, bias, mask and online softmax of one tile's S (Ṡ): s, sd become P and H = P·Ṡ, the row
// statistics move on, alpha is the factor A (and T) must be rescaled by before this tile's P·V.
template <class Tr, int kNT, int kNTd>
__device__ __forceinline__ void softmax_scores(float (&s)[kNT][4], float (&sd)[kNTd][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&row_r)[2], float (&alpha)[2],
                                               const FwdParams p, const FwdBiasTiles bias, int row_in_cta, int m0,
                                               int n0, int off, int c) {
  constexpr int kBN = Tr::kBN;
  constexpr bool kJvp = Tr::kJvp;
  const bool need_mask = (n0 + kBN > p.Nk) || (p.causal && (n0 + kBN - 1 > m0 + off));
  scores_to_log2<kJvp, kBN, true>(s, sd, p, bias.has_bias, bias.bias, bias.has_bias_t, bias.bias_t, row_in_cta, m0, n0,
                                  off, need_mask, c);
  online_softmax<typename Tr::T, kJvp>(s, sd, row_max, row_sum, row_r, alpha);
}

// P, H (in s, sd after softmax_scores) packed into RS A fragments pa, ha: the accumulator layout
// of n-tiles 2kk, 2kk + 1 is the A layout of keys 16kk..16kk + 15 per warp.
template <class Tr, int kNT, int kNTd, int kK, int kKh>
__device__ __forceinline__ void pack_operands(const float (&s)[kNT][4], const float (&sd)[kNTd][4],
                                              uint32_t (&pa)[kK][4], uint32_t (&ha)[kKh][4]) {
#pragma unroll
  for (int kk = 0; kk < Tr::kBN / 16; ++kk) {
    pack_a_operand<typename Tr::T>(pa[kk], s, kk);
    if constexpr (Tr::kJvp) pack_a_operand<typename Tr::T>(ha[kk], sd, kk);
  }
}

// Issues (and commits) A += P·V and T += P·V̇ + H·V: RS wgmma m64n{kD}k16 over kBN/16 k-steps, V,
// V̇ read MN-major (k-step kk = 16 keys = 2048 bytes down each panel; panels kBN·128 bytes apart).
template <class Tr, int kK, int kKh, int kNTO, int kNTOt>
__device__ __forceinline__ void issue_pv_chain(float (&acc_o)[kNTO][4], float (&acc_t)[kNTOt][4], uint32_t (&pa)[kK][4],
                                               uint32_t (&ha)[kKh][4], uint32_t k_base) {
  using namespace sm90;
  using T = typename Tr::T;
  constexpr int kBN = Tr::kBN;
  const uint32_t v_base = k_base + Tr::kOffV, vt_base = k_base + Tr::kOffVt;
  fence_regs(pa);
  if constexpr (Tr::kJvp) fence_regs(ha);
  fence_regs(acc_o);
  if constexpr (Tr::kJvp) fence_regs(acc_t);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const uint64_t dv = desc_sw128(v_base + kk * 2048, kBN * 128, 1024);
    WgmmaRS<T, kNTO, true>::run(acc_o, pa[kk], dv, 1);
    if constexpr (Tr::kJvp) {
      WgmmaRS<T, kNTO, true>::run(acc_t, pa[kk], desc_sw128(vt_base + kk * 2048, kBN * 128, 1024), 1);
      WgmmaRS<T, kNTO, true>::run(acc_t, ha[kk], dv, 1);
    }
  }
  wgmma_commit();
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_fwd_sm90_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using namespace sm90;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN;
  constexpr bool kJvp = Tr::kJvp;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kScheduleBarrier = 1;  // named barrier ordering the warpgroups' S chains

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = swizzle_aligned(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sQt = smem + Tr::kQBytes;                // valid only if kJvp
  unsigned char* sKV = smem + Tr::kQTiles * Tr::kQBytes;  // stage s: sKV + s·kStageBytes

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Broadcast from lane 0: the compiler then knows wg is warp-uniform, and the descriptors built
  // from it stay in uniform registers, where wgmma reads them.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int c = lane % 4;

  const FwdBlock<T> blk = fwd_block<T, kJvp, kBM, kBN>(p);
  const int bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles;
  const T *gQ = blk.q, *gK = blk.k, *gV = blk.v, *gQt = blk.q_t, *gKt = blk.k_t, *gVt = blk.v_t;

  auto load_kv = [&](int stage, int tile) {
    unsigned char* base = sKV + stage * Tr::kStageBytes;
    const int n0 = tile * kBN, rows = p.Nk - n0;
    load_tile_sw128<Tr, kBN>(base, gK + n0 * p.k_sn, (int)p.k_sn, rows, p.d_qk, tid);
    load_tile_sw128<Tr, kBN>(base + Tr::kOffV, gV + n0 * p.v_sn, (int)p.v_sn, rows, p.d_v, tid);
    if constexpr (kJvp) {
      load_tile_sw128<Tr, kBN>(base + Tr::kOffKt, gKt + n0 * p.kt_sn, (int)p.kt_sn, rows, p.d_qk, tid);
      load_tile_sw128<Tr, kBN>(base + Tr::kOffVt, gVt + n0 * p.vt_sn, (int)p.vt_sn, rows, p.d_v, tid);
    }
  };

  // Prologue: Q (+Q̇) and the first K/V tile form commit group 0.
  load_tile_sw128<Tr, kBM>(sQ, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
  if constexpr (kJvp) load_tile_sw128<Tr, kBM>(sQt, gQt + m0 * p.qt_sn, (int)p.qt_sn, p.Nq - m0, p.d_qk, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  float acc_o[Tr::kNTileO][4];
  float acc_t[kJvp ? Tr::kNTileO : 1][4];
  zero_accumulators<kJvp>(acc_o, acc_t);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float row_r[2] = {0.f, 0.f};
  const int row_in_cta = 16 * warp + lane / 4;  // = 64·wg + 16·(warp % 4) + g; + 8 for the second row

  // Optional fp32 bias tiles after the ring; kBias = false compiles them out.
  static_assert((Tr::kQTiles * Tr::kQBytes + Tr::kStages * Tr::kStageBytes) % 16 == 0, "bias tiles 16-byte aligned");
  FwdBiasTiles bias = fwd_bias_tiles<Tr>(p, sKV + Tr::kStages * Tr::kStageBytes, b, h);
  bias.has_bias = bias.has_bias && Tr::kBias;
  bias.has_bias_t = bias.has_bias_t && Tr::kBias;

  const uint32_t q_base = smem_addr(sQ) + wg * 64 * 128;  // this warpgroup's 64 query rows
  const uint32_t qt_base = smem_addr(sQt) + wg * 64 * 128;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();
    // The barrier below publishes the bias tiles; the one after the previous tile retired their readers.
    // (FASTCM_ATTN_BIAS_STAGE: p.bias_stage is uniform over the call; see stage_bias_vec.)
    if (bias.has_bias) {
      if (p.bias_stage)
        stage_bias_vec<Tr>(bias.bias, p.bias, bias.base, p.b_sm, p.b_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_mode,
                           kLog2e, tid);
      else
        stage_bias<Tr>(bias.bias, p.bias, bias.base, p.b_sm, p.b_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_is_f32, kLog2e,
                       tid);
    }
    if (bias.has_bias_t) {
      if (p.bias_stage)
        stage_bias_vec<Tr>(bias.bias_t, p.bias_t, bias.base_t, p.bt_sm, p.bt_sn, m0, tile * kBN, p.Nq, p.Nk,
                           p.bias_t_mode, 1.f, tid);
      else
        stage_bias<Tr>(bias.bias_t, p.bias_t, bias.base_t, p.bt_sm, p.bt_sn, m0, tile * kBN, p.Nq, p.Nk,
                       p.bias_t_is_f32, 1.f, tid);
    }
    cp_async_wait<1>();  // everything but the group just committed has landed
    fence_proxy_async();
    __syncthreads();

    const uint32_t k_base = smem_addr(sKV + stage * Tr::kStageBytes);
    float s[Tr::kNTileS][4];
    float sd[kJvp ? Tr::kNTileS : 1][4];
    fence_regs(s);
    if constexpr (kJvp) fence_regs(sd);
    if (wg == 1) named_barrier_sync(kScheduleBarrier, Tr::kThreads);  // after WG0 has issued its S chain
    issue_s_chain<Tr>(s, sd, q_base, qt_base, k_base);
    if (wg == 0) named_barrier_arrive(kScheduleBarrier, Tr::kThreads);
    wgmma_wait<0>();
    fence_regs(s);
    if constexpr (kJvp) fence_regs(sd);

    uint32_t pa[kBN / 16][4];
    uint32_t ha[kJvp ? kBN / 16 : 1][4];
    float alpha[2];
    softmax_scores<Tr>(s, sd, row_max, row_sum, row_r, alpha, p, bias, row_in_cta, m0, tile * kBN, off, c);
    rescale_accumulators<kJvp>(acc_o, acc_t, alpha);
    pack_operands<Tr>(s, sd, pa, ha);
    issue_pv_chain<Tr>(acc_o, acc_t, pa, ha, k_base);
    wgmma_wait<0>();
    fence_regs(acc_o);
    if constexpr (kJvp) fence_regs(acc_t);
    __syncthreads();  // both warpgroups are done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (n_tiles == 0 leaves Q's group)

  write_outputs<T, kJvp>(p, acc_o, acc_t, row_max, row_sum, row_r, m0 + row_in_cta, bh, b, h, c);
#else
  __trap();  // launched only on sm_90 devices, from a build with sm_90a code (FASTCM_WITH_SM90A)
#endif
}

// The sm_90a forward kernels: this file's (cp.async loads, bias tiles), and the warp-specialised
// TMA kernel of attention_fwd_sm90_ws_kernel.cuh without or with the intra-warpgroup overlap.
enum class Sm90Kernel { kCpAsync, kTma, kTmaOverlap };

// Dispatch on the padded head dim kd ∈ {64, 128} (D_qk and D_v both padded to it); instantiated in
// attention_fwd_sm90_<dtype>.cu. q_regs: the TMA kernel keeps Q, Q̇ in registers (kd = 64 only).
// The caller checks the device (sm_90), the shared memory (fwd_sm90_smem_bytes,
// fwd_sm90_ws_smem_bytes) and that TMA kernels get no bias.
template <typename T>
void launch_fwd_sm90_dispatch(const FwdParams& p, int kd, bool jvp, Sm90Kernel kernel, bool q_regs,
                              cudaStream_t stream);

}  // namespace attn
}  // namespace fastcm
