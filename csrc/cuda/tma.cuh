// sm_90a wrappers for the warp-specialised attention forward: shared-memory mbarriers, TMA tile
// loads (cp.async.bulk.tensor) that complete on them, and setmaxnreg. Device code is compiled only
// for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the host part encodes the tensor maps the loads read.
//
// mbarrier protocol (PTX ISA, "Parallel synchronization and communication instructions: mbarrier"):
// a barrier completes its current phase when its pending arrival count reaches zero and its
// transaction count is zero; the TMA load adds its bytes as completed transactions, the producer's
// arrive.expect_tx announces them. A waiter names the phase by its parity (0, 1, 0, ...).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastcm {
namespace attn {
namespace sm90 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the TMA unit) before first use.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of TMA transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Blocks until the phase with this parity has completed (acquire: the bytes it counted are visible).
// The retry loop is inside the asm (a predicate and a branch back to a label local to the braces):
// as a C++ loop around a single try_wait, the compiler may leave the lanes of a warp that leave the
// loop in different passes unconverged after it, and what follows in the consumers are `.aligned`
// instructions (bar.sync, wgmma.fence), which need every lane of the warp to execute them together.
// Consumer warps also reconverge explicitly after the wait (mbar_wait_warp).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred ready;\n"
      "fastcm_mbar_retry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra fastcm_mbar_retry;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// mbar_wait for a whole warp (every lane waits): the warp is converged when it returns.
__device__ __forceinline__ void mbar_wait_warp(uint32_t bar, uint32_t parity) {
  mbar_wait(bar, parity);
  __syncwarp();
}

// A box of the 4-D tensor map at coordinates (c0 innermost .. c3) into shared memory at `dst`,
// completing `bytes` = the box size on barrier `bar` (out-of-range elements are written as zeros
// and counted too).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Re-partitions the register file between warpgroups (every warp of a warpgroup runs the same one).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90

// Host: the tensor map of a (B, heads, rows, cols) view with element strides (sb, sh, sn, 1) of a
// 16-bit dtype, read in boxes of 64 columns × box_rows rows with the 128-byte swizzle (one box =
// one swizzled panel of a kernel tile). Columns ≥ cols and rows ≥ rows read as zero. Requires the
// base 16-byte aligned and every stride of a dimension longer than 1 a positive multiple of 8
// elements (tma_strides_ok); a stride of a length-1 dimension is not used and is replaced.
inline bool tma_strides_ok(int64_t sb, int64_t sh, int64_t sn, int64_t B, int64_t heads, int64_t rows) {
  auto ok = [](int64_t stride, int64_t size) {
    return size <= 1 || (stride > 0 && stride % 8 == 0 && stride < (int64_t(1) << 39));
  };
  return ok(sb, B) && ok(sh, heads) && ok(sn, rows);
}

inline CUtensorMap tma_map_4d(const void* base, bool bf16, int64_t B, int64_t heads, int64_t rows, int64_t cols,
                              int64_t sb, int64_t sh, int64_t sn, int box_rows) {
  using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "fastcm attention (CUDA): the driver has no cuTensorMapEncodeTiled (needs CUDA 12 or newer)");
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  // A length-1 dimension's stride is never stepped; give it the dense value the encoder accepts.
  if (rows <= 1) sn = cols;
  if (heads <= 1) sh = sn * rows;
  if (B <= 1) sb = sh * heads;
  const cuuint64_t dims[4] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)heads, (cuuint64_t)B};
  const cuuint64_t strides[3] = {(cuuint64_t)sn * 2, (cuuint64_t)sh * 2, (cuuint64_t)sb * 2};
  const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r =
      encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "fastcm attention (CUDA): cuTensorMapEncodeTiled failed (CUresult ", (int)r,
              ") for a (", B, ", ", heads, ", ", rows, ", ", cols, ") tensor with strides (", sb, ", ", sh, ", ", sn,
              ", 1), box rows ", box_rows);
  return map;
}

}  // namespace attn
}  // namespace fastcm
