// cmi on CUDA: one warp per row, one block per chunk of a class's rows.
//
// Row kernels give one warp to each row: lanes stride over the columns (coalesced), keep an online
// (max, sum) or a partial sum, and combine them with __shfl_xor_sync; every lane ends with the same
// value (the normaliser is broadcast from lane 0, sums agree in every lane already). Per-class
// reductions give one block to each chunk of at most kChunkRows rows of one class
// (ddfast/ops/cmi/segments.py): its warps first compute the rows' softmax normalisers, then each
// thread reduces one column over the chunk's rows; a combine kernel reduces each class's chunks in
// order. No atomics: results are deterministic. Contract in cmi_ops.h.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cmi/cmi_ops.h"
#include "common/accumulate.h"
#include "common/checks.h"
#include "common/cuda_reduce.cuh"

namespace ddfast::cmi {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int64_t kChunkRows = 64;  // must match CHUNK_ROWS in ddfast/ops/cmi/cuda.py

__device__ __forceinline__ float exp_(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }
__device__ __forceinline__ float log_(float x) { return ::logf(x); }
__device__ __forceinline__ double log_(double x) { return ::log(x); }

// Online logsumexp of values x * scale (scale > 0) as the state (m, s): the max of x and
// sum exp((x - m) * scale), so the logsumexp is m * scale + log(s). One exp per added value.
template <typename T>
__device__ __forceinline__ void lse_add(T& m, T& s, T x, T scale) {
  if (x > m) {
    s = s * exp_((m - x) * scale) + T(1);
    m = x;
  } else if (x > neg_inf<T>()) {
    s += exp_((x - m) * scale);
  }
}

template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2, T scale) {
  if (m2 > m) {
    s = s * exp_((m - m2) * scale) + s2;
    m = m2;
  } else if (m2 > neg_inf<T>()) {
    s += s2 * exp_((m2 - m) * scale);
  }
}

// A softmax normaliser: the max of f and log sum exp((f - max) * inv_t); log P = (f - top) * inv_t - log_sum.
template <typename T>
struct Norm {
  T top, log_sum;
};

// The normaliser of the warp's lanes' (m, s) states, the same value in every lane.
template <typename T>
__device__ __forceinline__ Norm<T> warp_norm(T m, T s, T inv_t) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const T m2 = __shfl_xor_sync(kFullMask, m, offset);
    const T s2 = __shfl_xor_sync(kFullMask, s, offset);
    lse_merge(m, s, m2, s2, inv_t);
  }
  return {__shfl_sync(kFullMask, m, 0), __shfl_sync(kFullMask, log_(s), 0)};
}

// The normaliser of row[0:k] / T, computed by one whole warp; its log_sum is nan when the row holds
// a nan or an inf (which lse_add would skip or absorb).
template <typename scalar_t, typename T>
__device__ Norm<T> row_normaliser(const scalar_t* row, int64_t k, T inv_t, int lane) {
  T m = neg_inf<T>(), s = 0;
  bool finite = true;
  for (int64_t j = lane; j < k; j += kWarpSize) {
    const T x = static_cast<T>(row[j]);
    finite = finite && isfinite(x);
    lse_add(m, s, x, inv_t);
  }
  Norm<T> norm = warp_norm(m, s, inv_t);
  if (!__all_sync(kFullMask, finite)) norm.log_sum = std::numeric_limits<T>::quiet_NaN();
  return norm;
}

// log P of one entry from its feature value and its row's normaliser.
template <typename scalar_t, typename T>
__device__ __forceinline__ T log_p(scalar_t value, T inv_t, Norm<T> norm) {
  return (static_cast<T>(value) - norm.top) * inv_t - norm.log_sum;
}

template <typename T>
__device__ __forceinline__ Norm<T> load_norm(const T* norm, int64_t i) {
  return {norm[2 * i], norm[2 * i + 1]};
}

template <typename scalar_t, typename T>
__global__ void row_norm_kernel(const scalar_t* __restrict__ f, T* __restrict__ norm, int64_t n, int64_t k, T inv_t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= n) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarpSize;
  const Norm<T> value = row_normaliser(f + i * k, k, inv_t, lane);
  if (lane == 0) {
    norm[2 * i] = value.top;
    norm[2 * i + 1] = value.log_sum;
  }
}

template <typename scalar_t, typename T>
__global__ void chunk_norm_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                  const int64_t* __restrict__ end, T* __restrict__ norm, T* __restrict__ partial, int64_t k, T inv_t) {
  __shared__ Norm<T> chunk_norms[kChunkRows];
  __shared__ int64_t row_index[kChunkRows];
  const int64_t c = blockIdx.x;
  const int64_t first = start[c];
  const int64_t count = end[c] - first;
  CUDA_KERNEL_ASSERT(count <= kChunkRows);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t r = warp; r < count; r += kWarpsPerBlock) {
    const int64_t i = order[first + r];
    const Norm<T> value = row_normaliser(f + i * k, k, inv_t, lane);
    if (lane == 0) {
      chunk_norms[r] = value;
      row_index[r] = i;
      norm[2 * i] = value.top;
      norm[2 * i + 1] = value.log_sum;
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    T m = neg_inf<T>(), s = 0;
    for (int64_t r = 0; r < count; ++r) lse_add(m, s, log_p(f[row_index[r] * k + j], inv_t, chunk_norms[r]), T(1));
    partial[c * k + j] = m + log_(s);
  }
}

// Per class c and column j: over chunks first[c]:first[c+1] in order, logsumexp - log n_c (-inf
// without rows) when log_mode, else sum / n_c (0 without rows).
template <typename T>
__global__ void combine_kernel(const T* __restrict__ partial, const int64_t* __restrict__ first, const int64_t* __restrict__ counts,
                               T* __restrict__ out, int64_t k, bool log_mode) {
  const int64_t c = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t n = counts[c];
  if (n == 0) {
    out[c * k + j] = log_mode ? neg_inf<T>() : T(0);
    return;
  }
  if (log_mode) {
    T m = neg_inf<T>(), s = 0;
    for (int64_t q = first[c]; q < first[c + 1]; ++q) lse_add(m, s, partial[q * k + j], T(1));
    out[c * k + j] = m + log_(s) - log_(static_cast<T>(n));
  } else {
    T s = 0;
    for (int64_t q = first[c]; q < first[c + 1]; ++q) s += partial[q * k + j];
    out[c * k + j] = s / static_cast<T>(n);
  }
}

template <typename scalar_t, typename T>
__global__ void row_kl_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ labels, const T* __restrict__ norm,
                              const T* __restrict__ log_q, T* __restrict__ kl, int64_t n, int64_t k, T inv_t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= n) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* values = f + i * k;
  const T* q = log_q + labels[i] * k;
  const Norm<T> row = load_norm(norm, i);
  T total = 0;
  for (int64_t j = lane; j < k; j += kWarpSize) {
    const T x = log_p(values[j], inv_t, row);
    const T p = exp_(x);
    if (p > T(0)) total += p * (x - q[j]);
  }
  total = warp_sum(total);
  if (lane == 0) kl[i] = total;
}

template <typename scalar_t, typename T>
__global__ void chunk_centroid_grad_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                           const int64_t* __restrict__ end, const int64_t* __restrict__ cls, const T* __restrict__ norm,
                                           const T* __restrict__ log_q, const T* __restrict__ g, T* __restrict__ partial, int64_t k, T inv_t) {
  const int64_t c = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const T q = log_q[cls[c] * k + j];
  T total = 0;
  for (int64_t r = start[c]; r < end[c]; ++r) {
    const int64_t i = order[r];
    const T x = log_p(f[i * k + j], inv_t, load_norm(norm, i));
    if (x > neg_inf<T>()) total += g[i] * exp_(x - q);  // 0 where log P is -inf (see cmi_ops.h)
  }
  partial[c * k + j] = total;
}

template <typename scalar_t, typename T>
__global__ void row_grad_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ labels, const T* __restrict__ norm,
                                const T* __restrict__ log_q, const T* __restrict__ kl, const T* __restrict__ g, const T* __restrict__ a,
                                scalar_t* __restrict__ out, int64_t n, int64_t k, T inv_t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= n) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* values = f + i * k;
  const T* q = log_q + labels[i] * k;
  const T* ar = a != nullptr ? a + labels[i] * k : nullptr;
  const Norm<T> row = load_norm(norm, i);
  const T weight = g[i], offset = kl[i];
  T through_centroid = 0;  // sum_k P_ik a_ck
  if (ar != nullptr) {
    for (int64_t j = lane; j < k; j += kWarpSize) through_centroid += exp_(log_p(values[j], inv_t, row)) * ar[j];
    through_centroid = warp_sum(through_centroid);
  }
  for (int64_t j = lane; j < k; j += kWarpSize) {
    const T x = log_p(values[j], inv_t, row);
    const T p = exp_(x);
    T d = weight * (x - q[j] - offset);
    if (ar != nullptr) d += through_centroid - ar[j];
    out[i * k + j] = static_cast<scalar_t>(p > T(0) ? p * d * inv_t : T(0));
  }
}

unsigned row_blocks(int64_t n) { return static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock); }
unsigned column_blocks(int64_t k) { return static_cast<unsigned>((k + kThreads - 1) / kThreads); }

Tensor row_norm(const Tensor& features, double inv_t) {
  check_features(features, at::kCUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = features.size(1);
  Tensor norm = at::empty({n, 2}, acc_options(features));
  if (n == 0) return norm;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_norm_cuda", [&] {
    using T = acc_t<scalar_t>;
    row_norm_kernel<scalar_t, T><<<row_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        features.const_data_ptr<scalar_t>(), norm.mutable_data_ptr<T>(), n, k, static_cast<T>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return norm;
}

std::tuple<Tensor, Tensor> chunk_norm(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end, double inv_t) {
  check_features(features, at::kCUDA);
  check_chunks(features, order, start, end);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = features.size(1), chunks = start.numel();
  Tensor norm = at::empty({n, 2}, acc_options(features));
  Tensor partial = at::empty({chunks, k}, acc_options(features));
  if (chunks == 0) return {norm, partial};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_norm_cuda", [&] {
    using T = acc_t<scalar_t>;
    chunk_norm_kernel<scalar_t, T><<<static_cast<unsigned>(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        features.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(),
        end.const_data_ptr<int64_t>(), norm.mutable_data_ptr<T>(), partial.mutable_data_ptr<T>(), k, static_cast<T>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {norm, partial};
}

Tensor combine(const Tensor& partial, const Tensor& first, const Tensor& counts, bool log_mode) {
  check_combine(partial, first, counts, at::kCUDA);
  const c10::cuda::CUDAGuard guard(partial.device());
  const int64_t classes = counts.numel(), k = partial.size(1);
  Tensor out = at::empty({classes, k}, partial.options());
  if (classes == 0 || k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "cmi_combine_cuda", [&] {
    combine_kernel<scalar_t><<<dim3(static_cast<unsigned>(classes), column_blocks(k)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<scalar_t>(), first.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), k, log_mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor combine_lse(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, true); }
Tensor combine_mean(const Tensor& partial, const Tensor& first, const Tensor& counts) { return combine(partial, first, counts, false); }

Tensor row_kl(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, double inv_t) {
  check_row_kl(features, labels, norm, log_q, at::kCUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = features.size(1);
  Tensor kl = at::empty({n}, acc_options(features));
  if (n == 0) return kl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_kl_cuda", [&] {
    using T = acc_t<scalar_t>;
    row_kl_kernel<scalar_t, T><<<row_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        features.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), norm.const_data_ptr<T>(), log_q.const_data_ptr<T>(),
        kl.mutable_data_ptr<T>(), n, k, static_cast<T>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return kl;
}

Tensor chunk_centroid_grad(const Tensor& features, const Tensor& order, const Tensor& start, const Tensor& end, const Tensor& cls,
                           const Tensor& norm, const Tensor& log_q, const Tensor& g, double inv_t) {
  check_chunk_centroid_grad(features, order, start, end, cls, norm, log_q, g, at::kCUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t k = features.size(1), chunks = start.numel();
  Tensor partial = at::empty({chunks, k}, acc_options(features));
  if (chunks == 0 || k == 0) return partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_chunk_centroid_grad_cuda", [&] {
    using T = acc_t<scalar_t>;
    chunk_centroid_grad_kernel<scalar_t, T>
        <<<dim3(static_cast<unsigned>(chunks), column_blocks(k)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            features.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(),
            end.const_data_ptr<int64_t>(), cls.const_data_ptr<int64_t>(), norm.const_data_ptr<T>(), log_q.const_data_ptr<T>(),
            g.const_data_ptr<T>(), partial.mutable_data_ptr<T>(), k, static_cast<T>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

Tensor row_grad(const Tensor& features, const Tensor& labels, const Tensor& norm, const Tensor& log_q, const Tensor& kl, const Tensor& g,
                const std::optional<Tensor>& a, double inv_t) {
  check_row_grad(features, labels, norm, log_q, kl, g, a, at::kCUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = features.size(1);
  Tensor grad = at::empty_like(features);
  if (n == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "cmi_row_grad_cuda", [&] {
    using T = acc_t<scalar_t>;
    row_grad_kernel<scalar_t, T><<<row_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        features.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), norm.const_data_ptr<T>(), log_q.const_data_ptr<T>(),
        kl.const_data_ptr<T>(), g.const_data_ptr<T>(), a.has_value() ? a->const_data_ptr<T>() : nullptr,
        grad.mutable_data_ptr<scalar_t>(), n, k, static_cast<T>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace ddfast::cmi

TORCH_LIBRARY(ddfast_cmi_cuda, m) { DDFAST_CMI_DEFINE_KERNELS(m); }
