// SPDX-License-Identifier: MIT
// Key-space clusters: chunks grouped by what their keys look like, not by when they came.
//
// The beam's boxes (chunk_index.hpp) cover consecutive chunks, and neighbours in time are not
// neighbours in key space: on real caches a box's bound reaches past the k-th score almost
// everywhere. Here the chunks are cut into segments of S consecutive chunks; when a segment is
// full, k-means over its chunks' [lo | hi] representations splits it into C clusters, each kept
// as its members (ascending chunk ids) and a box (their min lo, max hi) that bounds every
// member's score from above (detail::bound_dot is monotone in lo and hi).
//
// Causal and the same in every split: a segment is clustered once, from its own chunks only, by
// a fixed computation (centres seeded from evenly spaced members, a fixed number of Lloyd
// iterations, sums in a fixed order), so its clusters are the same bits whether the chunks came
// in one prefill or one token at a time. A query whose candidates end at chunk `end` uses only
// the segments that end at or before `end` and scores the chunks after them one by one: its
// choice depends only on the chunks before `end`, as the flat scan's does.
//
// Spread over the next chunks: a segment's k-means (0.2 s per kv head at S 2048, d 128) is not
// run in the step that completes the segment but a slice at a time over the next S / 8 chunks
// appended, each slice its share of the point assignments left; the segment is usable from the
// append that finishes it, S + S / 8 chunks after its first. The work is the same computation
// in the same order, so the clusters are the same bits as clustering at once. A query whose
// candidates end at chunk `end` uses the segments clustered by the time `end` chunks had come
// (those ending at or before end - S / 8), whatever was fed since: its choice still depends on
// `end` alone, so every split agrees.
//
// Levels: a query whose `end` falls inside a segment would score up to S - 1 chunks one by one.
// The index therefore keeps levels of segments S, S / 8, S / 64, ... (clusters C, C / 8, ...: the
// same members per cluster), each clustered on its own; a query covers [0, end) with the largest
// usable segments, then the next level's, and scores only what is left (fewer than the smallest
// segment and its delay). key_cluster_levels() says which levels a layout keeps.
//
// Above the segments: the C clusters of a segment are grouped (k-means over their boxes) into
// G = C / 8 groups, and the 8 G groups of every 8 consecutive segments (a block) into G sections
// the same way, each with a box and a centre. A query bounds the sections of the whole blocks
// and the groups of the segments after them, and opens a section or group only when it ranks:
// the boxes and centres read grow as n / (64 S) + the segments of one block, not n / S.
//
// The search (cluster_search) scores the tail, bounds every usable cluster by its box, and
// opens clusters until either the k-th chunk found beats every box left (then the choice is the
// flat scan's, certified) or it has read its probe budget of chunks (then it is approximate, by
// what docs/results.md measures). The order (cluster_probe): best box bound first, or that and
// best centre score (the members' mean score) in turn. A box spanning several topics bounds
// high without any member scoring high; a centre scores high only when its members do.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "chunk_index.hpp"
#include "detail/simd.hpp"
#include "errors.hpp"
#include "views.hpp"

namespace longheads {

/// One head's segments of clustered chunks (see the file comment).
class key_clusters {
 public:
  /// @param head_dim d: representations are [lo | hi], 2d floats
  /// @param segment_chunks S >= 2, chunks clustered together
  /// @param clusters C in [1, S], clusters per segment
  /// @param iterations Lloyd iterations of the k-means, >= 0
  /// @param clustering_delay chunks over which a segment is clustered after its last, in
  ///        [0, S); -1: S / 8 (what the cache keeps; 0 clusters it in the append that completes it)
  key_clusters(int head_dim, int segment_chunks, int clusters, int iterations, int clustering_delay = -1)
      : d_(head_dim), segment_(segment_chunks), clusters_(clusters), iterations_(iterations),
        delay_(clustering_delay < 0 ? segment_chunks / 8 : std::min(clustering_delay, segment_chunks - 1)), groups_(std::max(1, clusters / 8)) {
    const auto r = static_cast<std::size_t>(2 * d_);
    centres_.resize(static_cast<std::size_t>(clusters_) * r);
    sums_.resize(static_cast<std::size_t>(clusters_) * r);
    counts_.resize(static_cast<std::size_t>(clusters_));
    owner_.resize(static_cast<std::size_t>(std::max(segment_, block_segments * groups_)));
    cluster_order_.resize(static_cast<std::size_t>(clusters_));
    group_order_.resize(static_cast<std::size_t>(block_segments * groups_));
  }

  /// Segments per block: the groups of a block's segments are grouped again into sections.
  static constexpr int block_segments = 8;

  /// Chunks appended (sealed in segments or not yet).
  std::int64_t chunks() const noexcept { return chunks_; }
  /// Segments clustered: chunks [0, segments() S) are in clusters. A segment is clustered over
  /// the clustering_delay() chunks after it, so this is (chunks() - delay) / S.
  std::int64_t segments() const noexcept { return ready_; }
  /// Chunks appended after a segment's last before it is clustered: S / 8 by default (0: at once).
  int clustering_delay() const noexcept { return delay_; }
  /// S.
  int segment_chunks() const noexcept { return segment_; }
  /// C.
  int clusters_per_segment() const noexcept { return clusters_; }
  /// Box of cluster g (segment g / C): [lo | hi], 2d floats.
  const float* box(std::int64_t g) const noexcept { return boxes_.data() + g * 2 * d_; }
  /// Centre of cluster g: the mean of its members' [lo | hi] (sums in double, in chunk order;
  /// zeros for an empty cluster). A chunk's score is linear in its row for a fixed query, so the
  /// centre's score is the members' mean score: the probe order of an inverted-file index.
  const float* centre(std::int64_t g) const noexcept { return cluster_centres_.data() + g * 2 * d_; }
  /// Members of cluster g, ascending chunk ids (empty for a cluster k-means left empty).
  std::span<const std::int32_t> members(std::int64_t g) const noexcept {
    const auto from = static_cast<std::size_t>(offsets_[static_cast<std::size_t>(g)]);
    return {members_.data() + from, static_cast<std::size_t>(offsets_[static_cast<std::size_t>(g) + 1]) - from};
  }
  /// Groups per segment: G = max(1, C / 8) (fewer in a segment with fewer non-empty clusters).
  int groups_per_segment() const noexcept { return groups_; }
  /// Box of group e (segment e / G): the [lo | hi] over its clusters' boxes.
  const float* group_box(std::int64_t e) const noexcept { return group_boxes_.data() + e * 2 * d_; }
  /// Centre of group e: the mean of its clusters' members' [lo | hi] (as centre()).
  const float* group_centre(std::int64_t e) const noexcept { return group_centres_.data() + e * 2 * d_; }
  /// Clusters (ids, ascending) of group e; empty for a group the segment did not need.
  std::span<const std::int32_t> group(std::int64_t e) const noexcept {
    const auto from = static_cast<std::size_t>(group_offsets_[static_cast<std::size_t>(e)]);
    return {group_clusters_.data() + from, static_cast<std::size_t>(group_offsets_[static_cast<std::size_t>(e) + 1]) - from};
  }
  /// Blocks sealed: segments [0, blocks() 8) have sections (a block is sealed with its last segment).
  std::int64_t blocks() const noexcept { return ready_ / block_segments; }
  /// Sections per block: G (fewer in a block with fewer non-empty groups).
  int sections_per_block() const noexcept { return groups_; }
  /// Box of section h (block h / G): the [lo | hi] over its groups' boxes.
  const float* section_box(std::int64_t h) const noexcept { return section_boxes_.data() + h * 2 * d_; }
  /// Centre of section h: its groups' centres weighted by their members (sums in double, in
  /// group order; zeros for an empty section): the mean of its members up to rounding.
  const float* section_centre(std::int64_t h) const noexcept { return section_centres_.data() + h * 2 * d_; }
  /// Groups (ids, ascending) of section h; empty for a section the block did not need.
  std::span<const std::int32_t> section(std::int64_t h) const noexcept {
    const auto from = static_cast<std::size_t>(section_offsets_[static_cast<std::size_t>(h)]);
    return {section_groups_.data() + from, static_cast<std::size_t>(section_offsets_[static_cast<std::size_t>(h) + 1]) - from};
  }
  /// Floats and ints held (capacity), counted as 4-byte words.
  std::size_t floats() const noexcept {
    return boxes_.capacity() + cluster_centres_.capacity() + group_centres_.capacity() + members_.capacity() + offsets_.capacity() + group_boxes_.capacity() + group_clusters_.capacity() +
           group_offsets_.capacity() + cluster_order_.capacity() + centres_.capacity() + 2 * sums_.capacity() + counts_.capacity() + owner_.capacity() +
           section_boxes_.capacity() + section_centres_.capacity() + section_groups_.capacity() + section_offsets_.capacity() + group_order_.capacity();
  }

  /// Room for `chunks` chunks: appends up to that many never allocate.
  void reserve(std::int64_t chunks) {
    const auto segments = static_cast<std::size_t>(chunks / segment_);
    boxes_.reserve(segments * static_cast<std::size_t>(clusters_) * 2 * static_cast<std::size_t>(d_));
    cluster_centres_.reserve(boxes_.capacity());
    members_.reserve(segments * static_cast<std::size_t>(segment_));
    offsets_.reserve(segments * static_cast<std::size_t>(clusters_) + 1);
    group_boxes_.reserve(segments * static_cast<std::size_t>(groups_) * 2 * static_cast<std::size_t>(d_));
    group_centres_.reserve(group_boxes_.capacity());
    group_clusters_.reserve(segments * static_cast<std::size_t>(clusters_));
    group_offsets_.reserve(segments * static_cast<std::size_t>(groups_) + 1);
    const auto blocks = segments / block_segments;
    section_boxes_.reserve(blocks * static_cast<std::size_t>(groups_) * 2 * static_cast<std::size_t>(d_));
    section_centres_.reserve(section_boxes_.capacity());
    section_groups_.reserve(blocks * block_segments * static_cast<std::size_t>(groups_));
    section_offsets_.reserve(blocks * static_cast<std::size_t>(groups_) + 1);
  }

  /// Takes the next chunk, whose representation is row chunks() of `summaries` (rows of [lo |
  /// hi], at least chunks() + 1 of them); does a slice of the pending segment's clustering, and
  /// starts clustering its own segment when it completes one (all of it when the delay is 0).
  void append(matrix_view<const float> summaries) {
    ++chunks_;
    if (job_.segment >= 0) advance(summaries);
    if (chunks_ % segment_ == 0) {
      start(chunks_ / segment_ - 1);
      if (delay_ == 0) advance(summaries);
    }
  }

  /// Forgets every chunk from `chunks` on (a cache truncated back): the segments they were in
  /// are dropped, their clusters' boxes and members zeroed first (nothing of them stays).
  void truncate(std::int64_t chunks) noexcept {
    chunks = std::clamp<std::int64_t>(chunks, 0, chunks_);
    // As if fed `chunks` chunks: the segments clustered by then stay, a pending clustering of
    // a segment whose chunks stay goes on (its work so far depends on that segment only), and a
    // segment whose clustering finished in the chunks removed is clustered again over the
    // appends it has left. Scratch of a segment dropped is cleared.
    const std::int64_t ready = std::max<std::int64_t>(0, chunks - delay_) / segment_;
    if (job_.segment >= 0 && (job_.segment + 1) * segment_ > chunks) {
      job_ = {};
      clear_scratch();
    }
    if (ready < ready_ && (ready + 1) * segment_ <= chunks) start(ready);  // finished in the removed chunks: again
    ready_ = std::min(ready_, ready);
    const auto keep = static_cast<std::size_t>(ready_);
    const std::size_t kept_clusters = keep * static_cast<std::size_t>(clusters_);
    std::fill(boxes_.begin() + static_cast<std::ptrdiff_t>(kept_clusters * 2 * static_cast<std::size_t>(d_)), boxes_.end(), 0.0f);
    boxes_.resize(kept_clusters * 2 * static_cast<std::size_t>(d_));
    std::fill(cluster_centres_.begin() + static_cast<std::ptrdiff_t>(kept_clusters * 2 * static_cast<std::size_t>(d_)), cluster_centres_.end(), 0.0f);
    cluster_centres_.resize(boxes_.size());
    std::fill(members_.begin() + static_cast<std::ptrdiff_t>(keep * static_cast<std::size_t>(segment_)), members_.end(), 0);
    members_.resize(keep * static_cast<std::size_t>(segment_));
    offsets_.resize(keep == 0 ? 0 : kept_clusters + 1);
    const std::size_t kept_groups = keep * static_cast<std::size_t>(groups_);
    std::fill(group_boxes_.begin() + static_cast<std::ptrdiff_t>(kept_groups * 2 * static_cast<std::size_t>(d_)), group_boxes_.end(), 0.0f);
    group_boxes_.resize(kept_groups * 2 * static_cast<std::size_t>(d_));
    std::fill(group_centres_.begin() + static_cast<std::ptrdiff_t>(kept_groups * 2 * static_cast<std::size_t>(d_)), group_centres_.end(), 0.0f);
    group_centres_.resize(group_boxes_.size());
    const std::size_t kept_listed = keep == 0 ? 0 : static_cast<std::size_t>(group_offsets_[kept_groups]);
    std::fill(group_clusters_.begin() + static_cast<std::ptrdiff_t>(kept_listed), group_clusters_.end(), 0);
    group_clusters_.resize(kept_listed);
    group_offsets_.resize(keep == 0 ? 0 : kept_groups + 1);
    const std::size_t kept_sections = static_cast<std::size_t>(blocks()) * static_cast<std::size_t>(groups_);
    std::fill(section_boxes_.begin() + static_cast<std::ptrdiff_t>(kept_sections * 2 * static_cast<std::size_t>(d_)), section_boxes_.end(), 0.0f);
    section_boxes_.resize(kept_sections * 2 * static_cast<std::size_t>(d_));
    std::fill(section_centres_.begin() + static_cast<std::ptrdiff_t>(kept_sections * 2 * static_cast<std::size_t>(d_)), section_centres_.end(), 0.0f);
    section_centres_.resize(section_boxes_.size());
    const std::size_t kept_grouped = kept_sections == 0 ? 0 : static_cast<std::size_t>(section_offsets_[kept_sections]);
    std::fill(section_groups_.begin() + static_cast<std::ptrdiff_t>(kept_grouped), section_groups_.end(), 0);
    section_groups_.resize(kept_grouped);
    section_offsets_.resize(kept_sections == 0 ? 0 : kept_sections + 1);
    chunks_ = chunks;
  }

 private:
  // k-means of `n` points (row(i): 2d floats) into `k` clusters, owner_[i] their cluster: seeds
  // at points i k / ... evenly spaced, `iterations_` rounds of assign-then-average (sums in
  // double, in point order; an empty cluster keeps its centre), a last assignment. Within the
  // object's own scratch: no allocation.
  template <class Row>
  void kmeans(int n, int k, Row row) {
    const std::ptrdiff_t r = 2 * d_;
    for (int c = 0; c < k; ++c) std::copy_n(row(static_cast<int>(std::int64_t{c} * n / k)), r, centres_.data() + c * r);
    for (int it = 0;; ++it) {
      for (int i = 0; i < n; ++i) owner_[static_cast<std::size_t>(i)] = nearest(row(i), k);
      if (it == iterations_) break;
      recentre(n, k, row);
    }
  }

  // The segment clustering in progress: `segment` (-1: none), the Lloyd iteration and next
  // point of its assignment pass, point assignments done, whether its centres are seeded.
  struct clustering_job {
    std::int64_t segment = -1;
    int iteration = 0, point = 0;
    std::int64_t done = 0;
    bool seeded = false;
  };

  void start(std::int64_t s) {
    job_ = {s, 0, 0, 0, false};
    clear_scratch();
  }
  void clear_scratch() noexcept {
    std::fill(centres_.begin(), centres_.end(), 0.0f);
    std::fill(sums_.begin(), sums_.end(), 0.0);
    std::fill(owner_.begin(), owner_.end(), 0);
  }

  // The pending segment's k-means (as kmeans() computes it) continued by its share of the point
  // assignments left over the appends left (the one that finishes also finishes the segment).
  void advance(matrix_view<const float> summaries) {
    const std::int64_t s = job_.segment, base = s * segment_;
    auto row = [&](int i) { return summaries.row(base + i); };
    const std::ptrdiff_t r = 2 * d_;
    if (!job_.seeded) {
      for (int c = 0; c < clusters_; ++c) std::copy_n(row(static_cast<int>(std::int64_t{c} * segment_ / clusters_)), r, centres_.data() + c * r);
      job_.seeded = true;
    }
    const std::int64_t total = std::int64_t{iterations_ + 1} * segment_;
    const std::int64_t appends_left = std::max<std::int64_t>(1, (s + 1) * segment_ + delay_ - chunks_ + 1);
    std::int64_t quota = (total - job_.done + appends_left - 1) / appends_left;
    while (quota > 0) {
      const int n = static_cast<int>(std::min<std::int64_t>(quota, segment_ - job_.point));
      for (int i = job_.point; i < job_.point + n; ++i) owner_[static_cast<std::size_t>(i)] = nearest(row(i), clusters_);
      job_.point += n;
      job_.done += n;
      quota -= n;
      if (job_.point < segment_) break;
      if (job_.iteration == iterations_) {
        finish(summaries, s);
        job_ = {};
        ++ready_;
        return;
      }
      recentre(segment_, clusters_, row);
      ++job_.iteration;
      job_.point = 0;
    }
  }

  // Centres moved to the mean of their points (sums in double, in point order; an empty
  // cluster keeps its centre).
  template <class Row>
  void recentre(int n, int k, Row row) {
    const std::ptrdiff_t r = 2 * d_;
    std::fill_n(sums_.begin(), k * r, 0.0);
    std::fill_n(counts_.begin(), k, 0);
    for (int i = 0; i < n; ++i) {
      const int c = owner_[static_cast<std::size_t>(i)];
      ++counts_[static_cast<std::size_t>(c)];
      const float* x = row(i);
      for (std::ptrdiff_t j = 0; j < r; ++j) sums_[static_cast<std::size_t>(c * r + j)] += x[j];
    }
    for (int c = 0; c < k; ++c)
      if (counts_[static_cast<std::size_t>(c)] > 0)
        for (std::ptrdiff_t j = 0; j < r; ++j)
          centres_[static_cast<std::size_t>(c * r + j)] =
              static_cast<float>(sums_[static_cast<std::size_t>(c * r + j)] / static_cast<double>(counts_[static_cast<std::size_t>(c)]));
  }

  // Segment s, its k-means done (owner_): its members and boxes appended; then its non-empty
  // clusters grouped the same way (kmeans over their boxes, small: at once) into
  // groups_per_segment() groups, each a box over its clusters' boxes.
  void finish(matrix_view<const float> summaries, std::int64_t s) {
    const std::ptrdiff_t r = 2 * d_;
    const std::int64_t base = s * segment_;
    // Members grouped by cluster, ascending within each (a counting sort over the chunk order).
    std::fill(counts_.begin(), counts_.end(), 0);
    for (int i = 0; i < segment_; ++i) ++counts_[static_cast<std::size_t>(owner_[static_cast<std::size_t>(i)])];
    if (offsets_.empty()) offsets_.push_back(0);
    for (int c = 0; c < clusters_; ++c) offsets_.push_back(offsets_.back() + counts_[static_cast<std::size_t>(c)]);
    members_.resize(members_.size() + static_cast<std::size_t>(segment_));
    const std::size_t first_cluster = offsets_.size() - 1 - static_cast<std::size_t>(clusters_);
    for (int c = 0; c < clusters_; ++c) counts_[static_cast<std::size_t>(c)] = offsets_[first_cluster + static_cast<std::size_t>(c)];
    for (int i = 0; i < segment_; ++i)
      members_[static_cast<std::size_t>(counts_[static_cast<std::size_t>(owner_[static_cast<std::size_t>(i)])]++)] =
          static_cast<std::int32_t>(base + i);
    boxes_.resize(boxes_.size() + static_cast<std::size_t>(clusters_) * static_cast<std::size_t>(r));
    cluster_centres_.resize(boxes_.size());
    int used = 0;  // non-empty clusters, listed in owner_ for the grouping
    for (int c = 0; c < clusters_; ++c) {
      float* box = boxes_.data() + (static_cast<std::ptrdiff_t>(first_cluster) + c) * r;
      std::fill_n(box, d_, std::numeric_limits<float>::infinity());
      std::fill_n(box + d_, d_, -std::numeric_limits<float>::infinity());
      std::fill_n(sums_.begin(), r, 0.0);
      for (std::int32_t m = offsets_[first_cluster + static_cast<std::size_t>(c)]; m < offsets_[first_cluster + static_cast<std::size_t>(c) + 1]; ++m) {
        widen(box, summaries.row(members_[static_cast<std::size_t>(m)]));
        add_row(summaries.row(members_[static_cast<std::size_t>(m)]));
      }
      average_into(cluster_centres_.data() + (static_cast<std::ptrdiff_t>(first_cluster) + c) * r,
                   offsets_[first_cluster + static_cast<std::size_t>(c) + 1] - offsets_[first_cluster + static_cast<std::size_t>(c)]);
      if (offsets_[first_cluster + static_cast<std::size_t>(c) + 1] > offsets_[first_cluster + static_cast<std::size_t>(c)]) counts_[static_cast<std::size_t>(used++)] = c;
    }
    // Groups: kmeans over the used clusters' boxes; a group lists its clusters ascending.
    std::copy_n(counts_.begin(), used, cluster_order_.begin());  // counts_ is k-means scratch below
    auto cluster_of = [&](int i) { return static_cast<std::int32_t>(static_cast<std::ptrdiff_t>(first_cluster) + cluster_order_[static_cast<std::size_t>(i)]); };
    group_boxes_.resize(group_boxes_.size() + static_cast<std::size_t>(groups_) * static_cast<std::size_t>(r));
    group_centres_.resize(group_boxes_.size());
    group_items(used, cluster_of, boxes_.data(), group_boxes_.data() + s * groups_ * r, group_centres_.data() + s * groups_ * r, group_clusters_,
                group_offsets_, [&](std::int32_t cluster) {
                  for (const std::int32_t m : members(cluster)) add_row(summaries.row(m));
                  return static_cast<std::int64_t>(members(cluster).size());
                });
    if ((s + 1) % block_segments == 0) seal_block(s / block_segments);
  }

  // Block b, its last segment's groups done: its non-empty groups grouped as finish() groups
  // clusters into sections_per_block() sections, each a centre weighted by its groups' members.
  void seal_block(std::int64_t b) {
    const std::ptrdiff_t r = 2 * d_;
    int used = 0;
    for (std::int64_t e = b * block_segments * groups_; e < (b + 1) * block_segments * groups_; ++e)
      if (!group(e).empty()) group_order_[static_cast<std::size_t>(used++)] = static_cast<std::int32_t>(e);
    section_boxes_.resize(section_boxes_.size() + static_cast<std::size_t>(groups_) * static_cast<std::size_t>(r));
    section_centres_.resize(section_boxes_.size());
    group_items(used, [&](int i) { return group_order_[static_cast<std::size_t>(i)]; }, group_boxes_.data(), section_boxes_.data() + b * groups_ * r,
                section_centres_.data() + b * groups_ * r, section_groups_, section_offsets_, [&](std::int32_t e) {
                  std::int64_t weight = 0;  // the group's members
                  for (const std::int32_t c : group(e)) weight += static_cast<std::int64_t>(members(c).size());
                  const float* centre = group_centres_.data() + std::ptrdiff_t{e} * r;
                  for (std::ptrdiff_t j = 0; j < r; ++j) sums_[static_cast<std::size_t>(j)] += static_cast<double>(weight) * static_cast<double>(centre[j]);
                  return weight;
                });
  }

  // `used` items (ids id_of(i), boxes at item_boxes + id 2d) k-means'd over their boxes into
  // min(G, used) of G slots; slot g: a box over its items' boxes (boxes + g 2d), its items
  // listed ascending in `listed` and closed in `offsets`, and a centre (centres + g 2d): the
  // sums add(id) puts in sums_ over the count it returns (zeros for an empty slot).
  template <class IdOf, class Add>
  void group_items(int used, IdOf id_of, const float* item_boxes, float* boxes, float* centres, std::vector<std::int32_t>& listed,
                   std::vector<std::int32_t>& offsets, Add add) {
    const std::ptrdiff_t r = 2 * d_;
    const int k = std::min(groups_, used);
    kmeans(used, k, [&](int i) { return item_boxes + std::ptrdiff_t{id_of(i)} * r; });
    if (offsets.empty()) offsets.push_back(0);
    for (int g = 0; g < groups_; ++g) {
      float* box = boxes + g * r;
      std::fill_n(box, d_, std::numeric_limits<float>::infinity());
      std::fill_n(box + d_, d_, -std::numeric_limits<float>::infinity());
      std::fill_n(sums_.begin(), r, 0.0);
      std::int64_t count = 0;
      for (int i = 0; i < used; ++i)
        if (g < k && owner_[static_cast<std::size_t>(i)] == g) {
          const std::int32_t id = id_of(i);
          listed.push_back(id);
          widen(box, item_boxes + std::ptrdiff_t{id} * r);
          count += add(id);
        }
      average_into(centres + g * r, count);
      offsets.push_back(static_cast<std::int32_t>(listed.size()));
    }
  }
  // sums_[0, 2d) += x (in double); average_into: out = sums_ / count (zeros for no rows).
  void add_row(const float* x) noexcept {
    for (std::ptrdiff_t j = 0; j < 2 * d_; ++j) sums_[static_cast<std::size_t>(j)] += x[j];
  }
  void average_into(float* out, std::int64_t count) const noexcept {
    for (std::ptrdiff_t j = 0; j < 2 * d_; ++j)
      out[j] = count == 0 ? 0.0f : static_cast<float>(sums_[static_cast<std::size_t>(j)] / static_cast<double>(count));
  }
  void widen(float* box, const float* x) const noexcept {
    for (std::ptrdiff_t j = 0; j < d_; ++j) {
      box[j] = std::min(box[j], x[j]);
      box[d_ + j] = std::max(box[d_ + j], x[d_ + j]);
    }
  }
  // The centre nearest to x among the first k (squared distance in double; ties to the lower).
  int nearest(const float* x, int k) const noexcept {
    const std::ptrdiff_t r = 2 * d_;
    int best = 0;
    double best_distance = std::numeric_limits<double>::infinity();
    for (int c = 0; c < k; ++c) {
      const float* y = centres_.data() + c * r;
      double distance = 0;
      for (std::ptrdiff_t j = 0; j < r; ++j) {
        const double t = static_cast<double>(x[j]) - static_cast<double>(y[j]);
        distance += t * t;
      }
      if (distance < best_distance) best_distance = distance, best = c;
    }
    return best;
  }

  std::ptrdiff_t d_;
  int segment_, clusters_, iterations_;
  int delay_;                  // S / 8: chunks over which a segment is clustered
  std::int64_t chunks_ = 0;
  std::int64_t ready_ = 0;     // segments clustered
  clustering_job job_;
  std::vector<float> boxes_;           // [segments C][lo | hi]
  std::vector<float> cluster_centres_;  // [segments C][2d]: members' mean
  std::vector<std::int32_t> members_;  // [segments S]: cluster by cluster, ascending within each
  std::vector<std::int32_t> offsets_;  // [segments C + 1]: cluster g's members at [offsets_[g], offsets_[g + 1])
  int groups_;                               // G
  std::vector<float> group_boxes_;           // [segments G][lo | hi]
  std::vector<float> group_centres_;         // [segments G][2d]: members' mean
  std::vector<std::int32_t> group_clusters_;  // the groups' clusters (ids), group by group, ascending within each
  std::vector<std::int32_t> group_offsets_;   // [segments G + 1]
  std::vector<float> section_boxes_;          // [blocks G][lo | hi]
  std::vector<float> section_centres_;        // [blocks G][2d]: weighted group centres
  std::vector<std::int32_t> section_groups_;  // the sections' groups (ids), section by section, ascending within each
  std::vector<std::int32_t> section_offsets_;  // [blocks G + 1]
  std::vector<std::int32_t> cluster_order_;   // scratch [C]: the non-empty clusters of the segment being sealed
  std::vector<std::int32_t> group_order_;     // scratch [8 G]: the non-empty groups of the block being sealed
  std::vector<float> centres_;         // k-means scratch: [C][2d]
  std::vector<double> sums_;           // [C][2d]
  std::vector<std::int32_t> counts_;   // [C]
  std::vector<std::int32_t> owner_;    // [S]
};

/// The levels of key_clusters a layout of segments of `segment_chunks` chunks in `clusters`
/// clusters keeps (see the file comment): (S, C), (S / 8, C / 8), ... while the segment holds
/// at least 2 chunks and 1 cluster; calls f(size, clusters) for each, largest first.
template <class F>
void for_each_cluster_level(int segment_chunks, int clusters, F f) {
  for (int size = segment_chunks, count = clusters; size >= 2 && count >= 1; size /= 8, count /= 8) {
    f(size, count);
    if (size % 8 != 0) break;  // a level must tile the one above it
  }
}

/// The order in which cluster_search opens clusters.
enum class cluster_probe {
  /// Best box bound first: the order that certifies (the k-th found beats every box left).
  box_bound,
  /// Best box bound and best centre score in turn, each cluster once. The centre's score is its
  /// members' mean score (an inverted-file index's order): it finds the clusters whose members
  /// score high together, which the box order ranks poorly where a box spans several topics;
  /// the box turns keep the clusters whose one member stands out (docs/results.md measures
  /// both). The certificate still holds: it is checked against the boxes left.
  box_and_centre,
};

/// The search over key_clusters (see the file comment).
struct cluster_search {
  /// Marks of one level: one per cluster, group and section.
  static std::size_t marks_of(const key_clusters& level) noexcept {
    return static_cast<std::size_t>(level.segments()) * static_cast<std::size_t>(level.clusters_per_segment() + level.groups_per_segment()) +
           static_cast<std::size_t>(level.blocks()) * static_cast<std::size_t>(level.sections_per_block());
  }
  /// Marks a search over `levels` needs in its scratch (bound_search_scratch::reserve_marks):
  /// one per cluster, group and section of every level.
  static std::size_t marks_needed(std::span<const key_clusters> levels) noexcept {
    std::size_t n = 0;
    for (const key_clusters& level : levels) n += marks_of(level);
    return n;
  }
  /// The same for a layout of segments of `segment_chunks` chunks in `clusters` clusters over
  /// up to `chunks` chunks.
  static std::size_t marks_needed(int segment_chunks, int clusters, std::int64_t chunks) noexcept {
    std::size_t n = 0;
    for_each_cluster_level(segment_chunks, clusters, [&](int size, int count) {
      const int groups = std::max(1, count / 8);
      n += static_cast<std::size_t>(chunks / size) * static_cast<std::size_t>(count + groups) +
           static_cast<std::size_t>(chunks / size / key_clusters::block_segments) * static_cast<std::size_t>(groups);
    });
    return n;
  }

  /// The `wanted` best chunks of [first, end) for the rotated query `q` (score
  /// detail::bound_dot(q, lo, hi) descending, ties to the lower chunk, NaN last), best first into
  /// `out`, reading at most `probe` chunks from clusters besides the tail and the boxes (the
  /// flat scan's choice whenever the k-th found beats every box left before the budget ends).
  /// `levels`: largest segments first, each level's segment size a multiple of the next's, all
  /// fed the same chunks. Returns how many. `summaries` holds the chunks' rows (at least
  /// levels[0].chunks()). Never allocates once `scratch` is reserved for the chunks, `wanted`
  /// and (box_and_centre) the marks. `read_budget`: summaries (boxes, centres, chunks) after
  /// which no turn starts (the covering entries and the tail are read first, a turn under way
  /// completes).
  static std::size_t top(std::span<const key_clusters> levels, matrix_view<const float> summaries, const float* q, std::int64_t first,
                         std::int64_t end, std::size_t wanted, std::int64_t probe, std::span<std::int32_t> out, bound_search_scratch& scratch,
                         bound_search::stats* read = nullptr, cluster_probe order = cluster_probe::box_bound,
                         std::int64_t read_budget = std::numeric_limits<std::int64_t>::max()) noexcept {
    using entry = bound_search_scratch::entry;
    std::int64_t spent = 0;  // summaries read: boxes, centres and chunks
    if (levels.empty()) return 0;
    end = std::min(end, levels.front().chunks());
    if (first >= end || wanted == 0) return 0;
    const std::ptrdiff_t d = summaries.cols() / 2;
    const bool centres = order == cluster_probe::box_and_centre;
    detail::ranked_chunks kept(out, scratch.kept_scores(wanted), wanted);
    auto keep = [&](std::int64_t c) {
      const float s = detail::bound_dot(q, summaries.row(c), summaries.row(c) + d, d);
      kept.offer(c, std::isnan(s) ? -std::numeric_limits<float>::infinity() : s);
      ++spent;
      if (read) ++read->chunks;
    };
    // The tail, rows side by side: scored four at a time (bound_dot_rows: bound_dot's bits).
    auto keep_run = [&](std::int64_t from, std::int64_t to) {
      constexpr std::int64_t block = 64;
      std::array<float, block> scores;
      for (std::int64_t c0 = from; c0 < to; c0 += block) {
        const std::int64_t n = std::min(block, to - c0);
        detail::bound_dot_rows(q, summaries.row(c0), summaries.row_stride(), n, d, scores.data());
        for (std::int64_t i = 0; i < n; ++i) {
          const float s = scores[static_cast<std::size_t>(i)];
          kept.offer(c0 + i, std::isnan(s) ? -std::numeric_limits<float>::infinity() : s);
          ++spent;
          if (read) ++read->chunks;
        }
      }
    };
    // Marks (box_and_centre): a cluster opened or a group or section expanded by one order is
    // skipped when the other reaches it. Level l's clusters from mark_base[l], then its groups,
    // then its sections.
    std::array<std::size_t, 16> mark_base{};  // levels shrink 8x from S < 2^31: at most 11
    if (centres) {
      std::size_t n = 0;
      for (std::size_t l = 0; l < levels.size() && l < mark_base.size(); ++l) {
        mark_base[l] = n;
        n += marks_of(levels[l]);
      }
      scratch.clear_marks(n);
    }
    // Entries: `first` 0 a cluster, -1 a group, -2 a section (the order at equal bounds).
    constexpr std::int32_t cluster = 0, group = -1, section = -2;
    auto mark = [&](std::int32_t l, std::int64_t id, std::int64_t kind) -> std::uint8_t& {
      const key_clusters& level = levels[static_cast<std::size_t>(l)];
      const std::int64_t groups_from = level.segments() * level.clusters_per_segment();
      const std::int64_t at = kind == cluster ? id : kind == group ? groups_from + id : groups_from + level.segments() * level.groups_per_segment() + id;
      return scratch.mark(mark_base[static_cast<std::size_t>(l)] + static_cast<std::size_t>(at));
    };
    // [0, end) covered by the largest segments wholly before `end`, then the next level's, ...;
    // the chunks after the smallest are scored one by one. The covering blocks' sections and
    // the other covering segments' groups go on the heap; a section popped puts its groups
    // there, a group its clusters (a box bounds those inside it, and it is popped before them
    // at the same bound), so clusters come off the heap in the order of their own bounds, as if
    // every cluster had been bounded: only the reads differ. With centres, a second heap holds
    // the same entries by centre score.
    auto& by_box = scratch.frontier_;
    auto& by_centre = scratch.centre_frontier_;
    by_box.clear();
    by_centre.clear();
    auto worse = [](const entry& a, const entry& b) {  // ties: sections, then groups, then the larger segments, then the lower id
      if (a.bound != b.bound) return a.bound < b.bound;
      if (a.first != b.first) return a.first > b.first;
      return a.level > b.level || (a.level == b.level && a.index > b.index);
    };
    auto push_to = [&](std::vector<entry>& heap, std::size_t l, std::int64_t id, const float* box, std::int32_t kind) {
      float bound = detail::bound_dot(q, box, box + d, d);
      if (std::isnan(bound)) bound = std::numeric_limits<float>::infinity();
      heap.push_back({bound, kind, static_cast<std::int32_t>(l), id});
      std::push_heap(heap.begin(), heap.end(), worse);
      ++spent;
      if (read) ++read->boxes;
    };
    auto push = [&](std::size_t l, std::int64_t id, std::int32_t kind) {
      const key_clusters& level = levels[l];
      push_to(by_box, l, id, kind == cluster ? level.box(id) : kind == group ? level.group_box(id) : level.section_box(id), kind);
      if (centres) push_to(by_centre, l, id, kind == cluster ? level.centre(id) : kind == group ? level.group_centre(id) : level.section_centre(id), kind);
    };
    // A group of level l as it goes on the heap: none when empty, its cluster when it has one
    // (with a member >= first; the box is the cluster's), else itself.
    auto push_group = [&](std::size_t l, std::int64_t e) {
      const auto clusters = levels[l].group(e);
      if (clusters.size() == 1) {
        if (levels[l].members(clusters[0]).back() >= first) push(l, clusters[0], cluster);
      } else if (!clusters.empty()) {
        push(l, e, group);
      }
    };
    std::int64_t covered = 0;
    for (std::size_t l = 0; l < levels.size(); ++l) {
      const key_clusters& level = levels[l];
      // Segments clustered by the time `end` chunks had come (clustered over the S / 8 chunks
      // after their last): what a query at `end` may use, however many chunks were fed since.
      const std::int64_t usable = std::max<std::int64_t>(0, end - level.clustering_delay()) / level.segment_chunks();
      const std::int64_t from = covered / level.segment_chunks(), to = std::min(level.segments(), usable);
      // Whole blocks by their sections (a section of one group as that group), the segments
      // before and after them by their groups.
      constexpr std::int64_t b = key_clusters::block_segments;
      const std::int64_t blocks_from = (from + b - 1) / b, blocks_to = std::max(blocks_from, to / b);
      const std::int64_t g = level.groups_per_segment(), h = level.sections_per_block();
      for (std::int64_t e = from * g; e < std::min(to, blocks_from * b) * g; ++e) push_group(l, e);
      for (std::int64_t s = blocks_from * h; s < blocks_to * h; ++s) {
        const auto groups = level.section(s);
        if (groups.size() == 1) push_group(l, groups[0]);
        else if (!groups.empty()) push(l, s, section);
      }
      for (std::int64_t e = std::max(from, blocks_to * b) * g; e < to * g; ++e) push_group(l, e);
      covered = std::max(covered, to * level.segment_chunks());
    }
    keep_run(std::max(first, covered), end);
    // Drops the entries at the top of `heap` the other order has dealt with already.
    auto settle = [&](std::vector<entry>& heap) {
      while (centres && !heap.empty() && mark(heap.front().level, heap.front().index, heap.front().first) != 0) {
        std::pop_heap(heap.begin(), heap.end(), worse);
        heap.pop_back();
      }
    };
    std::int64_t probed = 0;
    bool centre_turn = false;
    while (probed < probe && spent < read_budget) {
      settle(by_box);
      if (by_box.empty()) break;  // every cluster opened
      if (kept.full() && by_box.front().bound < kept.kth_score()) break;  // certified: no member left can reach the k-th
      settle(by_centre);
      auto& heap = centre_turn && !by_centre.empty() ? by_centre : by_box;
      centre_turn = centres && !centre_turn;
      const entry best = heap.front();
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.pop_back();
      const key_clusters& level = levels[static_cast<std::size_t>(best.level)];
      if (centres) mark(best.level, best.index, best.first) = 1;
      if (best.first == section) {  // its groups
        for (const std::int32_t e : level.section(best.index)) push_group(static_cast<std::size_t>(best.level), e);
        continue;
      }
      if (best.first == group) {  // its clusters with a member >= first
        for (const std::int32_t c : level.group(best.index)) {
          const auto members = level.members(c);
          if (!members.empty() && members.back() >= first) push(static_cast<std::size_t>(best.level), c, cluster);
        }
        continue;
      }
      for (const std::int32_t c : level.members(best.index))
        if (c >= first) keep(c), ++probed;
    }
    return kept.count();
  }
};

}  // namespace longheads
