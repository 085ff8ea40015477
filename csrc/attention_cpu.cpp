// CPU attention with forward-mode JVP: tiled online softmax (flash form) over key blocks,
// parallel over batch x heads x query blocks, accumulating in float32 (float64 for float64).
//
// Per key block, with S = scale*QK^T + bias (masked entries -inf) and its tangent
// Sd = scale*(Qd K^T + Q Kd^T) + bias_t:
//   m' = max(m, rowmax S), alpha = exp(m - m'), p = exp(S - m'), h = p*Sd,
//   l <- alpha*l + sum p,  r <- alpha*r + sum h,  A <- alpha*A + pV,  T <- alpha*T + p Vd + h V;
// at the end O = A/l, LSE = m + log l, mu = r/l (the LSE tangent), Od = T/l - mu*O.
// (In the code h = p*(Sd - c) with a per-row constant c, so mu = c + r/l; see tangent_shift.)
// An absent tangent (Qd, Kd or Vd) is zero: its loads and its half of the packed products are
// skipped, which is what conditioning tokens without a tangent (cross-attention) save.
//
// The tile products run as BLAS GEMMs on tiles copied into acc precision (so bf16/fp16 are
// converted once per tile); the per-element softmax work runs in contiguous row loops that
// the compiler vectorises.
#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace fastcm {
namespace {

// 128 x 128 float tiles: one score tile is 64 KiB, and the working set of a JVP step (scores,
// score tangents, [p | h], packed K and V tiles) stays inside a 1 MiB L2 while each GEMM is
// large enough (~2 MFLOP) that its call overhead (about a microsecond) is a few percent.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 128;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Read-only 4-D view (B, H, N, D): a raw pointer and element strides, so that broadcast
// (stride-0) biases and head/sequence-strided q/k/v are read in place.
template <typename scalar_t>
struct View4 {
  const scalar_t* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  View4() = default;
  explicit View4(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}

  const scalar_t* row(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

// The kernels index the last dim of q/k/v/grad_out/out contiguously.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::ScalarType acc_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Problem {
  int64_t batch, heads, kv_heads, groups, num_queries, num_keys, dim_qk, dim_v;
  int64_t causal_offset;  // Nk - Nq: query i sees key j iff j <= i + offset
  bool causal;
  double scale;

  Problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_, bool causal_)
      : batch(q.size(0)),
        heads(q.size(1)),
        kv_heads(k.size(1)),
        groups(q.size(1) / k.size(1)),
        num_queries(q.size(2)),
        num_keys(k.size(2)),
        dim_qk(q.size(3)),
        dim_v(v.size(3)),
        causal_offset(k.size(2) - q.size(2)),
        causal(causal_),
        scale(scale_) {}

  // One past the last key that query row i may see.
  int64_t key_end(int64_t i) const {
    if (!causal) return num_keys;
    return std::max<int64_t>(0, std::min(num_keys, i + causal_offset + 1));
  }
  // First query row that sees key j.
  int64_t first_query(int64_t j) const {
    if (!causal) return 0;
    return std::max<int64_t>(0, j - causal_offset);
  }
};

// Copies rows [i0, i0 + n) of a (N, dim) slice into dst rows of leading dimension ld, in acc
// precision. Packing two operands side by side (ld = 2 * dim) lets one GEMM of depth 2*dim do
// the two products of a tangent.
template <typename scalar_t, typename acc_t>
void load_rows(const View4<scalar_t>& src, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t dim, acc_t* dst,
               int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = src.row(b, h, i0 + i);
    acc_t* out = dst + i * ld;
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<acc_t>(row[d]);
  }
}

// A row-major matrix in a tile buffer; `transposed` reads the stored (cols x rows) matrix as
// its transpose, which BLAS does without a copy.
template <typename acc_t>
struct Mat {
  const acc_t* data;
  int64_t rows, cols, ld;
  bool transposed = false;
};

template <typename acc_t>
at::Tensor as_tensor(const Mat<acc_t>& m) {
  const std::vector<int64_t> strides = m.transposed ? std::vector<int64_t>{1, m.ld} : std::vector<int64_t>{m.ld, 1};
  return at::from_blob(const_cast<acc_t*>(m.data), {m.rows, m.cols}, strides,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// c (a.rows x b.cols, row-major, leading dimension ldc) = alpha * a b + beta * c. addmm_ on
// views of the tile buffers reaches torch's BLAS (MKL/OpenBLAS sgemm, dgemm) for about a
// microsecond of overhead per call; beta = 0 ignores c's old contents, NaN included.
template <typename acc_t>
void gemm(const Mat<acc_t>& a, const Mat<acc_t>& b, acc_t* c, int64_t ldc, acc_t alpha, acc_t beta) {
  if (a.rows == 0 || b.cols == 0) return;
  at::Tensor out =
      at::from_blob(c, {a.rows, b.cols}, {ldc, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  out.addmm_(as_tensor(a), as_tensor(b), beta, alpha);
}

// Per-element softmax helpers. GCC's default -ftrapping-math forbids turning the selects
// below (masked keys, the exp clamp) into vector blends, which keeps these loops scalar; no
// code here reads floating-point exception flags, so they are compiled without it (torch
// builds all of ATen with -fno-trapping-math). Clang does this by default.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// The extension is built for baseline x86-64 (SSE2); the exp below is the hottest
// elementwise loop, so GCC also emits an AVX2/FMA clone of it and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCM_AVX2_CLONE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTCM_AVX2_CLONE
#endif

// out[j] = exp(s[j] - shift) for shift >= max s (so every argument is <= 0, or -inf / NaN).
// The float version is a branch-free Cephes-style exp (about 1 ulp) that the compiler
// vectorises; std::exp is a scalar libm call. Arguments below -87 (where e^x would be
// subnormal) give exactly 0, so masked keys keep weight 0.
FASTCM_AVX2_CLONE void exp_shifted(const float* s, float shift, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] - shift;
    const float xc = x < -87.0f ? -87.0f : x;
    // Round xc / ln 2 to nearest with the 1.5 * 2^23 trick (no SSE4.1 round needed).
    const float n_f = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    // ln 2 split in two so that r = xc - n ln 2 is exact to float precision.
    const float r = (xc - n_f * 0.693359375f) + n_f * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const float er = poly * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n_f) + 127) << 23;
    float pow2;
    std::memcpy(&pow2, &bits, sizeof(pow2));
    out[j] = x < -87.0f ? 0.0f : er * pow2;
  }
}

void exp_shifted(const double* s, double shift, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(s[j] - shift);
}

// Sums and maxima in eight interleaved lanes: a single running sum is bound by the add
// latency, and the compiler may not reorder a floating-point reduction by itself.
constexpr int64_t kLanes = 8;

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  acc_t lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = s[j + l] > lane[l] ? s[j + l] : lane[l];
  for (; j < n; ++j) lane[0] = s[j] > lane[0] ? s[j] : lane[0];
  acc_t result = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) result = lane[l] > result ? lane[l] : result;
  return result;
}

template <typename acc_t>
acc_t row_sum(const acc_t* w, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += w[j + l];
  for (; j < n; ++j) lane[0] += w[j];
  acc_t result = 0;
  for (int64_t l = 0; l < kLanes; ++l) result += lane[l];
  return result;
}

// sum_j w[j] * st[j] over keys of nonzero weight. Keys with weight 0 (masked or underflowed)
// add nothing; selecting 0 for them also keeps 0 * inf out of the sum when a masked key's
// score tangent is infinite.
template <typename acc_t>
acc_t weighted_sum(const acc_t* w, const acc_t* st, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += w[j + l] == acc_t(0) ? acc_t(0) : w[j + l] * st[j + l];
  for (; j < n; ++j) lane[0] += w[j] == acc_t(0) ? acc_t(0) : w[j] * st[j];
  acc_t result = 0;
  for (int64_t l = 0; l < kLanes; ++l) result += lane[l];
  return result;
}

// hw[j] = w[j] * (st[j] - shift), 0 where w[j] = 0 (as in weighted_sum).
template <typename acc_t>
void tangent_weights(const acc_t* w, const acc_t* st, acc_t shift, int64_t n, acc_t* hw) {
  for (int64_t j = 0; j < n; ++j) hw[j] = w[j] == acc_t(0) ? acc_t(0) : w[j] * (st[j] - shift);
}

// ds[j] = prob[j] * (dprob[j] - delta): the softmax backward, overwriting dprob.
template <typename acc_t>
void score_grads(const acc_t* prob, acc_t delta, int64_t n, acc_t* ds) {
  for (int64_t j = 0; j < n; ++j) ds[j] = prob[j] * (ds[j] - delta);
}

template <typename acc_t>
void scale_row(acc_t alpha, int64_t n, acc_t* row) {
  for (int64_t j = 0; j < n; ++j) row[j] *= alpha;
}

// s[j] += bias(b, h, qi, j0 + j), j < n: bias may be broadcast (stride 0) or of low precision.
template <typename scalar_t, typename acc_t>
void add_bias(const View4<scalar_t>& bias, int64_t b, int64_t h, int64_t qi, int64_t j0, int64_t n, acc_t* s) {
  const scalar_t* row = bias.row(b, h, qi) + j0 * bias.s3;
  const int64_t stride = bias.s3;
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(row[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(row[j * stride]);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename scalar_t>
struct ForwardTensors {
  View4<scalar_t> q, k, v, q_t, k_t, v_t, bias, bias_t;
  bool has_bias = false, has_bias_t = false;
  bool has_q_t = false, has_k_t = false, has_v_t = false;
  scalar_t* out = nullptr;
  scalar_t* out_t = nullptr;
  typename AccType<scalar_t>::type* lse = nullptr;
  typename AccType<scalar_t>::type* lse_t = nullptr;
};

template <typename scalar_t, bool kTangent>
void forward_kernel(const Problem& p, const ForwardTensors<scalar_t>& t) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t q_blocks = (p.num_queries + kBlockQ - 1) / kBlockQ;
  const int64_t Dqk = p.dim_qk, Dv = p.dim_v;
  // With a tangent, q rows hold [Q | Qd] and k rows [Kd | K]: one GEMM of depth 2*Dqk gives
  // Q Kd^T + Qd K^T, and the left halves of q against the right halves of k give Q K^T.
  // Likewise [p | h] rows against [Vd ; V] give p Vd + h V in one GEMM.
  const int64_t pack = kTangent ? 2 : 1;
  const int64_t ld_qk = pack * Dqk;
  // Columns [Q | Qd] x [Kd | K] of the score-tangent GEMM: Q Kd^T needs the left halves, Qd K^T
  // the right ones; with one of Qd, Kd absent only its partner's half is multiplied.
  const int64_t tangent_col = t.has_k_t ? 0 : Dqk;
  const int64_t tangent_depth = (int64_t(t.has_q_t) + int64_t(t.has_k_t)) * Dqk;

  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_blk(kBlockQ * ld_qk), k_blk(kBlockK * ld_qk);
    std::vector<acc_t> v_blk(pack * kBlockK * Dv);
    std::vector<acc_t> scores(kBlockQ * kBlockK), weights(kBlockQ * pack * kBlockK);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ), acc(kBlockQ * Dv);  // running max, sum
    std::vector<acc_t> score_t, tangent_sum, tangent_acc, tangent_shift;
    std::vector<char> shift_set;
    if (kTangent) {
      score_t.resize(kBlockQ * kBlockK);
      tangent_sum.resize(kBlockQ);
      tangent_acc.resize(kBlockQ * Dv);
      tangent_shift.resize(kBlockQ);
      shift_set.resize(kBlockQ);
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = (task / q_blocks) % p.heads;
      const int64_t b = task / (q_blocks * p.heads);
      const int64_t kvh = h / p.groups;
      const int64_t i0 = qb * kBlockQ;
      const int64_t nq = std::min(kBlockQ, p.num_queries - i0);

      load_rows(t.q, b, h, i0, nq, Dqk, q_blk.data(), ld_qk);
      if (kTangent && t.has_q_t) load_rows(t.q_t, b, h, i0, nq, Dqk, q_blk.data() + Dqk, ld_qk);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (kTangent) {
        std::fill(tangent_sum.begin(), tangent_sum.end(), acc_t(0));
        std::fill(tangent_acc.begin(), tangent_acc.end(), acc_t(0));
        std::fill(shift_set.begin(), shift_set.end(), 0);
      }

      const int64_t block_key_end = p.key_end(i0 + nq - 1);
      for (int64_t j0 = 0; j0 < block_key_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, block_key_end - j0);
        const int64_t ld_w = pack * nk;                       // weights rows: [p | h]
        acc_t* v_rows = v_blk.data() + (pack - 1) * nk * Dv;  // V below Vd
        if (kTangent && t.has_k_t) load_rows(t.k_t, b, kvh, j0, nk, Dqk, k_blk.data(), ld_qk);
        if (kTangent && t.has_v_t) load_rows(t.v_t, b, kvh, j0, nk, Dv, v_blk.data(), Dv);
        load_rows(t.k, b, kvh, j0, nk, Dqk, k_blk.data() + (pack - 1) * Dqk, ld_qk);
        load_rows(t.v, b, kvh, j0, nk, Dv, v_rows, Dv);

        const Mat<acc_t> k_primal{k_blk.data() + (pack - 1) * Dqk, Dqk, nk, ld_qk, true};
        gemm(Mat<acc_t>{q_blk.data(), nq, Dqk, ld_qk}, k_primal, scores.data(), nk, scale, acc_t(0));
        if (kTangent && tangent_depth > 0) {
          gemm(Mat<acc_t>{q_blk.data() + tangent_col, nq, tangent_depth, ld_qk},
               Mat<acc_t>{k_blk.data() + tangent_col, tangent_depth, nk, ld_qk, true}, score_t.data(), nk, scale,
               acc_t(0));
        } else if (kTangent) {
          std::fill(score_t.begin(), score_t.begin() + nq * nk, acc_t(0));
        }

        for (int64_t i = 0; i < nq; ++i) {
          const int64_t qi = i0 + i;
          const int64_t visible = std::max<int64_t>(0, std::min(nk, p.key_end(qi) - j0));
          acc_t* s = &scores[i * nk];
          acc_t* w = &weights[i * ld_w];
          // Keys past the causal edge get weight 0 here; the GEMMs still run over them.
          std::fill(w + visible, w + nk, acc_t(0));
          if (kTangent) std::fill(w + nk + visible, w + 2 * nk, acc_t(0));
          if (t.has_bias) add_bias(t.bias, b, h, qi, j0, visible, s);
          const acc_t new_max = std::max(m[i], row_max(s, visible));
          // Every score so far is -inf: nothing to accumulate (and exp(-inf - -inf) is NaN).
          if (new_max == neg_inf) {
            std::fill(w, w + visible, acc_t(0));
            if (kTangent) std::fill(w + nk, w + nk + visible, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(m[i] - new_max);
          m[i] = new_max;
          exp_shifted(s, new_max, visible, w);
          const acc_t block_sum = row_sum(w, visible);
          l[i] = alpha * l[i] + block_sum;
          scale_row(alpha, Dv, &acc[i * Dv]);
          if (!kTangent) continue;

          acc_t* st = &score_t[i * nk];
          if (t.has_bias_t) add_bias(t.bias_t, b, h, qi, j0, visible, st);
          if (!shift_set[i]) {
            // Od = sum p(Sd - c)V / l - (mu - c) O holds for any per-row c; c = this block's
            // estimate of mu keeps T and r small, so T/l - (r/l) O cancels little in float32.
            tangent_shift[i] = weighted_sum(w, st, visible) / block_sum;
            shift_set[i] = true;
          }
          tangent_weights(w, st, tangent_shift[i], visible, w + nk);
          tangent_sum[i] = alpha * tangent_sum[i] + row_sum(w + nk, visible);
          scale_row(alpha, Dv, &tangent_acc[i * Dv]);
        }

        gemm(Mat<acc_t>{weights.data(), nq, nk, ld_w}, Mat<acc_t>{v_rows, nk, Dv, Dv}, acc.data(), Dv, acc_t(1),
             acc_t(1));
        if (kTangent) {
          // Without Vd only h V remains: the right half of [p | h] against V.
          const int64_t skip = t.has_v_t ? 0 : nk;
          gemm(Mat<acc_t>{weights.data() + skip, nq, ld_w - skip, ld_w},
               Mat<acc_t>{v_blk.data() + skip * Dv, ld_w - skip, Dv, Dv}, tangent_acc.data(), Dv, acc_t(1), acc_t(1));
        }
      }

      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = (b * p.heads + h) * p.num_queries + i0 + i;
        scalar_t* o = t.out + row * Dv;
        scalar_t* ot = kTangent ? t.out_t + row * Dv : nullptr;
        if (l[i] == acc_t(0)) {  // fully masked row
          for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
          t.lse[row] = neg_inf;
          if (kTangent) {
            for (int64_t d = 0; d < Dv; ++d) ot[d] = scalar_t(0);
            t.lse_t[row] = 0;
          }
          continue;
        }
        const acc_t inv = acc_t(1) / l[i];
        t.lse[row] = m[i] + std::log(l[i]);
        const acc_t shifted_mu = kTangent ? tangent_sum[i] * inv : acc_t(0);
        for (int64_t d = 0; d < Dv; ++d) {
          const acc_t od = acc[i * Dv + d] * inv;
          o[d] = static_cast<scalar_t>(od);
          if (kTangent) ot[d] = static_cast<scalar_t>(tangent_acc[i * Dv + d] * inv - shifted_mu * od);
        }
        if (kTangent) t.lse_t[row] = tangent_shift[i] + shifted_mu;
      }
    }
  });
}

template <typename scalar_t, bool kTangent>
void run_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* q_t,
                 const at::Tensor* k_t, const at::Tensor* v_t, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& bias_t, at::Tensor& out, at::Tensor* out_t, at::Tensor& lse,
                 at::Tensor* lse_t) {
  using acc_t = typename AccType<scalar_t>::type;
  ForwardTensors<scalar_t> t;
  t.q = View4<scalar_t>(q);
  t.k = View4<scalar_t>(k);
  t.v = View4<scalar_t>(v);
  if (bias.has_value()) {
    t.bias = View4<scalar_t>(*bias);
    t.has_bias = true;
  }
  t.out = out.data_ptr<scalar_t>();
  t.lse = lse.data_ptr<acc_t>();
  if (kTangent) {
    t.has_q_t = q_t != nullptr && q_t->defined();
    t.has_k_t = k_t != nullptr && k_t->defined();
    t.has_v_t = v_t != nullptr && v_t->defined();
    if (t.has_q_t) t.q_t = View4<scalar_t>(*q_t);
    if (t.has_k_t) t.k_t = View4<scalar_t>(*k_t);
    if (t.has_v_t) t.v_t = View4<scalar_t>(*v_t);
    if (bias_t.has_value()) {
      t.bias_t = View4<scalar_t>(*bias_t);
      t.has_bias_t = true;
    }
    t.out_t = out_t->data_ptr<scalar_t>();
    t.lse_t = lse_t->data_ptr<acc_t>();
  }
  forward_kernel<scalar_t, kTangent>(p, t);
}

void check_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, ": the CPU kernel got q on ", q.device(), "; supported: cpu");
}

template <typename scalar_t>
struct BackwardTensors {
  View4<scalar_t> grad_out, q, k, v, bias;
  bool has_bias = false;
  const typename AccType<scalar_t>::type* lse = nullptr;
  const typename AccType<scalar_t>::type* delta = nullptr;  // rowsum(grad_out * out)
  scalar_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
};

// Rows [0, nq) of a query tile against keys [j0, j0 + nk): turns scores (scale q.k, from a
// GEMM) into probabilities exp(s + bias - lse) in place and dprob (grad_out.v, from a GEMM)
// into the score gradient prob * (dprob - delta). Keys past the causal edge and fully masked
// rows (lse = -inf) get 0.
template <typename scalar_t, typename acc_t>
void probabilities_and_score_grads(const Problem& p, const BackwardTensors<scalar_t>& t, int64_t b, int64_t h,
                                   int64_t i0, int64_t nq, int64_t j0, int64_t nk, acc_t* scores, acc_t* dprob) {
  const int64_t row0 = (b * p.heads + h) * p.num_queries + i0;
  for (int64_t i = 0; i < nq; ++i) {
    const acc_t lse = t.lse[row0 + i];
    acc_t* s = &scores[i * nk];
    acc_t* ds = &dprob[i * nk];
    const int64_t visible = std::isinf(lse) ? 0 : std::max<int64_t>(0, std::min(nk, p.key_end(i0 + i) - j0));
    std::fill(s + visible, s + nk, acc_t(0));
    std::fill(ds + visible, ds + nk, acc_t(0));
    if (visible == 0) continue;
    if (t.has_bias) add_bias(t.bias, b, h, i0 + i, j0, visible, s);
    exp_shifted(s, lse, visible, s);
    score_grads(s, t.delta[row0 + i], visible, ds);
  }
}

// dQ: parallel over (b, h, query block); each task owns its rows of dq.
template <typename scalar_t>
void backward_dq(const Problem& p, const BackwardTensors<scalar_t>& t) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t q_blocks = (p.num_queries + kBlockQ - 1) / kBlockQ;
  const int64_t Dqk = p.dim_qk, Dv = p.dim_v;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_blk(kBlockQ * Dqk), go_blk(kBlockQ * Dv), dq_blk(kBlockQ * Dqk);
    std::vector<acc_t> k_blk(kBlockK * Dqk), v_blk(kBlockK * Dv);
    std::vector<acc_t> scores(kBlockQ * kBlockK), dprob(kBlockQ * kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = (task / q_blocks) % p.heads;
      const int64_t b = task / (q_blocks * p.heads);
      const int64_t kvh = h / p.groups;
      const int64_t i0 = qb * kBlockQ;
      const int64_t nq = std::min(kBlockQ, p.num_queries - i0);
      const int64_t row0 = (b * p.heads + h) * p.num_queries + i0;
      load_rows(t.q, b, h, i0, nq, Dqk, q_blk.data(), Dqk);
      load_rows(t.grad_out, b, h, i0, nq, Dv, go_blk.data(), Dv);
      std::fill(dq_blk.begin(), dq_blk.end(), acc_t(0));
      const int64_t block_key_end = p.key_end(i0 + nq - 1);
      for (int64_t j0 = 0; j0 < block_key_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, block_key_end - j0);
        load_rows(t.k, b, kvh, j0, nk, Dqk, k_blk.data(), Dqk);
        load_rows(t.v, b, kvh, j0, nk, Dv, v_blk.data(), Dv);
        gemm(Mat<acc_t>{q_blk.data(), nq, Dqk, Dqk}, Mat<acc_t>{k_blk.data(), Dqk, nk, Dqk, true}, scores.data(), nk,
             scale, acc_t(0));
        gemm(Mat<acc_t>{go_blk.data(), nq, Dv, Dv}, Mat<acc_t>{v_blk.data(), Dv, nk, Dv, true}, dprob.data(), nk,
             acc_t(1), acc_t(0));
        probabilities_and_score_grads(p, t, b, h, i0, nq, j0, nk, scores.data(), dprob.data());
        gemm(Mat<acc_t>{dprob.data(), nq, nk, nk}, Mat<acc_t>{k_blk.data(), nk, Dqk, Dqk}, dq_blk.data(), Dqk, scale,
             acc_t(1));
      }
      for (int64_t i = 0; i < nq; ++i) {
        scalar_t* dst = t.dq + (row0 + i) * Dqk;
        for (int64_t d = 0; d < Dqk; ++d) dst[d] = static_cast<scalar_t>(dq_blk[i * Dqk + d]);
      }
    }
  });
}

// Per-thread buffers of the key-block sweep, in the accumulation type.
template <typename acc_t>
struct KeyBlockScratch {
  std::vector<acc_t> k_blk, v_blk, dk_blk, dv_blk, q_blk, go_blk, scores, dprob;
  KeyBlockScratch(int64_t Dqk, int64_t Dv)
      : k_blk(kBlockK * Dqk),
        v_blk(kBlockK * Dv),
        dk_blk(kBlockK * Dqk),
        dv_blk(kBlockK * Dv),
        q_blk(kBlockQ * Dqk),
        go_blk(kBlockQ * Dv),
        scores(kBlockQ * kBlockK),
        dprob(kBlockQ * kBlockK) {}
};

// One key block: dK, dV summed over the query heads of the group and their query blocks, and,
// when dq_group is given, scale·dS·K of this key block added into the group's dQ rows
// (G × Nq × Dqk, acc_t) while S and dS are at hand.
template <typename scalar_t, typename acc_t>
void backward_key_block(const Problem& p, const BackwardTensors<scalar_t>& t, int64_t b, int64_t kvh, int64_t j0,
                        KeyBlockScratch<acc_t>& w, acc_t* dq_group) {
  const int64_t Dqk = p.dim_qk, Dv = p.dim_v;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t nk = std::min(kBlockK, p.num_keys - j0);
  load_rows(t.k, b, kvh, j0, nk, Dqk, w.k_blk.data(), Dqk);
  load_rows(t.v, b, kvh, j0, nk, Dv, w.v_blk.data(), Dv);
  std::fill(w.dk_blk.begin(), w.dk_blk.end(), acc_t(0));
  std::fill(w.dv_blk.begin(), w.dv_blk.end(), acc_t(0));
  for (int64_t h = kvh * p.groups; h < (kvh + 1) * p.groups; ++h) {
    for (int64_t i0 = p.first_query(j0); i0 < p.num_queries; i0 += kBlockQ) {
      const int64_t nq = std::min(kBlockQ, p.num_queries - i0);
      load_rows(t.q, b, h, i0, nq, Dqk, w.q_blk.data(), Dqk);
      load_rows(t.grad_out, b, h, i0, nq, Dv, w.go_blk.data(), Dv);
      gemm(Mat<acc_t>{w.q_blk.data(), nq, Dqk, Dqk}, Mat<acc_t>{w.k_blk.data(), Dqk, nk, Dqk, true}, w.scores.data(),
           nk, scale, acc_t(0));
      gemm(Mat<acc_t>{w.go_blk.data(), nq, Dv, Dv}, Mat<acc_t>{w.v_blk.data(), Dv, nk, Dv, true}, w.dprob.data(), nk,
           acc_t(1), acc_t(0));
      probabilities_and_score_grads(p, t, b, h, i0, nq, j0, nk, w.scores.data(), w.dprob.data());
      gemm(Mat<acc_t>{w.scores.data(), nk, nq, nk, true}, Mat<acc_t>{w.go_blk.data(), nq, Dv, Dv}, w.dv_blk.data(), Dv,
           acc_t(1), acc_t(1));
      gemm(Mat<acc_t>{w.dprob.data(), nk, nq, nk, true}, Mat<acc_t>{w.q_blk.data(), nq, Dqk, Dqk}, w.dk_blk.data(), Dqk,
           scale, acc_t(1));
      if (dq_group != nullptr) {
        acc_t* dq_rows = dq_group + ((h - kvh * p.groups) * p.num_queries + i0) * Dqk;
        gemm(Mat<acc_t>{w.dprob.data(), nq, nk, nk}, Mat<acc_t>{w.k_blk.data(), nk, Dqk, Dqk}, dq_rows, Dqk, scale,
             acc_t(1));
      }
    }
  }
  const int64_t key0 = (b * p.kv_heads + kvh) * p.num_keys + j0;
  for (int64_t j = 0; j < nk; ++j) {
    for (int64_t d = 0; d < Dqk; ++d) t.dk[(key0 + j) * Dqk + d] = static_cast<scalar_t>(w.dk_blk[j * Dqk + d]);
    for (int64_t d = 0; d < Dv; ++d) t.dv[(key0 + j) * Dv + d] = static_cast<scalar_t>(w.dv_blk[j * Dv + d]);
  }
}

// dK, dV: parallel over (b, kv head, key block); each task owns its rows of dk and dv.
template <typename scalar_t>
void backward_dkdv(const Problem& p, const BackwardTensors<scalar_t>& t) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t k_blocks = (p.num_keys + kBlockK - 1) / kBlockK;
  at::parallel_for(0, p.batch * p.kv_heads * k_blocks, 1, [&](int64_t begin, int64_t end) {
    KeyBlockScratch<acc_t> scratch(p.dim_qk, p.dim_v);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = task % k_blocks;
      const int64_t kvh = (task / k_blocks) % p.kv_heads;
      const int64_t b = task / (k_blocks * p.kv_heads);
      backward_key_block(p, t, b, kvh, kb * kBlockK, scratch, static_cast<acc_t*>(nullptr));
    }
  });
}

// dQ, dK, dV in one sweep: parallel over (b, kv head), each task owning its group's dQ rows
// (accumulated over all key blocks), so S and dS are formed once instead of once for dQ and once
// for dK/dV. Needs B·H_kv tasks to keep the threads busy; with fewer, the two-pass split
// (backward_dq + backward_dkdv, more and smaller tasks) is used instead.
template <typename scalar_t>
void backward_one_sweep(const Problem& p, const BackwardTensors<scalar_t>& t) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t Dqk = p.dim_qk;
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    KeyBlockScratch<acc_t> scratch(Dqk, p.dim_v);
    std::vector<acc_t> dq_group(p.groups * p.num_queries * Dqk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kvh = task % p.kv_heads, b = task / p.kv_heads;
      std::fill(dq_group.begin(), dq_group.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < p.num_keys; j0 += kBlockK)
        backward_key_block(p, t, b, kvh, j0, scratch, dq_group.data());
      for (int64_t g = 0; g < p.groups; ++g) {
        scalar_t* dst = t.dq + ((b * p.heads + kvh * p.groups + g) * p.num_queries) * Dqk;
        const acc_t* src = dq_group.data() + g * p.num_queries * Dqk;
        for (int64_t e = 0; e < p.num_queries * Dqk; ++e) dst[e] = static_cast<scalar_t>(src[e]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const c10::optional<at::Tensor>& bias,
                                                         double scale, bool causal) {
  constexpr const char* op = "fastcm::attention_forward";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const Problem p(q, k, v, scale, causal);
  at::Tensor out = at::empty({p.batch, p.heads, p.num_queries, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.num_queries}, q.options().dtype(acc_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    run_forward<scalar_t, false>(p, q, k, v, nullptr, nullptr, nullptr, bias, c10::nullopt, out, nullptr, lse, nullptr);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_jvp_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& q_t_in,
    const c10::optional<at::Tensor>& k_t_in, const c10::optional<at::Tensor>& v_t_in,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bias_t, double scale, bool causal) {
  constexpr const char* op = "fastcm::attention_forward_jvp";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  const std::pair<const char*, std::pair<const c10::optional<at::Tensor>*, const at::Tensor*>> pairs[] = {
      {"q_t", {&q_t_in, &q_in}}, {"k_t", {&k_t_in, &k_in}}, {"v_t", {&v_t_in, &v_in}}};
  for (const auto& entry : pairs) {
    if (!entry.second.first->has_value()) continue;
    const at::Tensor& tangent = **entry.second.first;
    const at::Tensor& primal = *entry.second.second;
    check_same_as(op, entry.first, tangent, "q", q_in);
    TORCH_CHECK(tangent.sizes() == primal.sizes(), op, ": ", entry.first, " has shape ", tangent.sizes(),
                " but its primal has shape ", primal.sizes(), "; they must match");
  }
  if (bias_t.has_value()) {
    TORCH_CHECK(bias.has_value(), op, ": bias_t was given without bias");
    check_same_as(op, "bias_t", *bias_t, "q", q_in);
    TORCH_CHECK(bias_t->sizes() == bias->sizes(), op, ": bias_t has shape ", bias_t->sizes(), " but bias has shape ",
                bias->sizes(), "; they must match");
  }
  // An absent tangent stays an undefined tensor (no zeros): run_forward skips it.
  const auto tangent_or_undefined = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? last_dim_contiguous(*t) : at::Tensor();
  };
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   q_t = tangent_or_undefined(q_t_in), k_t = tangent_or_undefined(k_t_in),
                   v_t = tangent_or_undefined(v_t_in);
  const Problem p(q, k, v, scale, causal);
  at::Tensor out = at::empty({p.batch, p.heads, p.num_queries, p.dim_v}, q.options());
  at::Tensor out_t = at::empty_like(out);
  at::Tensor lse = at::empty({p.batch, p.heads, p.num_queries}, q.options().dtype(acc_dtype(q)));
  at::Tensor lse_t = at::empty_like(lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    run_forward<scalar_t, true>(p, q, k, v, &q_t, &k_t, &v_t, bias, bias_t, out, &out_t, lse, &lse_t);
  });
  return {out, out_t, lse, lse_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& bias, double scale,
    bool causal, const c10::optional<at::Tensor>& grad_lse) {
  constexpr const char* op = "fastcm::attention_backward";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  check_same_as(op, "grad_out", grad_out_in, "q", q_in);
  check_same_as(op, "out", out_in, "q", q_in);
  const std::vector<int64_t> out_shape = {q_in.size(0), q_in.size(1), q_in.size(2), v_in.size(3)};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape) && out_in.sizes() == at::IntArrayRef(out_shape), op,
              ": grad_out ", grad_out_in.sizes(), " and out ", out_in.sizes(),
              " must have shape (B, H, Nq, Dv) = ", at::IntArrayRef(out_shape));
  TORCH_CHECK(lse_in.scalar_type() == acc_dtype(q_in), op, ": lse has dtype ", lse_in.scalar_type(), "; expected ",
              acc_dtype(q_in), " for ", q_in.scalar_type(), " inputs");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(out_shape).slice(0, 3), op, ": lse has shape ", lse_in.sizes(),
              "; expected (B, H, Nq) = ", at::IntArrayRef(out_shape).slice(0, 3));
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == lse_in.sizes() && grad_lse->scalar_type() == lse_in.scalar_type() &&
                    grad_lse->device() == lse_in.device(),
                op, ": grad_lse must match lse (shape (B, H, Nq), dtype ", lse_in.scalar_type(), ", device), got ",
                grad_lse->sizes(), " ", grad_lse->scalar_type(), " on ", grad_lse->device());
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   grad_out = last_dim_contiguous(grad_out_in), out = last_dim_contiguous(out_in),
                   lse = lse_in.contiguous();
  const Problem p(q, k, v, scale, causal);
  // delta_i = sum_d dO_id * O_id − dLSE_i, the row term of the softmax backward (∂LSE_i/∂s_ij =
  // P_ij, so an LSE gradient enters dS = P ⊙ (dP − delta) through delta alone).
  at::Tensor delta = (grad_out.to(acc_dtype(q)) * out.to(acc_dtype(q))).sum(-1);
  if (grad_lse.has_value()) delta = delta - *grad_lse;
  delta = delta.contiguous();
  at::Tensor dq = at::empty({p.batch, p.heads, p.num_queries, p.dim_qk}, q.options());
  at::Tensor dk = at::empty({p.batch, p.kv_heads, p.num_keys, p.dim_qk}, q.options());
  at::Tensor dv = at::empty({p.batch, p.kv_heads, p.num_keys, p.dim_v}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    using acc_t = typename AccType<scalar_t>::type;
    BackwardTensors<scalar_t> t;
    t.grad_out = View4<scalar_t>(grad_out);
    t.q = View4<scalar_t>(q);
    t.k = View4<scalar_t>(k);
    t.v = View4<scalar_t>(v);
    if (bias.has_value()) {
      t.bias = View4<scalar_t>(*bias);
      t.has_bias = true;
    }
    t.lse = lse.data_ptr<acc_t>();
    t.delta = delta.data_ptr<acc_t>();
    t.dq = dq.data_ptr<scalar_t>();
    t.dk = dk.data_ptr<scalar_t>();
    t.dv = dv.data_ptr<scalar_t>();
    if (p.batch * p.kv_heads >= at::get_num_threads()) {
      backward_one_sweep(p, t);
    } else {
      backward_dq(p, t);
      backward_dkdv(p, t);
    }
  });
  return {dq, dk, dv};
}

}  // namespace fastcm
