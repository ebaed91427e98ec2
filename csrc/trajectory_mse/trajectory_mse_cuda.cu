// trajectory_mse on CUDA: one multi-tensor launch over every parameter tensor of B trajectories.
//
// A device-side table (int64) describes the n tensors of each list:
//   [0, n)   chunk_end[i]: cumulative count of kChunk-element chunks of one row, tensors 0..i
//   [n, 2n)  n_i, the row length
//   [2n, 5n) addresses of student[i], start[i], target[i]
//   [5n, 8n) backward only: addresses of the gradients of student[i], start[i], target[i] (0: not wanted)
// Block w of the grid of B * K (K = chunk_end[n-1]) handles chunk w % K of trajectory w / K and finds
// its tensor by binary search in chunk_end. Forward: each block writes the partial sums of (s - t)^2
// and (st - t)^2 over its chunk (fixed-order tree reduction); a second kernel adds each trajectory's
// partials in double in a fixed order. No atomics: results are deterministic. Contract in
// trajectory_mse_ops.h.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/accumulate.h"
#include "common/cuda_reduce.cuh"
#include "trajectory_mse/trajectory_mse_ops.h"

namespace ddfast::trajectory_mse {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int64_t kChunk = 8192;  // elements of one row per block

// Sixteen bytes of scalar_t, loaded and stored as one vector access.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Read-only inputs go through the non-coherent cache; both ways move 16 bytes at once (the element type
// may be a class such as c10::Half, whose own copies would move 2 bytes at a time).
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
  Pack<scalar_t> pack;
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& pack) {
  int4 raw;
  memcpy(&raw, &pack, sizeof(raw));
  __stwb(reinterpret_cast<int4*>(p), raw);
}

__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Where block w works: trajectory b, tensor i, elements [begin, end) of a row of length row.
struct Location {
  int64_t b, begin, end, row;
  int i;
};

__device__ Location locate(const int64_t* __restrict__ table, int n, int64_t chunks_per_row) {
  const int64_t w = blockIdx.x;
  const int64_t k = w % chunks_per_row;
  int lo = 0, hi = n - 1;  // the first tensor whose chunk_end exceeds k
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (table[mid] > k) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t first_chunk = lo > 0 ? table[lo - 1] : 0;
  const int64_t row = table[n + lo];
  const int64_t begin = (k - first_chunk) * kChunk;
  return {w / chunks_per_row, begin, min(begin + kChunk, row), row, lo};
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t* address(const int64_t* __restrict__ table, int slot, int64_t offset) {
  scalar_t* p = reinterpret_cast<scalar_t*>(table[slot]);
  return p == nullptr ? nullptr : p + offset;
}

// Sums x and y over the block in a fixed order; the totals land in thread 0.
template <typename T>
__device__ void block_sum(T& x, T& y) {
  __shared__ T shared_x[kWarpsPerBlock], shared_y[kWarpsPerBlock];
  x = warp_sum(x);
  y = warp_sum(y);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    shared_x[warp] = x;
    shared_y[warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = warp_sum<kWarpsPerBlock>(lane < kWarpsPerBlock ? shared_x[lane] : T(0));
    y = warp_sum<kWarpsPerBlock>(lane < kWarpsPerBlock ? shared_y[lane] : T(0));
  }
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) partials_kernel(const int64_t* __restrict__ table, int n, int64_t chunks_per_row,
                                                            T* __restrict__ partial_num, T* __restrict__ partial_den) {
  const Location loc = locate(table, n, chunks_per_row);
  const int64_t offset = loc.b * loc.row;
  const scalar_t* __restrict__ s = address<scalar_t>(table, 2 * n + loc.i, offset);
  const scalar_t* __restrict__ st = address<scalar_t>(table, 3 * n + loc.i, offset);
  const scalar_t* __restrict__ t = address<scalar_t>(table, 4 * n + loc.i, offset);
  T num = 0, den = 0;
  int64_t tail = loc.begin;
  if (aligned(s + loc.begin) && aligned(st + loc.begin) && aligned(t + loc.begin)) {
    constexpr int kPack = Pack<scalar_t>::kSize;
    const int64_t packs = (loc.end - loc.begin) / kPack;
#pragma unroll 4
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      const int64_t j = loc.begin + p * kPack;
      const Pack<scalar_t> vs = load_pack(s + j), vst = load_pack(st + j), vt = load_pack(t + j);
#pragma unroll
      for (int q = 0; q < kPack; ++q) {
        const T tq = static_cast<T>(vt.v[q]);
        const T d = static_cast<T>(vs.v[q]) - tq, e = static_cast<T>(vst.v[q]) - tq;
        num += d * d;
        den += e * e;
      }
    }
    tail = loc.begin + packs * kPack;
  }
  for (int64_t j = tail + threadIdx.x; j < loc.end; j += kThreads) {
    const T tj = static_cast<T>(t[j]);
    const T d = static_cast<T>(s[j]) - tj, e = static_cast<T>(st[j]) - tj;
    num += d * d;
    den += e * e;
  }
  block_sum(num, den);
  if (threadIdx.x == 0) {
    partial_num[blockIdx.x] = num;
    partial_den[blockIdx.x] = den;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) finish_kernel(const T* __restrict__ partial_num, const T* __restrict__ partial_den,
                                                          int64_t chunks_per_row, T* __restrict__ num, T* __restrict__ den) {
  const int64_t base = blockIdx.x * chunks_per_row;
  double num_b = 0, den_b = 0;
  for (int64_t k = threadIdx.x; k < chunks_per_row; k += kThreads) {
    num_b += partial_num[base + k];
    den_b += partial_den[base + k];
  }
  block_sum(num_b, den_b);
  if (threadIdx.x == 0) {
    num[blockIdx.x] = static_cast<T>(num_b);
    den[blockIdx.x] = static_cast<T>(den_b);
  }
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) gradients_kernel(const int64_t* __restrict__ table, int n, int64_t chunks_per_row,
                                                             const T* __restrict__ grad, const T* __restrict__ loss,
                                                             const T* __restrict__ den) {
  const Location loc = locate(table, n, chunks_per_row);
  const int64_t offset = loc.b * loc.row;
  scalar_t* __restrict__ ds_out = address<scalar_t>(table, 5 * n + loc.i, offset);
  scalar_t* __restrict__ dst_out = address<scalar_t>(table, 6 * n + loc.i, offset);
  scalar_t* __restrict__ dt_out = address<scalar_t>(table, 7 * n + loc.i, offset);
  if (ds_out == nullptr && dst_out == nullptr && dt_out == nullptr) return;
  const bool read_student = ds_out != nullptr || dt_out != nullptr;
  const bool read_start = dst_out != nullptr || dt_out != nullptr;
  const scalar_t* __restrict__ s = address<scalar_t>(table, 2 * n + loc.i, offset);
  const scalar_t* __restrict__ st = address<scalar_t>(table, 3 * n + loc.i, offset);
  const scalar_t* __restrict__ t = address<scalar_t>(table, 4 * n + loc.i, offset);
  const T a = T(2) * grad[loc.b] / den[loc.b];
  const T c = a * loss[loc.b];

  const auto usable = [&](const void* p, bool used) {
    return !used || aligned(static_cast<const char*>(p) + loc.begin * sizeof(scalar_t));
  };
  int64_t tail = loc.begin;
  if (usable(t, true) && usable(s, read_student) && usable(st, read_start) && usable(ds_out, ds_out != nullptr) &&
      usable(dst_out, dst_out != nullptr) && usable(dt_out, dt_out != nullptr)) {
    constexpr int kPack = Pack<scalar_t>::kSize;
    const int64_t packs = (loc.end - loc.begin) / kPack;
#pragma unroll 2
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      const int64_t j = loc.begin + p * kPack;
      const Pack<scalar_t> vt = load_pack(t + j);
      const Pack<scalar_t> vs = read_student ? load_pack(s + j) : vt;
      const Pack<scalar_t> vst = read_start ? load_pack(st + j) : vt;
      Pack<scalar_t> gs, gst, gt;
#pragma unroll
      for (int q = 0; q < kPack; ++q) {
        const T tq = static_cast<T>(vt.v[q]);
        const T ds = a * (static_cast<T>(vs.v[q]) - tq), dst = c * (tq - static_cast<T>(vst.v[q]));
        gs.v[q] = static_cast<scalar_t>(ds);
        gst.v[q] = static_cast<scalar_t>(dst);
        gt.v[q] = static_cast<scalar_t>(-(ds + dst));
      }
      if (ds_out != nullptr) store_pack(ds_out + j, gs);
      if (dst_out != nullptr) store_pack(dst_out + j, gst);
      if (dt_out != nullptr) store_pack(dt_out + j, gt);
    }
    tail = loc.begin + packs * kPack;
  }
  for (int64_t j = tail + threadIdx.x; j < loc.end; j += kThreads) {
    const T tj = static_cast<T>(t[j]);
    const T ds = read_student ? a * (static_cast<T>(s[j]) - tj) : T(0);
    const T dst = read_start ? c * (tj - static_cast<T>(st[j])) : T(0);
    if (ds_out != nullptr) ds_out[j] = static_cast<scalar_t>(ds);
    if (dst_out != nullptr) dst_out[j] = static_cast<scalar_t>(dst);
    if (dt_out != nullptr) dt_out[j] = static_cast<scalar_t>(-(ds + dst));
  }
}

// The inputs' layout, checked, and the table uploaded to their device.
struct Launch {
  Tensor table;
  int n;
  int64_t chunks_per_row, trajectories;
  int64_t blocks() const { return trajectories * chunks_per_row; }
};

Launch prepare(at::TensorList student, at::TensorList start, at::TensorList target, int64_t trajectories,
               const std::vector<Tensor>& grads = {}) {
  const std::vector<int64_t> rows = check_lists(student, start, target, trajectories, at::kCUDA);
  TORCH_CHECK(student.size() < static_cast<size_t>(INT_MAX / 8), "trajectory_mse: too many tensors");
  const int n = static_cast<int>(student.size());
  std::vector<int64_t> values(grads.empty() ? 5 * n : 8 * n);
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    chunks += (rows[i] + kChunk - 1) / kChunk;
    values[i] = chunks;
    values[n + i] = rows[i];
    values[2 * n + i] = reinterpret_cast<int64_t>(student[i].const_data_ptr());
    values[3 * n + i] = reinterpret_cast<int64_t>(start[i].const_data_ptr());
    values[4 * n + i] = reinterpret_cast<int64_t>(target[i].const_data_ptr());
  }
  for (size_t k = 0; k < grads.size(); ++k) {
    values[5 * n + k] = grads[k].defined() ? reinterpret_cast<int64_t>(grads[k].const_data_ptr()) : 0;
  }
  TORCH_CHECK(trajectories * chunks <= INT_MAX, "trajectory_mse: too many chunks for one launch");
  // pinned, so that the upload is asynchronous; the caching host allocator keeps it alive until it is done
  Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.mutable_data_ptr<int64_t>());
  Tensor table = host.to(at::TensorOptions().dtype(at::kLong).device(student[0].device()), /*non_blocking=*/true);
  return {table, n, chunks, trajectories};
}

std::tuple<Tensor, Tensor> forward(at::TensorList student, at::TensorList start, at::TensorList target, int64_t trajectories) {
  TORCH_CHECK(!student.empty(), "trajectory_mse: student is empty");
  const c10::cuda::CUDAGuard guard(student[0].device());
  const Launch launch = prepare(student, start, target, trajectories);
  const auto options = acc_options(student[0]);
  Tensor partial_num = at::empty({launch.blocks()}, options), partial_den = at::empty({launch.blocks()}, options);
  Tensor num = at::empty({launch.trajectories}, options), den = at::empty({launch.trajectories}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_forward_cuda", [&] {
    using T = acc_t<scalar_t>;
    if (launch.blocks() > 0) {
      partials_kernel<scalar_t, T><<<launch.blocks(), kThreads, 0, stream>>>(
          launch.table.const_data_ptr<int64_t>(), launch.n, launch.chunks_per_row, partial_num.mutable_data_ptr<T>(),
          partial_den.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<T><<<launch.trajectories, kThreads, 0, stream>>>(partial_num.const_data_ptr<T>(), partial_den.const_data_ptr<T>(),
                                                                   launch.chunks_per_row, num.mutable_data_ptr<T>(),
                                                                   den.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {num, den};
}

std::vector<Tensor> backward(const Tensor& grad, const Tensor& loss, const Tensor& den, at::TensorList student,
                             at::TensorList start, at::TensorList target, const c10::List<bool>& needs) {
  TORCH_CHECK(!student.empty(), "trajectory_mse: student is empty");
  const c10::cuda::CUDAGuard guard(student[0].device());
  std::vector<Tensor> grads = gradient_outputs(student, needs);
  const at::ScalarType acc = acc_dtype(student[0]);
  for (const Tensor* x : {&grad, &loss, &den}) {
    TORCH_CHECK(x->device() == student[0].device() && x->dim() == 1 && x->size(0) == grad.numel() &&
                    x->scalar_type() == acc && x->is_contiguous(),
                "trajectory_mse backward: grad, loss and den must be contiguous (B,) tensors of ", acc, " on ",
                student[0].device());
  }
  const Launch launch = prepare(student, start, target, grad.numel(), grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (launch.blocks() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_backward_cuda", [&] {
      using T = acc_t<scalar_t>;
      gradients_kernel<scalar_t, T><<<launch.blocks(), kThreads, 0, stream>>>(
          launch.table.const_data_ptr<int64_t>(), launch.n, launch.chunks_per_row, grad.const_data_ptr<T>(),
          loss.const_data_ptr<T>(), den.const_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return wanted(std::move(grads));
}

}  // namespace
}  // namespace ddfast::trajectory_mse

TORCH_LIBRARY(ddfast_trajectory_mse_cuda, m) { DDFAST_TRAJECTORY_MSE_DEFINE_KERNELS(m); }
