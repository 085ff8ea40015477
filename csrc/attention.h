// fastcm attention with forward-mode JVP: shared declarations of the C++ (CPU) and CUDA
// implementations. Schemas are defined once, in attention.cpp (TORCH_LIBRARY(fastcm, m)).
//
// Conventions (every implementation):
//   q (B, H, Nq, Dqk), k (B, Hkv, Nk, Dqk), v (B, Hkv, Nk, Dv), H % Hkv == 0; query head h
//   reads kv head h / (H / Hkv). bias: None or a tensor of q's dtype viewed as (B, H, Nq, Nk)
//   (stride-0 broadcast views allowed). Causal is bottom-right aligned: query i sees key j iff
//   j <= i + (Nk - Nq). out (B, H, Nq, Dv) in q's dtype; lse (B, H, Nq) float32 (float64 for
//   float64 inputs). A fully masked row gives out = 0, lse = -inf, out_t = 0, lse_t = 0 and
//   zero gradients.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace fastcm {

// Argument checks shared by every implementation: ranks, shapes, dtypes, devices. `op` names
// the calling op in the messages.
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& bias);
void check_same_as(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const c10::optional<at::Tensor>& bias, double scale,
                                                         bool causal);

// An absent q_t / k_t / v_t is a zero tangent: the CPU kernel skips its products and reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_jvp_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& q_t,
    const c10::optional<at::Tensor>& k_t, const c10::optional<at::Tensor>& v_t, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bias_t, double scale, bool causal);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse,
                                                                      const c10::optional<at::Tensor>& bias,
                                                                      double scale, bool causal,
                                                                      const c10::optional<at::Tensor>& grad_lse);

}  // namespace fastcm
