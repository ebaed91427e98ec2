// trajectory_mse on the CPU: one pass over every parameter tensor of B trajectories.
//
// Inputs are three lists (student, start, target) of contiguous tensors of one dtype, tensor i seen as
// a (B, n_i) matrix (n_i = numel / B), and B. Work is
// cut into items of at most kChunk elements of one row of one tensor; each item sums its squared
// differences in the accumulation type (float for half / bfloat16 / float, double for double) and
// writes its own partial, and the partials of a trajectory are then added in double in a fixed order.
// The rounding error is thus bounded by the chunk length, not by P, and does not depend on threads.
//
//   forward(student, start, target, B) -> (num, den)      (B,) sums of squares, accumulation type
//   backward(grad, loss, den, student, start, target, needs) -> the gradients flagged in `needs`
//     (3n flags: student's tensors, then start's, then target's), in that order.
// With a = 2 grad_b / den_b and c = a * loss_b:
//   d student = a (student - target),  d start = -c (start - target),  d target = -(d student + d start).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"

namespace {

using at::Tensor;
using ddfast::Vec;

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
  TORCH_CHECK(!student.empty(), "trajectory_mse: student is empty");
  TORCH_CHECK(start.size() == student.size() && target.size() == student.size(),
              "trajectory_mse: student, start and target must hold the same number of tensors");
  TORCH_CHECK(trajectories > 0, "trajectory_mse: B must be positive");
  Plan plan{trajectories, {}, {}};
  for (size_t i = 0; i < student.size(); ++i) {
    for (const Tensor& x : {student[i], start[i], target[i]}) {
      DDFAST_CHECK_DEVICE(x, at::kCPU);
      DDFAST_CHECK_CONTIGUOUS(x);
      DDFAST_CHECK_DTYPE(x, student[0].scalar_type());
      TORCH_CHECK(x.sizes() == student[i].sizes(), "trajectory_mse: shapes differ at tensor ", i);
      TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % x.element_size() == 0,
                  "trajectory_mse: tensor ", i, " is not aligned to its element size");
    }
    TORCH_CHECK(student[i].numel() % trajectories == 0, "trajectory_mse: tensor ", i, " does not split into B rows");
    const int64_t n = student[i].numel() / trajectories;
    plan.row.push_back(n);
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      plan.items.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunk, n)});
    }
  }
  return plan;
}

// A Vectorized<T> worth of elements in the accumulation type: one vector, or two for half / bfloat16.
template <typename T>
using Acc = at::opmath_type<T>;
template <typename T>
constexpr int kParts = std::is_same_v<T, Acc<T>> ? 1 : 2;
template <typename T>
using Lanes = std::array<Vec<Acc<T>>, kParts<T>>;

template <typename T>
Lanes<T> load_acc(const T* p) {
  if constexpr (kParts<T> == 1) {
    return {Vec<T>::loadu(p)};
  } else {
    auto [low, high] = at::vec::convert_to_float<T>(Vec<T>::loadu(p));
    return {low, high};
  }
}

template <typename T>
void store_acc(T* p, const Lanes<T>& x) {
  if constexpr (kParts<T> == 1) {
    x[0].store(p);
  } else {
    at::vec::convert_from_float<T>(x[0], x[1]).store(p);
  }
}

template <typename T>
Acc<T> lane_sum(const Vec<Acc<T>>& x) {
  std::array<Acc<T>, Vec<Acc<T>>::size()> lanes;
  x.store(lanes.data());
  Acc<T> sum = 0;
  for (Acc<T> v : lanes) sum += v;
  return sum;
}

// Adds (s - t)^2 and (st - t)^2 of one vector's worth of elements to num and den.
template <typename T>
void accumulate(const T* s, const T* st, const T* t, Vec<Acc<T>>& num, Vec<Acc<T>>& den) {
  const Lanes<T> vs = load_acc(s), vst = load_acc(st), vt = load_acc(t);
  for (int p = 0; p < kParts<T>; ++p) {
    const Vec<Acc<T>> d = vs[p] - vt[p], e = vst[p] - vt[p];
    num = at::vec::fmadd(d, d, num);
    den = at::vec::fmadd(e, e, den);
  }
}

// Sums of (s - t)^2 and (st - t)^2 over [begin, end) of one row, in kUnroll independent vector
// accumulators (shorter sequential sums, more instruction-level parallelism).
template <typename T>
std::pair<Acc<T>, Acc<T>> squared_distances(const T* s, const T* st, const T* t, int64_t begin, int64_t end) {
  using A = Acc<T>;
  constexpr int64_t width = Vec<T>::size();
  std::array<Vec<A>, kUnroll> num, den;
  num.fill(Vec<A>(0));
  den.fill(Vec<A>(0));
  int64_t j = begin;
  for (; j + kUnroll * width <= end; j += kUnroll * width) {
    for (int u = 0; u < kUnroll; ++u) {
      accumulate(s + j + u * width, st + j + u * width, t + j + u * width, num[u], den[u]);
    }
  }
  for (; j + width <= end; j += width) {
    accumulate(s + j, st + j, t + j, num[0], den[0]);
  }
  A num_tail = 0, den_tail = 0;
  for (; j < end; ++j) {
    const A d = A(s[j]) - A(t[j]), e = A(st[j]) - A(t[j]);
    num_tail += d * d;
    den_tail += e * e;
  }
  static_assert(kUnroll == 4, "the pairwise sum below adds four accumulators");
  return {lane_sum<T>((num[0] + num[1]) + (num[2] + num[3])) + num_tail,
          lane_sum<T>((den[0] + den[1]) + (den[2] + den[3])) + den_tail};
}

template <typename T>
std::tuple<Tensor, Tensor> forward_typed(const Plan& plan, at::TensorList student, at::TensorList start, at::TensorList target) {
  using A = Acc<T>;
  const int64_t per_row = static_cast<int64_t>(plan.items.size());
  const int64_t total = plan.trajectories * per_row;
  std::vector<A> partial_num(total), partial_den(total);
  at::parallel_for(0, total, kItemsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t b = w / per_row;
      const Item& item = plan.items[w % per_row];
      const int64_t offset = b * plan.row[item.tensor];
      std::tie(partial_num[w], partial_den[w]) = squared_distances<T>(
          student[item.tensor].const_data_ptr<T>() + offset, start[item.tensor].const_data_ptr<T>() + offset,
          target[item.tensor].const_data_ptr<T>() + offset, item.begin, item.end);
    }
  });
  const auto options = student[0].options().dtype(c10::CppTypeToScalarType<A>::value);
  Tensor num = at::empty({plan.trajectories}, options), den = at::empty({plan.trajectories}, options);
  for (int64_t b = 0; b < plan.trajectories; ++b) {
    double num_b = 0, den_b = 0;
    for (int64_t k = b * per_row; k < (b + 1) * per_row; ++k) {
      num_b += partial_num[k];
      den_b += partial_den[k];
    }
    num.data_ptr<A>()[b] = static_cast<A>(num_b);
    den.data_ptr<A>()[b] = static_cast<A>(den_b);
  }
  return {num, den};
}

// Output pointers of one row: nullptr where that gradient is not wanted.
template <typename T>
struct GradRow {
  T *student, *start, *target;
};

template <typename T>
void gradients(const T* s, const T* st, const T* t, GradRow<T> out, Acc<T> a, Acc<T> c, int64_t begin, int64_t end) {
  using A = Acc<T>;
  constexpr int64_t width = Vec<T>::size();
  const bool read_start = out.start != nullptr || out.target != nullptr;
  const Vec<A> va(a), vc(c);
  int64_t j = begin;
  for (; j + width <= end; j += width) {
    const Lanes<T> vs = load_acc(s + j), vt = load_acc(t + j);
    Lanes<T> vst = read_start ? load_acc(st + j) : vt;
    Lanes<T> ds, dst, dt;
    for (int p = 0; p < kParts<T>; ++p) {
      ds[p] = va * (vs[p] - vt[p]);
      dst[p] = vc * (vt[p] - vst[p]);
      dt[p] = Vec<A>(0) - ds[p] - dst[p];
    }
    if (out.student) store_acc(out.student + j, ds);
    if (out.start) store_acc(out.start + j, dst);
    if (out.target) store_acc(out.target + j, dt);
  }
  for (; j < end; ++j) {
    const A ds = a * (A(s[j]) - A(t[j]));
    const A dst = read_start ? c * (A(t[j]) - A(st[j])) : A(0);
    if (out.student) out.student[j] = static_cast<T>(ds);
    if (out.start) out.start[j] = static_cast<T>(dst);
    if (out.target) out.target[j] = static_cast<T>(-ds - dst);
  }
}

template <typename T>
std::vector<Tensor> backward_typed(const Plan& plan, const Tensor& grad, const Tensor& loss, const Tensor& den,
                                   at::TensorList student, at::TensorList start, at::TensorList target,
                                   const std::vector<char>& needs) {
  using A = Acc<T>;
  const size_t n = student.size();
  // grads[which * n + i]: an output tensor where wanted, undefined otherwise
  std::vector<Tensor> grads(3 * n);
  for (size_t k = 0; k < 3 * n; ++k) {
    if (needs[k]) grads[k] = at::empty_like(student[k % n]);
  }
  const auto pointer = [&](size_t k) { return grads[k].defined() ? grads[k].mutable_data_ptr<T>() : nullptr; };
  const Tensor g = grad.contiguous(), l = loss.contiguous(), d = den.contiguous();
  const A *g_ptr = g.const_data_ptr<A>(), *l_ptr = l.const_data_ptr<A>(), *d_ptr = d.const_data_ptr<A>();
  const int64_t per_row = static_cast<int64_t>(plan.items.size());
  at::parallel_for(0, plan.trajectories * per_row, kItemsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t b = w / per_row;
      const Item& item = plan.items[w % per_row];
      const size_t i = static_cast<size_t>(item.tensor);
      if (!needs[i] && !needs[n + i] && !needs[2 * n + i]) continue;
      const int64_t offset = b * plan.row[i];
      const auto at_row = [&](T* p) { return p ? p + offset : nullptr; };
      const A a = A(2) * g_ptr[b] / d_ptr[b];
      gradients<T>(student[i].const_data_ptr<T>() + offset, start[i].const_data_ptr<T>() + offset,
                   target[i].const_data_ptr<T>() + offset,
                   {at_row(pointer(i)), at_row(pointer(n + i)), at_row(pointer(2 * n + i))}, a, a * l_ptr[b],
                   item.begin, item.end);
    }
  });
  std::vector<Tensor> wanted;
  for (Tensor& x : grads) {
    if (x.defined()) wanted.push_back(std::move(x));
  }
  return wanted;
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
                             at::TensorList start, at::TensorList target, const c10::List<bool>& need_flags) {
  const Plan plan = make_plan(student, start, target, grad.numel());
  TORCH_CHECK(need_flags.size() == 3 * student.size(), "trajectory_mse backward: needs must hold 3 flags per tensor");
  const std::vector<char> needs(need_flags.begin(), need_flags.end());
  const auto acc = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_per_trajectory(grad, "grad", plan.trajectories, acc);
  check_per_trajectory(loss, "loss", plan.trajectories, acc);
  check_per_trajectory(den, "den", plan.trajectories, acc);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "trajectory_mse_backward_cpu", [&] {
    return backward_typed<scalar_t>(plan, grad, loss, den, student, start, target, needs);
  });
}

}  // namespace

TORCH_LIBRARY(ddfast_trajectory_mse_cpu, m) {
  m.def("forward(Tensor[] student, Tensor[] start, Tensor[] target, int trajectories) -> (Tensor, Tensor)", &forward);
  m.def("backward(Tensor grad, Tensor loss, Tensor den, Tensor[] student, Tensor[] start, Tensor[] target, bool[] needs) -> Tensor[]",
        &backward);
}
