// Launch of the sm_90a (wgmma) forward kernel, and its head-dim dispatch.
#pragma once

#include "attention_fwd_launch.cuh"
#include "attention_fwd_sm90_kernel.cuh"

namespace fastcm {
namespace attn {

template <typename T, int kD, bool kJvp, bool kBias>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90Traits<T, kD, kJvp, kBias>;
  const int smem = Tr::kSmemBytes + bias_smem_bytes<Tr>(p.bias != nullptr, p.bias_t != nullptr);
  auto kernel = attention_fwd_sm90_kernel<Tr>;
  set_dynamic_smem(kernel, smem, "sm_90a", kD, kD, kJvp);
  launch_fwd_grid<Tr>(kernel, p, smem, stream);
}

template <typename T, int kD>
void launch_fwd_sm90_head_dim(const FwdParams& p, bool jvp, cudaStream_t stream) {
  const bool bias = p.bias != nullptr || (jvp && p.bias_t != nullptr);
  if (jvp) {
    if (bias) launch_fwd_sm90<T, kD, true, true>(p, stream);
    else launch_fwd_sm90<T, kD, true, false>(p, stream);
  } else {
    if (bias) launch_fwd_sm90<T, kD, false, true>(p, stream);
    else launch_fwd_sm90<T, kD, false, false>(p, stream);
  }
}

template <typename T>
void launch_fwd_sm90_dispatch(const FwdParams& p, int kd, bool jvp, cudaStream_t stream) {
  if (kd == 64) {
    launch_fwd_sm90_head_dim<T, 64>(p, jvp, stream);
  } else if (kd == 128) {
    launch_fwd_sm90_head_dim<T, 128>(p, jvp, stream);
  } else {
    TORCH_CHECK(false, "fastcm attention (CUDA): no sm_90a forward kernel for padded head dim ", kd,
                "; compiled: 64, 128");
  }
}

}  // namespace attn
}  // namespace fastcm
