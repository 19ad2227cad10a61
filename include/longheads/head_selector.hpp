// SPDX-License-Identifier: MIT
// Head-wise selector: which chunks one query head reads for one query.
//
// Paper (sink_local_topk_selector), query in chunk i, budget k:
//   i + 1 <= k  ->  every chunk 0..i (the context fits the budget: exact causal attention)
//   otherwise   ->  sink chunks 0..S-1, local chunks i-L+1..i, and the k-S-L chunks of
//                   S..i-L with the highest score (ties: lower chunk id), all sorted ascending.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>

#include "config.hpp"

namespace longheads {

/// What a selector knows about one query: its chunk and the budget's split.
struct selection_request {
  std::int64_t query_chunk = 0;  ///< i = p / w
  int budget_chunks = 0;         ///< k
  int sink_chunks = 0;           ///< S
  int local_chunks = 0;          ///< L, the current chunk included
};

/// Writes the selected chunk ids, ascending, the current chunk last, into `selected`
/// (budget_chunks entries available) and returns how many. `scores[c]` is valid for every
/// chunk c < query_chunk, except the previous chunk when the layer spreads its encoding over
/// the next chunk's tokens (attention_config::spread_encoding, only with local_chunks >= 2,
/// which always selects it): its summary is not ready yet. `scratch` has query_chunk entries.
template <class S>
concept head_selector = requires(const S& s, const selection_request& request, std::span<const float> scores,
                                 std::span<std::int32_t> selected, std::span<std::int32_t> scratch) {
  { s.select(request, scores, selected, scratch) } noexcept -> std::convertible_to<std::size_t>;
};

namespace detail {
/// Fills 0..i when the context fits the budget; returns 0 when it does not.
inline std::size_t select_all_if_fits(const selection_request& r, std::span<std::int32_t> selected) noexcept {
  if (r.query_chunk + 1 > r.budget_chunks) return 0;
  std::iota(selected.begin(), selected.begin() + r.query_chunk + 1, 0);
  return static_cast<std::size_t>(r.query_chunk + 1);
}
/// Appends the forced local chunks i-L+1..i after `count` entries.
inline std::size_t append_locals(const selection_request& r, std::span<std::int32_t> selected, std::size_t count) noexcept {
  for (std::int64_t c = r.query_chunk - r.local_chunks + 1; c <= r.query_chunk; ++c)
    selected[count++] = static_cast<std::int32_t>(c);
  return count;
}
}  // namespace detail

/// The paper's selector, with its generalised knobs (sinks, locals) taken from the request.
struct sink_local_topk_selector {
  /// Writes the selected chunk ids, ascending, and returns how many.
  std::size_t select(const selection_request& r, std::span<const float> scores, std::span<std::int32_t> selected,
                     std::span<std::int32_t> scratch) const noexcept {
    if (const std::size_t all = detail::select_all_if_fits(r, selected)) return all;
    std::size_t count = 0;
    for (int c = 0; c < r.sink_chunks; ++c) selected[count++] = c;
    const auto first = static_cast<std::int32_t>(r.sink_chunks);
    const auto end = static_cast<std::int32_t>(r.query_chunk - r.local_chunks + 1);  // candidates [first, end)
    const std::ptrdiff_t wanted = r.budget_chunks - r.sink_chunks - r.local_chunks;
    const std::ptrdiff_t candidates = end - first;
    LONGHEADS_ASSERT(candidates >= wanted, "the budget check guarantees enough candidates");
    if (wanted > 0) {
      // NaN would break the strict weak order the ranking needs: rank it lowest.
      auto key = [&](std::int32_t c) {
        const float s = scores[static_cast<std::size_t>(c)];
        return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
      };
      // A strict total order (ties to the lower chunk), so the top `wanted` are one set
      // whichever way they are found.
      auto better = [&](std::int32_t a, std::int32_t b) {
        const float ka = key(a), kb = key(b);
        return ka > kb || (ka == kb && a < b);
      };
      auto ids = scratch.first(static_cast<std::size_t>(candidates));
      if (wanted < candidates && wanted <= 32) {
        // Small budgets: one pass keeping the best so far, best first. Candidates come in
        // ascending id, so a tie with the worst kept never enters, and past the first few most
        // candidates cost one comparison (nth_element's partitioning took 14% of a 32k prefill).
        std::ptrdiff_t kept = 0;
        for (std::int32_t c = first; c < end; ++c) {
          if (kept == wanted) {
            if (!(key(c) > key(ids[static_cast<std::size_t>(kept - 1)]))) continue;
            --kept;
          }
          std::ptrdiff_t at = kept++;
          for (; at > 0 && better(c, ids[static_cast<std::size_t>(at - 1)]); --at) ids[static_cast<std::size_t>(at)] = ids[static_cast<std::size_t>(at - 1)];
          ids[static_cast<std::size_t>(at)] = c;
        }
      } else {
        std::iota(ids.begin(), ids.end(), first);
        if (wanted < candidates) std::nth_element(ids.begin(), ids.begin() + wanted, ids.end(), better);
      }
      std::sort(ids.begin(), ids.begin() + wanted);
      std::copy(ids.begin(), ids.begin() + wanted, selected.begin() + static_cast<std::ptrdiff_t>(count));
      count += static_cast<std::size_t>(wanted);
    }
    return detail::append_locals(r, selected, count);
  }
};

/// Alternative that ignores scores: sinks plus the most recent chunks (a chunk-granular
/// sliding window, LM-Infinite style). The ablation that shows what scoring buys.
struct recent_chunks_selector {
  /// Writes the selected chunk ids, ascending, and returns how many.
  std::size_t select(const selection_request& r, std::span<const float>, std::span<std::int32_t> selected,
                     std::span<std::int32_t>) const noexcept {
    if (const std::size_t all = detail::select_all_if_fits(r, selected)) return all;
    std::size_t count = 0;
    for (int c = 0; c < r.sink_chunks; ++c) selected[count++] = c;
    const std::int64_t recent = r.budget_chunks - r.sink_chunks;
    for (std::int64_t c = r.query_chunk - recent + 1; c <= r.query_chunk; ++c) selected[count++] = static_cast<std::int32_t>(c);
    return count;
  }
};

static_assert(head_selector<sink_local_topk_selector> && head_selector<recent_chunks_selector>);

}  // namespace longheads
