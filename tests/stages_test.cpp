// Each stage of a call on its own, against the naive statement of what it must do: the work
// partition, the planners, selection, the tile streamer, the overlap check and the workspace.
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <map>
#include <set>

using namespace longheads;

TEST_CASE("work partition: every (query head, query) of a call is in exactly one item") {
  for (int hkv : {1, 2, 8, 32})
    for (int group : {1, 4})
      for (std::int64_t tokens : {1, 5, 64, 65, 200})
        for (std::size_t lanes : {1, 2, 3, 16})
          for (bool shared : {false, true}) {
            const attention_config c = test::make_config(hkv * group, hkv, 8, 4, 3);
            const work_partition work(c, tokens, lanes, shared, work_partition::tile_queries(c));
            std::map<std::pair<int, std::int64_t>, int> seen;
            for (std::size_t i = 0; i < work.items(); ++i) {
              const work_item it = work.item(i);
              CHECK(it.count <= 64);
              if (shared && it.heads.count() > 0) CHECK(it.heads.per_group() == group);  // a group is never split
              for (int g = it.heads.group_begin; g < it.heads.group_end; ++g)
                for (int h = it.heads.first_in_group; h < it.heads.end_in_group; ++h)
                  for (std::int64_t t = it.t0; t < it.t0 + it.count; ++t) ++seen[{g * group + h, t}];
            }
            CAPTURE(hkv);
            CAPTURE(tokens);
            CAPTURE(lanes);
            CHECK(seen.size() == static_cast<std::size_t>(hkv * group * tokens));
            for (const auto& [key, n] : seen) CHECK(n == 1);
          }
}

namespace {
/// For each key position a plan reads: where its query stands relative to it (delta + offset in
/// the chunk), as the naive algorithm gives it.
std::map<std::int64_t, std::int64_t> distances(const attention_config& c, const kv_cache& cache, std::span<const planned_segment> plan,
                                               int g) {
  std::map<std::int64_t, std::int64_t> out;
  for (const planned_segment& seg : plan) {
    const std::size_t start = cache.kv_offset(seg.chunk, g);
    REQUIRE(seg.offset >= start);
    const auto first = static_cast<std::int64_t>((seg.offset - start) / static_cast<std::size_t>(c.head_dim));
    for (std::int64_t j = first; j < first + seg.length; ++j) {
      const std::int64_t position = std::int64_t{seg.chunk} * c.chunk_size + j;
      CHECK(out.count(position) == 0);  // no key twice
      out[position] = seg.delta - j;    // the query at delta from the chunk's token 0
    }
  }
  return out;
}
}  // namespace

TEST_CASE("planners: dense reads every earlier key at its true distance, sink+window its window re-indexed") {
  const int w = 4, budget = 3, d = 8;
  attention_config c = test::make_config(2, 2, d, w, budget, attention_method::sink_window);
  c.sink_tokens = 2;
  const kv_cache cache(cache_shape{2, 2, d, w, 0, kv_precision::fp32});
  std::vector<planned_segment> plan(64);
  for (std::int64_t p = 0; p < 40; ++p) {
    CAPTURE(p);
    const std::size_t n_dense = dense_planner{}.plan(c, cache, p, 1, plan.data());
    CHECK(static_cast<std::int64_t>(n_dense) <= dense_planner::max_segments(c, p + 1));
    const auto dense = distances(c, cache, {plan.data(), n_dense}, 1);
    CHECK(dense.size() == static_cast<std::size_t>(p + 1));
    for (const auto& [position, distance] : dense) CHECK(distance == p - position);

    const std::size_t n = sink_window_planner{}.plan(c, cache, p, 1, plan.data());
    CHECK(static_cast<std::int64_t>(n) <= sink_window_planner::max_segments(c, p + 1));
    const auto window = distances(c, cache, {plan.data(), n}, 1);
    const std::int64_t L = c.budget_tokens();
    if (p < L) {
      CHECK(window == dense);
    } else {
      // Sinks 0..S-1 at positions 0..S-1, the last L - S tokens at S..L-1, the query at L-1.
      CHECK(window.size() == static_cast<std::size_t>(L));
      for (const auto& [position, distance] : window) {
        const std::int64_t slot = position < c.sink_tokens ? position : c.sink_tokens + (position - (p - (L - c.sink_tokens) + 1));
        CHECK(distance == L - 1 - slot);
      }
    }
  }
}

TEST_CASE("planner: LongHeads lays the chosen chunks side by side and the query after them") {
  const int w = 4, d = 8;
  const attention_config c = test::make_config(2, 1, d, w, 4);
  const kv_cache cache(cache_shape{2, 1, d, w, static_cast<std::size_t>(d), kv_precision::fp32});
  const std::int64_t p = 37;  // chunk 9, offset 1
  const std::vector<std::int32_t> chunks{0, 4, 8, 9};
  std::vector<std::int64_t> starts(4);
  const std::int64_t query_position = contiguous_slot_remapper{}.remap(chunks, p, w, starts);
  std::vector<planned_segment> plan(4);
  const std::size_t n = longheads_planner{}.plan(c, cache, p, 0, {chunks, starts, query_position}, plan.data());
  REQUIRE(n == 4);
  const auto seen = distances(c, cache, {plan.data(), n}, 0);
  CHECK(seen.size() == 3 * 4 + 2);  // three full chunks and the query's own up to itself
  for (const auto& [position, distance] : seen) {
    const std::int64_t slot = std::find(chunks.begin(), chunks.end(), position / w) - chunks.begin();
    CHECK(distance == query_position - (slot * w + position % w));
  }
  std::vector<std::int32_t> ids(4);
  const auto read = distinct_chunks({plan.data(), n}, ids);
  CHECK(std::vector<std::int32_t>(read.begin(), read.end()) == chunks);
}

TEST_CASE("selection: choose_chunks keeps sinks and locals and the best-scoring others, ties to the lower chunk") {
  const attention_config c = test::make_config(1, 1, 8, 4, 5);  // 1 sink, 2 locals, 2 by score
  selection_scratch s;
  s.reserve(c, true, false, 64, 1, 16, 5, 0);
  const std::int64_t p = 4 * 20 + 3;  // chunk 20: candidates 1..18
  std::vector<float> scores(20, 0.0f);
  scores[7] = 2.0f;
  scores[3] = 1.0f;
  scores[12] = 1.0f;  // ties with 3: the lower chunk wins
  scores[19] = 9.0f;  // a local chunk's score does not matter
  const chunk_choice choice = choose_chunks(sink_local_topk_selector{}, contiguous_slot_remapper{}, c, p, scores, s);
  CHECK(std::vector<std::int32_t>(choice.chunks.begin(), choice.chunks.end()) == std::vector<std::int32_t>{0, 3, 7, 19, 20});
  CHECK(choice.query_position == 4 * 4 + 3);
  // Every chunk full before the query's, but for the last full one while its encoding is spread.
  cache_shape shape{1, 1, 8, 4, 8};
  kv_cache encoded(shape), spread((shape.spread_pieces = 2, shape.spread_state_floats = 4, shape));
  for (kv_cache* cache : {&encoded, &spread}) {
    cache->reserve(p);
    cache->commit(p);  // the query at p - 1 = 4 * 20 + 2 is in the open chunk 20
  }
  CHECK(chunks_to_score(c, encoded, p - 1) == 20);
  CHECK(chunks_to_score(c, spread, p - 1) == 19);
  CHECK(spread.summarised_chunks() == 19);
  CHECK(chunks_to_score(c, encoded, 4 * 4 + 3) == 0);  // fits the budget: every chunk, nothing to score
}

TEST_CASE("tile streamer: a tile of queries sharing chunks gives each query the bits of attending alone") {
  const int w = 8, d = 16, hq = 4, hkv = 1;
  attention_config c = test::make_config(hq, hkv, d, w, 4);
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    c.kv_storage = storage;
    const rope r(d);
    kv_cache cache(cache_shape{hq, hkv, d, w, 0, storage});
    cache.reserve(6 * w);
    const test::sequence seq(6 * w, hq, hkv, d, 41);
    std::vector<float> scratch(d);
    for (int t = 0; t < 6 * w; ++t) cache.store_token(t, seq.kv(0, 6 * w), seq.vv(0, 6 * w), t, r, scratch);
    cache.commit(6 * w);
    // Four queries with different plans over overlapping chunks, partial own chunks included.
    const std::vector<std::vector<std::int32_t>> picks{{0, 2, 5}, {1, 2, 5}, {0, 5}, {2, 3, 4, 5}};
    tile_scratch tile;
    tile.reserve(c, 16, 6, online_softmax_kernel{}.scratch_floats(w, d));
    std::vector<float> together(static_cast<std::size_t>(4 * d)), alone(together.size());
    auto plan_of = [&](int i, planned_segment* plan) {
      const auto& chunks = picks[static_cast<std::size_t>(i)];
      for (std::size_t s = 0; s < chunks.size(); ++s)
        plan[s] = {cache.kv_offset(chunks[s], 0), chunks[s] == 5 ? 3 + i : w, chunks[s], static_cast<std::int64_t>(s * 8 + i)};
      return chunks.size();
    };
    tile.clear();
    for (int i = 0; i < 4; ++i) tile.add(seq.q.data() + i * d, together.data() + i * d, plan_of(i, tile.next_plan()));
    tile.stream(online_softmax_kernel{}, c, r, cache);
    for (int i = 0; i < 4; ++i) {
      tile.clear();
      tile.add(seq.q.data() + i * d, alone.data() + i * d, plan_of(i, tile.next_plan()));
      tile.stream(online_softmax_kernel{}, c, r, cache);
    }
    CHECK(together == alone);
  }
}

TEST_CASE("validation: the overlap check agrees with comparing every element's address") {
  std::vector<float> buffer(4096);
  std::mt19937 rng(5);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int overlapping = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto view = [&] {
      const int heads = uniform(1, 3), d = uniform(1, 4), tokens = uniform(1, 6);
      const int stride = heads * d + uniform(0, 12);
      const int offset = uniform(0, 1000);
      return tensor_view<float>(buffer.data() + offset, tokens, heads, d, stride);
    };
    const tensor_view<float> a = view(), b = view();
    std::set<const float*> elements;
    for (std::ptrdiff_t t = 0; t < a.tokens(); ++t)
      for (std::ptrdiff_t i = 0; i < a.heads() * a.head_dim(); ++i) elements.insert(a.at(t, 0) + i);
    bool expected = false;
    for (std::ptrdiff_t t = 0; t < b.tokens(); ++t)
      for (std::ptrdiff_t i = 0; i < b.heads() * b.head_dim(); ++i) expected |= elements.count(b.at(t, 0) + i) > 0;
    overlapping += expected;
    CHECK(detail::views_overlap(a, b) == expected);
    CHECK(detail::views_overlap(b, a) == expected);
  }
  CHECK(overlapping > 100);  // both outcomes are exercised
}

TEST_CASE("workspace: reserving twice for the same needs grows nothing") {
  const attention_config c = test::make_config(8, 2, 32, 16, 4);
  workspace ws(2);
  const attention<>::policy_set policies{};
  const workspace_needs needs = workspace_needs::of(c, policies, 4096, 64, longheads_planner::max_segments(c, 4096), false);
  ws.reserve(c, needs);
  const auto sizes = [&] {
    return std::vector<std::size_t>{ws.lane(1).selection.scores.capacity(), ws.lane(1).encoding.encoder.capacity(),
                                    ws.lane(0).selection.candidates.capacity()};
  };
  const auto before = sizes();
  CHECK(before[0] >= 16u * 256u);  // an item's heads times the chunks of the context
  ws.reserve(c, needs);
  ws.reserve(c, workspace_needs::of(c, policies, 1024, 1, longheads_planner::max_segments(c, 1024), false));
  CHECK(sizes() == before);
}
