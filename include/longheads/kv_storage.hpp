// SPDX-License-Identifier: MIT
// How the cache stores keys and values: fp32, bfloat16 (half the bytes; decode reads half), or
// int8 with a scale per block (a little over a quarter).
//
// bf16 keeps fp32's exponent and 8 bits of mantissa, so a rounded value differs from the fp32 one
// by at most 2^-9 relative; only magnitudes within half a bf16 step of FLT_MAX round up to
// infinity, and the attention's input check (max_input_magnitude) keeps stored values far below.
//
// int8 cuts each row of head_dim elements (one token's key or value for one kv head) into blocks
// of 32 (llama.cpp's q8_0 block), each stored as 32 signed bytes q in [-127, 127] and one bf16
// scale s, the value being q * s: 34 bytes per 32 elements, 0.53x bf16. Why this layout:
//  - 32-element blocks bound the error by the block's own largest magnitude amax (s / 2, at most
//    amax / 252 with the scale rounded up), so an outlier channel of a key costs precision only
//    in its block, not in the whole row; smaller blocks would cost more scale bytes.
//  - A bf16 scale has fp32's range (no overflow or flush as with fp16) and is rounded up, so
//    amax / s <= 127 and no element clips. And q * s is exact in fp32 (7 bits times 8), so
//    a value row widened in registers gives exactly the floats of dequantize_int8.
//  - Elements and scales live in two arrays indexed like the fp32 storage (element e's scale is
//    scale e / 32), so a chunk stays w * d contiguous bytes the kernel streams in order.
// A head_dim that is not a multiple of 32 takes blocks of the largest power of two dividing it
// (a block never spans two tokens, which arrive one at a time). A block holding a non-finite
// element is stored as NaN, all of it (the attention rejects non-finite input by default).
//
// The default kernel reads compact rows in place (kernel_reads_in_place): bf16 rows and int8
// value rows widened to fp32 in registers, int8 key rows against the query quantized to int8,
// block by block in exact integers (detail::dot_block's note: a widened int8 key costs more than
// its bytes save); accumulation is fp32. Encoders and other kernels get each chunk converted to
// fp32 in scratch once per read, so the chunk summaries come from what is stored.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace longheads {

/// Element type of the cached keys and values.
enum class kv_precision {
  fp32,  ///< 4 bytes per element, exact
  bf16,  ///< 2 bytes per element, round to nearest even
  int8,  ///< 1 byte per element and a bf16 scale per block of 32 (int8_block_elements)
};

/// Bytes per cached key or value element, without int8's block scales.
constexpr std::size_t kv_element_bytes(kv_precision p) noexcept {
  return p == kv_precision::fp32 ? 4 : p == kv_precision::bf16 ? 2 : 1;
}

inline const char* to_string(kv_precision p) noexcept {
  return p == kv_precision::fp32 ? "fp32" : p == kv_precision::bf16 ? "bf16" : p == kv_precision::int8 ? "int8" : "unknown";
}

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

/// Elements per int8 block for rows of `head_dim` elements: 32, or the largest power of two
/// dividing head_dim when that is smaller (a block never spans two rows).
constexpr int int8_block_elements(int head_dim) noexcept { return std::min(32, head_dim & -head_dim); }

/// Bytes of int8 storage, scales included, for `elements` elements in rows of `head_dim`.
constexpr std::size_t int8_storage_bytes(std::size_t elements, int head_dim) noexcept {
  return elements + elements / static_cast<std::size_t>(int8_block_elements(head_dim)) * sizeof(std::uint16_t);
}

/// The smallest bf16 at least x, for finite x >= 0 (a scale rounded up, so nothing clips).
constexpr bf16 to_bf16_rounded_up(float x) noexcept {
  auto bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0xffffu) != 0) bits += 0x10000u;
  return static_cast<bf16>(bits >> 16);
}

/// Quantizes n elements (whole blocks of `block` elements) to int8 with one bf16 scale per
/// block: s = amax / 127 rounded up to a bf16, q = round-to-nearest-even(x / s); an all-zero
/// block has scale 0, a block with a non-finite element scale NaN and every q 0.
inline void quantize_int8(const float* in, std::int8_t* out, bf16* scales, std::ptrdiff_t n, int block) noexcept {
  for (std::ptrdiff_t b = 0; b * block < n; ++b) {
    const float* x = in + b * block;
    std::int8_t* q = out + b * block;
    float largest = 0.0f;
    bool finite = true;
    for (int i = 0; i < block; ++i) {
      finite &= std::isfinite(x[i]);
      largest = std::max(largest, std::abs(x[i]));
    }
    if (!finite) {
      scales[b] = 0x7fc0;  // NaN
      std::fill(q, q + block, std::int8_t{0});
      continue;
    }
    scales[b] = to_bf16_rounded_up(largest / 127.0f);
    const float s = from_bf16(scales[b]);
    for (int i = 0; i < block; ++i)
      q[i] = s == 0.0f ? std::int8_t{0} : static_cast<std::int8_t>(std::clamp(std::nearbyint(x[i] / s), -127.0f, 127.0f));
  }
}

/// out[i] = q[i] * scale of its block, for i < n (exact in fp32).
inline void dequantize_int8(const std::int8_t* __restrict q, const bf16* __restrict scales, float* __restrict out, std::ptrdiff_t n,
                            int block) noexcept {
  for (std::ptrdiff_t b = 0; b * block < n; ++b) {
    const float s = from_bf16(scales[b]);
    for (int i = 0; i < block; ++i) out[b * block + i] = static_cast<float>(q[b * block + i]) * s;
  }
}

/// int8 keys or values read in place: the storage's elements and block scales, positioned at
/// element `at`. Moves like a pointer (p + n elements) and reads dequantized floats (p[i]), so
/// the kernels' loops take it where they take a float or bf16 pointer.
struct int8_rows {
  const std::int8_t* elements = nullptr;  ///< the storage's first element
  const bf16* scales = nullptr;           ///< the storage's first block scale
  std::ptrdiff_t at = 0;                  ///< the element this points at
  int block_shift = 5;                    ///< log2(int8_block_elements(head_dim))

  /// Element at + i, dequantized.
  float operator[](std::ptrdiff_t i) const noexcept {
    const std::ptrdiff_t e = at + i;
    return static_cast<float>(elements[e]) * from_bf16(scales[e >> block_shift]);
  }
  /// n elements further on.
  friend int8_rows operator+(int8_rows p, std::ptrdiff_t n) noexcept {
    p.at += n;
    return p;
  }
};

}  // namespace longheads
