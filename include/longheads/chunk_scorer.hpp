// SPDX-License-Identifier: MIT
// Query-key chunk scorer: how much a query wants each full chunk.
//
// Paper (raw_query_scorer): score(q, c) = q_raw . r_c, the query *before* RoPE against the
// chunk key built from locally rotated keys (what the authors' code does). For a block of m
// queries and n chunks this is a GEMM, Q_raw [m, d] x R^T [d, n], computed tile by tile with
// one fixed-order dot product per score (see matmul.hpp for why not Eigen's GEMM).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "attention_config.hpp"
#include "chunk_encoder.hpp"
#include "errors.hpp"
#include "matmul.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// A block of consecutive queries of one head and the chunks they may score.
struct scoring_inputs {
  matrix_view<const float> queries;          ///< [m, d] raw (pre-RoPE) queries
  std::int64_t first_position = 0;           ///< position of queries.row(0); rows are consecutive
  matrix_view<const float> representations;  ///< [n, representation_floats] chunks 0..n-1
  const rope* rotary = nullptr;              ///< the layer's RoPE, for scorers that rotate queries
  int chunk_size = 0;                        ///< w
};

/// Fills scores [m, n]; scratch_floats(cfg, m) floats of caller-owned scratch.
/// representation_floats(cfg) is what it reads per chunk; attention checks it against the
/// encoder's, so an encoder and a scorer that do not fit together are a config_error.
template <class S>
concept chunk_scorer = requires(const S& s, const attention_config& cfg, const scoring_inputs& in,
                                matrix_view<float> scores, std::span<float> scratch, std::ptrdiff_t m) {
  { s.representation_floats(cfg) } -> std::convertible_to<std::size_t>;
  { s.scratch_floats(cfg, m) } -> std::convertible_to<std::size_t>;
  { s.validate(cfg) } -> std::same_as<void>;
  { s.score(in, scores, scratch) } noexcept -> std::same_as<void>;
};

namespace detail {
/// The block's queries rotated by p mod w + offset_chunks * w: where a query stands relative
/// to the start of a chunk selected offset_chunks slots behind its own.
inline matrix_view<const float> rotate_queries(const scoring_inputs& in, int offset_chunks, std::span<float> scratch) noexcept {
  const std::ptrdiff_t m = in.queries.rows(), d = in.queries.cols();
  const matrix_view<float> rotated(scratch.data(), m, d);
  for (std::ptrdiff_t r = 0; r < m; ++r) {
    const std::int64_t p = in.first_position + r;
    in.rotary->rotate(in.queries.row(r), rotated.row(r), p % in.chunk_size + std::int64_t{offset_chunks} * in.chunk_size);
  }
  return rotated;
}
/// Scratch for rotate_queries: the block's rotated queries.
inline std::size_t rotated_queries_floats(const attention_config& cfg, std::ptrdiff_t m) noexcept {
  return static_cast<std::size_t>(m) * static_cast<std::size_t>(cfg.head_dim);
}
inline void check_offset(const char* who, int offset_chunks, const attention_config& cfg) {
  if (offset_chunks < 0 || offset_chunks >= cfg.budget_chunks)
    fail<config_error>(std::string(who) + ": offset_chunks must be in [0, budget_chunks = " + std::to_string(cfg.budget_chunks) +
                       "), got " + std::to_string(offset_chunks));
}
}  // namespace detail

/// The paper's scorer: q_raw . r_c.
struct raw_query_scorer {
  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept { return static_cast<std::size_t>(cfg.head_dim); }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config&, std::ptrdiff_t) const noexcept { return 0; }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config&) const {}
  /// Fills scores [m queries, n chunks] for a block of one head's consecutive queries.
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float>) const noexcept {
    matmul_nt(in.queries, in.representations, scores);
  }
};

/// Alternative: the query rotated to where it will stand relative to a chunk it selects,
/// R(p mod w + offset_chunks * w) q_raw . r_c. Chunk keys hold keys rotated at local offsets,
/// so this puts query and keys in the same frame the attention will use for a chunk
/// offset_chunks slots behind the query's chunk; q_raw is that frame only at distance 0.
struct rotated_query_scorer {
  /// Chunk offset the query is rotated to before scoring, in [0, budget_chunks).
  int offset_chunks = 1;

  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept { return static_cast<std::size_t>(cfg.head_dim); }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config& cfg, std::ptrdiff_t m) const noexcept { return detail::rotated_queries_floats(cfg, m); }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config& cfg) const { detail::check_offset("rotated_query_scorer", offset_chunks, cfg); }
  /// Fills scores [m queries, n chunks] for a block of one head's consecutive queries.
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float> scratch) const noexcept {
    matmul_nt(detail::rotate_queries(in, offset_chunks, scratch), in.representations, scores);
  }
};

/// Quest-style upper bound, with key_bounds_encoder ([min | max] per channel):
/// score = sum_i max(q_i lo_i, q_i hi_i) >= q . k for every key k of the chunk, q rotated as
/// in rotated_query_scorer. Cost per chunk: 2d multiply-max-adds.
struct bound_scorer {
  /// Chunk offset the query is rotated to before scoring, in [0, budget_chunks).
  int offset_chunks = 1;

  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept { return 2 * static_cast<std::size_t>(cfg.head_dim); }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config& cfg, std::ptrdiff_t m) const noexcept { return detail::rotated_queries_floats(cfg, m); }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config& cfg) const { detail::check_offset("bound_scorer", offset_chunks, cfg); }
  /// Fills scores [m queries, n chunks] for a block of one head's consecutive queries.
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float> scratch) const noexcept {
    const matrix_view<const float> q = detail::rotate_queries(in, offset_chunks, scratch);
    const std::ptrdiff_t d = q.cols();
    for (std::ptrdiff_t r = 0; r < q.rows(); ++r)
      for (std::ptrdiff_t c = 0; c < in.representations.rows(); ++c) {
        const float* lo = in.representations.row(c);
        scores.row(r)[c] = detail::bound_dot(q.row(r), lo, lo + d, d);
      }
  }
};

/// With representative_keys_encoder{count}: the best match among the chunk's representative
/// keys, max_j q . k_j, q rotated as in rotated_query_scorer. Cost per chunk: count dots.
struct max_key_scorer {
  /// Keys kept per chunk, in [1, chunk_size].
  int count = 2;
  /// Chunk offset the query is rotated to before scoring, in [0, budget_chunks).
  int offset_chunks = 1;

  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(count) * static_cast<std::size_t>(cfg.head_dim);
  }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config& cfg, std::ptrdiff_t m) const noexcept { return detail::rotated_queries_floats(cfg, m); }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config& cfg) const {
    detail::check_offset("max_key_scorer", offset_chunks, cfg);
    if (count < 1) detail::fail<config_error>("max_key_scorer: count must be >= 1, got " + std::to_string(count));
  }
  /// Fills scores [m queries, n chunks] for a block of one head's consecutive queries.
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float> scratch) const noexcept {
    const matrix_view<const float> q = detail::rotate_queries(in, offset_chunks, scratch);
    const std::ptrdiff_t d = q.cols();
    for (std::ptrdiff_t r = 0; r < q.rows(); ++r)
      for (std::ptrdiff_t c = 0; c < in.representations.rows(); ++c) {
        const float* keys = in.representations.row(c);
        float best = detail::dot(q.row(r), keys, d);
        for (int j = 1; j < count; ++j) best = std::max(best, detail::dot(q.row(r), keys + j * d, d));
        scores.row(r)[c] = best;
      }
  }
};

static_assert(chunk_scorer<raw_query_scorer> && chunk_scorer<rotated_query_scorer> && chunk_scorer<bound_scorer> &&
              chunk_scorer<max_key_scorer>);

}  // namespace longheads
