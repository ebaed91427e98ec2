// The networks' first block on the CPU in one pass per image: a few-channel convolution (stride 1, zero padding),
// instance norm (affine), ReLU and a k x k average pool, forward and backward.
//
//   forward(x (N, C, H, W), weight (O, C, kh, kw), bias, gamma, beta (O), ph, pw, k, eps)
//       -> out (N, Ho / k, Wo / k, O) channels innermost, mean and rstd (N, O): the norm's statistics
//   backward(grad (N, Ho / k, Wo / k, O), x, weight, bias, gamma, mean, rstd, ph, pw, k, need_x)
//       -> grad_x (N, C, H, W) (empty unless need_x), grad_weight, grad_bias, grad_gamma, grad_beta
//
// with Ho = H + 2 ph - kh + 1 and Wo likewise, both divisible by k. Each image's convolution output for a vector of
// output channels stays in a per-thread buffer (Ho x Wo vectors) through the statistics, the ReLU and the pool; the
// backward recomputes it from the (small) input instead of reading saved maps. float32 and float64.

#include "common/cpu_vec.h"  // before ATen's vector headers

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace ddfast::conv_block {
namespace {

using at::Tensor;

struct Shape {
  int64_t n, c, h, w, o, kh, kw, ph, pw, k;
  int64_t hp() const { return h + 2 * ph; }  // the padded input
  int64_t wp() const { return w + 2 * pw; }
  int64_t ho() const { return hp() - kh + 1; }  // the convolution's output
  int64_t wo() const { return wp() - kw + 1; }
  int64_t taps() const { return c * kh * kw; }
};

// Image n of x, zero-padded: (C, hp, wp).
template <typename T>
void pad_image(const T* x, const Shape& s, int64_t n, std::vector<T>& padded) {
  padded.assign(s.c * s.hp() * s.wp(), T(0));
  for (int64_t c = 0; c < s.c; ++c) {
    for (int64_t r = 0; r < s.h; ++r) {
      const T* row = x + ((n * s.c + c) * s.h + r) * s.w;
      std::copy(row, row + s.w, padded.data() + (c * s.hp() + r + s.ph) * s.wp() + s.pw);
    }
  }
}

// The padded-input offset of each tap (c, i, j) relative to an output pixel's.
std::vector<int64_t> tap_offsets(const Shape& s) {
  std::vector<int64_t> offsets;
  for (int64_t c = 0; c < s.c; ++c)
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw; ++j) offsets.push_back((c * s.hp() + i) * s.wp() + j);
  return offsets;
}

// The convolution of one padded image for output channels [ob, ob + count): y[p] for the Ho x Wo output pixels p.
// kTaps > 0: that many taps, known to the compiler (the weight vectors stay in registers); 0: offsets.size().
template <int kTaps, typename T>
void convolve_taps(const T* padded, const T* taps, const T* bias, const Shape& s, const std::vector<int64_t>& offsets, int64_t ob,
                   int count, Vec<T>* y) {
  const int64_t n_taps = kTaps > 0 ? kTaps : static_cast<int64_t>(offsets.size());
  std::vector<Vec<T>> w(n_taps);
  for (int64_t t = 0; t < n_taps; ++t) w[t] = Vec<T>::loadu(taps + t * s.o + ob, count);
  const Vec<T> b = Vec<T>::loadu(bias + ob, count);
  for (int64_t r = 0; r < s.ho(); ++r) {
    for (int64_t q = 0; q < s.wo(); ++q) {
      const T* at = padded + r * s.wp() + q;
      Vec<T> acc = b;
      if constexpr (kTaps > 0) {
        Vec<T> fixed[kTaps];
        for (int t = 0; t < kTaps; ++t) fixed[t] = w[t];
        for (int t = 0; t < kTaps; ++t) acc = at::vec::fmadd(fixed[t], Vec<T>(at[offsets[t]]), acc);
      } else {
        for (int64_t t = 0; t < n_taps; ++t) acc = at::vec::fmadd(w[t], Vec<T>(at[offsets[t]]), acc);
      }
      y[r * s.wo() + q] = acc;
    }
  }
}

template <typename T>
void convolve(const T* padded, const T* taps, const T* bias, const Shape& s, const std::vector<int64_t>& offsets, int64_t ob, int count,
              Vec<T>* y) {
  if (offsets.size() == 9) return convolve_taps<9>(padded, taps, bias, s, offsets, ob, count, y);  // one channel, 3 x 3
  convolve_taps<0>(padded, taps, bias, s, offsets, ob, count, y);
}

// weight (O, C, kh, kw) as taps (C kh kw, O): a tap's weights over the output channels are contiguous.
template <typename T>
std::vector<T> tap_major(const T* weight, const Shape& s) {
  std::vector<T> taps(s.taps() * s.o);
  for (int64_t o = 0; o < s.o; ++o)
    for (int64_t t = 0; t < s.taps(); ++t) taps[t * s.o + o] = weight[o * s.taps() + t];
  return taps;
}

template <typename T>
void forward_kernel(const T* x, const T* weight, const T* bias, const T* gamma, const T* beta, T eps, const Shape& s, T* out, T* mean,
                    T* rstd) {
  const std::vector<T> taps = tap_major(weight, s);
  const std::vector<int64_t> offsets = tap_offsets(s);
  const int64_t pixels = s.ho() * s.wo(), hq = s.ho() / s.k, wq = s.wo() / s.k;
  const T inv_pixels = T(1) / T(pixels), inv_pool = T(1) / T(s.k * s.k);
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> padded;
    std::vector<Vec<T>> y(pixels);
    for (int64_t n = begin; n < end; ++n) {
      pad_image(x, s, n, padded);
      for (int64_t ob = 0; ob < s.o; ob += Vec<T>::size()) {
        const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), s.o - ob));
        convolve(padded.data(), taps.data(), bias, s, offsets, ob, count, y.data());
        Vec<T> sum(0), squares(0);
        for (int64_t p = 0; p < pixels; ++p) sum = sum + y[p];
        const Vec<T> mu = sum * Vec<T>(inv_pixels);
        for (int64_t p = 0; p < pixels; ++p) squares = at::vec::fmadd(y[p] - mu, y[p] - mu, squares);
        const Vec<T> inv_std = (squares * Vec<T>(inv_pixels) + Vec<T>(eps)).rsqrt();
        mu.store(mean + n * s.o + ob, count);
        inv_std.store(rstd + n * s.o + ob, count);
        const Vec<T> scale = Vec<T>::loadu(gamma + ob, count) * inv_std;
        const Vec<T> shift = Vec<T>::loadu(beta + ob, count) - mu * scale;
        for (int64_t r = 0; r < hq; ++r) {
          for (int64_t q = 0; q < wq; ++q) {
            Vec<T> acc(0);
            for (int64_t a = 0; a < s.k; ++a)
              for (int64_t b = 0; b < s.k; ++b)
                acc = acc + at::vec::maximum(at::vec::fmadd(y[(r * s.k + a) * s.wo() + q * s.k + b], scale, shift), Vec<T>(0));
            (acc * Vec<T>(inv_pool)).store(out + ((n * hq + r) * wq + q) * s.o + ob, count);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* grad, const T* x, const T* weight, const T* bias, const T* gamma, const T* beta, const T* mean,
                     const T* rstd, const Shape& s, T* grad_x, T* grad_weight, T* grad_bias, T* grad_gamma, T* grad_beta) {
  const std::vector<T> taps = tap_major(weight, s);
  const std::vector<int64_t> offsets = tap_offsets(s);
  const int64_t pixels = s.ho() * s.wo(), hq = s.ho() / s.k, wq = s.wo() / s.k, ntaps = s.taps();
  const T inv_pixels = T(1) / T(pixels), inv_pool = T(1) / T(s.k * s.k);
  // per-thread sums of the parameters' gradients: [tap][o] for the weight, then bias, gamma and beta [o]
  std::vector<std::vector<T>> sums(at::get_num_threads(), std::vector<T>((ntaps + 3) * s.o, T(0)));
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& sum = sums[at::get_thread_num()];
    std::vector<T> padded, grad_padded;
    std::vector<Vec<T>> xhat(pixels), dxhat(pixels), d_weight(ntaps);
    std::vector<T> dy_all(grad_x ? pixels * s.o : 0);  // every output channel's dy, for the input's gradient
    const Vec<T> zero(0);
    for (int64_t n = begin; n < end; ++n) {
      pad_image(x, s, n, padded);
      for (int64_t ob = 0; ob < s.o; ob += Vec<T>::size()) {
        const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), s.o - ob));
        convolve(padded.data(), taps.data(), bias, s, offsets, ob, count, xhat.data());
        const Vec<T> mu = Vec<T>::loadu(mean + n * s.o + ob, count), inv_std = Vec<T>::loadu(rstd + n * s.o + ob, count);
        const Vec<T> g = Vec<T>::loadu(gamma + ob, count), b = Vec<T>::loadu(beta + ob, count);
        Vec<T> d_gamma(0), d_beta(0), mean_dxhat(0), mean_dxhat_xhat(0);
        for (int64_t r = 0; r < s.ho(); ++r) {
          for (int64_t q = 0; q < s.wo(); ++q) {
            const int64_t p = r * s.wo() + q;
            const Vec<T> xh = (xhat[p] - mu) * inv_std;
            const Vec<T> up = Vec<T>::loadu(grad + ((n * hq + r / s.k) * wq + q / s.k) * s.o + ob, count) * Vec<T>(inv_pool);
            const Vec<T> dz = Vec<T>::blendv(zero, up, at::vec::fmadd(xh, g, b) > zero);  // the ReLU passes where z > 0
            d_gamma = at::vec::fmadd(dz, xh, d_gamma);
            d_beta = d_beta + dz;
            const Vec<T> dxh = dz * g;
            mean_dxhat = mean_dxhat + dxh;
            mean_dxhat_xhat = at::vec::fmadd(dxh, xh, mean_dxhat_xhat);
            xhat[p] = xh;
            dxhat[p] = dxh;
          }
        }
        mean_dxhat = mean_dxhat * Vec<T>(inv_pixels);
        mean_dxhat_xhat = mean_dxhat_xhat * Vec<T>(inv_pixels);
        Vec<T> d_bias(0);
        std::fill(d_weight.begin(), d_weight.end(), zero);
        for (int64_t r = 0; r < s.ho(); ++r) {
          for (int64_t q = 0; q < s.wo(); ++q) {
            const int64_t p = r * s.wo() + q;
            const Vec<T> dy = inv_std * (dxhat[p] - mean_dxhat - xhat[p] * mean_dxhat_xhat);
            d_bias = d_bias + dy;
            const T* at = padded.data() + r * s.wp() + q;
            for (int64_t t = 0; t < ntaps; ++t) d_weight[t] = at::vec::fmadd(dy, Vec<T>(at[offsets[t]]), d_weight[t]);
            if (grad_x) dy.store(dy_all.data() + p * s.o + ob, count);
          }
        }
        auto add = [&](int64_t row, const Vec<T>& v) { (Vec<T>::loadu(sum.data() + row * s.o + ob, count) + v).store(sum.data() + row * s.o + ob, count); };
        for (int64_t t = 0; t < ntaps; ++t) add(t, d_weight[t]);
        add(ntaps, d_bias);
        add(ntaps + 1, d_gamma);
        add(ntaps + 2, d_beta);
      }
      if (grad_x) {  // dx at padded pixel (r + i, q + j) of channel c += sum_o w[o, c, i, j] dy[o, r, q]
        grad_padded.assign(s.c * s.hp() * s.wp(), T(0));
        for (int64_t p = 0; p < pixels; ++p) {
          const T* dy = dy_all.data() + p * s.o;
          T* at = grad_padded.data() + (p / s.wo()) * s.wp() + p % s.wo();
          for (int64_t t = 0; t < ntaps; ++t) {
            Vec<T> dot(0);
            int64_t o = 0;
            for (; o + Vec<T>::size() <= s.o; o += Vec<T>::size()) dot = at::vec::fmadd(Vec<T>::loadu(taps.data() + t * s.o + o), Vec<T>::loadu(dy + o), dot);
            T total = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, dot);
            for (; o < s.o; ++o) total += taps[t * s.o + o] * dy[o];
            at[offsets[t]] += total;
          }
        }
        for (int64_t c = 0; c < s.c; ++c)
          for (int64_t r = 0; r < s.h; ++r) {
            const T* row = grad_padded.data() + (c * s.hp() + r + s.ph) * s.wp() + s.pw;
            std::copy(row, row + s.w, grad_x + ((n * s.c + c) * s.h + r) * s.w);
          }
      }
    }
  });
  for (int64_t o = 0; o < s.o; ++o) {
    T w[3] = {0, 0, 0};
    for (const auto& sum : sums) {
      for (int64_t t = 0; t < ntaps; ++t) grad_weight[o * ntaps + t] += sum[t * s.o + o];
      for (int i = 0; i < 3; ++i) w[i] += sum[(ntaps + i) * s.o + o];
    }
    grad_bias[o] = w[0];
    grad_gamma[o] = w[1];
    grad_beta[o] = w[2];
  }
}

Shape shape_of(const Tensor& x, const Tensor& weight, int64_t ph, int64_t pw, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "conv_block: x and weight must be on the CPU");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(1) == x.size(1), "conv_block: x (N, C, H, W) and weight (O, C, kh, kw) expected, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "conv_block: x and weight must both be float32 or float64, got ", x.scalar_type(), " and ", weight.scalar_type());
  const Shape s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3), ph, pw, k};
  TORCH_CHECK(k >= 1 && s.ho() > 0 && s.wo() > 0 && s.ho() % k == 0 && s.wo() % k == 0, "conv_block: the convolution's output ", s.ho(), " x ",
              s.wo(), " must be divisible by the pool ", k);
  return s;
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& gamma, const Tensor& beta,
                                           int64_t ph, int64_t pw, int64_t k, double eps) {
  const Shape s = shape_of(x, weight, ph, pw, k);
  const Tensor xc = x.contiguous(), wc = weight.contiguous(), bc = bias.contiguous(), gc = gamma.contiguous(), ec = beta.contiguous();
  Tensor out = at::empty({s.n, s.ho() / k, s.wo() / k, s.o}, x.options());
  Tensor mean = at::empty({s.n, s.o}, x.options()), rstd = at::empty({s.n, s.o}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_forward", [&] {
    forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                             ec.data_ptr<scalar_t>(), static_cast<scalar_t>(eps), s, out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                             rstd.data_ptr<scalar_t>());
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                            const Tensor& gamma, const Tensor& beta, const Tensor& mean, const Tensor& rstd,
                                                            int64_t ph, int64_t pw, int64_t k, bool need_x) {
  const Shape s = shape_of(x, weight, ph, pw, k);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({s.n, s.ho() / k, s.wo() / k, s.o}), "conv_block: grad must be (N, Ho / k, Wo / k, O), got ", grad.sizes());
  const Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const Tensor bc = bias.contiguous(), ga = gamma.contiguous(), be = beta.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  Tensor grad_x = need_x ? at::empty_like(xc) : at::empty({0}, x.options());
  Tensor grad_weight = at::zeros_like(wc), grad_bias = at::empty({s.o}, x.options());
  Tensor grad_gamma = at::empty({s.o}, x.options()), grad_beta = at::empty({s.o}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_backward", [&] {
    backward_kernel<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                              ga.data_ptr<scalar_t>(), be.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), s,
                              need_x ? grad_x.data_ptr<scalar_t>() : nullptr, grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
                              grad_gamma.data_ptr<scalar_t>(), grad_beta.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace ddfast::conv_block

TORCH_LIBRARY(ddfast_conv_block_cpu, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, int ph, int pw, int k, float eps) -> (Tensor, Tensor, Tensor)",
        &ddfast::conv_block::forward);
  m.def("backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, Tensor mean, Tensor rstd, int ph, int pw, "
        "int k, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &ddfast::conv_block::backward);
}
