// infonce on the CPU: the softmax statistics, one parallel region per pass.
//
// The work is a grid of (query tile x key block) logit blocks. Each pass splits the larger side into
// contiguous parts, one per thread, and every part walks its blocks alone: a single-threaded BLAS
// product (at::mm_out inside the parallel region) makes a block of logits, a fused vectorised pass
// consumes it while it is in cache. Threads meet once per pass, not once per block, so a busy machine
// (a descheduled thread) costs one wait, not thousands.
//
// - lse: online logsumexp per query; a part over keys keeps partial (max, sum) per query, merged in
//   part order afterwards.
// - grads: w_ij = scale * weight_i * softmax_ij per block, then dq += (w * rk) k and dk += w^T q.
//   The gradient of the side that is split is owned by its part; the other side's accumulates in one
//   buffer per part, summed in part order afterwards. Deterministic for a given thread count.
//
// Contract (see ddfast/ops/infonce/streaming.py): query (N, D) normalised, float32 / float64;
// key (M, D) raw, any float dtype; key_inv_norm (M,) or none; results in the query's dtype, which is
// also the accumulation type.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"

namespace ddfast::infonce {
namespace {

constexpr int64_t kQueryTile = 256;
constexpr int64_t kKeyBlock = 512;

// row[j] <- row[j] * factor[j]; returns max_j row[j].
template <typename T>
T scale_and_max(T* row, const T* factor, int64_t cols) {
  Vec<T> vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + Vec<T>::size() <= cols; j += Vec<T>::size()) {
    Vec<T> s = Vec<T>::loadu(row + j) * Vec<T>::loadu(factor + j);
    s.store(row + j);
    vmax = at::vec::maximum(vmax, s);
  }
  T result = at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < cols; ++j) {
    row[j] *= factor[j];
    result = std::max(result, row[j]);
  }
  return result;
}

// sum_j exp(row[j] - shift)
template <typename T>
T sum_exp(const T* row, T shift, int64_t cols) {
  Vec<T> vsum(T(0)), vshift(shift);
  int64_t j = 0;
  for (; j + Vec<T>::size() <= cols; j += Vec<T>::size()) vsum = vsum + (Vec<T>::loadu(row + j) - vshift).exp();
  T result = at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, vsum);
  for (; j < cols; ++j) result += std::exp(row[j] - shift);
  return result;
}

// row[j] <- exp(row[j] * factor[j] - shift) * gain
template <typename T>
void softmax_weights(T* row, const T* factor, T shift, T gain, int64_t cols) {
  Vec<T> vshift(shift), vgain(gain);
  int64_t j = 0;
  for (; j + Vec<T>::size() <= cols; j += Vec<T>::size()) {
    ((Vec<T>::loadu(row + j) * Vec<T>::loadu(factor + j) - vshift).exp() * vgain).store(row + j);
  }
  for (; j < cols; ++j) row[j] = std::exp(row[j] * factor[j] - shift) * gain;
}

// row[j] <- row[j] * factor[j]
template <typename T>
void scale_columns(T* row, const T* factor, int64_t cols) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= cols; j += Vec<T>::size()) (Vec<T>::loadu(row + j) * Vec<T>::loadu(factor + j)).store(row + j);
  for (; j < cols; ++j) row[j] *= factor[j];
}

// Contiguous ranges of whole blocks: part p covers blocks [edges[p], edges[p + 1]).
std::vector<int64_t> split_blocks(int64_t blocks, int64_t parts) {
  std::vector<int64_t> edges(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) edges[p] = blocks * p / parts;
  return edges;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The inputs (detached: worker threads do not inherit the caller's dispatch state, and views of a
// tensor that requires grad would reach autograd there), and one part's scratch: a block of logits, the block's keys in the accumulation dtype
// (converted only for low-precision keys) and their column factors scale * key_inv_norm.
struct Problem {
  at::Tensor query, key;
  c10::optional<at::Tensor> key_inv_norm;
  double scale;
  int64_t n, m, d;

  Problem(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& rk, double s)
      : query(q.detach()), key(k.detach()), key_inv_norm(rk ? c10::optional<at::Tensor>(rk->detach()) : c10::nullopt),
        scale(s), n(q.size(0)), m(k.size(0)), d(q.size(1)) {
    DDFAST_CHECK_DIM(q, 2);
    DDFAST_CHECK_DIM(k, 2);
    DDFAST_CHECK_CONTIGUOUS(q);
    DDFAST_CHECK_CONTIGUOUS(k);
    DDFAST_CHECK_DEVICE(q, at::kCPU);
    DDFAST_CHECK_DEVICE(k, at::kCPU);
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "query must be float32 or float64");
    TORCH_CHECK(k.size(1) == d, "query and key must have the same feature dimension");
    TORCH_CHECK(at::isFloatingType(k.scalar_type()), "key must have a floating dtype, got ", k.scalar_type());
    if (rk) {
      DDFAST_CHECK_DTYPE(*rk, q.scalar_type());
      TORCH_CHECK(rk->dim() == 1 && rk->size(0) == m && rk->is_contiguous(), "key_inv_norm must be a contiguous (M,) tensor");
    }
  }

  int64_t query_tiles() const { return cdiv(n, kQueryTile); }
  int64_t key_blocks() const { return cdiv(m, kKeyBlock); }
};

template <typename T>
struct Scratch {
  const Problem& p;
  at::Tensor logits, keys_buffer, factor;
  int64_t k0 = 0, k1 = 0;
  at::Tensor keys;  // keys k0:k1 in the accumulation dtype

  explicit Scratch(const Problem& problem)
      : p(problem),
        logits(at::empty({kQueryTile * kKeyBlock}, problem.query.options())),
        keys_buffer(problem.key.scalar_type() == problem.query.scalar_type() ? at::Tensor()
                                                                            : at::empty({kKeyBlock, problem.d}, problem.query.options())),
        factor(at::empty({kKeyBlock}, problem.query.options())) {}

  // Make keys k0:k1 and their column factors current.
  void load_keys(int64_t block) {
    k0 = block * kKeyBlock;
    k1 = std::min(k0 + kKeyBlock, p.m);
    keys = p.key.slice(0, k0, k1);
    if (keys_buffer.defined()) keys = keys_buffer.narrow(0, 0, k1 - k0).copy_(keys);
    auto f = factor.narrow(0, 0, k1 - k0);
    if (p.key_inv_norm) {
      at::mul_out(f, p.key_inv_norm->slice(0, k0, k1), p.scale);
    } else {
      f.fill_(p.scale);
    }
  }

  // Raw dot products of queries q0:q1 with the current keys, (q1 - q0, k1 - k0), row-major.
  at::Tensor dots(int64_t q0, int64_t q1) {
    auto out = logits.narrow(0, 0, (q1 - q0) * (k1 - k0)).view({q1 - q0, k1 - k0});
    at::mm_out(out, p.query.slice(0, q0, q1), keys.t());
    return out;
  }

  const T* column_factor() const { return factor.data_ptr<T>(); }
};

// Online logsumexp of queries q0:q1 over the current keys into running (max, sum).
template <typename T>
void lse_block(Scratch<T>& s, int64_t q0, int64_t q1, T* run_max, T* run_sum) {
  at::Tensor logits = s.dots(q0, q1);
  const int64_t cols = s.k1 - s.k0;
  T* base = logits.template data_ptr<T>();
  for (int64_t i = q0; i < q1; ++i) {
    T* row = base + (i - q0) * cols;
    const T new_max = std::max(run_max[i], scale_and_max(row, s.column_factor(), cols));
    run_sum[i] = run_sum[i] * std::exp(run_max[i] - new_max) + sum_exp(row, new_max, cols);
    run_max[i] = new_max;
  }
}

template <typename T>
at::Tensor lse_impl(const Problem& p) {
  const int64_t threads = at::get_num_threads();
  // split the side with more blocks; over keys, each part keeps partial statistics of every query
  const bool split_keys = p.key_blocks() > p.query_tiles();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, split_keys ? p.key_blocks() : p.query_tiles()));
  const int64_t slots = split_keys ? parts : 1;
  at::Tensor run_max = at::full({slots, p.n}, -std::numeric_limits<T>::infinity(), p.query.options());
  at::Tensor run_sum = at::zeros({slots, p.n}, p.query.options());
  const auto edges = split_blocks(split_keys ? p.key_blocks() : p.query_tiles(), parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(p);
    for (int64_t part = begin; part < end; ++part) {
      T* mx = run_max.data_ptr<T>() + (split_keys ? part * p.n : 0);
      T* sm = run_sum.data_ptr<T>() + (split_keys ? part * p.n : 0);
      if (split_keys) {
        for (int64_t kb = edges[part]; kb < edges[part + 1]; ++kb) {
          s.load_keys(kb);
          for (int64_t q0 = 0; q0 < p.n; q0 += kQueryTile) lse_block(s, q0, std::min(q0 + kQueryTile, p.n), mx, sm);
        }
      } else {
        for (int64_t kb = 0; kb < p.key_blocks(); ++kb) {
          s.load_keys(kb);
          for (int64_t qt = edges[part]; qt < edges[part + 1]; ++qt) {
            lse_block(s, qt * kQueryTile, std::min((qt + 1) * kQueryTile, p.n), mx, sm);
          }
        }
      }
    }
  });
  at::Tensor top = std::get<0>(run_max.max(0));
  return top + (run_sum * (run_max - top).exp()).sum(0).log();
}

// Softmax weights of queries q0:q1 against the current keys, then their share of both gradients:
// grad_key_rows (k1 - k0, D) += w^T q, grad_query_rows (q1 - q0, D) += (w * rk) k.
template <typename T>
void grads_block(Scratch<T>& s, int64_t q0, int64_t q1, const T* lse, const T* weight,
                 at::Tensor grad_query_rows, at::Tensor grad_key_rows) {
  at::Tensor w = s.dots(q0, q1);
  const int64_t cols = s.k1 - s.k0;
  T* base = w.template data_ptr<T>();
  const T scale = static_cast<T>(s.p.scale);
  for (int64_t i = q0; i < q1; ++i) softmax_weights(base + (i - q0) * cols, s.column_factor(), lse[i], weight[i] * scale, cols);
  if (grad_key_rows.defined()) grad_key_rows.addmm_(w.t(), s.p.query.slice(0, q0, q1));
  if (grad_query_rows.defined()) {
    if (s.p.key_inv_norm) {
      const T* inv_norm = s.p.key_inv_norm->template data_ptr<T>() + s.k0;
      for (int64_t i = q0; i < q1; ++i) scale_columns(base + (i - q0) * cols, inv_norm, cols);
    }
    grad_query_rows.addmm_(w, s.keys);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> grads_impl(const Problem& p, const at::Tensor& lse, const at::Tensor& weight,
                                              bool need_query, bool need_key) {
  const int64_t threads = at::get_num_threads();
  const bool split_keys = p.key_blocks() > p.query_tiles();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, split_keys ? p.key_blocks() : p.query_tiles()));
  const auto edges = split_blocks(split_keys ? p.key_blocks() : p.query_tiles(), parts);
  // the split side's gradient is owned by its parts; the other side's has one buffer per part
  const bool query_buffered = split_keys && need_query;
  const bool key_buffered = !split_keys && need_key;
  at::Tensor grad_query = need_query ? at::zeros({query_buffered ? parts : 1, p.n, p.d}, p.query.options()) : at::Tensor();
  at::Tensor grad_key = need_key ? at::zeros({key_buffered ? parts : 1, p.m, p.d}, p.query.options()) : at::Tensor();
  const T* lse_ptr = lse.data_ptr<T>();
  const T* weight_ptr = weight.data_ptr<T>();
  auto rows = [](const at::Tensor& grad, int64_t slot, int64_t r0, int64_t r1) {
    return grad.defined() ? grad[slot].slice(0, r0, r1) : at::Tensor();
  };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(p);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t q_slot = query_buffered ? part : 0, k_slot = key_buffered ? part : 0;
      const int64_t kb0 = split_keys ? edges[part] : 0, kb1 = split_keys ? edges[part + 1] : p.key_blocks();
      const int64_t qt0 = split_keys ? 0 : edges[part], qt1 = split_keys ? p.query_tiles() : edges[part + 1];
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        s.load_keys(kb);
        for (int64_t qt = qt0; qt < qt1; ++qt) {
          const int64_t q0 = qt * kQueryTile, q1 = std::min(q0 + kQueryTile, p.n);
          grads_block(s, q0, q1, lse_ptr, weight_ptr, rows(grad_query, q_slot, q0, q1), rows(grad_key, k_slot, s.k0, s.k1));
        }
      }
    }
  });
  auto merged = [&](const at::Tensor& grad) {
    if (!grad.defined()) return at::empty({0}, p.query.options());
    return grad.size(0) == 1 ? grad[0] : grad.sum(0);
  };
  return {merged(grad_query), merged(grad_key)};
}

at::Tensor lse(const at::Tensor& query, const at::Tensor& key, const c10::optional<at::Tensor>& key_inv_norm, double scale) {
  Problem p(query, key, key_inv_norm, scale);
  return AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "infonce_lse", [&] { return lse_impl<scalar_t>(p); });
}

std::tuple<at::Tensor, at::Tensor> grads(const at::Tensor& query, const at::Tensor& key,
                                         const c10::optional<at::Tensor>& key_inv_norm, double scale,
                                         const at::Tensor& lse, const at::Tensor& weight, bool need_query, bool need_key) {
  Problem p(query, key, key_inv_norm, scale);
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == p.n && lse.scalar_type() == query.scalar_type(),
              "lse must be a contiguous (N,) tensor of the query's dtype");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == p.n && weight.scalar_type() == query.scalar_type(),
              "weight must be a contiguous (N,) tensor of the query's dtype");
  return AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "infonce_grads",
                                    [&] { return grads_impl<scalar_t>(p, lse, weight, need_query, need_key); });
}

}  // namespace
}  // namespace ddfast::infonce

TORCH_LIBRARY(ddfast_infonce_cpu, m) {
  m.def("lse(Tensor query, Tensor key, Tensor? key_inv_norm, float scale) -> Tensor");
  m.def("grads(Tensor query, Tensor key, Tensor? key_inv_norm, float scale, Tensor lse, Tensor weight, bool need_query, bool need_key) -> (Tensor, Tensor)");
  m.impl("lse", c10::DispatchKey::CPU, &ddfast::infonce::lse);
  m.impl("grads", c10::DispatchKey::CPU, &ddfast::infonce::grads);
}
