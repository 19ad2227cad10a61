// SPDX-License-Identifier: MIT
// Selection fidelity: how much an index's choice of chunks loses against a reference choice (the
// flat scan's) for one query of one head, measured on the cache itself, in double precision.
//
// Three figures, each comparing two chunk lists drawn from the same candidates [first, end):
//   recall          the share of the reference's chunks the choice also holds (recall@k);
//   mass recall     the attention mass in the choice's chunks over the mass in the reference's,
//                   the mass being the softmax over every candidate key of the query's logits in
//                   the frame the Quest scorer ranks chunks in: each chunk's keys (stored rotated
//                   at their offsets in the chunk) against the query rotated to the slot right
//                   behind its own chunk (bound_scorer's offset_chunks = 1). At true positions
//                   500k tokens apart a small head dim's rotation noise swamps relevance, so this
//                   is the frame in which "the chunks that matter" is defined;
//   output diff.    || o(choice) - o(reference) || / || o(reference) ||, o being the head's LongHeads
//                   output for the query: sink chunks, the chosen chunks and the local chunks laid
//                   side by side at contiguous slots (contiguous_slot_remapper), causal in the
//                   query's own chunk.
// Where the chunk ids come from is the caller's business: an index's search, the flat scan
// (bound_search gives its choice exactly for the Quest pair), or a hand-made list. The cost is a
// pass over every candidate key (O(n w d) per query): a measuring instrument, not a hot path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "attention_config.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

namespace detail {
/// scale * (a . b), accumulated in double.
inline double scaled_dot(double scale, const float* a, const float* b, int d) noexcept {
  double s = 0;
  for (int i = 0; i < d; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return scale * s;
}
}  // namespace detail

/// How closely one choice of chunks matches a reference choice (see the file comment).
struct choice_fidelity {
  double recall = 1.0;             ///< |choice ∩ reference| / |reference| (1 for an empty reference)
  double mass_recall = 1.0;        ///< attention mass in the choice's chunks / in the reference's (scorer's frame)
  double output_difference = 0.0;  ///< ||o(choice) - o(reference)|| / ||o(reference)||
};

/// One query of one head, and the chunks it chooses among.
struct fidelity_query {
  int q_head = 0;                  ///< the head
  std::int64_t position = 0;       ///< the query's position in the sequence (the cache holds it)
  const float* query = nullptr;    ///< its pre-RoPE query, head_dim floats
  std::int64_t first = 0;          ///< the first candidate chunk
  std::int64_t end = 0;            ///< one past the last candidate chunk: candidates are chunks [first, end)
  int offset_chunks = 1;           ///< the scorer's frame: the query rotated this many chunks behind its own
};

namespace detail {
/// @throws shape_error unless `query` is one of the cache's and the lists hold candidates only.
inline void check_fidelity_query(const kv_cache& cache, const fidelity_query& query, std::span<const std::int32_t> reference,
                                 std::span<const std::int32_t> choice) {
  const cache_shape& shape = cache.shape();
  const int w = shape.chunk_size;
  const std::int64_t own = query.position / w;
  if (query.position < 0 || query.position >= cache.tokens() || query.q_head < 0 || query.q_head >= shape.n_q_heads || query.query == nullptr)
    detail::fail<shape_error>("longheads fidelity: position " + std::to_string(query.position) + " of head " + std::to_string(query.q_head) +
                              " is not a query of this cache (" + std::to_string(cache.tokens()) + " tokens, " +
                              std::to_string(shape.n_q_heads) + " heads)");
  if (query.first < 0 || query.first > query.end || query.end > own)
    detail::fail<shape_error>("longheads fidelity: candidates [" + std::to_string(query.first) + ", " + std::to_string(query.end) +
                              ") must be full chunks before the query's chunk " + std::to_string(own));
  for (auto list : {reference, choice})
    for (std::int32_t c : list)
      if (c < query.first || c >= query.end)
        detail::fail<shape_error>("longheads fidelity: chunk " + std::to_string(c) + " is not among the candidates [" + std::to_string(query.first) +
                                  ", " + std::to_string(query.end) + ")");
}
}  // namespace detail

/// The head's LongHeads output for `query` reading `chosen` (besides its sink and local chunks),
/// in double precision: the chunks laid side by side at contiguous slots in ascending order
/// (contiguous_slot_remapper), the query in the last slot, causal in its own chunk. With the
/// chunks the attention chose it is the attention's output for that query (tested).
inline std::vector<double> choice_output(const kv_cache& cache, const rope& rotary, const attention_config& config, const fidelity_query& query,
                                         std::span<const std::int32_t> chosen) {
  detail::check_fidelity_query(cache, query, chosen, {});
  const cache_shape& shape = cache.shape();
  const int w = shape.chunk_size, d = shape.head_dim;
  const std::int64_t own = query.position / w;
  const int g = query.q_head / (shape.n_q_heads / shape.n_kv_heads);
  std::vector<float> scratch(2 * static_cast<std::size_t>(w) * static_cast<std::size_t>(d)), rotated(static_cast<std::size_t>(d));
  std::vector<std::int64_t> read;
  for (std::int64_t c = 0; c < std::min<std::int64_t>(config.sink_chunks, own); ++c) read.push_back(c);
  for (std::int32_t c : chosen) read.push_back(c);
  for (std::int64_t c = std::max<std::int64_t>(0, own - config.local_chunks + 1); c <= own; ++c) read.push_back(c);
  std::sort(read.begin(), read.end());
  read.erase(std::unique(read.begin(), read.end()), read.end());
  const auto m = static_cast<std::int64_t>(read.size());
  std::vector<double> logits, out(static_cast<std::size_t>(d), 0.0);
  for (std::int64_t s = 0; s < m; ++s) {  // the logits first (for the softmax's max), then the weighted values
    const std::int64_t c = read[static_cast<std::size_t>(s)];
    const int rows = c == own ? static_cast<int>(query.position % w) + 1 : w;
    rotary.rotate(query.query, rotated.data(), (m - 1 - s) * w + query.position % w);
    const float* keys = cache.fp32_rows(cache.kv_offset(c, g), rows, scratch).first;
    for (int t = 0; t < rows; ++t) logits.push_back(detail::scaled_dot(config.scale(), rotated.data(), keys + static_cast<std::ptrdiff_t>(t) * d, d));
  }
  const double most = logits.empty() ? 0.0 : *std::max_element(logits.begin(), logits.end());
  double total = 0;
  std::size_t at = 0;
  for (std::int64_t s = 0; s < m; ++s) {
    const std::int64_t c = read[static_cast<std::size_t>(s)];
    const int rows = c == own ? static_cast<int>(query.position % w) + 1 : w;
    const float* values = cache.fp32_rows(cache.kv_offset(c, g), rows, scratch).second;
    for (int t = 0; t < rows; ++t) {
      const double p = std::exp(logits[at++] - most);
      total += p;
      for (int i = 0; i < d; ++i) out[static_cast<std::size_t>(i)] += p * static_cast<double>(values[static_cast<std::ptrdiff_t>(t) * d + i]);
    }
  }
  for (double& x : out) x /= total;
  return out;
}

/// Measures `choice` against `reference` (chunk ids in [first, end), any order) for `query` on
/// `cache` (a cache of a layer configured as `config`, keys stored by `rotary`).
/// @throws shape_error if a chunk id is outside the candidates, the position is not in the
///         cache or the candidates are not full chunks before the query's own.
inline choice_fidelity measure_choice(const kv_cache& cache, const rope& rotary, const attention_config& config, const fidelity_query& query,
                                      std::span<const std::int32_t> reference, std::span<const std::int32_t> choice) {
  detail::check_fidelity_query(cache, query, reference, choice);
  const cache_shape& shape = cache.shape();
  const int w = shape.chunk_size, d = shape.head_dim;
  const int g = query.q_head / (shape.n_q_heads / shape.n_kv_heads);
  const double scale = config.scale();
  std::vector<float> scratch(2 * static_cast<std::size_t>(w) * static_cast<std::size_t>(d)), rotated(static_cast<std::size_t>(d));
  auto logit = [&](const float* q, const float* key) { return detail::scaled_dot(scale, q, key, d); };
  choice_fidelity f;

  // Recall@k.
  std::size_t shared = 0;
  for (std::int32_t c : reference) shared += std::find(choice.begin(), choice.end(), c) != choice.end();
  f.recall = reference.empty() ? 1.0 : static_cast<double>(shared) / static_cast<double>(reference.size());

  // Mass in the scorer's frame: log-sum-exp of each candidate chunk's logits.
  rotary.rotate(query.query, rotated.data(), query.position % w + std::int64_t{query.offset_chunks} * w);
  auto chunk_lse = [&](std::int64_t c) {
    const float* keys = cache.fp32_rows(cache.kv_offset(c, g), w, scratch).first;
    double most = -std::numeric_limits<double>::infinity(), sum = 0;
    for (int t = 0; t < w; ++t) most = std::max(most, logit(rotated.data(), keys + static_cast<std::ptrdiff_t>(t) * d));
    for (int t = 0; t < w; ++t) sum += std::exp(logit(rotated.data(), keys + static_cast<std::ptrdiff_t>(t) * d) - most);
    return most + std::log(sum);
  };
  auto mass = [&](std::span<const std::int32_t> chunks) {  // sum of exp(lse), relative to a shared origin below
    std::vector<double> lse;
    for (std::int32_t c : chunks) lse.push_back(chunk_lse(c));
    return lse;
  };
  const std::vector<double> ref_lse = mass(reference), choice_lse = mass(choice);
  double origin = -std::numeric_limits<double>::infinity();
  for (double x : ref_lse) origin = std::max(origin, x);
  for (double x : choice_lse) origin = std::max(origin, x);
  double ref_mass = 0, choice_mass = 0;
  for (double x : ref_lse) ref_mass += std::exp(x - origin);
  for (double x : choice_lse) choice_mass += std::exp(x - origin);
  f.mass_recall = reference.empty() ? 1.0 : choice_mass / ref_mass;

  const std::vector<double> o_ref = choice_output(cache, rotary, config, query, reference),
                            o_choice = choice_output(cache, rotary, config, query, choice);
  double diff = 0, norm = 0;
  for (int i = 0; i < d; ++i) {
    diff += (o_choice[static_cast<std::size_t>(i)] - o_ref[static_cast<std::size_t>(i)]) * (o_choice[static_cast<std::size_t>(i)] - o_ref[static_cast<std::size_t>(i)]);
    norm += o_ref[static_cast<std::size_t>(i)] * o_ref[static_cast<std::size_t>(i)];
  }
  f.output_difference = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  return f;
}

}  // namespace longheads
