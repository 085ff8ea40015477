// CUDA implementations of fastcm::attention_forward, attention_forward_jvp, attention_backward
// (the schemas are defined with TORCH_LIBRARY(fastcm, m) in csrc/attention.cpp).
//
// Forward and forward-JVP: on sm_90 devices a wgmma kernel where one applies (padded head dim 64 or
// 128, its shared memory within the device's limit; FASTCM_ATTN_SM90=0 turns both off): the
// warp-specialised TMA kernel of attention_fwd_sm90_ws_kernel.cuh (FASTCM_ATTN_SM90_TMA=0 turns it
// off; FASTCM_ATTN_SM90_OVERLAP=0 its intra-warpgroup overlap) without a bias, or at d 64 with one,
// else the cp.async one of attention_fwd_sm90_kernel.cuh; everywhere else the fused kernel of attention_fwd_kernel.cuh
// (mma.sync, sm_80+).
// Backward: on sm_90 devices, for padded head dim 64 or 128, the wgmma kernels of
// attention_bwd_sm90_kernel.cuh (FASTCM_ATTN_SM90_BWD=0 or FASTCM_ATTN_SM90=0 turn them off); else
// the fused kernels of attention_bwd_kernel.cuh for head dims ≤ 128; above that, ATen batched
// matmuls in float32 that recompute P from the saved LSE (attention_backward_aten).
//
// Input handling (shared by all three ops): q (B, H, Nq, Dqk), k (B, Hkv, Nk, Dqk),
// v (B, Hkv, Nk, Dv), H % Hkv == 0, bf16 or fp16, same device. Strides are passed to the kernel
// as they are when the last dim is contiguous, the head dim is a multiple of 8, every other
// stride is a multiple of 8 elements and the base is 16-byte aligned; otherwise the tensor is
// copied (zero-padded to a multiple of 8 in the head dim). bias: float32 or q's dtype (other
// float dtypes are converted to float32, bool masks to 0/−inf float32: both copy), broadcast to
// (B, H, Nq, Nk) by a stride-0 view.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_bwd_kernel.cuh"
#include "attention_bwd_sm90_kernel.cuh"
#include "attention_fwd_kernel.cuh"
#include "attention_fwd_sm90_kernel.cuh"
#include "attention_fwd_sm90_ws_kernel.cuh"

namespace fastcm {
namespace {

constexpr int64_t kMaxHeadDimQK = 256;  // the forward keeps Q, K tiles of up to 256 columns
constexpr int64_t kMaxHeadDimVChunk = 128;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool kernel_ready(const at::Tensor& t) {
  if (t.stride(-1) != 1 || t.size(-1) % 8 != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  // The kernel forms in-tile offsets in 32 bits: row·stride < 2^31 for rows < 256.
  if (t.size(-2) > 1 && t.stride(-2) >= (int64_t(1) << 23)) return false;
  return true;
}

// The tensor as the kernel can read it (a copy only when it must be).
at::Tensor kernel_view(const at::Tensor& t) {
  if (t.numel() == 0 || kernel_ready(t)) return t;
  const int64_t d = t.size(-1), d8 = round_up(d, 8);
  at::Tensor out = d8 == d ? t.contiguous() : at::constant_pad_nd(t, {0, d8 - d}, 0).contiguous();
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) out = out.clone();  // fresh allocation
  return out;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), op, ": q, k, v must be CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, N, D), got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              " (CUDA): q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), op, ": k ", k.sizes(), " and v ", v.sizes(),
              " must agree in heads and length");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": query heads ", q.size(1),
              " must be a multiple of key/value heads ", k.size(1));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": q and k head dims differ (", q.size(3), " vs ", k.size(3), ")");
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, op, ": head dims must be positive");
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes(), op,
              ": ", name, " must match its primal in shape, dtype and device: got ", t.sizes(), " ", t.scalar_type(),
              " ", t.device(), ", expected ", like.sizes(), " ", like.scalar_type(), " ", like.device());
}

// bias as the kernel reads it: float32 or q's dtype, viewed as (B, H, Nq, Nk).
std::optional<at::Tensor> prepare_bias(const char* op, const char* name, const std::optional<at::Tensor>& bias,
                                       const at::Tensor& q, int64_t Nk) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  at::Tensor b = *bias;
  TORCH_CHECK(b.device() == q.device(), op, ": ", name, " is on ", b.device(), ", q on ", q.device());
  if (b.scalar_type() == at::kBool) {
    b = at::zeros(b.sizes(), b.options().dtype(at::kFloat)).masked_fill_(b.logical_not(), -INFINITY);
  } else if (b.scalar_type() != at::kFloat && b.scalar_type() != q.scalar_type()) {
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), op, ": ", name, " must be a float or bool tensor, got ",
                b.scalar_type());
    b = b.to(at::kFloat);
  }
  const std::vector<int64_t> shape = {q.size(0), q.size(1), q.size(2), Nk};
  TORCH_CHECK(b.dim() <= 4, op, ": ", name, " must broadcast to (B, H, Nq, Nk) = ", at::IntArrayRef(shape), ", got ",
              b.sizes());
  b = b.expand(shape);  // throws if not broadcastable
  return b;
}

void set_bias(attn::FwdParams& p, const std::optional<at::Tensor>& bias, bool tangent) {
  const void* ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  int64_t sb = 0, sh = 0, sm = 0, sn = 0;
  int is_f32 = 0;
  if (bias.has_value()) {
    sb = bias->stride(0);
    sh = bias->stride(1);
    sm = bias->stride(2);
    sn = bias->stride(3);
    is_f32 = bias->scalar_type() == at::kFloat;
  }
  if (!tangent) {
    p.bias = ptr;
    p.b_sb = sb;
    p.b_sh = sh;
    p.b_sm = sm;
    p.b_sn = sn;
    p.bias_is_f32 = is_f32;
  } else {
    p.bias_t = ptr;
    p.bt_sb = sb;
    p.bt_sh = sh;
    p.bt_sm = sm;
    p.bt_sn = sn;
    p.bias_t_is_f32 = is_f32;
  }
}

int padded_head_dim(int64_t d) {
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  return 128;
}

// Padded (D_qk, D_v) of one forward launch (see launch_fwd_dispatch for the compiled pairs).
// dqk8 ≤ 128: one shared padded dim, as in v1; above: 192 or 256 for Q/K, 64 or 128 for the V slice.
std::pair<int, int> fwd_padded_head_dims(int64_t dqk8, int64_t dv_cols) {
  if (dqk8 <= 128) {
    const int kd = padded_head_dim(std::max(dqk8, dv_cols));
    return {kd, kd};
  }
  return {dqk8 <= 192 ? 192 : 256, dv_cols <= 64 ? 64 : 128};
}

// An on/off switch read per call: unset or "1" is on, "0" off, anything else an error.
bool switch_on(const char* variable) {
  const char* env = std::getenv(variable);
  TORCH_CHECK(env == nullptr || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
              "fastcm attention (CUDA): ", variable, " must be 0 or 1 (or unset), got '", env, "'");
  return env == nullptr || env[0] == '1';
}

// FASTCM_ATTN_BIAS_STAGE, read per call: unset or "scalar" stages the forward's bias tiles with one
// load per element, "vector" with one vector load per 4 keys where the rows allow it (see
// the bias staging modes in attention_fwd_kernel.cuh); anything else is an error.
bool bias_stage_vector() {
  const char* env = std::getenv("FASTCM_ATTN_BIAS_STAGE");
  TORCH_CHECK(env == nullptr || std::strcmp(env, "scalar") == 0 || std::strcmp(env, "vector") == 0,
              "fastcm attention (CUDA): FASTCM_ATTN_BIAS_STAGE must be scalar or vector (or unset), got '", env, "'");
  return env != nullptr && std::strcmp(env, "vector") == 0;
}

// Whether every 4-key chunk the vector staging loads (keys n0 + 4k of a row, n0 a multiple of 4) is one
// aligned vector load: contiguous rows, and the chunk's first element 4-element aligned (row, head and
// batch strides multiples of 4 where the dimension has more than one entry, the data pointer aligned
// to 4 elements). Broadcast (stride 0) dimensions qualify; a stride-0 key dimension does not.
bool bias_rows_vectorisable(const at::Tensor& b) {
  auto aligned = [&](int dim) { return b.size(dim) == 1 || b.stride(dim) % 4 == 0; };
  return b.stride(3) == 1 && aligned(0) && aligned(1) && aligned(2) &&
         reinterpret_cast<uintptr_t>(b.data_ptr()) % (4 * b.element_size()) == 0;
}

// The shared memory per block the sm_90a kernels may use on `device` (its opt-in limit), or
// 0 where it may not run: the build has no sm_90a code (setup.py defines FASTCM_WITH_SM90A when the
// arch list names 9.0a), the device is not sm_90, or FASTCM_ATTN_SM90 (read per call) is 0.
int sm90_smem_limit_of(const at::Device& device) {
  const bool on = switch_on("FASTCM_ATTN_SM90");
#ifdef FASTCM_WITH_SM90A
  if (!on) return 0;
  int major = 0, limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, (int)device.index()));
  if (major != 9) return 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, (int)device.index()));
  return limit;
#else
  (void)device;
  (void)on;
  return 0;
#endif
}

// A (B, heads, rows, D) tensor as the kernel reads it, readable through a tensor map: not empty (a
// tensor map has no zero-length dimension; empty keys take the kernels that loop over no tile) and
// no stride-0 (broadcast) dimension longer than 1 (kernel_view has made the other strides
// multiples of 8).
bool tma_ready(const at::Tensor& t) {
  return t.numel() > 0 && attn::tma_strides_ok(t.stride(0), t.stride(1), t.stride(2), t.size(0), t.size(1), t.size(2));
}

// The kernel for one launch of the forward (one V slice of `cols` columns).
struct FwdLaunch {
  bool sm90;                // a wgmma kernel (padded head dim kdqk == kdv ∈ {64, 128}), else the sm_80 one
  attn::Sm90Kernel kernel;  // which one, if sm90
  bool q_regs;              // the TMA kernel with Q, Q̇ in registers
  int kdqk, kdv;            // padded head dims
};

// The switches of the sm_90a kernels, read per call: FASTCM_ATTN_SM90_TMA, _OVERLAP and _QREGS.
struct Sm90Switches {
  bool tma, overlap, q_regs;
};
Sm90Switches sm90_switches() {
  return {switch_on("FASTCM_ATTN_SM90_TMA"), switch_on("FASTCM_ATTN_SM90_OVERLAP"),
          switch_on("FASTCM_ATTN_SM90_QREGS")};
}

// sm90_smem_limit: sm90_smem_limit_of's answer; tma_ok: the TMA switch is on and every input
// is tma_ready. A wgmma kernel where the padded head dims are (64, 64) or (128, 128) and its tiles
// (with the bias tiles) fit; only d = 128 JVP with both bias and bias_t (257 KB) does not fit
// sm_90's 227 KB. Of those, the TMA kernel where its tiles fit (at d = 128 only without bias /
// bias_t) and every 64-column panel of Q/K and of V holds data (a box wholly outside the tensor,
// e.g. Q/K's second panel at D_qk ≤ 64 < D_v, is left to the cp.async kernel: what TMA credits
// the mbarrier for such a box is not documented), overlapped (its switch) except at d = 128 JVP,
// whose registers do not allow it, with Q in registers (its switch) at d = 64.
FwdLaunch plan_forward_launch(int sm90_smem_limit, bool tma_ok, const Sm90Switches& sw, int64_t dqk8, int64_t cols,
                              bool jvp, bool has_bias, bool has_bias_t) {
  const auto [kdqk, kdv] = fwd_padded_head_dims(dqk8, cols);
  const bool sm90 = kdqk == kdv && (kdqk == 64 || kdqk == 128) &&
                    attn::fwd_sm90_smem_bytes(kdqk, jvp, has_bias, has_bias_t) <= sm90_smem_limit;
  const int ws_smem = attn::fwd_sm90_ws_smem_bytes(kdqk, jvp, has_bias, has_bias_t);  // -1: takes no bias
  const bool panels_hold_data = dqk8 > kdqk - 64 && cols > kdv - 64;
  const bool tma = sm90 && tma_ok && panels_hold_data && ws_smem >= 0 && ws_smem <= sm90_smem_limit;
  const attn::Sm90Kernel kernel = !tma                                    ? attn::Sm90Kernel::kCpAsync
                                  : (sw.overlap && !(kdqk == 128 && jvp)) ? attn::Sm90Kernel::kTmaOverlap
                                                                          : attn::Sm90Kernel::kTma;
  return {sm90, kernel, tma && sw.q_regs && kdqk == 64, kdqk, kdv};
}

std::string kernel_name(const FwdLaunch& l) {
  if (!l.sm90) return "sm_80";
  const char* q = l.q_regs ? "_qregs" : "";
  switch (l.kernel) {
    case attn::Sm90Kernel::kTma:
      return std::string("sm_90a_tma") + q;
    case attn::Sm90Kernel::kTmaOverlap:
      return std::string("sm_90a_tma_overlap") + q;
    default:
      return "sm_90a";
  }
}

// The name attention_forward_kernels gives a launch.
std::string launch_label(const FwdLaunch& l) {
  return kernel_name(l) + " (" + std::to_string(l.kdqk) + ", " + std::to_string(l.kdv) + ")";
}

// Shared body of the two forward ops. Tangent tensors are undefined for the primal-only op.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& qt_in,
    const at::Tensor& kt_in, const at::Tensor& vt_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& bias_t_in, double scale, bool causal) {
  const bool jvp = qt_in.defined();
  check_qkv(op, q_in, k_in, v_in);
  if (jvp) {
    check_same(op, "q_t", qt_in, q_in);
    check_same(op, "k_t", kt_in, k_in);
    check_same(op, "v_t", vt_in, v_in);
  }
  TORCH_CHECK(q_in.size(3) <= kMaxHeadDimQK, op, " (CUDA): q.size(-1) (the q/k head dim D_qk) is ", q_in.size(3),
              "; the CUDA kernel supports D_qk up to ", kMaxHeadDimQK,
              " (padded to 32, 64, 96, 128, 192 or 256; D_v is not limited)");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  c10::cuda::CUDAGuard guard(q_in.device());

  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), Dqk = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31) && B * H < (int64_t(1) << 31), op,
              ": sizes too large for 32-bit row indices");
  const auto bias = prepare_bias(op, "bias", bias_in, q_in, Nk);
  const auto bias_t = jvp ? prepare_bias(op, "bias_t", bias_t_in, q_in, Nk) : std::nullopt;

  const int64_t Dv8 = round_up(Dv, 8);
  const auto opts = q_in.options();
  at::Tensor out = at::empty({B, H, Nq, Dv8}, opts);
  at::Tensor out_t = jvp ? at::empty({B, H, Nq, Dv8}, opts) : at::Tensor();
  at::Tensor lse = at::empty({B, H, Nq}, opts.dtype(at::kFloat));
  at::Tensor lse_t = jvp ? at::empty({B, H, Nq}, opts.dtype(at::kFloat)) : at::Tensor();

  auto finish = [&]() {
    if (Dv8 != Dv) {
      out = out.narrow(-1, 0, Dv).contiguous();
      if (jvp) out_t = out_t.narrow(-1, 0, Dv).contiguous();
    }
    return std::make_tuple(out, out_t, lse, lse_t);
  };
  if (B * H * Nq == 0) return finish();

  const at::Tensor q = kernel_view(q_in), k = kernel_view(k_in), v = kernel_view(v_in);
  const at::Tensor qt = jvp ? kernel_view(qt_in) : at::Tensor();
  const at::Tensor kt = jvp ? kernel_view(kt_in) : at::Tensor();
  const at::Tensor vt = jvp ? kernel_view(vt_in) : at::Tensor();

  attn::FwdParams p{};
  p.B = (int)B;
  p.H = (int)H;
  p.Hkv = (int)Hkv;
  p.Nq = (int)Nq;
  p.Nk = (int)Nk;
  p.d_qk = (int)round_up(Dqk, 8);
  p.scale = (float)scale;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sn = q.stride(2);
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_sn = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(1);
  p.v_sn = v.stride(2);
  if (jvp) {
    p.q_t = qt.data_ptr();
    p.k_t = kt.data_ptr();
    p.qt_sb = qt.stride(0);
    p.qt_sh = qt.stride(1);
    p.qt_sn = qt.stride(2);
    p.kt_sb = kt.stride(0);
    p.kt_sh = kt.stride(1);
    p.kt_sn = kt.stride(2);
    p.vt_sb = vt.stride(0);
    p.vt_sh = vt.stride(1);
    p.vt_sn = vt.stride(2);
  }
  set_bias(p, bias, false);
  set_bias(p, bias_t, true);
  p.bias_stage = bias_stage_vector() ? 1 : 0;
  p.bias_mode =
      p.bias_is_f32 | p.bias_stage << 1 | (p.bias_stage && bias.has_value() && bias_rows_vectorisable(*bias) ? 4 : 0);
  p.bias_t_mode = p.bias_t_is_f32 | p.bias_stage << 1 |
                  (p.bias_stage && bias_t.has_value() && bias_rows_vectorisable(*bias_t) ? 4 : 0);
  p.lse = lse.data_ptr<float>();
  p.lse_t = jvp ? lse_t.data_ptr<float>() : nullptr;
  p.o_sb = out.stride(0);
  p.o_sh = out.stride(1);
  p.o_sn = out.stride(2);
  if (jvp) {
    p.ot_sb = out_t.stride(0);
    p.ot_sh = out_t.stride(1);
    p.ot_sn = out_t.stride(2);
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sm90_smem_limit = sm90_smem_limit_of(q.device());
  const Sm90Switches sw = sm90_switches();
  const bool tma_ok = sw.tma && sm90_smem_limit > 0 && tma_ready(q) && tma_ready(k) && tma_ready(v) &&
                      (!jvp || (tma_ready(qt) && tma_ready(kt) && tma_ready(vt)));
  // Head dims of V above 128 run as several launches over 128-column slices of V / O (each
  // recomputes S; LSE and μ are rewritten with the same values).
  const int64_t v_cols = v.size(3);  // Dv8
  for (int64_t c0 = 0; c0 < v_cols; c0 += kMaxHeadDimVChunk) {
    const int64_t cols = std::min(kMaxHeadDimVChunk, v_cols - c0);
    p.d_v = (int)cols;
    p.v = static_cast<const char*>(v.data_ptr()) + c0 * v.element_size();
    p.out = static_cast<char*>(out.data_ptr()) + c0 * out.element_size();
    if (jvp) {
      p.v_t = static_cast<const char*>(vt.data_ptr()) + c0 * vt.element_size();
      p.out_t = static_cast<char*>(out_t.data_ptr()) + c0 * out_t.element_size();
    }
    const FwdLaunch launch =
        plan_forward_launch(sm90_smem_limit, tma_ok, sw, p.d_qk, cols, jvp, bias.has_value(), bias_t.has_value());
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    if (launch.sm90) {
      if (bf16)
        attn::launch_fwd_sm90_dispatch<__nv_bfloat16>(p, launch.kdqk, jvp, launch.kernel, launch.q_regs, stream);
      else
        attn::launch_fwd_sm90_dispatch<__half>(p, launch.kdqk, jvp, launch.kernel, launch.q_regs, stream);
    } else {
      if (bf16)
        attn::launch_fwd_dispatch<__nv_bfloat16>(p, launch.kdqk, launch.kdv, jvp, stream);
      else
        attn::launch_fwd_dispatch<__half>(p, launch.kdqk, launch.kdv, jvp, stream);
    }
  }
  return finish();
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& bias, double scale,
                                                          bool causal) {
  auto r = forward_impl("fastcm::attention_forward", q, k, v, at::Tensor(), at::Tensor(), at::Tensor(), bias,
                        std::nullopt, scale, causal);
  return std::make_tuple(std::get<0>(r), std::get<2>(r));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_jvp_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_t,
    const std::optional<at::Tensor>& k_t, const std::optional<at::Tensor>& v_t, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_t, double scale, bool causal) {
  // The CUDA kernels read every tangent: an absent one (a zero tangent, which the CPU kernel
  // skips) is materialised as zeros here, at the cost of its allocation and reads.
  const auto tangent = [](const std::optional<at::Tensor>& t, const at::Tensor& primal) {
    return t.has_value() ? *t : at::zeros_like(primal);
  };
  auto r = forward_impl("fastcm::attention_forward_jvp", q, k, v, tangent(q_t, q), tangent(k_t, k), tangent(v_t, v),
                        bias, bias_t, scale, causal);
  return std::make_tuple(std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r));
}

// fastcm::attention_forward_kernels: the forward kernel of each launch the forward op (jvp: the JVP
// op) would make for these q, v (one per 128-column V slice; k and the tangents laid out as q, v)
// with or without bias / bias_t, as "sm_90a_tma_overlap (kd, kd)", "sm_90a_tma (kd, kd)" (either with
// "_qregs" after "tma..." where Q stays in registers), "sm_90a (kd, kd)" or "sm_80 (kdqk, kdv)";
// for tests and benchmark labels.
std::vector<std::string> attention_forward_kernels_cuda(const at::Tensor& q, const at::Tensor& v, bool jvp,
                                                        bool has_bias, bool has_bias_t) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && v.dim() == 4,
              "fastcm::attention_forward_kernels: q, v must be 4-D CUDA tensors");
  c10::cuda::CUDAGuard guard(q.device());
  const int sm90_smem_limit = sm90_smem_limit_of(q.device());
  const Sm90Switches sw = sm90_switches();
  const bool tma_ok = sw.tma && sm90_smem_limit > 0 && tma_ready(kernel_view(q)) && tma_ready(kernel_view(v));
  std::vector<std::string> names;
  const int64_t dqk8 = round_up(q.size(3), 8), dv8 = round_up(v.size(3), 8);
  for (int64_t c0 = 0; c0 < dv8; c0 += kMaxHeadDimVChunk) {
    const FwdLaunch l = plan_forward_launch(sm90_smem_limit, tma_ok, sw, dqk8, std::min(kMaxHeadDimVChunk, dv8 - c0),
                                            jvp, has_bias, jvp && has_bias_t);
    names.push_back(launch_label(l));
  }
  return names;
}

// Head dims the fused backward covers (its kernels are compiled for padded d ≤ 128).
constexpr int64_t kMaxHeadDimBwd = 128;

// ATen backward for head dims above kMaxHeadDimBwd. dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)),
// dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO, with P = exp(scale·QKᵀ + bias − LSE) (0 on
// fully masked rows, LSE = −inf), in float32, chunked over query rows (peak extra memory
// ≈ 3·H·chunk·Nk·4 bytes per batch entry, capped near 512 MiB). GQA: the gradients of the H/Hkv
// query heads sharing a kv head add.
void attention_backward_aten(at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const at::Tensor& grad_out,
                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const std::optional<at::Tensor>& bias, double scale, bool causal,
                             const std::optional<at::Tensor>& grad_lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3), G = H / Hkv;
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t budget = int64_t(512) << 20;  // bytes for the (H, chunk, Nk) float32 temporaries (×3)
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(Nq, budget / (12 * H * std::max<int64_t>(Nk, 1))));
  const at::Tensor row = at::arange(Nq, q.options().dtype(at::kLong));
  const at::Tensor col = at::arange(Nk, q.options().dtype(at::kLong));

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor qf = q[b].to(at::kFloat);                          // (H, Nq, Dqk)
    const at::Tensor kf = k[b].to(at::kFloat).repeat_interleave(G, 0);  // (H, Nk, Dqk)
    const at::Tensor vf = v[b].to(at::kFloat).repeat_interleave(G, 0);  // (H, Nk, Dv)
    const at::Tensor dof = grad_out[b].to(at::kFloat);                  // (H, Nq, Dv)
    at::Tensor delta = (dof * out[b].to(at::kFloat)).sum(-1);           // (H, Nq)
    if (grad_lse.has_value()) delta = delta - (*grad_lse)[b];
    const at::Tensor lse_b = lse[b];
    at::Tensor dq_b = at::empty({H, Nq, Dqk}, f32);
    at::Tensor dk_b = at::zeros({H, Nk, Dqk}, f32);
    at::Tensor dv_b = at::zeros({H, Nk, Dv}, f32);
    for (int64_t i0 = 0; i0 < Nq; i0 += chunk) {
      const int64_t n = std::min(chunk, Nq - i0);
      const at::Tensor qc = qf.narrow(1, i0, n), doc = dof.narrow(1, i0, n);
      at::Tensor s = at::bmm(qc, kf.transpose(1, 2)).mul_(scale);  // (H, n, Nk)
      if (bias.has_value()) s.add_((*bias)[b].narrow(1, i0, n).to(at::kFloat));
      if (causal) {
        const at::Tensor masked = col.view({1, Nk}) > (row.narrow(0, i0, n).view({n, 1}) + (Nk - Nq));
        s.masked_fill_(masked, -INFINITY);
      }
      const at::Tensor l = lse_b.narrow(1, i0, n).unsqueeze(-1);  // (H, n, 1)
      at::Tensor pm = at::exp(s.sub_(l));
      pm.masked_fill_(l.isneginf().expand_as(pm), 0.0);
      dv_b.add_(at::bmm(pm.transpose(1, 2), doc));
      at::Tensor ds = at::bmm(doc, vf.transpose(1, 2));  // dP
      ds.sub_(delta.narrow(1, i0, n).unsqueeze(-1)).mul_(pm);
      dq_b.narrow(1, i0, n).copy_(at::bmm(ds, kf).mul_(scale));
      dk_b.add_(at::bmm(ds.transpose(1, 2), qc).mul_(scale));
    }
    dq[b].copy_(dq_b);
    dk[b].copy_(dk_b.view({Hkv, G, Nk, Dqk}).sum(1));
    dv[b].copy_(dv_b.view({Hkv, G, Nk, Dv}).sum(1));
  }
}

// The backward kernels of one call: the wgmma ones ("sm_90a": sm_90 device with sm_90a code,
// padded head dim 64 or 128, FASTCM_ATTN_SM90_BWD on), the fused mma.sync ones ("sm_80":
// D_qk, D_v ≤ 128 and their shared memory fits), else "aten". kd: the padded head dim of the fused
// kernels (0 for aten).
struct BwdPlan {
  const char* kernel;
  int kd;
};
// sm90_on: FASTCM_ATTN_SM90_BWD; sm90_limit: sm90_smem_limit_of's answer (0: no sm_90a kernel may
// run); smem_limit: the device's opt-in shared memory per block.
BwdPlan plan_backward_for(bool sm90_on, int sm90_limit, int smem_limit, int64_t Dqk, int64_t Dv, bool has_bias) {
  if (Dqk > kMaxHeadDimBwd || Dv > kMaxHeadDimBwd) return {"aten", 0};
  const int kd = padded_head_dim(std::max(round_up(Dqk, 8), round_up(Dv, 8)));
  if (sm90_on && (kd == 64 || kd == 128) && attn::bwd_sm90_smem_bytes(kd, has_bias) <= sm90_limit) {
    return {"sm_90a", kd};
  }
  return attn::bwd_smem_bytes(kd, has_bias) <= smem_limit ? BwdPlan{"sm_80", kd} : BwdPlan{"aten", 0};
}

BwdPlan plan_backward(const at::Device& device, int64_t Dqk, int64_t Dv, bool has_bias) {
  const bool sm90_on = switch_on("FASTCM_ATTN_SM90_BWD");
  const int sm90_limit = sm90_smem_limit_of(device);
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, (int)device.index()));
  return plan_backward_for(sm90_on, sm90_limit, smem_limit, Dqk, Dv, has_bias);
}

// The name attention_backward_kernels gives a backward call.
std::string launch_label(const BwdPlan& plan) {
  return plan.kd == 0 ? std::string("aten") : std::string(plan.kernel) + " (" + std::to_string(plan.kd) + ")";
}

// Fused backward (attention_bwd_kernel.cuh, or attention_bwd_sm90_kernel.cuh where plan.kernel is
// "sm_90a"): δ, dQ and dK/dV kernels. Inputs go through
// kernel_view like the forward's (head dims zero-padded to a multiple of 8 where needed); the
// gradients are allocated at the padded width and narrowed back.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_fused(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& bias, double scale, bool causal,
    const std::optional<at::Tensor>& grad_lse, const BwdPlan& plan) {
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), Dqk = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2), Dv = v_in.size(3);
  const at::Tensor q = kernel_view(q_in), k = kernel_view(k_in), v = kernel_view(v_in);
  const at::Tensor dout = kernel_view(grad_out_in), out = kernel_view(out_in);
  const int64_t Dqk8 = q.size(3), Dv8 = v.size(3);
  const auto opts = q_in.options();
  at::Tensor dq = at::empty({B, H, Nq, Dqk8}, opts);
  at::Tensor dk = at::empty({B, Hkv, Nk, Dqk8}, opts);
  at::Tensor dv = at::empty({B, Hkv, Nk, Dv8}, opts);
  at::Tensor delta = at::empty({B, H, Nq}, opts.dtype(at::kFloat));

  attn::BwdParams p{};
  p.B = (int)B;
  p.H = (int)H;
  p.Hkv = (int)Hkv;
  p.Nq = (int)Nq;
  p.Nk = (int)Nk;
  p.d_qk = (int)Dqk8;
  p.d_v = (int)Dv8;
  p.scale = (float)scale;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sn = q.stride(2);
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_sn = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(1);
  p.v_sn = v.stride(2);
  p.do_sb = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.do_sn = dout.stride(2);
  p.o_sb = out.stride(0);
  p.o_sh = out.stride(1);
  p.o_sn = out.stride(2);
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.b_sb = bias->stride(0);
    p.b_sh = bias->stride(1);
    p.b_sm = bias->stride(2);
    p.b_sn = bias->stride(3);
    p.bias_is_f32 = bias->scalar_type() == at::kFloat;
  }
  p.lse = lse.data_ptr<float>();
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_sb = dq.stride(0);
  p.dq_sh = dq.stride(1);
  p.dq_sn = dq.stride(2);
  p.dk_sb = dk.stride(0);
  p.dk_sh = dk.stride(1);
  p.dk_sn = dk.stride(2);
  p.dv_sb = dv.stride(0);
  p.dv_sh = dv.stride(1);
  p.dv_sn = dv.stride(2);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (std::strcmp(plan.kernel, "sm_90a") == 0) {
    if (bf16)
      attn::launch_bwd_sm90_dispatch<__nv_bfloat16>(p, plan.kd, stream);
    else
      attn::launch_bwd_sm90_dispatch<__half>(p, plan.kd, stream);
  } else {
    if (bf16)
      attn::launch_bwd_dispatch<__nv_bfloat16>(p, plan.kd, stream);
    else
      attn::launch_bwd_dispatch<__half>(p, plan.kd, stream);
  }
  if (Dqk8 != Dqk) {
    dq = dq.narrow(-1, 0, Dqk).contiguous();
    dk = dk.narrow(-1, 0, Dqk).contiguous();
  }
  if (Dv8 != Dv) dv = dv.narrow(-1, 0, Dv).contiguous();
  return std::make_tuple(dq, dk, dv);
}

// The kernels plan_backward picks: wgmma (sm_90) or fused mma.sync for head dims ≤ kMaxHeadDimBwd
// where their shared memory fits the device, the ATen path otherwise (e.g. D = 256).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse_in,
                                                                       const std::optional<at::Tensor>& bias_in,
                                                                       double scale, bool causal,
                                                                       const std::optional<at::Tensor>& grad_lse_in) {
  const char* op = "fastcm::attention_backward";
  check_qkv(op, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dqk = q.size(3);
  const int64_t Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, Nq, Dv}) && out.sizes() == grad_out.sizes(), op,
              ": grad_out and out must be (B, H, Nq, Dv) = (", B, ", ", H, ", ", Nq, ", ", Dv, "), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Nq}), op, ": lse must be (B, H, Nq), got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32 (as the forward returns it), got ",
              lse_in.scalar_type());
  if (grad_lse_in.has_value()) {
    TORCH_CHECK(grad_lse_in->sizes() == lse_in.sizes() && grad_lse_in->scalar_type() == at::kFloat &&
                    grad_lse_in->device() == q.device(),
                op, ": grad_lse must match lse (shape (B, H, Nq), float32, q's device), got ", grad_lse_in->sizes(),
                " ", grad_lse_in->scalar_type(), " on ", grad_lse_in->device());
  }
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse_in.device() == q.device(), op,
              ": grad_out, out, lse must be on q's device");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31) && B * H < (int64_t(1) << 31), op,
              ": sizes too large for 32-bit row indices");
  c10::cuda::CUDAGuard guard(q.device());
  const auto bias = prepare_bias(op, "bias", bias_in, q, Nk);
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<at::Tensor> grad_lse =
      grad_lse_in.has_value() ? std::optional<at::Tensor>(grad_lse_in->contiguous()) : std::nullopt;

  if (q.numel() == 0 || k.numel() == 0 || Nq == 0) {
    return std::make_tuple(at::zeros_like(q, at::MemoryFormat::Contiguous),
                           at::zeros_like(k, at::MemoryFormat::Contiguous),
                           at::zeros_like(v, at::MemoryFormat::Contiguous));
  }
  const BwdPlan plan = plan_backward(q.device(), Dqk, Dv, bias.has_value());
  if (plan.kd > 0) return attention_backward_fused(grad_out, q, k, v, out, lse, bias, scale, causal, grad_lse, plan);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  attention_backward_aten(dq, dk, dv, grad_out, q, k, v, out, lse, bias, scale, causal, grad_lse);
  return std::make_tuple(dq, dk, dv);
}

// fastcm::attention_backward_kernels: the backward kernels attention_backward would use for these
// q, v (with or without a bias), as "sm_90a (kd)", "sm_80 (kd)" or "aten"; for tests and benchmark
// labels.
std::vector<std::string> attention_backward_kernels_cuda(const at::Tensor& q, const at::Tensor& v, bool has_bias) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && v.dim() == 4,
              "fastcm::attention_backward_kernels: q, v must be 4-D CUDA tensors");
  c10::cuda::CUDAGuard guard(q.device());
  return {launch_label(plan_backward(q.device(), q.size(3), v.size(3), has_bias))};
}

// fastcm::plan_attention_forward / plan_attention_backward: the kernel choice for given device
// limits and switches, without a device (CUDA builds only; the tests compare it with their model).
std::string plan_attention_forward(int64_t sm90_smem_limit, bool tma_ok, bool overlap, bool q_regs, int64_t dqk8,
                                   int64_t cols, bool jvp, bool has_bias, bool has_bias_t) {
  return launch_label(plan_forward_launch((int)sm90_smem_limit, tma_ok, Sm90Switches{tma_ok, overlap, q_regs}, dqk8,
                                          cols, jvp, has_bias, has_bias_t));
}
std::string plan_attention_backward(bool sm90_on, int64_t sm90_smem_limit, int64_t smem_limit, int64_t dqk, int64_t dv,
                                    bool has_bias) {
  return launch_label(plan_backward_for(sm90_on, (int)sm90_smem_limit, (int)smem_limit, dqk, dv, has_bias));
}

}  // namespace

// Device-free ops of CUDA builds only (the schemas of the others are in csrc/attention.cpp).
TORCH_LIBRARY_FRAGMENT(fastcm, m) {
  m.def(
      "plan_attention_forward(int sm90_smem_limit, bool tma_ok, bool overlap, bool q_regs, int dqk8, int cols,"
      " bool jvp, bool has_bias, bool has_bias_t) -> str",
      &plan_attention_forward);
  m.def(
      "plan_attention_backward(bool sm90_on, int sm90_smem_limit, int smem_limit, int dqk, int dv, bool has_bias)"
      " -> str",
      &plan_attention_backward);
}

TORCH_LIBRARY_IMPL(fastcm, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_forward_jvp", &attention_forward_jvp_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_forward_kernels", &attention_forward_kernels_cuda);
  m.impl("attention_backward_kernels", &attention_backward_kernels_cuda);
}

}  // namespace fastcm
