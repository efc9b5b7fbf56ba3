// Shared pieces of the Wan block's fused CPU kernels (kernels/wan_cpu/__init__.py builds and loads them).
//
// Every kernel computes in fp32 and rounds each product and sum once, as torch's own elementwise CPU kernels
// do (built with -ffp-contract=off: no fused multiply-adds), so an elementwise result is bitwise what the
// torch op chain it replaces gives; only reductions run in another order. Tensors are the model's dtype
// (fp32, bf16 or fp16) where the Python code keeps or returns that dtype, fp32 where it keeps fp32.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Calls f(scalar_t{}) for the dtype (fp32, bf16, fp16): f is a generic lambda defined outside the macro,
// because a #pragma (the loops' `omp simd`) cannot sit inside a macro argument.
#define REGDPO_DISPATCH(dtype, name, f)                                                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, [&] { f(scalar_t{}); })

namespace regdpo_wan_cpu {

// elements per thread below which a kernel stays on one thread (torch's own grain for elementwise ops)
constexpr int64_t kGrain = 32768;

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
// bf16 <-> fp32 by bits, branch-free where it can be, so that the loops vectorize (c10's conversions do not)
inline float to_f(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// v rounded to the storage type T (round to nearest even; NaN stays NaN): what `.to(dtype)` does
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : r), c10::BFloat16::from_bits());
}

// v rounded to T and read back as fp32: `.to(dtype)` then `.float()`
template <typename T>
inline float through(float v) { return to_f(from_f<T>(v)); }
template <>
inline float through<float>(float v) { return v; }

// Rows [begin, end) of `rows` split into one chunk per thread (fewer when the work is small). A chunk's
// partial sums go to its own slot, reduced in chunk order afterwards: deterministic for a thread count.
struct Chunks {
  int64_t count, size;
  Chunks(int64_t rows, int64_t width) {
    int64_t by_work = std::max<int64_t>(1, rows * width / kGrain);
    count = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, rows}));
    size = (rows + count - 1) / count;
    count = (rows + size - 1) / size;
  }
  template <typename F>
  void run(int64_t rows, const F& f) const {
    if (count == 1) {
      f(0, 0, rows);
      return;
    }
    at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) f(c, c * size, std::min(rows, (c + 1) * size));
    });
  }
};

// Partial sums of [count, n] fp32, summed over the chunks into out[n] (in chunk order).
inline void reduce_chunks(const std::vector<float>& part, int64_t count, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = part[j];
  for (int64_t c = 1; c < count; ++c) {
    const float* p = part.data() + c * n;
    for (int64_t j = 0; j < n; ++j) out[j] += p[j];
  }
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "regdpo_wan_cpu: ", name, " must be a CPU tensor");
}

inline void check_unit_last(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, "regdpo_wan_cpu: ", name, " needs a unit last stride");
}

}  // namespace regdpo_wan_cpu
