// Launch of the forward kernel: grid, dynamic shared memory, error check.
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "attention_fwd_kernel.cuh"

namespace fastcm {
namespace attn {

// Raises `kernel`'s dynamic shared-memory limit to `smem` bytes; where the device allows less, a
// TORCH_CHECK error naming the kernel (`family`, padded head dims, tangents), the bytes and the
// device's opt-in limit.
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, int smem, const char* family, int kdqk, int kdv, bool jvp) {
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr == cudaSuccess) return;
  (void)cudaGetLastError();  // clear the (non-sticky) error before reporting our own
  int dev = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(smem <= limit, "fastcm attention (CUDA): the ", family, " forward kernel for padded head dims (D_qk ",
              kdqk, ", D_v ", kdv, ")", jvp ? " with tangents" : "", " needs ", smem,
              " bytes of shared memory per block; this device allows ", limit);
  C10_CUDA_CHECK(attr);
}

// One CTA per (b, h, query tile of kBM rows); p.num_m_blocks is set here for the kernel's kBM.
// `extra`: kernel parameters after p (the tensor maps of the TMA kernel).
template <class Tr, typename Kernel, typename... Extra>
void launch_fwd_grid(Kernel kernel, FwdParams p, int smem, cudaStream_t stream, const Extra&... extra) {
  p.num_m_blocks = (p.Nq + Tr::kBM - 1) / Tr::kBM;
  const int64_t grid = (int64_t)p.num_m_blocks * p.B * p.H;
  TORCH_CHECK(grid <= 0x7fffffff, "fastcm attention: too many query tiles (B*H*ceil(Nq/", Tr::kBM, ") = ", grid, ")");
  kernel<<<(unsigned)grid, Tr::kThreads, smem, stream>>>(p, extra...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A forward kernel whose dynamic shared memory is Tr::kSmemBytes plus the call's bias tiles: raise
// its limit (errors name `family` and the padded head dims), then launch it over the grid.
template <class Tr, typename Kernel, typename... Extra>
void launch_fwd_kernel(Kernel kernel, const char* family, int kdqk, int kdv, const FwdParams& p, cudaStream_t stream,
                       const Extra&... extra) {
  const int smem = Tr::kSmemBytes + bias_smem_bytes<Tr>(p.bias != nullptr, p.bias_t != nullptr);
  set_dynamic_smem(kernel, smem, family, kdqk, kdv, Tr::kJvp);
  launch_fwd_grid<Tr>(kernel, p, smem, stream, extra...);
}

template <typename T, int kDqk, int kDv, bool kJvp>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kDqk, kDv, kJvp>;
  launch_fwd_kernel<Tr>(attention_fwd_kernel<Tr>, "sm_80", kDqk, kDv, p, stream);
}

// The pairs instantiated (× JVP × dtype = 24 kernels per dtype). D_qk ≤ 128 keeps the v1 rule:
// Q/K and V share one padded dim, max(D_qk, D_v slice), so a small D_qk next to a wider V pays the
// wider S product. D_qk > 128 (Gemma-style 256; MLA-style 192 with D_v = 128) pads V to 64 or 128
// only: 32 and 96 would add 8 kernels per dtype to save at most 10 % of the work at D_qk = 256
// (the padded columns only cost in the P·V products, ≤ 1/3 of the FLOPs there).
template <typename T>
void launch_fwd_dispatch(const FwdParams& p, int kdqk, int kdv, bool jvp, cudaStream_t stream) {
#define FASTCM_FWD_CASE(KDQK, KDV)                \
  if (kdqk == KDQK && kdv == KDV) {               \
    if (jvp)                                      \
      launch_fwd<T, KDQK, KDV, true>(p, stream);  \
    else                                          \
      launch_fwd<T, KDQK, KDV, false>(p, stream); \
    return;                                       \
  }
  FASTCM_FWD_CASE(32, 32)
  FASTCM_FWD_CASE(64, 64)
  FASTCM_FWD_CASE(96, 96)
  FASTCM_FWD_CASE(128, 128)
  FASTCM_FWD_CASE(192, 64)
  FASTCM_FWD_CASE(192, 128)
  FASTCM_FWD_CASE(256, 64)
  FASTCM_FWD_CASE(256, 128)
#undef FASTCM_FWD_CASE
  TORCH_CHECK(false, "fastcm attention (CUDA): no forward kernel for padded head dims (D_qk ", kdqk, ", D_v ", kdv,
              "); compiled: (d, d) for d in {32, 64, 96, 128}, and D_qk in {192, 256} with D_v in {64, 128}");
}

}  // namespace attn
}  // namespace fastcm
