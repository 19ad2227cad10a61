// SPDX-License-Identifier: MIT
// Attention kernel: out = softmax(scale * q_rot . K_sel^T) V_sel over the selected keys.
//
// The keys are handed over as segments read in place (a chunk of the cache, or part of one),
// each with the query already rotated for it, so nothing is gathered into one buffer. The
// softmax is online (Milakov & Gimelshein 2018, as in FlashAttention): a running max m,
// denominator l and accumulator acc in fp32, rescaled whenever a segment raises the max.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "detail/simd.hpp"

namespace longheads {

/// Keys and values of `length` consecutive tokens of one kv head, rows of head_dim floats,
/// and the query rotated for them.
struct kv_segment {
  const float* query = nullptr;   ///< [d]
  const float* keys = nullptr;    ///< [length, d]
  const float* values = nullptr;  ///< [length, d]
  std::int32_t length = 0;        ///< tokens, >= 1
};

/// One query's online-softmax state between segments; its accumulator is the output row.
struct softmax_state {
  float running_max = -std::numeric_limits<float>::infinity();  ///< largest logit so far
  float denominator = 0.0f;                                      ///< sum of exp(logit - running_max) so far
};

/// A kernel streams segments into a query's output: begin(), consume() per segment in order,
/// finish(). The attention interleaves the segments of several queries (the heads of a kv
/// group, neighbouring queries of a prefill block) so each chunk is read from memory once for
/// all of them; a kernel must therefore keep all per-query state in `state` and `out`.
/// scratch_floats(max_segment_length, head_dim) floats of caller-owned scratch; segments are
/// non-empty and at most max_segment_length long.
template <class K>
concept attention_kernel = requires(const K& k, const kv_segment& segment, int head_dim, float scale, float* out,
                                    softmax_state& state, std::span<float> scratch, std::ptrdiff_t max_segment_length) {
  { k.scratch_floats(max_segment_length, head_dim) } -> std::convertible_to<std::size_t>;
  { k.begin(state, out, head_dim) } noexcept -> std::same_as<void>;
  { k.consume(segment, head_dim, scale, state, out, scratch) } noexcept -> std::same_as<void>;
  { k.finish(state, out, head_dim) } noexcept -> std::same_as<void>;
};

/// out = attention of one query over `segments`, in their order.
template <attention_kernel K>
void attend(const K& kernel, std::span<const kv_segment> segments, int head_dim, float scale, float* out,
            std::span<float> scratch) noexcept {
  softmax_state state;
  kernel.begin(state, out, head_dim);
  for (const kv_segment& segment : segments) kernel.consume(segment, head_dim, scale, state, out, scratch);
  kernel.finish(state, out, head_dim);
}

/// A kernel that also reads compact keys and values in place: consume_shared over `Rows` (a
/// `const bf16*` or int8_rows), widening them in registers. The attention hands other kernels a
/// compact chunk converted to fp32 in scratch, which costs a write and a re-read of a chunk
/// of fp32.
template <class K, class Rows>
concept kernel_reads_in_place = attention_kernel<K> && requires(const K& k, Rows rows, std::int32_t length, const float* const* queries,
                                                                std::size_t n, int head_dim, float scale, softmax_state* const* states,
                                                                float* const* outs, std::span<float> scratch) {
  { k.consume_shared(rows, rows, length, queries, n, head_dim, scale, states, outs, scratch) } noexcept;
};

/// A kernel that reads bf16 caches in place.
template <class K>
concept bf16_reading_kernel = kernel_reads_in_place<K, const bf16*>;

/// A kernel that reads int8 caches in place.
template <class K>
concept int8_reading_kernel = kernel_reads_in_place<K, int8_rows>;

/// Streams one segment of keys and values into n queries: in one pass with the kernel's
/// consume_shared() where it has one, else query by query with consume(). Compact rows only go
/// to a kernel that reads them in place.
template <attention_kernel K, detail::kv_rows Rows>
  requires std::convertible_to<Rows, const float*> || kernel_reads_in_place<K, Rows>
void consume_shared(const K& kernel, Rows keys, Rows values, std::int32_t length, const float* const* queries,
                    std::size_t n, int head_dim, float scale, softmax_state* const* states, float* const* outs,
                    std::span<float> scratch) noexcept {
  if constexpr (requires { kernel.consume_shared(keys, values, length, queries, n, head_dim, scale, states, outs, scratch); })
    kernel.consume_shared(keys, values, length, queries, n, head_dim, scale, states, outs, scratch);
  else
    for (std::size_t i = 0; i < n; ++i) kernel.consume({queries[i], keys, values, length}, head_dim, scale, *states[i], outs[i], scratch);
}

/// The default kernel: xsimd logits a block of keys at a time and a register-blocked value
/// pass, one pass over each segment's keys and values, shared by up to four queries
/// (consume_shared).
struct online_softmax_kernel {
  /// Floats of caller-owned scratch one call needs (policies never allocate): logits of up to
  /// four queries, each rounded up to whole batches, whose padding holds -inf so every
  /// probability goes through the same vector exp whatever the segment's length.
  std::size_t scratch_floats(std::ptrdiff_t max_segment_length, int head_dim) const noexcept {
    return 4 * static_cast<std::size_t>(padded(max_segment_length)) + 4 * detail::quantized_query_floats(head_dim);
  }

  /// Starts a query: resets the state and zeroes the output row.
  void begin(softmax_state& state, float* out, int head_dim) const noexcept {
    state = {};
    std::fill(out, out + head_dim, 0.0f);
  }

  /// Folds one segment into the query's running softmax and output row.
  void consume(const kv_segment& seg, int head_dim, float scale, softmax_state& state, float* out,
               std::span<float> scratch) const noexcept {
    const float* query[1] = {seg.query};
    softmax_state* states[1] = {&state};
    float* outs[1] = {out};
    consume_rows<1>(seg.keys, seg.values, seg.length, query, head_dim, scale, states, outs, scratch);
  }

  /// Normalises the output row once every segment has been consumed.
  void finish(const softmax_state& state, float* out, int head_dim) const noexcept {
    detail::scale(1.0f / state.denominator, out, head_dim);
  }

  /// consume() for n queries reading the same keys and values (a kv group's heads, or
  /// neighbouring queries of a block), each with its own rotated query, state and output: every
  /// key and value is loaded once for up to four queries. Each query's arithmetic is exactly
  /// consume()'s (dot_block and accumulate_rows guarantee it), so the results are the same bits. Keys
  /// and values may be bf16 or int8 (int8_rows), read in place: bf16 with the bits of consume()
  /// over the rows converted with from_bf16; int8 values with those of dequantize_int8's floats,
  /// int8 keys against each query quantized to int8 (detail::quantize_query: one scale per query,
  /// exact integer dot products per key block), within the query's rounding of the fp32 logits.
  template <detail::kv_rows Rows>
  void consume_shared(Rows keys, Rows values, std::int32_t length, const float* const* queries, std::size_t n,
                      int head_dim, float scale, softmax_state* const* states, float* const* outs,
                      std::span<float> scratch) const noexcept {
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) consume_rows<4>(keys, values, length, queries + i, head_dim, scale, states + i, outs + i, scratch);
    for (; i + 2 <= n; i += 2) consume_rows<2>(keys, values, length, queries + i, head_dim, scale, states + i, outs + i, scratch);
    for (; i < n; ++i) consume_rows<1>(keys, values, length, queries + i, head_dim, scale, states + i, outs + i, scratch);
  }

  /// The whole attention of one query over `segments`, in order.
  void attend(std::span<const kv_segment> segments, int head_dim, float scale, float* out, std::span<float> scratch) const noexcept {
    longheads::attend(*this, segments, head_dim, scale, out, scratch);
  }

 private:
  static std::ptrdiff_t padded(std::ptrdiff_t length) noexcept {
    return (length + detail::simd_width - 1) / detail::simd_width * detail::simd_width;
  }

  template <std::size_t R, detail::kv_rows Rows>
  void consume_rows(Rows keys, Rows values, std::int32_t length, const float* const* queries, int head_dim,
                    float scale, softmax_state* const* states, float* const* outs, std::span<float> scratch) const noexcept {
    const std::ptrdiff_t d = head_dim;
    const std::ptrdiff_t width = padded(length);
    float* logits[R];
    float* out[R];
    for (std::size_t r = 0; r < R; ++r) {
      logits[r] = scratch.data() + static_cast<std::ptrdiff_t>(r) * width;
      out[r] = outs[r];
    }
    // Logits a block of keys at a time for all R queries, each key loaded once. No software
    // prefetch here: the keys, then the values, are read in address order, which the hardware
    // prefetcher streams faster than bursts of prefetches would (24 vs 18 GB/s from memory);
    // only the value pass's second pass over a block, which loads nothing from memory,
    // prefetches the next block (accumulate_rows).
    constexpr auto key_block = static_cast<std::int32_t>(detail::simd_width);
    const float* query_rows[R];
    float* block_logits[R];
    std::copy(queries, queries + R, query_rows);
    if constexpr (std::same_as<Rows, int8_rows>) {
      // int8 keys meet the queries quantized in the keys' blocks (detail::dot_block's note);
      // the room past every logit.
      detail::quantized_query quantized[R];
      float* room = scratch.data() + scratch.size() - 4 * detail::quantized_query_floats(d);
      for (std::size_t r = 0; r < R; ++r)
        quantized[r] = detail::quantize_query(query_rows[r], d, 1 << keys.block_shift,
                                              room + static_cast<std::ptrdiff_t>(r * detail::quantized_query_floats(d)));
      for (std::int32_t j0 = 0; j0 < length; j0 += key_block) {
        for (std::size_t r = 0; r < R; ++r) block_logits[r] = logits[r] + j0;
        detail::dot_block(quantized, keys + j0 * d, std::min(key_block, length - j0), d, block_logits);
      }
    } else {
      for (std::int32_t j0 = 0; j0 < length; j0 += key_block) {
        for (std::size_t r = 0; r < R; ++r) block_logits[r] = logits[r] + j0;
        detail::dot_block(query_rows, keys + j0 * d, std::min(key_block, length - j0), d, block_logits);
      }
    }
    // Max, exp and sum in whole batches: the padding holds -inf, whose exp adds 0.
    using detail::float_batch;
    for (std::size_t r = 0; r < R; ++r) {
      for (std::ptrdiff_t j = 0; j < width; j += detail::simd_width)
        (float_batch(scale) * float_batch::load_unaligned(logits[r] + j)).store_unaligned(logits[r] + j);
      std::fill(logits[r] + length, logits[r] + width, -std::numeric_limits<float>::infinity());
      float_batch batch_max(-std::numeric_limits<float>::infinity());
      for (std::ptrdiff_t j = 0; j < width; j += detail::simd_width) batch_max = xsimd::max(batch_max, float_batch::load_unaligned(logits[r] + j));
      alignas(float_batch::arch_type::alignment()) float lanes[detail::simd_width];
      batch_max.store_aligned(lanes);
      const float segment_max = *std::max_element(lanes, lanes + detail::simd_width);
      softmax_state& state = *states[r];
      if (segment_max > state.running_max) {
        // exp(-inf) = 0 on the first segment, so the empty accumulator needs no special case.
        const float correction = std::exp(state.running_max - segment_max);
        state.denominator *= correction;
        detail::scale(correction, out[r], d);
        state.running_max = segment_max;
      }
      const float_batch shift(state.running_max);
      float_batch sum(0.0f);
      for (std::ptrdiff_t j = 0; j < width; j += detail::simd_width) {
        const float_batch p = detail::exp(float_batch::load_unaligned(logits[r] + j) - shift);
        p.store_unaligned(logits[r] + j);
        sum += p;
      }
      state.denominator += detail::reduce_add(sum);
    }
    // Values in blocks of rows small enough to stay in L1 while every column block of the
    // outputs sweeps them.
    constexpr std::int32_t block = 16;
    const float* probabilities[R];
    for (std::int32_t j0 = 0; j0 < length; j0 += block) {
      for (std::size_t r = 0; r < R; ++r) probabilities[r] = logits[r] + j0;
      const std::int32_t next = std::min(length, j0 + block);
      detail::accumulate_rows(probabilities, values + j0 * d, next - j0, out, d,
                              detail::upcoming_rows<Rows>{values + next * d, std::min(block, length - next)});
    }
  }
};

/// Alternative: plain scalar loops with the same online softmax, updated per key. Proves the
/// seam and is the baseline the SIMD kernel is benchmarked against.
struct scalar_online_softmax_kernel {
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(std::ptrdiff_t, int) const noexcept { return 0; }

  /// Starts a query: resets the state and zeroes the output row.
  void begin(softmax_state& state, float* out, int head_dim) const noexcept {
    state = {};
    std::fill(out, out + head_dim, 0.0f);
  }

  /// Folds one segment into the query's running softmax and output row.
  void consume(const kv_segment& seg, int head_dim, float scale, softmax_state& state, float* out,
               std::span<float>) const noexcept {
    for (std::int32_t j = 0; j < seg.length; ++j) {
      float logit = 0.0f;
      for (int i = 0; i < head_dim; ++i) logit += seg.query[i] * seg.keys[j * head_dim + i];
      logit *= scale;
      if (logit > state.running_max) {
        const float correction = std::exp(state.running_max - logit);
        state.denominator *= correction;
        for (int i = 0; i < head_dim; ++i) out[i] *= correction;
        state.running_max = logit;
      }
      const float p = std::exp(logit - state.running_max);
      state.denominator += p;
      for (int i = 0; i < head_dim; ++i) out[i] += p * seg.values[j * head_dim + i];
    }
  }

  /// Normalises the output row once every segment has been consumed.
  void finish(const softmax_state& state, float* out, int head_dim) const noexcept {
    for (int i = 0; i < head_dim; ++i) out[i] /= state.denominator;
  }

  /// The whole attention of one query over `segments`, in order.
  void attend(std::span<const kv_segment> segments, int head_dim, float scale, float* out, std::span<float> scratch) const noexcept {
    longheads::attend(*this, segments, head_dim, scale, out, scratch);
  }
};

static_assert(attention_kernel<online_softmax_kernel> && attention_kernel<scalar_online_softmax_kernel>);
static_assert(bf16_reading_kernel<online_softmax_kernel> && !bf16_reading_kernel<scalar_online_softmax_kernel>);
static_assert(int8_reading_kernel<online_softmax_kernel> && !int8_reading_kernel<scalar_online_softmax_kernel>);

}  // namespace longheads
