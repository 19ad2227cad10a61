// SPDX-License-Identifier: MIT
// How the cache stores keys and values: fp32, or bfloat16 (half the bytes; decode reads half).
//
// bf16 keeps fp32's exponent and 8 bits of mantissa, so a rounded value differs from the fp32 one
// by at most 2^-9 relative; only magnitudes within half a bf16 step of FLT_MAX round up to
// infinity, and the attention's input check (max_input_magnitude) keeps stored values far below. All arithmetic stays fp32:
// the default kernel widens bf16 rows in registers as it loads them (bf16_reading_kernel);
// encoders and other kernels get each chunk converted to fp32 in scratch once per read.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace longheads {

/// Element type of the cached keys and values.
enum class kv_precision {
  fp32,  ///< 4 bytes per element, exact
  bf16,  ///< 2 bytes per element, round to nearest even
};

/// Bytes per cached key or value element.
constexpr std::size_t kv_element_bytes(kv_precision p) noexcept { return p == kv_precision::bf16 ? 2 : 4; }

inline const char* to_string(kv_precision p) noexcept { return p == kv_precision::bf16 ? "bf16" : "fp32"; }

/// A bfloat16 value: the upper half of an IEEE float.
using bf16 = std::uint16_t;

/// Round to nearest even; NaN stays a (quiet) NaN of the same sign, infinities stay infinite.
constexpr bf16 to_bf16(float x) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x0040u);
  return static_cast<bf16>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/// Exact.
constexpr float from_bf16(bf16 x) noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(x) << 16); }

/// out[i] = to_bf16(in[i]) for i < n.
inline void to_bf16(const float* in, bf16* out, std::ptrdiff_t n) noexcept {
  for (std::ptrdiff_t i = 0; i < n; ++i) out[i] = to_bf16(in[i]);
}

/// out[i] = from_bf16(in[i]) for i < n. The buffers must not overlap: told so (__restrict),
/// GCC vectorises the loop (zero-extend and shift, 16 at a time); without it the loop stays
/// scalar and the conversion, not memory, bounds a bf16 decode.
inline void from_bf16(const bf16* __restrict in, float* __restrict out, std::ptrdiff_t n) noexcept {
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const std::uint32_t bits = static_cast<std::uint32_t>(in[i]) << 16;
    std::memcpy(out + i, &bits, sizeof bits);
  }
}

}  // namespace longheads
