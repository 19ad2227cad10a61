// Helpers shared by the tests: seeded random tensors, comparisons, a problem builder.
#pragma once

#include <longheads/longheads.hpp>
#include <longheads/reference/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace test {

inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (float& e : x) e = dist(rng);
  return x;
}

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

/// q, k, v of one sequence, token-major, and helpers to run it through the library.
struct sequence {
  int tokens, n_q_heads, n_kv_heads, head_dim;
  std::vector<float> q, k, v;

  sequence(int t, int hq, int hkv, int d, std::uint32_t seed)
      : tokens(t), n_q_heads(hq), n_kv_heads(hkv), head_dim(d),
        q(random_floats(static_cast<std::size_t>(t) * hq * d, seed)),
        k(random_floats(static_cast<std::size_t>(t) * hkv * d, seed + 1)),
        v(random_floats(static_cast<std::size_t>(t) * hkv * d, seed + 2)) {}

  longheads::tensor_view<const float> qv(int first, int count) const {
    return {q.data() + static_cast<std::ptrdiff_t>(first) * n_q_heads * head_dim, count, n_q_heads, head_dim};
  }
  longheads::tensor_view<const float> kv(int first, int count) const {
    return {k.data() + static_cast<std::ptrdiff_t>(first) * n_kv_heads * head_dim, count, n_kv_heads, head_dim};
  }
  longheads::tensor_view<const float> vv(int first, int count) const {
    return {v.data() + static_cast<std::ptrdiff_t>(first) * n_kv_heads * head_dim, count, n_kv_heads, head_dim};
  }

  longheads::reference::problem problem(const longheads::rope& r, double scale = 0.0) const {
    longheads::reference::problem p;
    p.tokens = tokens;
    p.n_q_heads = n_q_heads;
    p.n_kv_heads = n_kv_heads;
    p.head_dim = head_dim;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.inverse_frequencies.assign(r.inverse_frequencies().begin(), r.inverse_frequencies().end());
    p.layout = r.layout();
    p.magnitude = r.magnitude();
    p.scale = scale;
    return p;
  }

  /// Feeds the sequence in calls of `split` tokens (0: all at once); returns [T][H_q][d].
  template <class Attention>
  std::vector<float> run(Attention& a, longheads::kv_cache& cache, int split = 0,
                         std::vector<std::int32_t>* selections = nullptr) const {
    std::vector<float> out(static_cast<std::size_t>(tokens) * n_q_heads * head_dim);
    const int budget = a.config().budget_chunks;
    if (selections) selections->assign(static_cast<std::size_t>(tokens) * n_q_heads * budget, -2);
    const int step = split == 0 ? tokens : split;
    for (int first = 0; first < tokens; first += step) {
      const int count = std::min(step, tokens - first);
      std::span<std::int32_t> sel;
      if (selections)
        sel = std::span<std::int32_t>(*selections).subspan(static_cast<std::size_t>(first) * n_q_heads * budget,
                                                           static_cast<std::size_t>(count) * n_q_heads * budget);
      a.prefill(cache, qv(first, count), kv(first, count), vv(first, count),
                {out.data() + static_cast<std::ptrdiff_t>(first) * n_q_heads * head_dim, count, n_q_heads, head_dim}, sel);
    }
    return out;
  }
  template <class Attention>
  std::vector<float> run(Attention& a, int split = 0, std::vector<std::int32_t>* selections = nullptr) const {
    auto cache = a.make_cache();
    return run(a, cache, split, selections);
  }
};

/// Policy bundles the tests share.
struct quest_policies : longheads::paper_policies {
  using encoder = longheads::key_bounds_encoder;
  using scorer = longheads::bound_scorer;
};
struct quest_beam_policies : quest_policies {
  using index = longheads::bound_tree_beam;
};
struct quest_cluster_policies : quest_policies {
  using index = longheads::key_cluster_index;
};
template <class Combine>
struct quest_group_policies : quest_policies {
  using group_selection = Combine;
};
struct representative_policies : longheads::paper_policies {
  using encoder = longheads::representative_keys_encoder;
  using scorer = longheads::max_key_scorer;
};
struct rotated_paper_policies : longheads::paper_policies {
  using scorer = longheads::rotated_query_scorer;
};
/// A bundle run on a thread pool.
template <class Policies = longheads::paper_policies>
struct pooled : Policies {
  using executor = longheads::thread_pool_executor;
};

inline longheads::attention_config make_config(int hq, int hkv, int d, int w, int budget,
                                               longheads::attention_method m = longheads::attention_method::longheads) {
  longheads::attention_config c;
  c.n_q_heads = hq;
  c.n_kv_heads = hkv;
  c.head_dim = d;
  c.chunk_size = w;
  c.budget_chunks = budget;
  c.method = m;
  return c;
}

}  // namespace test
