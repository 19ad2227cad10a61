// SPDX-License-Identifier: MIT
// Selection index policies: how a query's chunks are found among the full chunks' summaries.
//
// flat_scan scores every chunk (the reference, and the default). The others keep an index in
// the cache (chunk_index_state, one per representation head) for the Quest pair
// (key_bounds_encoder + bound_scorer): bound_tree_index searches a tree of boxes over
// consecutive chunks best-first (exactly the flat scan's choice), bound_tree_beam searches it
// with a beam (O(log n) per query, approximate past exact_below candidates),
// bound_tree_certified widens the beam until a bound certifies the choice within epsilon, and
// key_cluster_index opens k-means clusters of chunks in key space by box bound and centre score
// (chunk_clusters.hpp). A policy says what index it keeps through index_layout(), and searches
// the state the cache keeps for that layout.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "chunk_clusters.hpp"
#include "chunk_index.hpp"
#include "chunk_index_state.hpp"
#include "errors.hpp"
#include "views.hpp"

namespace longheads {

/// Selection index policy: score every full chunk (the reference, and the default).
struct flat_scan {
  static constexpr bool indexed = false;  ///< selection reads scores of every chunk
  /// Chunks per box of the cache's index: none.
  int fanout() const noexcept { return 0; }
  /// What the cache keeps for it: nothing.
  index_layout layout() const noexcept { return {}; }
};

/// Selection index policy: the cache keeps a bound_tree per kv head and each query's chunks are
/// found by bound_search, exactly the flat scan's choice. Only for the Quest pair
/// (key_bounds_encoder + bound_scorer, sink_local_topk_selector, per-head selection), which the
/// attention checks when it is compiled.
struct bound_tree_index {
  static constexpr bool indexed = true;  ///< selection searches the cache's trees
  static constexpr bool exact = true;    ///< the flat scan's chunks, always
  int branching = 16;                    ///< chunks (or boxes) per box, >= 2
  /// Chunks per box of the cache's index.
  int fanout() const noexcept { return branching; }
  /// What the cache keeps for it: a bound_tree per head.
  index_layout layout() const noexcept { return {branching}; }
  /// @throws config_error if branching < 2.
  void validate() const {
    if (branching < 2) detail::fail<config_error>("bound_tree_index: branching must be >= 2, got " + std::to_string(branching));
  }
  /// The `wanted` best chunks of [first, end) for the rotated query `q` (bound_search::top).
  std::size_t search(const chunk_index_state& state, matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end,
                     std::size_t wanted, std::span<std::int32_t> out, bound_search_scratch& scratch,
                     bound_search::stats* read = nullptr) const noexcept {
    return bound_search::top(state.tree(), summaries, q, first, end, wanted, out, scratch, read);
  }
};

/// Selection index policy: the same trees searched by beam_search, O(beam F log_F n) summaries
/// per query however long the context, for contexts where the flat scan's O(n) per query is the
/// cost. Exact (the flat scan's chunks, tested) while a query has at most `exact_below`
/// candidate chunks: the beam is then widened to hold every box. Beyond, it may miss a chunk
/// whose box does not rank in its level's beam (docs/results.md gives how often, and the
/// passkey answers beside the flat scan's). The defaults were chosen on passkey-256 at 16k-1M
/// tokens (docs/results.md): boxes of 32 chunks, 4 opened per level.
struct bound_tree_beam {
  static constexpr bool indexed = true;  ///< selection searches the cache's trees
  static constexpr bool exact = false;   ///< may miss a chunk past exact_below (see above)
  int branching = 32;                    ///< chunks (or boxes) per box, >= 2
  int beam = 4;                          ///< boxes opened per level, >= 1
  int exact_below = 1024;                ///< up to this many candidate chunks the search is exact, >= 0
  /// Up to this many candidate chunks the attention takes the flat scan's choice instead of
  /// searching, >= 0: the same chunks while it is <= exact_below, found faster (a block of
  /// queries scored at once); 0 makes every query search (tests of the widened beam).
  int scan_below = 1024;
  /// Chunks per box of the cache's index.
  int fanout() const noexcept { return branching; }
  /// What the cache keeps for it: a bound_tree per head.
  index_layout layout() const noexcept { return {branching}; }
  /// Candidates up to which queries choose by the flat scan (scan_below).
  std::int64_t flat_below() const noexcept { return scan_below; }
  /// The widest beam a search uses (scratch is sized for it).
  int widest_beam() const noexcept { return std::max(beam, exact_below); }
  /// @throws config_error if branching < 2, beam < 1, exact_below < 0 or scan_below < 0.
  void validate() const {
    if (branching < 2 || beam < 1 || exact_below < 0 || scan_below < 0)
      detail::fail<config_error>("bound_tree_beam: branching must be >= 2, beam >= 1, exact_below >= 0 and scan_below >= 0, got branching " +
                                 std::to_string(branching) + ", beam " + std::to_string(beam) + ", exact_below " +
                                 std::to_string(exact_below) + ", scan_below " + std::to_string(scan_below));
  }
  /// The `wanted` best chunks of [first, end) the beam reaches for the rotated query `q`
  /// (beam_search::top; exact up to exact_below candidates).
  std::size_t search(const chunk_index_state& state, matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end,
                     std::size_t wanted, std::span<std::int32_t> out, bound_search_scratch& scratch,
                     bound_search::stats* read = nullptr) const noexcept {
    // A beam as wide as the candidates holds every box of every level: the flat scan's choice.
    const int width = end - first <= exact_below ? widest_beam() : beam;
    return beam_search::top(state.tree(), summaries, q, first, end, wanted, width, out, scratch, read);
  }
};

/// Selection index policy: the certified search (certified_search) over the same trees: the
/// beam's choice, widened until a bound proves that every chunk left out scores at most the
/// k-th kept plus `epsilon`. epsilon 0 gives exactly the flat scan's chunks (tested `==`);
/// epsilon > 0 trades that for reads, which depend on how the scores spread (docs/results.md:
/// on passkey-256 at 1M tokens, epsilon 0 reads 71% of the chunks at the median, epsilon 5
/// 5.1% (p90 22%) for attention-mass recall 1.000 / 0.957 against the flat scan (median / p10);
/// on iid keys everything). Its frontier can grow to the tree's size: the scratch is
/// reserved for the context (no allocation per token within it).
struct bound_tree_certified {
  static constexpr bool indexed = true;  ///< selection searches the cache's trees
  static constexpr bool exact = false;   ///< exact only with epsilon 0 (a run-time value)
  static constexpr bool widens = true;   ///< searches best-first past its beam: needs the frontier
  int branching = 32;                    ///< chunks (or boxes) per box, >= 2
  int beam = 4;                          ///< the beam that seeds the search, >= 1
  float epsilon = 0.0f;                  ///< the certificate's slack, >= 0 (0: the flat scan's choice)
  /// Chunks per box of the cache's index.
  int fanout() const noexcept { return branching; }
  /// What the cache keeps for it: a bound_tree per head.
  index_layout layout() const noexcept { return {branching}; }
  /// The seeding beam's width (scratch is sized for it).
  int widest_beam() const noexcept { return beam; }
  /// @throws config_error if branching < 2, beam < 1 or epsilon is negative or not finite.
  void validate() const {
    if (branching < 2 || beam < 1 || !(epsilon >= 0.0f) || !std::isfinite(epsilon))
      detail::fail<config_error>("bound_tree_certified: branching must be >= 2, beam >= 1 and epsilon finite and >= 0, got branching " +
                                 std::to_string(branching) + ", beam " + std::to_string(beam) + ", epsilon " + std::to_string(epsilon));
  }
  /// The `wanted` best chunks of [first, end) for the rotated query `q`, certified within epsilon
  /// (certified_search::top).
  std::size_t search(const chunk_index_state& state, matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end,
                     std::size_t wanted, std::span<std::int32_t> out, bound_search_scratch& scratch,
                     bound_search::stats* read = nullptr) const noexcept {
    return certified_search::top(state.tree(), summaries, q, first, end, wanted, beam, epsilon, out, scratch, read);
  }
};

/// Selection index policy: key-space clusters (chunk_clusters.hpp) searched by cluster_search:
/// every segment of `segment_chunks` chunks is split by k-means into `clusters` boxes of similar
/// chunks (and every segment of S / 8 chunks into C / 8, ..., so the chunks after the last whole
/// segment are few), the k-means spread over the S / 8 chunks appended after the segment; a
/// query scores the chunks after the last segment of the smallest level clustered by then,
/// bounds the sections of the covering blocks (8 segments) and the groups of the other covering
/// segments, and opens sections, groups and clusters by box bound and centre score in turn
/// (probe_order) until the k-th chunk found beats every box left (the flat scan's choice,
/// certified) or it has scored `probe_share` of its candidates (at least `probe_min`, at most
/// `probe_max` chunks) in clusters. Exact while a query has at most `exact_below` candidates
/// (the probe is then unlimited). Reads per query: the tail (< the smallest segment), a box and
/// a centre per section (2 x 8 per 16,384 chunks at the defaults) and per group of the last
/// block's segments, those of the sections and groups it opens, and the probe; docs/results.md
/// measures them and the loss.
struct key_cluster_index {
  static constexpr bool indexed = true;  ///< selection searches the cache's clusters
  static constexpr bool exact = false;   ///< may miss a chunk past exact_below (see above)
  static constexpr bool widens = true;   ///< its list of clusters grows with the context
  int segment_chunks = 2048;             ///< chunks clustered together, >= 2
  int clusters = 64;                     ///< clusters per segment, in [1, segment_chunks] (32 chunks a cluster)
  int iterations = 8;                    ///< k-means iterations per segment, >= 0
  float probe_share = 0.02f;             ///< chunks scored in clusters per query, share of the candidates
  int probe_min = 512;                   ///< ... and at least this many, >= 0
  /// ... and at most this many, >= probe_min: a query's reads stop growing with the context.
  int probe_max = 1024;
  /// The order clusters are opened in: box bound and centre score in turn (the default), or box
  /// bound alone (cluster_probe; docs/results.md measures both).
  cluster_probe probe_order = cluster_probe::box_and_centre;
  /// Summaries (boxes, centres and chunks) after which a query past exact_below opens nothing
  /// more: the probe stops short there, so a query's reads stop growing with the context.
  int read_max = std::numeric_limits<int>::max();
  int exact_below = 1024;                ///< up to this many candidates the search is exact (and the flat scan used), >= 0
  /// Chunks per box of a tree: none (it keeps no tree).
  int fanout() const noexcept { return 0; }
  /// What the cache keeps for it: key_clusters per head.
  index_layout layout() const noexcept { return {0, segment_chunks, clusters, iterations}; }
  /// Candidates up to which queries choose by the flat scan (its choice: the search is exact there).
  std::int64_t flat_below() const noexcept { return exact_below; }
  /// @throws config_error if a field is out of its range.
  void validate() const {
    if (segment_chunks < 2 || clusters < 1 || clusters > segment_chunks || iterations < 0 || !(probe_share >= 0.0f) || !(probe_share <= 1.0f) ||
        probe_min < 0 || probe_max < probe_min || read_max < 0 || exact_below < 0 || (probe_order != cluster_probe::box_bound && probe_order != cluster_probe::box_and_centre))
      detail::fail<config_error>("key_cluster_index: segment_chunks must be >= 2, clusters in [1, segment_chunks], iterations >= 0, probe_share in "
                                 "[0, 1], probe_min >= 0, probe_max >= probe_min, read_max >= 0, exact_below >= 0 and probe_order a cluster_probe, got segment_chunks " + std::to_string(segment_chunks) +
                                 ", clusters " + std::to_string(clusters) + ", iterations " + std::to_string(iterations) + ", probe_share " +
                                 std::to_string(probe_share) + ", probe_min " + std::to_string(probe_min) + ", probe_max " + std::to_string(probe_max) + ", read_max " + std::to_string(read_max) + ", exact_below " +
                                 std::to_string(exact_below) + ", probe_order " + std::to_string(static_cast<int>(probe_order)));
  }
  /// Chunks a query with `candidates` candidates may score in clusters.
  std::int64_t probe(std::int64_t candidates) const noexcept {
    if (candidates <= exact_below) return std::numeric_limits<std::int64_t>::max();
    const auto share = static_cast<std::int64_t>(std::ceil(static_cast<double>(probe_share) * static_cast<double>(candidates)));
    return std::clamp<std::int64_t>(share, probe_min, probe_max);
  }
  /// The `wanted` best chunks of [first, end) the probe reaches for the rotated query `q`
  /// (cluster_search::top).
  std::size_t search(const chunk_index_state& state, matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end,
                     std::size_t wanted, std::span<std::int32_t> out, bound_search_scratch& scratch,
                     bound_search::stats* read = nullptr) const noexcept {
    // Up to exact_below candidates neither the probe nor the read budget applies: the flat
    // scan's choice, whichever of it and the search a caller takes there.
    const bool exact = end - first <= exact_below;
    return cluster_search::top(state.clusters(), summaries, q, first, end, wanted, probe(end - first), out, scratch, read, probe_order,
                               exact ? std::numeric_limits<std::int64_t>::max() : std::int64_t{read_max});
  }
  /// Marks its searches over up to `chunks` chunks need in their scratch.
  std::size_t marks(std::int64_t chunks) const noexcept { return cluster_search::marks_needed(segment_chunks, clusters, chunks); }
};

/// Whether index policy `Index` searches best-first (bound_tree_index, bound_tree_certified,
/// key_cluster_index): its frontier grows with the context, so its scratch is reserved for it.
template <class Index>
inline constexpr bool searches_best_first =
    Index::indexed && (!requires(const Index& i) { i.widest_beam(); } || requires { Index::widens; });

/// Room in `scratch` for index policy `index`'s searches over up to `chunks` chunks, keeping up
/// to `wanted` chunks: a beam's bounded levels, a best-first search's frontier (which grows with
/// the context), or both.
template <class Index>
void reserve_search_scratch(const Index& index, bound_search_scratch& scratch, std::int64_t chunks, std::size_t wanted) {
  if constexpr (requires { index.widest_beam(); }) scratch.reserve_beam(index.widest_beam(), index.fanout());
  if constexpr (searches_best_first<Index>) scratch.reserve(chunks, std::max(2, index.fanout()));
  if constexpr (Index::indexed) scratch.reserve_kept(wanted);
  if constexpr (requires { index.marks(chunks); }) scratch.reserve_marks(index.marks(chunks));
}

/// A selection index policy: `indexed`, and the layout of what it keeps in the cache.
template <class I>
concept selection_index = requires(const I& i) {
  { I::indexed } -> std::convertible_to<bool>;
  { i.layout() } -> std::same_as<index_layout>;
};
static_assert(selection_index<flat_scan> && selection_index<bound_tree_index> && selection_index<bound_tree_beam> &&
              selection_index<bound_tree_certified> && selection_index<key_cluster_index>);

}  // namespace longheads
