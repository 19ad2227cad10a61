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

#include "attention_config.hpp"
#include "attention_kernel.hpp"
#include "chunk_scorer.hpp"
#include "config.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"
#include "planner.hpp"
#include "rope.hpp"
#include "views.hpp"

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

}  // namespace longheads
