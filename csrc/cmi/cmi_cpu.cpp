// CMI kernels for CPU tensors: at::parallel_for over rows or class chunks, ATen's Vectorized exp/log.
//
// Notation (ddfast/ops/cmi): z = features * inv_t; norm (N, 2) = each row's max of z and log sum
// exp(z - max); x = (z - max) - log-sum = log P (exact near the row's largest entries);
// log_q (C, K) = log of each class's mean softmax, g (N,) = per-sample upstream gradients.
// Rows of a class are reduced in chunks (ddfast/ops/cmi/segments.py): chunk j holds the rows
// order[start[j]:end[j]], all of class cls[j]; class c owns chunks first[c]:first[c+1]. Every
// reduction runs in a fixed order, so results do not depend on the thread count.
//
// Kernels (inputs contiguous; features float / double / bfloat16 / half; acc = double for double
// inputs, float otherwise; index tensors int64):
//   row_norm(features, inv_t) -> norm (N, 2) acc
//   chunk_norm(features, order, start, end, inv_t) -> (norm (N, 2) acc, partial (M, K) acc)
//       partial[j, k] = logsumexp of x_ik over the rows i of chunk j
//   combine_lse(partial, first, counts) -> log_q (C, K) acc: logsumexp over a class's chunks
//       minus log n_c; -inf for absent classes
//   row_kl(features, labels, norm, log_q, inv_t) -> kl (N,) acc: sum_k P (x - log_q[y]), 0 where P = 0
//   chunk_centroid_grad(features, order, start, end, cls, norm, log_q, g, inv_t) -> partial (M, K) acc
//       partial[j, k] = sum over chunk j's rows of g_i exp(x_ik - log_q[cls_j, k])
//   combine_mean(partial, first, counts) -> a (C, K) acc: sum over a class's chunks / n_c (0 if absent)
//   row_grad(features, labels, norm, log_q, kl, g, a?, inv_t) -> grad (N, K) in the features' dtype
//       grad = inv_t * P * (g (x - log_q[y] - kl) - a[y] + sum_k P a[y]), 0 where P = 0
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"

namespace ddfast::cmi {
namespace {

using at::Tensor;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Rows per parallel task for the row kernels: enough work per task for K values each.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

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

template <typename T>
T lanes_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t l = 0; l < Vec<T>::size(); ++l) total += lanes[l];
  return total;
}

template <typename T>
T lanes_max(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int64_t l = 1; l < Vec<T>::size(); ++l) best = std::max(best, lanes[l]);
  return best;
}

// dst = src * inv_t in the accumulation type.
template <typename scalar_t, typename T>
void load_scaled(const scalar_t* src, T* dst, int64_t k, T inv_t) {
  for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<T>(src[j]) * inv_t;
}

// The softmax normaliser of z[0:k]: out[0] = max, out[1] = log sum exp(z - max).
template <typename T>
void normaliser(const T* z, int64_t k, T* out) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> m(neg_inf<T>());
  for (int64_t j = 0; j < k; j += W) m = at::vec::maximum(m, load_or(z + j, k - j, neg_inf<T>()));
  const T top = lanes_max(m);
  const Vec<T> shift(top);
  Vec<T> s(0);
  for (int64_t j = 0; j < k; j += W) s = s + (load_or(z + j, k - j, neg_inf<T>()) - shift).exp();
  out[0] = top;
  out[1] = std::log(lanes_sum(s));
}

// x[0:k] = (z - norm[0]) - norm[1] in place: log P.
template <typename T>
void to_log_p(T* x, int64_t k, const T* norm) {
  for (int64_t j = 0; j < k; ++j) x[j] = (x[j] - norm[0]) - norm[1];
}

// The checks shared by every kernel on its features and row statistics.
void check_rows(const Tensor& features, const Tensor& norm) {
  DDFAST_CHECK_DEVICE(features, at::kCPU);
  DDFAST_CHECK_DIM(features, 2);
  DDFAST_CHECK_CONTIGUOUS(features);
  DDFAST_CHECK_CONTIGUOUS(norm);
  TORCH_CHECK(norm.numel() == 2 * features.size(0), "norm must have two values per row of features");
  TORCH_CHECK(norm.scalar_type() == (features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "norm must be in the accumulation dtype of features");
}

void check_index(const Tensor& index, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1, name,
              " must be a contiguous 1-D int64 tensor");
}

void check_class_rows(const Tensor& features, const Tensor& log_q) {
  TORCH_CHECK(log_q.dim() == 2 && log_q.size(1) == features.size(1) && log_q.is_contiguous(),
              "log_q must be a contiguous (C, K) tensor matching features");
}

at::TensorOptions acc_options(const Tensor& features) {
  return features.options().dtype(features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

Tensor row_norm(const Tensor& features, double inv_t) {
  DDFAST_CHECK_DIM(features, 2);
  DDFAST_CHECK_CONTIGUOUS(features);
  const int64_t n = features.size(0), k = features.size(1);
  Tensor norm = at::empty({n, 2}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_norm", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    T* out = norm.mutable_data_ptr<T>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> z(k);
      for (int64_t i = lo; i < hi; ++i) {
        load_scaled(f + i * k, z.data(), k, static_cast<T>(inv_t));
        normaliser(z.data(), k, out + 2 * i);
      }
    });
  });
  return norm;
}

std::tuple<Tensor, Tensor> chunk_norm(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end,
                                     double inv_t) {
  DDFAST_CHECK_DIM(features, 2);
  DDFAST_CHECK_CONTIGUOUS(features);
  check_index(order, "order");
  check_index(start, "start");
  check_index(end, "end");
  const int64_t n = features.size(0), k = features.size(1), chunks = start.size(0);
  Tensor norm = at::empty({n, 2}, acc_options(features));
  Tensor partial = at::empty({chunks, k}, acc_options(features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_norm", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const int64_t* rows = order.const_data_ptr<int64_t>();
    const int64_t* first_row = start.const_data_ptr<int64_t>();
    const int64_t* last_row = end.const_data_ptr<int64_t>();
    T* norm_out = norm.mutable_data_ptr<T>();
    T* part = partial.mutable_data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> x, sums(k);
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t count = last_row[c] - first_row[c];
        x.resize(count * k);
        T* col_max = part + c * k;
        std::fill(col_max, col_max + k, neg_inf<T>());
        for (int64_t r = 0; r < count; ++r) {
          const int64_t i = rows[first_row[c] + r];
          T* xr = x.data() + r * k;
          load_scaled(f + i * k, xr, k, static_cast<T>(inv_t));
          normaliser(xr, k, norm_out + 2 * i);
          to_log_p(xr, k, norm_out + 2 * i);
          for (int64_t j = 0; j < k; ++j) col_max[j] = std::max(col_max[j], xr[j]);
        }
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t r = 0; r < count; ++r) {
          const T* xr = x.data() + r * k;
          for (int64_t j = 0; j < k; j += W) {
            const Vec<T> e = (Vec<T>::loadu(xr + j, std::min(W, k - j)) - Vec<T>::loadu(col_max + j, std::min(W, k - j))).exp();
            store_first(Vec<T>::loadu(sums.data() + j, std::min(W, k - j)) + e, sums.data() + j, k - j);
          }
        }
        for (int64_t j = 0; j < k; j += W) {
          const Vec<T> m = Vec<T>::loadu(col_max + j, std::min(W, k - j));
          store_first(m + Vec<T>::loadu(sums.data() + j, std::min(W, k - j)).log(), col_max + j, k - j);
        }
      }
    });
  });
  return {norm, partial};
}

// out[c] = combine(partial rows first[c]:first[c+1]) for each class, in chunk order.
// Log mode: logsumexp minus log n_c (-inf without rows); else: sum / n_c (0 without rows).
Tensor combine(const Tensor& partial, const Tensor& first, const Tensor& counts, bool log_mode) {
  TORCH_CHECK(partial.dim() == 2 && partial.is_contiguous(), "partial must be a contiguous 2-D tensor");
  TORCH_CHECK(partial.scalar_type() == at::kFloat || partial.scalar_type() == at::kDouble, "partial must be float or double");
  check_index(first, "first");
  check_index(counts, "counts");
  TORCH_CHECK(first.numel() == counts.numel() + 1, "first must have one entry more than counts");
  const int64_t classes = counts.numel(), k = partial.size(1);
  Tensor out = at::empty({classes, k}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "cmi_combine", [&] {
    using T = scalar_t;
    constexpr int64_t W = Vec<T>::size();
    const T* part = partial.const_data_ptr<T>();
    const int64_t* chunk0 = first.const_data_ptr<int64_t>();
    const int64_t* n = counts.const_data_ptr<int64_t>();
    T* result = out.mutable_data_ptr<T>();
    at::parallel_for(0, classes, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> acc(k);
      for (int64_t c = lo; c < hi; ++c) {
        T* row = result + c * k;
        if (n[c] == 0) {
          std::fill(row, row + k, log_mode ? neg_inf<T>() : T(0));
          continue;
        }
        if (!log_mode) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t j = chunk0[c]; j < chunk0[c + 1]; ++j)
            for (int64_t col = 0; col < k; ++col) acc[col] += part[j * k + col];
          for (int64_t col = 0; col < k; ++col) row[col] = acc[col] / static_cast<T>(n[c]);
          continue;
        }
        std::fill(row, row + k, neg_inf<T>());
        for (int64_t j = chunk0[c]; j < chunk0[c + 1]; ++j)
          for (int64_t col = 0; col < k; ++col) row[col] = std::max(row[col], part[j * k + col]);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = chunk0[c]; j < chunk0[c + 1]; ++j)
          for (int64_t col = 0; col < k; col += W) {
            const int64_t left = std::min(W, k - col);
            const Vec<T> e = (Vec<T>::loadu(part + j * k + col, left) - Vec<T>::loadu(row + col, left)).exp();
            store_first(Vec<T>::loadu(acc.data() + col, left) + e, acc.data() + col, k - col);
          }
        const Vec<T> log_n(std::log(static_cast<T>(n[c])));
        for (int64_t col = 0; col < k; col += W) {
          const int64_t left = std::min(W, k - col);
          store_first(Vec<T>::loadu(row + col, left) + Vec<T>::loadu(acc.data() + col, left).log() - log_n, row + col, k - col);
        }
      }
    });
  });
  return out;
}

Tensor combine_lse(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, true); }
Tensor combine_mean(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, false); }

Tensor row_kl(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, double inv_t) {
  check_rows(features, norm);
  check_index(labels, "labels");
  check_class_rows(features, log_q);
  const int64_t n = features.size(0), k = features.size(1);
  Tensor kl = at::empty({n}, norm.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_kl", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const T* norms = norm.const_data_ptr<T>();
    const T* lq = log_q.const_data_ptr<T>();
    T* out = kl.mutable_data_ptr<T>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> z(k);
      const Vec<T> zero(0);
      for (int64_t i = lo; i < hi; ++i) {
        load_scaled(f + i * k, z.data(), k, static_cast<T>(inv_t));
        const Vec<T> top(norms[2 * i]), log_sum(norms[2 * i + 1]);
        const T* q = lq + y[i] * k;
        Vec<T> total(0);
        for (int64_t j = 0; j < k; j += W) {
          const Vec<T> x = (load_or(z.data() + j, k - j, neg_inf<T>()) - top) - log_sum;
          const Vec<T> p = x.exp();
          total = total + Vec<T>::blendv(zero, p * (x - load_or(q + j, k - j, T(0))), p > zero);
        }
        out[i] = lanes_sum(total);
      }
    });
  });
  return kl;
}

Tensor chunk_centroid_grad(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end, const Tensor& cls,
                           const Tensor& norm, const Tensor& log_q, const Tensor& g, double inv_t) {
  check_rows(features, norm);
  check_index(order, "order");
  check_index(start, "start");
  check_index(end, "end");
  check_index(cls, "cls");
  check_class_rows(features, log_q);
  TORCH_CHECK(g.is_contiguous() && g.numel() == features.size(0) && g.scalar_type() == norm.scalar_type(),
              "g must be a contiguous (N,) tensor in the accumulation dtype");
  const int64_t k = features.size(1), chunks = start.size(0);
  Tensor partial = at::empty({chunks, k}, norm.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_centroid_grad", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const int64_t* rows = order.const_data_ptr<int64_t>();
    const int64_t* first_row = start.const_data_ptr<int64_t>();
    const int64_t* last_row = end.const_data_ptr<int64_t>();
    const int64_t* chunk_class = cls.const_data_ptr<int64_t>();
    const T* norms = norm.const_data_ptr<T>();
    const T* lq = log_q.const_data_ptr<T>();
    const T* grad = g.const_data_ptr<T>();
    T* part = partial.mutable_data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> z(k);
      for (int64_t c = lo; c < hi; ++c) {
        T* acc = part + c * k;
        std::fill(acc, acc + k, T(0));
        const T* q = lq + chunk_class[c] * k;
        for (int64_t r = first_row[c]; r < last_row[c]; ++r) {
          const int64_t i = rows[r];
          load_scaled(f + i * k, z.data(), k, static_cast<T>(inv_t));
          const Vec<T> top(norms[2 * i]), log_sum(norms[2 * i + 1]), weight(grad[i]);
          for (int64_t j = 0; j < k; j += W) {
            const int64_t left = std::min(W, k - j);
            const Vec<T> e = ((Vec<T>::loadu(z.data() + j, left) - top) - log_sum - Vec<T>::loadu(q + j, left)).exp();
            store_first(Vec<T>::loadu(acc + j, left) + weight * e, acc + j, k - j);
          }
        }
      }
    });
  });
  return partial;
}

Tensor row_grad(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, const Tensor& kl,
                const Tensor& g, const std::optional<Tensor>& a, double inv_t) {
  check_rows(features, norm);
  check_index(labels, "labels");
  check_class_rows(features, log_q);
  TORCH_CHECK(kl.is_contiguous() && kl.numel() == features.size(0) && kl.scalar_type() == norm.scalar_type(),
              "kl must be a contiguous (N,) tensor in the accumulation dtype");
  TORCH_CHECK(g.is_contiguous() && g.numel() == features.size(0) && g.scalar_type() == norm.scalar_type(),
              "g must be a contiguous (N,) tensor in the accumulation dtype");
  if (a.has_value()) {
    TORCH_CHECK(a->sizes() == log_q.sizes() && a->is_contiguous() && a->scalar_type() == norm.scalar_type(),
                "a must be a contiguous tensor shaped and typed like log_q");
  }
  const int64_t n = features.size(0), k = features.size(1);
  Tensor grad_features = at::empty_like(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_grad", [&] {
    using T = acc_t<scalar_t>;
    constexpr int64_t W = Vec<T>::size();
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const T* norms = norm.const_data_ptr<T>();
    const T* lq = log_q.const_data_ptr<T>();
    const T* row_kl = kl.const_data_ptr<T>();
    const T* grad = g.const_data_ptr<T>();
    const T* centroid = a.has_value() ? a->const_data_ptr<T>() : nullptr;
    scalar_t* out = grad_features.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t lo, int64_t hi) {
      std::vector<T> z(k);
      const Vec<T> zero(0);
      for (int64_t i = lo; i < hi; ++i) {
        load_scaled(f + i * k, z.data(), k, static_cast<T>(inv_t));
        const Vec<T> top(norms[2 * i]), log_sum(norms[2 * i + 1]);
        const T* q = lq + y[i] * k;
        const T* ar = centroid ? centroid + y[i] * k : nullptr;
        T through_centroid = 0;  // sum_k P_ik a_ck
        if (ar) {
          Vec<T> total(0);
          for (int64_t j = 0; j < k; j += W)
            total = total + ((load_or(z.data() + j, k - j, neg_inf<T>()) - top) - log_sum).exp() * load_or(ar + j, k - j, T(0));
          through_centroid = lanes_sum(total);
        }
        const Vec<T> weight(grad[i]), offset(row_kl[i]), scale(static_cast<T>(inv_t)), extra(through_centroid);
        for (int64_t j = 0; j < k; j += W) {
          const int64_t left = std::min(W, k - j);
          const Vec<T> x = (Vec<T>::loadu(z.data() + j, left) - top) - log_sum;
          const Vec<T> p = x.exp();
          Vec<T> d = weight * (x - Vec<T>::loadu(q + j, left) - offset);
          if (ar) d = d - Vec<T>::loadu(ar + j, left) + extra;
          store_first(Vec<T>::blendv(zero, p * d * scale, p > zero), z.data() + j, k - j);
        }
        scalar_t* dst = out + i * k;
        for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<scalar_t>(z[j]);
      }
    });
  });
  return grad_features;
}

}  // namespace

TORCH_LIBRARY(ddfast_cmi_cpu, m) {
  m.def("row_norm(Tensor features, float inv_t) -> Tensor", &row_norm);
  m.def("chunk_norm(Tensor features, Tensor order, Tensor start, Tensor end, float inv_t) -> (Tensor, Tensor)", &chunk_norm);
  m.def("combine_lse(Tensor partial, Tensor first, Tensor counts) -> Tensor", &combine_lse);
  m.def("row_kl(Tensor features, Tensor labels, Tensor norm, Tensor log_q, float inv_t) -> Tensor", &row_kl);
  m.def("chunk_centroid_grad(Tensor features, Tensor order, Tensor start, Tensor end, Tensor cls, Tensor norm, Tensor log_q, "
        "Tensor g, float inv_t) -> Tensor",
        &chunk_centroid_grad);
  m.def("combine_mean(Tensor partial, Tensor first, Tensor counts) -> Tensor", &combine_mean);
  m.def("row_grad(Tensor features, Tensor labels, Tensor norm, Tensor log_q, Tensor kl, Tensor g, Tensor? a, float inv_t) -> Tensor",
        &row_grad);
}

}  // namespace ddfast::cmi
