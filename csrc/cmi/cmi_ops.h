// The CMI kernels' contract, shared by cmi_cpu.cpp and cmi_cuda.cu (same names, same schemas).
//
// Notation (ddfast/ops/cmi): f = features, inv_t = 1 / temperature; norm (N, 2) = each row's max
// of f and log sum exp((f - max) * inv_t); x = (f - max) * inv_t - log-sum = log P (the differences
// f - max are exact at and near the row's largest entry, so the largest probabilities keep full
// precision whether or not the compiler fuses the multiply and subtract);
// log_q (C, K) = log of each class's mean softmax, g (N,) = per-sample upstream gradients.
// Rows of a class are reduced in chunks (ddfast/ops/cmi/segments.py): chunk j holds the rows
// order[start[j]:end[j]], all of class cls[j]; class c owns chunks first[c]:first[c+1]. Every
// reduction runs in a fixed order, so results depend neither on thread counts nor on scheduling.
//
// Kernels (inputs contiguous; features float / double / bfloat16 / half; acc = the accumulation
// type of common/accumulate.h; index tensors int64):
//   row_norm(features, inv_t) -> norm (N, 2) acc; norm[i, 1] is nan when row i holds a nan or an inf
//   chunk_norm(features, order, start, end, inv_t) -> (norm (N, 2) acc as row_norm's, partial (M, K) acc)
//       partial[j, k] = logsumexp of x_ik over the rows i of chunk j
//   combine_lse(partial, first, counts) -> log_q (C, K) acc: logsumexp over a class's chunks
//       minus log n_c; -inf for absent classes
//   row_kl(features, labels, norm, log_q, inv_t) -> kl (N,) acc: sum_k P (x - log_q[y]), 0 where P = 0
//   chunk_centroid_grad(features, order, start, end, cls, norm, log_q, g, inv_t) -> partial (M, K) acc
//       partial[j, k] = sum over chunk j's rows of g_i exp(x_ik - log_q[cls_j, k]), terms with x_ik = -inf
//       taken as 0 (log_q may be -inf there too; row_grad multiplies a by P = 0 in those columns)
//   combine_mean(partial, first, counts) -> a (C, K) acc: sum over a class's chunks / n_c (0 if absent)
//   row_grad(features, labels, norm, log_q, kl, g, a?, inv_t) -> grad (N, K) in the features' dtype
//       grad = inv_t * P * (g (x - log_q[y] - kl) - a[y] + sum_k P a[y]), 0 where P = 0
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <limits>
#include <optional>

#include "common/accumulate.h"
#include "common/checks.h"

namespace ddfast::cmi {

template <typename T>
C10_HOST_DEVICE constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

inline void check_features(const at::Tensor& features, c10::DeviceType device) {
  DDFAST_CHECK_DEVICE(features, device);
  DDFAST_CHECK_DIM(features, 2);
  DDFAST_CHECK_CONTIGUOUS(features);
}

// An (N,) tensor in the accumulation dtype, one value per row of features.
inline void check_per_row(const at::Tensor& t, const char* name, const at::Tensor& features) {
  check_like(t, name, features, acc_dtype(features), features.size(0));
}

inline void check_chunks(const at::Tensor& features, const at::Tensor& order, const at::Tensor& start, const at::Tensor& end) {
  check_like(order, "order", features, at::kLong, features.size(0));
  check_like(start, "start", features, at::kLong, start.numel());
  check_like(end, "end", features, at::kLong, start.numel());
}

inline void check_class_stats(const at::Tensor& features, const at::Tensor& norm, const at::Tensor& log_q) {
  check_like(norm, "norm", features, acc_dtype(features), 2 * features.size(0));
  TORCH_CHECK(log_q.dim() == 2 && log_q.size(1) == features.size(1), "log_q must have shape (C, ", features.size(1), ")");
  check_like(log_q, "log_q", features, acc_dtype(features), log_q.numel());
}

inline void check_combine(const at::Tensor& partial, const at::Tensor& first, const at::Tensor& counts, c10::DeviceType device) {
  check_features(partial, device);
  TORCH_CHECK(partial.scalar_type() == at::kFloat || partial.scalar_type() == at::kDouble, "partial must be float or double");
  check_like(counts, "counts", partial, at::kLong, counts.numel());
  check_like(first, "first", partial, at::kLong, counts.numel() + 1);
}

// The arguments of the kernels that read per-row or per-class statistics.
inline void check_row_kl(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& norm, const at::Tensor& log_q,
                         c10::DeviceType device) {
  check_features(features, device);
  check_like(labels, "labels", features, at::kLong, features.size(0));
  check_class_stats(features, norm, log_q);
}

inline void check_chunk_centroid_grad(const at::Tensor& features, const at::Tensor& order, const at::Tensor& start, const at::Tensor& end,
                                      const at::Tensor& cls, const at::Tensor& norm, const at::Tensor& log_q, const at::Tensor& g,
                                      c10::DeviceType device) {
  check_features(features, device);
  check_chunks(features, order, start, end);
  check_like(cls, "cls", features, at::kLong, start.numel());
  check_class_stats(features, norm, log_q);
  check_per_row(g, "g", features);
}

inline void check_row_grad(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& norm, const at::Tensor& log_q,
                           const at::Tensor& kl, const at::Tensor& g, const std::optional<at::Tensor>& a, c10::DeviceType device) {
  check_row_kl(features, labels, norm, log_q, device);
  check_per_row(kl, "kl", features);
  check_per_row(g, "g", features);
  if (a.has_value()) check_like(*a, "a", features, acc_dtype(features), log_q.numel());
}

}  // namespace ddfast::cmi

// Registers the seven kernels of ddfast::cmi on `m` (each source defines them for its device).
#define DDFAST_CMI_DEFINE_KERNELS(m)                                                                             \
  m.def("row_norm(Tensor features, float inv_t) -> Tensor",                                                      \
        &ddfast::cmi::row_norm);                                                                                 \
  m.def("chunk_norm(Tensor features, Tensor order, Tensor start, Tensor end, float inv_t) -> (Tensor, Tensor)",  \
        &ddfast::cmi::chunk_norm);                                                                               \
  m.def("combine_lse(Tensor partial, Tensor first, Tensor counts) -> Tensor",                                    \
        &ddfast::cmi::combine_lse);                                                                              \
  m.def("row_kl(Tensor features, Tensor labels, Tensor norm, Tensor log_q, float inv_t) -> Tensor",              \
        &ddfast::cmi::row_kl);                                                                                   \
  m.def("chunk_centroid_grad(Tensor features, Tensor order, Tensor start, Tensor end, Tensor cls, Tensor norm, " \
        "Tensor log_q, Tensor g, float inv_t) -> Tensor",                                                        \
        &ddfast::cmi::chunk_centroid_grad);                                                                      \
  m.def("combine_mean(Tensor partial, Tensor first, Tensor counts) -> Tensor",                                   \
        &ddfast::cmi::combine_mean);                                                                             \
  m.def("row_grad(Tensor features, Tensor labels, Tensor norm, Tensor log_q, Tensor kl, Tensor g, Tensor? a, "   \
        "float inv_t) -> Tensor",                                                                                \
        &ddfast::cmi::row_grad)
