// SPDX-License-Identifier: MIT
// Planning: the segments of the cache one query reads and the rotation of its query for each.
//
// One planner per method, chosen once per call (attention dispatches on config.method), so the
// per-query loop holds no switch. A segment is some tokens of one chunk of one kv head, read in
// place; the query is rotated by `delta` for it (R(a)q . R(b)k = q . R(b-a)k, keys being stored
// rotated at their local offsets).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "attention_config.hpp"
#include "kv_cache.hpp"

namespace longheads {

/// Tokens [offset, offset + length) of one chunk of one kv head in the cache's storage.
struct planned_segment {
  std::size_t offset;   ///< of its first key (and value), in elements
  std::int32_t length;  ///< tokens
  std::int32_t chunk;   ///< the chunk it belongs to
  std::int64_t delta;   ///< rotation of the query for it
};

/// LongHeads' choice for one query (chunk_selection.hpp): the chunks, ascending and ending with
/// the query's own, where each starts, and where the query stands.
struct chunk_choice {
  std::span<const std::int32_t> chunks;       ///< chunk ids, ascending, the query's own last
  std::span<const std::int64_t> slot_starts;  ///< position of token 0 of each chunk
  std::int64_t query_position = 0;            ///< the query's remapped position
};

namespace detail {
inline std::int64_t chunks_of(const attention_config& c, std::int64_t tokens) noexcept { return (tokens + c.chunk_size - 1) / c.chunk_size; }
}  // namespace detail

/// LongHeads: the selected chunks side by side at their slots.
struct longheads_planner {
  static constexpr attention_method method = attention_method::longheads;  ///< the method it plans
  static constexpr bool selects = true;  ///< needs a chunk_choice per query
  /// Segments a query reads at most in a context of `context` tokens.
  static std::int64_t max_segments(const attention_config& c, std::int64_t context) noexcept {
    return std::max<std::int64_t>(1, std::min<std::int64_t>(c.budget_chunks, detail::chunks_of(c, context)));
  }
  /// Plans query position p of kv group g; returns how many segments.
  std::size_t plan(const attention_config& c, const kv_cache& cache, std::int64_t p, int g, const chunk_choice& choice,
                   planned_segment* out) const noexcept {
    const int w = c.chunk_size;
    const std::int64_t i = p / w;
    for (std::size_t slot = 0; slot < choice.chunks.size(); ++slot) {
      const std::int32_t chunk = choice.chunks[slot];
      const std::int64_t length = chunk == i ? p % w + 1 : std::int64_t{w};
      out[slot] = {cache.kv_offset(chunk, g), static_cast<std::int32_t>(length), chunk, choice.query_position - choice.slot_starts[slot]};
    }
    return choice.chunks.size();
  }
};

/// Dense causal attention: every chunk up to the query's, at true distances.
struct dense_planner {
  static constexpr attention_method method = attention_method::dense;  ///< the method it plans
  static constexpr bool selects = false;  ///< plans from the position alone
  /// Segments a query reads at most in a context of `context` tokens.
  static std::int64_t max_segments(const attention_config& c, std::int64_t context) noexcept {
    return std::max<std::int64_t>(detail::chunks_of(c, context), 1);
  }
  /// Plans query position p of kv group g; returns how many segments.
  std::size_t plan(const attention_config& c, const kv_cache& cache, std::int64_t p, int g, planned_segment* out) const noexcept {
    const int w = c.chunk_size;
    const std::int64_t i = p / w;
    std::size_t n = 0;
    for (std::int64_t chunk = 0; chunk <= i; ++chunk)
      out[n++] = {cache.kv_offset(chunk, g), static_cast<std::int32_t>(chunk == i ? p % w + 1 : w), static_cast<std::int32_t>(chunk), p - chunk * w};
    return n;
  }
};

/// StreamingLLM: sinks at positions 0..S-1, the recent tokens at S..L-1, the query at L-1;
/// dense while the context fits the budget.
struct sink_window_planner {
  static constexpr attention_method method = attention_method::sink_window;  ///< the method it plans
  static constexpr bool selects = false;  ///< plans from the position alone
  /// Segments a query reads at most in a context of `context` tokens.
  static std::int64_t max_segments(const attention_config& c, std::int64_t context) noexcept {
    const std::int64_t chunks = detail::chunks_of(c, context);
    return std::max<std::int64_t>(chunks <= c.budget_chunks ? chunks : c.budget_chunks + 2, 1);
  }
  /// Plans query position p of kv group g; returns how many segments.
  std::size_t plan(const attention_config& c, const kv_cache& cache, std::int64_t p, int g, planned_segment* out) const noexcept {
    const int w = c.chunk_size;
    const std::int64_t i = p / w, budget = c.budget_tokens();
    if (p < budget) return dense_planner{}.plan(c, cache, p, g, out);
    std::size_t n = 0;
    // Tokens [begin, end) of chunk `chunk`, the query rotated by `delta`.
    auto add = [&](std::int64_t chunk, std::int64_t begin, std::int64_t end, std::int64_t delta) {
      out[n++] = {cache.kv_offset(chunk, g) + static_cast<std::size_t>(begin * c.head_dim), static_cast<std::int32_t>(end - begin),
                  static_cast<std::int32_t>(chunk), delta};
    };
    const std::int64_t sinks = c.sink_tokens, recent_first = p - (budget - sinks) + 1;
    for (std::int64_t chunk = 0; chunk * w < sinks; ++chunk) add(chunk, 0, std::min<std::int64_t>(w, sinks - chunk * w), budget - 1 - chunk * w);
    for (std::int64_t chunk = recent_first / w; chunk <= i; ++chunk)
      add(chunk, chunk == recent_first / w ? recent_first % w : 0, chunk == i ? p % w + 1 : w, p - chunk * w);
    return n;
  }
};

/// The distinct chunks of a plan, in order, written into `ids`: what a baseline read.
inline std::span<const std::int32_t> distinct_chunks(std::span<const planned_segment> plan, std::span<std::int32_t> ids) noexcept {
  std::size_t count = 0;
  for (const planned_segment& seg : plan)
    if (count == 0 || ids[count - 1] != seg.chunk) ids[count++] = seg.chunk;
  return ids.first(count);
}

/// Calls f with the planner of config.method (a value of its own type).
template <class F>
decltype(auto) with_planner(attention_method method, F&& f) {
  switch (method) {
    case attention_method::dense: return f(dense_planner{});
    case attention_method::sink_window: return f(sink_window_planner{});
    case attention_method::longheads: break;
  }
  return f(longheads_planner{});
}

}  // namespace longheads
