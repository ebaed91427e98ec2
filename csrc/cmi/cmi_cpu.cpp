// cmi on the CPU: at::parallel_for over rows or class chunks, ATen's Vectorized exp / log.
//
// Each chunk's rows are buffered in the accumulation type. Contract in cmi_ops.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cmi/cmi_ops.h"
#include "common/accumulate.h"
#include "common/checks.h"
#include "common/cpu_vec.h"

namespace ddfast::cmi {
namespace {

using at::Tensor;

// Rows per parallel task for the row kernels: enough work per task for K values each.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

// The vector at p, or its first n lanes with `fill` in the others when fewer than a vector remain.
template <typename T>
Vec<T> load_or(const T* p, int64_t n, T fill) {
  if (n >= Vec<T>::size()) return Vec<T>::loadu(p);
  return Vec<T>::set(Vec<T>(fill), Vec<T>::loadu(p, n), n);
}

template <typename T>
void store_first(const Vec<T>& v, T* p, int64_t n) {
  if (n >= Vec<T>::size()) v.store(p);
  else v.store(p, n);
}

// The largest of v's lanes (the first of equals, from lane 0).
template <typename T>
T lane_max(const Vec<T>& v) {
  const auto values = lanes(v);
  return *std::max_element(values.begin(), values.end());
}

// dst = src in the accumulation type.
template <typename scalar_t, typename T>
void load_row(const scalar_t* src, T* dst, int64_t k) {
  for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<T>(src[j]);
}

// The softmax normaliser of f[0:k] / T: out[0] = max f, out[1] = log sum exp((f - max) * inv_t),
// or nan when f holds a nan or an inf.
template <typename T>
void normaliser(const T* f, int64_t k, T inv_t, T* out) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> m(neg_inf<T>()), non_finite(0);  // the sum of v - v: 0 while every v is finite, nan after a nan or an inf
  for (int64_t j = 0; j < k; j += W) {
    m = at::vec::maximum(m, load_or(f + j, k - j, neg_inf<T>()));
    const Vec<T> v = load_or(f + j, k - j, T(0));
    non_finite = non_finite + (v - v);
  }
  const T top = lane_max(m);
  const Vec<T> shift(top), scale(inv_t);
  Vec<T> s(0);
  for (int64_t j = 0; j < k; j += W) s = s + ((load_or(f + j, k - j, neg_inf<T>()) - shift) * scale).exp();
  out[0] = top;
  out[1] = lane_sum(non_finite) == T(0) ? std::log(lane_sum(s)) : std::numeric_limits<T>::quiet_NaN();
}

// x[0:k] = (f - norm[0]) * inv_t - norm[1] in place: log P.
template <typename T>
void to_log_p(T* x, int64_t k, T inv_t, const T* norm) {
  for (int64_t j = 0; j < k; ++j) x[j] = (x[j] - norm[0]) * inv_t - norm[1];
}

// out[j] = log sum_r exp(rows(r)[j]) for j < k, over rows r < count (count >= 1, finite values):
// each column's max first, then one exp per value. `sums` is scratch for k values.
template <typename T, typename Rows>
void column_logsumexp(const Rows& rows, int64_t count, int64_t k, T* out, T* sums) {
  constexpr int64_t W = Vec<T>::size();
  std::fill(out, out + k, neg_inf<T>());
  for (int64_t r = 0; r < count; ++r) {
    const T* v = rows(r);
    for (int64_t j = 0; j < k; ++j) out[j] = std::max(out[j], v[j]);
  }
  std::fill(sums, sums + k, T(0));
  for (int64_t r = 0; r < count; ++r) {
    const T* v = rows(r);
    for (int64_t j = 0; j < k; j += W) {
      const int64_t left = std::min(W, k - j);
      const Vec<T> e = (Vec<T>::loadu(v + j, left) - Vec<T>::loadu(out + j, left)).exp();
      store_first(Vec<T>::loadu(sums + j, left) + e, sums + j, left);
    }
  }
  for (int64_t j = 0; j < k; j += W) {
    const int64_t left = std::min(W, k - j);
    store_first(Vec<T>::loadu(out + j, left) + Vec<T>::loadu(sums + j, left).log(), out + j, left);
  }
}

// The rows of each chunk (see cmi_ops.h).
struct ChunkRows {
  const int64_t* order;
  const int64_t* start;
  const int64_t* end;

  ChunkRows(const Tensor& order, const Tensor& start, const Tensor& end)
      : order(order.const_data_ptr<int64_t>()), start(start.const_data_ptr<int64_t>()), end(end.const_data_ptr<int64_t>()) {}

  int64_t count(int64_t c) const { return end[c] - start[c]; }
  int64_t row(int64_t c, int64_t r) const { return order[start[c] + r]; }
};

// Features and their softmax normalisers: log P of any row into a buffer.
template <typename scalar_t, typename T>
struct LogP {
  const scalar_t* f;
  const T* norm;
  int64_t k;
  T inv_t;

  LogP(const Tensor& features, const Tensor& norms, double inv_t)
      : f(features.const_data_ptr<scalar_t>()), norm(norms.const_data_ptr<T>()), k(features.size(1)), inv_t(static_cast<T>(inv_t)) {}

  void row(int64_t i, T* x) const {
    const scalar_t* values = f + i * k;
    const T top = norm[2 * i], log_sum = norm[2 * i + 1];
    for (int64_t j = 0; j < k; ++j) x[j] = (static_cast<T>(values[j]) - top) * inv_t - log_sum;
  }
};

Tensor row_norm(const Tensor& features, double inv_t) {
  check_features(features, at::kCPU);
  const int64_t n = features.size(0), k = features.size(1);
  Tensor norm = at::empty({n, 2}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_norm", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    T* out = norm.mutable_data_ptr<T>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> row(k);
      for (int64_t i = lo; i < hi; ++i) {
        load_row(f + i * k, row.data(), k);
        normaliser(row.data(), k, static_cast<T>(inv_t), out + 2 * i);
      }
    });
  });
  return norm;
}

std::tuple<Tensor, Tensor> chunk_norm(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end,
                                     double inv_t) {
  check_features(features, at::kCPU);
  check_chunks(features, order, start, end);
  const int64_t n = features.size(0), k = features.size(1), chunks = start.size(0);
  Tensor norm = at::empty({n, 2}, acc_options(features));
  Tensor partial = at::empty({chunks, k}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_norm", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const ChunkRows chunk_rows(order, start, end);
    T* norm_out = norm.mutable_data_ptr<T>();
    T* part = partial.mutable_data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> x, sums(k);
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t count = chunk_rows.count(c);
        x.resize(count * k);
        for (int64_t r = 0; r < count; ++r) {
          const int64_t i = chunk_rows.row(c, r);
          T* xr = x.data() + r * k;
          load_row(f + i * k, xr, k);
          normaliser(xr, k, static_cast<T>(inv_t), norm_out + 2 * i);
          to_log_p(xr, k, static_cast<T>(inv_t), norm_out + 2 * i);
        }
        column_logsumexp([&](int64_t r) { return x.data() + r * k; }, count, k, part + c * k, sums.data());
      }
    });
  });
  return {norm, partial};
}

// out[c] = combine(partial rows first[c]:first[c+1]) for each class, in chunk order.
// Log mode: logsumexp minus log n_c (-inf without rows); else: sum / n_c (0 without rows).
Tensor combine(const Tensor& partial, const Tensor& first, const Tensor& counts, bool log_mode) {
  check_combine(partial, first, counts, at::kCPU);
  const int64_t classes = counts.numel(), k = partial.size(1);
  Tensor out = at::empty({classes, k}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "cmi_combine", [&] {
    using T = scalar_t;
    const T* part = partial.const_data_ptr<T>();
    const int64_t* chunk0 = first.const_data_ptr<int64_t>();
    const int64_t* n = counts.const_data_ptr<int64_t>();
    T* result = out.mutable_data_ptr<T>();
    at::parallel_for(0, classes, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> scratch(k);
      for (int64_t c = lo; c < hi; ++c) {
        T* row = result + c * k;
        const T* partials = part + chunk0[c] * k;
        const int64_t chunks = chunk0[c + 1] - chunk0[c];
        if (n[c] == 0) {
          std::fill(row, row + k, log_mode ? neg_inf<T>() : T(0));
        } else if (log_mode) {
          column_logsumexp([&](int64_t r) { return partials + r * k; }, chunks, k, row, scratch.data());
          const T log_n = std::log(static_cast<T>(n[c]));
          for (int64_t col = 0; col < k; ++col) row[col] -= log_n;
        } else {
          std::fill(row, row + k, T(0));
          for (int64_t r = 0; r < chunks; ++r)
            for (int64_t col = 0; col < k; ++col) row[col] += partials[r * k + col];
          for (int64_t col = 0; col < k; ++col) row[col] /= static_cast<T>(n[c]);
        }
      }
    });
  });
  return out;
}

Tensor combine_lse(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, true); }
Tensor combine_mean(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, false); }

Tensor row_kl(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, double inv_t) {
  check_row_kl(features, labels, norm, log_q, at::kCPU);
  const int64_t n = features.size(0), k = features.size(1);
  Tensor kl = at::empty({n}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_kl", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const LogP<scalar_t, T> log_p(features, norm, inv_t);
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const T* lq = log_q.const_data_ptr<T>();
    T* out = kl.mutable_data_ptr<T>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> x(k);
      const Vec<T> zero(0);
      for (int64_t i = lo; i < hi; ++i) {
        log_p.row(i, x.data());
        const T* q = lq + y[i] * k;
        Vec<T> total(0);
        for (int64_t j = 0; j < k; j += W) {
          const Vec<T> xv = load_or(x.data() + j, k - j, neg_inf<T>());
          const Vec<T> p = xv.exp();
          total = total + Vec<T>::blendv(zero, p * (xv - load_or(q + j, k - j, T(0))), p > zero);
        }
        out[i] = lane_sum(total);
      }
    });
  });
  return kl;
}

Tensor chunk_centroid_grad(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end, const Tensor& cls,
                           const Tensor& norm, const Tensor& log_q, const Tensor& g, double inv_t) {
  check_chunk_centroid_grad(features, order, start, end, cls, norm, log_q, g, at::kCPU);
  const int64_t k = features.size(1), chunks = start.size(0);
  Tensor partial = at::empty({chunks, k}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_centroid_grad", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const LogP<scalar_t, T> log_p(features, norm, inv_t);
    const ChunkRows chunk_rows(order, start, end);
    const int64_t* chunk_class = cls.const_data_ptr<int64_t>();
    const T* lq = log_q.const_data_ptr<T>();
    const T* grad = g.const_data_ptr<T>();
    T* part = partial.mutable_data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> x(k);
      const Vec<T> zero(0), minus_inf(neg_inf<T>());  // a term is 0 where log P is -inf (see cmi_ops.h)
      for (int64_t c = lo; c < hi; ++c) {
        T* acc = part + c * k;
        std::fill(acc, acc + k, T(0));
        const T* q = lq + chunk_class[c] * k;
        for (int64_t r = 0; r < chunk_rows.count(c); ++r) {
          const int64_t i = chunk_rows.row(c, r);
          log_p.row(i, x.data());
          const Vec<T> weight(grad[i]);
          for (int64_t j = 0; j < k; j += W) {
            const int64_t left = std::min(W, k - j);
            const Vec<T> xv = Vec<T>::loadu(x.data() + j, left);
            const Vec<T> e = Vec<T>::blendv(zero, (xv - Vec<T>::loadu(q + j, left)).exp(), xv > minus_inf);
            store_first(Vec<T>::loadu(acc + j, left) + weight * e, acc + j, left);
          }
        }
      }
    });
  });
  return partial;
}

Tensor row_grad(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, const Tensor& kl,
                const Tensor& g, const std::optional<Tensor>& a, double inv_t) {
  check_row_grad(features, labels, norm, log_q, kl, g, a, at::kCPU);
  const int64_t n = features.size(0), k = features.size(1);
  Tensor grad_features = at::empty_like(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_grad", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const LogP<scalar_t, T> log_p(features, norm, inv_t);
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const T* lq = log_q.const_data_ptr<T>();
    const T* row_kl = kl.const_data_ptr<T>();
    const T* grad = g.const_data_ptr<T>();
    const T* centroid = a.has_value() ? a->const_data_ptr<T>() : nullptr;
    scalar_t* out = grad_features.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> x(k);
      const Vec<T> zero(0);
      for (int64_t i = lo; i < hi; ++i) {
        log_p.row(i, x.data());
        const T* q = lq + y[i] * k;
        const T* ar = centroid ? centroid + y[i] * k : nullptr;
        T through_centroid = 0;  // sum_k P_ik a_ck
        if (ar) {
          Vec<T> total(0);
          for (int64_t j = 0; j < k; j += W)
            total = total + load_or(x.data() + j, k - j, neg_inf<T>()).exp() * load_or(ar + j, k - j, T(0));
          through_centroid = lane_sum(total);
        }
        const Vec<T> weight(grad[i]), offset(row_kl[i]), scale(log_p.inv_t), extra(through_centroid);
        for (int64_t j = 0; j < k; j += W) {
          const int64_t left = std::min(W, k - j);
          const Vec<T> xv = Vec<T>::loadu(x.data() + j, left);
          const Vec<T> p = xv.exp();
          Vec<T> d = weight * (xv - Vec<T>::loadu(q + j, left) - offset);
          if (ar) d = d - Vec<T>::loadu(ar + j, left) + extra;
          store_first(Vec<T>::blendv(zero, p * d * scale, p > zero), x.data() + j, left);
        }
        scalar_t* dst = out + i * k;
        for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<scalar_t>(x[j]);
      }
    });
  });
  return grad_features;
}

}  // namespace
}  // namespace ddfast::cmi

TORCH_LIBRARY(ddfast_cmi_cpu, m) { DDFAST_CMI_DEFINE_KERNELS(m); }
