// wgmma (sm_90a) wrappers for the attention kernels: shared-memory matrix descriptors, the
// warpgroup fences, and wgmma.mma_async m64nNk16 (N = 64, 128) with fp32 accumulators, A from
// shared memory (SS) or registers (RS). Everything here is compiled only for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); the kernels that use it are empty elsewhere.
//
// Accumulator layout (PTX ISA, "wgmma register fragments"): warp w of the warpgroup holds rows
// 16w..16w+15 of the m64 tile; d[j][0..3] of lane (g = lane/4, c = lane%4) is D[16w + g][8j + 2c],
// D[16w + g][8j + 2c + 1], D[16w + g + 8][8j + 2c], D[16w + g + 8][8j + 2c + 1] — per warp, the m16n8
// C layout of mma.sync for each n8 block j. The RS A fragment (4 × b32 per thread) is per warp the
// m16k16 A layout of mma.sync (pack_a_operand makes it from an accumulator).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fastcm {
namespace attn {
namespace sm90 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Descriptor of an operand tile in the 128-byte-swizzle canonical layout (PTX ISA, "Matrix
// Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4,
// 32-45 stride-dimension byte offset >> 4, 49-51 base offset (0: tiles start 1024-byte aligned),
// 62-63 swizzle mode (1 = 128 B). What LBO and SBO step over depends on the major-ness:
//   K-major  (rows of the M/N dim, K contiguous): SBO = bytes between 8-row groups; LBO unused
//            (one k16 step stays inside a 128-byte swizzle row), set to 16.
//   MN-major (rows of the K dim, M/N contiguous): SBO = bytes between 8-row (K) groups, LBO =
//            bytes between 64-element column panels of the M/N dim.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t smem_byte_addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_byte_addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
         (uint64_t(1) << 62);
}

// Orders this thread's register writes (accumulators, A fragments) before the wgmma that follows.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async included) visible to the async
// proxy that wgmma reads through; each writing thread runs it before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Named barrier `id` (1..15; 0 is __syncthreads) over `count` threads: bar.sync waits for the phase
// to complete, bar.arrive counts this thread in and goes on. One warpgroup arriving while the other
// syncs orders the second after the first.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Compiler-only fences: the registers count as read and written here, so no access to them moves
// across the wgmma fence / wait they sit beside (the wgmma asm itself names them, the waits do not).
template <int NT>
__device__ __forceinline__ void fence_regs(float (&d)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
template <int K>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[K][4]) {
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// The accumulator operands of NT n8 blocks, d[0][0..3], d[1][0..3], ... in operand order %0, %1, ...
#define FASTCM_WGMMA_ACC1(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FASTCM_WGMMA_ACC8(d)                                                                          \
  FASTCM_WGMMA_ACC1(d, 0), FASTCM_WGMMA_ACC1(d, 1), FASTCM_WGMMA_ACC1(d, 2), FASTCM_WGMMA_ACC1(d, 3), \
      FASTCM_WGMMA_ACC1(d, 4), FASTCM_WGMMA_ACC1(d, 5), FASTCM_WGMMA_ACC1(d, 6), FASTCM_WGMMA_ACC1(d, 7)
#define FASTCM_WGMMA_ACC16(d)                                                                                 \
  FASTCM_WGMMA_ACC8(d), FASTCM_WGMMA_ACC1(d, 8), FASTCM_WGMMA_ACC1(d, 9), FASTCM_WGMMA_ACC1(d, 10),           \
      FASTCM_WGMMA_ACC1(d, 11), FASTCM_WGMMA_ACC1(d, 12), FASTCM_WGMMA_ACC1(d, 13), FASTCM_WGMMA_ACC1(d, 14), \
      FASTCM_WGMMA_ACC1(d, 15)

#define FASTCM_WGMMA_REGS32                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTCM_WGMMA_REGS64                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D (+)= A·B, m64nNk16, A and B K-major in shared memory (no transpose); scale_d = 0 overwrites D.
template <typename T, int NT>
struct WgmmaSS;
// D (+)= A·B, m64nNk16, A from registers; B in shared memory, MN-major (kBMnMajor: imm-trans-b = 1,
// V in the P·V chains) or K-major (K in the S chains when Q stays in registers).
template <typename T, int NT, bool kBMnMajor>
struct WgmmaRS;

// N = 8·NT; REGS names the NT·4 accumulator operands %0..; I0.. are the operand numbers after them.
#define FASTCM_WGMMA_DEFINE(T, PTX, NT, N, REGS, I0, I1, I2, I3, I4, I5, I6)                                         \
  template <>                                                                                                        \
  struct WgmmaSS<T, NT> {                                                                                            \
    static __device__ __forceinline__ void run(float (&d)[NT][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #I2                                                          \
                   ", 0;\n"                                                                                          \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " REGS ", %" #I0 ", %" #I1        \
                   ", p, 1, 1, 0, 0;\n}\n"                                                                           \
                   : FASTCM_WGMMA_ACC##NT(d)                                                                         \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                        \
    }                                                                                                                \
  };                                                                                                                 \
  template <bool kBMnMajor>                                                                                          \
  struct WgmmaRS<T, NT, kBMnMajor> {                                                                                 \
    static __device__ __forceinline__ void run(float (&d)[NT][4], const uint32_t (&a)[4], uint64_t desc_b,           \
                                               int scale_d) {                                                        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #I5                                                          \
                   ", 0;\n"                                                                                          \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " REGS ", {%" #I0 ", %" #I1       \
                   ", %" #I2 ", %" #I3 "}, %" #I4 ", p, 1, 1, %" #I6 ";\n}\n"                                        \
                   : FASTCM_WGMMA_ACC##NT(d)                                                                         \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kBMnMajor ? 1 : 0)); \
    }                                                                                                                \
  };

FASTCM_WGMMA_DEFINE(__nv_bfloat16, "bf16", 8, 64, FASTCM_WGMMA_REGS32, 32, 33, 34, 35, 36, 37, 38)
FASTCM_WGMMA_DEFINE(__nv_bfloat16, "bf16", 16, 128, FASTCM_WGMMA_REGS64, 64, 65, 66, 67, 68, 69, 70)
FASTCM_WGMMA_DEFINE(__half, "f16", 8, 64, FASTCM_WGMMA_REGS32, 32, 33, 34, 35, 36, 37, 38)
FASTCM_WGMMA_DEFINE(__half, "f16", 16, 128, FASTCM_WGMMA_REGS64, 64, 65, 66, 67, 68, 69, 70)

#undef FASTCM_WGMMA_DEFINE
#undef FASTCM_WGMMA_REGS32
#undef FASTCM_WGMMA_REGS64
#undef FASTCM_WGMMA_ACC1
#undef FASTCM_WGMMA_ACC8
#undef FASTCM_WGMMA_ACC16

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90
}  // namespace attn
}  // namespace fastcm
