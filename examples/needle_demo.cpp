// SPDX-License-Identifier: MIT
// needle_demo: a self-contained planted-needle retrieval on synthetic tensors.
//
// A haystack of random keys/values, with one chunk far back whose keys point along a secret
// direction and whose values carry a "message" vector. The last query points along the secret
// direction. LongHeads (budget L tokens) has to find that chunk among all of them; sink+window
// with the same budget cannot see it. Runs without any model file.
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {
struct threaded : longheads::paper_policies {
  using executor = longheads::thread_pool_executor;
};

double cosine(const float* a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  return ab / std::sqrt(aa * bb + 1e-30);
}
}  // namespace

int main(int argc, char** argv) {
  long tokens = 131072;
  int chunk_size = 64, chunks = 8, heads = 4, head_dim = 32, threads = 2;
  double depth = 0.3;
  CLI::App app{"Planted-needle retrieval with LongHeads on synthetic tensors (no model needed).", "needle_demo"};
  app.add_option("--tokens", tokens, "context length")->capture_default_str()->check(CLI::Range(256L, 1L << 22));
  app.add_option("--chunk-size", chunk_size, "tokens per chunk")->capture_default_str();
  app.add_option("--chunks", chunks, "chunks per head per query (budget = chunks * chunk-size)")->capture_default_str();
  app.add_option("--depth", depth, "needle depth in [0, 1]")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  app.add_option("--threads", threads, "threads")->capture_default_str()->check(CLI::Range(1, 256));
  CLI11_PARSE(app, argc, argv);

  const int d = head_dim;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random_vector = [&](std::size_t n) {
    std::vector<float> x(n);
    for (float& e : x) e = normal(rng);
    return x;
  };
  const auto T = static_cast<std::size_t>(tokens);
  std::vector<float> q = random_vector(T * heads * d), k = random_vector(T * heads * d), v = random_vector(T * heads * d);
  // The secret direction lives in slowly rotating RoPE pairs, so it survives local rotation.
  std::vector<float> secret(static_cast<std::size_t>(d), 0.0f), message = random_vector(static_cast<std::size_t>(d));
  for (int i = d / 4; i < d / 2; ++i) secret[i] = secret[i + d / 2] = 1.0f;
  const long budget_chunks_total = tokens / chunk_size;
  const long needle_chunk = std::max(1L, std::min(budget_chunks_total - 3, static_cast<long>(depth * budget_chunks_total)));
  for (long t = needle_chunk * chunk_size; t < (needle_chunk + 1) * chunk_size; ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < d; ++i) {
        k[(t * heads + h) * d + i] = 3.0f * secret[i];
        v[(t * heads + h) * d + i] = message[i];
      }
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < d; ++i) q[((T - 1) * heads + h) * d + i] = 2.0f * secret[i];

  std::printf("needle_demo: %ld tokens, needle in chunk %ld of %ld (depth %.2f), budget %d x %d = %d tokens (%.0fx shorter)\n",
              tokens, needle_chunk, budget_chunks_total, depth, chunks, chunk_size, chunks * chunk_size,
              static_cast<double>(tokens) / (chunks * chunk_size));
  std::printf("%-12s %10s %14s %24s\n", "method", "seconds", "tokens/s", "output . message (cos)");
  int failures = 0;
  for (auto method : {longheads::attention_method::longheads, longheads::attention_method::sink_window}) {
    longheads::attention_config config;
    config.n_q_heads = config.n_kv_heads = heads;
    config.head_dim = d;
    config.chunk_size = chunk_size;
    config.budget_chunks = chunks;
    config.method = method;
    longheads::attention<threaded> attention(config, longheads::rope(d, 10000.0, longheads::rope_layout::half),
                                             {.executor = longheads::thread_pool_executor(static_cast<std::size_t>(threads))});
    auto cache = attention.make_cache(tokens);
    std::vector<float> out(T * heads * d);
    const auto start = std::chrono::steady_clock::now();
    const long block = 4096;
    for (long first = 0; first < tokens; first += block) {
      const long n = std::min(block, tokens - first);
      attention.prefill(cache, {q.data() + first * heads * d, n, heads, d}, {k.data() + first * heads * d, n, heads, d},
                        {v.data() + first * heads * d, n, heads, d}, {out.data() + first * heads * d, n, heads, d});
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double worst = 1.0;
    for (int h = 0; h < heads; ++h) worst = std::min(worst, cosine(out.data() + ((T - 1) * heads + h) * d, message));
    std::printf("%-12s %10.2f %14.0f %24.3f\n", longheads::to_string(method), seconds, tokens / seconds, worst);
    if (method == longheads::attention_method::longheads) {
      for (int h = 0; h < heads; ++h) {
        auto s = cache.last_selection(h);
        std::printf("  head %d read chunks:", h);
        for (auto c : s) std::printf(" %d%s", c, c == needle_chunk ? "*" : "");
        std::printf("\n");
        failures += std::find(s.begin(), s.end(), needle_chunk) == s.end();
      }
    }
  }
  std::printf("%s: LongHeads %s the needle (* marks its chunk) in every head.\n", failures ? "FAIL" : "OK",
              failures ? "missed" : "found");
  return failures ? 1 : 0;
}
