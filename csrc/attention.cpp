// Op schemas of the fastcm extension, the argument checks every implementation shares, and the
// Python module fastcm._C (empty: importing it runs the registrations below).
#include "attention.h"

#include <sstream>

namespace fastcm {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
              name, " has dtype ", dtype, "; supported: float32, float64, bfloat16, float16");
}

bool has_cuda() {
#ifdef FASTCM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

void check_same_as(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, Nq, Dqk), got shape ", shape_of(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hkv, Nk, Dqk), got shape ", shape_of(k));
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hkv, Nk, Dv), got shape ", shape_of(v));
  check_float_dtype(op, "q", q);
  check_same_as(op, "k", k, "q", q);
  check_same_as(op, "v", v, "q", q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", shape_of(q), ", k ",
              shape_of(k), ", v ", shape_of(v));
  TORCH_CHECK(k.size(1) == v.size(1), op, ": k has ", k.size(1), " heads but v has ", v.size(1), "; they must match");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q has ", q.size(1), " heads, not a multiple of the ",
              k.size(1), " heads of k and v (grouped-query attention needs H % Hkv == 0)");
  TORCH_CHECK(k.size(2) == v.size(2), op, ": k has ", k.size(2), " keys but v has ", v.size(2), "; they must match");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k has head dim ", k.size(3), " but q has ", q.size(3),
              "; they must match");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_as(op, "bias", b, "q", q);
    const std::vector<int64_t> expected = {q.size(0), q.size(1), q.size(2), k.size(2)};
    TORCH_CHECK(b.sizes() == at::IntArrayRef(expected), op, ": bias has shape ", shape_of(b),
                "; expected (B, H, Nq, Nk) = ", at::IntArrayRef(expected), " (broadcast views are accepted)");
  }
}

}  // namespace fastcm

TORCH_LIBRARY(fastcm, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, bool causal)"
      " -> (Tensor out, Tensor lse)");
  // q_t, k_t, v_t: None is a zero tangent (conditioning tokens that carry none).
  m.def(
      "attention_forward_jvp(Tensor q, Tensor k, Tensor v, Tensor? q_t, Tensor? k_t, Tensor? v_t,"
      " Tensor? bias, Tensor? bias_t, float scale, bool causal)"
      " -> (Tensor out, Tensor out_t, Tensor lse, Tensor lse_t)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? bias, float scale, bool causal, Tensor? grad_lse=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // CUDA only: which forward / backward kernels the CUDA ops would launch for these q, v (see
  // attention_cuda.cu).
  m.def("attention_forward_kernels(Tensor q, Tensor v, bool jvp, bool has_bias, bool has_bias_t) -> str[]");
  m.def("attention_backward_kernels(Tensor q, Tensor v, bool has_bias) -> str[]");
  // No tensor arguments: a catch-all kernel, answered the same whatever the device.
  m.def("has_cuda() -> bool", &fastcm::has_cuda);
}

TORCH_LIBRARY_IMPL(fastcm, CPU, m) {
  m.impl("attention_forward", &fastcm::attention_forward_cpu);
  m.impl("attention_forward_jvp", &fastcm::attention_forward_jvp_cpu);
  m.impl("attention_backward", &fastcm::attention_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
