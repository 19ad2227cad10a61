// Randomised properties: hundreds of random configurations and call sequences against the
// naive references. The seed is printed with every failure; replay one with
//   LONGHEADS_PROPERTY_SEED=<seed> longheads_tests -tc="random*"
#include <doctest/doctest.h>

#include "test_support.hpp"

#include <cstdlib>
#include <sstream>

using namespace longheads;

namespace {

struct random_case {
  attention_config config;
  rope_layout layout = rope_layout::half;
  int tokens = 0;
  std::vector<int> calls;  // sizes of the prefill calls, summing to tokens
  std::uint32_t data_seed = 0;

  std::string describe() const {
    std::ostringstream s;
    s << to_string(config.method) << " H_q " << config.n_q_heads << " H_kv " << config.n_kv_heads << " d " << config.head_dim << " w "
      << config.chunk_size << " k " << config.budget_chunks << " sinks " << config.sink_chunks << " locals " << config.local_chunks
      << " sink_tokens " << config.sink_tokens << (layout == rope_layout::half ? " half" : " interleaved") << " T " << tokens << " calls";
    for (int c : calls) s << ' ' << c;
    return s.str();
  }
};

random_case draw(std::mt19937& rng) {
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  random_case c;
  const int group = uniform(1, 3);
  c.config.n_kv_heads = uniform(1, 3);
  c.config.n_q_heads = c.config.n_kv_heads * group;
  c.config.head_dim = 2 * uniform(1, 12);
  c.config.chunk_size = uniform(1, 9);
  c.config.local_chunks = uniform(1, 3);
  c.config.sink_chunks = uniform(0, 2);
  c.config.budget_chunks = c.config.sink_chunks + c.config.local_chunks + uniform(0, 3);
  if (c.config.budget_chunks == 0) c.config.budget_chunks = 1;
  const int method = uniform(0, 5);  // mostly LongHeads
  c.config.method = method == 0 ? attention_method::dense : method == 1 ? attention_method::sink_window : attention_method::longheads;
  c.config.sink_tokens = uniform(0, static_cast<int>(std::min<std::int64_t>(4, c.config.budget_tokens() - 1)));
  c.layout = uniform(0, 1) ? rope_layout::half : rope_layout::interleaved;
  c.tokens = uniform(1, static_cast<int>(4 * c.config.budget_tokens()) + 2 * c.config.chunk_size + 3);
  for (int left = c.tokens; left > 0;) {
    const int n = std::min(left, uniform(0, 3) == 0 ? uniform(1, c.tokens) : uniform(1, 2 * c.config.chunk_size + 1));
    c.calls.push_back(n);
    left -= n;
  }
  c.data_seed = static_cast<std::uint32_t>(rng());
  return c;
}

}  // namespace

TEST_CASE("random configurations and call sequences agree with the naive references") {
  const char* env = std::getenv("LONGHEADS_PROPERTY_SEED");
  const std::uint32_t first_seed = env ? static_cast<std::uint32_t>(std::strtoul(env, nullptr, 10)) : 20261123u;
  const int cases = env ? 1 : 600;
  for (int n = 0; n < cases; ++n) {
    const std::uint32_t seed = first_seed + static_cast<std::uint32_t>(n);
    std::mt19937 rng(seed);
    const random_case c = draw(rng);
    const std::string config = c.describe();
    CAPTURE(seed);
    CAPTURE(config);
    rope r(c.config.head_dim, 10000.0, c.layout);
    attention<> a(c.config, r);
    const test::sequence seq(c.tokens, c.config.n_q_heads, c.config.n_kv_heads, c.config.head_dim, c.data_seed);
    const bool selects = c.config.method == attention_method::longheads;

    // The random call sequence.
    auto cache = a.make_cache();
    std::vector<float> out(static_cast<std::size_t>(c.tokens) * c.config.n_q_heads * c.config.head_dim);
    std::vector<std::int32_t> sel(selects ? static_cast<std::size_t>(c.tokens) * c.config.n_q_heads * c.config.budget_chunks : 0);
    int first = 0;
    for (int count : c.calls) {
      std::span<std::int32_t> s;
      if (selects)
        s = std::span<std::int32_t>(sel).subspan(static_cast<std::size_t>(first) * c.config.n_q_heads * c.config.budget_chunks,
                                                 static_cast<std::size_t>(count) * c.config.n_q_heads * c.config.budget_chunks);
      a.prefill(cache, seq.qv(first, count), seq.kv(first, count), seq.vv(first, count),
                {out.data() + static_cast<std::ptrdiff_t>(first) * c.config.n_q_heads * c.config.head_dim, count, c.config.n_q_heads,
                 c.config.head_dim},
                s);
      first += count;
    }
    REQUIRE(cache.tokens() == c.tokens);

    // Same bits as one call and as token-by-token decode.
    CHECK(seq.run(a) == out);
    CHECK(seq.run(a, 1) == out);

    // The naive reference of the method.
    const auto pr = seq.problem(r);
    std::vector<std::int32_t> expected_sel;
    const auto expected = c.config.method == attention_method::dense ? reference::dense_causal(pr)
                          : c.config.method == attention_method::sink_window
                              ? reference::sink_window(pr, c.config.budget_tokens(), c.config.sink_tokens)
                              : reference::longheads(pr,
                                                     {.chunk_size = c.config.chunk_size,
                                                      .budget_chunks = c.config.budget_chunks,
                                                      .sink_chunks = c.config.sink_chunks,
                                                      .local_chunks = c.config.local_chunks},
                                                     &expected_sel);
    CHECK(test::max_abs_diff(out, expected) <= 1e-4);
    if (selects) {
      CHECK(sel == expected_sel);
      // Fits the budget -> exactly dense: the dense method's bits.
      if (c.tokens <= c.config.budget_tokens()) {
        attention_config dense_config = c.config;
        dense_config.method = attention_method::dense;
        attention<> dense(dense_config, r);
        CHECK(seq.run(dense) == out);
      }
    }
  }
}
