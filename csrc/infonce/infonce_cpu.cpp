// InfoNCE softmax statistics on the CPU, streamed over (query chunk x key tile) blocks.
//
// Each block of logits comes from one BLAS product (at::mm_out: MKL / OpenBLAS, all threads), then
// one fused, vectorised pass per row, parallel over query rows, consumes it while it is in cache:
// an online logsumexp in forward; the softmax weights in backward, which two more products turn into
// the query and key gradients. Memory beyond inputs and outputs: one block. Deterministic.
//
// Contract (see ddfast/ops/infonce/streaming.py): query (N, D) normalised, float32 / float64;
// key (M, D) raw, any float dtype; key_inv_norm (M,) or none; results in the query's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include <ATen/cpu/vec/functional.h>

namespace ddfast {
namespace {

constexpr int64_t kQueryChunk = 512;
constexpr int64_t kKeyTile = 512;

struct Blocks {
  at::Tensor query, key;
  c10::optional<at::Tensor> key_inv_norm;
  double scale;
  int64_t n, m, d;
  at::Tensor logits_buffer, column_scale_buffer;

  Blocks(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& rk, double s)
      : query(q), key(k), key_inv_norm(rk), scale(s), n(q.size(0)), m(k.size(0)), d(q.size(1)) {
    DDFAST_CHECK_DIM(q, 2);
    DDFAST_CHECK_DIM(k, 2);
    DDFAST_CHECK_CONTIGUOUS(q);
    DDFAST_CHECK_DEVICE(q, at::kCPU);
    DDFAST_CHECK_DEVICE(k, at::kCPU);
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "query must be float32 or float64");
    TORCH_CHECK(k.size(1) == d, "query and key must have the same feature dimension");
    if (rk) {
      DDFAST_CHECK_DTYPE(*rk, q.scalar_type());
      TORCH_CHECK(rk->dim() == 1 && rk->size(0) == m && rk->is_contiguous(), "key_inv_norm must be a contiguous (M,) tensor");
    }
    logits_buffer = at::empty({kQueryChunk * kKeyTile}, q.options());
    column_scale_buffer = at::empty({kKeyTile}, q.options());
  }

  // Keys k0:k1 in the accumulation dtype (a copy only for low-precision keys).
  at::Tensor keys(int64_t k0, int64_t k1) const {
    return key.slice(0, k0, k1).to(query.scalar_type()).contiguous();
  }

  // (q1 - q0, k1 - k0) raw dot products of queries q0:q1 with `keys`, in the reusable buffer.
  at::Tensor dots(int64_t q0, int64_t q1, const at::Tensor& keys) {
    auto out = logits_buffer.narrow(0, 0, (q1 - q0) * keys.size(0)).view({q1 - q0, keys.size(0)});
    at::mm_out(out, query.slice(0, q0, q1), keys.t());
    return out;
  }

  // Per-column factor turning dot products into logits: scale * key_inv_norm[k0:k1].
  template <typename T>
  const T* column_scale(int64_t k0, int64_t k1) {
    auto out = column_scale_buffer.narrow(0, 0, k1 - k0);
    if (key_inv_norm) {
      at::mul_out(out, key_inv_norm->slice(0, k0, k1), scale);
    } else {
      out.fill_(scale);
    }
    return out.data_ptr<T>();
  }
};

// row[j] <- row[j] * factor[j]; returns max_j row[j].
template <typename T>
T scale_and_max(T* row, const T* factor, int64_t cols) {
  using V = Vec<T>;
  V vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) {
    V s = V::loadu(row + j) * V::loadu(factor + j);
    s.store(row + j);
    vmax = at::vec::maximum(vmax, s);
  }
  T result = at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < cols; ++j) {
    row[j] *= factor[j];
    result = std::max(result, row[j]);
  }
  return result;
}

// sum_j exp(row[j] - shift)
template <typename T>
T sum_exp(const T* row, T shift, int64_t cols) {
  using V = Vec<T>;
  V vsum(T(0)), vshift(shift);
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) vsum = vsum + (V::loadu(row + j) - vshift).exp();
  T result = at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; }, vsum);
  for (; j < cols; ++j) result += std::exp(row[j] - shift);
  return result;
}

// row[j] <- exp(row[j] * factor[j] - shift) * gain
template <typename T>
void softmax_weights(T* row, const T* factor, T shift, T gain, int64_t cols) {
  using V = Vec<T>;
  V vshift(shift), vgain(gain);
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) {
    ((V::loadu(row + j) * V::loadu(factor + j) - vshift).exp() * vgain).store(row + j);
  }
  for (; j < cols; ++j) row[j] = std::exp(row[j] * factor[j] - shift) * gain;
}

// row[j] <- row[j] * factor[j]
template <typename T>
void scale_columns(T* row, const T* factor, int64_t cols) {
  using V = Vec<T>;
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) (V::loadu(row + j) * V::loadu(factor + j)).store(row + j);
  for (; j < cols; ++j) row[j] *= factor[j];
}

template <typename T>
at::Tensor lse_impl(Blocks& b) {
  at::Tensor running_max = at::full({b.n}, -std::numeric_limits<T>::infinity(), b.query.options());
  at::Tensor running_sum = at::zeros({b.n}, b.query.options());
  T* mx = running_max.data_ptr<T>();
  T* sm = running_sum.data_ptr<T>();
  for (int64_t q0 = 0; q0 < b.n; q0 += kQueryChunk) {
    const int64_t q1 = std::min(q0 + kQueryChunk, b.n);
    for (int64_t k0 = 0; k0 < b.m; k0 += kKeyTile) {
      const int64_t k1 = std::min(k0 + kKeyTile, b.m), cols = k1 - k0;
      at::Tensor logits = b.dots(q0, q1, b.keys(k0, k1));
      const T* factor = b.column_scale<T>(k0, k1);
      T* base = logits.data_ptr<T>();
      at::parallel_for(q0, q1, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          T* row = base + (i - q0) * cols;
          const T tile_max = scale_and_max(row, factor, cols);
          const T new_max = std::max(mx[i], tile_max);
          sm[i] = sm[i] * std::exp(mx[i] - new_max) + sum_exp(row, new_max, cols);
          mx[i] = new_max;
        }
      });
    }
  }
  return running_max.add_(running_sum.log_());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> grads_impl(Blocks& b, const at::Tensor& lse, const at::Tensor& weight,
                                              bool need_query, bool need_key) {
  at::Tensor grad_query = need_query ? at::zeros_like(b.query) : at::empty({0}, b.query.options());
  at::Tensor grad_key = need_key ? at::zeros({b.m, b.d}, b.query.options()) : at::empty({0}, b.query.options());
  const T* lse_ptr = lse.data_ptr<T>();
  const T* weight_ptr = weight.data_ptr<T>();
  const T scale = static_cast<T>(b.scale);
  for (int64_t q0 = 0; q0 < b.n; q0 += kQueryChunk) {
    const int64_t q1 = std::min(q0 + kQueryChunk, b.n);
    for (int64_t k0 = 0; k0 < b.m; k0 += kKeyTile) {
      const int64_t k1 = std::min(k0 + kKeyTile, b.m), cols = k1 - k0;
      at::Tensor keys = b.keys(k0, k1);
      at::Tensor w = b.dots(q0, q1, keys);
      const T* factor = b.column_scale<T>(k0, k1);
      T* base = w.data_ptr<T>();
      // w_ij = scale * weight_i * softmax_ij: the gradient of the loss wrt <q_i, kn_j>
      at::parallel_for(q0, q1, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          softmax_weights(base + (i - q0) * cols, factor, lse_ptr[i], weight_ptr[i] * scale, cols);
        }
      });
      if (need_key) grad_key.slice(0, k0, k1).addmm_(w.t(), b.query.slice(0, q0, q1));
      if (need_query) {
        if (b.key_inv_norm) {
          const T* inv_norm = b.key_inv_norm->data_ptr<T>() + k0;
          at::parallel_for(q0, q1, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t i = r0; i < r1; ++i) scale_columns(base + (i - q0) * cols, inv_norm, cols);
          });
        }
        grad_query.slice(0, q0, q1).addmm_(w, keys);
      }
    }
  }
  return {grad_query, grad_key};
}

at::Tensor lse(const at::Tensor& query, const at::Tensor& key, const c10::optional<at::Tensor>& key_inv_norm, double scale) {
  Blocks b(query, key, key_inv_norm, scale);
  return AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "infonce_lse", [&] { return lse_impl<scalar_t>(b); });
}

std::tuple<at::Tensor, at::Tensor> grads(const at::Tensor& query, const at::Tensor& key,
                                         const c10::optional<at::Tensor>& key_inv_norm, double scale,
                                         const at::Tensor& lse, const at::Tensor& weight, bool need_query, bool need_key) {
  Blocks b(query, key, key_inv_norm, scale);
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == b.n && lse.scalar_type() == query.scalar_type(), "lse must be a contiguous (N,) tensor of the query's dtype");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == b.n && weight.scalar_type() == query.scalar_type(), "weight must be a contiguous (N,) tensor of the query's dtype");
  return AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "infonce_grads",
                                    [&] { return grads_impl<scalar_t>(b, lse, weight, need_query, need_key); });
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY(ddfast_infonce_cpu, m) {
  m.def("lse(Tensor query, Tensor key, Tensor? key_inv_norm, float scale) -> Tensor");
  m.def("grads(Tensor query, Tensor key, Tensor? key_inv_norm, float scale, Tensor lse, Tensor weight, bool need_query, bool need_key) -> (Tensor, Tensor)");
  m.impl("lse", c10::DispatchKey::CPU, &ddfast::lse);
  m.impl("grads", c10::DispatchKey::CPU, &ddfast::grads);
}
