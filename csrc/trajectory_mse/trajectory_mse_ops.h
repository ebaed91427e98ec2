// The trajectory_mse kernels' contract, shared by trajectory_mse_cpu.cpp and trajectory_mse_cuda.cu
// (same names, same schemas).
//
// Inputs are three lists (student, start, target) of contiguous tensors of one dtype on one device,
// tensor i seen as a (B, n_i) matrix (n_i = numel / B), and B. Sums run in the accumulation type
// (common/accumulate.h) over chunks of bounded length, whose partials each trajectory adds in double in
// a fixed order: the rounding error is bounded by the chunk length, not by P, and does not depend on
// scheduling.
//
//   forward(student, start, target, B) -> (num, den)      (B,) sums of squares, accumulation type
//   backward(grad, loss, den, student, start, target, needs) -> the gradients flagged in `needs`
//     (3n flags: student's tensors, then start's, then target's), in that order.
// With a = 2 grad_b / den_b and c = a * loss_b:
//   d student = a (student - target),  d start = -c (start - target),  d target = -(d student + d start).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "common/tensor_list.h"

namespace ddfast::trajectory_mse {

// Checks the three lists (common/tensor_list.h) and returns each tensor's row length n_i.
inline std::vector<int64_t> check_lists(at::TensorList student, at::TensorList start, at::TensorList target, int64_t trajectories,
                                        c10::DeviceType device) {
  return check_tensor_lists("trajectory_mse", {{"student", student}, {"start", start}, {"target", target}}, trajectories, device);
}

// One output per flag of `needs`, shaped as its input where the flag is set, undefined otherwise.
inline std::vector<at::Tensor> gradient_outputs(at::TensorList student, const c10::List<bool>& needs) {
  const size_t n = student.size();
  TORCH_CHECK(needs.size() == 3 * n, "trajectory_mse backward: needs must hold 3 flags per tensor");
  std::vector<at::Tensor> grads(3 * n);
  for (size_t k = 0; k < 3 * n; ++k) {
    if (needs.get(k)) grads[k] = at::empty_like(student[k % n]);
  }
  return grads;
}

// The defined outputs of gradient_outputs, in order: what backward returns.
inline std::vector<at::Tensor> wanted(std::vector<at::Tensor> grads) {
  std::vector<at::Tensor> result;
  for (at::Tensor& x : grads) {
    if (x.defined()) result.push_back(std::move(x));
  }
  return result;
}

}  // namespace ddfast::trajectory_mse

// Registers the two kernels of ddfast::trajectory_mse on `m` (each source defines them for its device).
#define DDFAST_TRAJECTORY_MSE_DEFINE_KERNELS(m)                                                                            \
  m.def("forward(Tensor[] student, Tensor[] start, Tensor[] target, int trajectories) -> (Tensor, Tensor)",                \
        &ddfast::trajectory_mse::forward);                                                                                 \
  m.def("backward(Tensor grad, Tensor loss, Tensor den, Tensor[] student, Tensor[] start, Tensor[] target, bool[] needs) " \
        "-> Tensor[]",                                                                                                     \
        &ddfast::trajectory_mse::backward)
