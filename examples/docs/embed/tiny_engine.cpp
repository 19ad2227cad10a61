// A toy inference engine with its own weights, projections and buffers, using LongHeads for
// attention: the program docs/embedding.md walks through. It checks itself: while the context
// fits the budget, LongHeads must equal dense attention; then it runs far past the budget.
// [snippet:include]
#include <longheads/longheads.hpp>
// [/snippet:include]

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <span>
#include <vector>

namespace {

// [snippet:shape]
constexpr int n_q_heads = 8, n_kv_heads = 2, head_dim = 64;  // GQA: 4 query heads per kv head
constexpr int dim = n_q_heads * head_dim;                    // the model width
constexpr int qkv_width = (n_q_heads + 2 * n_kv_heads) * head_dim;

longheads::attention_config make_config(longheads::attention_method method,
                                        longheads::kv_precision storage = longheads::kv_precision::fp32) {
  longheads::attention_config config;
  config.n_q_heads = n_q_heads;
  config.n_kv_heads = n_kv_heads;
  config.head_dim = head_dim;
  config.chunk_size = 64;    // w
  config.budget_chunks = 8;  // k: every head reads k*w = 512 tokens per query, the trained context
  config.method = method;
  config.kv_storage = storage;  // fp32, bf16 (half the bytes) or int8 (a quarter and a bit)
  return config;
}
// [/snippet:shape]

// [snippet:policies]
// The selection policy that found the passkey on our test model (docs/results.md), run on a
// pool of 2 threads. Any field not named here keeps the paper's behaviour.
struct engine_policies : longheads::paper_policies {
  using encoder = longheads::key_bounds_encoder;
  using scorer = longheads::bound_scorer;
  using index = longheads::bound_tree_beam;  // O(log n) summaries per query: flat cost per token at any context
  using executor = longheads::thread_pool_executor;
};
using engine_attention = longheads::attention<engine_policies>;
// [/snippet:policies]

/// One attention layer of the engine: a fused QKV projection into the engine's own buffer,
/// LongHeads on views of it, an output projection and a residual.
class layer {
 public:
  // [snippet:layer]
  layer(const longheads::rope& rope, longheads::attention_method method, const longheads::thread_pool_executor& pool,
        std::uint32_t seed, longheads::kv_precision storage = longheads::kv_precision::fp32)
      : attention_(make_config(method, storage), rope, {.executor = pool}) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(dim)));
    w_qkv_.resize(std::size_t{dim} * qkv_width);
    w_out_.resize(std::size_t{dim} * dim);
    for (float& x : w_qkv_) x = normal(rng);
    for (float& x : w_out_) x = normal(rng);
  }

  // One cache per layer per sequence; reserving up front (tokens, prefill block, sequences
  // decoded together) keeps later calls allocation-free.
  longheads::kv_cache new_sequence(std::int64_t max_tokens) {
    attention_.reserve(max_tokens, /*block_tokens=*/256, /*sequences=*/8);
    return attention_.make_cache(max_tokens);
  }
  // [/snippet:layer]

  // [snippet:forward]
  /// x: [T, dim], updated in place (x += attention(x) W_out).
  void forward(longheads::kv_cache& cache, float* x, std::ptrdiff_t tokens) {
    qkv_.resize(static_cast<std::size_t>(tokens) * qkv_width);
    attended_.resize(static_cast<std::size_t>(tokens) * dim);
    project(x, tokens, dim, w_qkv_.data(), qkv_width, qkv_.data());

    // Zero-copy views into the fused buffer: q, k and v of a token sit side by side, so each
    // view strides over a whole qkv row. RoPE is applied by the library, so pass them pre-RoPE.
    const float* row = qkv_.data();
    const longheads::tensor_view<const float> q(row, tokens, n_q_heads, head_dim, qkv_width);
    const longheads::tensor_view<const float> k(row + dim, tokens, n_kv_heads, head_dim, qkv_width);
    const longheads::tensor_view<const float> v(row + dim + n_kv_heads * head_dim, tokens, n_kv_heads, head_dim, qkv_width);
    attention_.prefill(cache, q, k, v, {attended_.data(), tokens, n_q_heads, head_dim});

    delta_.resize(static_cast<std::size_t>(tokens) * dim);
    project(attended_.data(), tokens, dim, w_out_.data(), dim, delta_.data());
    for (std::size_t i = 0; i < delta_.size(); ++i) x[i] += delta_[i];
  }
  // [/snippet:forward]

  // [snippet:batch]
  /// One decode step of several sequences: x holds one token's row per sequence ([B, dim]),
  /// caches[i] is sequence i's cache of this layer. One projection over all B rows, one
  /// attention call over all B sequences (their (sequence, kv group) items share the pool).
  void decode_batch(std::span<longheads::kv_cache* const> caches, float* x) {
    const auto sequences = static_cast<std::ptrdiff_t>(caches.size());
    qkv_.resize(static_cast<std::size_t>(sequences) * qkv_width);
    attended_.resize(static_cast<std::size_t>(sequences) * dim);
    project(x, sequences, dim, w_qkv_.data(), qkv_width, qkv_.data());
    calls_.clear();
    for (std::ptrdiff_t i = 0; i < sequences; ++i) {
      const float* row = qkv_.data() + i * qkv_width;
      calls_.push_back({caches[static_cast<std::size_t>(i)], {row, 1, n_q_heads, head_dim}, {row + dim, 1, n_kv_heads, head_dim},
                        {row + dim + n_kv_heads * head_dim, 1, n_kv_heads, head_dim}, {attended_.data() + i * dim, 1, n_q_heads, head_dim}});
    }
    attention_.decode(calls_);
    delta_.resize(static_cast<std::size_t>(sequences) * dim);
    project(attended_.data(), sequences, dim, w_out_.data(), dim, delta_.data());
    for (std::size_t i = 0; i < delta_.size(); ++i) x[i] += delta_[i];
  }
  // [/snippet:batch]

  // [snippet:session]
  /// Session files: this layer's caches of some sequences saved to one file, and loaded back
  /// (a model saves every layer's caches, in layer order, to one cache_file_writer).
  void save(const std::filesystem::path& path, std::span<const longheads::kv_cache> caches) const {
    longheads::cache_file_writer file(path);  // writes path.partial, renamed by commit()
    for (const longheads::kv_cache& cache : caches) file.save(attention_, cache);
    file.commit();
  }
  std::vector<longheads::kv_cache> load(const std::filesystem::path& path, std::size_t sequences, std::int64_t max_tokens) const {
    longheads::cache_file_reader file(path);  // mapped; every record checked before it is used
    std::vector<longheads::kv_cache> caches;
    for (std::size_t i = 0; i < sequences; ++i) caches.push_back(file.load(attention_, max_tokens));
    file.expect_end();
    return caches;
  }
  // [/snippet:session]

 private:
  /// out[T, cols] = in[T, rows] W[rows, cols]: the engine's own projection (a real engine
  /// calls its BLAS here).
  static void project(const float* in, std::ptrdiff_t tokens, int rows, const float* w, int cols, float* out) {
    for (std::ptrdiff_t t = 0; t < tokens; ++t) {
      float* o = out + t * cols;
      std::fill(o, o + cols, 0.0f);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) o[c] += in[t * rows + r] * w[std::size_t(r) * cols + c];
    }
  }

  engine_attention attention_;
  std::vector<float> w_qkv_, w_out_, qkv_, attended_, delta_;  // the engine's buffers
  std::vector<longheads::sequence_call> calls_;               // a batch's sequences
};

std::vector<float> random_tokens(std::ptrdiff_t tokens, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(tokens) * dim);
  for (float& v : x) v = normal(rng);
  return x;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

}  // namespace

int main() {
  // [snippet:rope]
  // Your model's RoPE: head_dim, base, and the pair layout (half = Hugging Face/NeoX,
  // interleaved = Meta/llama2.c). Scaling policies (linear, NTK, YaRN) are optional.
  const longheads::rope rope(head_dim, 10000.0, longheads::rope_layout::half);
  const longheads::thread_pool_executor pool(2);
  // [/snippet:rope]

  // 1. Inside the budget (512 tokens), LongHeads is dense causal attention: check it.
  {
    layer longheads_layer(rope, longheads::attention_method::longheads, pool, 1);
    layer dense_layer(rope, longheads::attention_method::dense, pool, 1);
    auto lh_cache = longheads_layer.new_sequence(512), dense_cache = dense_layer.new_sequence(512);
    auto x_lh = random_tokens(500, 7), x_dense = x_lh;
    longheads_layer.forward(lh_cache, x_lh.data(), 500);
    dense_layer.forward(dense_cache, x_dense.data(), 500);
    const double diff = max_abs_diff(x_lh, x_dense);
    std::printf("500 tokens (inside the 512-token budget): LongHeads vs dense max |diff| %.2e\n", diff);
    if (diff != 0.0) return 1;  // inside the budget LongHeads is dense attention, bit for bit
  }

  // 2. Far past the budget: prefill 4096 tokens in blocks, then decode one token at a time.
  // [snippet:run]
  const std::int64_t prompt_tokens = 4096, new_tokens = 16;
  std::vector<layer> layers;
  layers.reserve(2);
  for (std::uint32_t l = 0; l < 2; ++l) layers.emplace_back(rope, longheads::attention_method::longheads, pool, 100 + l);
  std::vector<longheads::kv_cache> caches;
  for (layer& l : layers) caches.push_back(l.new_sequence(prompt_tokens + new_tokens));

  auto prompt = random_tokens(prompt_tokens, 11);
  for (std::int64_t t0 = 0; t0 < prompt_tokens; t0 += 256)  // prefill in blocks of 256
    for (std::size_t l = 0; l < layers.size(); ++l) layers[l].forward(caches[l], prompt.data() + t0 * dim, 256);

  for (std::int64_t step = 0; step < new_tokens; ++step) {  // decode
    auto x = random_tokens(1, 1000 + static_cast<std::uint32_t>(step));  // your embedding of the sampled token
    for (std::size_t l = 0; l < layers.size(); ++l) layers[l].forward(caches[l], x.data(), 1);
  }
  // What the last query of layer 0 read, per head: different heads, different chunks.
  for (int h = 0; h < n_q_heads; ++h) {
    std::printf("layer 0 head %d read chunks", h);
    for (std::int32_t c : caches[0].last_selection(h)) std::printf(" %d", c);
    std::printf("\n");
  }
  // [/snippet:run]
  if (caches[0].tokens() != prompt_tokens + new_tokens) return 1;

  // 3. Several sequences at once (continuous batching): four prompts of different lengths,
  // then decode steps in which all of them, and later three, take one call per layer. Each
  // sequence gets exactly what decoding it alone gives.
  // [snippet:serve]
  layer server(rope, longheads::attention_method::longheads, pool, 200);
  const std::int64_t lengths[] = {600, 900, 1300, 1700};
  std::vector<longheads::kv_cache> batched, alone;
  for (std::int64_t n : lengths) {
    batched.push_back(server.new_sequence(n + 16));
    auto x = random_tokens(n, static_cast<std::uint32_t>(n));
    server.forward(batched.back(), x.data(), n);
  }
  alone = batched;  // copies, to decode one sequence at a time
  std::vector<longheads::kv_cache*> active;
  for (auto& cache : batched) active.push_back(&cache);
  bool same = true;
  for (std::uint32_t step = 0; step < 8; ++step) {
    if (step == 4) active.erase(active.begin() + 1);  // sequence 1 has finished: it leaves the batch
    std::vector<float> x_batch, x_alone;
    for (longheads::kv_cache* cache : active) {
      const auto next = random_tokens(1, 5000 + step * 10 + static_cast<std::uint32_t>(cache - batched.data()));
      x_batch.insert(x_batch.end(), next.begin(), next.end());
    }
    x_alone = x_batch;
    server.decode_batch(active, x_batch.data());  // all active sequences in one call
    for (std::size_t i = 0; i < active.size(); ++i)  // the same, one call per sequence
      server.forward(alone[static_cast<std::size_t>(active[i] - batched.data())], x_alone.data() + i * dim, 1);
    same = same && x_batch == x_alone;
  }
  std::printf("4 sequences decoded in batches (one leaving after 4 steps): %s one at a time\n", same ? "bitwise equal to" : "DIFFERENT from");
  // [/snippet:serve]
  if (!same) return 1;

  // 4. Save the served sequences' caches, load them into new caches, and go on decoding both.
  // [snippet:resume]
  const auto session = std::filesystem::temp_directory_path() / "tiny_engine_session.lhkv";
  server.save(session, batched);
  std::vector<longheads::kv_cache> resumed = server.load(session, batched.size(), 2048);
  std::filesystem::remove(session);
  auto next = random_tokens(1, 9000), next_resumed = next;
  server.forward(batched[0], next.data(), 1);
  server.forward(resumed[0], next_resumed.data(), 1);
  const bool resumes = next == next_resumed && resumed[0] == batched[0];
  std::printf("caches saved and loaded: decoding on %s never saving them\n", resumes ? "bitwise equal to" : "DIFFERENT from");
  // [/snippet:resume]
  if (!resumes) return 1;

  // 5. 8-bit keys and values: the same weights with int8 K/V (a bf16 scale per 32 elements)
  // keep 0.27x of fp32's cache bytes per token; the outputs stay close to fp32's.
  // [snippet:int8]
  layer exact(rope, longheads::attention_method::longheads, pool, 300);
  layer compact(rope, longheads::attention_method::longheads, pool, 300, longheads::kv_precision::int8);
  auto cache32 = exact.new_sequence(2048), cache8 = compact.new_sequence(2048);
  auto x32 = random_tokens(2048, 13), x8 = x32;
  exact.forward(cache32, x32.data(), 2048);
  compact.forward(cache8, x8.data(), 2048);
  auto kv_bytes_per_token = [](const longheads::kv_cache& c) {
    const auto held = c.bytes_by_kind();
    return static_cast<double>(held.keys + held.values) / static_cast<double>(c.capacity_tokens());
  };
  double int8_diff = 0;  // mean |difference| of the layer's outputs, over values of size ~1
  for (std::size_t i = 0; i < x8.size(); ++i) int8_diff += std::abs(double(x8[i]) - double(x32[i])) / double(x8.size());
  std::printf("int8 K/V: %.0f bytes per token and layer (fp32: %.0f); outputs vs fp32: mean |diff| %.1e, max %.1e\n",
              kv_bytes_per_token(cache8), kv_bytes_per_token(cache32), int8_diff, max_abs_diff(x8, x32));
  // [/snippet:int8]
  if (int8_diff > 1e-2 || kv_bytes_per_token(cache8) > 0.27 * kv_bytes_per_token(cache32)) return 1;

  // [snippet:errors]
  // Bad input throws a longheads::error naming what is wrong; the cache is left as it was.
  try {
    std::vector<float> wrong(3 * head_dim);
    engine_attention probe(make_config(longheads::attention_method::longheads), rope, {.executor = pool});
    probe.decode(caches[0], {wrong.data(), 1, 3, head_dim}, {wrong.data(), 1, 1, head_dim}, {wrong.data(), 1, 1, head_dim},
                 {wrong.data(), 1, 3, head_dim});
    return 1;  // not reached
  } catch (const longheads::error& e) {
    std::printf("rejected: %s\n", e.what());
  }
  // [/snippet:errors]
  return caches[0].tokens() == prompt_tokens + new_tokens ? 0 : 1;
}
