// Lists of tensors that a multi-tensor kernel reads index by index, checked against its contract.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace ddfast {

struct NamedTensorList {
  const char* name;
  at::TensorList tensors;
};

// Checks that `lists` hold the same number of tensors, at least one; that every tensor is contiguous,
// aligned to its element size, of the first tensor's dtype, on the first tensor's device (of type
// `device`) and of the shape of the first list's tensor at its index; and that each splits into `rows`
// rows. Returns the row length numel / rows at each index.
inline std::vector<int64_t> check_tensor_lists(const char* op, std::initializer_list<NamedTensorList> lists, int64_t rows,
                                               c10::DeviceType device) {
  const NamedTensorList& first = *lists.begin();
  TORCH_CHECK(!first.tensors.empty(), op, ": ", first.name, " is empty");
  for (const NamedTensorList& list : lists) {
    TORCH_CHECK(list.tensors.size() == first.tensors.size(), op, ": ", list.name, " must hold as many tensors as ", first.name,
                " (", first.tensors.size(), "), got ", list.tensors.size());
  }
  TORCH_CHECK(rows > 0, op, ": the number of rows must be positive, got ", rows);
  const at::Tensor& like = first.tensors[0];
  std::vector<int64_t> row_lengths;
  row_lengths.reserve(first.tensors.size());
  for (size_t i = 0; i < first.tensors.size(); ++i) {
    for (const NamedTensorList& list : lists) {
      const at::Tensor& x = list.tensors[i];
      TORCH_CHECK(x.device().type() == device, op, ": ", list.name, "[", i, "] must be on ", device, ", got ", x.device());
      TORCH_CHECK(x.device() == like.device(), op, ": all tensors must be on one device; ", list.name, "[", i, "] is on ",
                  x.device(), ", ", first.name, "[0] on ", like.device());
      TORCH_CHECK(x.is_contiguous(), op, ": ", list.name, "[", i, "] must be contiguous");
      TORCH_CHECK(x.scalar_type() == like.scalar_type(), op, ": ", list.name, "[", i, "] must be ", like.scalar_type(), ", got ",
                  x.scalar_type());
      TORCH_CHECK(x.sizes() == first.tensors[i].sizes(), op, ": ", list.name, "[", i, "] must have shape ", first.tensors[i].sizes(),
                  ", got ", x.sizes());
      // element-aligned: kernels may then pick wider accesses where the address allows
      TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % x.element_size() == 0, op, ": ", list.name, "[", i,
                  "] is not aligned to its element size");
    }
    TORCH_CHECK(first.tensors[i].numel() % rows == 0, op, ": tensor ", i, " (", first.tensors[i].numel(),
                " elements) does not split into ", rows, " rows");
    row_lengths.push_back(first.tensors[i].numel() / rows);
  }
  return row_lengths;
}

}  // namespace ddfast
