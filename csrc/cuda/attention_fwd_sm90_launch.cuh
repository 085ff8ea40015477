// Launch of the sm_90a (wgmma) forward kernels, cp.async and warp-specialised TMA, and their
// head-dim dispatch.
#pragma once

#include <type_traits>

#include "attention_fwd_launch.cuh"
#include "attention_fwd_sm90_kernel.cuh"
#include "attention_fwd_sm90_ws_kernel.cuh"

namespace fastcm {
namespace attn {

template <typename T, int kD, bool kJvp, bool kBias>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90Traits<T, kD, kJvp, kBias>;
  launch_fwd_kernel<Tr>(attention_fwd_sm90_kernel<Tr>, "sm_90a", kD, kD, p, stream);
}

// The warp-specialised kernel: tensor maps of Q, K, V (+ tangents) in boxes of one 64-column panel
// × the kernel's tile rows; columns past d_qk / d_v (this launch's V slice) read as zero.
template <typename T, int kD, bool kJvp, bool kOverlap, bool kQRegs, bool kBias>
void launch_fwd_sm90_ws(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90WsTraits<T, kD, kJvp, kOverlap, kQRegs, kBias>;
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  static const int launch_regs = [] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, attention_fwd_sm90_ws_kernel<Tr>));
    return attr.numRegs;
  }();
  TORCH_CHECK(launch_regs >= Tr::kLaunchRegs, "fastcm attention (CUDA): the TMA kernel was compiled with ", launch_regs,
              " registers per thread, fewer than the ", Tr::kLaunchRegs,
              " its setmaxnreg split needs (it would hang); FASTCM_ATTN_SM90_TMA=0 selects the cp.async kernel");
  FwdTmaMaps maps{};
  maps.q = tma_map_4d(p.q, bf16, p.B, p.H, p.Nq, p.d_qk, p.q_sb, p.q_sh, p.q_sn, Tr::kBM);
  maps.k = tma_map_4d(p.k, bf16, p.B, p.Hkv, p.Nk, p.d_qk, p.k_sb, p.k_sh, p.k_sn, Tr::kBN);
  maps.v = tma_map_4d(p.v, bf16, p.B, p.Hkv, p.Nk, p.d_v, p.v_sb, p.v_sh, p.v_sn, Tr::kBN);
  if constexpr (kJvp) {
    maps.q_t = tma_map_4d(p.q_t, bf16, p.B, p.H, p.Nq, p.d_qk, p.qt_sb, p.qt_sh, p.qt_sn, Tr::kBM);
    maps.k_t = tma_map_4d(p.k_t, bf16, p.B, p.Hkv, p.Nk, p.d_qk, p.kt_sb, p.kt_sh, p.kt_sn, Tr::kBN);
    maps.v_t = tma_map_4d(p.v_t, bf16, p.B, p.Hkv, p.Nk, p.d_v, p.vt_sb, p.vt_sh, p.vt_sn, Tr::kBN);
  }
  launch_fwd_kernel<Tr>(attention_fwd_sm90_ws_kernel<Tr>, "sm_90a (TMA)", kD, kD, p, stream, maps);
}

// The TMA kernel with the overlap or without, Q in registers (d = 64) or read from shared memory,
// with bias tiles (d = 64) where the call has a bias or bias_t.
template <typename T, int kD, bool kJvp, bool kOverlap>
void launch_fwd_sm90_ws_q(const FwdParams& p, bool q_regs, cudaStream_t stream) {
  const bool bias = p.bias != nullptr || (kJvp && p.bias_t != nullptr);
  TORCH_CHECK(
      kD == 64 || (!q_regs && !bias),
      "fastcm attention (CUDA): Q in registers and bias tiles in the TMA kernel only at d 64 (host plan error)");
  if constexpr (kD == 64) {
    if (q_regs && bias)
      launch_fwd_sm90_ws<T, kD, kJvp, kOverlap, true, true>(p, stream);
    else if (q_regs)
      launch_fwd_sm90_ws<T, kD, kJvp, kOverlap, true, false>(p, stream);
    else if (bias)
      launch_fwd_sm90_ws<T, kD, kJvp, kOverlap, false, true>(p, stream);
    else
      launch_fwd_sm90_ws<T, kD, kJvp, kOverlap, false, false>(p, stream);
  } else {
    launch_fwd_sm90_ws<T, kD, kJvp, kOverlap, false, false>(p, stream);
  }
}

template <typename T, int kD, bool kJvp>
void launch_fwd_sm90_variant(const FwdParams& p, Sm90Kernel kernel, bool q_regs, cudaStream_t stream) {
  const bool bias = p.bias != nullptr || (kJvp && p.bias_t != nullptr);
  if (kernel == Sm90Kernel::kTma) {
    launch_fwd_sm90_ws_q<T, kD, kJvp, false>(p, q_regs, stream);
  } else if (kernel == Sm90Kernel::kTmaOverlap) {
    // S, Ṡ of one tile and P, H of the previous one do not fit the consumers' 240 registers at d 128 JVP.
    TORCH_CHECK(!(kD == 128 && kJvp),
                "fastcm attention (CUDA): no overlapped TMA kernel for d 128 JVP (host plan error)");
    if constexpr (!(kD == 128 && kJvp)) launch_fwd_sm90_ws_q<T, kD, kJvp, true>(p, q_regs, stream);
  } else if (bias) {
    launch_fwd_sm90<T, kD, kJvp, true>(p, stream);
  } else {
    launch_fwd_sm90<T, kD, kJvp, false>(p, stream);
  }
}

template <typename T>
void launch_fwd_sm90_dispatch(const FwdParams& p, int kd, bool jvp, Sm90Kernel kernel, bool q_regs,
                              cudaStream_t stream) {
  if (kd == 64) {
    if (jvp)
      launch_fwd_sm90_variant<T, 64, true>(p, kernel, q_regs, stream);
    else
      launch_fwd_sm90_variant<T, 64, false>(p, kernel, q_regs, stream);
  } else if (kd == 128) {
    if (jvp)
      launch_fwd_sm90_variant<T, 128, true>(p, kernel, q_regs, stream);
    else
      launch_fwd_sm90_variant<T, 128, false>(p, kernel, q_regs, stream);
  } else {
    TORCH_CHECK(false, "fastcm attention (CUDA): no sm_90a forward kernel for padded head dim ", kd,
                "; compiled: 64, 128");
  }
}

}  // namespace attn
}  // namespace fastcm
