// SPDX-License-Identifier: MIT
// Selection: scores a block of queries against the full chunks, then picks each query's chunks.
//
// Per work item: the scorer fills one score per (head, query, chunk) for the chunks that were
// full before the block's last query (a kv group combines its heads' scores first when it
// selects together); per query, the head selector picks the chunks and the RoPE remapper gives
// them slots. The scores of query p only read chunks full before p's chunk, so p's choice is
// the same whichever block or call it comes in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "attention_config.hpp"
#include "index_policies.hpp"
#include "detail/grow.hpp"
#include "chunk_scorer.hpp"
#include "group_selection.hpp"
#include "head_selector.hpp"
#include "kv_cache.hpp"
#include "planner.hpp"
#include "rope.hpp"
#include "rope_remapper.hpp"
#include "views.hpp"
#include "work_items.hpp"

namespace longheads {

/// A lane's scratch for selection; each buffer sizes itself for a context and a block.
struct selection_scratch {
  detail::scratch_vector<float> scores;        ///< [heads of the item (or its groups), block, chunks]
  detail::scratch_vector<float> group_scores;  ///< [group_size, block, chunks] (shared group selection)
  detail::scratch_vector<float> scorer;        ///< the scorer's own
  std::vector<std::int32_t> selected;     ///< [segments]: a query's chosen chunks (baselines: chunks read)
  std::vector<std::int32_t> candidates;   ///< [chunks]: the selector's own
  std::vector<std::int64_t> slot_starts;  ///< [segments]
  bound_search_scratch search;            ///< the index's frontier (bound_tree_index)
  detail::scratch_vector<float> rotated_query;  ///< [d]: a query rotated for the index

  /// Room for contexts of `chunks` chunks, blocks of `block` queries, items of up to
  /// `item_heads` heads, `segments` chunks per query and `scorer_floats` of the scorer's scratch.
  /// `flat_chunks`: the most chunks a flat scan scores (an index's flat_scan_chunks; default: all);
  /// `index_marks`: the marks the index's search keeps (workspace_needs::index_marks).
  void reserve(const attention_config& config, bool selects, bool shared, std::size_t chunks, std::size_t block, std::size_t item_heads,
               std::size_t segments, std::size_t scorer_floats, int index_fanout = 0, int index_beam = 0, bool index_frontier = false,
               std::size_t flat_chunks = static_cast<std::size_t>(-1), std::size_t index_marks = 0) {
    if (selects && (index_fanout > 0 || index_frontier)) {
      // A beam's levels are bounded whatever the context; a best-first frontier grows with it.
      if (index_beam > 0) search.reserve_beam(index_beam, index_fanout);
      if (index_beam == 0 || index_frontier) search.reserve(static_cast<std::int64_t>(chunks), std::max(2, index_fanout));
      search.reserve_kept(segments);
      search.reserve_marks(index_marks);
      detail::grow(rotated_query, static_cast<std::size_t>(config.head_dim));
    }
    chunks = std::min(chunks, flat_chunks);
    if (selects && chunks > 0) {
      detail::grow(scores, std::max(static_cast<std::size_t>(config.group_size()) * block, item_heads) * chunks);
      detail::grow(scorer, scorer_floats);
      detail::grow(candidates, chunks);
      if (shared) detail::grow(group_scores, static_cast<std::size_t>(config.group_size()) * block * chunks);
    }
    detail::grow(selected, segments);
    detail::grow(slot_starts, segments);
  }

};

/// Chunks the queries [first, last] score: none while the last one's context fits the budget
/// (it reads every chunk), else every chunk full before the last one's chunk, but for the last
/// full chunk while its encoding is spread (no query of the call ranks it: it is read as local).
inline std::int64_t chunks_to_score(const attention_config& config, const kv_cache& cache, std::int64_t last_position) noexcept {
  const std::int64_t last_chunk = last_position / config.chunk_size;
  return last_chunk + 1 > config.budget_chunks ? std::min(last_chunk, cache.summarised_chunks()) : 0;
}

/// Whether the queries up to `last_position` choose by a flat scan of every chunk's score:
/// always without an index, and for an index with flat_below() (bound_tree_beam) while the
/// last query has at most that many candidate chunks (its search would return the same chunks).
template <class Index>
bool scans_flat(const Index& index, const attention_config& config, std::int64_t last_position) noexcept {
  if constexpr (!Index::indexed) {
    return true;
  } else if constexpr (requires { index.flat_below(); }) {
    return last_position / config.chunk_size - config.local_chunks + 1 - config.sink_chunks <= index.flat_below();
  } else {
    return false;
  }
}
/// Chunks a flat scan by `index`'s rule scores at most (SIZE_MAX: any number).
template <class Index>
std::size_t flat_scan_chunks(const Index& index, const attention_config& config) noexcept {
  if constexpr (!Index::indexed) return static_cast<std::size_t>(-1);
  else if constexpr (requires { index.flat_below(); })
    return static_cast<std::size_t>(index.flat_below() + config.local_chunks + config.sink_chunks);
  else return 0;
}

/// Scores the item's queries (positions first + item.t0 onwards) against chunks [0, chunks):
/// head i of the item, row r at s.scores[(i * count + r) * chunks]; with shared selection,
/// group j's combined scores at s.scores[(j * count + r) * chunks].
template <chunk_scorer Scorer, group_selection Group>
void score_block(const Scorer& scorer, const Group& group_selection, const attention_config& config, const rope& rotary,
                 const kv_cache& cache, tensor_view<const float> q, std::int64_t first, const work_item& item, std::int64_t chunks,
                 selection_scratch& s) noexcept {
  const heads_of_item& heads = item.heads;
  const std::ptrdiff_t stride = item.count * chunks;
  for (int g = heads.group_begin; g < heads.group_end; ++g) {
    float* target = Group::shared ? s.group_scores.data() : s.scores.data() + (g - heads.group_begin) * heads.per_group() * stride;
    for (int i = 0; i < heads.per_group(); ++i) {
      const int h = g * config.group_size() + heads.first_in_group + i;
      const scoring_inputs in{q.head(h).slice_rows(item.t0, item.count), first + item.t0, cache.representations(h).first_rows(chunks),
                              &rotary, config.chunk_size};
      scorer.score(in, {target + i * stride, item.count, chunks}, s.scorer);
    }
    if constexpr (Group::shared)
      for (std::ptrdiff_t e = 0; e < stride; ++e)
        s.scores[static_cast<std::size_t>((g - heads.group_begin) * stride + e)] =
            group_selection.combine(s.group_scores.data() + e, stride, heads.per_group());
  }
}

/// LongHeads' choice for query position p from its scores of the full chunks before its own
/// (scores.size() of them; none while the context fits the budget), in s.selected and
/// s.slot_starts until the next call.
template <head_selector Selector, rope_remapper Remapper>
chunk_choice choose_chunks(const Selector& selector, const Remapper& remapper, const attention_config& config, std::int64_t p,
                           std::span<const float> scores, selection_scratch& s) noexcept {
  const int w = config.chunk_size;
  const selection_request request{p / w, config.budget_chunks, config.sink_chunks, config.local_chunks};
  const std::size_t count = selector.select(request, scores, s.selected, s.candidates);
  const std::span<const std::int32_t> chunks(s.selected.data(), count);
  const std::int64_t query_position = remapper.remap(chunks, p, w, s.slot_starts);
  return {chunks, std::span<const std::int64_t>(s.slot_starts.data(), count), query_position};
}

/// LongHeads' choice for query position p of query head h (pre-RoPE query `query`): from its
/// scores of the full chunks before its own (flat_scan, or `flat` per scans_flat), or by
/// searching the cache's index (bound_tree_index: the same chunks; bound_tree_beam: the chunks
/// its beam reaches; chunk_index.hpp).
template <class PolicyValues>
chunk_choice choose_for_query(const PolicyValues& policies, const attention_config& config, const rope& rotary, const kv_cache& cache,
                              const float* query, int h, std::int64_t p, std::span<const float> scores, bool flat,
                              selection_scratch& s) noexcept {
  if constexpr (!std::remove_cvref_t<decltype(policies.index)>::indexed) {
    return choose_chunks(policies.selector, policies.remapper, config, p, scores, s);
  } else {
    if (flat) return choose_chunks(policies.selector, policies.remapper, config, p, scores, s);
    const int w = config.chunk_size;
    const std::int64_t i = p / w;
    std::size_t count = detail::select_all_if_fits({i, config.budget_chunks, config.sink_chunks, config.local_chunks}, s.selected);
    if (count == 0) {
      // As bound_scorer rotates it; the candidates as sink_local_topk_selector takes them.
      rotary.rotate(query, s.rotated_query.data(), p % w + std::int64_t{policies.scorer.offset_chunks} * w);
      for (int c = 0; c < config.sink_chunks; ++c) s.selected[count++] = c;
      const auto wanted = static_cast<std::size_t>(config.budget_chunks - config.sink_chunks - config.local_chunks);
      const std::span<std::int32_t> found = std::span<std::int32_t>(s.selected).subspan(count, wanted);
      const std::size_t n = policies.index.search(cache.index(h), cache.representations(h), s.rotated_query.data(), config.sink_chunks,
                                                  i - config.local_chunks + 1, wanted, found, s.search);
      std::sort(found.begin(), found.begin() + static_cast<std::ptrdiff_t>(n));
      count = detail::append_locals({i, config.budget_chunks, config.sink_chunks, config.local_chunks}, s.selected, count + n);
    }
    const std::span<const std::int32_t> chunks(s.selected.data(), count);
    const std::int64_t query_position = policies.remapper.remap(chunks, p, w, s.slot_starts);
    return {chunks, std::span<const std::int64_t>(s.slot_starts.data(), count), query_position};
  }
}

/// Query t's chunks into the caller's selections ([T, H_q, k], -1 padded; if given) and, for
/// the call's last query (of `tokens`), into the cache's last selection of head h.
inline void record_selection(const attention_config& config, kv_cache& cache, std::span<std::int32_t> selections, std::int64_t t,
                             std::int64_t tokens, int h, std::span<const std::int32_t> chunks) noexcept {
  if (!selections.empty()) {
    std::int32_t* row = selections.data() + (t * config.n_q_heads + h) * config.budget_chunks;
    std::fill(std::copy(chunks.begin(), chunks.end(), row), row + config.budget_chunks, -1);
  }
  if (t == tokens - 1) cache.record_selection(h, chunks);
}

}  // namespace longheads
