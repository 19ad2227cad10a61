// SPDX-License-Identifier: MIT
// Chunk index store: one sequence's selection index away from its keys and values: every full
// chunk's representation per summary head, and a bound_tree over them per head, fed chunk by
// chunk in the sequence's order.
//
// Why: a sharded sequence's caches each index only their own chunks, and an approximate search
// (bound_tree_beam) over P separate trees is not the search over one tree: its choice changes
// with P. A chunk's representation depends on that chunk alone (shards encode at completion), so
// the shards can send each new chunk's rows (2 d floats per summary head, 1/w of its keys) to
// the place that chooses, whose store then holds exactly the single-process cache's
// representations and trees, bit for bit. offer_from_store (shard.hpp) searches it, and the
// choice is the single-process one for every index policy, on any number of shards.
//
// Appending folds each chunk into its trees as kv_cache does (bound_tree::append), so the boxes
// equal the cache's; nothing allocates once reserve() covered the sequence.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "chunk_index_state.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"
#include "views.hpp"

namespace longheads {

/// The representations and index trees of one sequence's full chunks (see the file comment).
class chunk_index_store {
 public:
  /// An empty store for caches of `shape` (a layer's shape(): its index_fanout must be > 0, its
  /// representations the [lo | hi] of the Quest pair the index searches).
  /// @throws shape_error if the shape keeps no index.
  explicit chunk_index_store(const cache_shape& shape) : shape_(shape) {
    if (!shape.indexing().any() || !shape.indexing().problem(shape.head_dim, shape.representation_floats).empty())
      detail::fail<shape_error>("chunk_index_store: the shape keeps no index (a valid index layout over [lo | hi] representations of 2 * head_dim floats), got " +
                                to_string(shape));
    rows_.resize(static_cast<std::size_t>(shape.summary_heads()));
    indexes_.assign(static_cast<std::size_t>(shape.summary_heads()), chunk_index_state(shape.head_dim, shape.indexing()));
  }

  /// The shape it indexes chunks of.
  const cache_shape& shape() const noexcept { return shape_; }
  /// Chunks held (the sequence's chunks 0 .. chunks() - 1).
  std::int64_t chunks() const noexcept { return chunks_; }
  /// Floats one chunk's rows take in append()'s layout: summary heads x representation floats.
  std::size_t chunk_floats() const noexcept { return static_cast<std::size_t>(shape_.summary_heads()) * shape_.representation_floats; }

  /// Room for `chunks` chunks: appends up to that many never allocate.
  void reserve(std::int64_t chunks) {
    for (auto& head : rows_) head.reserve(static_cast<std::size_t>(chunks) * shape_.representation_floats);
    for (chunk_index_state& index : indexes_) index.reserve(chunks);
  }

  /// Appends the sequence's next chunks, chunks() .. chunks() + n - 1: `rows` holds n chunks,
  /// each as summary heads x representation floats (export_representations' layout).
  /// @throws shape_error if rows is not a whole number of chunks, or the sequence would pass
  ///         max_sequence_tokens; the store is unchanged then.
  void append(std::span<const float> rows) {
    const std::size_t per_chunk = chunk_floats();
    if (rows.size() % per_chunk != 0)
      detail::fail<shape_error>("chunk_index_store::append: " + std::to_string(rows.size()) + " floats are not whole chunks of " +
                                std::to_string(per_chunk));
    const auto n = static_cast<std::int64_t>(rows.size() / per_chunk);
    if ((chunks_ + n) * shape_.chunk_size > max_sequence_tokens)
      detail::fail<shape_error>("chunk_index_store::append: " + std::to_string(chunks_ + n) + " chunks pass the longest sequence");
    const std::size_t r = shape_.representation_floats;
    for (std::int64_t c = 0; c < n; ++c)
      for (std::size_t h = 0; h < rows_.size(); ++h) {
        const float* row = rows.data() + static_cast<std::size_t>(c) * per_chunk + h * r;
        rows_[h].insert(rows_[h].end(), row, row + r);
        indexes_[h].append({rows_[h].data(), chunks_ + c + 1, static_cast<std::ptrdiff_t>(r), static_cast<std::ptrdiff_t>(r)});
      }
    chunks_ += n;
  }

  /// Forgets chunks from `chunks` on (a sequence rolled back): their rows are zeroed before
  /// they are dropped, and the trees are rebuilt from the rest, in the memory they had.
  void truncate(std::int64_t chunks) noexcept {
    chunks = std::clamp<std::int64_t>(chunks, 0, chunks_);
    const std::size_t r = shape_.representation_floats;
    for (std::size_t h = 0; h < rows_.size(); ++h) {
      std::fill(rows_[h].begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(chunks) * r), rows_[h].end(), 0.0f);
      rows_[h].resize(static_cast<std::size_t>(chunks) * r);
      indexes_[h].truncate(chunks, {rows_[h].data(), chunks, static_cast<std::ptrdiff_t>(r), static_cast<std::ptrdiff_t>(r)});
    }
    chunks_ = chunks;
  }
  /// Forgets every chunk (truncate(0)).
  void clear() noexcept { truncate(0); }

  /// The representation head of query head `q_head` (as kv_cache::representation_head).
  int representation_head(int q_head) const noexcept { return q_head / (shape_.n_q_heads / shape_.summary_heads()); }
  /// The representations query head `q_head` searches, [chunks(), r].
  matrix_view<const float> representations(int q_head) const noexcept {
    const auto r = static_cast<std::ptrdiff_t>(shape_.representation_floats);
    return {rows_[static_cast<std::size_t>(representation_head(q_head))].data(), chunks_, r, r};
  }
  /// The index query head `q_head` searches (as kv_cache::index).
  const chunk_index_state& index(int q_head) const noexcept { return indexes_[static_cast<std::size_t>(representation_head(q_head))]; }

 private:
  cache_shape shape_;
  std::int64_t chunks_ = 0;
  std::vector<std::vector<float>> rows_;  // per summary head: [chunks, r]
  std::vector<chunk_index_state> indexes_;  // per summary head
};

/// Chunks [from, to) of `cache`'s representations (its own chunk ids; summarised chunks only) in
/// chunk_index_store::append's layout, into `out` (chunk_floats() per chunk).
/// @throws shape_error if the range is not summarised or out has the wrong size.
inline void export_representations(const kv_cache& cache, std::int64_t from, std::int64_t to, std::span<float> out) {
  const cache_shape& shape = cache.shape();
  const std::size_t r = shape.representation_floats, heads = static_cast<std::size_t>(shape.summary_heads());
  if (from < 0 || from > to || to > cache.summarised_chunks())
    detail::fail<shape_error>("export_representations: chunks [" + std::to_string(from) + ", " + std::to_string(to) + ") are not in the " +
                              std::to_string(cache.summarised_chunks()) + " summarised");
  if (out.size() != static_cast<std::size_t>(to - from) * heads * r)
    detail::fail<shape_error>("export_representations: out must hold " + std::to_string(static_cast<std::size_t>(to - from) * heads * r) +
                              " floats, got " + std::to_string(out.size()));
  const int per_head = shape.n_q_heads / shape.summary_heads();
  for (std::int64_t c = from; c < to; ++c)
    for (std::size_t h = 0; h < heads; ++h) {
      const float* row = cache.representations(static_cast<int>(h) * per_head).row(c);
      std::copy_n(row, r, out.data() + (static_cast<std::size_t>(c - from) * heads + h) * r);
    }
}

}  // namespace longheads
