// trajectory_mse on CUDA: one multi-tensor launch over every parameter tensor of B trajectories.
//
// Inputs are three lists (student, start, target) of contiguous CUDA tensors of one dtype, tensor i seen
// as a (B, n_i) matrix (n_i = numel / B), and B.
// A device-side table (int64) describes them:
//   [0, n)   chunk_end[i]: cumulative count of kChunk-element chunks of one row, tensors 0..i
//   [n, 2n)  n_i, the row length
//   [2n, 5n) addresses of student[i], start[i], target[i]
//   [5n, 8n) backward only: addresses of the gradients of student[i], start[i], target[i] (0: not wanted)
// Block w of the grid of B * K (K = chunk_end[n-1]) handles chunk w % K of trajectory w / K and finds
// its tensor by binary search in chunk_end. Forward: each block writes the partial sums of (s - t)^2
// and (st - t)^2 over its chunk (fixed-order tree reduction, accumulation type: float, or double for
// double inputs); a second kernel adds each trajectory's partials in double in a fixed order. No
// atomics: results are deterministic, and the rounding error is bounded by kChunk, not by P.
//
//   forward(student, start, target, B) -> (num, den)      (B,) sums of squares, accumulation type
//   backward(grad, loss, den, student, start, target, needs) -> the gradients flagged in `needs`
// With a = 2 grad_b / den_b and c = a * loss_b:
//   d student = a (student - target),  d start = -c (start - target),  d target = -(d student + d start).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

#include "common/checks.h"

namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;  // elements of one row per block

// Sixteen bytes of T, loaded and stored as one vector access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Read-only inputs go through the non-coherent cache; both ways move 16 bytes at once (the element type
// may be a class such as c10::Half, whose own copies would move 2 bytes at a time).
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
  Pack<T> pack;
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
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

template <typename T>
__device__ __forceinline__ T* address(const int64_t* __restrict__ table, int slot, int64_t offset) {
  T* p = reinterpret_cast<T*>(table[slot]);
  return p == nullptr ? nullptr : p + offset;
}

// Sums x and y over the block in a fixed order; the totals land in thread 0.
template <typename A>
__device__ void block_sum(A& x, A& y) {
  __shared__ A shared_x[kWarps], shared_y[kWarps];
  for (int o = 16; o > 0; o /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, o);
    y += __shfl_down_sync(0xffffffffu, y, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_x[warp] = x;
    shared_y[warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? shared_x[lane] : A(0);
    y = lane < kWarps ? shared_y[lane] : A(0);
    for (int o = kWarps / 2; o > 0; o /= 2) {
      x += __shfl_down_sync(0xffffffffu, x, o);
      y += __shfl_down_sync(0xffffffffu, y, o);
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) partials_kernel(const int64_t* __restrict__ table, int n, int64_t chunks_per_row,
                                                            A* __restrict__ partial_num, A* __restrict__ partial_den) {
  const Location loc = locate(table, n, chunks_per_row);
  const int64_t offset = loc.b * loc.row;
  const T* __restrict__ s = address<T>(table, 2 * n + loc.i, offset);
  const T* __restrict__ st = address<T>(table, 3 * n + loc.i, offset);
  const T* __restrict__ t = address<T>(table, 4 * n + loc.i, offset);
  A num = 0, den = 0;
  int64_t tail = loc.begin;
  if (aligned(s + loc.begin) && aligned(st + loc.begin) && aligned(t + loc.begin)) {
    constexpr int kPack = Pack<T>::kSize;
    const int64_t packs = (loc.end - loc.begin) / kPack;
#pragma unroll 4
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      const int64_t j = loc.begin + p * kPack;
      const Pack<T> vs = load_pack(s + j), vst = load_pack(st + j), vt = load_pack(t + j);
#pragma unroll
      for (int q = 0; q < kPack; ++q) {
        const A tq = static_cast<A>(vt.v[q]);
        const A d = static_cast<A>(vs.v[q]) - tq, e = static_cast<A>(vst.v[q]) - tq;
        num += d * d;
        den += e * e;
      }
    }
    tail = loc.begin + packs * kPack;
  }
  for (int64_t j = tail + threadIdx.x; j < loc.end; j += kThreads) {
    const A tj = static_cast<A>(t[j]);
    const A d = static_cast<A>(s[j]) - tj, e = static_cast<A>(st[j]) - tj;
    num += d * d;
    den += e * e;
  }
  block_sum(num, den);
  if (threadIdx.x == 0) {
    partial_num[blockIdx.x] = num;
    partial_den[blockIdx.x] = den;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) finish_kernel(const A* __restrict__ partial_num, const A* __restrict__ partial_den,
                                                          int64_t chunks_per_row, A* __restrict__ num, A* __restrict__ den) {
  const int64_t base = blockIdx.x * chunks_per_row;
  double num_b = 0, den_b = 0;
  for (int64_t k = threadIdx.x; k < chunks_per_row; k += kThreads) {
    num_b += partial_num[base + k];
    den_b += partial_den[base + k];
  }
  block_sum(num_b, den_b);
  if (threadIdx.x == 0) {
    num[blockIdx.x] = static_cast<A>(num_b);
    den[blockIdx.x] = static_cast<A>(den_b);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gradients_kernel(const int64_t* __restrict__ table, int n, int64_t chunks_per_row,
                                                             const A* __restrict__ grad, const A* __restrict__ loss,
                                                             const A* __restrict__ den) {
  const Location loc = locate(table, n, chunks_per_row);
  const int64_t offset = loc.b * loc.row;
  T* __restrict__ ds_out = address<T>(table, 5 * n + loc.i, offset);
  T* __restrict__ dst_out = address<T>(table, 6 * n + loc.i, offset);
  T* __restrict__ dt_out = address<T>(table, 7 * n + loc.i, offset);
  if (ds_out == nullptr && dst_out == nullptr && dt_out == nullptr) return;
  const bool read_student = ds_out != nullptr || dt_out != nullptr;
  const bool read_start = dst_out != nullptr || dt_out != nullptr;
  const T* __restrict__ s = address<T>(table, 2 * n + loc.i, offset);
  const T* __restrict__ st = address<T>(table, 3 * n + loc.i, offset);
  const T* __restrict__ t = address<T>(table, 4 * n + loc.i, offset);
  const A a = A(2) * grad[loc.b] / den[loc.b];
  const A c = a * loss[loc.b];

  const auto usable = [&](const void* p, bool used) { return !used || aligned(static_cast<const char*>(p) + loc.begin * sizeof(T)); };
  int64_t tail = loc.begin;
  if (usable(t, true) && usable(s, read_student) && usable(st, read_start) && usable(ds_out, ds_out != nullptr) &&
      usable(dst_out, dst_out != nullptr) && usable(dt_out, dt_out != nullptr)) {
    constexpr int kPack = Pack<T>::kSize;
    const int64_t packs = (loc.end - loc.begin) / kPack;
#pragma unroll 2
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      const int64_t j = loc.begin + p * kPack;
      const Pack<T> vt = load_pack(t + j);
      const Pack<T> vs = read_student ? load_pack(s + j) : vt;
      const Pack<T> vst = read_start ? load_pack(st + j) : vt;
      Pack<T> gs, gst, gt;
#pragma unroll
      for (int q = 0; q < kPack; ++q) {
        const A tq = static_cast<A>(vt.v[q]);
        const A ds = a * (static_cast<A>(vs.v[q]) - tq), dst = c * (tq - static_cast<A>(vst.v[q]));
        gs.v[q] = static_cast<T>(ds);
        gst.v[q] = static_cast<T>(dst);
        gt.v[q] = static_cast<T>(-(ds + dst));
      }
      if (ds_out != nullptr) store_pack(ds_out + j, gs);
      if (dst_out != nullptr) store_pack(dst_out + j, gst);
      if (dt_out != nullptr) store_pack(dt_out + j, gt);
    }
    tail = loc.begin + packs * kPack;
  }
  for (int64_t j = tail + threadIdx.x; j < loc.end; j += kThreads) {
    const A tj = static_cast<A>(t[j]);
    const A ds = read_student ? a * (static_cast<A>(s[j]) - tj) : A(0);
    const A dst = read_start ? c * (tj - static_cast<A>(st[j])) : A(0);
    if (ds_out != nullptr) ds_out[j] = static_cast<T>(ds);
    if (dst_out != nullptr) dst_out[j] = static_cast<T>(dst);
    if (dt_out != nullptr) dt_out[j] = static_cast<T>(-(ds + dst));
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
  TORCH_CHECK(!student.empty(), "trajectory_mse: student is empty");
  TORCH_CHECK(start.size() == student.size() && target.size() == student.size(),
              "trajectory_mse: student, start and target must hold the same number of tensors");
  TORCH_CHECK(student.size() < static_cast<size_t>(INT_MAX / 8), "trajectory_mse: too many tensors");
  TORCH_CHECK(trajectories > 0, "trajectory_mse: B must be positive");
  const int n = static_cast<int>(student.size());
  std::vector<int64_t> values(grads.empty() ? 5 * n : 8 * n);
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    for (const Tensor& x : {student[i], start[i], target[i]}) {
      DDFAST_CHECK_DEVICE(x, at::kCUDA);
      TORCH_CHECK(x.device() == student[0].device(), "trajectory_mse: all tensors must be on one device");
      DDFAST_CHECK_CONTIGUOUS(x);
      DDFAST_CHECK_DTYPE(x, student[0].scalar_type());
      TORCH_CHECK(x.sizes() == student[i].sizes(), "trajectory_mse: shapes differ at tensor ", i);
      // element-aligned: the kernels then pick 16-byte accesses per chunk where the address allows
      TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % x.element_size() == 0,
                  "trajectory_mse: tensor ", i, " is not aligned to its element size");
    }
    TORCH_CHECK(student[i].numel() % trajectories == 0, "trajectory_mse: tensor ", i, " does not split into B rows");
    const int64_t row = student[i].numel() / trajectories;
    chunks += (row + kChunk - 1) / kChunk;
    values[i] = chunks;
    values[n + i] = row;
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
  const auto acc = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = student[0].options().dtype(acc);
  Tensor partial_num = at::empty({launch.blocks()}, options), partial_den = at::empty({launch.blocks()}, options);
  Tensor num = at::empty({launch.trajectories}, options), den = at::empty({launch.trajectories}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (launch.blocks() > 0) {
      partials_kernel<scalar_t, A><<<launch.blocks(), kThreads, 0, stream>>>(
          launch.table.const_data_ptr<int64_t>(), launch.n, launch.chunks_per_row, partial_num.mutable_data_ptr<A>(),
          partial_den.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<A><<<launch.trajectories, kThreads, 0, stream>>>(partial_num.const_data_ptr<A>(), partial_den.const_data_ptr<A>(),
                                                                   launch.chunks_per_row, num.mutable_data_ptr<A>(),
                                                                   den.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {num, den};
}

std::vector<Tensor> backward(const Tensor& grad, const Tensor& loss, const Tensor& den, at::TensorList student,
                             at::TensorList start, at::TensorList target, const c10::List<bool>& needs) {
  TORCH_CHECK(!student.empty(), "trajectory_mse: student is empty");
  const c10::cuda::CUDAGuard guard(student[0].device());
  const size_t n = student.size();
  TORCH_CHECK(needs.size() == 3 * n, "trajectory_mse backward: needs must hold 3 flags per tensor");
  const auto acc = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* x : {&grad, &loss, &den}) {
    TORCH_CHECK(x->device() == student[0].device() && x->dim() == 1 && x->size(0) == grad.numel() &&
                    x->scalar_type() == acc && x->is_contiguous(),
                "trajectory_mse backward: grad, loss and den must be contiguous (B,) tensors of ", acc, " on ",
                student[0].device());
  }
  std::vector<Tensor> grads(3 * n);
  for (size_t k = 0; k < 3 * n; ++k) {
    if (needs.get(k)) grads[k] = at::empty_like(student[k % n]);
  }
  const Launch launch = prepare(student, start, target, grad.numel(), grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (launch.blocks() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      gradients_kernel<scalar_t, A><<<launch.blocks(), kThreads, 0, stream>>>(
          launch.table.const_data_ptr<int64_t>(), launch.n, launch.chunks_per_row, grad.const_data_ptr<A>(),
          loss.const_data_ptr<A>(), den.const_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  std::vector<Tensor> wanted;
  for (Tensor& x : grads) {
    if (x.defined()) wanted.push_back(std::move(x));
  }
  return wanted;
}

}  // namespace

TORCH_LIBRARY(ddfast_trajectory_mse_cuda, m) {
  m.def("forward(Tensor[] student, Tensor[] start, Tensor[] target, int trajectories) -> (Tensor, Tensor)", &forward);
  m.def("backward(Tensor grad, Tensor loss, Tensor den, Tensor[] student, Tensor[] start, Tensor[] target, bool[] needs) -> Tensor[]",
        &backward);
}
