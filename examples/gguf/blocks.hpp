// SPDX-License-Identifier: MIT
// Dequantisation of the tensor types common GGUF files hold (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
// Q5_K, Q6_K), block by block as ggml's reference (ggml-quants.c, dequantize_row_*) computes it,
// in float in the same order. Every product here is exact in float (an fp16 scale has 11
// significant bits, a 6-bit sub-scale and a 4-6-bit quant add at most 13), so each value is
// the correctly rounded value of its block formula: tests/gguf_test.cpp checks that `==`
// against a double-precision implementation written from the published block layouts.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "gguf_file.hpp"

namespace gguf {

/// IEEE half to float, exactly (normals, subnormals, infinities, NaN).
inline float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

/// bfloat16 to float: the top half of a float.
inline float bf16_to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

namespace detail {

inline std::uint16_t load_u16(const std::byte* p) noexcept {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_K / Q5_K: 8 sub-blocks' 6-bit scale and min packed in 12 bytes (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const std::uint8_t* q, std::uint8_t& scale, std::uint8_t& min) noexcept {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = static_cast<std::uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    min = static_cast<std::uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Block bodies; each writes one block's values to y.
inline void q8_0(const std::byte* b, float* y) noexcept {  // fp16 d, int8 q[32]
  const float d = half_to_float(load_u16(b));
  const auto* q = reinterpret_cast<const std::int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(q[j]) * d;
}

inline void q4_0(const std::byte* b, float* y) noexcept {  // fp16 d, 16 bytes: low nibbles 0..15, high 16..31, minus 8
  const float d = half_to_float(load_u16(b));
  const auto* q = reinterpret_cast<const std::uint8_t*>(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((q[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((q[j] >> 4) - 8) * d;
  }
}

inline void q4_k(const std::byte* b, float* y) noexcept {  // fp16 d, fp16 dmin, scales[12], qs[128]
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const auto* scales = reinterpret_cast<const std::uint8_t*>(b + 4);
  const auto* q = reinterpret_cast<const std::uint8_t*>(b + 16);
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    std::uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

inline void q5_k(const std::byte* b, float* y) noexcept {  // fp16 d, fp16 dmin, scales[12], qh[32], qs[128]
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const auto* scales = reinterpret_cast<const std::uint8_t*>(b + 4);
  const auto* qh = reinterpret_cast<const std::uint8_t*>(b + 16);
  const auto* ql = reinterpret_cast<const std::uint8_t*>(b + 48);
  std::uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    std::uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
  }
}

inline void q6_k(const std::byte* b, float* y) noexcept {  // ql[128], qh[64], int8 scales[16], fp16 d
  const auto* ql = reinterpret_cast<const std::uint8_t*>(b);
  const auto* qh = reinterpret_cast<const std::uint8_t*>(b + 128);
  const auto* sc = reinterpret_cast<const std::int8_t*>(b + 192);
  const float d = half_to_float(load_u16(b + 208));
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * static_cast<float>(q1);
      y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
      y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
      y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
    }
  }
}

}  // namespace detail

/// Whether dequantize() reads `type`.
inline bool dequantizable(tensor_type type) noexcept {
  switch (type) {
    case tensor_type::f32: case tensor_type::f16: case tensor_type::bf16: case tensor_type::q8_0:
    case tensor_type::q4_0: case tensor_type::q4_k: case tensor_type::q5_k: case tensor_type::q6_k:
      return true;
    default:
      return false;
  }
}

/// Writes the `out.size()` values held by `bytes` (whole blocks of `type`) to `out`.
/// @throws format_error (unsupported) for a type dequantizable() refuses, or when the sizes
/// do not match.
inline void dequantize(tensor_type type, std::span<const std::byte> bytes, std::span<float> out) {
  const type_layout layout = layout_of(type);
  if (!dequantizable(type))
    throw format_error(error_kind::unsupported, std::string("GGUF: tensor type ") + (layout.name ? layout.name : "?") +
                                                    " is not read by this host (it reads F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)");
  if (out.size() % layout.block_elements != 0 || bytes.size() != out.size() / layout.block_elements * layout.block_bytes)
    throw format_error(error_kind::wrong_tensor_shape, std::string("GGUF: ") + std::to_string(bytes.size()) + " bytes of " + layout.name +
                                                           " do not hold " + std::to_string(out.size()) + " values");
  const std::byte* b = bytes.data();
  float* y = out.data();
  const std::size_t blocks = out.size() / layout.block_elements;
  for (std::size_t i = 0; i < blocks; ++i, b += layout.block_bytes, y += layout.block_elements) {
    switch (type) {
      case tensor_type::f32: std::memcpy(y, b, 4); break;
      case tensor_type::f16: *y = half_to_float(detail::load_u16(b)); break;
      case tensor_type::bf16: *y = bf16_to_float(detail::load_u16(b)); break;
      case tensor_type::q8_0: detail::q8_0(b, y); break;
      case tensor_type::q4_0: detail::q4_0(b, y); break;
      case tensor_type::q4_k: detail::q4_k(b, y); break;
      case tensor_type::q5_k: detail::q5_k(b, y); break;
      case tensor_type::q6_k: detail::q6_k(b, y); break;
      default: break;
    }
  }
}

}  // namespace gguf
