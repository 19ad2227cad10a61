// SPDX-License-Identifier: MIT
// Query-key chunk scorer: how much a query wants each full chunk.
//
// Paper (raw_query_scorer): score(q, c) = q_raw . r_c, the query *before* RoPE against the
// chunk key built from locally rotated keys (what the authors' code does). For a block of m
// queries and n chunks this is a GEMM, Q_raw [m, d] x R^T [d, n], computed tile by tile with
// one fixed-order dot product per score (see matmul.hpp for why not Eigen's GEMM).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

#include "attention_config.hpp"
#include "chunk_encoder.hpp"
#include "matmul.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// A block of consecutive queries of one head and the chunks they may score.
struct scoring_inputs {
  matrix_view<const float> queries;          // [m, d] raw (pre-RoPE) queries
  std::int64_t first_position = 0;           // position of queries.row(0); rows are consecutive
  matrix_view<const float> representations;  // [n, representation_floats] chunks 0..n-1
  const rope* rotary = nullptr;
  int chunk_size = 0;
};

/// Fills scores [m, n]; scratch_floats(cfg, m) floats of caller-owned scratch.
template <class S>
concept chunk_scorer = requires(const S& s, const attention_config& cfg, const scoring_inputs& in,
                                matrix_view<float> scores, std::span<float> scratch, std::ptrdiff_t m) {
  { s.scratch_floats(cfg, m) } -> std::convertible_to<std::size_t>;
  { s.validate(cfg) } -> std::same_as<void>;
  { s.score(in, scores, scratch) } noexcept -> std::same_as<void>;
};

/// The paper's scorer: q_raw . r_c.
struct raw_query_scorer {
  std::size_t scratch_floats(const attention_config&, std::ptrdiff_t) const noexcept { return 0; }
  void validate(const attention_config&) const {}
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float>) const noexcept {
    matmul_nt(in.queries, in.representations, scores);
  }
};

/// Alternative: the query rotated to where it will stand relative to a chunk it selects,
/// R(p mod w + offset_chunks * w) q_raw . r_c. Chunk keys hold keys rotated at local offsets,
/// so this puts query and keys in the same frame the attention will use for a chunk
/// offset_chunks slots behind the query's chunk; q_raw is that frame only at distance 0.
struct rotated_query_scorer {
  int offset_chunks = 1;

  std::size_t scratch_floats(const attention_config& cfg, std::ptrdiff_t m) const noexcept {
    return static_cast<std::size_t>(m) * static_cast<std::size_t>(cfg.head_dim);
  }
  void validate(const attention_config&) const {
    if (offset_chunks < 0)
      detail::fail<config_error>("rotated_query_scorer: offset_chunks must be >= 0, got " + std::to_string(offset_chunks));
  }
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float> scratch) const noexcept {
    const std::ptrdiff_t m = in.queries.rows(), d = in.queries.cols();
    matrix_view<float> rotated(scratch.data(), m, d);
    for (std::ptrdiff_t r = 0; r < m; ++r) {
      const std::int64_t p = in.first_position + r;
      in.rotary->rotate(in.queries.row(r), rotated.row(r), p % in.chunk_size + std::int64_t{offset_chunks} * in.chunk_size);
    }
    matmul_nt(rotated, in.representations, scores);
  }
};

static_assert(chunk_scorer<raw_query_scorer> && chunk_scorer<rotated_query_scorer>);

}  // namespace longheads
