// CPU attention with forward-mode JVP: tiled online softmax (flash form) over key blocks,
// parallel over batch x heads x query blocks, accumulating in float32 (float64 for float64).
//
// Per key block, with S = scale*QK^T + bias (masked entries -inf) and its tangent
// Sd = scale*(Qd K^T + Q Kd^T) + bias_t:
//   m' = max(m, rowmax S), alpha = exp(m - m'), p = exp(S - m'), h = p*Sd,
//   l <- alpha*l + sum p,  r <- alpha*r + sum h,  A <- alpha*A + pV,  T <- alpha*T + p Vd + h V;
// at the end O = A/l, LSE = m + log l, mu = r/l (the LSE tangent), Od = T/l - mu*O.
// (In the code h = p*(Sd - c) with a per-row constant c, so mu = c + r/l; see tangent_shift.)
#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastcm {
namespace {

constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 64;

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
      : data(t.data_ptr<scalar_t>()),
        s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}

  const scalar_t* row(int64_t b, int64_t h, int64_t i) const {
    return data + b * s0 + h * s1 + i * s2;
  }
  scalar_t at(int64_t b, int64_t h, int64_t i, int64_t j) const { return row(b, h, i)[j * s3]; }
};

// The kernels index the last dim of q/k/v/grad_out/out contiguously.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Problem {
  int64_t batch, heads, kv_heads, groups, num_queries, num_keys, dim_qk, dim_v;
  int64_t causal_offset;  // Nk - Nq: query i sees key j iff j <= i + offset
  bool causal;
  double scale;

  Problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_,
          bool causal_)
      : batch(q.size(0)), heads(q.size(1)), kv_heads(k.size(1)), groups(q.size(1) / k.size(1)),
        num_queries(q.size(2)), num_keys(k.size(2)), dim_qk(q.size(3)), dim_v(v.size(3)),
        causal_offset(k.size(2) - q.size(2)), causal(causal_), scale(scale_) {}

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

// Copies rows [j0, j0 + n) of a (N, D) slice into a (D, n) column block in acc precision:
// score rows then accumulate as axpy over contiguous keys, which vectorises without
// reassociating a dot product.
template <typename scalar_t, typename acc_t>
void load_transposed(const View4<scalar_t>& src, int64_t b, int64_t h, int64_t j0, int64_t n,
                     int64_t dim, acc_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = src.row(b, h, j0 + j);
    for (int64_t d = 0; d < dim; ++d) dst[d * n + j] = static_cast<acc_t>(row[d]);
  }
}

template <typename scalar_t, typename acc_t>
void load_rows(const View4<scalar_t>& src, int64_t b, int64_t h, int64_t i0, int64_t n,
               int64_t dim, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = src.row(b, h, i0 + i);
    for (int64_t d = 0; d < dim; ++d) dst[i * dim + d] = static_cast<acc_t>(row[d]);
  }
}

// scores[j] = sum_d query[d] * keys_t[d * ld + j], j < n <= ld.
template <typename acc_t>
void row_times_columns(const acc_t* query, const acc_t* keys_t, int64_t dim, int64_t ld,
                       int64_t n, acc_t* scores) {
  std::fill(scores, scores + n, acc_t(0));
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t qd = query[d];
    const acc_t* col = keys_t + d * ld;
    for (int64_t j = 0; j < n; ++j) scores[j] += qd * col[j];
  }
}

template <typename acc_t>
void axpy(acc_t a, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

template <typename scalar_t>
struct ForwardTensors {
  View4<scalar_t> q, k, v, q_t, k_t, v_t, bias, bias_t;
  bool has_bias = false, has_bias_t = false;
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

  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_blk(kBlockQ * Dqk), k_cols(Dqk * kBlockK), v_blk(kBlockK * Dv);
    std::vector<acc_t> qt_blk, kt_cols, vt_blk;
    std::vector<acc_t> row_max(kBlockQ), row_sum(kBlockQ), acc(kBlockQ * Dv);
    std::vector<acc_t> tangent_sum, tangent_acc, tangent_shift;
    std::vector<char> shift_set;
    std::vector<acc_t> scores(kBlockK), score_t(kBlockK), tmp(kBlockK);
    if (kTangent) {
      qt_blk.resize(kBlockQ * Dqk);
      kt_cols.resize(Dqk * kBlockK);
      vt_blk.resize(kBlockK * Dv);
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

      load_rows(t.q, b, h, i0, nq, Dqk, q_blk.data());
      if (kTangent) load_rows(t.q_t, b, h, i0, nq, Dqk, qt_blk.data());
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (kTangent) {
        std::fill(tangent_sum.begin(), tangent_sum.end(), acc_t(0));
        std::fill(tangent_acc.begin(), tangent_acc.end(), acc_t(0));
        std::fill(shift_set.begin(), shift_set.end(), 0);
      }

      const int64_t block_key_end = p.key_end(i0 + nq - 1);
      for (int64_t j0 = 0; j0 < block_key_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, block_key_end - j0);
        load_transposed(t.k, b, kvh, j0, nk, Dqk, k_cols.data());
        load_rows(t.v, b, kvh, j0, nk, Dv, v_blk.data());
        if (kTangent) {
          load_transposed(t.k_t, b, kvh, j0, nk, Dqk, kt_cols.data());
          load_rows(t.v_t, b, kvh, j0, nk, Dv, vt_blk.data());
        }
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t qi = i0 + i;
          const int64_t visible = std::min(nk, p.key_end(qi) - j0);
          if (visible <= 0) continue;
          row_times_columns(&q_blk[i * Dqk], k_cols.data(), Dqk, nk, visible, scores.data());
          if (kTangent) {
            row_times_columns(&qt_blk[i * Dqk], k_cols.data(), Dqk, nk, visible, score_t.data());
            row_times_columns(&q_blk[i * Dqk], kt_cols.data(), Dqk, nk, visible, tmp.data());
          }
          acc_t block_max = neg_inf;
          for (int64_t j = 0; j < visible; ++j) {
            acc_t s = scale * scores[j];
            if (t.has_bias) s += static_cast<acc_t>(t.bias.at(b, h, qi, j0 + j));
            scores[j] = s;
            block_max = std::max(block_max, s);
            if (kTangent) {
              acc_t st = scale * (score_t[j] + tmp[j]);
              if (t.has_bias_t) st += static_cast<acc_t>(t.bias_t.at(b, h, qi, j0 + j));
              score_t[j] = st;
            }
          }
          const acc_t new_max = std::max(row_max[i], block_max);
          // Every score so far is -inf: nothing to accumulate (and exp(-inf - -inf) is NaN).
          if (new_max == neg_inf) continue;
          const acc_t alpha = std::exp(row_max[i] - new_max);
          row_max[i] = new_max;
          for (int64_t j = 0; j < visible; ++j) scores[j] = std::exp(scores[j] - new_max);
          if (kTangent && !shift_set[i]) {
            // Od = sum p(Sd - c)V / l - (mu - c) O holds for any per-row c; c = this block's
            // estimate of mu keeps T and r small, so T/l - (r/l) O cancels little in float32.
            acc_t weight = 0, weighted = 0;
            for (int64_t j = 0; j < visible; ++j) {
              if (scores[j] == acc_t(0)) continue;
              weight += scores[j];
              weighted += scores[j] * score_t[j];
            }
            tangent_shift[i] = weighted / weight;
            shift_set[i] = true;
          }
          acc_t* a_row = &acc[i * Dv];
          for (int64_t d = 0; d < Dv; ++d) a_row[d] *= alpha;
          acc_t* t_row = kTangent ? &tangent_acc[i * Dv] : nullptr;
          if (kTangent) {
            for (int64_t d = 0; d < Dv; ++d) t_row[d] *= alpha;
          }
          acc_t block_sum = 0, block_tangent_sum = 0;
          for (int64_t j = 0; j < visible; ++j) {
            const acc_t w = scores[j];
            // Keys with weight 0 (masked or underflowed) add nothing; skipping them also keeps
            // 0 * inf out of the sums when a masked key's score tangent is infinite.
            if (w == acc_t(0)) continue;
            block_sum += w;
            axpy(w, &v_blk[j * Dv], a_row, Dv);
            if (kTangent) {
              const acc_t hw = w * (score_t[j] - tangent_shift[i]);
              block_tangent_sum += hw;
              axpy(w, &vt_blk[j * Dv], t_row, Dv);
              axpy(hw, &v_blk[j * Dv], t_row, Dv);
            }
          }
          row_sum[i] = alpha * row_sum[i] + block_sum;
          if (kTangent) tangent_sum[i] = alpha * tangent_sum[i] + block_tangent_sum;
        }
      }

      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = (b * p.heads + h) * p.num_queries + i0 + i;
        scalar_t* o = t.out + row * Dv;
        scalar_t* ot = kTangent ? t.out_t + row * Dv : nullptr;
        if (row_sum[i] == acc_t(0)) {  // fully masked row
          for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
          t.lse[row] = neg_inf;
          if (kTangent) {
            for (int64_t d = 0; d < Dv; ++d) ot[d] = scalar_t(0);
            t.lse_t[row] = 0;
          }
          continue;
        }
        const acc_t inv = acc_t(1) / row_sum[i];
        t.lse[row] = row_max[i] + std::log(row_sum[i]);
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
void run_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor* q_t, const at::Tensor* k_t, const at::Tensor* v_t,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bias_t,
                 at::Tensor& out, at::Tensor* out_t, at::Tensor& lse, at::Tensor* lse_t) {
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
    t.q_t = View4<scalar_t>(*q_t);
    t.k_t = View4<scalar_t>(*k_t);
    t.v_t = View4<scalar_t>(*v_t);
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
  TORCH_CHECK(q.device().is_cpu(), op, ": the CPU kernel got q on ", q.device(),
              "; supported: cpu");
}

template <typename scalar_t>
struct BackwardTensors {
  View4<scalar_t> grad_out, q, k, v, bias;
  bool has_bias = false;
  const typename AccType<scalar_t>::type* lse = nullptr;
  const typename AccType<scalar_t>::type* delta = nullptr;  // rowsum(grad_out * out)
  scalar_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
};

// Recomputes the probabilities of query row (b, h, qi) against keys [j0, j0 + n) from the
// saved LSE: prob[j] = exp(scale * q.k_j + bias - lse).
template <typename scalar_t, typename acc_t>
void probabilities(const Problem& p, const BackwardTensors<scalar_t>& t, const acc_t* query,
                   const acc_t* k_cols, int64_t ld, int64_t b, int64_t h, int64_t qi, int64_t j0,
                   int64_t n, acc_t lse, acc_t* prob) {
  row_times_columns(query, k_cols, p.dim_qk, ld, n, prob);
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = scale * prob[j];
    if (t.has_bias) s += static_cast<acc_t>(t.bias.at(b, h, qi, j0 + j));
    prob[j] = std::exp(s - lse);
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
    std::vector<acc_t> k_cols(Dqk * kBlockK), k_rows(kBlockK * Dqk), v_cols(Dv * kBlockK);
    std::vector<acc_t> prob(kBlockK), dprob(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = (task / q_blocks) % p.heads;
      const int64_t b = task / (q_blocks * p.heads);
      const int64_t kvh = h / p.groups;
      const int64_t i0 = qb * kBlockQ;
      const int64_t nq = std::min(kBlockQ, p.num_queries - i0);
      const int64_t row0 = (b * p.heads + h) * p.num_queries + i0;
      load_rows(t.q, b, h, i0, nq, Dqk, q_blk.data());
      load_rows(t.grad_out, b, h, i0, nq, Dv, go_blk.data());
      std::fill(dq_blk.begin(), dq_blk.end(), acc_t(0));
      const int64_t block_key_end = p.key_end(i0 + nq - 1);
      for (int64_t j0 = 0; j0 < block_key_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, block_key_end - j0);
        load_transposed(t.k, b, kvh, j0, nk, Dqk, k_cols.data());
        load_rows(t.k, b, kvh, j0, nk, Dqk, k_rows.data());
        load_transposed(t.v, b, kvh, j0, nk, Dv, v_cols.data());
        for (int64_t i = 0; i < nq; ++i) {
          const acc_t lse = t.lse[row0 + i];
          const int64_t visible = std::min(nk, p.key_end(i0 + i) - j0);
          // A fully masked row (lse = -inf) has zero gradients.
          if (visible <= 0 || std::isinf(lse)) continue;
          probabilities(p, t, &q_blk[i * Dqk], k_cols.data(), nk, b, h, i0 + i, j0, visible, lse,
                        prob.data());
          row_times_columns(&go_blk[i * Dv], v_cols.data(), Dv, nk, visible, dprob.data());
          const acc_t delta = t.delta[row0 + i];
          for (int64_t j = 0; j < visible; ++j) {
            const acc_t ds = prob[j] * (dprob[j] - delta);
            if (ds != acc_t(0)) axpy(scale * ds, &k_rows[j * Dqk], &dq_blk[i * Dqk], Dqk);
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        scalar_t* dst = t.dq + (row0 + i) * Dqk;
        for (int64_t d = 0; d < Dqk; ++d) dst[d] = static_cast<scalar_t>(dq_blk[i * Dqk + d]);
      }
    }
  });
}

// dK, dV: parallel over (b, kv head, key block); each task sums over the query heads of its
// group and owns its rows of dk and dv.
template <typename scalar_t>
void backward_dkdv(const Problem& p, const BackwardTensors<scalar_t>& t) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t k_blocks = (p.num_keys + kBlockK - 1) / kBlockK;
  const int64_t Dqk = p.dim_qk, Dv = p.dim_v;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.kv_heads * k_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_cols(Dqk * kBlockK), v_cols(Dv * kBlockK);
    std::vector<acc_t> dk_blk(kBlockK * Dqk), dv_blk(kBlockK * Dv);
    std::vector<acc_t> query(Dqk), go(Dv), prob(kBlockK), dprob(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = task % k_blocks;
      const int64_t kvh = (task / k_blocks) % p.kv_heads;
      const int64_t b = task / (k_blocks * p.kv_heads);
      const int64_t j0 = kb * kBlockK;
      const int64_t nk = std::min(kBlockK, p.num_keys - j0);
      load_transposed(t.k, b, kvh, j0, nk, Dqk, k_cols.data());
      load_transposed(t.v, b, kvh, j0, nk, Dv, v_cols.data());
      std::fill(dk_blk.begin(), dk_blk.end(), acc_t(0));
      std::fill(dv_blk.begin(), dv_blk.end(), acc_t(0));
      for (int64_t h = kvh * p.groups; h < (kvh + 1) * p.groups; ++h) {
        const int64_t row0 = (b * p.heads + h) * p.num_queries;
        for (int64_t qi = p.first_query(j0); qi < p.num_queries; ++qi) {
          const acc_t lse = t.lse[row0 + qi];
          const int64_t visible = std::min(nk, p.key_end(qi) - j0);
          if (visible <= 0 || std::isinf(lse)) continue;
          load_rows(t.q, b, h, qi, 1, Dqk, query.data());
          load_rows(t.grad_out, b, h, qi, 1, Dv, go.data());
          probabilities(p, t, query.data(), k_cols.data(), nk, b, h, qi, j0, visible, lse,
                        prob.data());
          row_times_columns(go.data(), v_cols.data(), Dv, nk, visible, dprob.data());
          const acc_t delta = t.delta[row0 + qi];
          for (int64_t j = 0; j < visible; ++j) {
            if (prob[j] == acc_t(0)) continue;
            axpy(prob[j], go.data(), &dv_blk[j * Dv], Dv);
            axpy(scale * prob[j] * (dprob[j] - delta), query.data(), &dk_blk[j * Dqk], Dqk);
          }
        }
      }
      const int64_t key0 = (b * p.kv_heads + kvh) * p.num_keys + j0;
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < Dqk; ++d)
          t.dk[(key0 + j) * Dqk + d] = static_cast<scalar_t>(dk_blk[j * Dqk + d]);
        for (int64_t d = 0; d < Dv; ++d)
          t.dv[(key0 + j) * Dv + d] = static_cast<scalar_t>(dv_blk[j * Dv + d]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& bias, double scale, bool causal) {
  constexpr const char* op = "fastcm::attention_forward";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const Problem p(q, k, v, scale, causal);
  at::Tensor out = at::empty({p.batch, p.heads, p.num_queries, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.num_queries}, q.options().dtype(acc_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    run_forward<scalar_t, false>(p, q, k, v, nullptr, nullptr, nullptr, bias, c10::nullopt, out,
                                 nullptr, lse, nullptr);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_jvp_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& q_t_in, const at::Tensor& k_t_in, const at::Tensor& v_t_in,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bias_t, double scale,
    bool causal) {
  constexpr const char* op = "fastcm::attention_forward_jvp";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  const std::pair<const char*, std::pair<const at::Tensor*, const at::Tensor*>> pairs[] = {
      {"q_t", {&q_t_in, &q_in}}, {"k_t", {&k_t_in, &k_in}}, {"v_t", {&v_t_in, &v_in}}};
  for (const auto& entry : pairs) {
    const at::Tensor& tangent = *entry.second.first;
    const at::Tensor& primal = *entry.second.second;
    check_same_as(op, entry.first, tangent, "q", q_in);
    TORCH_CHECK(tangent.sizes() == primal.sizes(), op, ": ", entry.first, " has shape ",
                tangent.sizes(), " but its primal has shape ", primal.sizes(), "; they must match");
  }
  if (bias_t.has_value()) {
    TORCH_CHECK(bias.has_value(), op, ": bias_t was given without bias");
    check_same_as(op, "bias_t", *bias_t, "q", q_in);
    TORCH_CHECK(bias_t->sizes() == bias->sizes(), op, ": bias_t has shape ", bias_t->sizes(),
                " but bias has shape ", bias->sizes(), "; they must match");
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), q_t = last_dim_contiguous(q_t_in),
                   k_t = last_dim_contiguous(k_t_in), v_t = last_dim_contiguous(v_t_in);
  const Problem p(q, k, v, scale, causal);
  at::Tensor out = at::empty({p.batch, p.heads, p.num_queries, p.dim_v}, q.options());
  at::Tensor out_t = at::empty_like(out);
  at::Tensor lse = at::empty({p.batch, p.heads, p.num_queries}, q.options().dtype(acc_dtype(q)));
  at::Tensor lse_t = at::empty_like(lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    run_forward<scalar_t, true>(p, q, k, v, &q_t, &k_t, &v_t, bias, bias_t, out, &out_t, lse,
                                &lse_t);
  });
  return {out, out_t, lse, lse_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& bias, double scale, bool causal) {
  constexpr const char* op = "fastcm::attention_backward";
  check_attention_inputs(op, q_in, k_in, v_in, bias);
  check_cpu(op, q_in);
  check_same_as(op, "grad_out", grad_out_in, "q", q_in);
  check_same_as(op, "out", out_in, "q", q_in);
  const std::vector<int64_t> out_shape = {q_in.size(0), q_in.size(1), q_in.size(2), v_in.size(3)};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape) &&
                  out_in.sizes() == at::IntArrayRef(out_shape),
              op, ": grad_out ", grad_out_in.sizes(), " and out ", out_in.sizes(),
              " must have shape (B, H, Nq, Dv) = ", at::IntArrayRef(out_shape));
  TORCH_CHECK(lse_in.scalar_type() == acc_dtype(q_in), op, ": lse has dtype ",
              lse_in.scalar_type(), "; expected ", acc_dtype(q_in), " for ", q_in.scalar_type(),
              " inputs");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(out_shape).slice(0, 3), op, ": lse has shape ",
              lse_in.sizes(), "; expected (B, H, Nq) = ", at::IntArrayRef(out_shape).slice(0, 3));
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), grad_out = last_dim_contiguous(grad_out_in),
                   out = last_dim_contiguous(out_in), lse = lse_in.contiguous();
  const Problem p(q, k, v, scale, causal);
  // delta_i = sum_d dO_id * O_id, the row term of the softmax backward.
  const at::Tensor delta =
      (grad_out.to(acc_dtype(q)) * out.to(acc_dtype(q))).sum(-1).contiguous();
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
    backward_dq(p, t);
    backward_dkdv(p, t);
  });
  return {dq, dk, dv};
}

}  // namespace fastcm
