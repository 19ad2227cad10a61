#include <doctest/doctest.h>

#include "test_support.hpp"

#include <longheads/shard.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace longheads;

TEST_CASE("shards: the merged candidates of P shards are the single-process selection, chunk for chunk") {
  // Random contexts, budgets and contiguous splits into P = 1..4 shards (some empty, some
  // holding no candidate); scores with ties, NaN and infinities. The selector's scored chunks
  // (between the sinks and the locals) must come out identical.
  std::mt19937 rng(2300);
  const sink_local_topk_selector selector;
  int cases = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int sinks = static_cast<int>(rng() % 3), locals = 1 + static_cast<int>(rng() % 3);
    const int budget = sinks + locals + 1 + static_cast<int>(rng() % 12);
    const std::int64_t query_chunk = budget + static_cast<std::int64_t>(rng() % 300);  // more chunks than the budget
    std::vector<float> scores(static_cast<std::size_t>(query_chunk));
    for (float& s : scores) {
      const unsigned kind = rng() % 20;
      s = kind == 0 ? std::numeric_limits<float>::quiet_NaN()
          : kind == 1 ? -std::numeric_limits<float>::infinity()
          : kind == 2 ? std::numeric_limits<float>::infinity()
                      : static_cast<float>(static_cast<int>(rng() % 16) - 8) * 0.25f;  // many ties
    }
    const selection_request request{query_chunk, budget, sinks, locals};
    std::vector<std::int32_t> selected(static_cast<std::size_t>(budget)), scratch(static_cast<std::size_t>(query_chunk));
    const std::size_t count = selector.select(request, scores, selected, scratch);
    const std::vector<std::int32_t> expected(selected.begin() + sinks, selected.begin() + static_cast<std::ptrdiff_t>(count) - locals);
    const auto wanted = static_cast<std::size_t>(budget - sinks - locals);
    const auto begin = static_cast<std::int32_t>(sinks), end = static_cast<std::int32_t>(query_chunk - locals + 1);

    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(trial);
      CAPTURE(shards);
      // Contiguous ranges at random boundaries over the chunks [0, query_chunk].
      std::vector<std::int32_t> bounds{0};
      for (int s = 1; s < shards; ++s) bounds.push_back(static_cast<std::int32_t>(rng() % static_cast<unsigned>(query_chunk + 1)));
      bounds.push_back(static_cast<std::int32_t>(query_chunk + 1));
      std::sort(bounds.begin(), bounds.end());
      std::vector<chunk_candidate> sent;
      for (int s = 0; s < shards; ++s) {
        const std::int32_t first = bounds[static_cast<std::size_t>(s)], last = bounds[static_cast<std::size_t>(s) + 1];
        // A shard holds its chunks' scores only (the query's own chunk has none: it is local).
        const std::int32_t scored_end = std::min<std::int32_t>(last, static_cast<std::int32_t>(query_chunk));
        const std::span<const float> mine(scores.data() + first, static_cast<std::size_t>(std::max(0, scored_end - first)));
        std::vector<chunk_candidate> best(wanted);
        const std::size_t n = shard_candidates(mine, first, begin, end, wanted, best);
        CHECK(n <= wanted);
        for (std::size_t i = 0; i < n; ++i) CHECK((best[i].chunk >= std::max(first, begin) && best[i].chunk < std::min(scored_end, end)));
        sent.insert(sent.end(), best.begin(), best.begin() + static_cast<std::ptrdiff_t>(n));
      }
      std::vector<std::int32_t> chosen(wanted);
      const std::size_t n = merge_candidates(sent, wanted, chosen);
      CHECK(std::vector<std::int32_t>(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(n)) == expected);
      ++cases;
    }
  }
  MESSAGE(cases << " sharded selections compared");
}

TEST_CASE("shards: partial softmax states merged in log-sum-exp form give the attention over all the segments") {
  // Segments of one query split over P shards, each streamed with begin/consume (no finish),
  // merged in shard order, then finished: against double-precision attention over every
  // segment, and against the kernel streaming them all in one state. Logits up to ~40 apart,
  // so the shards' running maxima differ by far more than exp's range in a naive sum.
  const online_softmax_kernel kernel{};
  std::uint32_t seed = 2310;
  for (int d : {8, 32, 128})
    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(d);
      CAPTURE(shards);
      const int segments = 7, length = 24, total = segments * length;
      const auto query = test::random_floats(static_cast<std::size_t>(d), seed++, 3.0f);
      const auto keys = test::random_floats(static_cast<std::size_t>(total * d), seed++, 3.0f);
      const auto values = test::random_floats(static_cast<std::size_t>(total * d), seed++);
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      std::vector<float> scratch(kernel.scratch_floats(length, d));

      // Reference in double.
      std::vector<double> logits(static_cast<std::size_t>(total)), expected(static_cast<std::size_t>(d), 0.0);
      double top = -1e300, denominator = 0, largest = 0;
      for (int j = 0; j < total; ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += double{query[static_cast<std::size_t>(i)]} * keys[static_cast<std::size_t>(j * d + i)];
        top = std::max(top, logits[static_cast<std::size_t>(j)] = dot * scale);
      }
      for (int j = 0; j < total; ++j) {
        const double p = std::exp(logits[static_cast<std::size_t>(j)] - top);
        denominator += p;
        for (int i = 0; i < d; ++i) expected[static_cast<std::size_t>(i)] += p * values[static_cast<std::size_t>(j * d + i)];
      }
      for (double& e : expected) largest = std::max(largest, std::abs(e /= denominator));

      auto consume_range = [&](int s0, int s1, softmax_state& state, float* out) {
        kernel.begin(state, out, d);
        for (int s = s0; s < s1; ++s)
          kernel.consume({query.data(), keys.data() + s * length * d, values.data() + s * length * d, length}, d, scale, state, out, scratch);
      };
      // One state over everything.
      softmax_state whole_state;
      std::vector<float> whole(static_cast<std::size_t>(d));
      consume_range(0, segments, whole_state, whole.data());
      kernel.finish(whole_state, whole.data(), d);

      // P shards of consecutive segments (the first shards may hold none), merged in order.
      softmax_state merged_state;
      std::vector<float> merged(static_cast<std::size_t>(d)), part(static_cast<std::size_t>(d));
      kernel.begin(merged_state, merged.data(), d);
      for (int s = 0; s < shards; ++s) {
        const int s0 = segments * s / shards, s1 = segments * (s + 1) / shards;
        softmax_state state;
        consume_range(s0, s1, state, part.data());
        merge_partial(merged_state, merged.data(), state, part.data(), d);
      }
      // An empty shard's state changes nothing, bit for bit.
      const std::vector<float> before = merged;
      const softmax_state before_state = merged_state;
      softmax_state empty;
      std::vector<float> empty_out(static_cast<std::size_t>(d));
      kernel.begin(empty, empty_out.data(), d);
      merge_partial(merged_state, merged.data(), empty, empty_out.data(), d);
      CHECK(merged == before);
      CHECK((merged_state.running_max == before_state.running_max && merged_state.denominator == before_state.denominator));
      kernel.finish(merged_state, merged.data(), d);

      for (int i = 0; i < d; ++i) {
        CHECK(std::abs(merged[static_cast<std::size_t>(i)] - expected[static_cast<std::size_t>(i)]) <= 1e-6 * largest);
        CHECK(std::abs(merged[static_cast<std::size_t>(i)] - whole[static_cast<std::size_t>(i)]) <= 1e-6 * largest);
      }
      if (shards == 1) CHECK(merged == whole);  // one shard: merging into an empty state is a copy
    }
}
