// The tile transforms of the Winograd convolution F(4x4, 3x3) on the CPU (Lavin & Gray 2016).
//
// A 3x3 convolution (stride 1, zero padding `pad`) of x (N, H, W, C) to y (N, Ho, Wo, O) is, per 4x4 output
// tile t: y_t = A^T [ sum_c (G w G^T) (.) (B^T d_t B) ] A, with d_t the tile's 6x6 input patch. These kernels
// compute the two transforms of the patches and their adjoints (so that each one's gradient is the other):
//
//   input(x)            (N, H, W, C) -> V (T, 36, C)   V[t, 6a + b] = (B^T d_t B)[a, b]
//   input_adjoint(V)    (T, 36, C) -> (N, H, W, C)     the sum over the tiles of B V_t B^T at each patch's place
//   output(M)           (T, 36, O) -> (N, Ho, Wo, O)   A^T M_t A, cropped to Ho x Wo
//   output_adjoint(gy)  (N, Ho, Wo, O) -> (T, 36, O)   A gy_t A^T, gy zero beyond Ho x Wo
//
// with T = N * th * tw tiles in (n, row, column) order, th = ceil(Ho / 4), tw = ceil(Wo / 4); tile (i, j)'s
// patch starts at input row 4i - pad and column 4j - pad (zero outside x). Channels are the innermost
// (contiguous) dimension everywhere, so the loops over them vectorise. float32 and float64.

#include "common/cpu_vec.h"  // before ATen's vector headers

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ddfast::winograd {
namespace {

using at::Tensor;

// The 1-D transforms on vectors of channels. B^T d: 6 values to 6 (the rows of B^T are the taps).
template <typename V>
inline void bt6(const V d[6], V r[6]) {
  const V two(2), four(4), five(5);
  r[0] = four * d[0] - five * d[2] + d[4];
  r[1] = d[3] + d[4] - four * (d[1] + d[2]);
  r[2] = four * (d[1] - d[2]) - d[3] + d[4];
  r[3] = two * (d[3] - d[1]) - d[2] + d[4];
  r[4] = two * (d[1] - d[3]) - d[2] + d[4];
  r[5] = four * d[1] - five * d[3] + d[5];
}

// B g, the adjoint of bt6.
template <typename V>
inline void b6(const V g[6], V r[6]) {
  const V two(2), four(4), five(5);
  r[0] = four * g[0];
  r[1] = four * (g[2] - g[1] + g[5]) + two * (g[4] - g[3]);
  r[2] = V(0) - five * g[0] - four * (g[1] + g[2]) - g[3] - g[4];
  r[3] = g[1] - g[2] + two * (g[3] - g[4]) - five * g[5];
  r[4] = g[0] + g[1] + g[2] + g[3] + g[4];
  r[5] = g[5];
}

// A^T m: 6 values to 4.
template <typename V>
inline void at4(const V m[6], V r[4]) {
  const V two(2), four(4), eight(8);
  r[0] = m[0] + m[1] + m[2] + m[3] + m[4];
  r[1] = m[1] - m[2] + two * (m[3] - m[4]);
  r[2] = m[1] + m[2] + four * (m[3] + m[4]);
  r[3] = m[1] - m[2] + eight * (m[3] - m[4]) + m[5];
}

// A g, the adjoint of at4: 4 values to 6.
template <typename V>
inline void a6(const V g[4], V r[6]) {
  const V two(2), four(4), eight(8);
  r[0] = g[0];
  r[1] = g[0] + g[1] + g[2] + g[3];
  r[2] = g[0] - g[1] + g[2] - g[3];
  r[3] = g[0] + two * g[1] + four * g[2] + eight * g[3];
  r[4] = g[0] - two * g[1] + four * g[2] - eight * g[3];
  r[5] = g[3];
}

struct Tiles {
  int64_t n, th, tw;
  int64_t count() const { return n * th * tw; }
};

Tiles tiles_of(int64_t n, int64_t out_h, int64_t out_w) { return {n, (out_h + 3) / 4, (out_w + 3) / 4}; }

template <typename T>
void input_kernel(const T* x, T* v, int64_t H, int64_t W, int64_t C, int64_t pad, Tiles tiles) {
  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(36 * C);  // [a][j][c]: B^T applied down each patch column
    const std::vector<T> zeros(C, T(0));  // what a patch reads outside x
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tiles.th * tiles.tw), i0 = (t / tiles.tw) % tiles.th * 4 - pad, j0 = t % tiles.tw * 4 - pad;
      for (int64_t j = 0; j < 6; ++j) {
        const T* column[6];
        const bool inside_w = j0 + j >= 0 && j0 + j < W;
        for (int64_t i = 0; i < 6; ++i) {
          const bool inside = inside_w && i0 + i >= 0 && i0 + i < H;
          column[i] = inside ? x + ((n * H + i0 + i) * W + j0 + j) * C : zeros.data();
        }
        T* out = rows.data() + j * C;
        for (int64_t c = 0; c < C; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), C - c));
          Vec<T> d[6], r[6];
          for (int i = 0; i < 6; ++i) d[i] = Vec<T>::loadu(column[i] + c, count);
          bt6(d, r);
          for (int k = 0; k < 6; ++k) r[k].store(out + k * 6 * C + c, count);
        }
      }
      T* tile = v + t * 36 * C;
      for (int64_t k = 0; k < 6; ++k) {
        const T* row = rows.data() + k * 6 * C;
        T* out = tile + k * 6 * C;
        for (int64_t c = 0; c < C; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), C - c));
          Vec<T> d[6], r[6];
          for (int j = 0; j < 6; ++j) d[j] = Vec<T>::loadu(row + j * C + c, count);
          bt6(d, r);
          for (int l = 0; l < 6; ++l) r[l].store(out + l * C + c, count);
        }
      }
    }
  });
}

template <typename T>
void input_adjoint_kernel(const T* v, T* gx, int64_t H, int64_t W, int64_t C, int64_t pad, Tiles tiles) {
  // Patches of neighbouring tiles overlap, those of different images do not: one image per task.
  at::parallel_for(0, tiles.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(36 * C);  // [k][j][c]: B applied along each row of the tile's values
    std::vector<T> discard(C);    // where the patch's rows outside x go
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t t = n * tiles.th * tiles.tw; t < (n + 1) * tiles.th * tiles.tw; ++t) {
        const int64_t i0 = (t / tiles.tw) % tiles.th * 4 - pad, j0 = t % tiles.tw * 4 - pad;
        const T* tile = v + t * 36 * C;
        for (int64_t k = 0; k < 6; ++k) {
          const T* in = tile + k * 6 * C;
          T* out = rows.data() + k * 6 * C;
          for (int64_t c = 0; c < C; c += Vec<T>::size()) {
            const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), C - c));
            Vec<T> g[6], r[6];
            for (int l = 0; l < 6; ++l) g[l] = Vec<T>::loadu(in + l * C + c, count);
            b6(g, r);
            for (int j = 0; j < 6; ++j) r[j].store(out + j * C + c, count);
          }
        }
        for (int64_t j = 0; j < 6; ++j) {
          if (j0 + j < 0 || j0 + j >= W) continue;
          T* column[6];
          for (int64_t i = 0; i < 6; ++i) {
            const bool inside = i0 + i >= 0 && i0 + i < H;
            column[i] = inside ? gx + ((n * H + i0 + i) * W + j0 + j) * C : discard.data();
          }
          const T* in = rows.data() + j * C;
          for (int64_t c = 0; c < C; c += Vec<T>::size()) {
            const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), C - c));
            Vec<T> g[6], r[6];
            for (int k = 0; k < 6; ++k) g[k] = Vec<T>::loadu(in + k * 6 * C + c, count);
            b6(g, r);
            for (int i = 0; i < 6; ++i) (Vec<T>::loadu(column[i] + c, count) + r[i]).store(column[i] + c, count);
          }
        }
      }
    }
  });
}

template <typename T>
void output_kernel(const T* m, T* y, int64_t Ho, int64_t Wo, int64_t O, Tiles tiles) {
  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(24 * O);  // [a][q][c]: A^T applied along each row of the tile's values
    std::vector<T> discard(O);    // where the tile's rows beyond y go
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tiles.th * tiles.tw), i0 = (t / tiles.tw) % tiles.th * 4, j0 = t % tiles.tw * 4;
      const T* tile = m + t * 36 * O;
      for (int64_t k = 0; k < 6; ++k) {
        const T* in = tile + k * 6 * O;
        T* out = rows.data() + k * 4 * O;
        for (int64_t c = 0; c < O; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), O - c));
          Vec<T> g[6], r[4];
          for (int l = 0; l < 6; ++l) g[l] = Vec<T>::loadu(in + l * O + c, count);
          at4(g, r);
          for (int q = 0; q < 4; ++q) r[q].store(out + q * O + c, count);
        }
      }
      for (int64_t q = 0; q < 4 && j0 + q < Wo; ++q) {
        T* column[4];
        for (int64_t p = 0; p < 4; ++p) column[p] = i0 + p < Ho ? y + ((n * Ho + i0 + p) * Wo + j0 + q) * O : discard.data();
        const T* in = rows.data() + q * O;
        for (int64_t c = 0; c < O; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), O - c));
          Vec<T> g[6], r[4];
          for (int k = 0; k < 6; ++k) g[k] = Vec<T>::loadu(in + k * 4 * O + c, count);
          at4(g, r);
          for (int p = 0; p < 4; ++p) r[p].store(column[p] + c, count);
        }
      }
    }
  });
}

template <typename T>
void output_adjoint_kernel(const T* gy, T* gm, int64_t Ho, int64_t Wo, int64_t O, Tiles tiles) {
  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(24 * O);  // [a][q][c]: A applied down each column of the tile's gradient
    const std::vector<T> zeros(O, T(0));  // the gradient beyond y
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tiles.th * tiles.tw), i0 = (t / tiles.tw) % tiles.th * 4, j0 = t % tiles.tw * 4;
      for (int64_t q = 0; q < 4; ++q) {
        const T* column[4];
        for (int64_t p = 0; p < 4; ++p) {
          const bool inside = i0 + p < Ho && j0 + q < Wo;
          column[p] = inside ? gy + ((n * Ho + i0 + p) * Wo + j0 + q) * O : zeros.data();
        }
        T* out = rows.data() + q * O;
        for (int64_t c = 0; c < O; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), O - c));
          Vec<T> g[4], r[6];
          for (int p = 0; p < 4; ++p) g[p] = Vec<T>::loadu(column[p] + c, count);
          a6(g, r);
          for (int k = 0; k < 6; ++k) r[k].store(out + k * 4 * O + c, count);
        }
      }
      T* tile = gm + t * 36 * O;
      for (int64_t k = 0; k < 6; ++k) {
        const T* in = rows.data() + k * 4 * O;
        T* out = tile + k * 6 * O;
        for (int64_t c = 0; c < O; c += Vec<T>::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), O - c));
          Vec<T> g[4], r[6];
          for (int q = 0; q < 4; ++q) g[q] = Vec<T>::loadu(in + q * O + c, count);
          a6(g, r);
          for (int l = 0; l < 6; ++l) r[l].store(out + l * O + c, count);
        }
      }
    }
  });
}

void check_input(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "winograd: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, "winograd: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "winograd: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// x (N, H, W, C) -> V (T, 36, C) for output size (Ho, Wo).
Tensor input(const Tensor& x, int64_t pad, int64_t out_h, int64_t out_w) {
  check_input(x, "x", 4);
  const Tensor xc = x.contiguous();
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  const Tiles tiles = tiles_of(x.size(0), out_h, out_w);
  Tensor v = at::empty({tiles.count(), 36, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input",
                             [&] { input_kernel(xc.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), H, W, C, pad, tiles); });
  return v;
}

// V (T, 36, C) -> (N, H, W, C).
Tensor input_adjoint(const Tensor& v, int64_t n, int64_t height, int64_t width, int64_t pad, int64_t out_h, int64_t out_w) {
  check_input(v, "v", 3);
  const Tiles tiles = tiles_of(n, out_h, out_w);
  TORCH_CHECK(v.size(0) == tiles.count() && v.size(1) == 36, "winograd: v must be (", tiles.count(), ", 36, C), got ", v.sizes());
  const Tensor vc = v.contiguous();
  const int64_t C = v.size(2);
  Tensor gx = at::zeros({n, height, width, C}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "winograd_input_adjoint", [&] {
    input_adjoint_kernel(vc.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), height, width, C, pad, tiles);
  });
  return gx;
}

// M (T, 36, O) -> y (N, Ho, Wo, O).
Tensor output(const Tensor& m, int64_t n, int64_t out_h, int64_t out_w) {
  check_input(m, "m", 3);
  const Tiles tiles = tiles_of(n, out_h, out_w);
  TORCH_CHECK(m.size(0) == tiles.count() && m.size(1) == 36, "winograd: m must be (", tiles.count(), ", 36, O), got ", m.sizes());
  const Tensor mc = m.contiguous();
  const int64_t O = m.size(2);
  Tensor y = at::empty({n, out_h, out_w, O}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "winograd_output",
                             [&] { output_kernel(mc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out_h, out_w, O, tiles); });
  return y;
}

// gy (N, Ho, Wo, O) -> (T, 36, O).
Tensor output_adjoint(const Tensor& gy) {
  check_input(gy, "gy", 4);
  const Tensor gc = gy.contiguous();
  const int64_t Ho = gy.size(1), Wo = gy.size(2), O = gy.size(3);
  const Tiles tiles = tiles_of(gy.size(0), Ho, Wo);
  Tensor gm = at::empty({tiles.count(), 36, O}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "winograd_output_adjoint",
                             [&] { output_adjoint_kernel(gc.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), Ho, Wo, O, tiles); });
  return gm;
}

}  // namespace
}  // namespace ddfast::winograd

TORCH_LIBRARY(ddfast_winograd_cpu, m) {
  m.def("input(Tensor x, int pad, int out_h, int out_w) -> Tensor", &ddfast::winograd::input);
  m.def("input_adjoint(Tensor v, int n, int height, int width, int pad, int out_h, int out_w) -> Tensor",
        &ddfast::winograd::input_adjoint);
  m.def("output(Tensor m, int n, int out_h, int out_w) -> Tensor", &ddfast::winograd::output);
  m.def("output_adjoint(Tensor gy) -> Tensor", &ddfast::winograd::output_adjoint);
}
