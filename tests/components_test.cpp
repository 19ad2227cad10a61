// Encoder, scorer, selector, remapper: each against its naive reference, and the concept
// contract run over every shipped implementation.
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <longheads/reference/components.hpp>
#include <longheads/reference/rope.hpp>

using namespace longheads;

namespace {
template <class Encoder>
std::vector<double> expected_representation(const reference::matrix& q, const reference::matrix& k, const reference::matrix& v) {
  if constexpr (std::is_same_v<Encoder, mean_key_encoder>) return reference::mean_key(k);
  else if constexpr (std::is_same_v<Encoder, key_bounds_encoder>) return reference::key_bounds(k);
  else if constexpr (std::is_same_v<Encoder, representative_keys_encoder>) return reference::representative_keys(q, k, 2);
  else return reference::attention_pooled_key(q, k, v);
}

reference::matrix to_matrix(const std::vector<float>& x, int rows, int cols, int row_stride, int offset = 0) {
  reference::matrix m(static_cast<std::size_t>(rows));
  for (int r = 0; r < rows; ++r)
    m[r].assign(x.begin() + offset + r * row_stride, x.begin() + offset + r * row_stride + cols);
  return m;
}
}  // namespace

TEST_CASE_TEMPLATE("chunk encoders match their naive references", Encoder, attention_pooled_encoder, mean_key_encoder, key_bounds_encoder,
                   representative_keys_encoder) {
  static_assert(chunk_encoder<Encoder>);
  for (auto [w, d] : {std::pair{2, 2}, {4, 8}, {16, 32}, {33, 18}, {64, 64}}) {
    CAPTURE(w);
    CAPTURE(d);
    attention_config cfg = test::make_config(3, 1, d, w, 4);
    const Encoder encoder{};
    // Queries strided as in the cache ([w][H_q][d], head 1 of 3), keys and values dense.
    const auto q = test::random_floats(static_cast<std::size_t>(w) * 3 * d, 11);
    const auto k = test::random_floats(static_cast<std::size_t>(w) * d, 12);
    const auto v = test::random_floats(static_cast<std::size_t>(w) * d, 13);
    std::vector<float> rep(encoder.representation_floats(cfg)), scratch(encoder.scratch_floats(cfg));
    const chunk_inputs in{{q.data() + d, w, d, 3 * d}, {k.data(), w, d}, {v.data(), w, d}, 1.0f / std::sqrt(float(d))};
    encoder.encode(in, rep, scratch);
    const auto Q = to_matrix(q, w, d, 3 * d, d), K = to_matrix(k, w, d, d), V = to_matrix(v, w, d, d);
    const auto expected = expected_representation<Encoder>(Q, K, V);
    REQUIRE(rep.size() == expected.size());
    CHECK(test::max_abs_diff(rep, expected) <= 1e-5);
  }
}

TEST_CASE_TEMPLATE("a piecewise encoder's pieces, run in order on one state, write encode()'s bits", Encoder, attention_pooled_encoder,
                   representative_keys_encoder) {
  static_assert(piecewise_chunk_encoder<Encoder>);
  for (auto [w, d] : {std::pair{2, 2}, {16, 8}, {20, 6}, {33, 18}, {64, 64}}) {
    CAPTURE(w);
    CAPTURE(d);
    const attention_config cfg = test::make_config(2, 1, d, w, 4);
    const Encoder encoder{};
    CHECK(encoder.pieces(cfg) == static_cast<std::size_t>((w + 15) / 16 + 1));  // a block of 16 rows each, then the end
    // Two chunks encoded in interleaved pieces, each with a state of its own and scratch that
    // the other's pieces overwrite in between, against encode() of each.
    std::vector<chunk_inputs> chunks;
    std::vector<std::vector<float>> data;
    for (std::uint32_t seed : {21u, 31u}) {
      for (std::uint32_t i = 0; i < 3; ++i) data.push_back(test::random_floats(static_cast<std::size_t>(w) * d, seed + i));
      const std::size_t at = data.size() - 3;
      chunks.push_back({{data[at].data(), w, d}, {data[at + 1].data(), w, d}, {data[at + 2].data(), w, d}, 1.0f / std::sqrt(float(d))});
    }
    const std::size_t r = encoder.representation_floats(cfg);
    std::vector<float> whole(2 * r), pieced(2 * r, -7.0f), states(2 * encoder.state_floats(cfg), 99.0f), scratch(encoder.scratch_floats(cfg));
    for (int c = 0; c < 2; ++c) encoder.encode(chunks[c], std::span<float>(whole).subspan(c * r, r), scratch);
    for (std::size_t piece = 0; piece < encoder.pieces(cfg); ++piece)
      for (int c = 0; c < 2; ++c) {
        const auto representation = std::span<float>(pieced).subspan(c * r, r);
        if (piece + 1 < encoder.pieces(cfg)) CHECK(representation[0] == -7.0f);  // written by the last piece only
        encoder.encode_piece(chunks[c], piece, std::span<float>(states).subspan(c * encoder.state_floats(cfg), encoder.state_floats(cfg)),
                             representation, scratch);
      }
    CHECK(std::memcmp(pieced.data(), whole.data(), pieced.size() * sizeof(float)) == 0);
  }
}

TEST_CASE_TEMPLATE("chunk scorers match a naive dot product", Scorer, raw_query_scorer, rotated_query_scorer) {
  static_assert(chunk_scorer<Scorer>);
  const int d = 24, m = 5, n = 7, w = 8, hq = 2;
  attention_config cfg = test::make_config(hq, 1, d, w, 4);
  rope r(d, 10000.0, rope_layout::interleaved);
  const Scorer scorer{};
  const auto q = test::random_floats(static_cast<std::size_t>(m) * hq * d, 21);   // [m][H_q][d], head 0
  const auto reps = test::random_floats(static_cast<std::size_t>(n) * hq * d, 22);  // [n][H_q][d], head 0
  std::vector<float> scores(static_cast<std::size_t>(m) * n), scratch(scorer.scratch_floats(cfg, m));
  const std::int64_t first = 37;
  scorer.score({{q.data(), m, d, hq * d}, first, {reps.data(), n, d, hq * d}, &r, w}, {scores.data(), m, n}, scratch);
  for (int i = 0; i < m; ++i) {
    std::vector<double> query(q.begin() + i * hq * d, q.begin() + i * hq * d + d);
    if constexpr (std::is_same_v<Scorer, rotated_query_scorer>)
      query = reference::rotate(query, static_cast<double>((first + i) % w + w), reference::inverse_frequencies(d, 10000.0),
                                rope_layout::interleaved);
    for (int c = 0; c < n; ++c) {
      std::vector<double> rep(reps.begin() + c * hq * d, reps.begin() + c * hq * d + d);
      CHECK(scores[i * n + c] == doctest::Approx(reference::dot(query, rep)).epsilon(1e-5));
    }
  }
}

TEST_CASE("the paper's selector matches a full sort, ties going to the lower chunk") {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 4000; ++trial) {
    // Small budgets (the one-pass top-k) and large ones (nth_element past 32 picks).
    const bool large = trial % 2 == 1;
    const int budget = 1 + static_cast<int>(rng() % (large ? 48 : 9));
    const int locals = 1 + static_cast<int>(rng() % budget);
    const int sinks = static_cast<int>(rng() % (budget - locals + 1));
    const std::int64_t i = static_cast<std::int64_t>(rng() % (large ? 120 : 40));
    // Few distinct values so ties are common.
    std::vector<float> scores(static_cast<std::size_t>(i));
    for (float& s : scores) s = static_cast<float>(rng() % 4);
    std::vector<std::int32_t> selected(static_cast<std::size_t>(budget)), scratch(static_cast<std::size_t>(i));
    const std::size_t n = sink_local_topk_selector{}.select({i, budget, sinks, locals}, scores, selected, scratch);
    const auto expected =
        reference::select_sink_local_topk(i, budget, sinks, locals, std::vector<double>(scores.begin(), scores.end()));
    REQUIRE(n == expected.size());
    CHECK(std::equal(expected.begin(), expected.end(), selected.begin()));
    // The properties, stated on their own.
    CHECK(n == static_cast<std::size_t>(std::min<std::int64_t>(i + 1, budget)));
    CHECK(std::is_sorted(selected.begin(), selected.begin() + static_cast<std::ptrdiff_t>(n)));
    CHECK(std::adjacent_find(selected.begin(), selected.begin() + static_cast<std::ptrdiff_t>(n)) == selected.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(selected[n - 1] == i);
    for (std::size_t s = 0; s < n; ++s) CHECK(selected[s] <= i);
    if (i + 1 > budget) {
      for (int c = 0; c < sinks; ++c) CHECK(selected[static_cast<std::size_t>(c)] == c);
      for (int l = 0; l < locals; ++l) CHECK(selected[n - 1 - static_cast<std::size_t>(l)] == i - l);
    }
  }
}

TEST_CASE("the selector ranks NaN scores last instead of breaking its sort") {
  std::vector<float> scores = {0, std::nanf(""), 3, std::nanf(""), 1, 2, std::nanf(""), 0};
  std::vector<std::int32_t> selected(4), scratch(8);
  const std::size_t n = sink_local_topk_selector{}.select({8, 4, 1, 2}, scores, selected, scratch);
  CHECK(n == 4);
  CHECK(selected == std::vector<std::int32_t>{0, 2, 7, 8});
}

TEST_CASE("the recent-chunks selector keeps sinks and the newest chunks") {
  std::vector<float> scores(20, 0.0f);
  std::vector<std::int32_t> selected(5), scratch(20);
  CHECK(recent_chunks_selector{}.select({20, 5, 1, 2}, scores, selected, scratch) == 5);
  CHECK(selected == std::vector<std::int32_t>{0, 17, 18, 19, 20});
  CHECK(recent_chunks_selector{}.select({3, 5, 1, 2}, scores, selected, scratch) == 4);
  CHECK(std::vector<std::int32_t>(selected.begin(), selected.begin() + 4) == std::vector<std::int32_t>{0, 1, 2, 3});
}

TEST_CASE("the contiguous remapper lays selected chunks side by side, the query in the last slot") {
  const std::vector<std::int32_t> selected = {0, 7, 12, 30, 31};
  std::vector<std::int64_t> starts(5);
  const std::int64_t p = 31 * 16 + 5;
  CHECK(contiguous_slot_remapper{}.remap(selected, p, 16, starts) == 4 * 16 + 5);
  CHECK(starts == std::vector<std::int64_t>{0, 16, 32, 48, 64});
  // Fits the budget: slots are chunk ids, positions the true ones.
  const std::vector<std::int32_t> all = {0, 1, 2};
  CHECK(contiguous_slot_remapper{}.remap(all, 2 * 16 + 9, 16, starts) == 2 * 16 + 9);
  CHECK(original_position_remapper{}.remap(selected, p, 16, starts) == p);
  CHECK(starts == std::vector<std::int64_t>{0, 7 * 16, 12 * 16, 30 * 16, 31 * 16});
}

TEST_CASE("matmul_nt matches a naive product and gives a row the same bits whatever shares the call") {
  for (auto [m, n, k] : {std::tuple{1, 1, 1}, {5, 7, 24}, {9, 130, 8}, {17, 33, 128}, {4, 3, 37}}) {
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(k);
    const auto a = test::random_floats(static_cast<std::size_t>(m) * (k + 3), 31);  // row stride k + 3
    const auto b = test::random_floats(static_cast<std::size_t>(n) * k, 32);
    std::vector<float> c(static_cast<std::size_t>(m) * n);
    matmul_nt({a.data(), m, k, k + 3}, {b.data(), n, k, k}, {c.data(), m, n});
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double expected = 0;
        for (int t = 0; t < k; ++t) expected += double(a[i * (k + 3) + t]) * b[j * k + t];
        CHECK(c[i * n + j] == doctest::Approx(expected).epsilon(1e-5).scale(1.0));
      }
    // Every row alone, and every column range alone, gives identical bits: the property
    // prefill == decode rests on.
    for (int i = 0; i < m; ++i) {
      std::vector<float> row(static_cast<std::size_t>(n));
      matmul_nt({a.data() + i * (k + 3), 1, k, k + 3}, {b.data(), n, k, k}, {row.data(), 1, n});
      CHECK(std::equal(row.begin(), row.end(), c.begin() + i * n));
    }
    std::vector<float> halves(c.size(), -1.0f);
    matmul_nt({a.data(), m, k, k + 3}, {b.data(), n, k, k}, {halves.data(), m, n}, 0, n / 2);
    matmul_nt({a.data(), m, k, k + 3}, {b.data(), n, k, k}, {halves.data(), m, n}, n / 2, n);
    CHECK(halves == c);
  }
}

TEST_CASE_TEMPLATE("a chunk's representation does not depend on buffer alignment", Encoder, attention_pooled_encoder, mean_key_encoder,
                   key_bounds_encoder, representative_keys_encoder) {
  // Threads use different scratch buffers and caches sit at different addresses: a vectorised
  // reduction that peels by alignment would make the bits (and so the selection) vary.
  const int w = 24, d = 40;
  attention_config cfg = test::make_config(1, 1, d, w, 4);
  const Encoder encoder{};
  const auto q = test::random_floats(static_cast<std::size_t>(w) * d + 16, 41);
  const auto k = test::random_floats(static_cast<std::size_t>(w) * d + 16, 42);
  const auto v = test::random_floats(static_cast<std::size_t>(w) * d + 16, 43);
  std::vector<float> first;
  for (int shift = 0; shift < 16; ++shift) {
    CAPTURE(shift);
    // Same values at a different address and with a differently aligned scratch.
    std::vector<float> qs(q.size()), ks(k.size()), vs(v.size());
    std::copy_n(q.begin(), w * d, qs.begin() + shift);
    std::copy_n(k.begin(), w * d, ks.begin() + shift);
    std::copy_n(v.begin(), w * d, vs.begin() + shift);
    const auto n = encoder.representation_floats(cfg);
    std::vector<float> rep(n + 16), scratch(encoder.scratch_floats(cfg) + 16);
    const chunk_inputs in{{qs.data() + shift, w, d}, {ks.data() + shift, w, d}, {vs.data() + shift, w, d}, 1.0f / std::sqrt(float(d))};
    encoder.encode(in, std::span<float>(rep).subspan(static_cast<std::size_t>(shift), n),
                   std::span<float>(scratch).subspan(static_cast<std::size_t>(15 - shift)));
    std::vector<float> got(rep.begin() + shift, rep.begin() + shift + static_cast<std::ptrdiff_t>(n));
    if (shift == 0) first = got;
    CHECK(got == first);
  }
}

TEST_CASE("bound and max-key scorers match their naive references with the rotated query") {
  const int d = 16, m = 6, n = 9, w = 8, count = 3;
  attention_config cfg = test::make_config(1, 1, d, w, 4);
  rope r(d, 10000.0, rope_layout::half);
  const auto q = test::random_floats(static_cast<std::size_t>(m) * d, 51);
  const auto bounds = test::random_floats(static_cast<std::size_t>(n) * 2 * d, 52);
  const auto keys = test::random_floats(static_cast<std::size_t>(n) * count * d, 53);
  const std::int64_t first = 45;
  const bound_scorer bound{2};
  const max_key_scorer best{count, 1};
  bound.validate(cfg);
  best.validate(cfg);
  CHECK(bound.representation_floats(cfg) == 2 * d);
  CHECK(best.representation_floats(cfg) == count * d);
  std::vector<float> s1(static_cast<std::size_t>(m) * n), s2(s1.size()), scratch(bound.scratch_floats(cfg, m));
  bound.score({{q.data(), m, d}, first, {bounds.data(), n, 2 * d}, &r, w}, {s1.data(), m, n}, scratch);
  best.score({{q.data(), m, d}, first, {keys.data(), n, count * d}, &r, w}, {s2.data(), m, n}, scratch);
  const auto inv = reference::inverse_frequencies(d, 10000.0);
  for (int i = 0; i < m; ++i) {
    const std::vector<double> raw(q.begin() + i * d, q.begin() + (i + 1) * d);
    const auto q_bound = reference::rotate(raw, static_cast<double>((first + i) % w + 2 * w), inv, rope_layout::half);
    const auto q_best = reference::rotate(raw, static_cast<double>((first + i) % w + w), inv, rope_layout::half);
    for (int c = 0; c < n; ++c) {
      const std::vector<double> b(bounds.begin() + c * 2 * d, bounds.begin() + (c + 1) * 2 * d);
      const std::vector<double> k(keys.begin() + c * count * d, keys.begin() + (c + 1) * count * d);
      CHECK(s1[i * n + c] == doctest::Approx(reference::bound_score(q_bound, b)).epsilon(1e-5));
      CHECK(s2[i * n + c] == doctest::Approx(reference::max_key_score(q_best, k)).epsilon(1e-5));
    }
  }
}

TEST_CASE("the bound score is an upper bound of the query's dot product with every key of the chunk") {
  const int d = 12, w = 16;
  const auto k = test::random_floats(static_cast<std::size_t>(w) * d, 61);
  std::vector<float> bounds(2 * d);
  key_bounds_encoder{}.encode({{k.data(), w, d}, {k.data(), w, d}, {k.data(), w, d}, 1.0f}, bounds, {});
  const auto q = test::random_floats(static_cast<std::size_t>(d) * 20, 62);
  for (int i = 0; i < 20; ++i) {
    const std::vector<double> query(q.begin() + i * d, q.begin() + (i + 1) * d);
    const double bound = reference::bound_score(query, std::vector<double>(bounds.begin(), bounds.end()));
    for (int j = 0; j < w; ++j) CHECK(reference::dot(query, std::vector<double>(k.begin() + j * d, k.begin() + (j + 1) * d)) <= bound + 1e-9);
  }
}
