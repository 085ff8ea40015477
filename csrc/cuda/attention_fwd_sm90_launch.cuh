// Launch of the sm_90a (wgmma) forward kernel, and its head-dim dispatch.
#pragma once

#include "attention_fwd_launch.cuh"
#include "attention_fwd_sm90_kernel.cuh"

namespace fastcm {
namespace attn {

template <typename T, int kD, bool kJvp>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90Traits<T, kD, kJvp>;
  TORCH_CHECK(p.bias == nullptr && p.bias_t == nullptr, "fastcm attention: internal error (bias on the sm_90 path)");
  auto kernel = attention_fwd_sm90_kernel<Tr>;
  set_dynamic_smem(kernel, Tr::kSmemBytes, "sm_90a", kD, kD, kJvp);
  launch_fwd_grid<Tr>(kernel, p, Tr::kSmemBytes, stream);
}

template <typename T>
void launch_fwd_sm90_dispatch(const FwdParams& p, int kd, bool jvp, cudaStream_t stream) {
  if (kd == 64) {
    if (jvp) launch_fwd_sm90<T, 64, true>(p, stream);
    else launch_fwd_sm90<T, 64, false>(p, stream);
  } else if (kd == 128) {
    if (jvp) launch_fwd_sm90<T, 128, true>(p, stream);
    else launch_fwd_sm90<T, 128, false>(p, stream);
  } else {
    TORCH_CHECK(false, "fastcm attention (CUDA): no sm_90a forward kernel for padded head dim ", kd,
                "; compiled: 64, 128");
  }
}

}  // namespace attn
}  // namespace fastcm
