// SPDX-License-Identifier: MIT
// Small xsimd loops shared by the kernels: dot product, y += a*x, y *= a.
#pragma once

#include <cstddef>
#include <xsimd/xsimd.hpp>

namespace longheads::detail {

using float_batch = xsimd::batch<float>;
inline constexpr std::ptrdiff_t simd_width = static_cast<std::ptrdiff_t>(float_batch::size);

inline float dot(const float* a, const float* b, std::ptrdiff_t n) noexcept {
  // Two accumulators hide the FMA latency; more buys nothing at head_dim <= 256.
  float_batch acc0(0.0f), acc1(0.0f);
  std::ptrdiff_t i = 0;
  for (; i + 2 * simd_width <= n; i += 2 * simd_width) {
    acc0 = xsimd::fma(float_batch::load_unaligned(a + i), float_batch::load_unaligned(b + i), acc0);
    acc1 = xsimd::fma(float_batch::load_unaligned(a + i + simd_width), float_batch::load_unaligned(b + i + simd_width), acc1);
  }
  for (; i + simd_width <= n; i += simd_width)
    acc0 = xsimd::fma(float_batch::load_unaligned(a + i), float_batch::load_unaligned(b + i), acc0);
  float sum = xsimd::hadd(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

/// y += alpha * x
inline void axpy(float alpha, const float* x, float* y, std::ptrdiff_t n) noexcept {
  const float_batch a(alpha);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width)
    xsimd::fma(a, float_batch::load_unaligned(x + i), float_batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// y *= alpha
inline void scale(float alpha, float* y, std::ptrdiff_t n) noexcept {
  const float_batch a(alpha);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width) (a * float_batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

}  // namespace longheads::detail
