// The chunk index (chunk_index.hpp) against the flat scan it must reproduce exactly: the same
// chunks, in the same order, ties to the lower chunk, as sink_local_topk_selector picks them from
// every chunk's bound score.
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <algorithm>
#include <cstring>
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

namespace {
/// The beam search stated directly: the box of a node is the min and max over its chunks,
/// computed from the summaries (no tree); per level, the `beam` best nodes wholly inside
/// [first, end) by (bound desc, index asc) and every node cut by the range are opened.
std::vector<std::int32_t> naive_beam_top(const std::vector<float>& summaries, int d, std::int64_t n, int fanout, const float* q,
                                         std::int64_t first, std::int64_t end, std::size_t wanted, int beam) {
  end = std::min(end, n);
  if (first >= end || wanted == 0) return {};
  int levels = 0;
  std::int64_t top_span = 1;
  while (top_span < n) top_span *= fanout, ++levels;
  auto span_of = [&](int level) {
    std::int64_t s = 1;
    for (int l = 0; l < level; ++l) s *= fanout;
    return s;
  };
  auto bound_of = [&](int level, std::int64_t index) {
    const std::int64_t lo_chunk = index * span_of(level), hi_chunk = std::min(n, lo_chunk + span_of(level));
    std::vector<float> box(summaries.begin() + lo_chunk * 2 * d, summaries.begin() + (lo_chunk + 1) * 2 * d);
    for (std::int64_t c = lo_chunk + 1; c < hi_chunk; ++c)
      for (int i = 0; i < d; ++i) {
        box[static_cast<std::size_t>(i)] = std::min(box[static_cast<std::size_t>(i)], summaries[static_cast<std::size_t>(c * 2 * d + i)]);
        box[static_cast<std::size_t>(d + i)] = std::max(box[static_cast<std::size_t>(d + i)], summaries[static_cast<std::size_t>(c * 2 * d + d + i)]);
      }
    const float b = detail::bound_dot(q, box.data(), box.data() + d, d);
    return std::isnan(b) ? (level == 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity()) : b;
  };
  std::vector<std::int64_t> nodes;
  for (std::int64_t b = 0; b * span_of(levels) < n; ++b) nodes.push_back(b);
  for (int level = levels; level >= 0; --level) {
    std::vector<std::pair<float, std::int64_t>> inside;
    std::vector<std::int64_t> cut;
    for (std::int64_t b : nodes) {
      const std::int64_t lo_chunk = b * span_of(level), hi_chunk = std::min(n, lo_chunk + span_of(level));
      if (hi_chunk <= first || lo_chunk >= end) continue;
      if (lo_chunk >= first && lo_chunk + span_of(level) <= end) inside.push_back({bound_of(level, b), b});  // all F^l chunks inside
      else cut.push_back(b);
    }
    std::sort(inside.begin(), inside.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    if (level == 0) {
      std::vector<std::int32_t> out;
      for (std::size_t i = 0; i < std::min(wanted, inside.size()); ++i) out.push_back(static_cast<std::int32_t>(inside[i].second));
      return out;
    }
    std::vector<std::int64_t> opened = cut;
    for (std::size_t i = 0; i < std::min<std::size_t>(static_cast<std::size_t>(beam), inside.size()); ++i) opened.push_back(inside[i].second);
    nodes.clear();
    for (std::int64_t b : opened)
      for (std::int64_t child = b * fanout; child < (b + 1) * fanout && child * span_of(level - 1) < n; ++child) nodes.push_back(child);
  }
  return {};
}
}  // namespace

TEST_CASE("chunk index: the beam search is its direct statement, causal, and the flat scan when the beam holds every box") {
  std::mt19937 rng(17);
  auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  int cases = 0, differed = 0;
  for (int fanout : {2, 3, 16})
    for (std::int64_t n : {1, 7, 16, 40, 300, 1000})
      for (int beam : {1, 3, 8}) {
        const int d = 8;
        const auto summaries = random_summaries(n, d, static_cast<std::uint32_t>(300 + n + fanout));
        const bound_tree tree = tree_of(summaries, d, n, fanout);
        bound_search_scratch scratch, wide_scratch;
        scratch.reserve_beam(beam, fanout);
        const int every_box = static_cast<int>(n);  // wider than any level
        wide_scratch.reserve_beam(every_box, fanout);
        std::vector<std::int32_t> out(static_cast<std::size_t>(n) + 8), prefix_out(out.size());
        for (int trial = 0; trial < 20; ++trial, ++cases) {
          const auto q = test::random_floats(static_cast<std::size_t>(d), static_cast<std::uint32_t>(rng()));
          const std::int64_t first = uniform(0, n - 1), end = uniform(first + 1, n);
          const auto wanted = static_cast<std::size_t>(uniform(1, std::min<std::int64_t>(end - first + 2, 12)));
          CAPTURE(n);
          CAPTURE(fanout);
          CAPTURE(beam);
          CAPTURE(first);
          CAPTURE(end);
          CAPTURE(wanted);
          const matrix_view<const float> rows{summaries.data(), n, 2 * d};
          bound_search::stats read;
          const std::size_t found = beam_search::top(tree, rows, q.data(), first, end, wanted, beam, out, scratch, &read);
          const std::vector<std::int32_t> got(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found));
          CHECK(got == naive_beam_top(summaries, d, n, fanout, q.data(), first, end, wanted, beam));
          // Causal: a tree that holds only the chunks before `end` gives the same chunks.
          const bound_tree prefix_tree = tree_of(summaries, d, end, fanout);
          const std::size_t prefix_found = beam_search::top(prefix_tree, rows, q.data(), first, end, wanted, beam, prefix_out, scratch);
          CHECK(std::vector<std::int32_t>(prefix_out.begin(), prefix_out.begin() + static_cast<std::ptrdiff_t>(prefix_found)) == got);
          // Wide enough to hold every box: the flat scan's choice.
          const std::size_t wide = beam_search::top(tree, rows, q.data(), first, end, wanted, every_box, out, wide_scratch);
          CHECK(std::vector<std::int32_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(wide)) ==
                flat_top(summaries, d, q.data(), first, end, wanted));
          differed += got != flat_top(summaries, d, q.data(), first, end, wanted);
          // At most (beam + 2) F nodes a level, each scored once.
          CHECK(read.boxes + read.chunks <= std::int64_t{beam + 2} * fanout * (tree.levels() + 1) + fanout);
        }
      }
  CHECK(cases == 3 * 6 * 3 * 20);
  CHECK(differed > 0);  // narrow beams do miss chunks on random data: the test can tell them apart
}

TEST_CASE("chunk index: the beam search reads O(beam F log n) summaries, whatever the context") {
  const int d = 16, fanout = 16, beam = 16;
  for (std::int64_t n : {4096, 65536}) {
    const auto summaries = random_summaries(n, d, 21);
    const bound_tree tree = tree_of(summaries, d, n, fanout);
    bound_search_scratch scratch;
    scratch.reserve_beam(beam, fanout);
    std::vector<std::int32_t> out(5);
    const auto q = test::random_floats(static_cast<std::size_t>(d), 4);
    bound_search::stats read;
    REQUIRE(beam_search::top(tree, {summaries.data(), n, 2 * d}, q.data(), 1, n - 1, 5, beam, out, scratch, &read) == 5);
    CAPTURE(n);
    MESSAGE("beam search over " << n << " chunks read " << read.boxes << " boxes + " << read.chunks << " chunks");
    CHECK(read.boxes + read.chunks <= std::int64_t{beam + 2} * fanout * (tree.levels() + 1));
    CHECK(read.boxes + read.chunks < n / 4);
  }
}

TEST_CASE("chunk index: the certified search is the flat scan at epsilon 0, within epsilon beyond, causal, and counts its reads") {
  std::mt19937 rng(23);
  auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  int cases = 0, fewer_reads = 0, not_flat = 0;
  for (int fanout : {2, 4, 16})
    for (std::int64_t n : {1, 9, 50, 400, 2000})
      for (int beam : {1, 4}) {
        const int d = 8;
        const auto summaries = random_summaries(n, d, static_cast<std::uint32_t>(900 + n + fanout));
        const bound_tree tree = tree_of(summaries, d, n, fanout);
        bound_search_scratch scratch;
        scratch.reserve(n, fanout);
        scratch.reserve_beam(beam, fanout);
        std::vector<std::int32_t> out(static_cast<std::size_t>(n) + 16), prefix_out(out.size());
        const matrix_view<const float> rows{summaries.data(), n, 2 * d};
        for (int trial = 0; trial < 15; ++trial, ++cases) {
          const auto q = test::random_floats(static_cast<std::size_t>(d), static_cast<std::uint32_t>(rng()));
          const std::int64_t first = uniform(0, n - 1), end = uniform(first + 1, n);
          const auto wanted = static_cast<std::size_t>(uniform(1, std::min<std::int64_t>(end - first + 2, 12)));
          CAPTURE(n);
          CAPTURE(fanout);
          CAPTURE(first);
          CAPTURE(end);
          const std::vector<std::int32_t> flat = flat_top(summaries, d, q.data(), first, end, wanted);
          bound_search::stats read;
          std::size_t found = certified_search::top(tree, rows, q.data(), first, end, wanted, beam, 0.0f, out, scratch, &read);
          CHECK(std::vector<std::int32_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found)) == flat);
          fewer_reads += read.boxes + read.chunks < end - first;
          // Within epsilon: every chunk left out scores at most the k-th kept + epsilon.
          auto score = [&](std::int64_t c) {
            const float s = detail::bound_dot(q.data(), rows.row(c), rows.row(c) + d, d);
            return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
          };
          const float epsilon = 0.5f;
          found = certified_search::top(tree, rows, q.data(), first, end, wanted, beam, epsilon, out, scratch);
          const std::vector<std::int32_t> got(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found));
          REQUIRE(found == flat.size());
          for (std::int64_t c = first; c < end; ++c)
            if (std::find(got.begin(), got.end(), c) == got.end()) CHECK(score(c) <= score(got.back()) + epsilon);
          not_flat += got != flat;
          // Causal: a tree of the chunks before `end` only gives the same chunks.
          const bound_tree prefix_tree = tree_of(summaries, d, end, fanout);
          const std::size_t prefix_found = certified_search::top(prefix_tree, rows, q.data(), first, end, wanted, beam, epsilon, prefix_out, scratch);
          CHECK(std::vector<std::int32_t>(prefix_out.begin(), prefix_out.begin() + static_cast<std::ptrdiff_t>(prefix_found)) == got);
        }
      }
  CHECK(cases == 3 * 5 * 2 * 15);
  CHECK(fewer_reads > 0);  // where the scores are spread (random boxes of 4 keys), the certificate stops early
  CHECK(not_flat > 0);     // and epsilon 0.5 does give up some of the flat scan's chunks: the two modes differ
  MESSAGE(cases << " searches; the certificate read fewer summaries than the candidates in " << fewer_reads << ", epsilon 0.5 chose otherwise in "
                << not_flat);
}

TEST_CASE("selection fidelity: the output of the attention's own choice, masses against a double-precision reference, bad queries") {
  // A quest layer (key bounds, flat scan): its recorded selection fed to choice_output gives the
  // attention's own output; the masses are checked against keys rotated in double here.
  const int hq = 4, hkv = 2, d = 16, w = 8, budget = 5, T = 200;
  const attention_config config = test::make_config(hq, hkv, d, w, budget);
  const rope r(d, 10000.0, rope_layout::interleaved);
  attention<test::quest_policies> layer(config, r);
  const test::sequence seq(T, hq, hkv, d, 808);
  kv_cache cache = layer.make_cache();
  std::vector<std::int32_t> selections;
  const std::vector<float> out = seq.run(layer, cache, 37, &selections);
  const reference::problem pr = seq.problem(r);
  std::mt19937 rng(5);
  int checked = 0;
  for (int t = 8 * w; t < T; t += 7)
    for (int h = 0; h < hq; ++h) {
      const std::int64_t own = t / w;
      const fidelity_query query{h, t, seq.q.data() + (static_cast<std::size_t>(t) * hq + h) * d, config.sink_chunks, own - config.local_chunks + 1};
      std::vector<std::int32_t> chosen;  // the recorded chunks minus the sink and local ones
      for (int j = 0; j < budget; ++j) {
        const std::int32_t c = selections[(static_cast<std::size_t>(t) * hq + h) * budget + j];
        if (c >= query.first && c < query.end) chosen.push_back(c);
      }
      const std::vector<double> o = choice_output(cache, r, config, query, chosen);
      for (int i = 0; i < d; ++i) CHECK(std::abs(o[i] - out[(static_cast<std::size_t>(t) * hq + h) * d + i]) <= 1e-5);
      // Against itself: nothing lost.
      const choice_fidelity same = measure_choice(cache, r, config, query, chosen, chosen);
      CHECK(same.recall == 1.0);
      CHECK(same.mass_recall == 1.0);
      CHECK(same.output_difference == 0.0);
      // A random other choice: recall, and masses computed here in double (keys at their offset
      // in the chunk, the query one chunk behind its own).
      std::vector<std::int32_t> other;
      for (std::int64_t c = query.first; c < query.end; ++c)
        if (rng() % 3 == 0) other.push_back(static_cast<std::int32_t>(c));
      const choice_fidelity f = measure_choice(cache, r, config, query, chosen, other);
      std::size_t shared = 0;
      for (std::int32_t c : chosen) shared += std::count(other.begin(), other.end(), c);
      CHECK(f.recall == (chosen.empty() ? 1.0 : static_cast<double>(shared) / static_cast<double>(chosen.size())));
      auto mass = [&](const std::vector<std::int32_t>& chunks) {
        const std::vector<double> q_rot = pr.rotated(pr.query(t, h), t % w + w);
        double m = 0;
        for (std::int32_t c : chunks)
          for (int j = 0; j < w; ++j) {
            const std::vector<double> k_rot = pr.rotated(pr.key(c * w + j, h / (hq / hkv)), j);
            double s = 0;
            for (int i = 0; i < d; ++i) s += q_rot[i] * k_rot[i];
            m += std::exp(s / std::sqrt(static_cast<double>(d)));
          }
        return m;
      };
      if (!chosen.empty()) CHECK(f.mass_recall == doctest::Approx(mass(other) / mass(chosen)).epsilon(1e-5));
      ++checked;
    }
  CHECK(checked >= 80);
  const float* q0 = seq.q.data();
  const std::int32_t outside[] = {3};
  CHECK_THROWS_WITH_AS(measure_choice(cache, r, config, {0, T, q0, 1, 3}, outside, {}), doctest::Contains("is not a query of this cache"), shape_error);
  CHECK_THROWS_WITH_AS(measure_choice(cache, r, config, {0, 100, q0, 1, 3}, outside, {}), doctest::Contains("chunk 3 is not among the candidates [1, 3)"),
                       shape_error);
  CHECK_THROWS_WITH_AS(measure_choice(cache, r, config, {0, 100, q0, 1, 13}, {}, {}), doctest::Contains("must be full chunks before the query's chunk 12"),
                       shape_error);
}

namespace {
/// The k-means of one segment, written plainly (the reference key_clusters is held to): seeds
/// at members c S / C, `iterations` rounds of assign-then-average (sums in double, in chunk
/// order; an empty cluster keeps its centre), a last assignment; squared distances in double,
/// ties to the lower cluster.
std::vector<int> naive_owners(const std::vector<float>& summaries, int d, std::int64_t base, int segment, int clusters, int iterations) {
  const int r = 2 * d;
  auto row = [&](std::int64_t c) { return summaries.data() + c * r; };
  std::vector<std::vector<float>> centres;
  for (int c = 0; c < clusters; ++c) centres.emplace_back(row(base + std::int64_t{c} * segment / clusters), row(base + std::int64_t{c} * segment / clusters) + r);
  std::vector<int> owner(static_cast<std::size_t>(segment));
  for (int it = 0;; ++it) {
    for (int i = 0; i < segment; ++i) {
      double best = std::numeric_limits<double>::infinity();
      for (int c = 0; c < clusters; ++c) {
        double distance = 0;
        for (int j = 0; j < r; ++j) distance += (double{row(base + i)[j]} - centres[static_cast<std::size_t>(c)][static_cast<std::size_t>(j)]) *
                                                 (double{row(base + i)[j]} - centres[static_cast<std::size_t>(c)][static_cast<std::size_t>(j)]);
        if (distance < best) best = distance, owner[static_cast<std::size_t>(i)] = c;
      }
    }
    if (it == iterations) return owner;
    for (int c = 0; c < clusters; ++c) {
      std::vector<double> sum(static_cast<std::size_t>(r), 0.0);
      int count = 0;
      for (int i = 0; i < segment; ++i)
        if (owner[static_cast<std::size_t>(i)] == c) {
          ++count;
          for (int j = 0; j < r; ++j) sum[static_cast<std::size_t>(j)] += row(base + i)[j];
        }
      if (count > 0)
        for (int j = 0; j < r; ++j) centres[static_cast<std::size_t>(c)][static_cast<std::size_t>(j)] = static_cast<float>(sum[static_cast<std::size_t>(j)] / count);
    }
  }
}

key_clusters clusters_of(const std::vector<float>& summaries, int d, std::int64_t n, int segment, int clusters, int iterations) {
  key_clusters index(d, segment, clusters, iterations);
  index.reserve(n);
  for (std::int64_t c = 0; c < n; ++c) index.append({summaries.data(), c + 1, 2 * d});
  return index;
}

/// Whether two clusterings hold the same bits (members and boxes of every cluster).
bool same_clusters(const key_clusters& a, const key_clusters& b, int d) {
  if (a.chunks() != b.chunks() || a.segments() != b.segments()) return false;
  for (std::int64_t g = 0; g < a.segments() * a.clusters_per_segment(); ++g) {
    const auto ma = a.members(g), mb = b.members(g);
    if (!std::equal(ma.begin(), ma.end(), mb.begin(), mb.end())) return false;
    if (!ma.empty() && std::memcmp(a.box(g), b.box(g), sizeof(float) * 2 * static_cast<std::size_t>(d)) != 0) return false;
  }
  if (a.blocks() != b.blocks()) return false;
  for (std::int64_t h = 0; h < a.blocks() * a.sections_per_block(); ++h) {
    const auto ga = a.section(h), gb = b.section(h);
    if (!std::equal(ga.begin(), ga.end(), gb.begin(), gb.end())) return false;
    if (std::memcmp(a.section_box(h), b.section_box(h), sizeof(float) * 2 * static_cast<std::size_t>(d)) != 0 ||
        std::memcmp(a.section_centre(h), b.section_centre(h), sizeof(float) * 2 * static_cast<std::size_t>(d)) != 0)
      return false;
  }
  return true;
}

/// The levels of a layout (S, C), fed the first n chunks.
std::vector<key_clusters> levels_of(const std::vector<float>& summaries, int d, std::int64_t n, int segment, int clusters, int iterations) {
  std::vector<key_clusters> levels;
  for_each_cluster_level(segment, clusters, [&](int size, int count) { levels.push_back(clusters_of(summaries, d, n, size, count, iterations)); });
  return levels;
}

/// The flat scan's ranking, written plainly: a chunk's score (NaN as -inf) and the `wanted` best
/// of a set of chunks (score descending, ties to the lower chunk).
struct flat_ranking {
  const std::vector<float>& summaries;
  int d;
  const float* q;
  std::size_t wanted;
  float score(std::int64_t c) const {
    const float s = detail::bound_dot(q, summaries.data() + c * 2 * d, summaries.data() + c * 2 * d + d, d);
    return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  }
  std::vector<std::int32_t> best_of(std::vector<std::int32_t> ids) const {
    std::sort(ids.begin(), ids.end());
    std::stable_sort(ids.begin(), ids.end(), [&](std::int32_t a, std::int32_t b) { return score(a) > score(b); });
    ids.resize(std::min(wanted, ids.size()));
    return ids;
  }
};

/// The probe rule stated directly: [0, end) covered by the largest segments wholly before
/// end - S / 8 (clustered by then), then the next level's from there, ...; the tail after them scored; the covering segments'
/// clusters with a member >= first in order of box bound (NaN as +inf; ties to the larger
/// segments, then the lower cluster), each opened unless the best `wanted` found so far are
/// complete and the k-th beats its bound, or `probe` chunks were scored in clusters; the answer
/// the flat scan's ranking of everything scored.
std::vector<std::int32_t> naive_cluster_top(const std::vector<float>& summaries, int d, const std::vector<key_clusters>& levels, const float* q,
                                            std::int64_t first, std::int64_t end, std::size_t wanted, std::int64_t probe) {
  const flat_ranking ranking{summaries, d, q, wanted};
  auto score = [&](std::int64_t c) { return ranking.score(c); };
  auto best_of = [&](std::vector<std::int32_t> ids) { return ranking.best_of(std::move(ids)); };
  std::vector<std::int32_t> scored;
  std::vector<std::pair<float, std::span<const std::int32_t>>> order;
  std::int64_t covered = 0;
  for (const key_clusters& level : levels) {
    const std::int64_t size = level.segment_chunks();
    const std::int64_t from = covered / size, to = std::min(level.segments(), std::max<std::int64_t>(0, end - size / 8) / size);
    for (std::int64_t g = from * level.clusters_per_segment(); g < to * level.clusters_per_segment(); ++g) {
      const auto m = level.members(g);
      if (m.empty() || m.back() < first) continue;
      const float b = detail::bound_dot(q, level.box(g), level.box(g) + d, d);
      order.push_back({std::isnan(b) ? std::numeric_limits<float>::infinity() : b, m});
    }
    covered = std::max(covered, to * size);
  }
  for (std::int64_t c = std::max(first, covered); c < end; ++c) scored.push_back(static_cast<std::int32_t>(c));
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::int64_t probed = 0;
  for (const auto& [bound, members] : order) {
    const auto kept = best_of(scored);
    if (probed >= probe || (kept.size() == wanted && bound < score(kept.back()))) break;
    for (std::int32_t c : members)
      if (c >= first) scored.push_back(c), ++probed;
  }
  return best_of(scored);
}

/// The box-and-centre probe order stated directly: the sections of the covering segments'
/// whole blocks (8 segments from a multiple of 8) and the other covering segments' groups live
/// (a section of one group as that group, a group of one cluster as that cluster), each with its
/// box bound and its centre's score (NaN as +inf); turn by turn, box first: stop when nothing is
/// live, when the best `wanted` found are complete and the k-th beats the best live box bound,
/// or when `probe` chunks were scored; else take the best live entry by the turn's key (ties:
/// sections, then groups, then larger segments, then the lower id), a section's groups or a
/// group's clusters with a member >= first becoming live, a cluster's members >= first scored. The answer: the flat scan's ranking of everything scored.
std::vector<std::int32_t> naive_mixed_top(const std::vector<float>& summaries, int d, const std::vector<key_clusters>& levels, const float* q,
                                          std::int64_t first, std::int64_t end, std::size_t wanted, std::int64_t probe) {
  const flat_ranking ranking{summaries, d, q, wanted};
  auto score = [&](std::int64_t c) { return ranking.score(c); };
  auto best_of = [&](std::vector<std::int32_t> ids) { return ranking.best_of(std::move(ids)); };
  auto bound = [&](const float* box) {
    const float b = detail::bound_dot(q, box, box + d, d);
    return std::isnan(b) ? std::numeric_limits<float>::infinity() : b;
  };
  enum kind { cluster, group, section };  // at equal keys the larger first
  struct item {
    float box, centre;
    kind what;
    int level;
    std::int64_t id;
  };
  std::vector<item> live;
  auto add = [&](int l, std::int64_t id, kind what) {
    const key_clusters& level = levels[static_cast<std::size_t>(l)];
    const float* box = what == cluster ? level.box(id) : what == group ? level.group_box(id) : level.section_box(id);
    const float* centre = what == cluster ? level.centre(id) : what == group ? level.group_centre(id) : level.section_centre(id);
    live.push_back({bound(box), bound(centre), what, l, id});
  };
  auto add_group = [&](int l, std::int64_t e) {  // a group of one cluster as that cluster
    const key_clusters& level = levels[static_cast<std::size_t>(l)];
    const auto g = level.group(e);
    if (g.size() == 1 && level.members(g[0]).back() >= first) add(l, g[0], cluster);
    if (g.size() > 1) add(l, e, group);
  };
  std::vector<std::int32_t> scored;
  std::int64_t covered = 0;
  for (int l = 0; l < static_cast<int>(levels.size()); ++l) {
    const key_clusters& level = levels[static_cast<std::size_t>(l)];
    const std::int64_t size = level.segment_chunks();
    const std::int64_t from = covered / size, to = std::min(level.segments(), std::max<std::int64_t>(0, end - size / 8) / size);
    for (std::int64_t s = from; s < to; ++s) {
      const std::int64_t block = s / key_clusters::block_segments;
      const bool whole_block = block * key_clusters::block_segments >= from && (block + 1) * key_clusters::block_segments <= to;
      if (!whole_block) {
        for (std::int64_t e = s * level.groups_per_segment(); e < (s + 1) * level.groups_per_segment(); ++e) add_group(l, e);
      } else if (s % key_clusters::block_segments == 0) {  // a section of one group as that group
        for (std::int64_t h = block * level.sections_per_block(); h < (block + 1) * level.sections_per_block(); ++h) {
          if (level.section(h).size() == 1) add_group(l, level.section(h)[0]);
          if (level.section(h).size() > 1) add(l, h, section);
        }
      }
    }
    covered = std::max(covered, to * size);
  }
  for (std::int64_t c = std::max(first, covered); c < end; ++c) scored.push_back(static_cast<std::int32_t>(c));
  auto best_by = [&](bool by_centre) {
    std::size_t best = 0;
    for (std::size_t i = 1; i < live.size(); ++i) {
      const item &a = live[i], &b = live[best];
      const float ka = by_centre ? a.centre : a.box, kb = by_centre ? b.centre : b.box;
      if (ka != kb ? ka > kb : a.what != b.what ? a.what > b.what : a.level != b.level ? a.level < b.level : a.id < b.id) best = i;
    }
    return best;
  };
  std::int64_t probed = 0;
  for (bool centre_turn = false; !live.empty() && probed < probe; centre_turn = !centre_turn) {
    const auto kept = best_of(scored);
    if (kept.size() == wanted && live[best_by(false)].box < score(kept.back())) break;
    const std::size_t at = best_by(centre_turn);
    const item taken = live[at];
    live.erase(live.begin() + static_cast<std::ptrdiff_t>(at));
    const key_clusters& level = levels[static_cast<std::size_t>(taken.level)];
    if (taken.what == section) {
      for (std::int32_t e : level.section(taken.id)) add_group(taken.level, e);
      continue;
    }
    if (taken.what == group) {
      for (std::int32_t g : level.group(taken.id))
        if (!level.members(g).empty() && level.members(g).back() >= first) add(taken.level, g, cluster);
      continue;
    }
    for (std::int32_t c : level.members(taken.id))
      if (c >= first) scored.push_back(c), ++probed;
  }
  return best_of(scored);
}
}  // namespace

TEST_CASE("key clusters: each segment split by its plainly written k-means, boxes bounding the members, the same bits however grown") {
  for (int segment : {5, 16, 64})
    for (int clusters : {1, 3, 5, 17})  // 17: two groups
      for (int iterations : {0, 1, 6}) {
        if (clusters > segment) continue;
        const int d = 6;
        const std::int64_t n = 9 * segment + segment / 8 + 3;  // 9 segments (a block and one), the last clustered over the S / 8 after it
        const auto summaries = random_summaries(n, d, static_cast<std::uint32_t>(segment * 100 + clusters * 10 + iterations));
        CAPTURE(segment);
        CAPTURE(clusters);
        CAPTURE(iterations);
        const key_clusters index = clusters_of(summaries, d, n, segment, clusters, iterations);
        REQUIRE(index.segments() == 9);
        REQUIRE(index.blocks() == 1);
        // Sections: every non-empty group of the block in exactly one, its box inside the
        // section's; the centre its groups' centres weighted by their members, in double.
        std::vector<std::int32_t> sectioned, nonempty_groups;
        for (std::int64_t e = 0; e < 8 * index.groups_per_segment(); ++e)
          if (!index.group(e).empty()) nonempty_groups.push_back(static_cast<std::int32_t>(e));
        for (int h = 0; h < index.sections_per_block(); ++h) {
          const auto groups = index.section(h);
          CHECK(std::is_sorted(groups.begin(), groups.end()));
          std::vector<double> sum(static_cast<std::size_t>(2 * d), 0.0);
          std::int64_t count = 0;
          for (std::int32_t e : groups) {
            sectioned.push_back(e);
            std::int64_t weight = 0;
            for (std::int32_t c : index.group(e)) weight += static_cast<std::int64_t>(index.members(c).size());
            for (int j = 0; j < 2 * d; ++j) sum[static_cast<std::size_t>(j)] += static_cast<double>(weight) * index.group_centre(e)[j];
            count += weight;
            for (int i = 0; i < d; ++i) {
              CHECK(index.section_box(h)[i] <= index.group_box(e)[i]);
              CHECK(index.section_box(h)[d + i] >= index.group_box(e)[d + i]);
            }
          }
          for (int j = 0; j < 2 * d; ++j)
            CHECK(index.section_centre(h)[j] == (count == 0 ? 0.0f : static_cast<float>(sum[static_cast<std::size_t>(j)] / static_cast<double>(count))));
        }
        std::sort(sectioned.begin(), sectioned.end());
        CHECK(sectioned == nonempty_groups);
        for (std::int64_t s = 0; s < index.segments(); ++s) {
          const std::vector<int> owner = naive_owners(summaries, d, s * segment, segment, clusters, iterations);
          std::int64_t seen = 0;
          for (int c = 0; c < clusters; ++c) {
            const auto members = index.members(s * clusters + c);
            std::vector<std::int32_t> expected;
            for (int i = 0; i < segment; ++i)
              if (owner[static_cast<std::size_t>(i)] == c) expected.push_back(static_cast<std::int32_t>(s * segment + i));
            CHECK(std::vector<std::int32_t>(members.begin(), members.end()) == expected);
            seen += static_cast<std::int64_t>(members.size());
            // The centre: the members' mean, summed in double in chunk order.
            for (int j = 0; j < 2 * d; ++j) {
              double sum = 0;
              for (std::int32_t m : expected) sum += summaries[static_cast<std::size_t>(m * 2 * d + j)];
              CHECK(index.centre(s * clusters + c)[j] == (expected.empty() ? 0.0f : static_cast<float>(sum / static_cast<double>(expected.size()))));
            }
            for (std::int32_t m : members)
              for (int i = 0; i < d; ++i) {
                CHECK(index.box(s * clusters + c)[i] <= summaries[static_cast<std::size_t>(m * 2 * d + i)]);
                CHECK(index.box(s * clusters + c)[d + i] >= summaries[static_cast<std::size_t>(m * 2 * d + d + i)]);
              }
          }
          CHECK(seen == segment);
          // Groups: every non-empty cluster of the segment in exactly one, its box inside the group's.
          std::vector<std::int32_t> grouped;
          for (int e = 0; e < index.groups_per_segment(); ++e) {
            const auto g = index.group(s * index.groups_per_segment() + e);
            CHECK(std::is_sorted(g.begin(), g.end()));
            for (int j = 0; j < 2 * d; ++j) {  // the group's centre: the mean of its clusters' members
              double sum = 0;
              std::int64_t count = 0;
              for (std::int32_t c : g)
                for (std::int32_t m : index.members(c)) sum += summaries[static_cast<std::size_t>(m * 2 * d + j)], ++count;
              CHECK(index.group_centre(s * index.groups_per_segment() + e)[j] == (count == 0 ? 0.0f : static_cast<float>(sum / static_cast<double>(count))));
            }
            for (std::int32_t c : g) {
              grouped.push_back(c);
              for (int i = 0; i < d; ++i) {
                CHECK(index.group_box(s * index.groups_per_segment() + e)[i] <= index.box(c)[i]);
                CHECK(index.group_box(s * index.groups_per_segment() + e)[d + i] >= index.box(c)[d + i]);
              }
            }
          }
          std::sort(grouped.begin(), grouped.end());
          std::vector<std::int32_t> used;
          for (int c = 0; c < clusters; ++c)
            if (!index.members(s * clusters + c).empty()) used.push_back(static_cast<std::int32_t>(s * clusters + c));
          CHECK(grouped == used);
        }
        // Truncated into a segment and grown again: the bits of growing it once.
        key_clusters rewound = index;
        rewound.truncate(2 * segment - 1);
        CHECK(rewound.segments() == 1);
        CHECK(same_clusters(rewound, clusters_of(summaries, d, 2 * segment - 1, segment, clusters, iterations), d));
        for (std::int64_t c = rewound.chunks(); c < n; ++c) rewound.append({summaries.data(), c + 1, 2 * d});
        CHECK(same_clusters(rewound, index, d));
        // Spread over the S / 8 chunks after it: a segment is clustered on the last of them, not
        // before; truncated back into those chunks it is clustered again, to the same bits.
        const std::int64_t delay = index.clustering_delay();
        CHECK(delay == segment / 8);
        // Into the block's last segment's delay: the block's sections go with it and come back.
        for (std::int64_t at : {std::int64_t{2} * segment, 2 * segment + delay - 1, 2 * segment + delay, 8 * segment + delay - 1, 8 * segment + delay}) {
          CAPTURE(at);
          const key_clusters fed = clusters_of(summaries, d, at, segment, clusters, iterations);
          CHECK(fed.segments() == (at - delay) / segment);
          key_clusters back = index;
          back.truncate(at);
          CHECK(back.segments() == fed.segments());
          CHECK(same_clusters(back, fed, d));
          for (std::int64_t c = back.chunks(); c < n; ++c) back.append({summaries.data(), c + 1, 2 * d});
          CHECK(same_clusters(back, index, d));
        }
      }
}

TEST_CASE("key clusters: the search is the flat scan with an unlimited probe, its probe rule stated directly otherwise, causal, and held to a read budget") {
  std::mt19937 rng(29);
  auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  int cases = 0, differed = 0, certified_early = 0, fewer_boxes = 0, mixed_differed = 0, sections_of_several = 0, budget_bound = 0;
  // Layouts of one level, of two ((32, 8) -> (4, 1)) and of three ((128, 16) -> (16, 2) -> (2, 0):
  // two, the third has no cluster), one whose second level cannot tile the first ((12, 8)), and
  // one of two groups a segment and up to 5 blocks ((16, 16): sections of several groups).
  for (auto [segment, clusters] : {std::pair{4, 1}, std::pair{32, 4}, std::pair{32, 8}, std::pair{128, 16}, std::pair{12, 8}, std::pair{16, 16}})
    for (std::int64_t n : {1, 9, 100, 700}) {
        const int d = 8;
        const auto summaries = random_summaries(n, d, static_cast<std::uint32_t>(1300 + n + segment + clusters));
        const std::vector<key_clusters> index = levels_of(summaries, d, n, segment, clusters, 4);
        for (const key_clusters& level : index)
          for (std::int64_t h = 0; h < level.blocks() * level.sections_per_block(); ++h) sections_of_several += level.section(h).size() > 1;
        const matrix_view<const float> rows{summaries.data(), n, 2 * d};
        bound_search_scratch scratch;
        scratch.reserve(n, 2);
        scratch.reserve_marks(cluster_search::marks_needed(index));
        scratch.reserve_kept(12);
        std::vector<std::int32_t> out(16);
        for (int trial = 0; trial < 20; ++trial, ++cases) {
          const auto q = test::random_floats(static_cast<std::size_t>(d), static_cast<std::uint32_t>(rng()));
          const std::int64_t first = uniform(0, n - 1), end = uniform(first + 1, n);
          const auto wanted = static_cast<std::size_t>(uniform(1, std::min<std::int64_t>(end - first + 2, 12)));
          CAPTURE(n);
          CAPTURE(segment);
          CAPTURE(first);
          CAPTURE(end);
          CAPTURE(wanted);
          auto run = [&](const std::vector<key_clusters>& with, std::int64_t probe, bound_search::stats* read = nullptr,
                         cluster_probe order = cluster_probe::box_bound) {
            const std::size_t found = cluster_search::top(with, rows, q.data(), first, end, wanted, probe, out, scratch, read, order);
            return std::vector<std::int32_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found));
          };
          const auto flat = flat_top(summaries, d, q.data(), first, end, wanted);
          bound_search::stats read;
          CHECK(run(index, std::numeric_limits<std::int64_t>::max(), &read) == flat);
          certified_early += read.chunks < end - first;
          std::int64_t clusters_covering = 0;  // at most: every cluster of every segment before end
          for (const key_clusters& level : index) clusters_covering += std::min(level.segments(), end / level.segment_chunks()) * level.clusters_per_segment();
          fewer_boxes += read.boxes < clusters_covering;
          for (std::int64_t probe : {std::int64_t{0}, std::int64_t{3}, std::int64_t{40}}) {
            const auto got = run(index, probe);
            CHECK(got == naive_cluster_top(summaries, d, index, q.data(), first, end, wanted, probe));
            // Causal: clusters of the chunks before `end` only give the same chunks.
            CHECK(run(levels_of(summaries, d, end, segment, clusters, 4), probe) == got);
            differed += got != flat;
            // Box bound and centre score in turn: its rule stated directly, causal too.
            const auto mixed = run(index, probe, nullptr, cluster_probe::box_and_centre);
            CHECK(mixed == naive_mixed_top(summaries, d, index, q.data(), first, end, wanted, probe));
            CHECK(run(levels_of(summaries, d, end, segment, clusters, 4), probe, nullptr, cluster_probe::box_and_centre) == mixed);
            mixed_differed += mixed != got;
          }
          // Unlimited, the mixed order certifies the flat scan's choice too.
          CHECK(run(index, std::numeric_limits<std::int64_t>::max(), nullptr, cluster_probe::box_and_centre) == flat);
          // A read budget: none binding (the unbudgeted search's reads) changes nothing; a
          // smaller one reads no more than it plus one turn (a cluster's members or a group's or
          // section's entries, box and centre each), beyond what is read before the first turn
          // (the covering entries and the tail), and never more than a larger budget.
          for (const cluster_probe order : {cluster_probe::box_bound, cluster_probe::box_and_centre}) {
            const std::int64_t probe = 40;
            auto budgeted = [&](std::int64_t budget, bound_search::stats& read) {
              const std::size_t found = cluster_search::top(index, rows, q.data(), first, end, wanted, probe, out, scratch, &read, order, budget);
              return std::vector<std::int32_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(found));
            };
            bound_search::stats unbudgeted, at_zero;
            const auto free = run(index, probe, &unbudgeted, order);
            CHECK(budgeted(unbudgeted.boxes + unbudgeted.chunks, read = {}) == free);
            CHECK(read.boxes == unbudgeted.boxes);
            CHECK(read.chunks == unbudgeted.chunks);
            budgeted(0, at_zero);  // no turn: what every search reads first
            std::int64_t widest_turn = 0;  // a cluster's members, or two summaries per entry a group or section holds
            for (const key_clusters& level : index) {
              for (std::int64_t c = 0; c < level.segments() * level.clusters_per_segment(); ++c)
                widest_turn = std::max<std::int64_t>(widest_turn, static_cast<std::int64_t>(level.members(c).size()));
              for (std::int64_t e = 0; e < level.segments() * level.groups_per_segment(); ++e)
                widest_turn = std::max<std::int64_t>(widest_turn, 2 * static_cast<std::int64_t>(level.group(e).size()));
              for (std::int64_t h = 0; h < level.blocks() * level.sections_per_block(); ++h)
                widest_turn = std::max<std::int64_t>(widest_turn, 2 * static_cast<std::int64_t>(level.section(h).size()));
            }
            std::int64_t previous = at_zero.boxes + at_zero.chunks;
            for (const std::int64_t budget : {1, 7, 30, 100}) {
              budgeted(budget, read = {});
              const std::int64_t spent = read.boxes + read.chunks;
              CHECK(spent <= std::max(budget, at_zero.boxes + at_zero.chunks) + widest_turn);
              CHECK(spent >= previous);
              CHECK(spent <= unbudgeted.boxes + unbudgeted.chunks);
              budget_bound += spent < unbudgeted.boxes + unbudgeted.chunks;
              previous = spent;
            }
          }
        }
      }
  CHECK(cases == 6 * 4 * 20);
  CHECK(fewer_boxes > 0);  // groups spare bounding every cluster
  CHECK(differed > 0);         // a small probe misses chunks: the test tells the rule from the flat scan
  CHECK(certified_early > 0);  // and the certificate stops before every chunk is read
  CHECK(mixed_differed > 0);   // the centre turns open other clusters than the box order
  CHECK(sections_of_several > 0);  // the searches went through sections of several groups
  CHECK(budget_bound > 0);         // and read budgets stopped searches short
  MESSAGE(cases << " searches; unlimited, the certificate stopped early in " << certified_early << "; a limited probe differed from the flat scan in "
                << differed << " of " << 3 * cases);
}
