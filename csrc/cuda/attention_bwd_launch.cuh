// Launch of the backward kernels: grids, dynamic shared memory, error checks.
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "attention_bwd_kernel.cuh"

namespace fastcm {
namespace attn {

// One launch of a tile kernel: `grid` CTAs of Tr::kThreads with `smem` bytes of dynamic shared memory.
template <class Tr, class Kernel>
void launch_bwd_tiles(Kernel kernel, int64_t grid, int smem, const BwdParams& p, cudaStream_t stream) {
  TORCH_CHECK(grid <= 0x7fffffff, "fastcm attention backward: too many tiles (", grid, ")");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<(unsigned)grid, Tr::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// δ = rowsum(dO ⊙ O), one warp per query row.
template <typename T>
void launch_bwd_delta(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = (int64_t)p.B * p.H * p.Nq;
  TORCH_CHECK((rows + 7) / 8 <= 0x7fffffff, "fastcm attention backward: too many query rows (", rows, ")");
  attention_bwd_delta_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  launch_bwd_delta<T>(p, stream);
  const bool bias = p.bias != nullptr;
  using Dq = BwdTraits<T, kD, false>;
  launch_bwd_tiles<Dq>(attention_bwd_dq_kernel<Dq>, (int64_t)(p.Nq + Dq::kBM - 1) / Dq::kBM * p.B * p.H,
                       Dq::kSmemBytes + (bias ? Dq::kBiasBytes : 0), p, stream);
  using Dkv = BwdTraits<T, kD, true>;
  launch_bwd_tiles<Dkv>(attention_bwd_dkdv_kernel<Dkv>, (int64_t)(p.Nk + Dkv::kBN - 1) / Dkv::kBN * p.B * p.Hkv,
                        Dkv::kSmemBytes + (bias ? Dkv::kBiasBytes : 0), p, stream);
}

template <typename T>
void launch_bwd_dispatch(const BwdParams& p, int kd, cudaStream_t stream) {
  switch (kd) {
    case 32:
      launch_bwd<T, 32>(p, stream);
      return;
    case 64:
      launch_bwd<T, 64>(p, stream);
      return;
    case 96:
      launch_bwd<T, 96>(p, stream);
      return;
    case 128:
      launch_bwd<T, 128>(p, stream);
      return;
    default:
      TORCH_CHECK(false, "fastcm attention backward (CUDA): padded head dim ", kd, " is not one of 32, 64, 96, 128");
  }
}

}  // namespace attn
}  // namespace fastcm
