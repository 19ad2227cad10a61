// The README's quick look, compiled and run by CI (ctest docs_quickstart) so it cannot rot.
#include <cmath>
#include <cstdio>
#include <vector>

// [snippet:quickstart]
#include <longheads/longheads.hpp>

// q, k, v: your projections' buffers, pre-RoPE, token-major [T, heads, d], read in place.
std::size_t llama3_attention(const float* q, const float* k, const float* v, float* out, std::ptrdiff_t T,  //
                             const float* q1, const float* k1, const float* v1, float* out1) {
  longheads::attention_config config;
  config.n_q_heads = 32;      // H_q
  config.n_kv_heads = 8;      // H_kv (GQA: 4 query heads per kv head)
  config.head_dim = 128;      // d
  config.chunk_size = 256;    // w
  config.budget_chunks = 16;  // k: each head reads k*w = 4096 tokens per query
  const longheads::rope rope(128, 500000.0, longheads::rope_layout::half);
  longheads::attention<> attention(config, rope);  // one per layer

  longheads::kv_cache cache = attention.make_cache();  // one per layer per sequence
  attention.prefill(cache, {q, T, 32, 128}, {k, T, 8, 128}, {v, T, 8, 128}, {out, T, 32, 128});
  // ... then one token at a time:
  attention.decode(cache, {q1, 1, 32, 128}, {k1, 1, 8, 128}, {v1, 1, 8, 128}, {out1, 1, 32, 128});
  auto chunks_read = cache.last_selection(/*q_head=*/0);  // what head 0 looked at
  return chunks_read.size();
}
// [/snippet:quickstart]

int main() {
  const std::ptrdiff_t T = 600;  // inside the 4096-token budget: every head reads chunks 0..2
  std::vector<float> q(T * 32 * 128), k(T * 8 * 128), v(T * 8 * 128), out(T * 32 * 128), one(32 * 128), out1(32 * 128);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.001f * static_cast<float>(i));
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.003f * static_cast<float>(i));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.007f * static_cast<float>(i));
  for (std::size_t i = 0; i < one.size(); ++i) one[i] = std::cos(0.01f * static_cast<float>(i));
  const std::size_t read = llama3_attention(q.data(), k.data(), v.data(), out.data(), T, one.data(), one.data(), one.data(), out1.data());
  std::printf("quickstart: 601 tokens, head 0 read %zu chunks\n", read);
  for (float x : out1)
    if (!std::isfinite(x)) return 1;

  longheads::attention_config config;
  config.n_q_heads = 4;
  config.n_kv_heads = 2;
  config.head_dim = 32;
  config.chunk_size = 8;
  config.budget_chunks = 4;
  const longheads::rope rope(32);
  // [snippet:policy]
  // The policy that finds the passkey on passkey-256 (docs/results.md): Quest-style key bounds.
  struct my_policies : longheads::paper_policies {
    using encoder = longheads::key_bounds_encoder;
    using scorer = longheads::bound_scorer;
  };
  longheads::attention<my_policies> attention(config, rope);
  // [/snippet:policy]
  auto cache = attention.make_cache();
  attention.prefill(cache, {q.data(), 100, 4, 32}, {k.data(), 100, 2, 32}, {v.data(), 100, 2, 32}, {out.data(), 100, 4, 32});
  return read == 3 && cache.last_selection(0).size() == 4 ? 0 : 1;
}
