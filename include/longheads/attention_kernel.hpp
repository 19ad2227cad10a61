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
  const float* query = nullptr;   // [d]
  const float* keys = nullptr;    // [length, d]
  const float* values = nullptr;  // [length, d]
  std::int32_t length = 0;
};

/// attend() writes the head_dim outputs; scratch_floats(max_segment_length, head_dim) floats
/// of caller-owned scratch. Segments are non-empty and at most max_segment_length long.
template <class K>
concept attention_kernel = requires(const K& k, std::span<const kv_segment> segments, int head_dim, float scale,
                                    float* out, std::span<float> scratch, std::ptrdiff_t max_segment_length) {
  { k.scratch_floats(max_segment_length, head_dim) } -> std::convertible_to<std::size_t>;
  { k.attend(segments, head_dim, scale, out, scratch) } noexcept -> std::same_as<void>;
};

/// The default kernel: xsimd dot products and axpys, one pass over each segment's keys and values.
struct online_softmax_kernel {
  std::size_t scratch_floats(std::ptrdiff_t max_segment_length, int) const noexcept {
    // Rounded up to whole batches: the padding holds -inf, so every probability goes through
    // the same vector exp whatever the segment's length.
    return static_cast<std::size_t>((max_segment_length + detail::simd_width - 1) / detail::simd_width * detail::simd_width);
  }

  void attend(std::span<const kv_segment> segments, int head_dim, float scale, float* out,
              std::span<float> scratch) const noexcept {
    const std::ptrdiff_t d = head_dim;
    float running_max = -std::numeric_limits<float>::infinity();
    float denominator = 0.0f;
    std::fill(out, out + d, 0.0f);  // the accumulator lives in the output
    for (const kv_segment& seg : segments) {
      float* logits = scratch.data();
      float segment_max = -std::numeric_limits<float>::infinity();
      for (std::int32_t j = 0; j < seg.length; ++j) {
        logits[j] = scale * detail::dot(seg.query, seg.keys + j * d, d);
        segment_max = std::max(segment_max, logits[j]);
      }
      if (segment_max > running_max) {
        // exp(-inf) = 0 on the first segment, so the empty accumulator needs no special case.
        const float correction = std::exp(running_max - segment_max);
        denominator *= correction;
        detail::scale(correction, out, d);
        running_max = segment_max;
      }
      const std::ptrdiff_t padded = (seg.length + detail::simd_width - 1) / detail::simd_width * detail::simd_width;
      std::fill(logits + seg.length, logits + padded, -std::numeric_limits<float>::infinity());
      const detail::float_batch shift(running_max);
      for (std::ptrdiff_t j = 0; j < padded; j += detail::simd_width)
        xsimd::exp(detail::float_batch::load_unaligned(logits + j) - shift).store_unaligned(logits + j);
      for (std::int32_t j = 0; j < seg.length; ++j) {
        denominator += logits[j];
        detail::axpy(logits[j], seg.values + j * d, out, d);
      }
    }
    detail::scale(1.0f / denominator, out, d);
  }
};

/// Alternative: plain scalar loops with the same online softmax. Proves the seam and is the
/// baseline the SIMD kernel is benchmarked against.
struct scalar_online_softmax_kernel {
  std::size_t scratch_floats(std::ptrdiff_t, int) const noexcept { return 0; }
  void attend(std::span<const kv_segment> segments, int head_dim, float scale, float* out,
              std::span<float>) const noexcept {
    float running_max = -std::numeric_limits<float>::infinity();
    float denominator = 0.0f;
    std::fill(out, out + head_dim, 0.0f);
    for (const kv_segment& seg : segments) {
      for (std::int32_t j = 0; j < seg.length; ++j) {
        float logit = 0.0f;
        for (int i = 0; i < head_dim; ++i) logit += seg.query[i] * seg.keys[j * head_dim + i];
        logit *= scale;
        if (logit > running_max) {
          const float correction = std::exp(running_max - logit);
          denominator *= correction;
          for (int i = 0; i < head_dim; ++i) out[i] *= correction;
          running_max = logit;
        }
        const float p = std::exp(logit - running_max);
        denominator += p;
        for (int i = 0; i < head_dim; ++i) out[i] += p * seg.values[j * head_dim + i];
      }
    }
    for (int i = 0; i < head_dim; ++i) out[i] /= denominator;
  }
};

static_assert(attention_kernel<online_softmax_kernel> && attention_kernel<scalar_online_softmax_kernel>);

}  // namespace longheads
