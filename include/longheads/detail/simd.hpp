// SPDX-License-Identifier: MIT
// Small xsimd loops shared by the kernels: dot products (one row against many, or a block of
// rows reduced together), y += a*x, y *= a. The shared operand
// (key or value rows) may be fp32, bf16 or int8 with block scales; bf16 and int8 are widened in
// registers as they are loaded, so a row costs a half or a quarter of the memory traffic and the
// arithmetic sees exactly the floats that from_bf16 or dequantize_int8 would give.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <xsimd/xsimd.hpp>

#include "../kv_storage.hpp"

// Loops over a compile-time number of queries or vectors are unrolled at any optimisation level:
// at -O2 GCC otherwise rolls them, keeps their accumulators in memory, and the kernel reads keys
// and values in L2 at 14 instead of 34-40 GB/s for a kv group's four queries (Zen 4).
#if defined(__clang__)
#define LONGHEADS_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LONGHEADS_UNROLL _Pragma("GCC unroll 16")
#else
#define LONGHEADS_UNROLL
#endif

namespace longheads::detail {

using float_batch = xsimd::batch<float>;
inline constexpr std::ptrdiff_t simd_width = static_cast<std::ptrdiff_t>(float_batch::size);

/// The sum of a batch's lanes: the one place the library names xsimd's reduction, which xsimd 8
/// calls hadd and later releases reduce_add (hadd deprecated in 9, then removed).
template <class Batch>
inline auto reduce_add(const Batch& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(x);
#else
  return xsimd::hadd(x);
#endif
}

/// How key or value rows are read: a pointer to fp32 or bf16 elements, or int8_rows. Each moves
/// like a pointer (rows + n) and reads elements (rows[i], through to_float).
template <class T>
concept kv_rows = std::same_as<T, int8_rows> ||
                  (std::is_pointer_v<T> && (std::same_as<std::remove_cv_t<std::remove_pointer_t<T>>, float> ||
                                            std::same_as<std::remove_cv_t<std::remove_pointer_t<T>>, bf16>));

/// Bytes one element of such rows takes in memory (scales aside).
template <kv_rows Rows>
inline constexpr std::ptrdiff_t element_bytes = [] {
  if constexpr (std::is_pointer_v<Rows>) return static_cast<std::ptrdiff_t>(sizeof(std::remove_pointer_t<Rows>));
  else return std::ptrdiff_t{1};
}();

/// Where an element of such rows is in memory (for prefetching).
template <class T>
inline const void* address_of(const T* p) noexcept { return p; }
inline const void* address_of(const int8_rows& p) noexcept { return p.elements + p.at; }

inline float_batch load_floats(const float* p) noexcept { return float_batch::load_unaligned(p); }

/// simd_width bf16 values widened to floats (exact: a bf16 is the upper half of a float).
/// A template only so that the branch for the other vector width is never instantiated.
template <class Batch = float_batch>
inline Batch load_floats(const bf16* p) noexcept {
  // xsimd 8 has no widening load that stays in registers (its generic one goes through a
  // stack buffer, which costs a store-forwarding stall per load), so the x86 paths are spelled out.
#if defined(__AVX512F__)
  if constexpr (Batch::size == 16 && std::is_base_of_v<xsimd::avx512f, typename Batch::arch_type>)
    return Batch(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)));
#endif
#if defined(__AVX2__)
  if constexpr (Batch::size == 8 && std::is_base_of_v<xsimd::avx2, typename Batch::arch_type>)
    return Batch(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
#endif
  alignas(Batch::arch_type::alignment()) float wide[Batch::size];
  from_bf16(p, wide, Batch::size);
  return Batch::load_aligned(wide);
}

/// simd_width int8 elements times their block's scale, widened to floats (exact: a 7-bit
/// integer times a bf16). On x86 one scale for the whole vector when a block holds at least a
/// vector (rows of a multiple of 32, the loads starting at multiples of the width), broadcast
/// as 16-bit lanes straight from memory and shifted into place as a float's upper half: through
/// a general register (movd, then a broadcast) the int8 kernel ran at a third of the speed (Zen
/// 4, four queries over keys and values in L2). Else lane by lane.
template <class Batch = float_batch>
inline Batch load_floats(const int8_rows& p) noexcept {
  if ((std::ptrdiff_t{1} << p.block_shift) >= static_cast<std::ptrdiff_t>(Batch::size)) {
    [[maybe_unused]] const std::int8_t* e = p.elements + p.at;
    [[maybe_unused]] const auto bits = static_cast<short>(p.scales[p.at >> p.block_shift]);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if constexpr (Batch::size == 16 && std::is_base_of_v<xsimd::avx512f, typename Batch::arch_type>)
      return Batch(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e))))) *
             Batch(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi16(bits), 16)));
#endif
#if defined(__AVX2__)
    if constexpr (Batch::size == 8 && std::is_base_of_v<xsimd::avx2, typename Batch::arch_type>)
      return Batch(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e))))) *
             Batch(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(bits), 16)));
#endif
  }
  alignas(Batch::arch_type::alignment()) float wide[Batch::size];
  for (std::size_t j = 0; j < Batch::size; ++j) wide[j] = p[static_cast<std::ptrdiff_t>(j)];
  return Batch::load_aligned(wide);
}

/// Keeps a loaded key or value vector in a register for the FMAs of several queries. GCC
/// otherwise folds the load into each FMA as a memory operand, loading it once per query, and
/// the load ports become the bound: a cache row need not start on a cache line (glibc puts a
/// large block 16 bytes past a page), and then every vector load touches two lines. Four
/// queries over keys and values in L2: 42 -> 28 ns per key (Zen 4).
inline void loaded_once([[maybe_unused]] float_batch& x) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(x.data));
#endif
}

/// a * b + c, rounded once. xsimd 8.1 has no AVX-512 fma: it computes a * b + c through two
/// intrinsics, which GCC fuses but clang does not (a multiply and an add, rounded twice, so
/// clang builds gave other bits than GCC builds).
inline float_batch fma(const float_batch& a, const float_batch& b, const float_batch& c) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, float_batch::arch_type>) return float_batch(_mm512_fmadd_ps(a, b, c));
#endif
  return xsimd::fma(a, b, c);
}

/// xsimd::exp, inlined whole into the caller: where GCC 12 keeps xsimd's exp out of line, it
/// warns -Wuninitialized in avx512fintrin.h (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
[[gnu::always_inline, gnu::flatten]]
#endif
inline float_batch exp(const float_batch& x) noexcept {
  return xsimd::exp(x);
}

inline float to_float(float x) noexcept { return x; }
inline float to_float(bf16 x) noexcept { return from_bf16(x); }

/// out[r] = a[r] . b for R rows sharing b. Every row goes through exactly the sequence of
/// operations of dot(a[r], b, n), so results do not depend on R: callers rely on that for
/// split-invariant scores (matmul.hpp).
template <std::size_t R>
inline void dot_rows(const float* const (&a)[R], const float* b, std::ptrdiff_t n, float (&out)[R]) noexcept {
  // Two accumulators per row hide the FMA latency; more buys nothing at head_dim <= 256.
  float_batch acc0[R], acc1[R];
  LONGHEADS_UNROLL
  for (std::size_t r = 0; r < R; ++r) acc0[r] = acc1[r] = float_batch(0.0f);
  std::ptrdiff_t i = 0;
  for (; i + 2 * simd_width <= n; i += 2 * simd_width) {
    const float_batch b0 = float_batch::load_unaligned(b + i), b1 = float_batch::load_unaligned(b + i + simd_width);
    LONGHEADS_UNROLL
    for (std::size_t r = 0; r < R; ++r) {
      acc0[r] = detail::fma(float_batch::load_unaligned(a[r] + i), b0, acc0[r]);
      acc1[r] = detail::fma(float_batch::load_unaligned(a[r] + i + simd_width), b1, acc1[r]);
    }
  }
  for (; i + simd_width <= n; i += simd_width) {
    const float_batch b0 = float_batch::load_unaligned(b + i);
    LONGHEADS_UNROLL
    for (std::size_t r = 0; r < R; ++r) acc0[r] = detail::fma(float_batch::load_unaligned(a[r] + i), b0, acc0[r]);
  }
  LONGHEADS_UNROLL
  for (std::size_t r = 0; r < R; ++r) {
    float sum = reduce_add(acc0[r] + acc1[r]);
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

/// Lane j = the sum of rows[j]'s lanes, for simd_width rows at once (a transposing reduction:
/// about two shuffles and adds per row instead of a full reduction each). Lane j depends only on
/// rows[j], summed in a fixed order. (xsimd 8.1's haddp permutes some lanes on AVX-512, so the
/// x86 paths are spelled out; elsewhere each row is reduced with reduce_add.)
template <class Batch = float_batch>
inline Batch sum_rows(const Batch* rows) noexcept {
#if defined(__AVX512F__) && defined(__GNUC__)
  // Vector shuffles rather than the _mm512 intrinsics, which pass _mm512_undefined_ps() and so
  // make GCC 12 warn -Wuninitialized in every file that inlines this (GCC bug 105593).
  if constexpr (Batch::size == 16 && std::is_base_of_v<xsimd::avx512f, typename Batch::arch_type>) {
    auto pairs = [](__m512 a, __m512 b) -> __m512 {  // per 64-bit pair: [a, b], each a sum of that pair
      return __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
             __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
    };
    auto quads = [&](const Batch* r) -> __m512 {  // per 128-bit block: [r0, r1, r2, r3], each a sum of that block
      const __m512 lo = pairs(r[0], r[1]), hi = pairs(r[2], r[3]);
      return __builtin_shufflevector(lo, hi, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
             __builtin_shufflevector(lo, hi, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    };
    const __m512 a = quads(rows), b = quads(rows + 4), c = quads(rows + 8), d = quads(rows + 12);
    const __m512 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    return Batch(__m512(__builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                        __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)));
  }
#endif
#if defined(__AVX__)
  if constexpr (Batch::size == 8 && std::is_base_of_v<xsimd::avx, typename Batch::arch_type>) {
    auto pairs = [](__m256 a, __m256 b) { return _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)); };
    auto quads = [&](const Batch* r) {
      const __m256d lo = _mm256_castps_pd(pairs(r[0], r[1])), hi = _mm256_castps_pd(pairs(r[2], r[3]));
      return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(lo, hi)), _mm256_castpd_ps(_mm256_unpackhi_pd(lo, hi)));
    };
    const __m256 a = quads(rows), b = quads(rows + 4);
    return Batch(_mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)));
  }
#endif
  alignas(Batch::arch_type::alignment()) float sums[Batch::size];
  for (std::size_t j = 0; j < Batch::size; ++j) sums[j] = reduce_add(rows[j]);
  return Batch::load_aligned(sums);
}

/// out[r][j] = q[r] . k_j for R queries and the count <= simd_width rows k_j = k + j * n. The
/// rows are read one after another, each in address order and once for all R queries: from
/// memory that is one sequential stream, the hardware prefetcher's best case (walking the block
/// column by column touches 16 lines at once, each for one load, and streamed at 40% of the
/// rate). Each query keeps one accumulator per row; a query's rows are reduced together by one
/// transposing horizontal add (instead of one reduction per row), then the tail of n past the
/// last whole vector is added row by row. A result depends only on its query and its row, never
/// on R, count or the other rows. Writes simd_width floats at each out[r].
template <std::size_t R, kv_rows K>
inline void dot_block(const float* const (&q)[R], K k, std::ptrdiff_t count, std::ptrdiff_t n, float* const (&out)[R]) noexcept {
  const std::ptrdiff_t vectors = n - n % simd_width;
  float_batch acc[R][simd_width];
  // For a whole block of the common head dims the row count and length are compile-time
  // constants: the loops unroll and every key address is a constant offset from k.
  auto rows = [&](auto row_count, auto length) {
    for (std::ptrdiff_t j = 0; j < row_count; ++j) {
      float_batch row[R];
      LONGHEADS_UNROLL
      for (auto& a : row) a = float_batch(0.0f);
      // The same loop twice: unrolled when the length is a compile-time constant (as a plain
      // constexpr bound: GCC ignores the pragma on a bound that converts an integral_constant),
      // left alone otherwise (clang warns when it cannot unroll a loop it was told to).
      if constexpr (requires { decltype(length)::value; }) {
        constexpr std::ptrdiff_t vectors_in_row = decltype(length)::value / simd_width;
        LONGHEADS_UNROLL
        for (std::ptrdiff_t v = 0; v < vectors_in_row; ++v) {
          float_batch key = load_floats(k + j * length + v * simd_width);
          if constexpr (R > 1) loaded_once(key);
          LONGHEADS_UNROLL
          for (std::size_t r = 0; r < R; ++r) row[r] = detail::fma(float_batch::load_unaligned(q[r] + v * simd_width), key, row[r]);
        }
      } else {
        for (std::ptrdiff_t v = 0; v < length / simd_width; ++v) {
          float_batch key = load_floats(k + j * length + v * simd_width);
          if constexpr (R > 1) loaded_once(key);
          LONGHEADS_UNROLL
          for (std::size_t r = 0; r < R; ++r) row[r] = detail::fma(float_batch::load_unaligned(q[r] + v * simd_width), key, row[r]);
        }
      }
      LONGHEADS_UNROLL
      for (std::size_t r = 0; r < R; ++r) acc[r][j] = row[r];
    }
  };
  using whole = std::integral_constant<std::ptrdiff_t, simd_width>;
  if (count == simd_width && n == 128) {
    rows(whole{}, std::integral_constant<std::ptrdiff_t, 128>{});
  } else if (count == simd_width && n == 64) {
    rows(whole{}, std::integral_constant<std::ptrdiff_t, 64>{});
  } else {
    rows(count, n);
    LONGHEADS_UNROLL
    for (std::size_t r = 0; r < R; ++r)
      for (std::ptrdiff_t j = count; j < simd_width; ++j) acc[r][j] = float_batch(0.0f);
  }
  LONGHEADS_UNROLL
  for (std::size_t r = 0; r < R; ++r) {
    sum_rows(acc[r]).store_unaligned(out[r]);
    if (vectors == n) continue;
    for (std::ptrdiff_t j = 0; j < count; ++j)
      for (std::ptrdiff_t i = vectors; i < n; ++i) out[r][j] = std::fma(q[r][i], to_float(k[j * n + i]), out[r][j]);
  }
}

// ---------------------------------------------------------------- int8 keys: quantized queries
// Widening int8 keys to floats costs more than the bytes save (an int-to-float conversion and a
// scale per 16 elements: 5.4 ns per row of 128 for one query against bf16's 3.2, Zen 4), so
// int8 keys meet an int8 query, as in llama.cpp's q8_0 and SageAttention: the query is quantized
// with one scale for its whole row (q = round(x / s), s = its largest magnitude / 127), each key
// block's dot product with it is an exact integer (64 byte products per VNNI instruction), and
// only those sums meet the scales:
//   logit = query scale * sum over key blocks b of (key scale_b * integer dot product_b).
// One query scale, not one per block: the block scales of the keys already differ per row and
// block, and a second per-block factor would cost a multiply per query and vector (the kernel's
// bound for a kv group's four queries). What this rounds is the query, to within 1/254 of its
// largest element, beside the cache's rounding of the key to 1/254 of its block's.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LONGHEADS_INT8_DOT_VNNI 1
#endif

/// A query quantized for int8 keys (quantize_query): its int8 elements and one scale, and the
/// offsets the vector loop starts each block's lanes from (per 64 elements 16 lanes, lane l
/// summing block 2v + l / 8).
struct quantized_query {
  const std::int8_t* elements = nullptr;       ///< n, in [-127, 127]
  float scale = 0.0f;                          ///< the query is elements * scale
  const std::int32_t* lane_offsets = nullptr;  ///< -16 * the sum of the lane's block of elements
};

/// Floats of room quantize_query needs for a query of n elements.
constexpr std::size_t quantized_query_floats(std::ptrdiff_t n) noexcept { return static_cast<std::size_t>(n) + 64; }

/// Quantizes a query of n elements (blocks of `block`, as its keys') into `room`
/// (quantized_query_floats(n) floats): scale = largest magnitude / 127, elements =
/// round-to-nearest-even(x / scale); an all-zero query has scale 0 and elements 0, a query with
/// a non-finite element scale NaN and elements 0.
inline quantized_query quantize_query(const float* query, std::ptrdiff_t n, int block, float* room) noexcept {
  const std::ptrdiff_t lanes = (n + 63) / 64 * 16;
  auto* lane_offsets = reinterpret_cast<std::int32_t*>(room);
  auto* elements = reinterpret_cast<std::int8_t*>(room + lanes);
  float_batch largest(0.0f);
  auto finite = float_batch(0.0f) == float_batch(0.0f);
  const std::ptrdiff_t vectors = n - n % simd_width;
  for (std::ptrdiff_t i = 0; i < vectors; i += simd_width) {
    const float_batch a = xsimd::abs(float_batch::load_unaligned(query + i));
    finite = finite && (a <= float_batch(std::numeric_limits<float>::max()));  // false for NaN too
    largest = xsimd::max(largest, a);
  }
  alignas(float_batch::arch_type::alignment()) float wide[simd_width];
  largest.store_aligned(wide);
  float amax = *std::max_element(wide, wide + simd_width);
  bool all_finite = xsimd::all(finite);
  for (std::ptrdiff_t i = vectors; i < n; ++i) {
    all_finite &= std::isfinite(query[i]);
    amax = std::max(amax, std::abs(query[i]));
  }
  // A non-finite query (reject_nonfinite off) gets scale NaN: its logits are NaN, as in fp32.
  const float scale = all_finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
  if (scale == 0.0f || !all_finite) {
    std::fill(elements, elements + n, std::int8_t{0});
  } else {
    for (std::ptrdiff_t i = 0; i < vectors; i += simd_width) {
      alignas(float_batch::arch_type::alignment()) std::int32_t ints[simd_width];
      const float_batch q = xsimd::nearbyint(float_batch::load_unaligned(query + i) / float_batch(scale));
      xsimd::batch_cast<std::int32_t>(xsimd::min(xsimd::max(q, float_batch(-127.0f)), float_batch(127.0f))).store_aligned(ints);
      for (std::ptrdiff_t j = 0; j < simd_width; ++j) elements[i + j] = static_cast<std::int8_t>(ints[j]);
    }
    for (std::ptrdiff_t i = vectors; i < n; ++i) elements[i] = static_cast<std::int8_t>(std::clamp(std::nearbyint(query[i] / scale), -127.0f, 127.0f));
  }
  if (block == 32) {
    for (std::ptrdiff_t b = 0; b * 32 < n; ++b) {
      std::int32_t sum = 0;
      for (std::ptrdiff_t e = 0; e < 32; ++e) sum += elements[b * 32 + e];
      const std::int32_t offset = -16 * sum;  // 8 lanes, 4 bytes each of key + 128: -128 * sum in all
      for (std::ptrdiff_t l = 0; l < 8; ++l) std::memcpy(lane_offsets + b * 8 + l, &offset, sizeof offset);
    }
    for (std::ptrdiff_t l = n / 4; l < lanes; ++l) std::memset(lane_offsets + l, 0, sizeof(std::int32_t));  // a half group's rest
  }
  return {elements, scale, lane_offsets};
}

/// out[r][j] = the logit of quantized query q[r] and int8 key row k_j = k + j * n (the formula
/// above), for R queries and count <= simd_width rows read once for all of them; like the float
/// dot_block, a result depends only on its query and its row. Writes simd_width floats at each
/// out[r] (0 past count).
template <std::size_t R>
inline void dot_block(const quantized_query (&q)[R], int8_rows k, std::ptrdiff_t count, std::ptrdiff_t n, float* const (&out)[R]) noexcept {
#if defined(LONGHEADS_INT8_DOT_VNNI)
  if constexpr (simd_width == 16) {
    if (k.block_shift == 5 && n % 32 == 0) {
      // Per 64 bytes of a key row: the bytes as unsigned (k + 128; the query's lane offsets take
      // the 128 back out), one vpdpbusd per query summing each block's 32 products into 8 lanes,
      // converted (exact: |sum| < 2^24) and times the lanes' key scale.
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
      // Word 2i + 1 of lane i takes scale word i / 8 (the lane's block); even words are zeroed.
      const __m512i spread = _mm512_set_epi16(1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
      float_batch acc[R][simd_width];
      auto rows = [&](auto length) {
        const std::ptrdiff_t groups = length / 64;
        // The queries' vectors in registers across the rows where the head dim is a constant
        // (R = 4, d = 128: 16 of the 32; loaded per row they made the load ports the bound).
        constexpr std::ptrdiff_t held = [] {
          if constexpr (requires { decltype(length)::value; }) return decltype(length)::value / 64;
          else return std::ptrdiff_t{0};
        }();
        __m512i held_elements[R][held > 0 ? held : 1], held_offsets[R][held > 0 ? held : 1];
        LONGHEADS_UNROLL
        for (std::size_t r = 0; r < R; ++r)
          LONGHEADS_UNROLL
          for (std::ptrdiff_t v = 0; v < held; ++v) {
            held_elements[r][v] = _mm512_loadu_si512(q[r].elements + 64 * v);
            held_offsets[r][v] = _mm512_loadu_si512(q[r].lane_offsets + 16 * v);
          }
        for (std::ptrdiff_t j = 0; j < count; ++j) {
          const std::int8_t* row = k.elements + k.at + j * length;
          const bf16* row_scales = k.scales + ((k.at + j * length) >> 5);
          __m512 sum[R];
          auto group = [&](auto v) {
            const __m512i key = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * v), flip);
            std::int32_t pair;
            std::memcpy(&pair, row_scales + 2 * v, sizeof pair);
            const __m512 key_scales = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, spread, _mm512_set1_epi32(pair)));
            LONGHEADS_UNROLL
            for (std::size_t r = 0; r < R; ++r) {
              __m512i elements, offsets;
              if constexpr (held > 0) {
                elements = held_elements[r][v];
                offsets = held_offsets[r][v];
              } else {
                elements = _mm512_loadu_si512(q[r].elements + 64 * v);
                offsets = _mm512_loadu_si512(q[r].lane_offsets + 16 * v);
              }
              const __m512 dots = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(offsets, key, elements));
              sum[r] = v == 0 ? _mm512_mul_ps(dots, key_scales) : _mm512_fmadd_ps(dots, key_scales, sum[r]);
            }
          };
          // Unrolled for the common head dims (a constexpr bound, as in the float dot_block).
          if constexpr (requires { decltype(length)::value; }) {
            constexpr std::ptrdiff_t whole_groups = decltype(length)::value / 64;
            LONGHEADS_UNROLL
            for (std::ptrdiff_t v = 0; v < whole_groups; ++v) group(v);
          } else {
            for (std::ptrdiff_t v = 0; v < groups; ++v) group(v);
          }
          if (length % 64 != 0) {  // a last block of 32: half a vector
            const __m256i key = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * groups)), _mm512_castsi512_si256(flip));
            const __m256 key_scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(static_cast<short>(row_scales[2 * groups])), 16));
            LONGHEADS_UNROLL
            for (std::size_t r = 0; r < R; ++r) {
              const __m256i dots = _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r].lane_offsets + 16 * groups)), key,
                                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r].elements + 64 * groups)));
              const __m512 part = _mm512_zextps256_ps512(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), key_scale));
              sum[r] = groups == 0 ? part : _mm512_add_ps(sum[r], part);
            }
          }
          LONGHEADS_UNROLL
          for (std::size_t r = 0; r < R; ++r) acc[r][j] = float_batch(sum[r]);
        }
      };
      if (n == 128) rows(std::integral_constant<std::ptrdiff_t, 128>{});
      else if (n == 64) rows(std::integral_constant<std::ptrdiff_t, 64>{});
      else rows(n);
      LONGHEADS_UNROLL
      for (std::size_t r = 0; r < R; ++r) {
        for (std::ptrdiff_t j = count; j < simd_width; ++j) acc[r][j] = float_batch(0.0f);
        (sum_rows(acc[r]) * float_batch(q[r].scale)).store_unaligned(out[r]);
      }
      return;
    }
  }
#elif defined(__AVX2__)
  if constexpr (simd_width == 8) {
    if (k.block_shift == 5 && n % 32 == 0) {
      // Per key block (one vector of 32 bytes): |k| times the query with k's sign, in 16-bit
      // pairs (at most 2 * 127 * 127: no saturation, as no byte is -128), then summed into 8
      // lanes of 32 bits, converted and times the block's scale.
      const __m256i ones = _mm256_set1_epi16(1);
      float_batch acc[R][simd_width];
      for (std::ptrdiff_t j = 0; j < count; ++j) {
        const std::int8_t* row = k.elements + k.at + j * n;
        const bf16* row_scales = k.scales + ((k.at + j * n) >> 5);
        __m256 sum[R];
        LONGHEADS_UNROLL
        for (auto& x : sum) x = _mm256_setzero_ps();
        for (std::ptrdiff_t b = 0; b < n / 32; ++b) {
          const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * b));
          const __m256i magnitude = _mm256_abs_epi8(key);
          const __m256 key_scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(static_cast<short>(row_scales[b])), 16));
          LONGHEADS_UNROLL
          for (std::size_t r = 0; r < R; ++r) {
            const __m256i signed_query = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r].elements + 32 * b)), key);
            const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_query), ones));
            sum[r] = _mm256_fmadd_ps(dots, key_scale, sum[r]);
          }
        }
        LONGHEADS_UNROLL
        for (std::size_t r = 0; r < R; ++r) acc[r][j] = float_batch(sum[r]);
      }
      LONGHEADS_UNROLL
      for (std::size_t r = 0; r < R; ++r) {
        for (std::ptrdiff_t j = count; j < simd_width; ++j) acc[r][j] = float_batch(0.0f);
        (sum_rows(acc[r]) * float_batch(q[r].scale)).store_unaligned(out[r]);
      }
      return;
    }
  }
#endif
  // Elsewhere: per row, each block's integer dot product times its scale, in block order.
  const int block = 1 << k.block_shift;
  for (std::size_t r = 0; r < R; ++r) {
    for (std::ptrdiff_t j = 0; j < count; ++j) {
      const std::ptrdiff_t at = k.at + j * n;
      float sum = 0.0f;
      for (std::ptrdiff_t b = 0; b * block < n; ++b) {
        std::int32_t dot = 0;
        for (std::ptrdiff_t i = b * block; i < (b + 1) * block; ++i) dot += std::int32_t{k.elements[at + i]} * q[r].elements[i];
        sum = std::fma(static_cast<float>(dot), from_bf16(k.scales[(at >> k.block_shift) + b]), sum);
      }
      out[r][j] = sum * q[r].scale;
    }
    for (std::ptrdiff_t j = count; j < simd_width; ++j) out[r][j] = 0.0f;
  }
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
  float sum = reduce_add(acc0 + acc1);
  for (; i < n; ++i) sum += std::max(q[i] * lo[i], q[i] * hi[i]);
  return sum;
}

/// bound_dot of `q` with `count` rows [lo | hi] of 2n floats each, `stride` floats apart, into
/// out[0..count): four rows at a time, each with bound_dot's own operations in its order (the
/// same bits), so that one row's reduction overlaps the next rows' products.
inline void bound_dot_rows(const float* q, const float* rows, std::ptrdiff_t stride, std::ptrdiff_t count, std::ptrdiff_t n,
                           float* out) noexcept {
  constexpr std::ptrdiff_t block = 4;
  std::ptrdiff_t r0 = 0;
  for (; r0 + block <= count; r0 += block) {
    float_batch acc0[block], acc1[block];
    LONGHEADS_UNROLL for (std::ptrdiff_t r = 0; r < block; ++r) acc0[r] = acc1[r] = float_batch(0.0f);
    std::ptrdiff_t i = 0;
    for (; i + 2 * simd_width <= n; i += 2 * simd_width) {
      const float_batch q0 = float_batch::load_unaligned(q + i), q1 = float_batch::load_unaligned(q + i + simd_width);
      LONGHEADS_UNROLL for (std::ptrdiff_t r = 0; r < block; ++r) {
        const float* lo = rows + (r0 + r) * stride;
        const float* hi = lo + n;
        acc0[r] += xsimd::max(q0 * float_batch::load_unaligned(lo + i), q0 * float_batch::load_unaligned(hi + i));
        acc1[r] += xsimd::max(q1 * float_batch::load_unaligned(lo + i + simd_width), q1 * float_batch::load_unaligned(hi + i + simd_width));
      }
    }
    for (; i + simd_width <= n; i += simd_width) {
      const float_batch q0 = float_batch::load_unaligned(q + i);
      LONGHEADS_UNROLL for (std::ptrdiff_t r = 0; r < block; ++r) {
        const float* lo = rows + (r0 + r) * stride;
        acc0[r] += xsimd::max(q0 * float_batch::load_unaligned(lo + i), q0 * float_batch::load_unaligned(lo + n + i));
      }
    }
    LONGHEADS_UNROLL for (std::ptrdiff_t r = 0; r < block; ++r) {
      const float* lo = rows + (r0 + r) * stride;
      float sum = reduce_add(acc0[r] + acc1[r]);
      for (std::ptrdiff_t j = i; j < n; ++j) sum += std::max(q[j] * lo[j], q[j] * lo[n + j]);
      out[r0 + r] = sum;
    }
  }
  for (; r0 < count; ++r0) out[r0] = bound_dot(q, rows + r0 * stride, rows + r0 * stride + n, n);
}

/// y += alpha * x
inline void axpy(float alpha, const float* x, float* y, std::ptrdiff_t n) noexcept {
  const float_batch a(alpha);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width)
    detail::fma(a, float_batch::load_unaligned(x + i), float_batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// Rows a caller reads after the current ones (same width), or none.
template <kv_rows X>
struct upcoming_rows {
  X rows{};
  std::ptrdiff_t count = 0;
};

/// Asks for the line holding p in L1, for a read soon.
inline void prefetch_line([[maybe_unused]] const void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

/// y[r] += alpha[r][j] * x_j for the rows x_j = x + j * stride, j < rows, in j order: per
/// element exactly the operations of axpy(alpha[r][j], x_j, y[r], n) row by row, but each block
/// of y stays in registers across the rows instead of going through memory once per row. Row j
/// of `upcoming` (the same columns) is prefetched alongside row j.
template <std::size_t R, std::size_t B, kv_rows X>
inline void accumulate_block(const float* const (&alpha)[R], X x, std::ptrdiff_t rows, std::ptrdiff_t stride,
                             float* const (&y)[R], std::ptrdiff_t column, upcoming_rows<X> upcoming = {}) noexcept {
  float_batch acc[R][B];
  LONGHEADS_UNROLL
  for (std::size_t r = 0; r < R; ++r)
    LONGHEADS_UNROLL
    for (std::size_t b = 0; b < B; ++b) acc[r][b] = float_batch::load_unaligned(y[r] + column + static_cast<std::ptrdiff_t>(b) * simd_width);
  for (std::ptrdiff_t j = 0; j < rows; ++j) {
    const X row = x + j * stride + column;
    float_batch a[R];
    LONGHEADS_UNROLL
    for (std::size_t r = 0; r < R; ++r) a[r] = float_batch(alpha[r][j]);
    LONGHEADS_UNROLL
    for (std::size_t b = 0; b < B; ++b) {
      constexpr std::ptrdiff_t line_elements = 64 / element_bytes<X>;
      if (j < upcoming.count && static_cast<std::ptrdiff_t>(b) * simd_width % line_elements == 0)
        prefetch_line(address_of(upcoming.rows + j * stride + column + static_cast<std::ptrdiff_t>(b) * simd_width));
      float_batch xb = load_floats(row + static_cast<std::ptrdiff_t>(b) * simd_width);
      if constexpr (R > 1) loaded_once(xb);
      LONGHEADS_UNROLL
      for (std::size_t r = 0; r < R; ++r) acc[r][b] = detail::fma(a[r], xb, acc[r][b]);
    }
  }
  LONGHEADS_UNROLL
  for (std::size_t r = 0; r < R; ++r)
    LONGHEADS_UNROLL
    for (std::size_t b = 0; b < B; ++b) acc[r][b].store_unaligned(y[r] + column + static_cast<std::ptrdiff_t>(b) * simd_width);
}

/// y[r] (n floats) += sum over j < rows of alpha[r][j] * x_j, x_j = x + j * n, accumulated in
/// j order: the bits of calling axpy once per row and output, whatever R. `upcoming` names the
/// rows the caller reads next, prefetched while a second pass re-reads x from L1 (a single pass
/// reading x from memory leaves them to the hardware prefetcher; SecondPass is internal).
template <std::size_t R, kv_rows X, bool SecondPass = false>
inline void accumulate_rows(const float* const (&alpha)[R], X x, std::ptrdiff_t rows, float* const (&y)[R], std::ptrdiff_t n,
                            upcoming_rows<X> upcoming = {}) noexcept {
  // Blocks as wide as fit in up to 16 accumulators (half the AVX-512 register file, so nothing
  // spills), narrowing only for what is left: a narrow block makes each accumulator a long
  // dependent chain of FMAs.
  const std::ptrdiff_t vectors = n - n % simd_width;
  if constexpr (R >= 2 && R % 2 == 0 && !std::same_as<X, int8_rows>) {
    // When R rows' accumulators for a whole row do not fit, two passes of R/2 read each row
    // whole and in order (the second from L1) instead of one pass walking the rows column
    // block by column block, which from memory streams at two thirds of the rate. (Not for
    // int8 rows: widening and scaling them twice cost more than the streaming order saves,
    // 13 -> 6 ns per value row for four queries, Zen 4; and a row of 128 int8 is two lines.)
    if (vectors / simd_width * static_cast<std::ptrdiff_t>(R) > 16) {
      constexpr std::size_t H = R / 2;
      const float* alpha_lo[H];
      const float* alpha_hi[H];
      float* y_lo[H];
      float* y_hi[H];
      std::copy(alpha, alpha + H, alpha_lo);
      std::copy(alpha + H, alpha + R, alpha_hi);
      std::copy(y, y + H, y_lo);
      std::copy(y + H, y + R, y_hi);
      accumulate_rows<H>(alpha_lo, x, rows, y_lo, n);
      // The second pass loads nothing from memory, and fills the out-of-order window so the
      // next rows' loads wait behind it: without these prefetches memory idles through it (the
      // value pass of four queries from memory: 27.6 -> 31.0 GB/s; dense decode of Llama-3-8B
      // at 128k: 53-56 -> 44 ms a step; Zen 5).
      accumulate_rows<H, X, true>(alpha_hi, x, rows, y_hi, n, upcoming);
      return;
    }
  }
  std::ptrdiff_t i = 0;
  auto blocks_of = [&]<std::size_t B>(std::integral_constant<std::size_t, B>) {
    if constexpr (B * R <= 16)
      for (; i + static_cast<std::ptrdiff_t>(B) * simd_width <= vectors; i += static_cast<std::ptrdiff_t>(B) * simd_width)
        accumulate_block<R, B>(alpha, x, rows, n, y, i, SecondPass ? upcoming : upcoming_rows<X>{});
  };
  blocks_of(std::integral_constant<std::size_t, 16>{});
  blocks_of(std::integral_constant<std::size_t, 8>{});
  blocks_of(std::integral_constant<std::size_t, 4>{});
  blocks_of(std::integral_constant<std::size_t, 2>{});
  blocks_of(std::integral_constant<std::size_t, 1>{});
  for (std::ptrdiff_t j = 0; j < rows; ++j)
    for (std::ptrdiff_t k = vectors; k < n; ++k)
      LONGHEADS_UNROLL
      for (std::size_t r = 0; r < R; ++r) y[r][k] += alpha[r][j] * to_float(x[j * n + k]);
}

/// y *= alpha
inline void scale(float alpha, float* y, std::ptrdiff_t n) noexcept {
  const float_batch a(alpha);
  std::ptrdiff_t i = 0;
  for (; i + simd_width <= n; i += simd_width) (a * float_batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

}  // namespace longheads::detail

#undef LONGHEADS_UNROLL
