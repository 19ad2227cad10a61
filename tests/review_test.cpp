// Regression tests for the findings of the outside review of 57c2576 (issue 19): each failed
// there and passes now. The allocation finding is in allocation_test.cpp (it replaces the
// global operator new), the benchmark's in bench/CMakeLists.txt (filtered runs).
#include <doctest/doctest.h>

#include "test_support.hpp"

#include "../bench/counters.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <limits>
#include <thread>

using namespace longheads;

namespace {
bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float e) { return std::isfinite(e); });
}

/// Runs f on its own thread; a call still running after `seconds` is a deadlock: report and
/// end the process (the stuck thread cannot be joined).
template <class F>
void within_seconds(int seconds, const char* what, F f) {
  std::packaged_task<void()> task(std::move(f));
  auto done = task.get_future();
  std::thread(std::move(task)).detach();
  if (done.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "review_test: %s did not finish within %d s (deadlock)\n", what, seconds);
    std::_Exit(1);
  }
  done.get();
}
}  // namespace

// Finding 1: finite inputs that overflow after rotation, in a dot product or in bf16.
TEST_CASE("finite inputs whose rotation, logits or bf16 form would overflow are a value_error, cache unchanged") {
  const int w = 4, budget = 3, d = 8;
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    CAPTURE(to_string(storage));
    attention_config c = test::make_config(2, 1, d, w, budget);
    c.kv_storage = storage;
    attention<> a(c, rope(d));
    const test::sequence seq(20, 2, 1, d, 31);
    auto cache = a.make_cache();
    std::vector<float> out(20 * 2 * d);
    a.prefill(cache, seq.qv(0, 10), seq.kv(0, 10), seq.vv(0, 10), {out.data(), 10, 2, d});
    const kv_cache before = cache;
    for (auto [tensor, value] : {std::pair{0, 1e20f}, {1, 1e20f}, {1, 3e38f}, {2, 3.4e38f}, {2, -1e30f}}) {
      CAPTURE(tensor);
      CAPTURE(value);
      test::sequence big = seq;
      auto& target = tensor == 0 ? big.q : tensor == 1 ? big.k : big.v;
      std::fill(target.begin() + (12 * (tensor == 0 ? 2 : 1)) * d, target.begin() + (13 * (tensor == 0 ? 2 : 1)) * d, value);
      CHECK_THROWS_WITH_AS(a.prefill(cache, big.qv(10, 10), big.kv(10, 10), big.vv(10, 10), {out.data() + 10 * 2 * d, 10, 2, d}),
                           doctest::Contains("beyond the largest magnitude"), value_error);
      CHECK(cache == before);
    }
  }
}

TEST_CASE("inputs up to the largest accepted magnitude give finite outputs and a finite cache") {
  // Every element at the limit, same sign: the largest possible logits and rotated keys, with a
  // large softmax scale and YaRN's magnitude > 1.
  const int w = 4, budget = 3, d = 16, T = 40;
  const rope r(d, 10000.0, rope_layout::half, yarn_scaling{.factor = 64.0, .original_context = 64});
  for (attention_method method : {attention_method::longheads, attention_method::dense, attention_method::sink_window})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (float softmax_scale : {0.0f, 1000.0f}) {
        CAPTURE(to_string(method));
        CAPTURE(to_string(storage));
        attention_config c = test::make_config(4, 2, d, w, budget, method);
        c.kv_storage = storage;
        c.softmax_scale = softmax_scale;
        attention<> a(c, r);
        const float limit = a.max_input_magnitude();
        CHECK(limit > 1e6f);  // far above any real activation
        test::sequence seq(T, 4, 2, d, 32);
        for (auto* x : {&seq.q, &seq.k, &seq.v})
          for (std::size_t i = 0; i < x->size(); ++i) (*x)[i] = i % 3 == 0 ? -limit : limit;
        auto cache = a.make_cache();
        const auto out = seq.run(a, cache, 7);
        CHECK(all_finite(out));
        for (int h = 0; h < 4; ++h) {
          const auto reps = cache.representations(h);
          for (std::ptrdiff_t row = 0; row < reps.rows(); ++row)
            for (std::ptrdiff_t i = 0; i < reps.cols(); ++i) CHECK(std::isfinite(reps(row, i)));
        }
        // Just past the limit is refused.
        test::sequence past = seq;
        past.k[5] = std::nextafter(limit, std::numeric_limits<float>::infinity());
        auto fresh = a.make_cache();
        CHECK_THROWS_AS(past.run(a, fresh), value_error);
      }
}

// Finding 2.
TEST_CASE("ingest forgets the previous call's selection: it computed none") {
  const int w = 4, budget = 3, d = 8;
  attention<> a(test::make_config(2, 1, d, w, budget), rope(d));
  const test::sequence seq(40, 2, 1, d, 33);
  auto cache = a.make_cache();
  std::vector<float> out(30 * 2 * d);
  a.prefill(cache, seq.qv(0, 30), seq.kv(0, 30), seq.vv(0, 30), {out.data(), 30, 2, d});
  REQUIRE_FALSE(cache.last_selection(0).empty());
  a.ingest(cache, seq.qv(30, 10), seq.kv(30, 10), seq.vv(30, 10));
  for (int h = 0; h < 2; ++h) CHECK(cache.last_selection(h).empty());
}

// Finding 4: one pool shared by nested and concurrent callers.
TEST_CASE("thread pool: a parallel_for nested in another on the same pool completes") {
  const thread_pool_executor pool(3);
  within_seconds(30, "a nested parallel_for", [&] {
    std::vector<std::atomic<int>> seen(8 * 8);
    auto inner_outer = [&](std::size_t outer, std::size_t) {
      auto inner = [&](std::size_t i, std::size_t lane) {
        CHECK(lane < pool.lanes());
        seen[outer * 8 + i].fetch_add(1);
      };
      pool.parallel_for(8, index_task(inner));
    };
    pool.parallel_for(8, index_task(inner_outer));
    for (auto& s : seen) CHECK(s.load() == 1);
  });
}

TEST_CASE("thread pool: concurrent callers are not serialised") {
  // Caller A's first item waits until caller B's items have run. On a pool that lets one
  // caller in at a time, B cannot start before A ends: A's wait times out.
  const thread_pool_executor pool(2);
  within_seconds(60, "two concurrent parallel_for calls", [&] {
    std::atomic<bool> a_started{false}, b_ran{false}, a_waited_in_vain{false};
    std::thread a([&] {
      auto wait_for_b = [&](std::size_t item, std::size_t) {
        if (item != 0) return;
        a_started = true;
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!b_ran && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
        a_waited_in_vain = !b_ran;
      };
      pool.parallel_for(2, index_task(wait_for_b));
    });
    while (!a_started) std::this_thread::yield();
    auto mark = [&](std::size_t, std::size_t) { b_ran = true; };
    pool.parallel_for(4, index_task(mark));
    a.join();
    CHECK_FALSE(a_waited_in_vain.load());
  });
}

TEST_CASE("thread pool: concurrent sequences nesting layer work on one pool give the serial bits") {
  // A host running two sequences on two threads, each layer's attention on the same pool,
  // from inside the pool's own tasks as well.
  struct pooled : paper_policies {
    using executor = thread_pool_executor;
  };
  const int w = 8, budget = 4, d = 16;
  const thread_pool_executor pool(2);
  const test::sequence seq(150, 4, 2, d, 34);
  attention<> serial(test::make_config(4, 2, d, w, budget), rope(d));
  const auto expected = seq.run(serial, 5);
  within_seconds(120, "attention calls nested in the pool's tasks", [&] {
    std::vector<std::vector<float>> got(4);
    auto sequence_task = [&](std::size_t i, std::size_t) {
      attention<pooled> a(test::make_config(4, 2, d, w, budget), rope(d), {.executor = pool});
      got[i] = seq.run(a, 5);
    };
    std::thread other([&] { pool.parallel_for(2, index_task(sequence_task)); });
    auto second = [&](std::size_t i, std::size_t lane) { sequence_task(i + 2, lane); };
    pool.parallel_for(2, index_task(second));
    other.join();
    for (const auto& g : got) CHECK(g == expected);
  });
}

// Finding 8: validation lets the impossible through and refuses the valid.
TEST_CASE("a layer with the largest budget is constructed without tabulating it, and runs") {
  const int d = 8, w = 1024;
  attention_config c = test::make_config(1, 1, d, w, 1 << 20);  // L = 2^30 tokens
  c.sink_chunks = 1;
  c.local_chunks = 2;
  attention<> a(c, rope(d));
  const test::sequence seq(2 * w + 5, 1, 1, d, 35);
  attention<> dense(test::make_config(1, 1, d, w, 1 << 20, attention_method::dense), rope(d));
  CHECK(seq.run(a, 700) == seq.run(dense));
}

TEST_CASE("encoders need scratch linear in the chunk size, not quadratic") {
  attention_config c = test::make_config(1, 1, 128, 1 << 16, 4);
  CHECK(attention_pooled_encoder{}.scratch_floats(c) <= 64u * (1u << 16) + 1024u);
  CHECK(representative_keys_encoder{}.scratch_floats(c) <= 64u * (1u << 16) + 1024u);
}

TEST_CASE("configurations no memory can hold are a config_error naming the size") {
  attention_config c = test::make_config(64, 8, 1 << 14, 1 << 20, 4);  // one chunk's queries: 2^40 floats
  CHECK_THROWS_WITH_AS(attention<>(c, rope(1 << 14)), doctest::Contains("chunk_size * n_q_heads * head_dim"), config_error);
}

TEST_CASE("an interleaved [q|k|v|out] token buffer is accepted; a real overlap is not") {
  const int w = 4, budget = 3, d = 8, hq = 4, hkv = 2, T = 30;
  const int stride = (2 * hq + 2 * hkv) * d;  // q, k, v, out of one token side by side
  attention<> a(test::make_config(hq, hkv, d, w, budget), rope(d));
  const test::sequence seq(T, hq, hkv, d, 36);
  std::vector<float> fused(static_cast<std::size_t>(T + 1) * stride);
  for (int t = 0; t < T; ++t) {
    std::copy_n(seq.q.begin() + t * hq * d, hq * d, fused.begin() + t * stride);
    std::copy_n(seq.k.begin() + t * hkv * d, hkv * d, fused.begin() + t * stride + hq * d);
    std::copy_n(seq.v.begin() + t * hkv * d, hkv * d, fused.begin() + t * stride + (hq + hkv) * d);
  }
  float* base = fused.data();
  const tensor_view<const float> q(base, T, hq, d, stride), k(base + hq * d, T, hkv, d, stride), v(base + (hq + hkv) * d, T, hkv, d, stride);
  auto cache = a.make_cache();
  a.prefill(cache, q, k, v, {base + (hq + 2 * hkv) * d, T, hq, d, stride});
  std::vector<float> out(static_cast<std::size_t>(T) * hq * d);
  for (int t = 0; t < T; ++t) std::copy_n(fused.begin() + t * stride + (hq + 2 * hkv) * d, hq * d, out.begin() + t * hq * d);
  CHECK(out == seq.run(a));
  // out shifted by one head: each of its rows now covers the next token's first q head.
  auto other = a.make_cache();
  CHECK_THROWS_WITH_AS(a.prefill(other, q, k, v, {base + (hq + 2 * hkv + 1) * d, T, hq, d, stride}), doctest::Contains("out overlaps q"),
                       shape_error);
  CHECK(other.tokens() == 0);
}

// Finding 7: the prefill benchmark's flop count is the keys the queries really read.
TEST_CASE("the benchmark counts the keys each query reads") {
  const int w = 8, budget = 4, d = 8, T = 200;
  attention<> a(test::make_config(2, 1, d, w, budget), rope(d));
  const test::sequence seq(T, 2, 1, d, 37);
  std::vector<std::int32_t> sel;
  seq.run(a, 0, &sel);
  for (int p = 0; p < T; ++p)
    for (int h = 0; h < 2; ++h) {
      std::int64_t keys = 0;
      for (int s = 0; s < budget; ++s) {
        const std::int32_t c = sel[static_cast<std::size_t>((p * 2 + h) * budget + s)];
        if (c >= 0) keys += c == p / w ? p % w + 1 : w;
      }
      CAPTURE(p);
      CHECK(bench::keys_read(attention_method::longheads, p, w, budget) == keys);
    }
  CHECK(bench::keys_read(attention_method::dense, 150, w, budget) == 151);
}

TEST_CASE("RoPE tables: layers built from one tabulated rope share its table; no table grows with the context") {
  const int d = 2048, w = 16;  // d 2048: the 2^24-float cap is 8192 positions, reached by a short test
  rope r(d, 10000.0);
  r.tabulate(4 * w + w);
  const attention_config c = test::make_config(1, 1, d, w, 4);
  attention<> layer0(c, r), layer1(c, r);
  CHECK(layer0.rotary().shares_table_with(r));  // the layers' tables are the caller's, not copies
  CHECK(layer1.rotary().shares_table_with(layer0.rotary()));
  rope fresh(d, 10000.0);
  CHECK_FALSE(attention<>(c, fresh).rotary().shares_table_with(layer0.rotary()));
  // Dense rotates by deltas up to the context; past the cap it computes them (the same floats).
  attention<> dense(test::make_config(1, 1, d, w, 4, attention_method::dense), rope(d, 10000.0));
  const std::int64_t context = dense.rotary().max_table_positions() + 100;
  CHECK(context == (std::int64_t{1} << 24) / d + 100);
  const test::sequence seq(context, 1, 1, d, 41);
  auto cache = dense.make_cache();
  dense.ingest(cache, seq.qv(0, context - 1), seq.kv(0, context - 1), seq.vv(0, context - 1));
  std::vector<float> out(static_cast<std::size_t>(d));
  dense.decode(cache, seq.qv(context - 1, 1), seq.kv(context - 1, 1), seq.vv(context - 1, 1), {out.data(), 1, 1, d});
  CHECK(dense.rotary().tabulated_positions() <= dense.rotary().max_table_positions());
  // The same decode with a table over the whole context (the caller's, larger than the cap): the
  // same bits, since rotations past a table compute the floats the table would hold.
  rope whole(d, 10000.0);
  whole.tabulate(context);
  attention<> tabulated(test::make_config(1, 1, d, w, 4, attention_method::dense), whole);
  CHECK(tabulated.rotary().shares_table_with(whole));
  auto cache2 = tabulated.make_cache();
  tabulated.ingest(cache2, seq.qv(0, context - 1), seq.kv(0, context - 1), seq.vv(0, context - 1));
  std::vector<float> out2(out.size());
  tabulated.decode(cache2, seq.qv(context - 1, 1), seq.kv(context - 1, 1), seq.vv(context - 1, 1), {out2.data(), 1, 1, d});
  CHECK(out == out2);
}
