// Embeds LongHeads through the installed package and checks one call works end to end.
#include <longheads/longheads.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  longheads::attention_config config;
  config.n_q_heads = 4;
  config.n_kv_heads = 2;
  config.head_dim = 16;
  config.chunk_size = 8;
  config.budget_chunks = 4;
  longheads::attention<> attention(config, longheads::rope(16, 10000.0, longheads::rope_layout::half));
  auto cache = attention.make_cache();
  const int tokens = 100;
  std::vector<float> q(tokens * 4 * 16), k(tokens * 2 * 16), v(tokens * 2 * 16), out(tokens * 4 * 16);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.1f * static_cast<float>(i));
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.3f * static_cast<float>(i));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.7f * static_cast<float>(i));
  attention.prefill(cache, {q.data(), tokens, 4, 16}, {k.data(), tokens, 2, 16}, {v.data(), tokens, 2, 16},
                    {out.data(), tokens, 4, 16});
  for (float x : out)
    if (!std::isfinite(x)) return 1;
  std::printf("consumer: %lld tokens cached, head 0 read %zu chunks\n", static_cast<long long>(cache.tokens()),
              cache.last_selection(0).size());
  return cache.last_selection(0).size() == 4 ? 0 : 1;
}
