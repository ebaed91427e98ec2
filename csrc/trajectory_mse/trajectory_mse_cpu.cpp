// trajectory_mse on the CPU: one pass over every parameter tensor of B trajectories.
//
// Work is cut into items of at most kChunk elements of one row of one tensor; each item sums its
// squared differences in the accumulation type and writes its own partial, and the partials of a
// trajectory are then added in double in a fixed order. Contract in trajectory_mse_ops.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/accumulate.h"
#include "common/cpu_vec.h"
#include "trajectory_mse/trajectory_mse_ops.h"

namespace ddfast::trajectory_mse {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 2048;       // elements per work item
constexpr int kUnroll = 4;             // vector accumulators per sum
constexpr int64_t kItemsPerTask = 32;  // work items below which at::parallel_for stays serial

// One work item: elements [begin, end) of row b of tensor `tensor`.
struct Item {
  int64_t tensor, begin, end;
};

// The items of one trajectory (the same for every b); row lengths n_i = numel / B.
struct Plan {
  int64_t trajectories;
  std::vector<int64_t> row;
  std::vector<Item> items;
};

Plan make_plan(at::TensorList student, at::TensorList start, at::TensorList target, int64_t trajectories) {
  Plan plan{trajectories, check_lists(student, start, target, trajectories, at::kCPU), {}};
  for (size_t i = 0; i < plan.row.size(); ++i) {
    for (int64_t begin = 0; begin < plan.row[i]; begin += kChunk) {
      plan.items.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunk, plan.row[i])});
    }
  }
  return plan;
}

// A Vectorized<scalar_t> worth of elements in the accumulation type: one vector, or two for half / bfloat16.
template <typename scalar_t>
constexpr int kParts = std::is_same_v<scalar_t, acc_t<scalar_t>> ? 1 : 2;
template <typename scalar_t>
using Lanes = std::array<Vec<acc_t<scalar_t>>, kParts<scalar_t>>;

template <typename scalar_t>
Lanes<scalar_t> load_acc(const scalar_t* p) {
  if constexpr (kParts<scalar_t> == 1) {
    return {Vec<scalar_t>::loadu(p)};
  } else {
    auto [low, high] = at::vec::convert_to_float<scalar_t>(Vec<scalar_t>::loadu(p));
    return {low, high};
  }
}

template <typename scalar_t>
void store_acc(scalar_t* p, const Lanes<scalar_t>& x) {
  if constexpr (kParts<scalar_t> == 1) {
    x[0].store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(x[0], x[1]).store(p);
  }
}

// Adds (s - t)^2 and (st - t)^2 of one vector's worth of elements to num and den.
template <typename scalar_t, typename T = acc_t<scalar_t>>
void accumulate(const scalar_t* s, const scalar_t* st, const scalar_t* t, Vec<T>& num, Vec<T>& den) {
  const Lanes<scalar_t> vs = load_acc(s), vst = load_acc(st), vt = load_acc(t);
  for (int p = 0; p < kParts<scalar_t>; ++p) {
    const Vec<T> d = vs[p] - vt[p], e = vst[p] - vt[p];
    num = at::vec::fmadd(d, d, num);
    den = at::vec::fmadd(e, e, den);
  }
}

// Sums of (s - t)^2 and (st - t)^2 over [begin, end) of one row, in kUnroll independent vector
// accumulators (shorter sequential sums, more instruction-level parallelism).
template <typename scalar_t, typename T = acc_t<scalar_t>>
std::pair<T, T> squared_distances(const scalar_t* s, const scalar_t* st, const scalar_t* t, int64_t begin, int64_t end) {
  constexpr int64_t width = Vec<scalar_t>::size();
  std::array<Vec<T>, kUnroll> num, den;
  num.fill(Vec<T>(0));
  den.fill(Vec<T>(0));
  int64_t j = begin;
  for (; j + kUnroll * width <= end; j += kUnroll * width) {
    for (int u = 0; u < kUnroll; ++u) {
      accumulate(s + j + u * width, st + j + u * width, t + j + u * width, num[u], den[u]);
    }
  }
  for (; j + width <= end; j += width) {
    accumulate(s + j, st + j, t + j, num[0], den[0]);
  }
  T num_tail = 0, den_tail = 0;
  for (; j < end; ++j) {
    const T d = T(s[j]) - T(t[j]), e = T(st[j]) - T(t[j]);
    num_tail += d * d;
    den_tail += e * e;
  }
  static_assert(kUnroll == 4, "the pairwise sum below adds four accumulators");
  return {lane_sum((num[0] + num[1]) + (num[2] + num[3])) + num_tail, lane_sum((den[0] + den[1]) + (den[2] + den[3])) + den_tail};
}

template <typename scalar_t, typename T = acc_t<scalar_t>>
std::tuple<Tensor, Tensor> forward_typed(const Plan& plan, at::TensorList student, at::TensorList start, at::TensorList target) {
  const int64_t per_row = static_cast<int64_t>(plan.items.size());
  const int64_t total = plan.trajectories * per_row;
  std::vector<T> partial_num(total), partial_den(total);
  at::parallel_for(0, total, kItemsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t b = w / per_row;
      const Item& item = plan.items[w % per_row];
      const int64_t offset = b * plan.row[item.tensor];
      std::tie(partial_num[w], partial_den[w]) = squared_distances<scalar_t>(
          student[item.tensor].const_data_ptr<scalar_t>() + offset, start[item.tensor].const_data_ptr<scalar_t>() + offset,
          target[item.tensor].const_data_ptr<scalar_t>() + offset, item.begin, item.end);
    }
  });
  const auto options = acc_options(student[0]);
  Tensor num = at::empty({plan.trajectories}, options), den = at::empty({plan.trajectories}, options);
  for (int64_t b = 0; b < plan.trajectories; ++b) {
    double num_b = 0, den_b = 0;
    for (int64_t k = b * per_row; k < (b + 1) * per_row; ++k) {
      num_b += partial_num[k];
      den_b += partial_den[k];
    }
    num.data_ptr<T>()[b] = static_cast<T>(num_b);
    den.data_ptr<T>()[b] = static_cast<T>(den_b);
  }
  return {num, den};
}

// Output pointers of one row: nullptr where that gradient is not wanted.
template <typename scalar_t>
struct GradRow {
  scalar_t *student, *start, *target;
};

template <typename scalar_t, typename T = acc_t<scalar_t>>
void gradients(const scalar_t* s, const scalar_t* st, const scalar_t* t, GradRow<scalar_t> out, T a, T c, int64_t begin, int64_t end) {
  constexpr int64_t width = Vec<scalar_t>::size();
  const bool read_start = out.start != nullptr || out.target != nullptr;
  const Vec<T> va(a), vc(c);
  int64_t j = begin;
  for (; j + width <= end; j += width) {
    const Lanes<scalar_t> vs = load_acc(s + j), vt = load_acc(t + j);
    Lanes<scalar_t> vst = read_start ? load_acc(st + j) : vt;
    Lanes<scalar_t> ds, dst, dt;
    for (int p = 0; p < kParts<scalar_t>; ++p) {
      ds[p] = va * (vs[p] - vt[p]);
      dst[p] = vc * (vt[p] - vst[p]);
      dt[p] = Vec<T>(0) - ds[p] - dst[p];
    }
    if (out.student) store_acc(out.student + j, ds);
    if (out.start) store_acc(out.start + j, dst);
    if (out.target) store_acc(out.target + j, dt);
  }
  for (; j < end; ++j) {
    const T ds = a * (T(s[j]) - T(t[j]));
    const T dst = read_start ? c * (T(t[j]) - T(st[j])) : T(0);
    if (out.student) out.student[j] = static_cast<scalar_t>(ds);
    if (out.start) out.start[j] = static_cast<scalar_t>(dst);
    if (out.target) out.target[j] = static_cast<scalar_t>(-ds - dst);
  }
}

// Fills the defined outputs of `grads` (gradient_outputs' layout).
template <typename scalar_t, typename T = acc_t<scalar_t>>
void backward_typed(const Plan& plan, const Tensor& grad, const Tensor& loss, const Tensor& den, at::TensorList student,
                    at::TensorList start, at::TensorList target, std::vector<Tensor>& grads) {
  const size_t n = student.size();
  const auto pointer = [&](size_t k) { return grads[k].defined() ? grads[k].mutable_data_ptr<scalar_t>() : nullptr; };
  const Tensor g = grad.contiguous(), l = loss.contiguous(), d = den.contiguous();
  const T *g_ptr = g.const_data_ptr<T>(), *l_ptr = l.const_data_ptr<T>(), *d_ptr = d.const_data_ptr<T>();
  const int64_t per_row = static_cast<int64_t>(plan.items.size());
  at::parallel_for(0, plan.trajectories * per_row, kItemsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t b = w / per_row;
      const Item& item = plan.items[w % per_row];
      const size_t i = static_cast<size_t>(item.tensor);
      if (!grads[i].defined() && !grads[n + i].defined() && !grads[2 * n + i].defined()) continue;
      const int64_t offset = b * plan.row[i];
      const auto at_row = [&](scalar_t* p) { return p ? p + offset : nullptr; };
      const T a = T(2) * g_ptr[b] / d_ptr[b];
      gradients<scalar_t>(student[i].const_data_ptr<scalar_t>() + offset, start[i].const_data_ptr<scalar_t>() + offset,
                          target[i].const_data_ptr<scalar_t>() + offset,
                          {at_row(pointer(i)), at_row(pointer(n + i)), at_row(pointer(2 * n + i))}, a, a * l_ptr[b], item.begin,
                          item.end);
    }
  });
}

void check_per_trajectory(const Tensor& x, const char* name, int64_t trajectories, at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.size(0) == trajectories && x.scalar_type() == dtype,
              "trajectory_mse backward: ", name, " must be a (", trajectories, ",) CPU tensor of ", dtype);
}

std::tuple<Tensor, Tensor> forward(at::TensorList student, at::TensorList start, at::TensorList target, int64_t trajectories) {
  const Plan plan = make_plan(student, start, target, trajectories);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_forward_cpu",
                                         [&] { return forward_typed<scalar_t>(plan, student, start, target); });
}

std::vector<Tensor> backward(const Tensor& grad, const Tensor& loss, const Tensor& den, at::TensorList student,
                             at::TensorList start, at::TensorList target, const c10::List<bool>& needs) {
  const Plan plan = make_plan(student, start, target, grad.numel());
  std::vector<Tensor> grads = gradient_outputs(student, needs);
  const at::ScalarType acc = acc_dtype(student[0]);
  check_per_trajectory(grad, "grad", plan.trajectories, acc);
  check_per_trajectory(loss, "loss", plan.trajectories, acc);
  check_per_trajectory(den, "den", plan.trajectories, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_backward_cpu", [&] {
    backward_typed<scalar_t>(plan, grad, loss, den, student, start, target, grads);
  });
  return wanted(std::move(grads));
}

}  // namespace
}  // namespace ddfast::trajectory_mse

TORCH_LIBRARY(ddfast_trajectory_mse_cpu, m) { DDFAST_TRAJECTORY_MSE_DEFINE_KERNELS(m); }
