// SPDX-License-Identifier: MIT
// Synthetic caches of stated structure, for measuring chunk indices where no model is needed:
//
//   iid        every key and value N(0, 1) per dimension: no structure an index could exploit;
//   clustered  keys drawn around `clusters` Gaussian centres (N(0, 1) per dimension; keys at
//              `spread` around them), a topic per chunk that persists over `topic_chunks`
//              chunks on average (a new topic with probability 1 / topic_chunks per chunk), each
//              key from its chunk's topic with probability 3/4, else from a random cluster;
//              each head's queries near two clusters of its own (a centre times `query_gain`,
//              plus N(0, spread^2)): the structure an index over key space should exploit.
// Keys are pre-RoPE (the cache rotates them at their offsets in the chunk, as it does a model's);
// values are N(0, 1). Everything follows from the seed.
#pragma once

#include <longheads/longheads.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace synthetic {

struct spec {
  bool clustered = true;
  int clusters = 256;
  double topic_chunks = 8.0;
  double spread = 0.35;      ///< per-dimension deviation of keys (and queries) around a centre
  double query_gain = 2.0;   ///< a query's length over its centre's
  std::uint32_t seed = 1;
  std::string name() const { return clustered ? "clustered (" + std::to_string(clusters) + " clusters)" : "iid"; }
};

/// Appends `chunks` full chunks to `cache` through `layer` (ingest: no attention computed), in
/// blocks; returns, per query head, `queries` pre-RoPE queries ([queries][d]).
template <class Policies>
std::vector<std::vector<float>> fill(longheads::attention<Policies>& layer, longheads::kv_cache& cache, std::int64_t chunks, int queries,
                                     const spec& s) {
  const auto& c = layer.config();
  const int d = c.head_dim, hq = c.n_q_heads, hkv = c.n_kv_heads, w = c.chunk_size;
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<float> centres(static_cast<std::size_t>(s.clusters) * d);
  for (float& x : centres) x = normal(rng);
  const std::int64_t block_tokens = 4096;
  std::vector<float> q(static_cast<std::size_t>(block_tokens) * hq * d, 0.0f), k(static_cast<std::size_t>(block_tokens) * hkv * d),
      v(k.size());
  std::vector<int> topic(static_cast<std::size_t>(hkv), 0);
  for (int g = 0; g < hkv; ++g) topic[static_cast<std::size_t>(g)] = static_cast<int>(rng() % static_cast<unsigned>(s.clusters));
  const std::int64_t tokens = chunks * w;
  for (std::int64_t first = 0; first < tokens; first += block_tokens) {
    const std::int64_t n = std::min(block_tokens, tokens - first);
    for (std::int64_t t = 0; t < n; ++t)
      for (int g = 0; g < hkv; ++g) {
        float* key = k.data() + (t * hkv + g) * d;
        float* value = v.data() + (t * hkv + g) * d;
        for (int i = 0; i < d; ++i) value[i] = normal(rng);
        if (!s.clustered) {
          for (int i = 0; i < d; ++i) key[i] = normal(rng);
          continue;
        }
        auto& chunk_topic = topic[static_cast<std::size_t>(g)];
        if ((first + t) % w == 0 && uniform(rng) < 1.0 / s.topic_chunks) chunk_topic = static_cast<int>(rng() % static_cast<unsigned>(s.clusters));
        const int cluster = uniform(rng) < 0.75 ? chunk_topic : static_cast<int>(rng() % static_cast<unsigned>(s.clusters));
        for (int i = 0; i < d; ++i) key[i] = centres[static_cast<std::size_t>(cluster) * d + static_cast<std::size_t>(i)] + static_cast<float>(s.spread) * normal(rng);
      }
    layer.ingest(cache, {q.data(), n, hq, d}, {k.data(), n, hkv, d}, {v.data(), n, hkv, d});
  }
  std::vector<std::vector<float>> out(static_cast<std::size_t>(hq));
  for (int h = 0; h < hq; ++h) {
    const int a = static_cast<int>(rng() % static_cast<unsigned>(s.clusters)), b = static_cast<int>(rng() % static_cast<unsigned>(s.clusters));
    for (int j = 0; j < queries; ++j)
      for (int i = 0; i < d; ++i) {
        const float centre = s.clustered ? centres[static_cast<std::size_t>(j % 2 == 0 ? a : b) * d + static_cast<std::size_t>(i)] : 0.0f;
        out[static_cast<std::size_t>(h)].push_back(s.clustered ? static_cast<float>(s.query_gain) * centre + static_cast<float>(s.spread) * normal(rng)
                                                               : normal(rng));
      }
  }
  return out;
}

}  // namespace synthetic
