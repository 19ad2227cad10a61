// SPDX-License-Identifier: MIT
// Naive scalar references of whole attentions, in double, from the definitions:
//   dense_causal   every key at its true position
//   sink_window    StreamingLLM re-indexing
//   longheads      the paper, computed the slow obvious way: chunk keys recomputed from the
//                  raw tokens, selection by full sort, every selected key re-rotated at its
//                  slot position (not the query-rotation form the library uses).
// Inputs are token-major [T][heads][d] float buffers, outputs [T][H_q][d] double.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <utility>
#include <vector>

#include "../rope.hpp"
#include "components.hpp"
#include "rope.hpp"

namespace longheads::reference {

/// One layer's attention inputs for the naive references: pre-RoPE q/k/v and the RoPE.
struct problem {
  int tokens = 0;      ///< T
  int n_q_heads = 0;   ///< H_q
  int n_kv_heads = 0;  ///< H_kv
  int head_dim = 0;    ///< d
  const float* q = nullptr;  ///< [T][H_q][d]
  const float* k = nullptr;  ///< [T][H_kv][d]
  const float* v = nullptr;  ///< [T][H_kv][d]
  std::vector<double> inverse_frequencies;  ///< theta_i, as rope::inverse_frequencies()
  rope_layout layout = rope_layout::half;   ///< which dimensions pair up
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude = 1.0;
  double scale = 0.0;  ///< 0: 1/sqrt(d)

  /// The temperature in use.
  double softmax_scale() const { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim)); }
  ///@{
  /// Token t's pre-RoPE query of head h / key and value of kv head g, in double.
  std::vector<double> query(std::int64_t t, int h) const { return row(q, t, h, n_q_heads); }
  std::vector<double> key(std::int64_t t, int g) const { return row(k, t, g, n_kv_heads); }
  std::vector<double> value(std::int64_t t, int g) const { return row(v, t, g, n_kv_heads); }
  ///@}
  /// x rotated to `position` (any real number: a difference, a remapped position).
  std::vector<double> rotated(std::vector<double> x, double position) const {
    return rotate(x, position, inverse_frequencies, layout, magnitude);
  }
  /// The kv head query head h reads.
  int kv_head(int h) const { return h / (n_q_heads / n_kv_heads); }

 private:
  std::vector<double> row(const float* base, std::int64_t t, int head, int heads) const {
    const float* x = base + (t * heads + head) * head_dim;
    return {x, x + head_dim};
  }
};

using output = std::vector<double>;  // [T][H_q][d]

namespace detail {
/// softmax(scale * q . k_j) v_j over (key position, token) pairs, q already rotated.
inline void attend(const problem& pr, const std::vector<double>& q_rot, int g,
                   const std::vector<std::pair<double, std::int64_t>>& keys, double* out) {
  std::vector<double> logits;
  for (auto [position, t] : keys) logits.push_back(dot(q_rot, pr.rotated(pr.key(t, g), position)) * pr.softmax_scale());
  const auto p = softmax(logits);
  for (std::size_t j = 0; j < keys.size(); ++j) {
    const auto v = pr.value(keys[j].second, g);
    for (int c = 0; c < pr.head_dim; ++c) out[c] += p[j] * v[static_cast<std::size_t>(c)];
  }
}
inline double* at(output& o, const problem& pr, std::int64_t t, int h) {
  return o.data() + (t * pr.n_q_heads + h) * pr.head_dim;
}
}  // namespace detail

inline output dense_causal(const problem& pr) {
  output out(static_cast<std::size_t>(pr.tokens) * pr.n_q_heads * pr.head_dim, 0.0);
  for (std::int64_t p = 0; p < pr.tokens; ++p)
    for (int h = 0; h < pr.n_q_heads; ++h) {
      std::vector<std::pair<double, std::int64_t>> keys;
      for (std::int64_t t = 0; t <= p; ++t) keys.emplace_back(static_cast<double>(t), t);
      detail::attend(pr, pr.rotated(pr.query(p, h), static_cast<double>(p)), pr.kv_head(h), keys, detail::at(out, pr, p, h));
    }
  return out;
}

inline output sink_window(const problem& pr, std::int64_t budget_tokens, std::int64_t sink_tokens) {
  output out(static_cast<std::size_t>(pr.tokens) * pr.n_q_heads * pr.head_dim, 0.0);
  for (std::int64_t p = 0; p < pr.tokens; ++p)
    for (int h = 0; h < pr.n_q_heads; ++h) {
      std::vector<std::pair<double, std::int64_t>> keys;
      double query_position = static_cast<double>(p);
      if (p < budget_tokens) {
        for (std::int64_t t = 0; t <= p; ++t) keys.emplace_back(static_cast<double>(t), t);
      } else {
        query_position = static_cast<double>(budget_tokens - 1);
        for (std::int64_t t = 0; t < sink_tokens; ++t) keys.emplace_back(static_cast<double>(t), t);
        const std::int64_t first_recent = p - (budget_tokens - sink_tokens) + 1;
        for (std::int64_t t = first_recent; t <= p; ++t)
          keys.emplace_back(static_cast<double>(sink_tokens + (t - first_recent)), t);
      }
      detail::attend(pr, pr.rotated(pr.query(p, h), query_position), pr.kv_head(h), keys, detail::at(out, pr, p, h));
    }
  return out;
}

/// The policies of the naive LongHeads, as plain functions.
struct longheads_settings {
  int chunk_size = 0;     ///< w
  int budget_chunks = 0;  ///< k
  int sink_chunks = 1;    ///< always-read chunks at the start
  int local_chunks = 2;   ///< always-read recent chunks, the current one included
  /// (Q_loc, K_loc, V) of one chunk -> its representation; the paper's by default.
  std::function<std::vector<double>(const matrix&, const matrix&, const matrix&)> encode = attention_pooled_key;
  /// (q_raw, representation, query position) -> score; the paper's q_raw . r_c by default.
  std::function<double(const std::vector<double>&, const std::vector<double>&, std::int64_t)> score =
      [](const std::vector<double>& q, const std::vector<double>& r, std::int64_t) { return dot(q, r); };
  /// Shared group selection: the group's per-head scores of a chunk -> the group's score.
  /// Empty: every head selects for itself (the paper).
  std::function<double(const std::vector<double>&)> group_combine = nullptr;
};

/// The paper's LongHeads, computed naively. `selections`, if given, receives [T][H_q][budget]
/// chunk ids (-1 padded).
inline output longheads(const problem& pr, const longheads_settings& s, std::vector<std::int32_t>* selections = nullptr) {
  const int w = s.chunk_size;
  output out(static_cast<std::size_t>(pr.tokens) * pr.n_q_heads * pr.head_dim, 0.0);
  if (selections) selections->assign(static_cast<std::size_t>(pr.tokens) * pr.n_q_heads * s.budget_chunks, -1);
  std::map<std::pair<std::int64_t, int>, std::vector<double>> representation;  // (chunk, q head)
  auto chunk_key = [&](std::int64_t c, int h) -> const std::vector<double>& {
    auto [it, fresh] = representation.try_emplace({c, h});
    if (fresh) {
      matrix q, k, v;
      for (int j = 0; j < w; ++j) {
        const std::int64_t t = c * w + j;
        q.push_back(pr.rotated(pr.query(t, h), j));
        k.push_back(pr.rotated(pr.key(t, pr.kv_head(h)), j));
        v.push_back(pr.value(t, pr.kv_head(h)));
      }
      it->second = s.encode(q, k, v);
    }
    return it->second;
  };
  for (std::int64_t p = 0; p < pr.tokens; ++p)
    for (int h = 0; h < pr.n_q_heads; ++h) {
      const std::int64_t i = p / w;
      std::vector<double> scores(static_cast<std::size_t>(i), 0.0);
      if (i + 1 > s.budget_chunks)
        for (std::int64_t c = s.sink_chunks; c <= i - s.local_chunks; ++c) {
          if (!s.group_combine) {
            scores[static_cast<std::size_t>(c)] = s.score(pr.query(p, h), chunk_key(c, h), p);
            continue;
          }
          const int group = pr.n_q_heads / pr.n_kv_heads, first_head = pr.kv_head(h) * group;
          std::vector<double> per_head;
          for (int j = first_head; j < first_head + group; ++j) per_head.push_back(s.score(pr.query(p, j), chunk_key(c, j), p));
          scores[static_cast<std::size_t>(c)] = s.group_combine(per_head);
        }
      const auto selected = select_sink_local_topk(i, s.budget_chunks, s.sink_chunks, s.local_chunks, scores);
      std::vector<std::pair<double, std::int64_t>> keys;
      for (std::size_t slot = 0; slot < selected.size(); ++slot)
        for (int j = 0; j < w; ++j) {
          const std::int64_t t = std::int64_t{selected[slot]} * w + j;
          if (t <= p) keys.emplace_back(static_cast<double>(slot * static_cast<std::size_t>(w) + static_cast<std::size_t>(j)), t);
        }
      const double query_position = static_cast<double>((selected.size() - 1) * static_cast<std::size_t>(w)) + static_cast<double>(p % w);
      detail::attend(pr, pr.rotated(pr.query(p, h), query_position), pr.kv_head(h), keys, detail::at(out, pr, p, h));
      if (selections)
        std::copy(selected.begin(), selected.end(),
                  selections->begin() + (p * pr.n_q_heads + h) * s.budget_chunks);
    }
  return out;
}

}  // namespace longheads::reference
