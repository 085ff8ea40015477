// Attention forward (primal, or primal + tangent) for sm_80 and later: FA2-style online softmax,
// tensor-core mma.sync m16n8k16 (bf16/fp16 operands, fp32 accumulators), cp.async double buffer.
//
// Formula contract (docs/DESIGN.md, "Attention with JVP"), per query row, in base-2 for the exponentials:
//   s  = (scale·q·kᵀ + bias)·log2e          ṡ = scale·(q̇·kᵀ + q·k̇ᵀ) + bias_t   (natural units)
//   m' = max(m, max_j s_j); α = 2^(m − m'); p_j = 2^(s_j − m'); h_j = rnd(p_j·ṡ_j)
//   ℓ ← αℓ + Σp;  r ← αr + Σh;  A ← αA + p·V;  T ← αT + [p | h]·[V̇ ; V]
// rnd rounds to the input dtype, as the H·V product reads h: r then sums exactly the h that T
// accumulates, so T/ℓ − μ·O cancels in the kernel as in the formula (one key: Ȯ = V̇ exactly, as
// PyTorch's low-precision math gives; a row-constant offset of ṡ leaves no 2⁻⁹·offset·V residue).
//   end: O = A/ℓ, μ = r/ℓ, Ȯ = T/ℓ − μ·O, LSE = (m + log2 ℓ)·ln2, LSE_t = μ
// The tangent accumulator T is ONE accumulator fed by both halves of the K = 2·BN product:
// per 16-key step we issue mma(T, p, V̇) and mma(T, h, V) into the same registers.
//
// Work split: one CTA = kWarps warps = one tile of BM = 16·kWarps query rows of one (b, h).
// Each warp owns 16 query rows for the whole kernel; there is no cross-warp reduction.
// Key/value tiles of BN rows stream through shared memory (2 stages, cp.async).
//
// Masking: keys j ≥ Nk (tail) and, if causal, j > i + (Nk − Nq) (bottom-right) get s = −inf and
// h = 0. Rows i ≥ Nq are computed on zero-filled Q and never stored. A row that sees no key ends
// with ℓ = 0 and is written as O = 0, Ȯ = 0, LSE = −inf, LSE_t = 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace fastcm {
namespace attn {

// ----------------------------------------------------------------------------------------------
// Parameters. Strides are in elements; the row strides of q/k/v and their tangents are < 2^23. Every pointer is 16-byte
// aligned and every row stride of q/k/v (and tangents) is a multiple of 8 elements (the host wrapper guarantees it), so
// each 8-element chunk of a row is one 16-byte cp.async.
// ----------------------------------------------------------------------------------------------
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* q_t;
  const void* k_t;
  const void* v_t;  // tangents (JVP only)
  const void* bias;
  const void* bias_t;  // may be null
  void* out;
  void* out_t;  // (B, H, Nq, Dv) views
  float* lse;
  float* lse_t;  // (B, H, Nq), contiguous

  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t qt_sb, qt_sh, qt_sn;
  int64_t kt_sb, kt_sh, kt_sn;
  int64_t vt_sb, vt_sh, vt_sn;
  int64_t b_sb, b_sh, b_sm, b_sn;      // bias strides (0 allowed)
  int64_t bt_sb, bt_sh, bt_sm, bt_sn;  // bias_t strides
  int64_t o_sb, o_sh, o_sn;
  int64_t ot_sb, ot_sh, ot_sn;

  int B, H, Hkv, Nq, Nk;
  int d_qk, d_v;  // actual head dims (multiples of 8, ≤ kDqk, kDv); columns beyond are zero
  int num_m_blocks;
  float scale;       // softmax scale (natural units)
  float scale_log2;  // scale·log2(e)
  int causal;
  int bias_is_f32, bias_t_is_f32;  // else the bias has the element type of q
  // FASTCM_ATTN_BIAS_STAGE (see stage_bias_vec): 0 scalar staging, row-major tiles; 1 vector staging.
  int bias_stage;
  // The staging of bias, bias_t packed as one argument: bit 0 is_f32, bit 1 bias_stage, bit 2 (vector
  // only) rows contiguous and 4-element chunks aligned (host-checked): a chunk is one vector load.
  int bias_mode, bias_t_mode;
};

// ----------------------------------------------------------------------------------------------
// Tile configuration: all index constants live here.
// ----------------------------------------------------------------------------------------------
// kDqk: padded head dim of Q and K (the k extent of S = Q·Kᵀ); kDv: padded head dim of the V / O
// columns of one launch (≤ 128; wider V runs as several launches). Instantiated pairs: kDqk = kDv
// ∈ {32, 64, 96, 128} and kDqk ∈ {192, 256} × kDv ∈ {64, 128} (attention_fwd_launch.cuh).
template <typename T_, int kDqk_, int kDv_, bool kJvp_>
struct FwdTraits {
  using T = T_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr bool kJvp = kJvp_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = 16 * kWarps;  // query rows per CTA
  // Registers per thread (fp32 accumulators): A = kDv/2, T = kDv/2, S = BN/2, Ṡ = BN/2; kDqk
  // only sets the trip count of the S loop (Q fragments are re-read per k-step), not registers.
  // JVP at kDv = 128 with BN = 64 would need 192 accumulator registers; BN = 32 keeps it ~160.
  // kDqk > 128: shared memory sets BN. Q, K rows are 2·(kDqk + 8) bytes, so the 2-stage ring
  // at kDqk = 256, kDv = 128 needs 83 KB (primal, BN = 32; 133 KB at BN = 64) and 116 KB (JVP,
  // BN = 16; 166 KB at BN = 32, over sm_80's 163 KB opt-in limit once a bias tile is added).
  static constexpr int kBN = kDqk > 128 ? (kJvp ? 16 : 32) : ((kJvp && kDv > 64) ? 32 : 64);
  static constexpr int kStrideQK = kDqk + 8;  // smem row lengths (+16 B: conflict-free ldmatrix)
  static constexpr int kStrideV = kDv + 8;
  static constexpr int kQElems = kBM * kStrideQK;  // one Q-like tile
  static constexpr int kKElems = kBN * kStrideQK;  // one K-like tile
  static constexpr int kVElems = kBN * kStrideV;   // one V-like tile
  static constexpr int kQTiles = kJvp ? 2 : 1;     // Q, Q̇
  // One ring stage holds K, V (+ K̇, V̇) in this order.
  static constexpr int kOffV = kKElems;
  static constexpr int kOffKt = kKElems + kVElems;
  static constexpr int kOffVt = 2 * kKElems + kVElems;
  static constexpr int kStageElems = (kJvp ? 2 : 1) * (kKElems + kVElems);
  static constexpr int kStages = 2;
  static constexpr int kSmemElems = kQTiles * kQElems + kStages * kStageElems;
  static constexpr int kSmemBytes = kSmemElems * (int)sizeof(T);
  static constexpr int kNTileS = kBN / 8;  // n8 tiles of S per warp
  static constexpr int kNTileO = kDv / 8;  // n8 tiles of O per warp
  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kBN % 16 == 0, "mma k-steps are 16 wide");
  static_assert(kDv <= 128, "wider V runs as several launches");
};

// ----------------------------------------------------------------------------------------------
// PTX wrappers.
// ----------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes 16 zero bytes (and reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of 8x8 matrix i; register i returns
// matrix i with lane L holding row L/4, columns 2(L%4), 2(L%4)+1 (two 16-bit values).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// .trans: lane L receives (row 2(L%4), col L/4) and (row 2(L%4)+1, col L/4) of each matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D = A·B + D, m16n8k16, row.col, fp32 accumulate.
// A (16x16, row-major) fragment, g = lane/4, c = lane%4:
//   a0 = A[g][2c..2c+1], a1 = A[g+8][2c..2c+1], a2 = A[g][2c+8..2c+9], a3 = A[g+8][2c+8..2c+9]
// B (16x8, k x n) fragment: b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
// C/D (16x8) fragment: d0,d1 = D[g][2c..2c+1], d2,d3 = D[g+8][2c..2c+1]
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x rounded to T (to nearest, as pack2 rounds) and back.
template <typename T>
__device__ __forceinline__ float round_to(float x);
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}
template <>
__device__ __forceinline__ float round_to<__half>(float x) {
  return __half2float(__float2half_rn(x));
}

// Two floats -> one 32-bit register of two 16-bit values, x in the low half (lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 v = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Accumulator tiles 2kk and 2kk+1 (keys 16kk..16kk+15 of an m16 row block) as the A operand of
// the next mma: the m16n8 C layout of two n-tiles is the m16k16 A layout, so the registers are
// only converted and paired, never moved between lanes.
template <typename T, int N>
__device__ __forceinline__ void pack_a_operand(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

__device__ __forceinline__ float load_scalar(const void* p, int64_t off, int is_f32, bool is_bf16) {
  if (is_f32) return __ldg(static_cast<const float*>(p) + off);
  if (is_bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
  return __half2float(static_cast<const __half*>(p)[off]);
}

// Copy a ROWS x kCols tile whose first row starts at `g` (row stride `stride` elements) into smem
// (row length kRowLen). Rows ≥ rows_valid and columns ≥ d_valid are zero-filled. kCols and kRowLen
// default to Tr::kD and Tr::kStride (the backward's traits); the forward passes them explicitly.
// Thread layout: column chunk (8 elements = 16 B) tid % kMapChunks, rows tid / kMapChunks + k·kRowStep.
// In-tile offsets are 32-bit (the host guarantees 256·stride < 2^31): with 64-bit per-chunk
// addresses the compiler hoisted one register pair per chunk out of the key loop and spilled.
template <class Tr, int ROWS, int kCols = Tr::kD, int kRowLen = Tr::kStride>
__device__ __forceinline__ void load_tile(typename Tr::T* smem, const typename Tr::T* g, int stride, int rows_valid,
                                          int d_valid, int tid) {
  constexpr int kChunks = kCols / 8;
  constexpr int kMapChunks = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;  // power of 2 ≥ kChunks
  constexpr int kRowStep = Tr::kThreads / kMapChunks;
  static_assert(Tr::kThreads % kMapChunks == 0 && ROWS % kRowStep == 0, "tile loader layout");
  const int c = tid % kMapChunks, r0 = tid / kMapChunks;
  if (kChunks != kMapChunks && c >= kChunks) return;
  const bool col_ok = c * 8 < d_valid;
#pragma unroll
  for (int it = 0; it < ROWS / kRowStep; ++it) {
    const int r = r0 + it * kRowStep;
    const bool ok = col_ok && r < rows_valid;
    const typename Tr::T* src = ok ? g + (r * stride + c * 8) : g;
    cp_async16(smem + r * kRowLen + c * 8, src, ok ? 16 : 0);
  }
}

// Stage bias[b, h, m0 : m0 + BM, n0 : n0 + BN] (times mult) into an fp32 smem tile [BM][BN] with
// Tr::kThreads threads. Consecutive threads read consecutive keys (coalesced for a row-major bias).
// Out-of-range elements are 0 (the caller masks them).
template <class Tr>
__device__ __forceinline__ void stage_bias_tile(float* dst, const void* src, int64_t base, int64_t sm, int64_t sn,
                                                int m0, int n0, int Nq, int Nk, int is_f32, float mult, int tid) {
  constexpr bool kIsBf16 = std::is_same<typename Tr::T, __nv_bfloat16>::value;
#pragma unroll 1
  for (int idx = tid; idx < Tr::kBM * Tr::kBN; idx += Tr::kThreads) {
    const int r = idx / Tr::kBN, cc = idx % Tr::kBN;
    const int i = m0 + r, j = n0 + cc;
    float v = 0.f;
    if (i < Nq && j < Nk) v = mult * load_scalar(src, base + (int64_t)i * sm + (int64_t)j * sn, is_f32, kIsBf16);
    dst[idx] = v;
  }
}

// stage_bias_tile behind a call, for the kernels that stage between their tile barriers with no
// wgmma in flight. __noinline__: inlined, its 64-bit address math pushed the sm_80 d = 128 JVP kernel
// into spills (36 B).
template <class Tr>
__device__ __noinline__ void stage_bias(float* dst, const void* src, int64_t base, int64_t sm, int64_t sn, int m0,
                                        int n0, int Nq, int Nk, int is_f32, float mult, int tid) {
  stage_bias_tile<Tr>(dst, src, base, sm, sn, m0, n0, Nq, Nk, is_f32, mult, tid);
}

// ---- The forward's bias staging modes (FASTCM_ATTN_BIAS_STAGE, read per call; FwdParams::bias_stage)
// scalar (0, default): stage_bias_tile above, one scalar global load per element under unroll 1, the
// tile row-major [kBM][kBN]. scores_to_log2 reads, per warp and accumulator entry pair, 8 rows × 4
// even keys: with rows kBN floats apart (a multiple of 32 banks) those 32 lanes share 4 of the 16
// 8-byte bank pairs of a half-warp's 64-bit access: 4-way conflicts (8-way as 32-bit reads).
// vector (1): stage_bias_tile_vec, 4 consecutive keys of a row per thread and pass, one vector load
// where the host found the rows contiguous and aligned (vec_ok), else one load per key (broadcast,
// strided or misaligned biases, and the Nk tail); row r's columns XOR bias_swizzle(r), which moves
// 8-key groups only (16-byte chunks stay whole and aligned) and gives the 4 rows of a half-warp's
// 8-byte read different bank pairs: conflict-free. Same shared-memory size. Only in the sm_90a
// kernels: the sm_80 one stages scalar in both modes (at its register limit, its d 64 and d 128 JVP
// instances spilled 4 and 20 B with the vector staging's calls and the swizzled reads).
// tests/cuda_index_model/test_attention_fwd_bias_staging.py checks the staging's coverage,
// placement, tails and banks.
template <int kBN>
__device__ __forceinline__ int bias_swizzle(int row) {
  return (row & 3) * 8 & (kBN - 1);
}

// The tile entry of row offset `row_base` (ri·kBN), key key_pair + odd (key_pair even), as
// scores_to_log2 reads it: kSwizzle (the sm_90a kernels), one 8-byte read of both keys of the pair
// (the loads of odd 0 and 1 are the same LDS.64) at column key_pair ^ x; else the row-major element.
template <bool kSwizzle>
__device__ __forceinline__ float bias_at(const float* tile, int row_base, int key_pair, int odd, int x) {
  if constexpr (kSwizzle) {
    const float2 b = *reinterpret_cast<const float2*>(tile + row_base + (key_pair ^ x));
    return odd ? b.y : b.x;
  } else {
    return tile[row_base + key_pair + odd];
  }
}

// Four consecutive bias elements at element offset `off` (4-element aligned), as floats.
__device__ __forceinline__ float4 load_bias4(const void* p, int64_t off, int is_f32, bool is_bf16) {
  if (is_f32) return __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p) + off));
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + off));
  float2 lo, hi;
  if (is_bf16) {
    lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  } else {
    lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  }
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// The vector mode's staging of the same tile as stage_bias_tile (times mult, 0 outside (Nq, Nk)):
// element (r, c) at dst[r·kBN + (c ^ bias_swizzle(r))]. dst 16-byte aligned.
template <class Tr>
__device__ __forceinline__ void stage_bias_tile_vec(float* dst, const void* src, int64_t base, int64_t sm, int64_t sn,
                                                    int m0, int n0, int Nq, int Nk, int is_f32, int vec_ok, float mult,
                                                    int tid) {
  constexpr bool kIsBf16 = std::is_same<typename Tr::T, __nv_bfloat16>::value;
  constexpr int kRowChunks = Tr::kBN / 4;
  static_assert(Tr::kBN % 16 == 0, "the swizzle moves whole 8-key groups inside a row");
#pragma unroll 2
  for (int idx = tid; idx < Tr::kBM * kRowChunks; idx += Tr::kThreads) {
    const int r = idx / kRowChunks, cc = idx % kRowChunks * 4;
    const int i = m0 + r, j = n0 + cc;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < Nq) {
      const int64_t off = base + (int64_t)i * sm + (int64_t)j * sn;
      if (vec_ok && j + 3 < Nk) {
        v = load_bias4(src, off, is_f32, kIsBf16);
      } else {
        if (j < Nk) v.x = load_scalar(src, off, is_f32, kIsBf16);
        if (j + 1 < Nk) v.y = load_scalar(src, off + sn, is_f32, kIsBf16);
        if (j + 2 < Nk) v.z = load_scalar(src, off + 2 * sn, is_f32, kIsBf16);
        if (j + 3 < Nk) v.w = load_scalar(src, off + 3 * sn, is_f32, kIsBf16);
      }
    }
    v.x *= mult;
    v.y *= mult;
    v.z *= mult;
    v.w *= mult;
    *reinterpret_cast<float4*>(dst + r * Tr::kBN + (cc ^ bias_swizzle<Tr::kBN>(r))) = v;
  }
}

// stage_bias_tile_vec behind a call, for the cp.async wgmma kernel, which stages between its tile
// barriers (as stage_bias, which it calls for the scalar mode). mode: FwdParams::bias_mode (is_f32
// and the vector-load permission packed into one argument).
template <class Tr>
__device__ __noinline__ void stage_bias_vec(float* dst, const void* src, int64_t base, int64_t sm, int64_t sn, int m0,
                                            int n0, int Nq, int Nk, int mode, float mult, int tid) {
  stage_bias_tile_vec<Tr>(dst, src, base, sm, sn, m0, n0, Nq, Nk, mode & 1, mode & 4, mult, tid);
}

// Bytes of dynamic shared memory for the optional bias tiles.
template <class Tr>
constexpr int bias_smem_bytes(bool has_bias, bool has_bias_t) {
  return ((has_bias ? 1 : 0) + ((Tr::kJvp && has_bias_t) ? 1 : 0)) * Tr::kBM * Tr::kBN * (int)sizeof(float);
}

// ----------------------------------------------------------------------------------------------
// Per-tile steps shared by this kernel and the sm_90 one (attention_fwd_sm90_kernel.cuh). A thread
// holds query rows row_in_cta and row_in_cta + 8 of its CTA tile; element (nt, e) of an S-like
// fragment is row row_in_cta + 8·(e/2), key 8·nt + 2c + e%2 of the key tile (the m16n8 C layout of
// mma.sync, which is also wgmma's accumulator layout per warp). They take the kernel parameters by
// value: once inlined that is the kernel's own parameter block (by reference, the d = 256 / 128
// kernels came out with other registers and scheduling).
// ----------------------------------------------------------------------------------------------

// The optional fp32 bias / bias_t tiles of one CTA ([kBM][kBN] each, at `smem`; the host sizes them
// with bias_smem_bytes). They go through shared memory for coalesced reads and few registers; the
// kernels stage them per key tile with stage_bias (bias × log2e, bias_t as it is), written out in
// each kernel: behind one more inline helper, ptxas spilled 40 B in the sm_80 d = 128 JVP kernel.
struct FwdBiasTiles {
  bool has_bias, has_bias_t;
  float *bias, *bias_t;
  int64_t base, base_t;  // element offsets of this (b, h) in bias, bias_t
};

template <class Tr>
__device__ __forceinline__ FwdBiasTiles fwd_bias_tiles(const FwdParams p, unsigned char* smem, int b, int h) {
  FwdBiasTiles t;
  t.has_bias = p.bias != nullptr;
  t.has_bias_t = Tr::kJvp && p.bias_t != nullptr;
  t.bias = reinterpret_cast<float*>(smem);
  t.bias_t = t.bias + (t.has_bias ? Tr::kBM * Tr::kBN : 0);
  t.base = (int64_t)b * p.b_sb + (int64_t)h * p.b_sh;
  t.base_t = (int64_t)b * p.bt_sb + (int64_t)h * p.bt_sh;
  return t;
}

// The CTA's work: its (b, h), query tile [m0, m0 + kBM), the number of kBN-key tiles it needs, and
// the first rows of its q, k, v (and tangent) heads. Causal schedules the heaviest query tiles first.
template <typename T>
struct FwdBlock {
  int bh, b, h, m0;
  int off;  // Nk − Nq: with causal, key j is visible to row i iff j <= i + off
  int n_tiles;
  const T *q, *k, *v, *q_t, *k_t, *v_t;
};

template <typename T, bool kJvp, int kBM, int kBN>
__device__ __forceinline__ FwdBlock<T> fwd_block(const FwdParams p) {
  FwdBlock<T> w;
  const int mb = p.num_m_blocks - 1 - (int)(blockIdx.x % p.num_m_blocks);
  w.bh = (int)(blockIdx.x / p.num_m_blocks);
  w.b = w.bh / p.H;
  w.h = w.bh % p.H;
  const int hkv = w.h / (p.H / p.Hkv);
  w.m0 = mb * kBM;
  w.off = p.Nk - p.Nq;
  w.q = static_cast<const T*>(p.q) + w.b * p.q_sb + w.h * p.q_sh;
  w.k = static_cast<const T*>(p.k) + w.b * p.k_sb + hkv * p.k_sh;
  w.v = static_cast<const T*>(p.v) + w.b * p.v_sb + hkv * p.v_sh;
  w.q_t = kJvp ? static_cast<const T*>(p.q_t) + w.b * p.qt_sb + w.h * p.qt_sh : nullptr;
  w.k_t = kJvp ? static_cast<const T*>(p.k_t) + w.b * p.kt_sb + hkv * p.kt_sh : nullptr;
  w.v_t = kJvp ? static_cast<const T*>(p.v_t) + w.b * p.vt_sb + hkv * p.vt_sh : nullptr;
  // Keys this CTA may need: [0, n_end).
  int n_end = p.Nk;
  if (p.causal) n_end = max(0, min(p.Nk, w.m0 + kBM + w.off));
  w.n_tiles = (n_end + kBN - 1) / kBN;
  return w;
}

template <bool kJvp, int kNTO, int kNTOt>
__device__ __forceinline__ void zero_accumulators(float (&acc_o)[kNTO][4], float (&acc_t)[kNTOt][4]) {
#pragma unroll
  for (int i = 0; i < kNTO; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_o[i][e] = 0.f;
      if constexpr (kJvp) acc_t[i][e] = 0.f;
    }
}

// s ← s·scale·log2e + bias (fp32 smem tile [BM][kBN], already × log2e), −inf where masked;
// ṡ ← ṡ·scale + bias_t.
template <bool kJvp, int kBN, bool kSwizzle, int kNT, int kNTd>
__device__ __forceinline__ void scores_to_log2(float (&s)[kNT][4], float (&sd)[kNTd][4], const FwdParams p,
                                               bool has_bias, const float* sBias, bool has_bias_t, const float* sBiasT,
                                               int row_in_cta, int m0, int n0, int off, bool need_mask, int c) {
  // The tiles' column swizzle (kSwizzle and vector staging, else 0): rows ri ≡ row_in_cta (mod 4) share it.
  const int bias_x = kSwizzle && p.bias_stage ? bias_swizzle<kBN>(row_in_cta) : 0;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int ri = row_in_cta + 8 * (e / 2);  // row inside the CTA tile
      const int jl = nt * 8 + 2 * c + (e % 2);  // key inside the tile
      float x = s[nt][e] * p.scale_log2;
      if (has_bias) x += bias_at<kSwizzle>(sBias, ri * kBN, nt * 8 + 2 * c, e % 2, bias_x);  // in log2 units
      if (need_mask) {
        const int i = m0 + ri, j = n0 + jl;
        if ((j >= p.Nk) || (p.causal && j > i + off)) x = -INFINITY;
      }
      s[nt][e] = x;
      if constexpr (kJvp) {
        float xd = sd[nt][e] * p.scale;
        if (has_bias_t) xd += bias_at<kSwizzle>(sBiasT, ri * kBN, nt * 8 + 2 * c, e % 2, bias_x);
        sd[nt][e] = xd;
      }
    }
  }
}

// Online softmax over one key tile: the running max moves to m', s becomes p = 2^(s − m'), ṡ
// becomes h = p·ṡ, ℓ and r take the tile's partial sums (r of h rounded to T, the value the H·V
// product reads); alpha = 2^(m − m') rescales the accumulators (rescale_accumulators).
template <typename T, bool kJvp, int kNT, int kNTd>
__device__ __forceinline__ void online_softmax(float (&s)[kNT][4], float (&sd)[kNTd][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&row_r)[2], float (&alpha)[2]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = row_max[rr];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share a row
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_use = (mx == -INFINITY) ? 0.f : mx;  // row fully masked so far
    alpha[rr] = exp2f(row_max[rr] - m_use);            // exp2(-inf) = 0 on the first hit
    row_max[rr] = mx;
    float ps = 0.f, hs = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 2 * rr; e < 2 * rr + 2; ++e) {
        const float pe = exp2f(s[nt][e] - m_use);
        s[nt][e] = pe;
        ps += pe;
        if constexpr (kJvp) {
          const float he = (pe > 0.f) ? pe * sd[nt][e] : 0.f;  // masked: 0 even if ṡ is inf
          sd[nt][e] = he;
          hs += round_to<T>(he);  // what the H·V product reads once pack2 rounds he
        }
      }
    }
    row_sum[rr] = alpha[rr] * row_sum[rr] + ps;
    if constexpr (kJvp) row_r[rr] = alpha[rr] * row_r[rr] + hs;
  }
}

template <bool kJvp, int kNTO, int kNTOt>
__device__ __forceinline__ void rescale_accumulators(float (&acc_o)[kNTO][4], float (&acc_t)[kNTOt][4],
                                                     const float (&alpha)[2]) {
#pragma unroll
  for (int nt = 0; nt < kNTO; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_o[nt][e] *= alpha[e / 2];
      if constexpr (kJvp) acc_t[nt][e] *= alpha[e / 2];
    }
  }
}

// Epilogue: quad-reduce ℓ and r, write LSE (and μ) and O = A/ℓ (and Ȯ = T/ℓ − μ·O) of query rows
// qrow0 and qrow0 + 8.
template <typename T, bool kJvp, int kNTO, int kNTOt>
__device__ __forceinline__ void write_outputs(const FwdParams p, const float (&acc_o)[kNTO][4],
                                              const float (&acc_t)[kNTOt][4], const float (&row_max)[2],
                                              const float (&row_sum)[2], const float (&row_r)[2], int qrow0, int bh,
                                              int b, int h, int c) {
  const int qrow[2] = {qrow0, qrow0 + 8};
  constexpr float kLn2 = 0.6931471805599453f;
  float inv_l[2], mu[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr], r = row_r[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if constexpr (kJvp) {
      r += __shfl_xor_sync(0xffffffffu, r, 1);
      r += __shfl_xor_sync(0xffffffffu, r, 2);
    }
    inv_l[rr] = (l > 0.f) ? 1.f / l : 0.f;
    mu[rr] = kJvp ? r * inv_l[rr] : 0.f;
    const int i = qrow[rr];
    if (c == 0 && i < p.Nq) {
      const int64_t li = (int64_t)bh * p.Nq + i;
      p.lse[li] = (l > 0.f) ? (row_max[rr] + __log2f(l)) * kLn2 : -INFINITY;
      if constexpr (kJvp) p.lse_t[li] = mu[rr];
    }
  }
  T* gO = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  T* gOt = kJvp ? static_cast<T*>(p.out_t) + b * p.ot_sb + h * p.ot_sh : nullptr;
#pragma unroll
  for (int nt = 0; nt < kNTO; ++nt) {
    const int col = nt * 8 + 2 * c;
    if (col >= p.d_v) continue;  // d_v % 8 == 0: the pair is all in or all out
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int i = qrow[rr];
      if (i >= p.Nq) continue;
      const float o0 = acc_o[nt][2 * rr] * inv_l[rr], o1 = acc_o[nt][2 * rr + 1] * inv_l[rr];
      *reinterpret_cast<uint32_t*>(gO + (int64_t)i * p.o_sn + col) = pack2<T>(o0, o1);
      if constexpr (kJvp) {
        const float t0 = acc_t[nt][2 * rr] * inv_l[rr] - mu[rr] * o0;
        const float t1 = acc_t[nt][2 * rr + 1] * inv_l[rr] - mu[rr] * o1;
        *reinterpret_cast<uint32_t*>(gOt + (int64_t)i * p.ot_sn + col) = pack2<T>(t0, t1);
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// The kernel.
// ----------------------------------------------------------------------------------------------
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const FwdParams p) {
  using T = typename Tr::T;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN;
  constexpr int kDqk = Tr::kDqk, kDv = Tr::kDv, kSqk = Tr::kStrideQK, kSv = Tr::kStrideV;
  constexpr bool kJvp = Tr::kJvp;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sQt = sQ + Tr::kQElems;                // valid only if kJvp
  T* sKV = sQ + Tr::kQTiles * Tr::kQElems;  // stage s: sKV + s*kStageElems, then K, V, K̇, V̇

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;

  const FwdBlock<T> blk = fwd_block<T, kJvp, kBM, kBN>(p);
  const int bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles;
  const T *gQ = blk.q, *gK = blk.k, *gV = blk.v, *gQt = blk.q_t, *gKt = blk.k_t, *gVt = blk.v_t;

  auto load_kv = [&](int stage, int tile) {
    T* base = sKV + stage * Tr::kStageElems;
    const int n0 = tile * kBN, rows = p.Nk - n0;
    load_tile<Tr, kBN, kDqk, kSqk>(base, gK + n0 * p.k_sn, (int)p.k_sn, rows, p.d_qk, tid);
    load_tile<Tr, kBN, kDv, kSv>(base + Tr::kOffV, gV + n0 * p.v_sn, (int)p.v_sn, rows, p.d_v, tid);
    if constexpr (kJvp) {
      load_tile<Tr, kBN, kDqk, kSqk>(base + Tr::kOffKt, gKt + n0 * p.kt_sn, (int)p.kt_sn, rows, p.d_qk, tid);
      load_tile<Tr, kBN, kDv, kSv>(base + Tr::kOffVt, gVt + n0 * p.vt_sn, (int)p.vt_sn, rows, p.d_v, tid);
    }
  };

  // Prologue: Q (+Q̇) and the first K/V tile form commit group 0.
  load_tile<Tr, kBM, kDqk, kSqk>(sQ, gQ + m0 * p.q_sn, (int)p.q_sn, p.Nq - m0, p.d_qk, tid);
  if constexpr (kJvp) load_tile<Tr, kBM, kDqk, kSqk>(sQt, gQt + m0 * p.qt_sn, (int)p.qt_sn, p.Nq - m0, p.d_qk, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  // Per-thread state for rows r0 = m0 + 16·warp + g and r1 = r0 + 8.
  float acc_o[Tr::kNTileO][4];
  float acc_t[kJvp ? Tr::kNTileO : 1][4];
  zero_accumulators<kJvp>(acc_o, acc_t);
  float row_max[2] = {-INFINITY, -INFINITY};  // running max, base-2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's partial ℓ (quad-reduced at the end)
  float row_r[2] = {0.f, 0.f};                // this thread's partial r

  const int row_in_cta = 16 * warp + g;  // + 8 for the second row

  const FwdBiasTiles bias = fwd_bias_tiles<Tr>(p, smem_raw + Tr::kSmemBytes, b, h);

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    // Issue the next tile into the other stage (its readers finished: barrier at loop end).
    if (tile + 1 < n_tiles) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();
    // The barrier below publishes the bias tiles; the one after the previous tile retired their readers.
    // Scalar staging whatever FASTCM_ATTN_BIAS_STAGE says (see the bias staging modes above).
    if (bias.has_bias)
      stage_bias<Tr>(bias.bias, p.bias, bias.base, p.b_sm, p.b_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_is_f32, kLog2e,
                     tid);
    if (bias.has_bias_t)
      stage_bias<Tr>(bias.bias_t, p.bias_t, bias.base_t, p.bt_sm, p.bt_sn, m0, tile * kBN, p.Nq, p.Nk, p.bias_t_is_f32,
                     1.f, tid);
    cp_async_wait<1>();  // everything but the group just committed has landed
    __syncthreads();

    const T* sK = sKV + stage * Tr::kStageElems;
    const T* sV = sK + Tr::kOffV;
    const T* sKt = sK + Tr::kOffKt;
    const T* sVt = sK + Tr::kOffVt;
    const int n0 = tile * kBN;

    // ---- S = Q·Kᵀ and Ṡ = Q̇·Kᵀ + Q·K̇ᵀ (16 x kBN per warp) ----
    float s[Tr::kNTileS][4];
    float sd[kJvp ? Tr::kNTileS : 1][4];
#pragma unroll
    for (int i = 0; i < Tr::kNTileS; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
    if constexpr (kJvp) {
#pragma unroll
      for (int i = 0; i < Tr::kNTileS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sd[i][e] = 0.f;
    }
#pragma unroll 1
    for (int ks = 0; ks < kDqk / 16; ++ks) {
      // A operand (16 query rows x 16 dims): lane gives row lane%16, column block lane/16.
      uint32_t qa[4], qta[4];
      const int a_off = (16 * warp + (lane % 16)) * kSqk + ks * 16 + (lane / 16) * 8;
      ldmatrix_x4(qa, sQ + a_off);
      if constexpr (kJvp) ldmatrix_x4(qta, sQt + a_off);
#pragma unroll
      for (int np = 0; np < Tr::kNTileS / 2; ++np) {
        // B operand from K[key][dim]: matrices (keys +0..7, dims +0..7), (keys +0..7, dims +8..15),
        // (keys +8..15, dims +0..7), (keys +8..15, dims +8..15) -> b0,b1 of n-tile 2np, b0,b1 of 2np+1.
        const int b_off = (np * 16 + (lane % 8) + (lane / 16) * 8) * kSqk + ks * 16 + ((lane / 8) % 2) * 8;
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + b_off);
        mma16816<T>(s[2 * np], qa, kb[0], kb[1]);
        mma16816<T>(s[2 * np + 1], qa, kb[2], kb[3]);
        if constexpr (kJvp) {
          uint32_t ktb[4];
          ldmatrix_x4(ktb, sKt + b_off);
          mma16816<T>(sd[2 * np], qta, kb[0], kb[1]);
          mma16816<T>(sd[2 * np + 1], qta, kb[2], kb[3]);
          mma16816<T>(sd[2 * np], qa, ktb[0], ktb[1]);
          mma16816<T>(sd[2 * np + 1], qa, ktb[2], ktb[3]);
        }
      }
    }

    // ---- scale, bias, mask; then the online softmax update ----
    // (The sm_90a kernels run these lines from helpers, softmax_scores and pack_operands; here
    // they stay written out: behind a helper ptxas spills 44 B in the sm_90a build of the d = 128
    // JVP kernel.)
    const bool need_mask = (n0 + kBN > p.Nk) || (p.causal && (n0 + kBN - 1 > m0 + off));
    scores_to_log2<kJvp, kBN, false>(s, sd, p, bias.has_bias, bias.bias, bias.has_bias_t, bias.bias_t, row_in_cta, m0,
                                     n0, off, need_mask, c);
    float alpha[2];
    online_softmax<T, kJvp>(s, sd, row_max, row_sum, row_r, alpha);
    rescale_accumulators<kJvp>(acc_o, acc_t, alpha);

    // ---- A += P·V, T += P·V̇ + H·V (the [p | h]·[V̇ ; V] product, k-step by k-step) ----
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      // The S accumulator layout of n-tiles 2kk, 2kk+1 is exactly the A-operand layout of keys
      // 16kk..16kk+15: a0 = tile 2kk (row g), a1 = tile 2kk (row g+8), a2/a3 = tile 2kk+1.
      uint32_t pa[4], ha[4];
      pack_a_operand<T>(pa, s, kk);
      if constexpr (kJvp) {
        pack_a_operand<T>(ha, sd, kk);
      }
#pragma unroll
      for (int dp = 0; dp < kDv / 16; ++dp) {
        // B operand from V[key][dim] with .trans: matrices (keys +0..7, dims +0..7),
        // (keys +8..15, dims +0..7), (keys +0..7, dims +8..15), (keys +8..15, dims +8..15)
        // -> b0,b1 of dim n-tile 2dp, b0,b1 of 2dp+1.
        const int v_off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kSv + dp * 16 + (lane / 16) * 8;
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + v_off);
        mma16816<T>(acc_o[2 * dp], pa, vb[0], vb[1]);
        mma16816<T>(acc_o[2 * dp + 1], pa, vb[2], vb[3]);
        if constexpr (kJvp) {
          uint32_t vtb[4];
          ldmatrix_x4_trans(vtb, sVt + v_off);
          mma16816<T>(acc_t[2 * dp], pa, vtb[0], vtb[1]);
          mma16816<T>(acc_t[2 * dp + 1], pa, vtb[2], vtb[3]);
          mma16816<T>(acc_t[2 * dp], ha, vb[0], vb[1]);
          mma16816<T>(acc_t[2 * dp + 1], ha, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (n_tiles == 0 leaves Q's group)

  write_outputs<T, kJvp>(p, acc_o, acc_t, row_max, row_sum, row_r, m0 + row_in_cta, bh, b, h, c);
}

// Host-side launch of one instantiation; throws (TORCH_CHECK) on a launch error.
template <typename T, int kDqk, int kDv, bool kJvp>
void launch_fwd(const FwdParams& p, cudaStream_t stream);

// Dispatch on the padded head dims (kdqk, kdv): (d, d) for d ∈ {32, 64, 96, 128}, or kdqk ∈ {192, 256}
// with kdv ∈ {64, 128}; instantiated in attention_fwd_<dtype>.cu.
template <typename T>
void launch_fwd_dispatch(const FwdParams& p, int kdqk, int kdv, bool jvp, cudaStream_t stream);

}  // namespace attn
}  // namespace fastcm
