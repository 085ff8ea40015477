// Launch of the forward kernel: grid, dynamic shared memory, error check.
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "attention_fwd_kernel.cuh"

namespace fastcm {
namespace attn {

template <typename T, int kD, bool kJvp>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kJvp>;
  TORCH_CHECK(p.num_m_blocks == (p.Nq + Tr::kBM - 1) / Tr::kBM, "fastcm attention: internal error (m blocks)");
  const int64_t grid = (int64_t)p.num_m_blocks * p.B * p.H;
  TORCH_CHECK(grid <= 0x7fffffff, "fastcm attention: too many query tiles (B*H*ceil(Nq/", Tr::kBM, ") = ",
              grid, ")");
  const int smem = Tr::kSmemBytes + bias_smem_bytes<Tr>(p.bias != nullptr, p.bias_t != nullptr);
  auto kernel = attention_fwd_kernel<Tr>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<(unsigned)grid, Tr::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fwd_dispatch(const FwdParams& p, int kd, bool jvp, cudaStream_t stream) {
#define FASTCM_FWD_CASE(KD)                                       \
  case KD:                                                        \
    if (jvp) launch_fwd<T, KD, true>(p, stream);                  \
    else launch_fwd<T, KD, false>(p, stream);                     \
    return;
  switch (kd) {
    FASTCM_FWD_CASE(32)
    FASTCM_FWD_CASE(64)
    FASTCM_FWD_CASE(96)
    FASTCM_FWD_CASE(128)
    default:
      TORCH_CHECK(false, "fastcm attention (CUDA): padded head dim ", kd, " is not one of 32, 64, 96, 128");
  }
#undef FASTCM_FWD_CASE
}

}  // namespace attn
}  // namespace fastcm
