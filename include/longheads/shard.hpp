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
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "attention_kernel.hpp"

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

}  // namespace longheads
