// SPDX-License-Identifier: MIT
// Chunk encoder: one representation per full chunk and query head.
//
// Paper (attention_pooled_encoder), for chunk c, query head h and its kv head g, with queries
// and keys rotated at local positions j = t mod w:
//   O   = softmax(Q_loc K_loc^T / sqrt(d)) V          non-causal, w x w
//   s_c = mean over the w rows of O                   value-space summary, d
//   r_c = sum_j softmax_j(s_c . k_j / sqrt(d)) k_j    attention-weighted average of the keys
// A chunk is encoded once, when its last token arrives, in one go or (piecewise_chunk_encoder)
// in pieces spread over the steps of the next chunk.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <span>
#include <string>

#include "attention_config.hpp"
#include "errors.hpp"
#include "detail/simd.hpp"
#include "matmul.hpp"
#include "views.hpp"

namespace longheads {

// [snippet:concept] (docs/custom-policy.md shows this part)
/// What an encoder sees of one full chunk, for one query head.
struct chunk_inputs {
  matrix_view<const float> queries;  ///< [w, d] rotated at local positions 0..w-1
  matrix_view<const float> keys;     ///< [w, d] rotated at local positions 0..w-1
  matrix_view<const float> values;   ///< [w, d]
  float scale = 1.0f;                ///< 1/sqrt(d)
};

/// Builds the representation a chunk_scorer compares queries against.
/// representation_floats(cfg) floats per chunk and query head; scratch_floats(cfg) floats of
/// scratch owned by the caller (encoders never allocate). An encoder that reads only the keys
/// says so with `static constexpr bool keys_only = true;`: the query heads of a kv group then
/// share one representation, stored and computed once per kv head (encodes_keys_only).
template <class E>
concept chunk_encoder = requires(const E& e, const attention_config& cfg, const chunk_inputs& in,
                                 std::span<float> representation, std::span<float> scratch) {
  { e.representation_floats(cfg) } -> std::convertible_to<std::size_t>;
  { e.scratch_floats(cfg) } -> std::convertible_to<std::size_t>;
  { e.validate(cfg) } -> std::same_as<void>;
  { e.encode(in, representation, scratch) } noexcept -> std::same_as<void>;
};
// [/snippet:concept]

/// An encoder whose work on one chunk splits into pieces(cfg) pieces run in order, carrying
/// state_floats(cfg) floats between them, so that the attention can spread a chunk's encoding
/// over the steps of the next chunk (attention_config::spread_encoding) instead of doing it all
/// in the step that completes it. Pieces 0..pieces-1 run in order on one state write the
/// representation encode() writes, bit for bit; piece 0 starts the state, the last piece writes
/// the representation. Scratch: scratch_floats(cfg), as for encode().
template <class E>
concept piecewise_chunk_encoder =
    chunk_encoder<E> && requires(const E& e, const attention_config& cfg, const chunk_inputs& in, std::size_t piece, std::span<float> state,
                                 std::span<float> representation, std::span<float> scratch) {
      { e.pieces(cfg) } -> std::convertible_to<std::size_t>;
      { e.state_floats(cfg) } -> std::convertible_to<std::size_t>;
      { e.encode_piece(in, piece, state, representation, scratch) } noexcept -> std::same_as<void>;
    };

/// An encoder that says which representations (and, piecewise, which states) it can make from
/// keys, queries and values no larger than `input_bound` in magnitude: a cache file's summaries
/// are checked with it, so a forged file cannot hand the scorer summaries that no input makes
/// (optional; without it a file's summaries need only be finite).
template <class E>
concept checked_chunk_encoder = chunk_encoder<E> && requires(const E& e, const attention_config& cfg, std::span<const float> x, float bound) {
  { e.representation_within(cfg, x, bound) } noexcept -> std::same_as<bool>;
};
template <class E>
concept checked_piecewise_encoder = piecewise_chunk_encoder<E> && requires(const E& e, const attention_config& cfg, std::span<const float> x) {
  { e.state_within(cfg, x) } noexcept -> std::same_as<bool>;
};

/// Whether encoder E ignores chunk_inputs::queries and values (declares keys_only = true).
template <class E>
inline constexpr bool encodes_keys_only = requires {
  requires E::keys_only;
};

namespace detail {
/// Whether every element is at most `bound` in magnitude (false for NaN).
inline bool all_within(std::span<const float> x, float bound) noexcept {
  bool ok = true;
  for (float e : x) ok &= std::abs(e) <= bound;
  return ok;
}
/// Whether a column-mass state (sums of softmax rows over a chunk's w columns) is one: every
/// sum in [0, w], 1% over for fp32 rounding (false for NaN).
inline bool column_mass_within(std::span<const float> mass) noexcept {
  bool ok = true;
  const float most = 1.01f * static_cast<float>(mass.size());
  for (float m : mass) ok &= m >= 0.0f && m <= most;
  return ok;
}

/// Softmax of x in place, in a fixed order: a representation must not depend on where its
/// scratch happens to be aligned (vectorised reductions that peel by address would).
inline void softmax_in_place(float* x, std::ptrdiff_t n) noexcept {
  float top = x[0];
  for (std::ptrdiff_t i = 1; i < n; ++i) top = std::max(top, x[i]);
  float sum = 0.0f;
  for (std::ptrdiff_t i = 0; i < n; ++i) sum += x[i] = std::exp(x[i] - top);
  scale(1.0f / sum, x, n);
}

/// Rows of Q K^T computed at a time by the encoders that need the chunk's own attention: their
/// scratch is then linear in the chunk size (a w x w matrix at w = 65536 would be 16 GiB). A
/// multiple of 4, so matmul_nt groups the rows as it would for the whole matrix (same bits).
inline constexpr std::ptrdiff_t attention_rows_per_block = 16;

/// Blocks of attention_rows_per_block rows in a chunk of w tokens.
inline std::size_t attention_row_blocks(std::ptrdiff_t w) noexcept {
  return static_cast<std::size_t>((w + attention_rows_per_block - 1) / attention_rows_per_block);
}

/// Calls row(r, probabilities) for the rows r of block `block` in order, where probabilities is
/// row r of softmax(scale Q K^T), computed in `scratch` (block * w floats).
template <class Row>
void for_each_attention_row_of_block(const chunk_inputs& in, std::size_t block, float* scratch, Row&& row) noexcept {
  const std::ptrdiff_t w = in.keys.rows(), r0 = static_cast<std::ptrdiff_t>(block) * attention_rows_per_block;
  const std::ptrdiff_t rows = std::min(attention_rows_per_block, w - r0);
  const matrix_view<float> probs(scratch, rows, w);
  matmul_nt(in.queries.slice_rows(r0, rows), in.keys, probs);
  for (std::ptrdiff_t r = 0; r < rows; ++r) {
    scale(in.scale, probs.row(r), w);
    softmax_in_place(probs.row(r), w);
    row(r0 + r, probs.row(r));
  }
}
inline std::size_t attention_rows_floats(const attention_config& cfg) noexcept {
  return static_cast<std::size_t>(std::min<std::ptrdiff_t>(attention_rows_per_block, cfg.chunk_size)) * static_cast<std::size_t>(cfg.chunk_size);
}

/// encode() of such an encoder: its pieces in order, the state (w floats) in the scratch after
/// the attention rows, so a piece-by-piece encoding has encode()'s bits by construction.
template <class Encoder>
void encode_in_pieces(const Encoder& encoder, const chunk_inputs& in, std::span<float> representation, std::span<float> scratch) noexcept {
  const std::ptrdiff_t w = in.keys.rows();
  const std::span<float> state = scratch.subspan(static_cast<std::size_t>(std::min(attention_rows_per_block, w) * w), static_cast<std::size_t>(w));
  for (std::size_t piece = 0; piece <= attention_row_blocks(w); ++piece) encoder.encode_piece(in, piece, state, representation, scratch);
}

/// The pieces of an encoder that sums the rows of its chunk's own attention (column mass): one
/// per block of rows, accumulating into `state` (w floats), then finish(state) as the last.
template <class Finish>
void column_mass_piece(const chunk_inputs& in, std::size_t piece, std::span<float> state, float* rows_scratch, Finish&& finish) noexcept {
  const std::ptrdiff_t w = in.keys.rows();
  if (piece == attention_row_blocks(w)) return finish(state.data());
  if (piece == 0) std::fill_n(state.data(), w, 0.0f);
  for_each_attention_row_of_block(in, piece, rows_scratch, [&](std::ptrdiff_t, const float* p) { axpy(1.0f, p, state.data(), w); });
}

}  // namespace detail

/// The paper's encoder (see the file comment). Cost per chunk: a w x w x d product plus
/// O(w d); scratch O(w), the attention matrix taken a block of rows at a time. Every step is a
/// fixed-order loop, so the bits of a representation depend only on the chunk, never on the
/// thread, the buffer addresses or how the sequence was split.
struct attention_pooled_encoder {
  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(cfg.head_dim);
  }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config& cfg) const noexcept {
    return detail::attention_rows_floats(cfg) + 2 * static_cast<std::size_t>(cfg.chunk_size) + static_cast<std::size_t>(cfg.head_dim);
  }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config&) const {}

  /// Writes the representation of one full chunk for one query head: its pieces, in order.
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float> scratch) const noexcept {
    detail::encode_in_pieces(*this, in, representation, scratch);
  }

  /// One block of rows of the chunk's attention per piece, then the summary and the chunk key.
  std::size_t pieces(const attention_config& cfg) const noexcept { return detail::attention_row_blocks(cfg.chunk_size) + 1; }
  /// The column sums of the chunk's attention so far.
  std::size_t state_floats(const attention_config& cfg) const noexcept { return static_cast<std::size_t>(cfg.chunk_size); }
  /// A softmax-weighted mean of keys is no larger than the largest key element (checked_chunk_encoder).
  bool representation_within(const attention_config&, std::span<const float> r, float key_bound) const noexcept {
    return detail::all_within(r, key_bound);
  }
  /// Column sums of softmax rows (checked_piecewise_encoder).
  bool state_within(const attention_config&, std::span<const float> state) const noexcept { return detail::column_mass_within(state); }
  /// Runs piece `piece` of the chunk's encoding (piecewise_chunk_encoder).
  void encode_piece(const chunk_inputs& in, std::size_t piece, std::span<float> column_sum, std::span<float> representation,
                    std::span<float> scratch) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    float* key_weights = scratch.data() + std::min(detail::attention_rows_per_block, w) * w + w;
    float* summary = key_weights + w;
    detail::column_mass_piece(in, piece, column_sum, scratch.data(), [&](const float* column) {
      // mean_i (P V)_i = (mean_i P_i) V: one w-vector times V instead of a w x w x d product.
      std::fill_n(summary, d, 0.0f);
      for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(column[j] / static_cast<float>(w), in.values.row(j), summary, d);
      for (std::ptrdiff_t j = 0; j < w; ++j) key_weights[j] = in.scale * detail::dot(summary, in.keys.row(j), d);
      detail::softmax_in_place(key_weights, w);
      std::fill_n(representation.data(), d, 0.0f);
      for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(key_weights[j], in.keys.row(j), representation.data(), d);
    });
  }
};

/// Alternative: the plain mean of the chunk's locally rotated keys (no queries, no values).
struct mean_key_encoder {
  /// Reads the keys only: one representation per kv head.
  static constexpr bool keys_only = true;
  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(cfg.head_dim);
  }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config&) const noexcept { return 0; }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config&) const {}
  /// A mean of keys is no larger than the largest key element (checked_chunk_encoder).
  bool representation_within(const attention_config&, std::span<const float> r, float key_bound) const noexcept {
    return detail::all_within(r, key_bound);
  }
  /// Writes the representation of one full chunk for one query head.
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float>) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    std::fill_n(representation.data(), d, 0.0f);
    for (std::ptrdiff_t j = 0; j < w; ++j) detail::axpy(1.0f, in.keys.row(j), representation.data(), d);
    detail::scale(1.0f / static_cast<float>(w), representation.data(), d);
  }
};

/// Quest-style bounds: per channel, the minimum then the maximum over the chunk's locally
/// rotated keys ([2d]). Paired with bound_scorer, a query's score is an upper bound of its dot
/// product with any key of the chunk, so one matching key is not averaged away by w - 1 others.
struct key_bounds_encoder {
  /// Reads the keys only: one representation per kv head.
  static constexpr bool keys_only = true;
  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return 2 * static_cast<std::size_t>(cfg.head_dim);
  }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config&) const noexcept { return 0; }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config&) const {}
  /// Per channel lo <= hi, both within the keys' range (checked_chunk_encoder): the index's
  /// boxes and the scorer's bound rely on lo <= hi.
  bool representation_within(const attention_config&, std::span<const float> r, float key_bound) const noexcept {
    const std::size_t d = r.size() / 2;
    bool ok = detail::all_within(r, key_bound);
    for (std::size_t i = 0; i < d; ++i) ok &= r[i] <= r[d + i];
    return ok;
  }
  /// Writes the representation of one full chunk for one query head.
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float>) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    float* lo = representation.data();
    float* hi = lo + d;
    std::copy_n(in.keys.row(0), d, lo);
    std::copy_n(in.keys.row(0), d, hi);
    for (std::ptrdiff_t j = 1; j < w; ++j)
      for (std::ptrdiff_t i = 0; i < d; ++i) {
        lo[i] = std::min(lo[i], in.keys.row(j)[i]);
        hi[i] = std::max(hi[i], in.keys.row(j)[i]);
      }
  }
};

/// InfLLM-style representative keys: the `count` keys of the chunk that its own queries attend
/// to most (column mass of softmax(Q K^T / sqrt d), non-causal as in the paper's encoder), in
/// ascending position; [count * d]. Paired with max_key_scorer.
struct representative_keys_encoder {
  /// Keys kept per chunk, in [1, chunk_size].
  int count = 2;

  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats(const attention_config& cfg) const noexcept {
    return static_cast<std::size_t>(count) * static_cast<std::size_t>(cfg.head_dim);
  }
  /// Floats of caller-owned scratch one call needs (policies never allocate).
  std::size_t scratch_floats(const attention_config& cfg) const noexcept {
    return detail::attention_rows_floats(cfg) + 2 * static_cast<std::size_t>(cfg.chunk_size);
  }
  /// Checks the policy against the layer's configuration. @throws config_error naming the impossible setting.
  void validate(const attention_config& cfg) const {
    if (count < 1 || count > cfg.chunk_size)
      detail::fail<config_error>("representative_keys_encoder: count must be in [1, chunk_size = " + std::to_string(cfg.chunk_size) +
                                 "], got " + std::to_string(count));
  }
  /// Writes the representation of one full chunk for one query head: its pieces, in order.
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float> scratch) const noexcept {
    detail::encode_in_pieces(*this, in, representation, scratch);
  }

  /// One block of rows of the chunk's attention per piece, then the choice of keys.
  std::size_t pieces(const attention_config& cfg) const noexcept { return detail::attention_row_blocks(cfg.chunk_size) + 1; }
  /// The column mass of the chunk's attention so far.
  std::size_t state_floats(const attention_config& cfg) const noexcept { return static_cast<std::size_t>(cfg.chunk_size); }
  /// Copies of keys (checked_chunk_encoder).
  bool representation_within(const attention_config&, std::span<const float> r, float key_bound) const noexcept {
    return detail::all_within(r, key_bound);
  }
  /// Column sums of softmax rows (checked_piecewise_encoder).
  bool state_within(const attention_config&, std::span<const float> state) const noexcept { return detail::column_mass_within(state); }
  /// Runs piece `piece` of the chunk's encoding (piecewise_chunk_encoder).
  void encode_piece(const chunk_inputs& in, std::size_t piece, std::span<float> mass_state, std::span<float> representation,
                    std::span<float> scratch) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    float* order = scratch.data() + std::min(detail::attention_rows_per_block, w) * w + w;  // key indices, as floats (exact below 2^24)
    detail::column_mass_piece(in, piece, mass_state, scratch.data(), [&](const float* mass) {
      for (std::ptrdiff_t j = 0; j < w; ++j) order[j] = static_cast<float>(j);
      const auto more_mass = [&](float a, float b) {
        const float ma = mass[static_cast<std::ptrdiff_t>(a)], mb = mass[static_cast<std::ptrdiff_t>(b)];
        return ma > mb || (ma == mb && a < b);
      };
      std::partial_sort(order, order + count, order + w, more_mass);
      std::sort(order, order + count);
      for (int c = 0; c < count; ++c)
        std::copy_n(in.keys.row(static_cast<std::ptrdiff_t>(order[c])), d, representation.data() + c * d);
    });
  }
};

static_assert(chunk_encoder<attention_pooled_encoder> && chunk_encoder<mean_key_encoder> && chunk_encoder<key_bounds_encoder> &&
              chunk_encoder<representative_keys_encoder>);
static_assert(piecewise_chunk_encoder<attention_pooled_encoder> && piecewise_chunk_encoder<representative_keys_encoder> &&
              !piecewise_chunk_encoder<key_bounds_encoder>);
static_assert(checked_chunk_encoder<attention_pooled_encoder> && checked_chunk_encoder<mean_key_encoder> &&
              checked_chunk_encoder<key_bounds_encoder> && checked_chunk_encoder<representative_keys_encoder> &&
              checked_piecewise_encoder<attention_pooled_encoder> && checked_piecewise_encoder<representative_keys_encoder>);
static_assert(encodes_keys_only<key_bounds_encoder> && encodes_keys_only<mean_key_encoder> && !encodes_keys_only<attention_pooled_encoder> &&
              !encodes_keys_only<representative_keys_encoder>);

}  // namespace longheads
