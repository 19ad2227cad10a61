// SPDX-License-Identifier: MIT
// Chunk encoder: one representation per full chunk and query head.
//
// Paper (attention_pooled_encoder), for chunk c, query head h and its kv head g, with queries
// and keys rotated at local positions j = t mod w:
//   O   = softmax(Q_loc K_loc^T / sqrt(d)) V          non-causal, w x w
//   s_c = mean over the w rows of O                   value-space summary, d
//   r_c = sum_j softmax_j(s_c . k_j / sqrt(d)) k_j    attention-weighted average of the keys
// A chunk is encoded once, when its last token arrives.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <span>

#include "attention_config.hpp"
#include "detail/simd.hpp"
#include "matmul.hpp"
#include "views.hpp"

namespace longheads {

/// What an encoder sees of one full chunk, for one query head.
struct chunk_inputs {
  matrix_view<const float> queries;  // [w, d] rotated at local positions 0..w-1
  matrix_view<const float> keys;     // [w, d] rotated at local positions 0..w-1
  matrix_view<const float> values;   // [w, d]
  float scale = 1.0f;                // 1/sqrt(d)
};

/// Builds the representation a chunk_scorer compares queries against.
/// representation_floats(cfg) floats per chunk and query head; scratch_floats(cfg) floats of
/// scratch owned by the caller (encoders never allocate).
template <class E>
concept chunk_encoder = requires(const E& e, const attention_config& cfg, const chunk_inputs& in,
                                 std::span<float> representation, std::span<float> scratch) {
  { e.representation_floats(cfg) } -> std::convertible_to<std::size_t>;
  { e.scratch_floats(cfg) } -> std::convertible_to<std::size_t>;
  { e.validate(cfg) } -> std::same_as<void>;
  { e.encode(in, representation, scratch) } noexcept -> std::same_as<void>;
};

namespace detail {
/// Softmax of x in place, in a fixed order: a representation must not depend on where its
/// scratch happens to be aligned (vectorised reductions that peel by address would).
inline void softmax_in_place(float* x, std::ptrdiff_t n) noexcept {
  float top = x[0];
  for (std::ptrdiff_t i = 1; i < n; ++i) top = std::max(top, x[i]);
  float sum = 0.0f;
  for (std::ptrdiff_t i = 0; i < n; ++i) sum += x[i] = std::exp(x[i] - top);
  scale(1.0f / sum, x, n);
}
}  // namespace detail

/// The paper's encoder (see the file comment). Cost per chunk: a w x w x d product plus
/// O(w d). Every step is a fixed-order loop, so the bits of a representation depend only on
/// the chunk, never on the thread, the buffer addresses or how the sequence was split.
struct attention_pooled_encoder {
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(cfg.head_dim);
  }
  std::size_t scratch_floats(const attention_config& cfg) const noexcept {
    const auto w = static_cast<std::size_t>(cfg.chunk_size);
    return w * w + 2 * w + static_cast<std::size_t>(cfg.head_dim);
  }
  void validate(const attention_config&) const {}

  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float> scratch) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    const matrix_view<float> probs(scratch.data(), w, w);
    float* column_mean = scratch.data() + w * w;
    float* key_weights = column_mean + w;
    float* summary = key_weights + w;
    matmul_nt(in.queries, in.keys, probs);  // Q K^T
    for (std::ptrdiff_t r = 0; r < w; ++r) {
      detail::scale(in.scale, probs.row(r), w);
      detail::softmax_in_place(probs.row(r), w);
    }
    // mean_i (P V)_i = (mean_i P_i) V: one w-vector times V instead of a w x w x d product.
    std::fill_n(column_mean, w, 0.0f);
    for (std::ptrdiff_t r = 0; r < w; ++r) detail::axpy(1.0f, probs.row(r), column_mean, w);
    std::fill_n(summary, d, 0.0f);
    for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(column_mean[j] / static_cast<float>(w), in.values.row(j), summary, d);
    for (std::ptrdiff_t j = 0; j < w; ++j) key_weights[j] = in.scale * detail::dot(summary, in.keys.row(j), d);
    detail::softmax_in_place(key_weights, w);
    std::fill_n(representation.data(), d, 0.0f);
    for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(key_weights[j], in.keys.row(j), representation.data(), d);
  }
};

/// Alternative: the plain mean of the chunk's locally rotated keys (no queries, no values).
struct mean_key_encoder {
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(cfg.head_dim);
  }
  std::size_t scratch_floats(const attention_config&) const noexcept { return 0; }
  void validate(const attention_config&) const {}
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float>) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    std::fill_n(representation.data(), d, 0.0f);
    for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(1.0f, in.keys.row(j), representation.data(), d);
    detail::scale(1.0f / static_cast<float>(w), representation.data(), d);
  }
};

static_assert(chunk_encoder<attention_pooled_encoder> && chunk_encoder<mean_key_encoder>);

}  // namespace longheads
