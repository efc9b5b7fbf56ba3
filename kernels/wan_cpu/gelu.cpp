// The FFN's tanh GELU in its CPU form, x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3), forward and
// backward, each one pass over x (any contiguous shape). The Python reference is models/wan/gelu.py: the same
// formulas; the sigmoid's exp here is a polynomial (Cephes' expf: within 2 ulp of fp32's exp), vectorised, so
// values agree with torch's sigmoid to rounding. The recompute of the output is this forward again: bitwise.
#include "common.h"

#include <cmath>

namespace regdpo_wan_cpu {
namespace {

constexpr float kK2 = 1.5957691216057308f;  // 2 sqrt(2/pi): sigmoid's argument is kK2 (x + kA x^3)
constexpr float kA = 0.044715f;
constexpr float kXFlat = 30.f;  // |x| beyond this: s (1 - s) is 0 in fp32 (gelu.py's _X_FLAT)

// exp(v) for v in fp32, branch-free (clamped to fp32's finite range): range reduction by ln 2, a degree-6
// polynomial, the exponent put in by bits.
inline float exp_poly(float v) {
  v = std::min(std::max(v, -87.3365448f), 88.3762626f);
  const float n = std::floor(v * 1.44269504088896341f + 0.5f);
  float r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid2u(float x) {  // sigmoid(2u)
  const float t = kK2 * (x + kA * (x * x) * x);
  return 1.f / (1.f + exp_poly(-t));
}

template <typename T>
void forward_impl(const T* x, T* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = to_f(x[i]);
      y[i] = from_f<T>(v * sigmoid2u(v));
    }
  });
}

// grad * d/dx: s + x s (1 - s) kK2 (1 + 3 kA x^2), the square of x clamped at kXFlat
template <typename T>
void backward_impl(const T* grad, const T* x, T* dx, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = to_f(x[i]);
      const float s = sigmoid2u(v);
      const float c = std::min(std::max(v, -kXFlat), kXFlat);
      float q = (c * c) * (3.f * kA * kK2) + kK2;
      q = q * s;
      q = q - q * s;
      dx[i] = from_f<T>((q * v + s) * to_f(grad[i]));
    }
  });
}

at::Tensor gelu_forward(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.is_contiguous(), "regdpo_wan_cpu: x must be contiguous");
  auto y = at::empty_like(x);
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel());
  };
  REGDPO_DISPATCH(x.scalar_type(), "gelu_forward", body);
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad, const at::Tensor& x) {
  check_cpu(x, "x");
  check_cpu(grad, "grad");
  TORCH_CHECK(x.is_contiguous() && grad.is_contiguous() && grad.sizes() == x.sizes() &&
                  grad.scalar_type() == x.scalar_type(),
              "regdpo_wan_cpu: grad and x must be contiguous, of one shape and dtype");
  auto dx = at::empty_like(x);
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), x.numel());
  };
  REGDPO_DISPATCH(x.scalar_type(), "gelu_backward", body);
  return dx;
}

}  // namespace

void register_gelu(torch::Library& m) {
  m.impl("gelu_forward", gelu_forward);
  m.impl("gelu_backward", gelu_backward);
}

}  // namespace regdpo_wan_cpu
