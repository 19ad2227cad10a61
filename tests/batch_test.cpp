// Batched prefill and decode (batch.hpp): every sequence gets the bits of calls of its own, for
// any thread count and any schedule of sequences joining and leaving; a bad sequence leaves
// every cache of the batch unchanged.
#include <doctest/doctest.h>

#include <longheads/longheads.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace longheads;

namespace {

using pooled_paper = test::pooled<>;
using pooled_quest_beam = test::pooled<test::quest_beam_policies>;
using pooled_quest_group = test::pooled<test::quest_group_policies<group_max_selection>>;

/// One sequence of a batched run: its inputs, how far it got, the calls it was given (token
/// counts) and what they wrote.
struct scheduled_sequence {
  test::sequence inputs;
  int join_round;           // the first round it may take part in
  int done = 0;             // tokens fed so far
  std::vector<int> splits;  // the token count of each call it took part in
  std::vector<float> out;
  std::vector<std::int32_t> selections;
};

/// Runs `sequences` sequences through batched calls on `threads` threads (random joins, leaves
/// and block sizes; decode batches when `decode_only`), then each sequence alone through calls
/// of the same sizes; outputs, selections and caches must be equal.
template <class Policies>
void check_batches_equal_separate_calls(const attention_config& config, typename attention<Policies>::policy_set policies, int sequences,
                                        bool decode_only, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const int hq = config.n_q_heads, hkv = config.n_kv_heads, d = config.head_dim, budget = config.budget_chunks;
  const bool records = config.method == attention_method::longheads;
  std::vector<scheduled_sequence> all;
  for (int i = 0; i < sequences; ++i) {
    const int tokens = std::uniform_int_distribution<int>(40, 260)(rng);
    all.push_back({test::sequence(tokens, hq, hkv, d, seed * 101 + static_cast<std::uint32_t>(i) * 7), std::uniform_int_distribution<int>(0, 6)(rng), 0, {}, {}, {}});
    all.back().out.assign(static_cast<std::size_t>(tokens) * hq * d, std::numeric_limits<float>::quiet_NaN());
    if (records) all.back().selections.assign(static_cast<std::size_t>(tokens) * hq * budget, -2);
  }
  attention<Policies> batched(config, rope(d), policies);
  std::vector<kv_cache> caches;
  for (int i = 0; i < sequences; ++i) caches.push_back(batched.make_cache());
  // Rounds until every sequence is done: each round takes the sequences that have joined and
  // are not done, each with probability 3/4 (the others sit this call out), in shuffled order.
  std::vector<sequence_call> batch;
  std::vector<int> order(static_cast<std::size_t>(sequences));
  for (int round = 0;; ++round) {
    bool left = false;
    batch.clear();
    for (int i = 0; i < sequences; ++i) order[static_cast<std::size_t>(i)] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      scheduled_sequence& s = all[static_cast<std::size_t>(i)];
      if (s.done == s.inputs.tokens) continue;
      left = true;
      if (round < s.join_round || std::uniform_int_distribution<int>(0, 3)(rng) == 0) continue;
      const int count = decode_only ? 1 : std::min(s.inputs.tokens - s.done, std::uniform_int_distribution<int>(1, 40)(rng));
      std::span<std::int32_t> selections;
      if (records)
        selections = std::span<std::int32_t>(s.selections).subspan(static_cast<std::size_t>(s.done) * hq * budget, static_cast<std::size_t>(count) * hq * budget);
      batch.push_back({&caches[static_cast<std::size_t>(i)], s.inputs.qv(s.done, count), s.inputs.kv(s.done, count), s.inputs.vv(s.done, count),
                       {s.out.data() + static_cast<std::ptrdiff_t>(s.done) * hq * d, count, hq, d}, selections});
      s.splits.push_back(count);
      s.done += count;
    }
    if (!left) break;
    if (decode_only) batched.decode(batch);
    else batched.prefill(batch);
  }
  // The same calls, one sequence at a time.
  attention<Policies> alone(config, rope(d), policies);
  for (int i = 0; i < sequences; ++i) {
    CAPTURE(i);
    const scheduled_sequence& s = all[static_cast<std::size_t>(i)];
    kv_cache cache = alone.make_cache();
    std::vector<float> out(s.out.size());
    std::vector<std::int32_t> selections(s.selections.size(), -2);
    int first = 0;
    for (int count : s.splits) {
      std::span<std::int32_t> sel;
      if (records) sel = std::span<std::int32_t>(selections).subspan(static_cast<std::size_t>(first) * hq * budget, static_cast<std::size_t>(count) * hq * budget);
      alone.prefill(cache, s.inputs.qv(first, count), s.inputs.kv(first, count), s.inputs.vv(first, count),
                    {out.data() + static_cast<std::ptrdiff_t>(first) * hq * d, count, hq, d}, sel);
      first += count;
    }
    CHECK(out == s.out);
    CHECK(selections == s.selections);
    CHECK(cache == caches[static_cast<std::size_t>(i)]);
  }
}

}  // namespace

TEST_CASE("batched decode and prefill give each sequence the bits of its own calls, any thread count, sequences joining and leaving") {
  std::uint32_t seed = 1;
  for (unsigned threads : {1u, 2u, 3u})
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (auto [hq, hkv] : {std::pair{4, 4}, std::pair{8, 2}})
        for (bool decode_only : {true, false}) {
          CAPTURE(threads);
          CAPTURE(to_string(storage));
          CAPTURE(hq);
          CAPTURE(decode_only);
          attention_config config = test::make_config(hq, hkv, 16, 16, 4);
          config.kv_storage = storage;
          const thread_pool_executor pool(threads);
          // The paper's encoder (its encoding spread over the next chunk), Quest through the
          // beam index (exercised from the first chunk: scan_below 0), a kv group selecting
          // together, and the two baselines.
          check_batches_equal_separate_calls<pooled_paper>(config, {.executor = pool}, 6, decode_only, ++seed);
          check_batches_equal_separate_calls<pooled_quest_beam>(
              config, {.executor = pool, .index = bound_tree_beam{.branching = 4, .beam = 2, .exact_below = 8, .scan_below = 0}}, 6, decode_only, ++seed);
          if (hq != hkv) check_batches_equal_separate_calls<pooled_quest_group>(config, {.executor = pool}, 5, decode_only, ++seed);
          for (attention_method m : {attention_method::dense, attention_method::sink_window}) {
            attention_config baseline = config;
            baseline.method = m;
            check_batches_equal_separate_calls<pooled_paper>(baseline, {.executor = pool}, 5, decode_only, ++seed);
          }
        }
}

TEST_CASE("a batch of one is the single call, and an empty batch does nothing") {
  const attention_config config = test::make_config(4, 2, 16, 16, 4);
  attention<pooled_paper> a(config, rope(16), {.executor = thread_pool_executor(2)});
  const test::sequence seq(100, 4, 2, 16, 5);
  kv_cache single = a.make_cache(), batched = a.make_cache();
  std::vector<float> out_single(seq.q.size()), out_batched(seq.q.size());
  for (int first = 0; first < seq.tokens; first += 33) {
    const int count = std::min(33, seq.tokens - first);
    const tensor_view<float> o1{out_single.data() + first * 4 * 16, count, 4, 16}, o2{out_batched.data() + first * 4 * 16, count, 4, 16};
    a.prefill(single, seq.qv(first, count), seq.kv(first, count), seq.vv(first, count), o1);
    const sequence_call call{&batched, seq.qv(first, count), seq.kv(first, count), seq.vv(first, count), o2};
    a.prefill({&call, 1});
  }
  CHECK(out_single == out_batched);
  CHECK(single == batched);
  const kv_cache before = batched;
  a.prefill(std::span<const sequence_call>{});
  a.decode(std::span<const sequence_call>{});
  CHECK(batched == before);
}

TEST_CASE("a bad sequence in a batch is a named error and leaves every cache of the batch unchanged") {
  const int hq = 4, hkv = 2, d = 16;
  const attention_config config = test::make_config(hq, hkv, d, 16, 4);
  attention<pooled_paper> a(config, rope(d), {.executor = thread_pool_executor(2)});
  std::vector<test::sequence> seqs;
  std::vector<kv_cache> caches;
  for (int i = 0; i < 3; ++i) {
    seqs.emplace_back(80, hq, hkv, d, 40 + static_cast<std::uint32_t>(i));
    caches.push_back(a.make_cache());
    std::vector<float> out(static_cast<std::size_t>(70) * hq * d);
    a.prefill(caches.back(), seqs.back().qv(0, 70), seqs.back().kv(0, 70), seqs.back().vv(0, 70), {out.data(), 70, hq, d});
  }
  const std::vector<kv_cache> before = caches;
  std::vector<float> out(static_cast<std::size_t>(3) * 4 * hq * d);
  auto out_of = [&](int i, int count = 1) { return tensor_view<float>{out.data() + i * 4 * hq * d, count, hq, d}; };
  auto good = [&](int i, int count = 1) {
    return sequence_call{&caches[static_cast<std::size_t>(i)], seqs[static_cast<std::size_t>(i)].qv(70, count),
                         seqs[static_cast<std::size_t>(i)].kv(70, count), seqs[static_cast<std::size_t>(i)].vv(70, count), out_of(i, count)};
  };
  auto expect_error = [&](std::vector<sequence_call> batch, bool decode, const std::string& says, auto error_type) {
    using error_t = decltype(error_type);
    bool thrown = false;
    try {
      if (decode) a.decode(batch);
      else a.prefill(batch);
    } catch (const error_t& e) {
      thrown = true;
      CHECK_MESSAGE(std::string(e.what()).find(says) != std::string::npos, e.what());
    }
    CHECK_MESSAGE(thrown, says);
    for (std::size_t i = 0; i < caches.size(); ++i) CHECK(caches[i] == before[i]);
  };
  // A shape error in the last sequence, after two good ones.
  sequence_call wrong_shape = good(2);
  wrong_shape.k = seqs[2].qv(70, 1);  // H_q heads where H_kv belong
  expect_error({good(0), good(1), wrong_shape}, true, "decode: sequence 2: k has shape [1, 4, 16], expected [1, 2, 16]", shape_error{""});
  // A non-finite value in the middle one.
  std::vector<float> nan_q(seqs[1].q.begin() + 70 * hq * d, seqs[1].q.begin() + 71 * hq * d);
  nan_q[5] = std::numeric_limits<float>::quiet_NaN();
  sequence_call with_nan = good(1);
  with_nan.q = {nan_q.data(), 1, hq, d};
  expect_error({good(0), with_nan, good(2)}, false, "prefill: sequence 1: q[token 0, head 0, dim 5] is nan", value_error{""});
  // Two tokens in a decode batch.
  expect_error({good(0), good(1, 2), good(2)}, true, "decode: sequence 1: q has 2 tokens, expected 1", shape_error{""});
  // One cache for two sequences.
  sequence_call same_cache = good(2);
  same_cache.cache = &caches[0];
  expect_error({good(0), good(1), same_cache}, true, "decode: sequence 0's cache is also sequence 2's", shape_error{""});
  // An out that is another sequence's out, or its input.
  sequence_call shared_out = good(2);
  shared_out.out = out_of(0);
  expect_error({good(0), good(1), shared_out}, false, "prefill: sequence 0's out overlaps sequence 2's out", shape_error{""});
  std::vector<float> fused(static_cast<std::size_t>(hq) * d);
  sequence_call reads_out = good(1);
  reads_out.q = {fused.data(), 1, hq, d};
  sequence_call writes_it = good(0);
  writes_it.out = {fused.data(), 1, hq, d};
  expect_error({writes_it, reads_out}, true, "decode: sequence 0's out overlaps sequence 1's q", shape_error{""});
  // No cache at all.
  sequence_call no_cache = good(1);
  no_cache.cache = nullptr;
  expect_error({good(0), no_cache}, true, "decode: sequence 1: no cache (null pointer)", shape_error{""});
  // A cache of another layer's shape.
  kv_cache foreign = attention<pooled_paper>(test::make_config(hq, hkv, d, 32, 4), rope(d), {.executor = thread_pool_executor(1)}).make_cache();
  sequence_call foreign_cache = good(0);
  foreign_cache.cache = &foreign;
  expect_error({good(1), foreign_cache}, true, "decode: sequence 1: cache has shape", shape_error{""});
  // After all that the same batch, well formed, still works.
  std::vector<sequence_call> fine{good(0), good(1), good(2)};
  a.decode(fine);
  for (std::size_t i = 0; i < caches.size(); ++i) CHECK(caches[i].tokens() == 71);
}
