// SPDX-License-Identifier: MIT
// Small xsimd loops shared by the kernels: dot product, y += a*x, y *= a.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <xsimd/xsimd.hpp>

namespace longheads::detail {

using float_batch = xsimd::batch<float>;
inline constexpr std::ptrdiff_t simd_width = static_cast<std::ptrdiff_t>(float_batch::size);

/// out[r] = a[r] . b for R rows sharing b. Every row goes through exactly the sequence of
/// operations of dot(a[r], b, n), so results do not depend on R: callers rely on that for
/// split-invariant scores (matmul.hpp).
template <std::size_t R>
inline void dot_rows(const float* const (&a)[R], const float* b, std::ptrdiff_t n, float (&out)[R]) noexcept {
  // Two accumulators per row hide the FMA latency; more buys nothing at head_dim <= 256.
  float_batch acc0[R], acc1[R];
  for (std::size_t r = 0; r < R; ++r) acc0[r] = acc1[r] = float_batch(0.0f);
  std::ptrdiff_t i = 0;
  for (; i + 2 * simd_width <= n; i += 2 * simd_width) {
    const float_batch b0 = float_batch::load_unaligned(b + i), b1 = float_batch::load_unaligned(b + i + simd_width);
    for (std::size_t r = 0; r < R; ++r) {
      acc0[r] = xsimd::fma(float_batch::load_unaligned(a[r] + i), b0, acc0[r]);
      acc1[r] = xsimd::fma(float_batch::load_unaligned(a[r] + i + simd_width), b1, acc1[r]);
    }
  }
  for (; i + simd_width <= n; i += simd_width) {
    const float_batch b0 = float_batch::load_unaligned(b + i);
    for (std::size_t r = 0; r < R; ++r) acc0[r] = xsimd::fma(float_batch::load_unaligned(a[r] + i), b0, acc0[r]);
  }
  for (std::size_t r = 0; r < R; ++r) {
    float sum = xsimd::hadd(acc0[r] + acc1[r]);
    for (std::ptrdiff_t j = i; j < n; ++j) sum = std::fma(a[r][j], b[j], sum);
    out[r] = sum;
  }
}

inline float dot(const float* a, const float* b, std::ptrdiff_t n) noexcept {
  const float* rows[1] = {a};
  float out[1];
  dot_rows<1>(rows, b, n, out);
  return out[0];
}

/// sum_i max(q_i lo_i, q_i hi_i), in a fixed order (the bound score of key_bounds).
inline float bound_dot(const float* q, const float* lo, const float* hi, std::ptrdiff_t n) noexcept {
  float_batch acc0(0.0f), acc1(0.0f);
  std::ptrdiff_t i = 0;
  for (; i + 2 * simd_width <= n; i += 2 * simd_width) {
    const float_batch q0 = float_batch::load_unaligned(q + i), q1 = float_batch::load_unaligned(q + i + simd_width);
    acc0 += xsimd::max(q0 * float_batch::load_unaligned(lo + i), q0 * float_batch::load_unaligned(hi + i));
    acc1 += xsimd::max(q1 * float_batch::load_unaligned(lo + i + simd_width), q1 * float_batch::load_unaligned(hi + i + simd_width));
  }
  for (; i + simd_width <= n; i += simd_width) {
    const float_batch q0 = float_batch::load_unaligned(q + i);
    acc0 += xsimd::max(q0 * float_batch::load_unaligned(lo + i), q0 * float_batch::load_unaligned(hi + i));
  }
  float sum = xsimd::hadd(acc0 + acc1);
  for (; i < n; ++i) sum += std::max(q[i] * lo[i], q[i] * hi[i]);
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

/// y[r] += alpha[r] * x for R rows sharing x, each element through exactly the operation
/// axpy(alpha[r], x, y[r], n) applies, so results do not depend on R.
template <std::size_t R>
inline void axpy_rows(const float (&alpha)[R], const float* x, float* const (&y)[R], std::ptrdiff_t n) noexcept {
  float_batch a[R];
  for (std::size_t r = 0; r < R; ++r) a[r] = float_batch(alpha[r]);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width) {
    const float_batch xi = float_batch::load_unaligned(x + i);
    for (std::size_t r = 0; r < R; ++r) xsimd::fma(a[r], xi, float_batch::load_unaligned(y[r] + i)).store_unaligned(y[r] + i);
  }
  for (; i < n; ++i)
    for (std::size_t r = 0; r < R; ++r) y[r][i] += alpha[r] * x[i];
}

/// Hints that the n floats at p will be read soon (a hint only: p may be past the data).
inline void prefetch_row(const float* p, std::ptrdiff_t n) noexcept {
#if defined(__GNUC__)
  for (std::ptrdiff_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
#else
  (void)p;
  (void)n;
#endif
}

/// y *= alpha
inline void scale(float alpha, float* y, std::ptrdiff_t n) noexcept {
  const float_batch a(alpha);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width) (a * float_batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

}  // namespace longheads::detail
