// SPDX-License-Identifier: MIT
// Chunk index: boxes of key bounds over groups of chunks, searched best-first for the top chunks.
//
// For the Quest-style bound score (key_bounds_encoder + bound_scorer), a chunk's representation
// is [lo | hi], the per-channel min and max of its keys, and its score sum_i max(q_i lo_i,
// q_i hi_i) bounds q . k for every key. A box over several chunks (the min of their lo, the max
// of their hi) bounds every one of their scores from above, in floating point too: every step of
// detail::bound_dot (products, max, sums in a fixed order) is monotone in lo and hi. A
// best-first search over a tree of such boxes therefore returns exactly the flat scan's top
// chunks, ties to the lower chunk included, while reading only the boxes whose bound could still
// beat what it has found: sublinear work per query where the scores are spread.
//
// Level 0 are the chunks' own representations (in the cache, passed to the search); level l
// >= 1 holds ceil(n / F^l) boxes, box b covering chunks [b F^l, (b + 1) F^l). Appending a chunk
// folds it into one box per level (min and max are exact, so the boxes equal a rebuild's bits).
// The selection index policies that search these trees are in index_policies.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <string>
#include <vector>

#include "config.hpp"
#include "errors.hpp"
#include "detail/simd.hpp"
#include "views.hpp"

namespace longheads {

/// The boxes of one head's chunks, level by level (see the file comment).
class bound_tree {
 public:
  /// @param head_dim d: representations are [lo | hi], 2d floats
  /// @param fanout F >= 2, chunks (or boxes) per box
  explicit bound_tree(int head_dim, int fanout = 16) : d_(head_dim), fanout_(std::max(2, fanout)) {}

  /// Chunks indexed.
  std::int64_t chunks() const noexcept { return chunks_; }
  /// Levels above the chunks (0 while there are none).
  int levels() const noexcept { return levels_used_; }
  /// F.
  int fanout() const noexcept { return fanout_; }
  /// Boxes at level l >= 1.
  std::int64_t boxes(int level) const noexcept { return (chunks_ + span(level) - 1) / span(level); }
  /// Box b of level l >= 1: [lo | hi], 2d floats.
  const float* box(int level, std::int64_t b) const noexcept { return levels_[static_cast<std::size_t>(level - 1)].data() + b * 2 * d_; }
  /// Chunks a box of level l covers: F^l.
  std::int64_t span(int level) const noexcept {
    std::int64_t s = 1;
    for (int l = 0; l < level; ++l) s *= fanout_;
    return s;
  }
  /// Floats held by the boxes (capacity).
  std::size_t floats() const noexcept {
    std::size_t n = 0;
    for (const auto& level : levels_) n += level.capacity();
    return n;
  }

  /// Allocates the boxes of `chunks` chunks now, so appends up to that many never allocate.
  void reserve(std::int64_t chunks) {
    int needed = 0;
    while (span(needed) < chunks) ++needed;
    if (static_cast<int>(levels_.size()) < needed) levels_.resize(static_cast<std::size_t>(needed));
    for (int l = 1; l <= needed; ++l)
      levels_[static_cast<std::size_t>(l - 1)].reserve(static_cast<std::size_t>((chunks + span(l) - 1) / span(l) * 2 * d_));
  }

  /// Indexes the next chunk, whose representation ([lo | hi]) is `summary`: one box per level
  /// grows to cover it, and a level is added when the top box is full.
  void append(const float* summary) {
    if (levels_used_ == 0 || chunks_ == span(levels_used_)) {
      // A new top level, whose one box covers everything so far: the old top box.
      if (static_cast<int>(levels_.size()) == levels_used_) levels_.emplace_back();
      auto& top = levels_[static_cast<std::size_t>(levels_used_)];
      if (levels_used_ > 0) top.assign(box(levels_used_, 0), box(levels_used_, 0) + 2 * d_);
      else top.clear();
      ++levels_used_;
    }
    for (int l = 1; l <= levels_used_; ++l) {
      auto& level = levels_[static_cast<std::size_t>(l - 1)];
      const std::int64_t b = chunks_ / span(l);
      if (static_cast<std::size_t>(b * 2 * d_) == level.size()) {
        level.insert(level.end(), summary, summary + 2 * d_);
        continue;
      }
      float* target = level.data() + b * 2 * d_;
      for (std::ptrdiff_t i = 0; i < d_; ++i) {
        target[i] = std::min(target[i], summary[i]);
        target[d_ + i] = std::max(target[d_ + i], summary[d_ + i]);
      }
    }
    ++chunks_;
  }

  /// Forgets every chunk from `chunks` on (a cache truncated back): the boxes are rebuilt from
  /// the remaining chunks' representations, rows of `summaries`, in the memory they had.
  void truncate(std::int64_t chunks, matrix_view<const float> summaries) noexcept {
    for (auto& level : levels_) level.clear();  // keeps the capacity
    levels_used_ = 0;
    chunks_ = 0;
    for (std::int64_t c = 0; c < chunks; ++c) append(summaries.row(c));  // within capacity: no allocation
  }

 private:
  std::ptrdiff_t d_;
  int fanout_;
  std::int64_t chunks_ = 0;
  int levels_used_ = 0;
  std::vector<std::vector<float>> levels_;  // level l at [l - 1]: boxes x [lo | hi]
};

/// Scratch of one search: the frontier, allocated once (reserve) for a number of chunks.
class bound_search_scratch {
 public:
  /// Room for a search over `chunks` chunks with fan-out F (the frontier never holds more
  /// entries than the tree has nodes).
  void reserve(std::int64_t chunks, int fanout) {
    const auto n = static_cast<std::size_t>(std::max<std::int64_t>(chunks, 1));
    frontier_.reserve(2 * n + static_cast<std::size_t>(fanout) * 64);
    centre_frontier_.reserve(frontier_.capacity());
  }
  /// Room for `n` marks (cluster_search with cluster_probe::box_and_centre: one per cluster and
  /// group, cluster_search::marks_needed).
  void reserve_marks(std::size_t n) {
    if (marks_.size() < n) marks_.resize(n);
  }
  /// Room for the scores of `wanted` chunks kept by a search that ranks as it goes
  /// (certified_search, cluster_search).
  void reserve_kept(std::size_t wanted) { beam_bounds_.resize(std::max(beam_bounds_.size(), wanted)); }
  /// Room for a beam search of width `beam` with fan-out F: no level holds more than (beam + 2) F
  /// nodes (the kept boxes' children and those of the two boxes cut by the range's ends).
  void reserve_beam(int beam, int fanout) {
    const auto n = static_cast<std::size_t>(beam + 2) * static_cast<std::size_t>(fanout) + 1;
    beam_nodes_.reserve(n);
    beam_open_.reserve(static_cast<std::size_t>(beam) + 2 * static_cast<std::size_t>(fanout) + 2);
    beam_bounds_.resize(std::max(beam_bounds_.size(), static_cast<std::size_t>(fanout)));
    beam_runs_.reserve(static_cast<std::size_t>(beam) + 4);
  }

 private:
  friend struct bound_search;
  friend struct beam_search;
  friend struct certified_search;
  friend struct cluster_search;
  // The kept chunks' scores (beam_bounds_ doubles as them: a search that ranks as it goes has
  // run its beam first). Allocates only when `wanted` passes what reserve_kept gave.
  float* kept_scores(std::size_t wanted) {
    if (beam_bounds_.size() < wanted) beam_bounds_.resize(wanted);
    return beam_bounds_.data();
  }
  struct entry {
    float bound;         // the box's bound (NaN read as +inf) or the chunk's score (NaN as -inf)
    std::int32_t first;  // the lowest candidate chunk it covers
    std::int32_t level;  // 0: a chunk
    std::int64_t index;  // box or chunk index in its level
  };
  std::vector<entry> frontier_;
  std::vector<entry> centre_frontier_;  // cluster_search: the same entries by centre score
  // cluster_search: the first n marks zeroed (allocates only past what reserve_marks gave).
  void clear_marks(std::size_t n) {
    if (marks_.size() < n) marks_.resize(n);
    std::fill_n(marks_.begin(), n, std::uint8_t{0});
  }
  std::uint8_t& mark(std::size_t i) noexcept { return marks_[i]; }
  std::vector<std::uint8_t> marks_;
  struct beam_node {
    float bound;         // the box's bound or the chunk's score (NaN as in entry)
    std::int64_t index;  // box or chunk index in its level
  };
  std::vector<beam_node> beam_nodes_;  // beam_search: one level's nodes inside the candidates
  std::vector<std::int64_t> beam_open_;  // beam_search: the boxes whose children are the next level
  std::vector<float> beam_bounds_;       // beam_search: one box's children's bounds
  std::vector<std::pair<std::int64_t, std::int64_t>> beam_runs_;  // beam_search: runs of children to score
};

namespace detail {
/// The best chunks offered so far, at most `wanted`, best first (larger score, then lower id;
/// a NaN score is offered as -inf) in `out`, their scores beside in `scores`.
class ranked_chunks {
 public:
  ranked_chunks(std::span<std::int32_t> out, float* scores, std::size_t wanted) noexcept : out_(out), scores_(scores), wanted_(wanted) {}
  /// Takes out[0, n) as kept already (best first), scoring each with score_of(chunk).
  template <class ScoreOf>
  void adopt(std::size_t n, ScoreOf score_of) noexcept {
    kept_ = n;
    for (std::size_t i = 0; i < n; ++i) scores_[i] = score_of(out_[i]);
  }
  /// Chunks kept.
  std::size_t count() const noexcept { return kept_; }
  /// Whether `wanted` are kept.
  bool full() const noexcept { return kept_ == wanted_; }
  /// The k-th kept: its score and chunk (full() only).
  float kth_score() const noexcept { return scores_[kept_ - 1]; }
  std::int32_t kth() const noexcept { return out_[kept_ - 1]; }
  /// Whether chunk c is kept.
  bool holds(std::int64_t c) const noexcept { return std::find(out_.begin(), out_.begin() + static_cast<std::ptrdiff_t>(kept_), c) != out_.begin() + static_cast<std::ptrdiff_t>(kept_); }
  /// Keeps chunk c of score s if it ranks among the best `wanted`.
  void offer(std::int64_t c, float s) noexcept {
    if (full() && !beats(s, c, scores_[kept_ - 1], out_[kept_ - 1])) return;
    std::size_t at = kept_ < wanted_ ? kept_++ : kept_ - 1;
    for (; at > 0 && beats(s, c, scores_[at - 1], out_[at - 1]); --at) {
      out_[at] = out_[at - 1];
      scores_[at] = scores_[at - 1];
    }
    out_[at] = static_cast<std::int32_t>(c);
    scores_[at] = s;
  }

 private:
  static bool beats(float sa, std::int64_t a, float sb, std::int64_t b) noexcept { return sa > sb || (sa == sb && a < b); }
  std::span<std::int32_t> out_;
  float* scores_;
  std::size_t wanted_, kept_ = 0;
};
}  // namespace detail

/// The best-first search (see the file comment).
struct bound_search {
  /// What one search read.
  struct stats {
    std::int64_t boxes = 0;   ///< box bounds computed
    std::int64_t chunks = 0;  ///< chunk scores computed
  };

  /// The `wanted` best of chunks [first, end) for the rotated query `q` ([d]), by score
  /// detail::bound_dot(q, lo, hi) descending, ties to the lower chunk, NaN scores last (as
  /// sink_local_topk_selector ranks them), best first into `out`. `summaries` holds the chunks'
  /// representations, rows of [lo | hi] (at least tree.chunks() rows). Returns how many (wanted,
  /// or fewer candidates). Never allocates once `scratch` is reserved for tree.chunks().
  static std::size_t top(const bound_tree& tree, matrix_view<const float> summaries, const float* q, std::int64_t first,
                         std::int64_t end, std::size_t wanted, std::span<std::int32_t> out, bound_search_scratch& scratch,
                         stats* read = nullptr) noexcept {
    using entry = bound_search_scratch::entry;
    end = std::min(end, tree.chunks());
    if (first >= end || wanted == 0) return 0;
    const std::ptrdiff_t d = summaries.cols() / 2;
    auto& frontier = scratch.frontier_;
    frontier.clear();
    // Better first: a larger bound, then a lower first chunk (a box's chunks all have ids >= its
    // first and scores <= its bound, so a chunk popped ahead of it beats all of them).
    auto worse = [](const entry& a, const entry& b) { return a.bound < b.bound || (a.bound == b.bound && a.first > b.first); };
    auto push = [&](int level, std::int64_t index) {
      const std::int64_t span = tree.span(level);
      const std::int64_t lowest = std::max(first, index * span);
      if (lowest >= std::min(end, (index + 1) * span)) return;  // no candidate inside
      const float* lo = level == 0 ? summaries.row(index) : tree.box(level, index);
      float bound = detail::bound_dot(q, lo, lo + d, d);
      if (std::isnan(bound)) bound = level == 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
      if (read) ++(level == 0 ? read->chunks : read->boxes);
      frontier.push_back({bound, static_cast<std::int32_t>(lowest), level, index});
      std::push_heap(frontier.begin(), frontier.end(), worse);
    };
    const int top_level = tree.levels();
    for (std::int64_t b = 0; b < (top_level == 0 ? tree.chunks() : tree.boxes(top_level)); ++b) push(top_level, b);
    std::size_t found = 0;
    while (found < wanted && !frontier.empty()) {
      std::pop_heap(frontier.begin(), frontier.end(), worse);
      const entry best = frontier.back();
      frontier.pop_back();
      if (best.level == 0) {
        out[found++] = static_cast<std::int32_t>(best.index);
        continue;
      }
      const std::int64_t children = best.level == 1 ? tree.chunks() : tree.boxes(best.level - 1);
      for (std::int64_t child = best.index * tree.fanout(); child < std::min(children, (best.index + 1) * tree.fanout()); ++child)
        push(best.level - 1, child);
    }
    return found;
  }
};

/// The approximate search: level by level from the top, only the `beam` best boxes (by bound)
/// of each level are opened, and the wanted chunks are the best among the chunks reached. Work
/// per query is O(beam F log_F n) instead of O(n); the chunks found are the flat scan's when
/// every box on their way ranks in its level's beam (chunk_index_test measures how often).
///
/// Deterministic and causal: a box competes only when all F^l chunks it covers lie inside the
/// candidates [first, end), so its bits depend only on chunks before `end` (whatever the tree
/// holds beyond); a box cut by either end is always opened. The choice of query p therefore depends only on the chunks before its own, the
/// same in prefill and decode and under every split.
struct beam_search {
  /// Moves the `k` best of `nodes` (larger bound, then lower index) to its front, best first, in
  /// one pass (most nodes lose to the k-th best so far in one comparison); returns how many.
  static std::size_t keep_best(std::vector<bound_search_scratch::beam_node>& nodes, std::size_t k) noexcept {
    auto better = [](const auto& a, const auto& b) { return a.bound > b.bound || (a.bound == b.bound && a.index < b.index); };
    std::size_t kept = 0;
    for (std::size_t i = 0; i < nodes.size(); ++i) {
      const auto candidate = nodes[i];  // read before the front (indices <= i) is written
      if (kept == k && (k == 0 || !better(candidate, nodes[k - 1]))) continue;
      std::size_t at = kept < k ? kept++ : k - 1;
      for (; at > 0 && better(candidate, nodes[at - 1]); --at) nodes[at] = nodes[at - 1];
      nodes[at] = candidate;
    }
    return kept;
  }

  /// The `wanted` best chunks of [first, end) that the beam reaches, in the order and with the
  /// ties and NaN rule of bound_search::top, best first into `out`. Returns how many (wanted, or
  /// fewer candidates). Never allocates once `scratch` is reserved (reserve_beam).
  static std::size_t top(const bound_tree& tree, matrix_view<const float> summaries, const float* q, std::int64_t first,
                         std::int64_t end, std::size_t wanted, int beam, std::span<std::int32_t> out, bound_search_scratch& scratch,
                         bound_search::stats* read = nullptr) noexcept {
    end = std::min(end, tree.chunks());
    if (first >= end || wanted == 0) return 0;
    const std::ptrdiff_t d = summaries.cols() / 2;
    const std::int64_t fanout = tree.fanout();
    auto& inside = scratch.beam_nodes_;  // this level's nodes wholly inside [first, end), with bounds
    auto& opened = scratch.beam_open_;   // the previous level's boxes to open: the beam, then the cut ones
    // Nodes of `level` under the boxes in `opened` (level + 1): those cut by [first, end) are
    // opened further whatever their bound, those inside are scored.
    auto& runs = scratch.beam_runs_;   // per parent, its children wholly inside: one run [lo, hi)
    // The nodes of `level` under the boxes in `opened` (level + 1): those cut by [first, end)
    // are opened further whatever their bound; those inside are scored into `inside`, unless
    // the beam keeps all of them anyway (then they are opened directly and `inside` is empty).
    auto expand = [&](int level) {
      const std::int64_t span = tree.span(level), count = level == 0 ? tree.chunks() : tree.boxes(level);
      inside.clear();
      runs.clear();
      std::int64_t inside_count = 0;
      const std::size_t parents = opened.size();
      for (std::size_t p = 0; p < parents; ++p) {
        const std::int64_t lo_child = level == tree.levels() ? 0 : opened[p] * fanout;
        const std::int64_t hi_child = level == tree.levels() ? count : std::min(count, lo_child + fanout);
        std::int64_t run_lo = hi_child, run_hi = hi_child;
        for (std::int64_t c = lo_child; c < hi_child; ++c) {
          const std::int64_t lowest = c * span, stop = lowest + span;  // stop may pass the last chunk
          if (stop <= first || lowest >= end) continue;
          if (lowest < first || stop > end) {
            opened.push_back(c);  // cut, or not yet full: opened at the next level (kept after the parents)
            continue;
          }
          if (run_lo == hi_child) run_lo = c;
          run_hi = c + 1;
        }
        if (run_lo < run_hi) runs.push_back({run_lo, run_hi}), inside_count += run_hi - run_lo;
      }
      opened.erase(opened.begin(), opened.begin() + static_cast<std::ptrdiff_t>(parents));
      if (level > 0 && inside_count <= beam) {
        for (const auto& [lo, hi] : runs)
          for (std::int64_t c = lo; c < hi; ++c) opened.push_back(c);
        return;
      }
      const float nan_bound = level == 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
      const std::ptrdiff_t stride = level == 0 ? summaries.row_stride() : 2 * d;
      float* bounds = scratch.beam_bounds_.data();
      const auto piece = static_cast<std::int64_t>(scratch.beam_bounds_.size());
      for (const auto& [lo, hi] : runs)
        for (std::int64_t c0 = lo; c0 < hi; c0 += piece) {
          const std::int64_t c1 = std::min(hi, c0 + piece);
          detail::bound_dot_rows(q, level == 0 ? summaries.row(c0) : tree.box(level, c0), stride, c1 - c0, d, bounds);
          for (std::int64_t c = c0; c < c1; ++c) {
            const float bound = bounds[c - c0];
            inside.push_back({std::isnan(bound) ? nan_bound : bound, c});
          }
        }
      if (read) (level == 0 ? read->chunks : read->boxes) += static_cast<std::int64_t>(inside.size());
    };
    opened.clear();
    opened.push_back(0);  // stands for "every box of the top level"
    for (int level = tree.levels(); level >= 1; --level) {
      expand(level);
      // The beam: the `beam` best boxes inside join the cut ones.
      const std::size_t kept = keep_best(inside, static_cast<std::size_t>(beam));
      for (std::size_t i = 0; i < kept; ++i) opened.push_back(inside[i].index);
    }
    expand(0);  // chunks: none is cut
    const std::size_t found = keep_best(inside, wanted);
    for (std::size_t i = 0; i < found; ++i) out[i] = static_cast<std::int32_t>(inside[i].index);
    return found;
  }
};

/// The certified search: the beam's choice, then a best-first search over the same boxes that
/// widens until a bound proves every chunk it skipped scores at most the k-th it kept plus
/// `epsilon`. With epsilon 0 the result is exactly the flat scan's (ties to the lower chunk
/// included); with epsilon > 0, every chunk it did not choose scores at most its k-th score +
/// epsilon. The beam's k-th score is where the widening starts, so a query whose chunks stand
/// out stops early; where the boxes' bounds reach past the k-th score (nearly tied scores,
/// boxes wider than the gap) it reads every box and chunk, and `read` says so in numbers.
/// Causal like the beam: a box cut by [first, end) is opened, never bounded, so the choice
/// depends only on the chunks before `end`.
struct certified_search {
  /// The `wanted` best chunks of [first, end) for the rotated query `q`, best first into `out`;
  /// returns how many. `read` (if given) counts the beam's reads and the widening's.
  static std::size_t top(const bound_tree& tree, matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end,
                         std::size_t wanted, int beam, float epsilon, std::span<std::int32_t> out, bound_search_scratch& scratch,
                         bound_search::stats* read = nullptr) noexcept {
    using entry = bound_search_scratch::entry;
    end = std::min(end, tree.chunks());
    if (first >= end || wanted == 0) return 0;
    const std::ptrdiff_t d = summaries.cols() / 2;
    // The kept chunks, best first (larger score, then lower id), seeded with the beam's.
    const std::size_t seeded = beam_search::top(tree, summaries, q, first, end, wanted, beam, out, scratch, read);
    auto score_of = [&](std::int64_t c) {
      const float s = detail::bound_dot(q, summaries.row(c), summaries.row(c) + d, d);
      return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
    };
    detail::ranked_chunks kept(out, scratch.kept_scores(wanted), wanted);
    kept.adopt(seeded, score_of);
    auto keep = [&](std::int64_t c) {
      if (kept.holds(c)) return;  // the beam found it
      if (read) ++read->chunks;
      kept.offer(c, score_of(c));
    };
    auto& frontier = scratch.frontier_;
    frontier.clear();
    auto worse = [](const entry& a, const entry& b) { return a.bound < b.bound || (a.bound == b.bound && a.first > b.first); };
    auto push = [&](int level, std::int64_t index) {
      const std::int64_t span = tree.span(level), lowest = index * span, stop = lowest + span;
      if (stop <= first || lowest >= end) return;
      if (level == 0) return keep(index);
      const bool cut = lowest < first || stop > end;  // its bound would speak of chunks outside: opened, never bounded
      float bound = std::numeric_limits<float>::infinity();
      if (!cut) {
        const float* box = tree.box(level, index);
        bound = detail::bound_dot(q, box, box + d, d);
        if (std::isnan(bound)) bound = std::numeric_limits<float>::infinity();
        if (read) ++read->boxes;
      }
      frontier.push_back({bound, static_cast<std::int32_t>(std::max(first, lowest)), level, index});
      std::push_heap(frontier.begin(), frontier.end(), worse);
    };
    const int top_level = tree.levels();
    for (std::int64_t b = 0; b < (top_level == 0 ? tree.chunks() : tree.boxes(top_level)); ++b) push(top_level, b);
    while (!frontier.empty()) {
      const entry best = frontier.front();
      if (kept.full()) {
        const float kth = kept.kth_score();
        // The certificate: no chunk left can beat the k-th (epsilon 0: not even by the tie to a lower id).
        const bool settled = epsilon > 0.0f ? best.bound <= kth + epsilon : best.bound < kth || (best.bound == kth && best.first > kept.kth());
        if (settled) break;
      }
      std::pop_heap(frontier.begin(), frontier.end(), worse);
      frontier.pop_back();
      const std::int64_t children = best.level == 1 ? tree.chunks() : tree.boxes(best.level - 1);
      for (std::int64_t child = best.index * tree.fanout(); child < std::min(children, (best.index + 1) * tree.fanout()); ++child)
        push(best.level - 1, child);
    }
    return kept.count();
  }
};

}  // namespace longheads
