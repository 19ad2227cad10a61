// The chunk index (chunk_index.hpp) against the flat scan it must reproduce exactly: the same
// chunks, in the same order, ties to the lower chunk, as sink_local_topk_selector picks them from
// every chunk's bound score.
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <algorithm>
#include <numeric>

using namespace longheads;

namespace {
/// n chunk representations [lo | hi] of w random keys each (key_bounds_encoder), some of them
/// copies of others so that scores tie exactly.
std::vector<float> random_summaries(std::int64_t n, int d, std::uint32_t seed) {
  const int w = 4;
  const attention_config c = test::make_config(1, 1, d, w, 4);
  std::vector<float> out(static_cast<std::size_t>(n) * 2 * d);
  std::mt19937 rng(seed);
  for (std::int64_t i = 0; i < n; ++i) {
    float* row = out.data() + i * 2 * d;
    if (i > 0 && rng() % 5 == 0) {  // a tie with an earlier chunk
      const std::int64_t j = static_cast<std::int64_t>(rng() % static_cast<std::uint32_t>(i));
      std::copy_n(out.data() + j * 2 * d, 2 * d, row);
      continue;
    }
    const auto keys = test::random_floats(static_cast<std::size_t>(w) * d, seed + 1000u + static_cast<std::uint32_t>(i));
    key_bounds_encoder{}.encode({{nullptr, w, d}, {keys.data(), w, d}, {nullptr, w, d}, 1.0f}, {row, static_cast<std::size_t>(2 * d)}, {});
  }
  (void)c;
  return out;
}

/// The flat scan: every candidate's score, ranked as the selector ranks them, best first.
std::vector<std::int32_t> flat_top(const std::vector<float>& summaries, int d, const float* q, std::int64_t first, std::int64_t end,
                                   std::size_t wanted) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(end - first));
  std::iota(ids.begin(), ids.end(), static_cast<std::int32_t>(first));
  auto key = [&](std::int32_t c) {
    const float* lo = summaries.data() + static_cast<std::ptrdiff_t>(c) * 2 * d;
    const float s = detail::bound_dot(q, lo, lo + d, d);
    return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  };
  std::stable_sort(ids.begin(), ids.end(), [&](std::int32_t a, std::int32_t b) { return key(a) > key(b); });
  ids.resize(std::min(wanted, ids.size()));
  return ids;
}

bound_tree tree_of(const std::vector<float>& summaries, int d, std::int64_t n, int fanout) {
  bound_tree tree(d, fanout);
  for (std::int64_t c = 0; c < n; ++c) tree.append(summaries.data() + c * 2 * d);
  return tree;
}

/// Every box equals the min and max over its chunks, computed directly.
void check_boxes(const bound_tree& tree, const std::vector<float>& summaries, int d) {
  for (int l = 1; l <= tree.levels(); ++l) {
    CHECK(tree.boxes(l) == (tree.chunks() + tree.span(l) - 1) / tree.span(l));
    for (std::int64_t b = 0; b < tree.boxes(l); ++b) {
      std::vector<float> expected(summaries.begin() + b * tree.span(l) * 2 * d, summaries.begin() + (b * tree.span(l) + 1) * 2 * d);
      for (std::int64_t c = b * tree.span(l) + 1; c < std::min(tree.chunks(), (b + 1) * tree.span(l)); ++c)
        for (int i = 0; i < d; ++i) {
          expected[static_cast<std::size_t>(i)] = std::min(expected[static_cast<std::size_t>(i)], summaries[static_cast<std::size_t>(c * 2 * d + i)]);
          expected[static_cast<std::size_t>(d + i)] =
              std::max(expected[static_cast<std::size_t>(d + i)], summaries[static_cast<std::size_t>(c * 2 * d + d + i)]);
        }
      CHECK(std::equal(expected.begin(), expected.end(), tree.box(l, b)));
    }
  }
  CHECK(tree.span(tree.levels()) >= tree.chunks());  // one box covers everything
}
}  // namespace

TEST_CASE("chunk index: boxes grown chunk by chunk are the min and max over their chunks") {
  for (int fanout : {2, 3, 16})
    for (std::int64_t n : {1, 2, 15, 16, 17, 255, 300}) {
      CAPTURE(fanout);
      CAPTURE(n);
      const int d = 8;
      const auto summaries = random_summaries(n, d, 11);
      const bound_tree tree = tree_of(summaries, d, n, fanout);
      CHECK(tree.chunks() == n);
      check_boxes(tree, summaries, d);
      // Truncated to fewer chunks (a cache going back to a chunk boundary): the same as if
      // only those had been appended.
      bound_tree truncated = tree;
      const std::int64_t m = n / 3;
      truncated.truncate(m, {summaries.data(), n, 2 * d});
      CHECK(truncated.chunks() == m);
      check_boxes(truncated, summaries, d);
    }
}

TEST_CASE("chunk index: best-first search returns exactly the flat scan's top chunks, ties included") {
  std::mt19937 rng(7);
  auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  int cases = 0;
  for (int d : {4, 16})
    for (int fanout : {2, 3, 16})
      for (std::int64_t n : {1, 7, 16, 40, 300, 1000}) {
        const auto summaries = random_summaries(n, d, static_cast<std::uint32_t>(100 + n + d));
        const bound_tree tree = tree_of(summaries, d, n, fanout);
        bound_search_scratch scratch;
        scratch.reserve(n, fanout);
        std::vector<std::int32_t> out(static_cast<std::size_t>(n));
        for (int trial = 0; trial < 25; ++trial, ++cases) {
          const auto q = test::random_floats(static_cast<std::size_t>(d), static_cast<std::uint32_t>(rng()));
          const std::int64_t first = uniform(0, n - 1), end = uniform(first + 1, n);
          const auto wanted = static_cast<std::size_t>(uniform(1, std::min<std::int64_t>(end - first + 2, 40)));
          CAPTURE(n);
          CAPTURE(fanout);
          CAPTURE(first);
          CAPTURE(end);
          CAPTURE(wanted);
          bound_search::stats read;
          const std::size_t found = bound_search::top(tree, {summaries.data(), n, 2 * d}, q.data(), first, end, wanted, out, scratch, &read);
          const auto expected = flat_top(summaries, d, q.data(), first, end, wanted);
          CHECK(std::vector<std::int32_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found)) == expected);
          CHECK(read.chunks <= end - first);  // every chunk scored at most once
        }
      }
  CHECK(cases == 2 * 3 * 6 * 25);
}

TEST_CASE("chunk index: the selection it gives equals sink_local_topk_selector's over every chunk's score") {
  const int d = 16, fanout = 16, budget = 8, sinks = 1, locals = 2;
  const std::int64_t n = 2000;
  const auto summaries = random_summaries(n, d, 5);
  const bound_tree tree = tree_of(summaries, d, n, fanout);
  bound_search_scratch scratch;
  scratch.reserve(n, fanout);
  std::vector<std::int32_t> found(budget), selected(budget), candidates(static_cast<std::size_t>(n));
  for (std::int64_t query_chunk : {std::int64_t{budget}, std::int64_t{50}, n - 1, n}) {
    const auto q = test::random_floats(static_cast<std::size_t>(d), static_cast<std::uint32_t>(query_chunk));
    std::vector<float> scores(static_cast<std::size_t>(query_chunk));
    for (std::int64_t c = 0; c < query_chunk; ++c) {
      const float* lo = summaries.data() + c * 2 * d;
      scores[static_cast<std::size_t>(c)] = detail::bound_dot(q.data(), lo, lo + d, d);
    }
    const std::size_t count = sink_local_topk_selector{}.select({query_chunk, budget, sinks, locals}, scores, selected, candidates);
    const std::size_t wanted = budget - sinks - locals;
    const std::size_t n_found =
        bound_search::top(tree, {summaries.data(), n, 2 * d}, q.data(), sinks, query_chunk - locals + 1, wanted, found, scratch);
    REQUIRE(n_found == wanted);
    std::sort(found.begin(), found.begin() + static_cast<std::ptrdiff_t>(n_found));
    CAPTURE(query_chunk);
    CHECK(std::equal(found.begin(), found.begin() + static_cast<std::ptrdiff_t>(n_found), selected.begin() + sinks));
    CHECK(count == static_cast<std::size_t>(budget));
  }
}

TEST_CASE("chunk index: a query whose scores are spread reads a small part of the context") {
  // 4096 chunks of small random keys, each raised along the query by its own amount (most by
  // nearly nothing, a few by much, as a head's relevant chunks stand out), and one needle far
  // above them all: the boxes without a high chunk bound low scores and are never opened.
  const int d = 16, fanout = 16;
  const std::int64_t n = 4096, needle = 2901;
  auto summaries = random_summaries(n, d, 9);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (std::int64_t c = 0; c < n; ++c) {
    const float raise = 4.0f * std::pow(uniform(rng), 16.0f);
    for (int i = 0; i < 2 * d; ++i) summaries[static_cast<std::size_t>(c * 2 * d + i)] = 0.1f * summaries[static_cast<std::size_t>(c * 2 * d + i)] + raise;
  }
  for (int i = 0; i < d; ++i) summaries[static_cast<std::size_t>(needle * 2 * d + d + i)] = 8.0f;  // hi
  const bound_tree tree = tree_of(summaries, d, n, fanout);
  bound_search_scratch scratch;
  scratch.reserve(n, fanout);
  std::vector<std::int32_t> out(4);
  const std::vector<float> q(d, 1.0f);
  bound_search::stats read;
  const std::size_t found = bound_search::top(tree, {summaries.data(), n, 2 * d}, q.data(), 1, n - 1, 4, out, scratch, &read);
  REQUIRE(found == 4);
  CHECK(out[0] == needle);
  CHECK(std::vector<std::int32_t>(out.begin(), out.end()) == flat_top(summaries, d, q.data(), 1, n - 1, 4));
  MESSAGE("summaries read: " << read.boxes << " boxes + " << read.chunks << " chunks of " << n);
  CHECK(read.boxes + read.chunks < n / 4);
}
