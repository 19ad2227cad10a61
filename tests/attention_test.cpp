// The composed attention against the naive references and the contract's properties.
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <cstring>
#include <map>
#include <memory_resource>
#include <numeric>
#include <thread>

using namespace longheads;

namespace {
constexpr double tolerance = 1e-5;

struct head_layout {
  int hq, hkv;
};
constexpr head_layout mha{4, 4}, gqa{4, 2}, mqa{4, 1};
}  // namespace

TEST_CASE("within the budget LongHeads is exactly dense causal attention") {
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved})
    for (head_layout heads : {mha, gqa, mqa}) {
      CAPTURE(heads.hkv);
      const int w = 8, budget = 6, d = 16;
      rope r(d, 10000.0, layout);
      attention<> lh(test::make_config(heads.hq, heads.hkv, d, w, budget), r);
      const test::sequence seq(w * budget, heads.hq, heads.hkv, d, 100 + heads.hkv);
      const auto expected = reference::dense_causal(seq.problem(r));
      const auto out = seq.run(lh);
      CHECK(test::max_abs_diff(out, expected) <= tolerance);
      attention<> dense(test::make_config(heads.hq, heads.hkv, d, w, budget, attention_method::dense), r);
      CHECK(seq.run(dense) == out);  // exactly: the same bits as the dense method
    }
}

TEST_CASE("past the budget LongHeads equals the naive algorithm that re-rotates keys at slot positions") {
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved})
    for (head_layout heads : {mha, gqa}) {
      const int w = 8, budget = 4, d = 16, T = 5 * w * budget + 3;
      rope r(d, 10000.0, layout);
      attention<> lh(test::make_config(heads.hq, heads.hkv, d, w, budget), r);
      const test::sequence seq(T, heads.hq, heads.hkv, d, 200 + heads.hkv);
      std::vector<std::int32_t> selections, expected_selections;
      const auto out = seq.run(lh, 0, &selections);
      const auto expected = reference::longheads(seq.problem(r), {.chunk_size = w, .budget_chunks = budget}, &expected_selections);
      CHECK(selections == expected_selections);
      CHECK(test::max_abs_diff(out, expected) <= tolerance);
    }
}

TEST_CASE("generalised knobs: other sink and local counts match the naive algorithm") {
  const int w = 4, d = 8, T = 90;
  rope r(d);
  for (auto [sinks, locals, budget] : {std::tuple{0, 1, 3}, {2, 1, 5}, {1, 3, 4}, {2, 2, 4}}) {
    attention_config c = test::make_config(2, 1, d, w, budget);
    c.sink_chunks = sinks;
    c.local_chunks = locals;
    attention<> lh(c, r);
    const test::sequence seq(T, 2, 1, d, 300);
    std::vector<std::int32_t> sel, expected_sel;
    const auto out = seq.run(lh, 0, &sel);
    const auto expected = reference::longheads(
        seq.problem(r), {.chunk_size = w, .budget_chunks = budget, .sink_chunks = sinks, .local_chunks = locals}, &expected_sel);
    CHECK(sel == expected_sel);
    CHECK(test::max_abs_diff(out, expected) <= tolerance);
  }
}

TEST_CASE("dense and sink+window baselines equal their naive references past the budget") {
  const int w = 8, budget = 4, d = 16, T = 150;
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved}) {
    rope r(d, 10000.0, layout);
    const test::sequence seq(T, 4, 2, d, 400);
    attention<> dense(test::make_config(4, 2, d, w, budget, attention_method::dense), r);
    CHECK(test::max_abs_diff(seq.run(dense), reference::dense_causal(seq.problem(r))) <= tolerance);
    for (int sink_tokens : {0, 1, 4, 9, 31}) {
      attention_config c = test::make_config(4, 2, d, w, budget, attention_method::sink_window);
      c.sink_tokens = sink_tokens;
      attention<> sw(c, r);
      CHECK(test::max_abs_diff(seq.run(sw), reference::sink_window(seq.problem(r), w * budget, sink_tokens)) <= tolerance);
    }
  }
}

TEST_CASE("prefill, token-by-token decode and any split give the same outputs") {
  for (attention_method method : {attention_method::longheads, attention_method::dense, attention_method::sink_window})
    for (head_layout heads : {mha, gqa, mqa}) {
      CAPTURE(to_string(method));
      const int w = 7, budget = 3, d = 12, T = 6 * w * budget + 5;  // T not a multiple of w
      rope r(d, 10000.0, rope_layout::interleaved);
      attention<> a(test::make_config(heads.hq, heads.hkv, d, w, budget, method), r);
      const test::sequence seq(T, heads.hq, heads.hkv, d, 500);
      const auto whole = seq.run(a);
      for (int split : {1, 2, 5, 7, 8, 21, 64}) {
        CAPTURE(split);
        CHECK(seq.run(a, split) == whole);
      }
      // An irregular split crossing chunk boundaries at odd places.
      auto cache = a.make_cache();
      std::vector<float> out(whole.size());
      int first = 0;
      for (int count : {1, 13, 6, 30, 2, 100, 1000}) {
        count = std::min(count, T - first);
        if (count == 0) break;
        a.prefill(cache, seq.qv(first, count), seq.kv(first, count), seq.vv(first, count),
                  {out.data() + first * heads.hq * d, count, heads.hq, d});
        first += count;
      }
      CHECK(out == whole);
    }
}

TEST_CASE("appending tokens never changes earlier outputs") {
  const int w = 8, budget = 3, d = 16;
  rope r(d);
  attention<> a(test::make_config(4, 2, d, w, budget), r);
  const test::sequence longer(200, 4, 2, d, 600);
  const auto all = longer.run(a);
  for (int prefix : {1, 23, 24, 25, 97}) {
    test::sequence shorter = longer;
    shorter.tokens = prefix;
    const auto part = shorter.run(a);
    CHECK(test::max_abs_diff(part, std::vector<float>(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(part.size()))) == 0.0);
  }
}

TEST_CASE("truncate rewinds a cache: the same tokens after it give the same bits as the first time") {
  const int w = 8, budget = 3, d = 16;
  for (attention_method method : {attention_method::longheads, attention_method::dense})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
      CAPTURE(to_string(method));
      CAPTURE(to_string(storage));
      attention_config config = test::make_config(4, 2, d, w, budget, method);
      config.kv_storage = storage;
      attention<> a(config, rope(d));
      const test::sequence seq(120, 4, 2, d, 610);
      std::vector<float> first(40 * 4 * d), again(first.size());
      // Back to a chunk boundary (64, past the budget, after 40 more tokens), and within the
      // open chunk (98 of 96..103, after 4 more).
      for (auto [prefix, more] : {std::pair{64, 40}, std::pair{98, 4}}) {
        CAPTURE(prefix);
        auto cache = a.make_cache();
        a.ingest(cache, seq.qv(0, prefix), seq.kv(0, prefix), seq.vv(0, prefix));
        a.prefill(cache, seq.qv(prefix, more), seq.kv(prefix, more), seq.vv(prefix, more), {first.data(), more, 4, d});
        const kv_cache after_first = cache;
        cache.truncate(prefix);
        CHECK(cache.tokens() == prefix);
        CHECK(cache.last_selection(0).empty());
        a.prefill(cache, seq.qv(prefix, more), seq.kv(prefix, more), seq.vv(prefix, more), {again.data(), more, 4, d});
        CHECK(std::memcmp(first.data(), again.data(), static_cast<std::size_t>(more) * 4 * d * sizeof(float)) == 0);
        CHECK(cache == after_first);
      }
      // Rejected: past the end, negative, and inside a full chunk; the cache is left as it was.
      auto cache = a.make_cache();
      a.ingest(cache, seq.qv(0, 50), seq.kv(0, 50), seq.vv(0, 50));
      const kv_cache before = cache;
      CHECK_THROWS_AS(cache.truncate(51), limit_error);
      CHECK_THROWS_AS(cache.truncate(-1), limit_error);
      if (method == attention_method::longheads) {
        CHECK(cache.rewindable_from() == 40);  // the last full chunk's queries are kept for its spread encoding
        CHECK_THROWS_WITH(cache.truncate(33), doctest::Contains("33 tokens; the cache holds 50 and can go back to a multiple of the chunk size 8 or to any length from 40"));
      } else {
        CHECK(cache.rewindable_from() == 0);  // no queries kept: any length
      }
      CHECK(cache == before);
      cache.truncate(48);
      cache.truncate(0);
      CHECK(cache.tokens() == 0);
    }
}

TEST_CASE("selections: right count, sorted, sinks and locals present, nothing from the future") {
  const int w = 4, budget = 5, d = 8, T = 300;
  attention_config c = test::make_config(4, 2, d, w, budget);
  attention<> a(c, rope(d));
  const test::sequence seq(T, 4, 2, d, 700);
  std::vector<std::int32_t> sel;
  auto cache = a.make_cache();
  seq.run(a, cache, 0, &sel);
  for (int p = 0; p < T; ++p)
    for (int h = 0; h < 4; ++h) {
      const std::int32_t* row = sel.data() + (p * 4 + h) * budget;
      const int i = p / w;
      const int n = std::min(i + 1, budget);
      for (int s = 0; s < budget; ++s) CHECK((s < n ? row[s] >= 0 : row[s] == -1));
      CHECK(std::is_sorted(row, row + n));
      CHECK(std::adjacent_find(row, row + n) == row + n);
      CHECK(row[n - 1] == i);
      if (i + 1 > budget) {
        CHECK(row[0] == 0);
        CHECK(row[n - 2] == i - 1);
      } else {
        for (int s = 0; s < n; ++s) CHECK(row[s] == s);
      }
    }
  // The cache keeps the last query's selection per head.
  for (int h = 0; h < 4; ++h) {
    auto last = cache.last_selection(h);
    CHECK(std::equal(last.begin(), last.end(), sel.data() + ((T - 1) * 4 + h) * budget));
  }
}

TEST_CASE("planted needle: at 64x the budget every head whose query matches the needle selects its chunk") {
  const int w = 16, budget = 4, d = 32, hq = 4, hkv = 2;
  const int T = 64 * w * budget;  // 4096 tokens, 256 chunks
  const int needle_chunk = 37;
  test::sequence seq(T, hq, hkv, d, 800);
  // A direction in the slowly rotating pairs (half layout: the upper indices of each half),
  // so locally rotated needle keys still point along it.
  std::vector<float> direction(d, 0.0f);
  for (int i = d / 4; i < d / 2; ++i) direction[i] = direction[i + d / 2] = 1.0f;
  for (int t = needle_chunk * w; t < (needle_chunk + 1) * w; ++t)
    for (int i = 0; i < d; ++i) seq.k[(t * hkv + 0) * d + i] = 3.0f * direction[i];
  for (int h = 0; h < 2; ++h)  // query heads 0 and 1 read kv head 0
    for (int i = 0; i < d; ++i) seq.q[((T - 1) * hq + h) * d + i] = direction[i];
  for (rope_layout layout : {rope_layout::half}) {
    attention<> a(test::make_config(hq, hkv, d, w, budget), rope(d, 10000.0, layout));
    auto cache = a.make_cache();
    seq.run(a, cache, 1000);
    for (int h = 0; h < 2; ++h) {
      auto s = cache.last_selection(h);
      CAPTURE(h);
      CHECK(std::find(s.begin(), s.end(), needle_chunk) != s.end());
    }
  }
}

TEST_CASE("bad input throws a message naming the problem and leaves the cache unchanged") {
  const int w = 4, budget = 3, d = 8;
  attention<> a(test::make_config(4, 2, d, w, budget), rope(d));
  const test::sequence seq(40, 4, 2, d, 900);
  auto cache = a.make_cache();
  std::vector<float> out(40 * 4 * d);
  a.prefill(cache, seq.qv(0, 30), seq.kv(0, 30), seq.vv(0, 30), {out.data(), 30, 4, d});
  const kv_cache before = cache;
  std::vector<float> o(10 * 4 * d);
  const tensor_view<float> out10(o.data(), 10, 4, d);

  auto check_rejected = [&](auto call, const char* words) {
    CHECK_THROWS_WITH(call(), doctest::Contains(words));
    CHECK(cache == before);
  };
  check_rejected([&] { a.prefill(cache, seq.qv(30, 10), {seq.k.data(), 10, 3, d}, seq.vv(30, 10), out10); },
                 "k has shape [10, 3, 8], expected [10, 2, 8]");
  check_rejected([&] { a.prefill(cache, seq.qv(30, 10), seq.kv(30, 10), seq.vv(30, 9), out10); }, "v has shape [9, 2, 8]");
  check_rejected([&] { a.prefill(cache, {seq.q.data(), 10, 4, 6}, seq.kv(30, 10), seq.vv(30, 10), out10); }, "q has shape");
  check_rejected([&] { a.prefill(cache, seq.qv(30, 10), seq.kv(30, 10), seq.vv(30, 10), {o.data(), 10, 2, d}); }, "out has shape");
  check_rejected([&] { a.prefill(cache, seq.qv(30, 0), seq.kv(30, 0), seq.vv(30, 0), {o.data(), 0, 4, d}); }, "q has 0 tokens");
  check_rejected([&] { a.decode(cache, seq.qv(30, 2), seq.kv(30, 2), seq.vv(30, 2), {o.data(), 2, 4, d}); }, "decode: q has 2 tokens");
  check_rejected([&] {
    a.prefill(cache, seq.qv(30, 10), seq.kv(30, 10), seq.vv(30, 10), {const_cast<float*>(seq.q.data()) + 30 * 4 * d, 10, 4, d});
  }, "out overlaps q");
  std::vector<std::int32_t> short_selections(5);
  check_rejected([&] { a.prefill(cache, seq.qv(30, 10), seq.kv(30, 10), seq.vv(30, 10), out10, short_selections); },
                 "selections has 5 entries");
  test::sequence poisoned = seq;
  poisoned.k[(35 * 2 + 1) * d + 3] = std::nanf("");
  check_rejected([&] { a.prefill(cache, poisoned.qv(30, 10), poisoned.kv(30, 10), poisoned.vv(30, 10), out10); },
                 "k[token 5, head 1, dim 3] is nan");
  poisoned.v[(32 * 2) * d] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(a.prefill(cache, seq.qv(30, 10), seq.kv(30, 10), poisoned.vv(30, 10), out10), value_error);
  CHECK(cache == before);

  SUBCASE("a cache of another shape") {
    attention<> other(test::make_config(4, 4, d, w, budget), rope(d));
    auto foreign = other.make_cache();
    const kv_cache foreign_before = foreign;
    CHECK_THROWS_WITH_AS(a.decode(foreign, seq.qv(0, 1), seq.kv(0, 1), seq.vv(0, 1), {o.data(), 1, 4, d}),
                         doctest::Contains("cache has shape {q_heads 4, kv_heads 4"), shape_error);
    CHECK(foreign == foreign_before);
  }
  SUBCASE("impossible configurations") {
    auto rejects = [](attention_config c, const char* words) {
      CHECK_THROWS_WITH_AS(attention<>(c, rope(c.head_dim > 0 && c.head_dim % 2 == 0 ? c.head_dim : 8)), doctest::Contains(words),
                           config_error);
    };
    attention_config c = test::make_config(4, 2, 8, 4, 3);
    c.head_dim = 7;
    rejects(c, "head_dim must be a positive even number, got 7");
    c = test::make_config(4, 2, 8, 4, 2);
    rejects(c, "budget_chunks (2) must be >= sink_chunks + local_chunks (1 + 2)");
    c = test::make_config(4, 3, 8, 4, 3);
    rejects(c, "n_q_heads (4) must be a multiple of n_kv_heads (3)");
    rejects(test::make_config(0, 1, 8, 4, 3), "n_q_heads must be > 0");
    rejects(test::make_config(4, 2, 8, 0, 3), "chunk_size must be > 0");
    rejects(test::make_config(4, 2, 8, 4, 0), "budget_chunks must be > 0");
    c = test::make_config(4, 2, 8, 4, 3);
    c.local_chunks = 0;
    rejects(c, "local_chunks must be >= 1");
    c = test::make_config(4, 2, 8, 4, 3, attention_method::sink_window);
    c.sink_tokens = 12;
    rejects(c, "sink_tokens must be in [0, budget_chunks*chunk_size = 12)");
    CHECK_THROWS_WITH_AS(attention<>(test::make_config(4, 2, 8, 4, 3), rope(16)), doctest::Contains("rope head_dim 16"), config_error);
  }
  SUBCASE("limits are checked before anything is allocated") {
    CHECK_THROWS_AS(cache.reserve(std::int64_t{1} << 40), limit_error);
    CHECK_THROWS_AS(a.reserve(std::int64_t{1} << 40), limit_error);
    CHECK(cache == before);
  }
}

TEST_CASE("non-finite input can be let through when the caller asks, confined to its own head") {
  const int w = 4, budget = 3;
  // d 8 and (int8's vector loop) 64; every storage: an int8 query is quantized, and a
  // non-finite one must not round to finite numbers.
  for (int d : {8, 64})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
        CAPTURE(d);
        CAPTURE(to_string(storage));
        CAPTURE(bad);
        attention_config c = test::make_config(2, 2, d, w, budget, attention_method::dense);
        c.reject_nonfinite = false;
        c.kv_storage = storage;
        attention<> a(c, rope(d));
        test::sequence seq(6, 2, 2, d, 950);
        seq.q[static_cast<std::size_t>((5 * 2 + 1) * d)] = bad;  // last token, head 1
        const auto out = seq.run(a);
        for (int t = 0; t < 6; ++t)
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < d; ++i) CHECK(std::isfinite(out[static_cast<std::size_t>((t * 2 + h) * d + i)]) == !(t == 5 && h == 1));
      }
}

TEST_CASE("views with a token stride read a fused QKV buffer in place") {
  const int w = 4, budget = 3, d = 8, hq = 4, hkv = 2, T = 50, stride = (hq + 2 * hkv) * d;
  rope r(d);
  attention<> a(test::make_config(hq, hkv, d, w, budget), r);
  const test::sequence seq(T, hq, hkv, d, 1000);
  std::vector<float> fused(static_cast<std::size_t>(T) * stride);
  for (int t = 0; t < T; ++t) {
    std::copy_n(seq.q.begin() + t * hq * d, hq * d, fused.begin() + t * stride);
    std::copy_n(seq.k.begin() + t * hkv * d, hkv * d, fused.begin() + t * stride + hq * d);
    std::copy_n(seq.v.begin() + t * hkv * d, hkv * d, fused.begin() + t * stride + (hq + hkv) * d);
  }
  auto cache = a.make_cache();
  std::vector<float> out(static_cast<std::size_t>(T) * hq * d);
  a.prefill(cache, {fused.data(), T, hq, d, stride}, {fused.data() + hq * d, T, hkv, d, stride},
            {fused.data() + (hq + hkv) * d, T, hkv, d, stride}, {out.data(), T, hq, d});
  CHECK(test::max_abs_diff(out, seq.run(a)) == 0.0);
}

namespace {
using threaded_policies = test::pooled<>;
using test::quest_policies;
using test::representative_policies;
using test::quest_group_policies;
using test::rotated_paper_policies;
struct alternative_policies : paper_policies {
  using encoder = mean_key_encoder;
  using scorer = rotated_query_scorer;
  using kernel = scalar_online_softmax_kernel;
};
}  // namespace

TEST_CASE("results are bit-identical whatever the thread count") {
  const int w = 8, budget = 4, d = 32;
  rope r(d);
  const test::sequence seq(400, 8, 2, d, 1100);
  attention<> serial(test::make_config(8, 2, d, w, budget), r);
  const auto expected = seq.run(serial, 37);
  for (std::size_t threads : {2, 3}) {
    attention<threaded_policies> pooled(test::make_config(8, 2, d, w, budget), r, {.executor = thread_pool_executor(threads)});
    CHECK(seq.run(pooled, 37) == expected);
    CHECK(seq.run(pooled, 1) == seq.run(serial, 1));
  }
}

TEST_CASE("every method, kv layout and group selection is bit-identical whatever the thread count and split") {
  // Decode with fewer kv groups than lanes splits a group's heads across lanes; prefill splits
  // query blocks. Neither may change a single bit.
  struct pooled_group_max : threaded_policies {
    using encoder = key_bounds_encoder;
    using scorer = bound_scorer;
    using group_selection = group_max_selection;
  };
  const int w = 8, budget = 4, d = 16, hq = 8;
  rope r(d);
  for (int hkv : {8, 2, 1}) {
    const test::sequence seq(300, hq, hkv, d, 1300u + static_cast<std::uint32_t>(hkv));
    for (auto method : {attention_method::longheads, attention_method::dense, attention_method::sink_window}) {
      CAPTURE(hkv);
      CAPTURE(to_string(method));
      attention<> serial(test::make_config(hq, hkv, d, w, budget, method), r);
      const auto expected = seq.run(serial, 0);
      CHECK(seq.run(serial, 1) == expected);
      for (std::size_t threads : {2, 3}) {
        attention<threaded_policies> pooled(test::make_config(hq, hkv, d, w, budget, method), r, {.executor = thread_pool_executor(threads)});
        CHECK(seq.run(pooled, 0) == expected);
        CHECK(seq.run(pooled, 1) == expected);
        CHECK(seq.run(pooled, 70) == expected);
      }
    }
    attention<quest_group_policies<group_max_selection>> shared_serial(test::make_config(hq, hkv, d, w, budget), r);
    attention<pooled_group_max> shared_pooled(test::make_config(hq, hkv, d, w, budget), r, {.executor = thread_pool_executor(3)});
    const auto expected = seq.run(shared_serial, 0);
    CHECK(seq.run(shared_pooled, 1) == expected);
    CHECK(seq.run(shared_pooled, 70) == expected);
  }
}

TEST_CASE("swapped policies compose and match the naive algorithm given the same policies") {
  const int w = 8, budget = 4, d = 16, T = 170;
  rope r(d, 10000.0, rope_layout::interleaved);
  const test::sequence seq(T, 4, 2, d, 1200);
  attention<alternative_policies> a(test::make_config(4, 2, d, w, budget), r, {.scorer = rotated_query_scorer{2}});
  std::vector<std::int32_t> sel, expected_sel;
  const auto out = seq.run(a, 0, &sel);
  const auto ref_problem = seq.problem(r);
  reference::longheads_settings s{.chunk_size = w, .budget_chunks = budget};
  s.encode = [](const reference::matrix&, const reference::matrix& k, const reference::matrix&) { return reference::mean_key(k); };
  s.score = [&](const std::vector<double>& q, const std::vector<double>& rep, std::int64_t p) {
    return reference::dot(ref_problem.rotated(q, static_cast<double>(p % w + 2 * w)), rep);
  };
  const auto expected = reference::longheads(ref_problem, s, &expected_sel);
  CHECK(sel == expected_sel);
  CHECK(test::max_abs_diff(out, expected) <= tolerance);
  CHECK(seq.run(a, 1) == out);
}

namespace {
// The naive algorithm with the same encoder and scorer as a policy bundle.
template <class Policies>
reference::longheads_settings settings_for(const reference::problem& pr, int w, int budget) {
  reference::longheads_settings s{.chunk_size = w, .budget_chunks = budget};
  const auto rotated = [&pr, w](const std::vector<double>& q, std::int64_t p) { return pr.rotated(q, static_cast<double>(p % w + w)); };
  if constexpr (!std::is_same_v<typename Policies::group_selection, per_head_selection>) {
    s = settings_for<quest_policies>(pr, w, budget);
    if constexpr (std::is_same_v<typename Policies::group_selection, group_max_selection>)
      s.group_combine = [](const std::vector<double>& x) { return *std::max_element(x.begin(), x.end()); };
    else
      s.group_combine = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0) / static_cast<double>(x.size()); };
  } else if constexpr (std::is_same_v<Policies, alternative_policies>) {
    s.encode = [](const reference::matrix&, const reference::matrix& k, const reference::matrix&) { return reference::mean_key(k); };
    s.score = [rotated](const std::vector<double>& q, const std::vector<double>& rep, std::int64_t p) {
      return reference::dot(rotated(q, p), rep);
    };
  } else if constexpr (std::is_same_v<Policies, rotated_paper_policies>) {
    s.score = [rotated](const std::vector<double>& q, const std::vector<double>& rep, std::int64_t p) {
      return reference::dot(rotated(q, p), rep);
    };
  } else if constexpr (std::is_same_v<Policies, quest_policies>) {
    s.encode = [](const reference::matrix&, const reference::matrix& k, const reference::matrix&) { return reference::key_bounds(k); };
    s.score = [rotated](const std::vector<double>& q, const std::vector<double>& rep, std::int64_t p) {
      return reference::bound_score(rotated(q, p), rep);
    };
  } else {
    s.encode = [](const reference::matrix& q, const reference::matrix& k, const reference::matrix&) {
      return reference::representative_keys(q, k, 2);
    };
    s.score = [rotated](const std::vector<double>& q, const std::vector<double>& rep, std::int64_t p) {
      return reference::max_key_score(rotated(q, p), rep);
    };
  }
  return s;
}
}  // namespace

TEST_CASE_TEMPLATE("selection policies beyond the paper's pass the same exactness tests", Policies, quest_policies, representative_policies) {
  for (head_layout heads : {mha, gqa, mqa}) {
    CAPTURE(heads.hkv);
    const int w = 8, budget = 4, d = 16;
    rope r(d, 10000.0, rope_layout::interleaved);
    attention<Policies> a(test::make_config(heads.hq, heads.hkv, d, w, budget), r);
    // Fits the budget: exactly dense causal attention (the dense method's bits).
    const test::sequence short_seq(w * budget, heads.hq, heads.hkv, d, 1300);
    const auto short_out = short_seq.run(a);
    CHECK(test::max_abs_diff(short_out, reference::dense_causal(short_seq.problem(r))) <= tolerance);
    attention<Policies> dense(test::make_config(heads.hq, heads.hkv, d, w, budget, attention_method::dense), r);
    CHECK(short_seq.run(dense) == short_out);
    // Past the budget: the naive algorithm with the same encoder and scorer, same selections.
    const test::sequence seq(6 * w * budget + 3, heads.hq, heads.hkv, d, 1400);
    std::vector<std::int32_t> sel, expected_sel;
    const auto out = seq.run(a, 0, &sel);
    const auto pr = seq.problem(r);
    const auto expected = reference::longheads(pr, settings_for<Policies>(pr, w, budget), &expected_sel);
    CHECK(sel == expected_sel);
    CHECK(test::max_abs_diff(out, expected) <= tolerance);
    // Prefill == decode == any split, bit for bit.
    for (int split : {1, 5, 8, 37}) {
      CAPTURE(split);
      CHECK(seq.run(a, split) == out);
    }
  }
}

TEST_CASE("an encoder and a scorer that do not fit together are a config error") {
  struct mismatched : paper_policies {
    using encoder = key_bounds_encoder;  // writes 2d floats per chunk; raw_query_scorer reads d
  };
  rope r(16);
  CHECK_THROWS_WITH_AS(attention<mismatched>(test::make_config(2, 2, 16, 8, 4), r),
                       doctest::Contains("the scorer reads 16 floats per chunk representation but the encoder writes 32"), config_error);
}

TEST_CASE("shared group selection: every head of a kv group reads the same chunks") {
  const int w = 8, budget = 4, d = 16;
  rope r(d);
  attention<quest_group_policies<group_max_selection>> a(test::make_config(8, 2, d, w, budget), r);
  const test::sequence seq(300, 8, 2, d, 1500);
  std::vector<std::int32_t> sel;
  seq.run(a, 0, &sel);
  bool differs_across_groups = false;
  for (int p = 0; p < 300; ++p)
    for (int h = 0; h < 8; ++h) {
      const auto row = [&](int head) { return std::vector<std::int32_t>(sel.begin() + (p * 8 + head) * budget, sel.begin() + (p * 8 + head + 1) * budget); };
      CHECK(row(h) == row(h / 4 * 4));
      differs_across_groups |= row(0) != row(4);
    }
  CHECK(differs_across_groups);
}

TEST_CASE("ingest builds the cache prefill would, without outputs, and validates the same way") {
  const int w = 8, budget = 4, d = 16;
  rope r(d);
  attention<> a(test::make_config(4, 2, d, w, budget), r);
  const test::sequence seq(150, 4, 2, d, 1600);
  auto by_prefill = a.make_cache();
  auto by_ingest = a.make_cache();
  std::vector<float> out(static_cast<std::size_t>(120) * 4 * d);
  a.prefill(by_prefill, seq.qv(0, 120), seq.kv(0, 120), seq.vv(0, 120), {out.data(), 120, 4, d});
  a.ingest(by_ingest, seq.qv(0, 50), seq.kv(0, 50), seq.vv(0, 50));
  a.ingest(by_ingest, seq.qv(50, 70), seq.kv(50, 70), seq.vv(50, 70));
  CHECK(by_ingest.tokens() == 120);
  // The remaining tokens' outputs are the same after either.
  std::vector<float> rest_a(static_cast<std::size_t>(30) * 4 * d), rest_b(rest_a.size());
  a.prefill(by_prefill, seq.qv(120, 30), seq.kv(120, 30), seq.vv(120, 30), {rest_a.data(), 30, 4, d});
  a.prefill(by_ingest, seq.qv(120, 30), seq.kv(120, 30), seq.vv(120, 30), {rest_b.data(), 30, 4, d});
  CHECK(rest_a == rest_b);
  // Bad input: named, cache unchanged.
  const auto before = by_ingest;
  CHECK_THROWS_WITH_AS(a.ingest(by_ingest, seq.qv(0, 3), seq.kv(0, 2), seq.vv(0, 3)), doctest::Contains("ingest: k has shape [2, 2, 16]"),
                       shape_error);
  std::vector<float> bad(seq.k.begin(), seq.k.begin() + 2 * d);
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(a.ingest(by_ingest, seq.qv(0, 1), {bad.data(), 1, 2, d}, seq.vv(0, 1)), value_error);
  CHECK(by_ingest == before);
}

namespace {
/// Counts the bytes a cache holds from it.
class counting_resource final : public std::pmr::memory_resource {
 public:
  std::size_t live_bytes = 0, allocations = 0;

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    live_bytes += bytes;
    ++allocations;
    return std::pmr::new_delete_resource()->allocate(bytes, alignment);
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    live_bytes -= bytes;
    std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }
};
}  // namespace

TEST_CASE("a cache's buffers come from the memory resource it is given, with the same results") {
  const int w = 8, budget = 4, d = 16, hq = 4, hkv = 2;
  counting_resource memory;
  for (attention_method method : {attention_method::longheads, attention_method::dense}) {
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
      const std::string case_name = to_string(method) + std::string(" ") + to_string(storage);
      CAPTURE(case_name);
      attention_config config = test::make_config(hq, hkv, d, w, budget, method);
      config.kv_storage = storage;
      attention<> a(config, rope(d));
      const test::sequence seq(200, hq, hkv, d, 1700);
      auto own = a.make_cache(40, &memory);
      auto plain = a.make_cache(40);
      CHECK(own.memory() == &memory);
      CHECK(plain.memory() == std::pmr::get_default_resource());
      CHECK(memory.live_bytes > 0);
      // Every buffer the cache counts in bytes() is the resource's, growth included.
      std::vector<float> out_own(static_cast<std::size_t>(200) * hq * d), out_plain(out_own.size());
      for (int first = 0; first < 200; first += 50) {
        a.prefill(own, seq.qv(first, 50), seq.kv(first, 50), seq.vv(first, 50), {out_own.data() + first * hq * d, 50, hq, d});
        a.prefill(plain, seq.qv(first, 50), seq.kv(first, 50), seq.vv(first, 50), {out_plain.data() + first * hq * d, 50, hq, d});
        REQUIRE(memory.live_bytes <= own.bytes());
        CHECK(own.bytes() - memory.live_bytes < own.bytes() / 8);  // only the selection bookkeeping is elsewhere
      }
      CHECK(out_own == out_plain);
      CHECK(own == plain);
      // std::pmr's rules: a copy allocates from the default resource, a move keeps the source's.
      const auto copy = own;
      CHECK(copy.memory() == std::pmr::get_default_resource());
      CHECK(copy == own);
      auto moved = std::move(own);
      CHECK(moved.memory() == &memory);
    }
  }
  CHECK(memory.live_bytes == 0);  // every cache gave its blocks back
  CHECK_THROWS_WITH_AS(attention<>(test::make_config(hq, hkv, d, w, budget), rope(d)).make_cache(0, nullptr),
                       doctest::Contains("memory resource is null"), config_error);
}

TEST_CASE("a cache holding non-finite values equals its copy (fuzzer finding)") {
  // With reject_nonfinite off, NaN keys enter the cache; cache equality must be bitwise or a
  // failed call's "cache unchanged" check could never hold.
  attention_config c = test::make_config(2, 1, 2, 7, 3, attention_method::sink_window);
  c.reject_nonfinite = false;
  attention<> a(c, rope(2));
  auto cache = a.make_cache();
  const float q[4] = {1, 2, 3, 4}, k[2] = {std::numeric_limits<float>::quiet_NaN(), 1}, v[2] = {0, std::numeric_limits<float>::infinity()};
  float out[4];
  a.prefill(cache, {q, 1, 2, 2}, {k, 1, 1, 2}, {v, 1, 1, 2}, {out, 1, 2, 2});
  const auto copy = cache;
  CHECK(copy == cache);
  CHECK_THROWS_AS(a.prefill(cache, {q, 0, 2, 2}, {k, 0, 1, 2}, {v, 0, 1, 2}, {out, 0, 2, 2}), shape_error);
  CHECK(copy == cache);
}

TEST_CASE("caches that differ only in one head's chunk representations are not equal") {
  // Same keys and values, no open chunk; one query of the first chunk differs, so only that
  // chunk's representations (which the encoder pools with the chunk's queries) differ. The
  // caches are grown differently so the representations sit at different offsets.
  const int w = 8, budget = 4, d = 16, hq = 4, hkv = 2, tokens = 3 * w;
  attention<> a(test::make_config(hq, hkv, d, w, budget), rope(d));
  const test::sequence seq(tokens, hq, hkv, d, 2100);
  test::sequence changed = seq;
  changed.q[static_cast<std::size_t>(3 * d + 5)] += 1.0f;  // token 0, query head 3
  auto reference = a.make_cache(tokens), same = a.make_cache(0), other = a.make_cache(0);
  a.ingest(reference, seq.qv(0, tokens), seq.kv(0, tokens), seq.vv(0, tokens));
  for (int first = 0; first < tokens; first += w) {
    a.ingest(same, seq.qv(first, w), seq.kv(first, w), seq.vv(first, w));
    a.ingest(other, changed.qv(first, w), changed.kv(first, w), changed.vv(first, w));
  }
  CHECK(same == reference);
  CHECK_FALSE(other == reference);
  CHECK_FALSE(other == same);
}

TEST_CASE("concurrent sequences: one attention and one cache per thread, a shared thread pool") {
  // The threading contract (docs/errors.md): an attention object and a cache are used by one
  // thread at a time; separate sequences run concurrently, even sharing one pool. Run under
  // ThreadSanitizer in CI.
  const int w = 8, budget = 4, d = 16;
  rope r(d);
  const thread_pool_executor pool(2);
  std::vector<test::sequence> seqs;
  for (int i = 0; i < 4; ++i) seqs.emplace_back(120 + 17 * i, 4, 2, d, 1700 + i);
  std::vector<std::vector<float>> expected;
  for (const auto& seq : seqs) {
    attention<> serial(test::make_config(4, 2, d, w, budget), r);
    expected.push_back(seq.run(serial, 7));
  }
  std::vector<std::vector<float>> got(seqs.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < seqs.size(); ++i)
    threads.emplace_back([&, i] {
      attention<threaded_policies> a(test::make_config(4, 2, d, w, budget), r, {.executor = pool});
      got[i] = seqs[i].run(a, 7);
    });
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < seqs.size(); ++i) CHECK(got[i] == expected[i]);
}

/// The default kernel without its bf16 reads: the attention must convert bf16 chunks for it.
struct fp32_only_kernel {
  online_softmax_kernel inner;
  std::size_t scratch_floats(std::ptrdiff_t length, int d) const noexcept { return inner.scratch_floats(length, d); }
  void begin(softmax_state& state, float* out, int d) const noexcept { inner.begin(state, out, d); }
  void consume(const kv_segment& seg, int d, float scale, softmax_state& state, float* out, std::span<float> scratch) const noexcept {
    inner.consume(seg, d, scale, state, out, scratch);
  }
  void finish(const softmax_state& state, float* out, int d) const noexcept { inner.finish(state, out, d); }
  void consume_shared(const float* keys, const float* values, std::int32_t length, const float* const* queries, std::size_t n, int d,
                      float scale, softmax_state* const* states, float* const* outs, std::span<float> scratch) const noexcept {
    inner.consume_shared(keys, values, length, queries, n, d, scale, states, outs, scratch);
  }
};
static_assert(attention_kernel<fp32_only_kernel> && !bf16_reading_kernel<fp32_only_kernel>);
struct converting_policies : paper_policies {
  using kernel = fp32_only_kernel;
};

static_assert(!int8_reading_kernel<fp32_only_kernel>);

// Compact storage against fp32 on the tests' inputs (random rows of magnitude ~1; per storage:
// the bound on the output error relative to the largest output, and on the LongHeads rows whose
// selection flips on a near-tie; docs/performance.md has the measured figures).
TEST_CASE("compact KV storage (bf16, int8): the K/V bytes, close to fp32, and the same exactness guarantees") {
  const int w = 8, budget = 4, d = 32, T = 300, hq = 4;
  rope r(d);
  struct storage_case {
    kv_precision storage;
    double error;     // relative to the largest output, where the same chunks are selected
    std::size_t flips;  // of 1200 rows
  };
  for (const storage_case sc : {storage_case{kv_precision::bf16, 1e-2, 4}, storage_case{kv_precision::int8, 2e-2, 16}})
  for (int hkv : {4, 2}) {
    const test::sequence seq(T, hq, hkv, d, 1400u + static_cast<std::uint32_t>(hkv));
    for (auto method : {attention_method::longheads, attention_method::dense, attention_method::sink_window}) {
      CAPTURE(to_string(sc.storage));
      CAPTURE(hkv);
      CAPTURE(std::string(to_string(method)));
      attention_config fp32_config = test::make_config(hq, hkv, d, w, budget, method), compact_config = fp32_config;
      compact_config.kv_storage = sc.storage;
      attention<> fp32(fp32_config, r), compact(compact_config, r);
      auto fp32_cache = fp32.make_cache(), compact_cache = compact.make_cache();
      const bool selects = method == attention_method::longheads;
      std::vector<std::int32_t> fp32_sel, compact_sel;
      const auto expected = seq.run(fp32, fp32_cache, 0, selects ? &fp32_sel : nullptr);
      const auto out = seq.run(compact, compact_cache, 0, selects ? &compact_sel : nullptr);

      // Bytes: every cached key and value element takes 2 bytes instead of 4 (bf16), or 1 and
      // a 2-byte scale per 32 (int8).
      REQUIRE(fp32_cache.capacity_tokens() == compact_cache.capacity_tokens());
      const auto kv_elements = static_cast<std::size_t>(fp32_cache.capacity_tokens()) * static_cast<std::size_t>(hkv) * d * 2;
      const std::size_t compact_bytes = sc.storage == kv_precision::bf16 ? kv_elements * 2 : kv_elements + kv_elements / 32 * 2;
      CHECK(fp32_cache.bytes() - compact_cache.bytes() == kv_elements * 4 - compact_bytes);
      CHECK(compact_cache.bytes_by_kind().keys + compact_cache.bytes_by_kind().values == compact_bytes);

      // Accuracy, relative to the largest output, for every query that read the same chunks in
      // both precisions (all of them, except where a near-tie in LongHeads' scores flips).
      double largest = 0;
      for (float x : expected) largest = std::max(largest, static_cast<double>(std::abs(x)));
      std::size_t same_choice = 0, rows = static_cast<std::size_t>(T) * hq;
      double worst = 0;
      for (std::size_t row = 0; row < rows; ++row) {
        if (selects && !std::equal(fp32_sel.begin() + static_cast<std::ptrdiff_t>(row * budget),
                                   fp32_sel.begin() + static_cast<std::ptrdiff_t>((row + 1) * budget),
                                   compact_sel.begin() + static_cast<std::ptrdiff_t>(row * budget)))
          continue;
        ++same_choice;
        for (std::size_t i = row * d; i < (row + 1) * d; ++i) worst = std::max(worst, std::abs(double(out[i]) - double(expected[i])));
      }
      MESSAGE(std::string(to_string(sc.storage)) << " " << std::string(to_string(method)) << " kv heads " << hkv << ": largest error / largest output "
                                    << worst / largest << ", rows whose selection differs: " << rows - same_choice << " of " << rows);
      CHECK(worst <= sc.error * largest);
      // A regression that flips more than about twice the measured near-ties fails.
      CHECK(rows - same_choice <= sc.flips);
      if (!selects) CHECK(same_choice == rows);

      // Prefill, decode and splits give the same bits; so do threads.
      CHECK(seq.run(compact, 1) == out);
      CHECK(seq.run(compact, 37) == out);
      attention<threaded_policies> pooled(compact_config, r, {.executor = thread_pool_executor(3)});
      CHECK(seq.run(pooled, 1) == out);
      // Reading bf16 in place gives the bits of converting each chunk first. int8 keys meet the
      // query quantized in place (a kernel that converts reads them dequantized, with the fp32
      // query): the two are as close as either is to fp32.
      attention<converting_policies> converting(compact_config, r);
      if (sc.storage == kv_precision::bf16) {
        CHECK(seq.run(converting, 0) == out);
      } else {
        std::vector<std::int32_t> converting_sel;
        auto converting_cache = converting.make_cache();
        const auto converted = seq.run(converting, converting_cache, 0, selects ? &converting_sel : nullptr);
        CHECK(converting_sel == compact_sel);  // selection reads the summaries, which are alike
        double apart = 0;
        for (std::size_t i = 0; i < out.size(); ++i) apart = std::max(apart, std::abs(double(out[i]) - double(converted[i])));
        CHECK(apart <= sc.error * largest);
      }
    }
    // Inside the budget compact LongHeads is compact dense attention.
    attention_config lh = test::make_config(hq, hkv, d, w, 64), dense = test::make_config(hq, hkv, d, w, 64, attention_method::dense);
    lh.kv_storage = dense.kv_storage = sc.storage;
    attention<> a(lh, r), b(dense, r);
    CHECK(seq.run(a) == seq.run(b));
  }
  // A compact cache does not serve an attention of another storage.
  for (kv_precision storage : {kv_precision::bf16, kv_precision::int8}) {
    attention_config c = test::make_config(hq, 2, d, w, budget);
    attention<> fp32(c, r);
    c.kv_storage = storage;
    attention<> compact(c, r);
    auto cache = compact.make_cache();
    const test::sequence seq(10, hq, 2, d, 5);
    std::vector<float> out(10 * hq * d);
    CHECK_THROWS_AS(fp32.prefill(cache, seq.qv(0, 10), seq.kv(0, 10), seq.vv(0, 10), {out.data(), 10, hq, d}), shape_error);
    CHECK(cache.tokens() == 0);
  }
}

namespace {
/// key_bounds_encoder stored once per query head, as before keys-only encoders were shared.
struct per_query_head_bounds : key_bounds_encoder {
  static constexpr bool keys_only = false;
};
struct per_query_head_quest : quest_policies {
  using encoder = per_query_head_bounds;
};
struct per_query_head_mean : paper_policies {
  using encoder = mean_key_encoder;
  using scorer = rotated_query_scorer;
};
struct shared_mean_reference : per_query_head_mean {
  struct encoder : mean_key_encoder {
    static constexpr bool keys_only = false;
  };
};
}  // namespace

TEST_CASE_TEMPLATE("keys-only encoders keep one representation per kv head, with the bits of one per query head", Pair,
                   std::pair<quest_policies, per_query_head_quest>, std::pair<per_query_head_mean, shared_mean_reference>) {
  using shared = typename Pair::first_type;
  using per_head = typename Pair::second_type;
  static_assert(encodes_keys_only<typename shared::encoder> && !encodes_keys_only<typename per_head::encoder>);
  const int w = 8, budget = 4, d = 16, hq = 8, hkv = 2, T = 300;
  rope r(d);
  const test::sequence seq(T, hq, hkv, d, 2300);
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    attention_config c = test::make_config(hq, hkv, d, w, budget);
    c.kv_storage = storage;
    attention<shared> a(c, r);
    attention<per_head> b(c, r);
    CHECK(a.shape().summary_heads() == hkv);
    CHECK(b.shape().summary_heads() == hq);
    auto cache_a = a.make_cache(), cache_b = b.make_cache();
    std::vector<std::int32_t> sel_a, sel_b;
    const auto out_a = seq.run(a, cache_a, 0, &sel_a), out_b = seq.run(b, cache_b, 0, &sel_b);
    CHECK(out_a == out_b);
    CHECK(sel_a == sel_b);
    CHECK(seq.run(a, 1) == out_a);  // decode, encoding from the open chunk
    CHECK(seq.run(a, 37) == out_a);
    // Every query head scores against the same floats either way, at a quarter of the bytes.
    for (int h = 0; h < hq; ++h) {
      const auto ra = cache_a.representations(h), rb = cache_b.representations(h);
      REQUIRE(ra.rows() == rb.rows());
      CHECK(std::memcmp(ra.data(), rb.data(), static_cast<std::size_t>(ra.rows() * ra.cols()) * sizeof(float)) == 0);
    }
    CHECK(cache_a.bytes_by_kind().representations * (hq / hkv) == cache_b.bytes_by_kind().representations);
    CHECK(cache_a.bytes_by_kind().keys == cache_b.bytes_by_kind().keys);
    CHECK(cache_a.bytes_by_kind().total() == cache_a.bytes());
  }
  // A cache shape can only share representations per kv head.
  CHECK_THROWS_WITH_AS(kv_cache(cache_shape{hq, hkv, d, w, 2 * d, kv_precision::fp32, 4}), doctest::Contains("representation_heads must be"),
                       shape_error);
}

namespace {
struct quest_index_policies : quest_policies {
  using index = bound_tree_index;
};
using pooled_quest_index = test::pooled<quest_index_policies>;
using test::quest_beam_policies;
using pooled_quest_beam = test::pooled<quest_beam_policies>;
}  // namespace

TEST_CASE("the bound-tree index selects exactly the flat scan's chunks: same outputs and selections, any split and thread count") {
  const int w = 4, budget = 5, d = 16;
  rope r(d, 10000.0, rope_layout::interleaved);
  for (head_layout heads : {mha, gqa, mqa})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (int fanout : {2, 16}) {
        CAPTURE(heads.hkv);
        CAPTURE(to_string(storage));
        CAPTURE(fanout);
        attention_config c = test::make_config(heads.hq, heads.hkv, d, w, budget);
        c.kv_storage = storage;
        const test::sequence seq(30 * w * budget + 3, heads.hq, heads.hkv, d, 2400u + static_cast<std::uint32_t>(heads.hkv));
        attention<quest_policies> flat(c, r);
        attention<quest_index_policies> indexed(c, r, {.index = {.branching = fanout}});
        std::vector<std::int32_t> flat_sel, sel;
        const auto expected = seq.run(flat, 0, &flat_sel);
        auto cache = indexed.make_cache();
        CHECK(seq.run(indexed, cache, 0, &sel) == expected);
        CHECK(sel == flat_sel);
        CHECK(cache.index(0).chunks() == cache.full_chunks());
        CHECK(cache.bytes_by_kind().index > 0);
        for (int split : {1, 7, 37}) {
          CAPTURE(split);
          CHECK(seq.run(indexed, split, &sel) == expected);
          CHECK(sel == flat_sel);
        }
        attention<pooled_quest_index> pooled(c, r, {.executor = thread_pool_executor(3), .index = {.branching = fanout}});
        CHECK(seq.run(pooled, 1) == expected);
        // Truncated back to a chunk boundary, then the same tokens again: the same bits.
        const int prefix = 24 * w, more = 20;
        std::vector<float> first(static_cast<std::size_t>(more) * heads.hq * d), again(first.size());
        auto rewound = indexed.make_cache();
        indexed.ingest(rewound, seq.qv(0, prefix + 40), seq.kv(0, prefix + 40), seq.vv(0, prefix + 40));
        rewound.truncate(prefix);
        CHECK(rewound.index(0).chunks() == prefix / w);
        indexed.prefill(rewound, seq.qv(prefix, more), seq.kv(prefix, more), seq.vv(prefix, more), {again.data(), more, heads.hq, d});
        CHECK(std::equal(again.begin(), again.end(), expected.begin() + static_cast<std::ptrdiff_t>(prefix) * heads.hq * d));
      }
}

namespace {
struct quest_certified_policies : quest_policies {
  using index = bound_tree_certified;
};
using pooled_quest_certified = test::pooled<quest_certified_policies>;
}  // namespace

TEST_CASE("the certified index: epsilon 0 selects exactly the flat scan's chunks; any epsilon gives the same bits in every split") {
  // A beam of one box a level over boxes of 2 chunks misses most of the flat scan's chunks
  // (the beam test below); certified, the same beam is widened until the choice is proved.
  const int w = 4, budget = 5, d = 16;
  rope r(d, 10000.0, rope_layout::interleaved);
  for (head_layout heads : {mha, gqa})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::int8}) {
      CAPTURE(heads.hkv);
      CAPTURE(to_string(storage));
      attention_config c = test::make_config(heads.hq, heads.hkv, d, w, budget);
      c.kv_storage = storage;
      const test::sequence seq(30 * w * budget + 3, heads.hq, heads.hkv, d, 2600u + static_cast<std::uint32_t>(heads.hkv));
      attention<quest_policies> flat(c, r);
      std::vector<std::int32_t> flat_sel, sel;
      const auto expected = seq.run(flat, 0, &flat_sel);
      attention<quest_certified_policies> certified(c, r, {.index = {.branching = 2, .beam = 1, .epsilon = 0.0f}});
      for (int split : {0, 1, 7, 37}) {
        CAPTURE(split);
        CHECK(seq.run(certified, split, &sel) == expected);
        CHECK(sel == flat_sel);
      }
      attention<pooled_quest_certified> pooled(c, r, {.executor = thread_pool_executor(3), .index = {.branching = 2, .beam = 1, .epsilon = 0.0f}});
      CHECK(seq.run(pooled, 1) == expected);
      // A slack: no longer the flat scan's choice everywhere, but one choice, in every split.
      attention<quest_certified_policies> loose(c, r, {.index = {.branching = 2, .beam = 1, .epsilon = 2.0f}});
      std::vector<std::int32_t> loose_sel;
      const auto loose_out = seq.run(loose, 0, &loose_sel);
      for (int split : {1, 7, 37}) {
        CAPTURE(split);
        CHECK(seq.run(loose, split, &sel) == loose_out);
        CHECK(sel == loose_sel);
      }
    }
  CHECK_THROWS_WITH_AS(attention<quest_certified_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.epsilon = -1.0f}}),
                       doctest::Contains("epsilon finite and >= 0"), config_error);
}

TEST_CASE("the beam index: the same bits in prefill, decode, any split and thread count; the flat scan's up to exact_below candidates") {
  const int w = 4, budget = 5, d = 16;
  rope r(d, 10000.0, rope_layout::interleaved);
  for (head_layout heads : {mha, gqa})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (int beam : {1, 2}) {
        CAPTURE(heads.hkv);
        CAPTURE(to_string(storage));
        CAPTURE(beam);
        attention_config c = test::make_config(heads.hq, heads.hkv, d, w, budget);
        c.kv_storage = storage;
        const test::sequence seq(30 * w * budget + 3, heads.hq, heads.hkv, d, 2500u + static_cast<std::uint32_t>(heads.hkv));
        // scan_below = 0: every query searches (the default takes the flat scan's choice below 1024 candidates).
        attention<quest_beam_policies> narrow(c, r, {.index = {.branching = 2, .beam = beam, .exact_below = 0, .scan_below = 0}});
        std::vector<std::int32_t> expected_sel, sel;
        const auto expected = seq.run(narrow, 0, &expected_sel);
        for (int split : {1, 7, 37}) {
          CAPTURE(split);
          CHECK(seq.run(narrow, split, &sel) == expected);
          CHECK(sel == expected_sel);
        }
        attention<pooled_quest_beam> pooled(c, r, {.executor = thread_pool_executor(3), .index = {.branching = 2, .beam = beam, .exact_below = 0, .scan_below = 0}});
        CHECK(seq.run(pooled, 1) == expected);
        // A beam of one box per level misses chunks the flat scan picks: the test tells them apart.
        attention<quest_policies> flat(c, r);
        std::vector<std::int32_t> flat_sel;
        const auto flat_out = seq.run(flat, 0, &flat_sel);
        if (beam == 1) CHECK(flat_sel != expected_sel);
        // Up to exact_below candidates (the default's 1024 here) the beam holds every box.
        attention<quest_beam_policies> exact(c, r, {.index = {.branching = 2, .beam = beam, .scan_below = 0}});
        CHECK(seq.run(exact, 1, &sel) == flat_out);
        CHECK(sel == flat_sel);
        // Below scan_below (the default) the queries take the flat scan's scores in blocks: the
        // same bits in every split, and with the beam's search above it (scan_below 60).
        attention<quest_beam_policies> scanning(c, r, {.index = {.branching = 2, .beam = beam}});
        for (int split : {0, 1, 37}) {
          CHECK(seq.run(scanning, split, &sel) == flat_out);
          CHECK(sel == flat_sel);
        }
        // Exact for the early queries, the beam's for the later ones: still split-independent.
        attention<quest_beam_policies> mixed(c, r, {.index = {.branching = 2, .beam = beam, .exact_below = 60, .scan_below = 0}});
        std::vector<std::int32_t> mixed_sel;
        const auto mixed_out = seq.run(mixed, 0, &mixed_sel);
        CHECK(seq.run(mixed, 1, &sel) == mixed_out);
        CHECK(sel == mixed_sel);
        attention<quest_beam_policies> scan_then_beam(c, r, {.index = {.branching = 2, .beam = beam, .exact_below = 60, .scan_below = 60}});
        CHECK(seq.run(scan_then_beam, 0, &sel) == mixed_out);
        CHECK(sel == mixed_sel);
        CHECK(seq.run(scan_then_beam, 7, &sel) == mixed_out);
      }
  CHECK_THROWS_AS(attention<quest_beam_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.beam = 0}}), config_error);
  CHECK_THROWS_AS(attention<quest_beam_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.branching = 1}}), config_error);
  CHECK_THROWS_AS(attention<quest_beam_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.exact_below = -1}}), config_error);
  CHECK_THROWS_AS(attention<quest_beam_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.scan_below = -1}}), config_error);
  CHECK_THROWS_AS(attention<quest_index_policies>(test::make_config(4, 2, d, w, budget), r, {.index = {.branching = 1}}), config_error);
}

namespace {
using test::quest_cluster_policies;
using pooled_quest_clusters = test::pooled<quest_cluster_policies>;
}  // namespace

TEST_CASE("the key-cluster index: the same bits in prefill, decode, any split, thread count and after truncation; the flat scan's with the whole probe") {
  const int w = 4, budget = 5, d = 16;
  rope r(d, 10000.0, rope_layout::interleaved);
  // Segments of 8 chunks in 2 clusters; a probe of 4 chunks past 10 candidates (the test's
  // 150 chunks pass it from the 11th chunk on), or every chunk (probe_share 1).
  const key_cluster_index narrow_index{.segment_chunks = 8, .clusters = 2, .iterations = 3, .probe_share = 0.0f, .probe_min = 4, .exact_below = 10};
  key_cluster_index whole_index = narrow_index;
  whole_index.probe_share = 1.0f;
  for (head_layout heads : {mha, gqa})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::int8}) {
      CAPTURE(heads.hkv);
      CAPTURE(to_string(storage));
      attention_config c = test::make_config(heads.hq, heads.hkv, d, w, budget);
      c.kv_storage = storage;
      const test::sequence seq(30 * w * budget + 3, heads.hq, heads.hkv, d, 2700u + static_cast<std::uint32_t>(heads.hkv));
      attention<quest_policies> flat(c, r);
      std::vector<std::int32_t> flat_sel, sel;
      const auto flat_out = seq.run(flat, 0, &flat_sel);
      attention<quest_cluster_policies> whole(c, r, {.index = whole_index});
      for (int split : {0, 1, 37}) {
        CAPTURE(split);
        CHECK(seq.run(whole, split, &sel) == flat_out);
        CHECK(sel == flat_sel);
      }
      attention<quest_cluster_policies> narrow(c, r, {.index = narrow_index});
      std::vector<std::int32_t> expected_sel;
      auto cache = narrow.make_cache();
      const auto expected = seq.run(narrow, cache, 0, &expected_sel);
      CHECK(expected_sel != flat_sel);  // a probe of 4 chunks misses some: the test tells them apart
      CHECK(cache.index(0).clusters()[0].segments() == cache.full_chunks() / 8);
      CHECK(cache.bytes_by_kind().index > 0);
      for (int split : {1, 7, 37}) {
        CAPTURE(split);
        CHECK(seq.run(narrow, split, &sel) == expected);
        CHECK(sel == expected_sel);
      }
      attention<pooled_quest_clusters> pooled(c, r, {.executor = thread_pool_executor(3), .index = narrow_index});
      CHECK(seq.run(pooled, 1) == expected);
      // The box order alone (cluster_probe::box_bound): the same bits in every split too.
      key_cluster_index box_index = narrow_index;
      box_index.probe_order = cluster_probe::box_bound;
      attention<quest_cluster_policies> by_box(c, r, {.index = box_index});
      std::vector<std::int32_t> box_sel;
      const auto box_expected = seq.run(by_box, 0, &box_sel);
      for (int split : {1, 37}) {
        CAPTURE(split);
        CHECK(seq.run(by_box, split, &sel) == box_expected);
        CHECK(sel == box_sel);
      }
      // A read budget that binds (12 summaries: fewer than the probe's chunks and their boxes):
      // other chunks than without it, the same bits in every split.
      key_cluster_index budget_index = narrow_index;
      budget_index.read_max = 12;
      attention<quest_cluster_policies> budgeted(c, r, {.index = budget_index});
      std::vector<std::int32_t> budget_sel;
      const auto budget_expected = seq.run(budgeted, 0, &budget_sel);
      CHECK(budget_sel != expected_sel);
      for (int split : {1, 37}) {
        CAPTURE(split);
        CHECK(seq.run(budgeted, split, &sel) == budget_expected);
        CHECK(sel == budget_sel);
      }
      // Truncated back into a segment, then the same tokens again: the same bits.
      const int prefix = 21 * w, more = 60;
      std::vector<float> again(static_cast<std::size_t>(more) * heads.hq * d);
      auto rewound = narrow.make_cache();
      narrow.ingest(rewound, seq.qv(0, prefix + 50), seq.kv(0, prefix + 50), seq.vv(0, prefix + 50));
      rewound.truncate(prefix);
      CHECK(rewound.index(0).clusters()[0].segments() == 2);
      narrow.prefill(rewound, seq.qv(prefix, more), seq.kv(prefix, more), seq.vv(prefix, more), {again.data(), more, heads.hq, d});
      CHECK(std::equal(again.begin(), again.end(), expected.begin() + static_cast<std::ptrdiff_t>(prefix) * heads.hq * d));
    }
  const attention_config c = test::make_config(4, 2, d, w, budget);
  CHECK_THROWS_WITH_AS(attention<quest_cluster_policies>(c, r, {.index = {.clusters = 0}}), doctest::Contains("clusters in [1, segment_chunks]"),
                       config_error);
  CHECK_THROWS_AS(attention<quest_cluster_policies>(c, r, {.index = {.segment_chunks = 1}}), config_error);
  CHECK_THROWS_AS(attention<quest_cluster_policies>(c, r, {.index = {.probe_share = 1.5f}}), config_error);
  CHECK_THROWS_AS(attention<quest_cluster_policies>(c, r, {.index = {.iterations = -1}}), config_error);
  CHECK_THROWS_AS(attention<quest_cluster_policies>(c, r, {.index = {.probe_min = 8, .probe_max = 4}}), config_error);
  CHECK_THROWS_AS(attention<quest_cluster_policies>(c, r, {.index = {.read_max = -1}}), config_error);
}

TEST_CASE("spread encoding: the bits of encoding each chunk as it completes, in every split and thread count, a share of it per step") {
  const int budget = 4, d = 16;
  rope r(d, 10000.0, rope_layout::interleaved);
  for (int w : {8, 20})
    for (head_layout heads : {mha, gqa})
      for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
        CAPTURE(w);
        CAPTURE(heads.hkv);
        CAPTURE(std::string(to_string(storage)));
        attention_config eager = test::make_config(heads.hq, heads.hkv, d, w, budget);
        eager.kv_storage = storage;
        eager.spread_encoding = false;
        attention_config spread = eager;
        spread.spread_encoding = true;
        const test::sequence seq(14 * w + 5, heads.hq, heads.hkv, d, 2700u + static_cast<std::uint32_t>(w));
        attention<> at_completion(eager, r), spreading(spread, r);
        REQUIRE(at_completion.shape().spread_pieces == 0);
        REQUIRE(spreading.shape().spread_pieces == (w + 15) / 16 + 1);
        std::vector<std::int32_t> expected_sel, sel;
        const auto expected = seq.run(at_completion, 0, &expected_sel);
        for (int split : {0, 1, 7, 37}) {
          CAPTURE(split);
          CHECK(seq.run(spreading, split, &sel) == expected);
          CHECK(sel == expected_sel);
        }
        attention<threaded_policies> pooled(spread, r, {.executor = thread_pool_executor(3)});
        CHECK(seq.run(pooled, 1) == expected);
        CHECK(seq.run(pooled, 37) == expected);
        attention<representative_policies> representative_eager(eager, r), representative(spread, r);
        CHECK(seq.run(representative, 1) == seq.run(representative_eager, 0));

        // Token by token: after t tokens, scheduled_pieces(t) of the last full chunk's pieces
        // have run, a step runs at most its share, and every finished summary is the eager one.
        auto cache = spreading.make_cache(), reference = at_completion.make_cache();
        const std::int64_t total = cache.spread_total(), share = (total + w - 1) / w;
        CHECK(total == std::int64_t{spreading.shape().spread_pieces} * heads.hq);
        std::vector<float> out(static_cast<std::size_t>(heads.hq) * d);
        std::int64_t done_before = total, most = 0;  // nothing to finish before the first chunk
        for (int t = 0; t < seq.tokens; ++t) {
          spreading.decode(cache, seq.qv(t, 1), seq.kv(t, 1), seq.vv(t, 1), {out.data(), 1, heads.hq, d});
          if (cache.full_chunks() == 0) continue;
          CHECK(cache.pending_pieces_done() == cache.scheduled_pieces(t + 1));
          const bool new_chunk = (t + 1) % w == 0;
          most = std::max(most, cache.pending_pieces_done() - (new_chunk ? 0 : done_before) + (new_chunk ? total - done_before : 0));
          done_before = cache.pending_pieces_done();
        }
        CHECK(most <= share + 1);
        at_completion.ingest(reference, seq.qv(0, seq.tokens), seq.kv(0, seq.tokens), seq.vv(0, seq.tokens));
        CHECK(cache.summarised_chunks() == cache.full_chunks() - 1);
        for (int h = 0; h < heads.hq; ++h) {
          const auto spread_reps = cache.representations(h), eager_reps = reference.representations(h);
          CHECK(spread_reps.rows() == eager_reps.rows() - 1);
          CHECK(std::memcmp(spread_reps.data(), eager_reps.data(), static_cast<std::size_t>(spread_reps.rows() * spread_reps.cols()) * sizeof(float)) == 0);
        }

        // Back to a chunk boundary: starts the spread encoding of the chunk before it again when its
        // queries are still kept (== a cache that never went further), else keeps it finished; the
        // same bits after either.
        for (int boundary : {13, 6}) {
          CAPTURE(boundary);
          // In calls that end at the boundary and a chunk later (and, for 6, three more chunks:
          // the last one's queries take the buffer of the chunk before the boundary).
          auto rewound = spreading.make_cache();
          for (auto [from, count] : {std::pair{0, boundary * w}, std::pair{boundary * w, w}, std::pair{(boundary + 1) * w, boundary == 6 ? 3 * w : 0}})
            if (count > 0) spreading.ingest(rewound, seq.qv(from, count), seq.kv(from, count), seq.vv(from, count));
          rewound.truncate(boundary * w);
          CHECK(rewound.pending_pieces_done() == (boundary == 13 ? 0 : total));
          auto fresh = spreading.make_cache();
          spreading.ingest(fresh, seq.qv(0, boundary * w), seq.kv(0, boundary * w), seq.vv(0, boundary * w));
          CHECK((rewound == fresh) == (boundary == 13));
          const int more = seq.tokens - boundary * w;
          std::vector<float> again(static_cast<std::size_t>(more) * heads.hq * d);
          for (int t = 0; t < more; ++t)
            spreading.decode(rewound, seq.qv(boundary * w + t, 1), seq.kv(boundary * w + t, 1), seq.vv(boundary * w + t, 1),
                             {again.data() + static_cast<std::ptrdiff_t>(t) * heads.hq * d, 1, heads.hq, d});
          CHECK(std::equal(again.begin(), again.end(), expected.begin() + static_cast<std::ptrdiff_t>(boundary) * w * heads.hq * d));
          CHECK(rewound == cache);
        }
      }
  // Spreading needs the previous chunk read as local: with one local chunk, and for encoders
  // that cannot split their work, chunks are encoded as they complete.
  attention_config one_local = test::make_config(4, 2, d, 8, budget);
  one_local.local_chunks = 1;
  CHECK(attention<>(one_local, r).shape().spread_pieces == 0);
  CHECK(attention<quest_policies>(test::make_config(4, 2, d, 8, budget), r).shape().spread_pieces == 0);
}

TEST_CASE("rollback: random truncate and redo sequences give a fresh run's bits, across chunk boundaries where the cache allows") {
  // Keys-only encoders (and the baselines) go back to any length; the paper's encoder to a
  // chunk boundary or within the chunks whose queries the cache holds (rewindable_from).
  const int w = 8, budget = 4, d = 16, T = 160;
  rope r(d, 10000.0, rope_layout::interleaved);
  const test::sequence seq(T, 4, 2, d, 3100);
  // kept_full: full chunks before the furthest open chunk whose queries the cache keeps (the
  // ring of rollback_chunks; going back does not bring back what the ring dropped further on).
  auto property = [&](auto& a, const std::string& name, bool any_length, int min_cases = 150, int min_across = 40, int max_back = 12,
                      int kept_full = -1) {
    CAPTURE(name);
    const auto expected = seq.run(a, 0);
    std::mt19937 rng(17);
    int cases = 0, across = 0;
    for (int trial = 0; trial < 25; ++trial) {
      auto cache = a.make_cache();
      int furthest = 0;
      std::vector<float> out(static_cast<std::size_t>(T) * 4 * d);
      auto feed = [&](int from, int to) {  // in random call sizes
        for (int t = from; t < to;) {
          const int n = std::min<int>(to - t, 1 + static_cast<int>(rng() % 13));
          a.prefill(cache, seq.qv(t, n), seq.kv(t, n), seq.vv(t, n), {out.data() + static_cast<std::ptrdiff_t>(t) * 4 * d, n, 4, d});
          t += n;
        }
      };
      feed(0, 20 + static_cast<int>(rng() % 60));
      for (int step = 0; step < 8; ++step) {
        const auto tokens = static_cast<int>(cache.tokens());
        const int back = static_cast<int>(rng() % static_cast<unsigned>(max_back));  // a few rejected tokens, often across a boundary
        const int target = std::max(0, tokens - back);
        const bool allowed = any_length || target >= cache.rewindable_from() || target % w == 0;
        furthest = std::max(furthest, tokens);
        if (kept_full >= 0 && target >= (furthest / w - kept_full) * w) CHECK(allowed);  // within the chunks kept for rollback
        if (!allowed) {
          const kv_cache before = cache;
          CHECK_THROWS_AS(cache.truncate(target), limit_error);
          CHECK(cache == before);
          continue;
        }
        across += target / w < (tokens - 1) / w;
        cache.truncate(target);
        ++cases;
        const int redo = std::min(T, target + 1 + static_cast<int>(rng() % 20));
        feed(target, redo);
        REQUIRE(std::equal(out.begin() + static_cast<std::ptrdiff_t>(target) * 4 * d, out.begin() + static_cast<std::ptrdiff_t>(redo) * 4 * d,
                           expected.begin() + static_cast<std::ptrdiff_t>(target) * 4 * d));
      }
    }
    CHECK(cases >= min_cases);
    CHECK(across >= min_across);  // the property is exercised across chunk boundaries
    MESSAGE(name << ": " << cases << " rollbacks, " << across << " across a chunk boundary");
  };
  attention<quest_policies> quest(test::make_config(4, 2, d, w, budget), r);
  property(quest, "quest (keys only)", true);
  attention<quest_beam_policies> beam(test::make_config(4, 2, d, w, budget), r, {.index = {.branching = 2, .scan_below = 0}});
  property(beam, "quest through the beam index", true);
  attention<> paper(test::make_config(4, 2, d, w, budget), r);
  property(paper, "paper, spread encoding", false);
  attention_config eager = test::make_config(4, 2, d, w, budget);
  eager.spread_encoding = false;
  attention<> paper_eager(eager, r);
  // Without spreading only the open chunk's queries are kept: back across a boundary only to it,
  // or from an empty open chunk; the refusals leave the cache as it was (checked above).
  property(paper_eager, "paper, encoded at completion", false, 50, 1);
  // With rollback_chunks the paper's encoder keeps that many more chunks' queries: back to any
  // token of them (whatever call sizes fed them), spread or not.
  for (bool spread : {true, false}) {
    attention_config keeping = test::make_config(4, 2, d, w, budget);
    keeping.spread_encoding = spread;
    keeping.rollback_chunks = 3;
    attention<> paper_rollback(keeping, r);
    property(paper_rollback, spread ? "paper, spread, rollback_chunks 3" : "paper, at completion, rollback_chunks 3", false, 150, 60, 4 * w,
             spread ? 4 : 3);
  }
  for (int wrong : {-1, 257}) {
    attention_config bad = test::make_config(4, 2, d, w, budget);
    bad.rollback_chunks = wrong;
    CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("rollback_chunks must be in [0, 256]"), config_error);
  }
  attention<> dense(test::make_config(4, 2, d, w, budget, attention_method::dense), r);
  property(dense, "dense", true);
}

TEST_CASE("compact KV storage: chunk summaries come from the stored keys; an unknown storage is a config_error") {
  const int w = 8, budget = 4, d = 32, hq = 4, hkv = 2, T = 100;
  rope r(d);
  const test::sequence seq(T, hq, hkv, d, 77);
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    CAPTURE(to_string(storage));
    attention_config c = test::make_config(hq, hkv, d, w, budget);
    c.kv_storage = storage;
    attention<test::quest_policies> a(c, r);
    auto cache = a.make_cache();
    seq.run(a, cache);
    // Quest's summary is the per-channel [min | max] of the chunk's keys: exactly those of the
    // keys as stored (rounded to bf16, or quantized), read back through fp32_rows.
    std::vector<float> scratch(2 * static_cast<std::size_t>(w) * d);
    for (int g = 0; g < hkv; ++g) {
      const auto summaries = cache.representations(g * (hq / hkv));
      REQUIRE(summaries.rows() == cache.full_chunks());
      for (std::int64_t chunk = 0; chunk < cache.full_chunks(); ++chunk) {
        const float* keys = cache.fp32_rows(cache.kv_offset(chunk, g), w, scratch).first;
        for (int i = 0; i < d; ++i) {
          float lo = keys[i], hi = keys[i];
          for (int t = 1; t < w; ++t) lo = std::min(lo, keys[t * d + i]), hi = std::max(hi, keys[t * d + i]);
          CHECK(summaries(chunk, i) == lo);
          CHECK(summaries(chunk, d + i) == hi);
        }
      }
    }
  }
  attention_config bad = test::make_config(hq, hkv, d, w, budget);
  bad.kv_storage = static_cast<kv_precision>(7);
  CHECK_THROWS_WITH_AS(attention<>(bad, r), doctest::Contains("kv_storage must be fp32, bf16 or int8"), config_error);
}
