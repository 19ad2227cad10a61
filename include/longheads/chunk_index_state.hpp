// SPDX-License-Identifier: MIT
// The selection index's home: what a cache (or a chunk_index_store) keeps per representation
// head so that its index policy can search the full chunks' summaries.
//
// The cache does not know which index it serves: it keeps one chunk_index_state per head, made
// from the shape's index_layout (the index policy's parameters, cache_shape's index_* fields),
// feeds it each chunk once the chunk's summary is final, in chunk order, and truncates it when
// the cache goes back. The state is a function of the summaries alone (min and max for the
// trees, a fixed k-means for the clusters), so it is the same bits after one prefill, a token at
// a time, a truncation and re-append, or a file loaded and re-indexed; a new index adds its
// part here and its policy in index_policies.hpp, not to kv_cache or shard.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "chunk_clusters.hpp"
#include "chunk_index.hpp"
#include "views.hpp"

namespace longheads {

/// What an index keeps (all zero: none).
struct index_layout {
  int fanout = 0;          ///< chunks (or boxes) per box of a bound_tree, 0: no tree
  int segment_chunks = 0;  ///< chunks clustered together (key_clusters), 0: no clusters
  int clusters = 0;        ///< clusters per segment
  int iterations = 0;      ///< k-means iterations per segment
  /// Whether any index is kept.
  bool any() const noexcept { return fanout != 0 || segment_chunks != 0; }
  /// What is wrong with it for heads of dimension d over representations of r floats ("" if
  /// nothing): a tree needs fanout >= 2, clusters 1 <= C <= S with S >= 2 and iterations >= 0,
  /// and either over [lo | hi] representations (r == 2d).
  std::string problem(int head_dim, std::size_t representation_floats) const {
    if (fanout != 0 && fanout < 2) return "index fanout must be 0 or >= 2";
    if (segment_chunks != 0 && (segment_chunks < 2 || clusters < 1 || clusters > segment_chunks || iterations < 0))
      return "index clusters need segment_chunks >= 2, 1 <= clusters <= segment_chunks and iterations >= 0";
    if (segment_chunks == 0 && (clusters != 0 || iterations != 0)) return "index clusters and iterations must be 0 without segment_chunks";
    if (any() && representation_floats != 2 * static_cast<std::size_t>(head_dim))
      return "an index needs [lo | hi] representations of 2 * head_dim floats";
    return {};
  }
  /// Equal when every field is.
  friend bool operator==(const index_layout&, const index_layout&) = default;
};

/// One representation head's index (see the file comment).
class chunk_index_state {
 public:
  /// An empty index of `layout` (valid: index_layout::problem() empty) over heads of dimension d.
  chunk_index_state(int head_dim, const index_layout& layout) : tree_(head_dim, layout.fanout > 0 ? layout.fanout : 2) {
    if (layout.segment_chunks > 0)
      for_each_cluster_level(layout.segment_chunks, layout.clusters,
                             [&](int size, int count) { clusters_.emplace_back(head_dim, size, count, layout.iterations); });
    has_tree_ = layout.fanout > 0;
  }

  /// Chunks indexed.
  std::int64_t chunks() const noexcept { return chunks_; }
  /// The boxes over consecutive chunks (empty unless the layout has a fanout).
  const bound_tree& tree() const noexcept { return tree_; }
  /// The key-space clusters' levels, largest segments first (empty unless the layout has
  /// segment_chunks; for_each_cluster_level).
  std::span<const key_clusters> clusters() const noexcept { return clusters_; }
  /// Floats (4-byte words) held, capacity.
  std::size_t floats() const noexcept {
    std::size_t n = tree_.floats();
    for (const key_clusters& level : clusters_) n += level.floats();
    return n;
  }

  /// Room for `chunks` chunks: appends up to that many never allocate.
  void reserve(std::int64_t chunks) {
    if (has_tree_) tree_.reserve(chunks);
    for (key_clusters& level : clusters_) level.reserve(chunks);
  }
  /// Indexes the next chunk, row chunks() of `summaries` (rows [lo | hi] of this head's chunks,
  /// at least chunks() + 1 of them, final).
  void append(matrix_view<const float> summaries) {
    if (has_tree_) tree_.append(summaries.row(chunks_));
    for (key_clusters& level : clusters_) level.append(summaries);
    ++chunks_;
  }
  /// Forgets every chunk from `chunks` on; `summaries` holds the remaining chunks' rows.
  void truncate(std::int64_t chunks, matrix_view<const float> summaries) noexcept {
    if (chunks >= chunks_) return;
    if (has_tree_) tree_.truncate(chunks, summaries);
    for (key_clusters& level : clusters_) level.truncate(chunks);
    chunks_ = chunks;
  }

 private:
  bool has_tree_ = false;
  std::int64_t chunks_ = 0;
  bound_tree tree_;
  std::vector<key_clusters> clusters_;  // levels, largest segments first
};

}  // namespace longheads
