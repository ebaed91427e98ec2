// Argument checks shared by the compiled kernels. The Python layer validates user input with clear
// messages first; these guard the kernels' own contract (contiguity, dtype, device) when called directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define DDFAST_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define DDFAST_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got ", (x).dim())
#define DDFAST_CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
#define DDFAST_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())

namespace ddfast {

// `t` is a contiguous tensor on `like`'s device with dtype `dtype` and `numel` elements.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, name, " must be a contiguous ", dtype,
              " tensor of ", numel, " elements, got ", t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace ddfast
