// The tests docs/custom-policy.md shows for a new chunk encoder: the ones every shipped policy
// has (fits the budget -> dense; any split of the sequence -> the same bits; a naive reference).
#include <doctest/doctest.h>

#include <longheads/reference/attention.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "../examples/docs/loudest_keys_encoder.hpp"

// [snippet:test]
namespace {
constexpr int T = 200, n_q = 4, n_kv = 2, d = 16;

std::vector<float> random_floats(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

longheads::attention_config small_config(longheads::attention_method method = longheads::attention_method::longheads) {
  longheads::attention_config cfg;
  cfg.n_q_heads = n_q;
  cfg.n_kv_heads = n_kv;
  cfg.head_dim = d;
  cfg.chunk_size = 8;
  cfg.budget_chunks = 4;  // L = 32 tokens: T = 200 is 6x the budget
  cfg.method = method;
  return cfg;
}

struct sequence {
  std::vector<float> q = random_floats(T * n_q * d, 1), k = random_floats(T * n_kv * d, 2), v = random_floats(T * n_kv * d, 3);

  /// Feeds the first `tokens` tokens in calls of `split` tokens; returns [tokens, n_q, d].
  template <class Attention>
  std::vector<float> run(Attention& attention, int tokens, int split, std::vector<std::int32_t>* selections = nullptr) const {
    auto cache = attention.make_cache();
    std::vector<float> out(std::size_t(tokens) * n_q * d);
    const int budget = attention.config().budget_chunks;
    if (selections) selections->assign(std::size_t(tokens) * n_q * budget, -1);
    for (int t0 = 0; t0 < tokens; t0 += split) {
      const int n = std::min(split, tokens - t0);
      std::span<std::int32_t> sel;
      if (selections) sel = std::span(*selections).subspan(std::size_t(t0) * n_q * budget, std::size_t(n) * n_q * budget);
      attention.prefill(cache, {q.data() + t0 * n_q * d, n, n_q, d}, {k.data() + t0 * n_kv * d, n, n_kv, d},
                        {v.data() + t0 * n_kv * d, n, n_kv, d}, {out.data() + t0 * n_q * d, n, n_q, d}, sel);
    }
    return out;
  }
};

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}
}  // namespace

TEST_CASE("loudest_keys_encoder: exact inside the budget, split-invariant, equal to a naive reference") {
  const longheads::rope rope(d);
  const sequence seq;
  longheads::attention<loudest_keys_policies> attention(small_config(), rope, {.encoder = {.count = 2}});

  // 1. While the context fits the budget, LongHeads is dense causal attention, bit for bit.
  longheads::attention<> dense(small_config(longheads::attention_method::dense), rope);
  const auto inside = seq.run(attention, 32, 32), dense_out = seq.run(dense, 32, 32);
  CHECK(inside == dense_out);

  // 2. Prefill, decode token by token and any other split give the same bits.
  std::vector<std::int32_t> selections;
  const auto whole = seq.run(attention, T, T, &selections);
  CHECK(seq.run(attention, T, 1) == whole);
  CHECK(seq.run(attention, T, 37) == whole);

  // 3. The naive double-precision LongHeads with the same encoder and score, written plainly.
  longheads::reference::problem problem;
  problem.tokens = T;
  problem.n_q_heads = n_q;
  problem.n_kv_heads = n_kv;
  problem.head_dim = d;
  problem.q = seq.q.data();
  problem.k = seq.k.data();
  problem.v = seq.v.data();
  problem.inverse_frequencies.assign(rope.inverse_frequencies().begin(), rope.inverse_frequencies().end());
  longheads::reference::longheads_settings settings{.chunk_size = 8, .budget_chunks = 4};
  settings.encode = [](const auto&, const longheads::reference::matrix& keys, const auto&) {
    std::vector<std::size_t> order(keys.size());
    for (std::size_t j = 0; j < order.size(); ++j) order[j] = j;
    auto norm = [&](std::size_t j) { return longheads::reference::dot(keys[j], keys[j]); };
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return norm(a) > norm(b); });
    std::vector<double> mean(keys[0].size(), 0.0);
    for (std::size_t j : {order[0], order[1]})
      for (std::size_t i = 0; i < mean.size(); ++i) mean[i] += keys[j][i] / 2;
    return mean;
  };
  settings.score = [&](const std::vector<double>& q, const std::vector<double>& representation, std::int64_t p) {
    return longheads::reference::dot(problem.rotated(q, double(p % 8 + 8)), representation);  // offset_chunks = 1
  };
  std::vector<std::int32_t> expected_selections;
  const auto expected = longheads::reference::longheads(problem, settings, &expected_selections);
  CHECK(selections == expected_selections);
  CHECK(max_abs_diff(whole, expected) <= 1e-4);

  // 4. Impossible settings are refused when the attention is built.
  CHECK_THROWS_AS(longheads::attention<loudest_keys_policies>(small_config(), rope, {.encoder = {.count = 9}}),
                  longheads::config_error);
}
// [/snippet:test]
