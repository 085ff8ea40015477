// Launch of the sm_90a (wgmma) backward kernels and their head-dim dispatch.
#pragma once

#include "attention_bwd_launch.cuh"
#include "attention_bwd_sm90_kernel.cuh"

namespace fastcm {
namespace attn {

template <typename T, int kD, bool kBias>
void launch_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  launch_bwd_delta<T>(p, stream);
  using Dq = BwdSm90Traits<T, kD, false, kBias>;
  launch_bwd_tiles<Dq>(attention_bwd_dq_sm90_kernel<Dq>, (int64_t)(p.Nq + Dq::kOwnRows - 1) / Dq::kOwnRows * p.B * p.H,
                       Dq::kSmemBytes, p, stream);
  using Dkv = BwdSm90Traits<T, kD, true, kBias>;
  launch_bwd_tiles<Dkv>(attention_bwd_dkdv_sm90_kernel<Dkv>,
                        (int64_t)(p.Nk + Dkv::kOwnRows - 1) / Dkv::kOwnRows * p.B * p.Hkv, Dkv::kSmemBytes, p, stream);
}

template <typename T, int kD>
void launch_bwd_sm90_bias(const BwdParams& p, cudaStream_t stream) {
  if (p.bias != nullptr)
    launch_bwd_sm90<T, kD, true>(p, stream);
  else
    launch_bwd_sm90<T, kD, false>(p, stream);
}

template <typename T>
void launch_bwd_sm90_dispatch(const BwdParams& p, int kd, cudaStream_t stream) {
  switch (kd) {
    case 64:
      launch_bwd_sm90_bias<T, 64>(p, stream);
      return;
    case 128:
      launch_bwd_sm90_bias<T, 128>(p, stream);
      return;
    default:
      TORCH_CHECK(false, "fastcm attention backward (CUDA): no sm_90a kernel for padded head dim ", kd,
                  "; compiled: 64, 128");
  }
}

}  // namespace attn
}  // namespace fastcm
