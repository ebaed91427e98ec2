// The type the kernels accumulate in: float32 for float32 / bfloat16 / float16 inputs, float64 for
// float64 inputs. acc_t<scalar_t> in kernel code; acc_dtype / acc_options for the tensors that hold it.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace ddfast {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

static_assert(std::is_same_v<acc_t<double>, double> && std::is_same_v<acc_t<float>, float> &&
                  std::is_same_v<acc_t<c10::BFloat16>, float> && std::is_same_v<acc_t<c10::Half>, float>,
              "acc_t and acc_dtype must agree");

inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(const at::Tensor& like) { return acc_dtype(like.scalar_type()); }

// Options of `like` with its accumulation dtype.
inline at::TensorOptions acc_options(const at::Tensor& like) { return like.options().dtype(acc_dtype(like)); }

}  // namespace ddfast
