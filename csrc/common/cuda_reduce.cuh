// Warp reductions for the CUDA kernels, in a fixed order: results do not depend on scheduling.
#pragma once

namespace ddfast {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The sum of v over each group of `Width` consecutive lanes (a power of two, at most a warp) by a
// butterfly; the whole warp takes part. Partners add the same two values, so every lane of a group
// ends with the same sum, which lane 0 forms as a shuffle-down tree would: ((v0 + v16) + (v8 + v24)) + ...
template <int Width = kWarpSize, typename T>
__device__ __forceinline__ T warp_sum(T v) {
  static_assert(Width > 0 && Width <= kWarpSize && (Width & (Width - 1)) == 0, "Width must be a power of two up to a warp");
  for (int offset = Width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset, Width);
  return v;
}

}  // namespace ddfast
