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

#include <Eigen/Core>

#include "attention_config.hpp"
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
using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_matrix_map = Eigen::Map<const row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using matrix_map = Eigen::Map<row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
inline const_matrix_map eigen_map(matrix_view<const float> m) {
  return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.row_stride())};
}
inline matrix_map eigen_map(matrix_view<float> m) {
  return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.row_stride())};
}
}  // namespace detail

/// The paper's encoder (see the file comment). Cost per chunk: two w x w x d products.
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
    auto q = detail::eigen_map(in.queries);
    auto k = detail::eigen_map(in.keys);
    auto v = detail::eigen_map(in.values);
    Eigen::Map<detail::row_matrix> probs(scratch.data(), w, w);
    Eigen::Map<Eigen::RowVectorXf> column_mean(scratch.data() + w * w, w);
    Eigen::Map<Eigen::RowVectorXf> key_weights(scratch.data() + w * w + w, w);
    Eigen::Map<Eigen::RowVectorXf> summary(scratch.data() + w * w + 2 * w, d);
    probs.noalias() = (q * k.transpose()) * in.scale;
    for (std::ptrdiff_t r = 0; r < w; ++r) {
      auto row = probs.row(r);
      row = (row.array() - row.maxCoeff()).exp().matrix();
      row /= row.sum();
    }
    // mean_i (P V)_i = (mean_i P_i) V: one w-vector times V instead of a w x w x d product.
    column_mean.noalias() = probs.colwise().mean();
    summary.noalias() = column_mean * v;
    key_weights.noalias() = (summary * k.transpose()) * in.scale;
    key_weights = (key_weights.array() - key_weights.maxCoeff()).exp().matrix();
    key_weights /= key_weights.sum();
    Eigen::Map<Eigen::RowVectorXf>(representation.data(), d).noalias() = key_weights * k;
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
    auto k = detail::eigen_map(in.keys);
    Eigen::Map<Eigen::RowVectorXf>(representation.data(), k.cols()).noalias() = k.colwise().mean();
  }
};

static_assert(chunk_encoder<attention_pooled_encoder> && chunk_encoder<mean_key_encoder>);

}  // namespace longheads
