// The q/k RMSNorm across heads, then RoPE (Wan's order), forward and backward. Legend: S tokens, B batch,
// H heads, K head dim; x and grad are [S, B, H, K] with any strides but a unit last one (x may be a head's
// slice of the fused QKV output); rs is the inverse RMS [S, B, 1, 1] fp32; weight fp32 [H * K]; turn the RoPE
// table cos + i sin as fp32 pairs [S, K] (or undefined: no rotation). A row is one token of one sample.
// The Python side (models/wan/lean.py, RMSNormAcrossHeads) is the reference: the same values op for op
// (the rotation a complex multiply: each of its four products and two sums rounded once), except the sums.
#include "common.h"

#include <tuple>

namespace regdpo_wan_cpu {
namespace {

struct Heads {
  int64_t S, B, H, K, st[4];
  explicit Heads(const at::Tensor& t) : S(t.size(0)), B(t.size(1)), H(t.size(2)), K(t.size(3)) {
    for (int i = 0; i < 4; ++i) st[i] = t.stride(i);
  }
  int64_t rows() const { return S * B; }
  int64_t row(int64_t n) const { return (n / B) * st[0] + (n % B) * st[1]; }
};

void check_heads(const at::Tensor& t, const char* name) {
  check_unit_last(t, name);
  TORCH_CHECK(t.dim() == 4, "regdpo_wan_cpu: ", name, " must be [S, B, H, K]");
}

const float* turn_rows(const c10::optional<at::Tensor>& turn, const Heads& x) {
  if (!turn) return nullptr;
  TORCH_CHECK(x.K % 2 == 0, "regdpo_wan_cpu: RoPE needs an even head dim");
  TORCH_CHECK(turn->is_contiguous() && turn->scalar_type() == at::kFloat && turn->dim() == 2 &&
                  turn->size(0) == x.S && turn->size(1) == x.K,
              "regdpo_wan_cpu: turn must be contiguous fp32 [S, K] (cos, sin pairs)");
  return turn->data_ptr<float>();
}

void check_stats(const at::Tensor& rs, const Heads& x, const at::Tensor& w) {
  TORCH_CHECK(rs.is_contiguous() && rs.scalar_type() == at::kFloat && rs.numel() == x.rows(),
              "regdpo_wan_cpu: rs must be contiguous fp32 [S, B, 1, 1]");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == x.H * x.K,
              "regdpo_wan_cpu: weight must be contiguous fp32 [H * K]");
}

// sum over the row of x^2 in fp32: [S, B, 1, 1]
at::Tensor rms_sumsq(const at::Tensor& x) {
  check_heads(x, "x");
  Heads g(x);
  auto out = at::empty({g.S, g.B, 1, 1}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, g.rows(), std::max<int64_t>(1, kGrain / (g.H * g.K)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float acc = 0.f;
        for (int64_t h = 0; h < g.H; ++h) {
          const scalar_t* xr = xp + g.row(n) + h * g.st[2];
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < g.K; ++k) acc += to_f(xr[k]) * to_f(xr[k]);
        }
        o[n] = acc;
      }
    });
  };
  REGDPO_DISPATCH(x.scalar_type(), "rms_sumsq", body);
  return out;
}

// x * rs * weight in fp32, rounded to x's dtype; then, given turn, rotated in fp32 and rounded again:
// bitwise `rotate(rms_scaled(x, rs, weight), turn)`. A fresh contiguous [S, B, H, K].
at::Tensor rms_apply(const at::Tensor& x, const at::Tensor& rs, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& turn) {
  check_heads(x, "x");
  Heads g(x);
  check_stats(rs, g, weight);
  const float* tr = turn_rows(turn, g);
  auto out = at::empty({g.S, g.B, g.H, g.K}, x.options());
  const float* r = rs.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int64_t W = g.H * g.K, P = g.K / 2;
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.rows(), std::max<int64_t>(1, kGrain / W), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float rn = r[n];
        const float* t = tr != nullptr ? tr + (n / g.B) * g.K : nullptr;
        for (int64_t h = 0; h < g.H; ++h) {
          const scalar_t* xr = xp + g.row(n) + h * g.st[2];
          const float* wr = w + h * g.K;
          scalar_t* orow = op + n * W + h * g.K;
          if (t == nullptr) {
#pragma omp simd
            for (int64_t k = 0; k < g.K; ++k) orow[k] = from_f<scalar_t>(to_f(xr[k]) * rn * wr[k]);
            continue;
          }
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) {
            const float a = through<scalar_t>(to_f(xr[2 * p]) * rn * wr[2 * p]);
            const float b = through<scalar_t>(to_f(xr[2 * p + 1]) * rn * wr[2 * p + 1]);
            const float c = t[2 * p], s = t[2 * p + 1];
            orow[2 * p] = from_f<scalar_t>(a * c - b * s);
            orow[2 * p + 1] = from_f<scalar_t>(a * s + b * c);
          }
        }
      }
    });
  };
  REGDPO_DISPATCH(x.scalar_type(), "rms_apply", body);
  return out;
}

// grad rotated back (by the conjugate turn) in fp32, pair p of head row gr: (g0, g1)
template <typename T>
inline void unrotated(const T* gr, const float* t, int64_t p, float& g0, float& g1) {
  const float a = to_f(gr[2 * p]), b = to_f(gr[2 * p + 1]);
  if (t == nullptr) {
    g0 = a;
    g1 = b;
    return;
  }
  const float c = t[2 * p], s = t[2 * p + 1];
  g0 = a * c + b * s;
  g1 = b * c - a * s;
}

// One row's backward pieces. gh is grad rotated back (fp32); the row of x, grad and weight are per head.
// row_dot: dot = sum(gh * weight * x), and, given acc, acc += gh * x * rs (the weight's gradient).
template <typename T>
float row_dot(const Heads& gx, const Heads& gg, const T* xp, const T* gp, int64_t n, float rn, const float* t,
              const float* w, float* acc) {
  float sum = 0.f;
  const int64_t P = gx.K / 2;
  for (int64_t h = 0; h < gx.H; ++h) {
    const T* xr = xp + gx.row(n) + h * gx.st[2];
    const T* gr = gp + gg.row(n) + h * gg.st[2];
    const float* wr = w + h * gx.K;
    float* ar = acc != nullptr ? acc + h * gx.K : nullptr;
    if (gx.K % 2) {  // odd head dim (no rotation then): one element at a time
      for (int64_t k = 0; k < gx.K; ++k) {
        const float gv = to_f(gr[k]), xv = to_f(xr[k]);
        if (ar != nullptr) ar[k] += gv * xv * rn;
        sum += gv * wr[k] * xv;
      }
      continue;
    }
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < P; ++p) {
      float g0, g1;
      unrotated(gr, t, p, g0, g1);
      const float x0 = to_f(xr[2 * p]), x1 = to_f(xr[2 * p + 1]);
      if (ar != nullptr) {
        ar[2 * p] += g0 * x0 * rn;
        ar[2 * p + 1] += g1 * x1 * rn;
      }
      sum += g0 * wr[2 * p] * x0;
      sum += g1 * wr[2 * p + 1] * x1;
    }
  }
  return sum;
}

// row_dx: d x = gh * weight * rs + x * cn, cn = dot * rs^3 * neg_inv_width, rounded to T (a contiguous row)
template <typename T>
void row_dx(const Heads& gx, const Heads& gg, const T* xp, const T* gp, int64_t n, float rn, float cn, const float* t,
            const float* w, T* out) {
  const int64_t P = gx.K / 2;
  for (int64_t h = 0; h < gx.H; ++h) {
    const T* xr = xp + gx.row(n) + h * gx.st[2];
    const T* gr = gp + gg.row(n) + h * gg.st[2];
    const float* wr = w + h * gx.K;
    T* orow = out + h * gx.K;
    if (gx.K % 2) {
      for (int64_t k = 0; k < gx.K; ++k) orow[k] = from_f<T>(to_f(gr[k]) * wr[k] * rn + to_f(xr[k]) * cn);
      continue;
    }
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      float g0, g1;
      unrotated(gr, t, p, g0, g1);
      orow[2 * p] = from_f<T>(g0 * wr[2 * p] * rn + to_f(xr[2 * p]) * cn);
      orow[2 * p + 1] = from_f<T>(g1 * wr[2 * p + 1] * rn + to_f(xr[2 * p + 1]) * cn);
    }
  }
}

struct Backward {  // the checked inputs of a backward kernel
  Heads gx, gg;
  const float *tr, *r, *w;
  Backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rs, const at::Tensor& weight,
           const c10::optional<at::Tensor>& turn)
      : gx((check_heads(x, "x"), x)), gg((check_heads(grad, "grad"), grad)) {
    TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "regdpo_wan_cpu: grad must match x");
    check_stats(rs, gx, weight);
    tr = turn_rows(turn, gx);
    r = rs.data_ptr<float>();
    w = weight.data_ptr<float>();
  }
  const float* turn_of(int64_t n) const { return tr != nullptr ? tr + (n / gx.B) * gx.K : nullptr; }
};

// The rows of a backward, chunked per thread: each row's dot, stored in `dot` where given, else used at once
// for the row's d x (written to `dx`: the one-pass backward); the weight's gradient summed over rows into
// `dw` where it is defined.
void backward_rows(const Backward& bw, const at::Tensor& grad, const at::Tensor& x, float* dot, float neg_inv_width,
                   at::Tensor* dx, at::Tensor& dw) {
  const Heads& gx = bw.gx;
  const int64_t W = gx.H * gx.K;
  const bool want_weight = dw.numel() > 0;
  Chunks ch(gx.rows(), W);
  std::vector<float> part(want_weight ? ch.count * W : 0, 0.f);
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = dx != nullptr ? dx->data_ptr<scalar_t>() : nullptr;
    ch.run(gx.rows(), [&](int64_t c, int64_t begin, int64_t end) {
      float* acc = want_weight ? part.data() + c * W : nullptr;
      for (int64_t n = begin; n < end; ++n) {
        const float rn = bw.r[n];
        const float* t = bw.turn_of(n);
        const float d = row_dot(gx, bw.gg, xp, gp, n, rn, t, bw.w, acc);
        if (op == nullptr) dot[n] = d;
        else row_dx(gx, bw.gg, xp, gp, n, rn, d * (rn * rn * rn) * neg_inv_width, t, bw.w, op + n * W);
      }
    });
  };
  REGDPO_DISPATCH(x.scalar_type(), "rms_backward", body);
  if (want_weight) reduce_chunks(part, ch.count, W, dw.data_ptr<float>());
}

// Backward, first half (under TP): per row dot [S, B, 1, 1], which the caller all-reduces, and, wanted, the
// weight's gradient [H * K] summed over rows.
std::tuple<at::Tensor, at::Tensor> rms_backward_dot(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rs,
                                                    const at::Tensor& weight, const c10::optional<at::Tensor>& turn,
                                                    bool want_weight) {
  Backward bw(grad, x, rs, weight, turn);
  auto dot = at::empty({bw.gx.S, bw.gx.B, 1, 1}, x.options().dtype(at::kFloat));
  auto dw = at::empty({want_weight ? bw.gx.H * bw.gx.K : 0}, x.options().dtype(at::kFloat));
  backward_rows(bw, grad, x, dot.data_ptr<float>(), 0.f, nullptr, dw);
  return {dot, dw};
}

// Backward, second half (under TP): d x from the all-reduced dot; neg_inv_width = -1 / the norm's full width.
at::Tensor rms_backward_dx(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rs, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& turn, const at::Tensor& dot, double neg_inv_width) {
  Backward bw(grad, x, rs, weight, turn);
  const Heads& gx = bw.gx;
  TORCH_CHECK(dot.is_contiguous() && dot.scalar_type() == at::kFloat && dot.numel() == gx.rows(),
              "regdpo_wan_cpu: dot must be contiguous fp32 [S, B, 1, 1]");
  auto dx = at::empty({gx.S, gx.B, gx.H, gx.K}, x.options());
  const float* dt = dot.data_ptr<float>();
  const float niw = static_cast<float>(neg_inv_width);
  const int64_t W = gx.H * gx.K;
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = dx.data_ptr<scalar_t>();
    at::parallel_for(0, gx.rows(), std::max<int64_t>(1, kGrain / W), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float rn = bw.r[n];
        row_dx(gx, bw.gg, xp, gp, n, rn, dt[n] * (rn * rn * rn) * niw, bw.turn_of(n), bw.w, op + n * W);
      }
    });
  };
  REGDPO_DISPATCH(x.scalar_type(), "rms_backward_dx", body);
  return dx;
}

// The whole backward in one pass over the rows (no TP: the dot is the row's own), each row's data read while
// it is in cache: (d x, the weight's gradient or an empty tensor).
std::tuple<at::Tensor, at::Tensor> rms_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rs,
                                                const at::Tensor& weight, const c10::optional<at::Tensor>& turn,
                                                bool want_weight, double neg_inv_width) {
  Backward bw(grad, x, rs, weight, turn);
  auto dx = at::empty({bw.gx.S, bw.gx.B, bw.gx.H, bw.gx.K}, x.options());
  auto dw = at::empty({want_weight ? bw.gx.H * bw.gx.K : 0}, x.options().dtype(at::kFloat));
  backward_rows(bw, grad, x, nullptr, static_cast<float>(neg_inv_width), &dx, dw);
  return {dx, dw};
}

}  // namespace

void register_rms_rope(torch::Library& m) {
  m.impl("rms_sumsq", rms_sumsq);
  m.impl("rms_apply", rms_apply);
  m.impl("rms_backward_dot", rms_backward_dot);
  m.impl("rms_backward_dx", rms_backward_dx);
  m.impl("rms_backward", rms_backward);
}

}  // namespace regdpo_wan_cpu
