// SPDX-License-Identifier: MIT
// Shards: the pieces that let one sequence's chunks live in several caches, possibly in several
// processes, with no transport inside the library (issue 23). A query head's step splits in two:
//  1. every shard ranks the candidate chunks it holds (shard_candidates) and sends its best few;
//     the merge of those lists (merge_candidates) is exactly the single-process choice, because
//     the selector's order is a strict total order (the best n of a union are the best n of the
//     per-part bests);
//  2. every shard streams its chosen chunks through the kernel (begin, consume; no finish) and
//     sends the partial softmax state with its unnormalised output row; merge_partial folds them
//     in log-sum-exp form, and the kernel's finish normalises the result.
// What a shard sends per query head is `wanted` candidates and one state of head_dim + 2 floats,
// whatever the context length.
//
// The block functions at the end run those halves for a block of queries and all heads, in the
// layouts a transport sends as they are: offer_candidates (every shard), choose_from_offers
// (one place, from every shard's offer), attend_chosen (every shard), merge_attended (one place).
// The two per-shard ones run on the layer's executor in work items of heads (or kv groups),
// each computed whole by one lane, so a multi-core shard uses its cores and its results have
// the same bits on any thread count.
// A shard's own index search (bound_tree_index) gives the flat scan's candidates exactly, so
// the choice is the single-process one. bound_tree_beam's search over each shard's own tree is
// not the search over one tree: its choice changes with the number of shards (docs/sharding.md
// measures by how much). offer_from_store instead searches a chunk_index_store fed every
// shard's new chunk representations: the single-process index, so the single-process choice,
// for every index policy on any number of shards.
//
// A shard is an ordinary cache fed a chunk-aligned, contiguous range of the sequence's tokens
// (cache_shard): keys are stored rotated at their offsets in their chunk and summaries are
// computed from their chunk alone, so a chunk's bits do not depend on where it lives. Contiguous
// ranges rather than chunk c on shard c mod P: a shard is then a cache like any other (its
// chunk j is global chunk first + j), the sinks live on the first shard and new tokens go to
// the last. Shards encode each chunk at completion (spread_encoding off): a spread encoding
// would finish a shard's last chunk over the next shard's tokens.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.hpp"
#include "attention_config.hpp"
#include "attention_kernel.hpp"
#include "index_policies.hpp"
#include "chunk_index_store.hpp"
#include "chunk_scorer.hpp"
#include "detail/grow.hpp"
#include "config.hpp"
#include "errors.hpp"
#include "executor.hpp"
#include "kv_cache.hpp"
#include "planner.hpp"
#include "rope.hpp"
#include "tile_streamer.hpp"
#include "views.hpp"
#include "work_items.hpp"

namespace longheads {

/// A chunk a shard offers for one query head: its score and its global chunk id.
struct chunk_candidate {
  float score = 0.0f;      ///< the scorer's score (NaN ranks lowest)
  std::int32_t chunk = 0;  ///< global chunk id
};

/// sink_local_topk_selector's order: the higher score first, NaN lowest, equal scores to the
/// lower chunk id. A strict total order, so the best n of any set are one set however found.
constexpr bool ranks_before(const chunk_candidate& a, const chunk_candidate& b) noexcept {
  const float ka = a.score != a.score ? -std::numeric_limits<float>::infinity() : a.score;
  const float kb = b.score != b.score ? -std::numeric_limits<float>::infinity() : b.score;
  return ka > kb || (ka == kb && a.chunk < b.chunk);
}

/// A shard's best `wanted` chunks of the global candidate range [begin, end) (the selector's
/// scored chunks: sink_chunks .. query chunk - local_chunks), among the chunks it holds,
/// [first, first + scores.size()) with scores[c - first]. Written best first into `out`
/// (`wanted` entries of room); returns how many (fewer when the shard holds fewer candidates).
inline std::size_t shard_candidates(std::span<const float> scores, std::int32_t first, std::int32_t begin, std::int32_t end,
                                    std::size_t wanted, std::span<chunk_candidate> out) noexcept {
  const std::int64_t lo = std::max<std::int64_t>(begin, first);
  const std::int64_t hi = std::min<std::int64_t>(end, first + static_cast<std::int64_t>(scores.size()));
  std::size_t kept = 0;
  for (std::int64_t c = lo; c < hi && wanted > 0; ++c) {
    const chunk_candidate candidate{scores[static_cast<std::size_t>(c - first)], static_cast<std::int32_t>(c)};
    if (kept == wanted) {
      if (!ranks_before(candidate, out[kept - 1])) continue;
      --kept;
    }
    std::size_t at = kept++;
    for (; at > 0 && ranks_before(candidate, out[at - 1]); --at) out[at] = out[at - 1];
    out[at] = candidate;
  }
  return kept;
}

/// The global choice from the shards' candidate lists (concatenated, any order; reordered
/// here): the best `wanted` by ranks_before, as chunk ids ascending in `chosen`; returns how
/// many. When every shard sent its shard_candidates for the same range and `wanted`, these are
/// exactly the chunks sink_local_topk_selector scores its way to over all the shards' scores.
inline std::size_t merge_candidates(std::span<chunk_candidate> all, std::size_t wanted, std::span<std::int32_t> chosen) noexcept {
  const std::size_t n = std::min(wanted, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(), ranks_before);
  for (std::size_t i = 0; i < n; ++i) chosen[i] = all[i].chunk;
  std::sort(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(n));
  return n;
}

/// Folds another shard's partial attention (its state and unnormalised output row, as a
/// kernel leaves them before finish) into (state, out): the result is the state of having
/// consumed both shards' segments, up to rounding. In log-sum-exp form: both sides rescaled to
/// the larger running max, so nothing overflows. A side that consumed nothing (denominator 0)
/// changes nothing; merging in a fixed order (by shard) gives the same bits every time.
inline void merge_partial(softmax_state& state, float* out, const softmax_state& other, const float* other_out, int head_dim) noexcept {
  if (!(other.denominator > 0.0f)) return;
  if (!(state.denominator > 0.0f)) {
    state = other;
    std::copy(other_out, other_out + head_dim, out);
    return;
  }
  const float running_max = std::max(state.running_max, other.running_max);
  const float mine = std::exp(state.running_max - running_max), theirs = std::exp(other.running_max - running_max);
  state.denominator = std::fma(other.denominator, theirs, state.denominator * mine);
  for (int i = 0; i < head_dim; ++i) out[i] = std::fma(other_out[i], theirs, out[i] * mine);
  state.running_max = running_max;
}

/// A cache holding a chunk-aligned range of one sequence: fed the tokens from chunk
/// `first_chunk` on, so its chunk j is the sequence's chunk first_chunk + j (make_shard).
struct cache_shard {
  const kv_cache* cache = nullptr;  ///< the shard's cache (spread_encoding off)
  std::int32_t first_chunk = 0;     ///< the global id of its chunk 0

  /// Whether it holds (any token of) global chunk c.
  bool holds(std::int64_t c) const noexcept {
    const std::int64_t w = cache->shape().chunk_size;
    return c >= first_chunk && c < first_chunk + (cache->tokens() + w - 1) / w;
  }
};

/// A shard over `cache`, whose chunk 0 is the sequence's chunk `first_chunk`.
/// @throws config_error if the cache spreads its encoding (its last chunk's summary would wait
///         for the next shard's tokens) or first_chunk is negative.
inline cache_shard make_shard(const kv_cache& cache, std::int32_t first_chunk) {
  if (cache.shape().spreads_encoding())
    detail::fail<config_error>("a shard's cache must encode chunks at completion (spread_encoding = false): a spread encoding finishes a chunk over the next chunk's tokens, which another shard holds");
  if (first_chunk < 0) detail::fail<config_error>("a shard's first chunk must be >= 0, got " + std::to_string(first_chunk));
  return {&cache, first_chunk};
}

/// Floats of room score_shard needs for a shard of up to `chunks` summarised chunks.
template <chunk_scorer Scorer>
std::size_t score_shard_floats(const Scorer& scorer, const attention_config& config, std::int64_t chunks) noexcept {
  return static_cast<std::size_t>(chunks) + scorer.scratch_floats(config, 1);
}

/// Step 1 on one shard for query head h at global position p (`query`: its pre-RoPE row): the
/// scorer's scores of the shard's summarised chunks, and the best `wanted` of those in the
/// selector's candidate range (shard_candidates) into `out`; returns how many. Only for a query
/// whose context exceeds the budget (else it reads every chunk and nothing is scored).
template <chunk_scorer Scorer>
std::size_t score_shard(const Scorer& scorer, const attention_config& config, const rope& rotary, const cache_shard& shard,
                        const float* query, int h, std::int64_t p, std::span<float> room, std::span<chunk_candidate> out) noexcept {
  LONGHEADS_ASSERT(!shard.cache->shape().spreads_encoding(), "make_shard refuses caches that spread their encoding");
  const std::int64_t i = p / config.chunk_size;
  const std::int64_t n = shard.cache->summarised_chunks();
  const std::span<float> scores = room.first(static_cast<std::size_t>(n));
  const scoring_inputs in{matrix_view<const float>(query, 1, config.head_dim), p, shard.cache->representations(h).first_rows(n), &rotary,
                          config.chunk_size};
  scorer.score(in, matrix_view<float>(scores.data(), 1, n), room.subspan(static_cast<std::size_t>(n)));
  const auto wanted = static_cast<std::size_t>(config.budget_chunks - config.sink_chunks - config.local_chunks);
  return shard_candidates(scores, shard.first_chunk, config.sink_chunks, static_cast<std::int32_t>(i - config.local_chunks + 1), wanted, out);
}

/// Floats of room attend_shard needs (the rotated query and the kernel's scratch).
template <attention_kernel Kernel>
std::size_t attend_shard_floats(const Kernel& kernel, const attention_config& config) noexcept {
  return static_cast<std::size_t>(config.head_dim) + kernel.scratch_floats(config.chunk_size, config.head_dim);
}

/// Step 2 on one shard for query head h at global position p: streams the chunks of the global
/// choice (chunk_choice: ids ascending, their slots, the query's remapped position) that the
/// shard holds through the kernel, in order, with the query rotated for each as the planner
/// rotates it, and leaves the partial state and unnormalised row in (state, out) for
/// merge_partial (then the kernel's finish). fp32 caches, or compact ones the kernel reads in
/// place.
template <attention_kernel Kernel>
void attend_shard(const Kernel& kernel, const attention_config& config, const rope& rotary, const cache_shard& shard,
                  const float* query, int h, std::int64_t p, const chunk_choice& choice, softmax_state& state, float* out,
                  std::span<float> room) noexcept {
  const int d = config.head_dim, w = config.chunk_size, g = h / config.group_size();
  const std::int64_t i = p / w;
  float* rotated = room.data();
  const std::span<float> scratch = room.subspan(static_cast<std::size_t>(d));
  kernel.begin(state, out, d);
  for (std::size_t slot = 0; slot < choice.chunks.size(); ++slot) {
    const std::int32_t chunk = choice.chunks[slot];
    if (!shard.holds(chunk)) continue;
    const auto length = static_cast<std::int32_t>(chunk == i ? p % w + 1 : w);
    rotary.rotate(query, rotated, choice.query_position - choice.slot_starts[slot]);
    const float* queries[1] = {rotated};
    softmax_state* states[1] = {&state};
    float* outs[1] = {out};
    const std::size_t at = shard.cache->kv_offset(chunk - shard.first_chunk, g);
    auto consume = [&](auto rows_type) {
      using Rows = decltype(rows_type);
      consume_shared(kernel, shard.cache->keys_at<Rows>(at), shard.cache->values_at<Rows>(at), length, queries, 1, d, config.scale(), states,
                     outs, scratch);
    };
    if constexpr (bf16_reading_kernel<Kernel>)
      if (config.kv_storage == kv_precision::bf16) {
        consume(static_cast<const bf16*>(nullptr));
        continue;
      }
    if constexpr (int8_reading_kernel<Kernel>)
      if (config.kv_storage == kv_precision::int8) {
        consume(int8_rows{});
        continue;
      }
    consume(static_cast<const float*>(nullptr));
  }
}

/// Candidates a shard offers per query head: the selector's scored picks, budget - sinks - locals.
inline std::size_t offered_per_head(const attention_config& config) noexcept {
  return static_cast<std::size_t>(std::max(0, config.budget_chunks - config.sink_chunks - config.local_chunks));
}

/// One lane's working memory for the block functions (a lane runs one head, or one group of
/// heads, at a time).
struct shard_lane_scratch {
  std::vector<float> scores;        ///< [T, chunks]: one head's (or group's) scores of the block
  std::vector<float> group_scores;  ///< [group_size, T, chunks] (shared group selection)
  std::vector<float> scorer;        ///< the scorer's own
  std::vector<float> rotated;       ///< [d]: a query rotated for the index
  std::vector<std::int32_t> found;  ///< [offered_per_head]: an index search's chunks
  std::vector<std::int64_t> slot_starts;  ///< [budget]: a choice's slots
  tile_scratch tile;                ///< attend_chosen's queries, plans and kernel room
  bound_search_scratch search;      ///< the index's frontier
};

/// One shard's working memory for the block functions: a lane's for each of the layer's
/// executor lanes. Sized by reserve (or on first use).
struct shard_scratch {
  std::vector<shard_lane_scratch> lanes;  ///< one per executor lane

  /// Room for offer_from_store's searches over up to `chunks` chunks (no block scores): the
  /// lanes, their rotated query, found chunks and the search's frontier. offer_from_store calls
  /// it with the store's size (an exact search's frontier grows with it: reserving the
  /// sequence's length ahead keeps the steps free of allocation).
  template <class Policies>
  void reserve_search(const attention<Policies>& layer, std::int64_t chunks) {
    const auto& policies = layer.policies();
    const std::size_t lane_count = std::max<std::size_t>(1, policies.executor.lanes());
    if (lanes.size() < lane_count) lanes.resize(lane_count);
    for (shard_lane_scratch& lane : lanes) {
      detail::grow(lane.rotated, static_cast<std::size_t>(layer.config().head_dim));
      detail::grow(lane.found, offered_per_head(layer.config()));
      reserve_search_scratch(policies.index, lane.search, chunks, offered_per_head(layer.config()));
    }
  }

  /// Room for blocks of `block` queries over shards of up to `chunks` chunks, so the block
  /// functions never allocate. They call it themselves with their own sizes (it only grows,
  /// and allocates only when something is too small): reserving ahead only moves the
  /// allocations out of the steps.
  template <class Policies>
  void reserve(const attention<Policies>& layer, std::int64_t chunks, std::int64_t block) {
    const attention_config& config = layer.config();
    const auto& policies = layer.policies();
    const auto n = static_cast<std::size_t>(std::max<std::int64_t>(chunks, 1)), t = static_cast<std::size_t>(std::max<std::int64_t>(block, 1));
    const std::size_t lane_count = std::max<std::size_t>(1, policies.executor.lanes());
    if (lanes.size() < lane_count) lanes.resize(lane_count);
    for (shard_lane_scratch& lane : lanes) {
      detail::grow(lane.scores, t * n);
      if constexpr (std::remove_cvref_t<decltype(policies.group_selection)>::shared)
        detail::grow(lane.group_scores, static_cast<std::size_t>(config.group_size()) * t * n);
      detail::grow(lane.scorer, policies.scorer.scratch_floats(config, static_cast<std::ptrdiff_t>(t)));
      detail::grow(lane.rotated, static_cast<std::size_t>(config.head_dim));
      detail::grow(lane.found, offered_per_head(config));
      lane.tile.reserve(config, work_partition::tile_queries(config), static_cast<std::size_t>(config.budget_chunks),
                        policies.kernel.scratch_floats(config.chunk_size, config.head_dim));
      detail::grow(lane.slot_starts, static_cast<std::size_t>(config.budget_chunks));
      using index_type = std::remove_cvref_t<decltype(policies.index)>;
      if constexpr (index_type::indexed) {
        reserve_search_scratch(policies.index, lane.search, chunks, offered_per_head(config));
      }
    }
  }
};

namespace detail {
template <class Policies>
void check_shard_block(const char* call, const attention<Policies>& layer, const cache_shard& shard, tensor_view<const float> q) {
  const attention_config& config = layer.config();
  if (shard.cache == nullptr) fail<shape_error>(std::string(call) + ": the shard has no cache");
  if (layer.config().method != attention_method::longheads)
    fail<config_error>(std::string(call) + ": shards select chunks: the layer's method must be longheads");
  if (q.heads() != config.n_q_heads || q.head_dim() != config.head_dim)
    fail<shape_error>(std::string(call) + ": q must be [T, " + std::to_string(config.n_q_heads) + ", " + std::to_string(config.head_dim) +
                      "], got [" + std::to_string(q.tokens()) + ", " + std::to_string(q.heads()) + ", " + std::to_string(q.head_dim()) + "]");
  const cache_shape expected = layer.shape();
  const cache_shape& has = shard.cache->shape();
  if (has != expected)
    fail<shape_error>(std::string(call) + ": the shard's cache was not made by this layer (" + to_string(has) + " vs " + to_string(expected) + ")");
}
template <class Span>
void check_size(const char* call, const char* what, const Span& s, std::size_t n) {
  if (s.size() != n)
    fail<shape_error>(std::string(call) + ": " + what + " must hold " + std::to_string(n) + " entries, got " + std::to_string(s.size()));
}

/// Step 1 by the index policy's search: for each query t and head h, the best candidates of the
/// chunks `source` (a kv_cache or a chunk_index_store: index(h) and representations(h)) holds,
/// its chunk j being the sequence's chunk first_chunk + j, with their bound_dot scores. One work
/// item per head, run whole by one lane: the same bits on any number of threads.
template <class Policies, class Source>
void offer_by_search(const attention<Policies>& layer, const Source& source, std::int64_t first_chunk, tensor_view<const float> q,
                     std::int64_t first_position, std::span<chunk_candidate> offers, std::span<std::int32_t> counts, shard_scratch& scratch) {
  const attention_config& config = layer.config();
  const auto& policies = layer.policies();
  const int hq = config.n_q_heads, w = config.chunk_size;
  const std::size_t wanted = offered_per_head(config);
  const std::ptrdiff_t d = config.head_dim;
  auto search_head = [&](std::size_t item, std::size_t lane_number) {
    shard_lane_scratch& lane = scratch.lanes[lane_number];
    const int h = static_cast<int>(item);
    const auto summaries = source.representations(h);
    for (std::int64_t t = 0; t < q.tokens(); ++t) {
      const std::int64_t p = first_position + t;
      if (p / w + 1 <= config.budget_chunks) continue;
      // The selector's candidates [sink_chunks, p / w - local_chunks + 1), in the source's own
      // chunk ids; the query rotated as choose_for_query rotates it for the search.
      const std::int64_t begin = config.sink_chunks, end = p / w - config.local_chunks + 1;
      layer.rotary().rotate(q.at(t, h), lane.rotated.data(), p % w + std::int64_t{policies.scorer.offset_chunks} * w);
      const std::span<std::int32_t> found(lane.found.data(), wanted);
      const std::size_t got = policies.index.search(source.index(h), summaries, lane.rotated.data(), std::max<std::int64_t>(begin - first_chunk, 0),
                                                    end - first_chunk, wanted, found, lane.search);
      const std::span<chunk_candidate> out = offers.subspan(static_cast<std::size_t>(t * hq + h) * wanted, wanted);
      for (std::size_t j = 0; j < got; ++j) {
        const float* lo = summaries.row(found[j]);
        out[j] = {bound_dot(lane.rotated.data(), lo, lo + d, d), static_cast<std::int32_t>(found[j] + first_chunk)};
      }
      counts[static_cast<std::size_t>(t * hq + h)] = static_cast<std::int32_t>(got);
    }
  };
  policies.executor.parallel_for(static_cast<std::size_t>(hq), index_task(search_head));
}
}  // namespace detail

/// Step 1 for a block of T queries at positions first_position.. (q: pre-RoPE [T, H_q, d]) on
/// one shard: for each query t and head h, the shard's best candidates (score_shard's, or its
/// index's) into offers[(t H_q + h) offered_per_head ..], best first, their number in
/// counts[t H_q + h] (0 for a query whose context fits the budget: it reads every chunk).
/// With shared group selection every head of a group offers the group's combined candidates.
/// The shard's cache must already hold the block's own tokens that fall in its range.
/// @throws shape_error or config_error if the layer, shard, q or the spans do not agree.
template <class Policies>
void offer_candidates(const attention<Policies>& layer, const cache_shard& shard, tensor_view<const float> q, std::int64_t first_position,
                      std::span<chunk_candidate> offers, std::span<std::int32_t> counts, shard_scratch& scratch) {
  static constexpr const char* call = "offer_candidates";
  const attention_config& config = layer.config();
  const auto& policies = layer.policies();
  static_assert(std::same_as<std::remove_cvref_t<decltype(policies.selector)>, sink_local_topk_selector>,
                "shards merge the candidates of sink_local_topk_selector's order (ranks_before)");
  detail::check_shard_block(call, layer, shard, q);
  const std::int64_t T = q.tokens();
  const int hq = config.n_q_heads, w = config.chunk_size;
  const std::size_t wanted = offered_per_head(config);
  detail::check_size(call, "offers", offers, static_cast<std::size_t>(T * hq) * wanted);
  detail::check_size(call, "counts", counts, static_cast<std::size_t>(T * hq));
  std::fill(counts.begin(), counts.end(), 0);
  if (T == 0 || wanted == 0) return;
  const std::int64_t last = first_position + T - 1;
  if (last / w + 1 <= config.budget_chunks) return;  // every query of the block reads every chunk
  const std::int64_t n = shard.cache->summarised_chunks();
  scratch.reserve(layer, n, T);
  const std::int64_t candidate_end = last / w - config.local_chunks + 1;  // the last query's candidates end here
  const std::int64_t mine = std::min(candidate_end, shard.first_chunk + n) - std::max<std::int64_t>(config.sink_chunks, shard.first_chunk);
  if (mine <= 0) return;  // the shard holds none of the block's candidates

  using index_type = std::remove_cvref_t<decltype(policies.index)>;
  bool flat = true;
  if constexpr (index_type::indexed) {
    if constexpr (requires { policies.index.flat_below(); }) flat = mine <= policies.index.flat_below();
    else flat = false;
  }
  auto offer = [&](std::int64_t t, int h) { return offers.subspan(static_cast<std::size_t>(t * hq + h) * wanted, wanted); };
  auto candidates_of = [&](std::int64_t p) {  // the selector's candidate range of query p
    return std::pair<std::int32_t, std::int32_t>(config.sink_chunks, static_cast<std::int32_t>(p / w - config.local_chunks + 1));
  };

  // Work items are heads (groups of heads with shared selection), each run whole by one lane
  // with its own scratch: the offers have the same bits on any number of threads.
  if (!flat) {
    if constexpr (index_type::indexed) detail::offer_by_search(layer, *shard.cache, shard.first_chunk, q, first_position, offers, counts, scratch);
    return;
  }

  // The flat scan: the block's scores of the shard's summarised chunks, head by head (or group
  // by group), then each query's best among its candidates.
  auto offer_from_scores = [&](int h, const float* scores) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t p = first_position + t;
      if (p / w + 1 <= config.budget_chunks) continue;
      const auto [begin, end] = candidates_of(p);
      const std::span<const float> row(scores + t * n, static_cast<std::size_t>(n));
      counts[static_cast<std::size_t>(t * hq + h)] = static_cast<std::int32_t>(shard_candidates(row, shard.first_chunk, begin, end, wanted, offer(t, h)));
    }
  };
  auto score_head = [&](int h, float* target, shard_lane_scratch& lane) {
    const scoring_inputs in{q.head(h), first_position, shard.cache->representations(h).first_rows(n), &layer.rotary(), w};
    policies.scorer.score(in, matrix_view<float>(target, T, n), lane.scorer);
  };
  using group_type = std::remove_cvref_t<decltype(policies.group_selection)>;
  if constexpr (group_type::shared) {
    const int gs = config.group_size();
    const std::ptrdiff_t stride = T * n;
    auto offer_group = [&](std::size_t item, std::size_t lane_number) {
      shard_lane_scratch& lane = scratch.lanes[lane_number];
      const int g = static_cast<int>(item);
      for (int i = 0; i < gs; ++i) score_head(g * gs + i, lane.group_scores.data() + i * stride, lane);
      for (std::ptrdiff_t e = 0; e < stride; ++e) lane.scores[static_cast<std::size_t>(e)] = policies.group_selection.combine(lane.group_scores.data() + e, stride, gs);
      offer_from_scores(g * gs, lane.scores.data());
      for (int i = 1; i < gs; ++i)
        for (std::int64_t t = 0; t < T; ++t) {
          const auto from = static_cast<std::size_t>(t * hq + g * gs), to = static_cast<std::size_t>(t * hq + g * gs + i);
          counts[to] = counts[from];
          std::copy_n(offers.begin() + static_cast<std::ptrdiff_t>(from * wanted), wanted, offers.begin() + static_cast<std::ptrdiff_t>(to * wanted));
        }
    };
    policies.executor.parallel_for(static_cast<std::size_t>(config.n_kv_heads), index_task(offer_group));
  } else {
    auto offer_head = [&](std::size_t item, std::size_t lane_number) {
      shard_lane_scratch& lane = scratch.lanes[lane_number];
      const int h = static_cast<int>(item);
      score_head(h, lane.scores.data(), lane);
      offer_from_scores(h, lane.scores.data());
    };
    policies.executor.parallel_for(static_cast<std::size_t>(hq), index_task(offer_head));
  }
}

/// Step 1 for a block of T queries at positions first_position.. from the sequence's whole index
/// (chunk_index_store, fed every shard's chunks): for each query t and head h, the index
/// policy's candidates over all the sequence's chunks, as a single shard holding them all would
/// offer them. choose_from_offers on this one offer gives the single-process choice for every
/// index policy, the approximate bound_tree_beam included, on any number of shards (each
/// shard's own search would search a different tree). The store must hold the full chunks
/// before the block's last query (as a cache fed the block's tokens would).
/// @throws shape_error or config_error if the layer, the store, q or the spans do not agree.
template <class Policies>
void offer_from_store(const attention<Policies>& layer, const chunk_index_store& store, tensor_view<const float> q, std::int64_t first_position,
                      std::span<chunk_candidate> offers, std::span<std::int32_t> counts, shard_scratch& scratch) {
  static constexpr const char* call = "offer_from_store";
  const attention_config& config = layer.config();
  using index_type = std::remove_cvref_t<decltype(layer.policies().index)>;
  static_assert(index_type::indexed, "offer_from_store searches an index: the layer's index policy must keep one");
  if (layer.config().method != attention_method::longheads)
    detail::fail<config_error>(std::string(call) + ": the layer's method must be longheads");
  if (store.shape() != layer.shape())
    detail::fail<shape_error>(std::string(call) + ": the store was not made for this layer (" + to_string(store.shape()) + " vs " + to_string(layer.shape()) + ")");
  if (q.heads() != config.n_q_heads || q.head_dim() != config.head_dim)
    detail::fail<shape_error>(std::string(call) + ": q must be [T, " + std::to_string(config.n_q_heads) + ", " + std::to_string(config.head_dim) + "]");
  const std::int64_t T = q.tokens();
  const std::size_t wanted = offered_per_head(config);
  detail::check_size(call, "offers", offers, static_cast<std::size_t>(T * config.n_q_heads) * wanted);
  detail::check_size(call, "counts", counts, static_cast<std::size_t>(T * config.n_q_heads));
  std::fill(counts.begin(), counts.end(), 0);
  if (T == 0 || wanted == 0) return;
  const std::int64_t last = first_position + T - 1;
  if (last / config.chunk_size + 1 <= config.budget_chunks) return;  // every query of the block reads every chunk
  const std::int64_t needed = last / config.chunk_size - config.local_chunks + 1;
  if (store.chunks() < needed)
    detail::fail<shape_error>(std::string(call) + ": the store holds " + std::to_string(store.chunks()) + " chunks; the block's last query ranks " +
                              std::to_string(needed));
  scratch.reserve_search(layer, store.chunks());
  detail::offer_by_search(layer, store, 0, q, first_position, offers, counts, scratch);
}

/// The global choice of a block of T queries at positions first_position.. from the offers of
/// every shard (offers[s] and counts[s] as offer_candidates wrote them, shards in any order):
/// each query head's chunk ids ascending into chosen[(t H_q + h) budget ..], padded with -1 (the
/// layout of attention::prefill's selections). Exactly the single-process selection (with an
/// exact index or the flat scan): sinks, the best offers (merge_candidates), the local chunks;
/// every chunk 0..i while query p's context fits the budget.
/// @throws shape_error if the spans do not agree with the layer and T.
template <class Policies>
void choose_from_offers(const attention<Policies>& layer, std::int64_t first_position, std::int64_t T,
                        std::span<const std::span<const chunk_candidate>> offers, std::span<const std::span<const std::int32_t>> counts,
                        std::span<std::int32_t> chosen, std::vector<chunk_candidate>& pool) {
  static constexpr const char* call = "choose_from_offers";
  const attention_config& config = layer.config();
  const int hq = config.n_q_heads, w = config.chunk_size, k = config.budget_chunks;
  const std::size_t wanted = offered_per_head(config);
  if (offers.size() != counts.size()) detail::fail<shape_error>(std::string(call) + ": one counts span per offers span");
  for (std::size_t s = 0; s < offers.size(); ++s) {
    detail::check_size(call, "each shard's offers", offers[s], static_cast<std::size_t>(T * hq) * wanted);
    detail::check_size(call, "each shard's counts", counts[s], static_cast<std::size_t>(T * hq));
    for (std::int32_t c : counts[s])
      if (c < 0 || static_cast<std::size_t>(c) > wanted)
        detail::fail<shape_error>(std::string(call) + ": a count must be in [0, " + std::to_string(wanted) + "], got " + std::to_string(c));
  }
  detail::check_size(call, "chosen", chosen, static_cast<std::size_t>(T * hq * k));
  pool.reserve(offers.size() * wanted);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t p = first_position + t;
    const selection_request request{p / w, k, config.sink_chunks, config.local_chunks};
    for (int h = 0; h < hq; ++h) {
      const std::size_t at = static_cast<std::size_t>(t * hq + h);
      const std::span<std::int32_t> row = chosen.subspan(at * static_cast<std::size_t>(k), static_cast<std::size_t>(k));
      std::size_t count = detail::select_all_if_fits(request, row);
      if (count == 0) {
        for (int c = 0; c < config.sink_chunks; ++c) row[count++] = c;
        pool.clear();
        for (std::size_t s = 0; s < offers.size(); ++s) {
          const auto first = offers[s].begin() + static_cast<std::ptrdiff_t>(at * wanted);
          pool.insert(pool.end(), first, first + counts[s][at]);
        }
        count += merge_candidates(pool, wanted, row.subspan(count));
        count = detail::append_locals(request, row, count);
      }
      std::fill(row.begin() + static_cast<std::ptrdiff_t>(count), row.end(), -1);
    }
  }
}

/// Step 2 for a block on one shard: for each query t and head h, the chunks of its global
/// choice (chosen, as choose_from_offers wrote it) that the shard holds, streamed through the
/// kernel with the query rotated to the slots the remapper gives them (as attend_shard, but
/// each chunk read once for the heads of its kv group and the neighbouring queries that chose
/// it, and compact caches converted for kernels that cannot read them); the partial state into
/// states[t H_q + h] and the unnormalised row into out (a [T, H_q, d] view), for
/// merge_attended. The shard's cache must hold the block's own tokens in its range.
/// @throws shape_error if the layer, shard, q, chosen, states or out do not agree.
template <class Policies>
void attend_chosen(const attention<Policies>& layer, const cache_shard& shard, tensor_view<const float> q, std::int64_t first_position,
                   std::span<const std::int32_t> chosen, std::span<softmax_state> states, tensor_view<float> out, shard_scratch& scratch) {
  static constexpr const char* call = "attend_chosen";
  const attention_config& config = layer.config();
  const auto& policies = layer.policies();
  detail::check_shard_block(call, layer, shard, q);
  const std::int64_t T = q.tokens();
  const int hq = config.n_q_heads, k = config.budget_chunks;
  detail::check_size(call, "chosen", chosen, static_cast<std::size_t>(T * hq * k));
  detail::check_size(call, "states", states, static_cast<std::size_t>(T * hq));
  if (out.tokens() != T || out.heads() != hq || out.head_dim() != config.head_dim) detail::fail<shape_error>(std::string(call) + ": out must be shaped as q");
  scratch.reserve(layer, 0, 0);  // the slots and the tiles
  // Work items are (kv group, tile of queries), each run whole by one lane: the same bits on any
  // number of threads. A tile streams a chunk once for all its queries that chose it (the tile
  // streamer, as the attention's own steps), each query's chunks in its own order.
  const int gs = config.group_size(), w = config.chunk_size;
  const std::int64_t tile_rows = std::max<std::int64_t>(1, static_cast<std::int64_t>(work_partition::tile_queries(config)) / gs);
  const std::int64_t tiles = (T + tile_rows - 1) / tile_rows;
  auto attend_tile = [&](std::size_t item, std::size_t lane_number) {
    shard_lane_scratch& lane = scratch.lanes[lane_number];
    const int g = static_cast<int>(item % static_cast<std::size_t>(config.n_kv_heads));
    const std::int64_t t0 = static_cast<std::int64_t>(item / static_cast<std::size_t>(config.n_kv_heads)) * tile_rows;
    const std::int64_t t1 = std::min(T, t0 + tile_rows);
    const std::span<std::int64_t> slots(lane.slot_starts.data(), static_cast<std::size_t>(k));
    lane.tile.clear();
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t p = first_position + t;
      for (int h = g * gs; h < (g + 1) * gs; ++h) {
        const std::span<const std::int32_t> row = chosen.subspan(static_cast<std::size_t>((t * hq + h) * k), static_cast<std::size_t>(k));
        const auto count = static_cast<std::size_t>(std::find(row.begin(), row.end(), -1) - row.begin());
        const std::span<const std::int32_t> ids = row.first(count);
        const std::int64_t query_position = policies.remapper.remap(ids, p, w, slots);
        // longheads_planner's segments, for the chosen chunks this shard holds.
        planned_segment* plan = lane.tile.next_plan();
        std::size_t n = 0;
        for (std::size_t slot = 0; slot < count; ++slot) {
          const std::int32_t chunk = ids[slot];
          if (!shard.holds(chunk)) continue;
          const auto length = static_cast<std::int32_t>(chunk == p / w ? p % w + 1 : w);
          plan[n++] = {shard.cache->kv_offset(chunk - shard.first_chunk, g), length, chunk, query_position - slots[slot]};
        }
        lane.tile.add(q.at(t, h), out.at(t, h), n);
      }
    }
    lane.tile.stream_unfinished(policies.kernel, config, layer.rotary(), *shard.cache);
    std::size_t added = 0;
    for (std::int64_t t = t0; t < t1; ++t)
      for (int h = g * gs; h < (g + 1) * gs; ++h) states[static_cast<std::size_t>(t * hq + h)] = lane.tile.state(added++);
  };
  policies.executor.parallel_for(static_cast<std::size_t>(tiles) * static_cast<std::size_t>(config.n_kv_heads), index_task(attend_tile));
}

/// The layer's output of a block from every shard's partial result (states[s] and outs[s] as
/// attend_chosen wrote them), merged in the order given (keep it fixed, e.g. by shard, for the
/// same bits every run) and normalised by the kernel's finish into out [T, H_q, d].
/// @throws shape_error if the spans or views do not agree.
template <class Policies>
void merge_attended(const attention<Policies>& layer, std::span<const std::span<const softmax_state>> states,
                    std::span<const tensor_view<const float>> outs, tensor_view<float> out) {
  static constexpr const char* call = "merge_attended";
  const attention_config& config = layer.config();
  const int hq = config.n_q_heads, d = config.head_dim;
  const std::int64_t T = out.tokens();
  if (out.heads() != hq || out.head_dim() != d) detail::fail<shape_error>(std::string(call) + ": out must be [T, H_q, d] of the layer");
  if (states.size() != outs.size()) detail::fail<shape_error>(std::string(call) + ": one outs view per states span");
  for (std::size_t s = 0; s < states.size(); ++s) {
    detail::check_size(call, "each shard's states", states[s], static_cast<std::size_t>(T * hq));
    if (outs[s].tokens() != T || outs[s].heads() != hq || outs[s].head_dim() != d) detail::fail<shape_error>(std::string(call) + ": each shard's outs must be shaped as out");
  }
  for (std::int64_t t = 0; t < T; ++t)
    for (int h = 0; h < hq; ++h) {
      float* row = out.at(t, h);
      softmax_state merged;
      layer.policies().kernel.begin(merged, row, d);
      for (std::size_t s = 0; s < states.size(); ++s) merge_partial(merged, row, states[s][static_cast<std::size_t>(t * hq + h)], outs[s].at(t, h), d);
      layer.policies().kernel.finish(merged, row, d);
    }
}

}  // namespace longheads
