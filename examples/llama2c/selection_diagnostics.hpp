// SPDX-License-Identifier: MIT
// Where did the heads look? For a passkey prompt: whether each (layer, head) selected a needle
// chunk for the first answer token, the needle chunk's rank under the policy's own scores,
// and an oracle selector that always includes the needle chunk (an upper bound for any
// selection policy; a diagnostic, never a default).
#pragma once

#include <longheads/longheads.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "policies.hpp"

namespace llama2c {

/// Chunk ids [first, last] holding the needle sentence.
struct needle_chunks {
  std::int64_t first = -1, last = -1;
  bool contains(std::int64_t c) const noexcept { return c >= first && c <= last; }
};

/// The paper's selection, except that a needle chunk outranks every other candidate. The
/// needle range is shared state the benchmark sets per prompt.
struct needle_oracle_selector {
  std::shared_ptr<needle_chunks> needle = std::make_shared<needle_chunks>();

  std::size_t select(const longheads::selection_request& r, std::span<const float> scores, std::span<std::int32_t> selected,
                     std::span<std::int32_t> scratch) const noexcept {
    const std::size_t n = longheads::sink_local_topk_selector{}.select(r, scores, selected, scratch);
    if (n == static_cast<std::size_t>(r.query_chunk + 1)) return n;  // fits the budget: everything
    const auto chosen = selected.first(n);
    if (std::any_of(chosen.begin(), chosen.end(), [&](std::int32_t c) { return needle->contains(c); })) return n;
    const std::int64_t candidates_end = r.query_chunk - r.local_chunks + 1;
    const std::int64_t forced = std::max<std::int64_t>(needle->first, r.sink_chunks);
    if (forced > needle->last || forced >= candidates_end || r.budget_chunks - r.sink_chunks - r.local_chunks <= 0) return n;
    // Replace the lowest-scoring chunk chosen by score with the needle chunk.
    auto by_score = chosen.subspan(static_cast<std::size_t>(r.sink_chunks), n - static_cast<std::size_t>(r.sink_chunks + r.local_chunks));
    auto worst = std::min_element(by_score.begin(), by_score.end(), [&](std::int32_t a, std::int32_t b) {
      return scores[static_cast<std::size_t>(a)] < scores[static_cast<std::size_t>(b)];
    });
    *worst = static_cast<std::int32_t>(forced);
    std::sort(by_score.begin(), by_score.end());
    return n;
  }
};

namespace policies {
struct oracle : paper {
  using selector = needle_oracle_selector;
};
}  // namespace policies

struct selection_report {
  int heads = 0;          // (layer, head) pairs looked at
  int hits = 0;           // ... that selected a needle chunk
  std::vector<std::int64_t> ranks;  // needle chunk's best rank among the scored candidates (1 = top),
                                    // for pairs where it was a candidate (not a sink or local chunk)
  double median_rank() const {
    if (ranks.empty()) return 0;
    std::vector<std::int64_t> r = ranks;
    std::nth_element(r.begin(), r.begin() + static_cast<std::ptrdiff_t>(r.size() / 2), r.end());
    return static_cast<double>(r[r.size() / 2]);
  }
};

/// For the model's last query (the one that produces the first answer token).
template <class Model>
selection_report inspect_selection(const Model& model, needle_chunks needle, std::vector<float>& scratch) {
  selection_report rep;
  const auto& attention = model.attention();
  const auto& cfg = attention.config();
  const int w = cfg.chunk_size, d = cfg.head_dim;
  const std::int64_t p = model.position() - 1, i = p / w;
  const std::int64_t candidates_begin = cfg.sink_chunks, candidates_end = i - cfg.local_chunks + 1;
  const bool scored = i + 1 > cfg.budget_chunks;
  for (int l = 0; l < model.config().n_layers; ++l)
    for (int h = 0; h < cfg.n_q_heads; ++h) {
      const auto& cache = model.cache(l);
      const auto chosen = cache.last_selection(h);
      ++rep.heads;
      rep.hits += std::any_of(chosen.begin(), chosen.end(), [&](std::int32_t c) { return needle.contains(c); });
      if (!scored) continue;
      const auto& scorer = attention.policies().scorer;
      // The candidates' scores (a spread encoding's last full chunk is local, not yet summarised).
      std::vector<float> scores(static_cast<std::size_t>(candidates_end));
      scratch.resize(scorer.scratch_floats(cfg, 1));
      const longheads::scoring_inputs in{{model.last_query(l).data() + h * d, 1, d}, p, cache.representations(h).first_rows(candidates_end),
                                         &attention.rotary(), w};
      scorer.score(in, {scores.data(), 1, candidates_end}, scratch);
      std::int64_t best = std::numeric_limits<std::int64_t>::max();
      for (std::int64_t c = std::max(needle.first, candidates_begin); c <= std::min(needle.last, candidates_end - 1); ++c) {
        std::int64_t rank = 1;
        for (std::int64_t o = candidates_begin; o < candidates_end; ++o)
          rank += scores[static_cast<std::size_t>(o)] > scores[static_cast<std::size_t>(c)] ||
                  (scores[static_cast<std::size_t>(o)] == scores[static_cast<std::size_t>(c)] && o < c);
        best = std::min(best, rank);
      }
      if (best != std::numeric_limits<std::int64_t>::max()) rep.ranks.push_back(best);
    }
  return rep;
}

}  // namespace llama2c
