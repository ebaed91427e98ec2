// ATen's SIMD vector types for ddfast's CPU kernels, at the width the building machine supports, and
// the lane reductions that more than one kernel family uses.
//
// ATen picks the vector width from CPU_CAPABILITY_* macros that its own build sets per translation
// unit; an extension must set them itself or it gets the scalar fallback. ddfast's extensions are
// compiled for the building machine (-march, see ddfast/_extension.py), so the compiler's target
// macros tell which instruction set is safe to use. This header must therefore come before any of
// ATen's vector headers (ATen/cpu/vec/...), which it includes itself.
#pragma once

#if defined(VECTOR_WIDTH)
#error "common/cpu_vec.h must be included before ATen's vector headers, which fix the vector width"
#endif

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <numeric>

namespace ddfast {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// v's lanes, lane 0 first.
template <typename T>
std::array<T, Vec<T>::size()> lanes(const Vec<T>& v) {
  std::array<T, Vec<T>::size()> values;
  v.store(values.data());
  return values;
}

// The sum of v's lanes, added one by one from lane 0.
template <typename T>
T lane_sum(const Vec<T>& v) {
  const auto values = lanes(v);
  return std::accumulate(values.begin(), values.end(), T(0));
}

}  // namespace ddfast
