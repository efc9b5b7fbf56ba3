// LayerNorm with Wan's modulation (or an affine weight and bias) and the gated residual, forward and backward,
// each one pass over the data (two for a norm's row: statistics, then output). Legend: S tokens, B batch,
// D hidden; x, grad, branch are contiguous [S, B, D]; shift, scale, gate are [B, D] with a unit last stride.
// The Python side (models/wan/lean.py) is the reference: the same values, op for op, except the order of sums.
#include "common.h"

#include <cmath>
#include <tuple>

namespace regdpo_wan_cpu {
namespace {

struct Rows {  // [S, B, D] as rows of D; row r belongs to sample r % B
  int64_t rows, B, D;
  explicit Rows(const at::Tensor& x) : rows(x.numel() / x.size(-1)), B(x.size(-2)), D(x.size(-1)) {}
};

void check_rows(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "regdpo_wan_cpu: ", name, " must be a contiguous [S, B, D] tensor");
}

void check_per_sample(const c10::optional<at::Tensor>& t, const Rows& r, const char* name) {
  if (!t) return;
  check_unit_last(*t, name);
  TORCH_CHECK(t->dim() == 2 && t->size(0) == r.B && t->size(1) == r.D && t->scalar_type() == at::kFloat,
              "regdpo_wan_cpu: ", name, " must be fp32 [B, D]");
}

// y = layer_norm(x) * gamma + beta in fp32, cast to x's dtype; gamma, beta are the weight and bias ([D]) or,
// modulated, (1 + scale) and shift ([B, D]). Returns (y, mean, rstd), the statistics [S, B, 1] fp32.
template <typename T>
void ln_forward(const Rows& r, const T* x, double eps, const float* w, const float* b, const float* shift,
                int64_t shift_st, const float* scale, int64_t scale_st, T* y, float* mean_out, float* rstd_out) {
  const int64_t D = r.D;
  at::parallel_for(0, r.rows, std::max<int64_t>(1, kGrain / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < D; ++j) sum += to_f(xr[j]);
      const float mean = sum / static_cast<float>(D);
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < D; ++j) {
        const float c = to_f(xr[j]) - mean;
        sq += c * c;
      }
      const float rstd = 1.f / std::sqrt(sq / static_cast<float>(D) + static_cast<float>(eps));
      const float nb = -rstd * mean;
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      T* yr = y + row * D;
      const int64_t s = row % r.B;
      if (scale != nullptr) {
        const float* sc = scale + s * scale_st;
        const float* sh = shift + s * shift_st;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const float xh = to_f(xr[j]) * rstd + nb;
          yr[j] = from_f<T>(xh * (1.f + sc[j]) + sh[j]);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          float v = to_f(xr[j]) * rstd + nb;
          if (w != nullptr) v = v * w[j];
          if (b != nullptr) v = v + b[j];
          yr[j] = from_f<T>(v);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, double eps, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale) {
  check_rows(x, "x");
  Rows r(x);
  check_per_sample(shift, r, "shift");
  check_per_sample(scale, r, "scale");
  TORCH_CHECK(shift.has_value() == scale.has_value(), "regdpo_wan_cpu: shift and scale come together");
  TORCH_CHECK(!(scale && (weight || bias)), "regdpo_wan_cpu: a modulated norm has no weight or bias");
  for (const auto* t : {&weight, &bias})
    if (*t) TORCH_CHECK((*t)->is_contiguous() && (*t)->numel() == r.D && (*t)->scalar_type() == at::kFloat,
                        "regdpo_wan_cpu: weight and bias must be contiguous fp32 [D]");
  auto y = at::empty_like(x);
  auto stat = x.sizes().vec();
  stat.back() = 1;
  auto mean = at::empty(stat, x.options().dtype(at::kFloat));
  auto rstd = at::empty(stat, x.options().dtype(at::kFloat));
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    ln_forward<scalar_t>(r, x.data_ptr<scalar_t>(), eps, weight ? weight->data_ptr<float>() : nullptr,
                         bias ? bias->data_ptr<float>() : nullptr, shift ? shift->data_ptr<float>() : nullptr,
                         shift ? shift->stride(0) : 0, scale ? scale->data_ptr<float>() : nullptr,
                         scale ? scale->stride(0) : 0, y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                         rstd.data_ptr<float>());
  };
  REGDPO_DISPATCH(x.scalar_type(), "layer_norm_forward", body);
  return {y, mean, rstd};
}

// Backward of layer_norm_forward. d_gamma, d_beta are per sample [B, D] when modulated (the gradients of
// scale and shift), else [1, D] (of the weight and bias); sums over the tokens.
template <typename T>
void ln_backward(const Rows& r, const T* grad, const T* x, const float* mean, const float* rstd, const float* w,
                 const float* scale, int64_t scale_st, bool want_dx, T* dx, float* d_gamma, float* d_beta) {
  const int64_t D = r.D, G = scale != nullptr ? r.B : 1;
  Chunks ch(r.rows, D);
  std::vector<float> pg(ch.count * G * D, 0.f), pb(ch.count * G * D, 0.f);
  ch.run(r.rows, [&](int64_t c, int64_t begin, int64_t end) {
    float* cg = pg.data() + c * G * D;
    float* cb = pb.data() + c * G * D;
    for (int64_t row = begin; row < end; ++row) {
      const T* gr = grad + row * D;
      const T* xr = x + row * D;
      const float m = mean[row], rs = rstd[row];
      const int64_t s = row % r.B;
      const float* sc = scale != nullptr ? scale + s * scale_st : nullptr;
      float* rg = cg + (scale != nullptr ? s * D : 0);
      float* rb = cb + (scale != nullptr ? s * D : 0);
      float a = 0.f, cdot = 0.f;
#pragma omp simd reduction(+ : a, cdot)
      for (int64_t j = 0; j < D; ++j) {
        const float g = to_f(gr[j]);
        const float xh = (to_f(xr[j]) - m) * rs;
        rg[j] += xh * g;
        rb[j] += g;
        const float ge = sc != nullptr ? g * (1.f + sc[j]) : (w != nullptr ? g * w[j] : g);
        a += ge;
        cdot += ge * xh;
      }
      if (!want_dx) continue;
      const float am = a / static_cast<float>(D), cm = cdot / static_cast<float>(D);
      T* dr = dx + row * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const float g = to_f(gr[j]);
        const float xh = (to_f(xr[j]) - m) * rs;
        const float ge = sc != nullptr ? g * (1.f + sc[j]) : (w != nullptr ? g * w[j] : g);
        dr[j] = from_f<T>(rs * (ge - am - xh * cm));
      }
    }
  });
  reduce_chunks(pg, ch.count, G * D, d_gamma);
  reduce_chunks(pb, ch.count, G * D, d_beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& scale, bool want_dx) {
  check_rows(x, "x");
  check_rows(grad, "grad");
  Rows r(x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "regdpo_wan_cpu: grad must match x");
  TORCH_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == r.rows && rstd.numel() == r.rows &&
                  mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "regdpo_wan_cpu: mean and rstd must be contiguous fp32 [S, B, 1]");
  check_per_sample(scale, r, "scale");
  if (weight) TORCH_CHECK(weight->is_contiguous() && weight->numel() == r.D && weight->scalar_type() == at::kFloat,
                          "regdpo_wan_cpu: weight must be contiguous fp32 [D]");
  auto dx = want_dx ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t G = scale ? r.B : 1;
  auto d_gamma = at::empty({G, r.D}, x.options().dtype(at::kFloat));
  auto d_beta = at::empty({G, r.D}, x.options().dtype(at::kFloat));
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    ln_backward<scalar_t>(r, grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                          rstd.data_ptr<float>(), weight ? weight->data_ptr<float>() : nullptr,
                          scale ? scale->data_ptr<float>() : nullptr, scale ? scale->stride(0) : 0, want_dx,
                          want_dx ? dx.data_ptr<scalar_t>() : nullptr, d_gamma.data_ptr<float>(),
                          d_beta.data_ptr<float>());
  };
  REGDPO_DISPATCH(x.scalar_type(), "layer_norm_backward", body);
  return {dx, d_gamma, d_beta};
}

// (x + branch * gate) in fp32, cast to x's dtype
at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& gate) {
  check_rows(x, "x");
  check_rows(branch, "branch");
  TORCH_CHECK(branch.sizes() == x.sizes() && branch.scalar_type() == x.scalar_type(), "regdpo_wan_cpu: branch must match x");
  Rows r(x);
  check_per_sample(gate, r, "gate");
  auto out = at::empty_like(x);
  const int64_t D = r.D, gst = gate.stride(0);
  const float* gt = gate.data_ptr<float>();
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, r.rows, std::max<int64_t>(1, kGrain / D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* g = gt + (row % r.B) * gst;
        const int64_t o = row * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) op[o + j] = from_f<scalar_t>(to_f(xp[o + j]) + to_f(bp[o + j]) * g[j]);
      }
    });
  };
  REGDPO_DISPATCH(x.scalar_type(), "gated_residual", body);
  return out;
}

// (d branch, d gate): grad * gate cast to branch's dtype, and the sum over tokens of grad * branch [B, D] fp32
std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& grad, const at::Tensor& branch,
                                                          const at::Tensor& gate, bool want_gate) {
  check_rows(grad, "grad");
  check_rows(branch, "branch");
  TORCH_CHECK(branch.sizes() == grad.sizes() && branch.scalar_type() == grad.scalar_type(), "regdpo_wan_cpu: grad must match branch");
  Rows r(grad);
  check_per_sample(gate, r, "gate");
  auto d_branch = at::empty_like(branch);
  auto d_gate = at::zeros({r.B, r.D}, grad.options().dtype(at::kFloat));
  const int64_t D = r.D, B = r.B, gst = gate.stride(0);
  const float* gt = gate.data_ptr<float>();
  Chunks ch(r.rows, D);
  std::vector<float> part(want_gate ? ch.count * B * D : 0, 0.f);
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    scalar_t* dp = d_branch.data_ptr<scalar_t>();
    ch.run(r.rows, [&](int64_t c, int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t s = row % B, o = row * D;
        const float* g = gt + s * gst;
        if (!want_gate) {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) dp[o + j] = from_f<scalar_t>(to_f(gp[o + j]) * g[j]);
          continue;
        }
        float* acc = part.data() + (c * B + s) * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const float v = to_f(gp[o + j]);
          dp[o + j] = from_f<scalar_t>(v * g[j]);
          acc[j] += v * to_f(bp[o + j]);
        }
      }
    });
  };
  REGDPO_DISPATCH(grad.scalar_type(), "gated_residual_backward", body);
  if (want_gate) reduce_chunks(part, ch.count, B * D, d_gate.data_ptr<float>());
  return {d_branch, d_gate};
}

}  // namespace

void register_norms(torch::Library& m) {
  m.impl("layer_norm_forward", layer_norm_forward);
  m.impl("layer_norm_backward", layer_norm_backward);
  m.impl("gated_residual", gated_residual);
  m.impl("gated_residual_backward", gated_residual_backward);
}

}  // namespace regdpo_wan_cpu
