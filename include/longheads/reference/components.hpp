// SPDX-License-Identifier: MIT
// Naive scalar references of the chunk encoders, the scorer and the selector, in double,
// written straight from algorithm.md with explicit loops. Tests compare the library against
// these; users can check their own policies against them too.
#pragma once

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace longheads::reference {

using matrix = std::vector<std::vector<double>>;  // [rows][cols]

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline std::vector<double> softmax(std::vector<double> x) {
  const double m = *std::max_element(x.begin(), x.end());
  double sum = 0;
  for (double& e : x) sum += (e = std::exp(e - m));
  for (double& e : x) e /= sum;
  return x;
}

/// Row i: softmax_j(q_i . k_j / sqrt d), non-causal within the chunk. [w][w]
inline matrix chunk_attention(const matrix& q, const matrix& k) {
  const std::size_t w = k.size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(k[0].size()));
  matrix probs;
  for (std::size_t i = 0; i < w; ++i) {
    std::vector<double> logits(w);
    for (std::size_t j = 0; j < w; ++j) logits[j] = dot(q[i], k[j]) * scale;
    probs.push_back(softmax(logits));
  }
  return probs;
}

/// The paper's chunk key: O = softmax(Q K^T/sqrt d) V, s = mean rows of O,
/// r = sum_j softmax_j(s . k_j / sqrt d) k_j. Q, K locally rotated, [w][d].
inline std::vector<double> attention_pooled_key(const matrix& q, const matrix& k, const matrix& v) {
  const std::size_t w = k.size(), d = k[0].size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> summary(d, 0.0);
  for (const auto& p : chunk_attention(q, k)) {
    for (std::size_t j = 0; j < w; ++j)
      for (std::size_t c = 0; c < d; ++c) summary[c] += p[j] * v[j][c] / static_cast<double>(w);
  }
  std::vector<double> logits(w);
  for (std::size_t j = 0; j < w; ++j) logits[j] = dot(summary, k[j]) * scale;
  const auto beta = softmax(logits);
  std::vector<double> r(d, 0.0);
  for (std::size_t j = 0; j < w; ++j)
    for (std::size_t c = 0; c < d; ++c) r[c] += beta[j] * k[j][c];
  return r;
}

inline std::vector<double> mean_key(const matrix& k) {
  std::vector<double> r(k[0].size(), 0.0);
  for (const auto& row : k)
    for (std::size_t c = 0; c < row.size(); ++c) r[c] += row[c] / static_cast<double>(k.size());
  return r;
}

/// Quest bounds: per channel min over keys, then max over keys, [2d].
inline std::vector<double> key_bounds(const matrix& k) {
  const std::size_t d = k[0].size();
  std::vector<double> r(2 * d);
  for (std::size_t c = 0; c < d; ++c) {
    r[c] = r[d + c] = k[0][c];
    for (const auto& row : k) {
      r[c] = std::min(r[c], row[c]);
      r[d + c] = std::max(r[d + c], row[c]);
    }
  }
  return r;
}

/// Upper bound of q . k over the keys summarised by key_bounds.
inline double bound_score(const std::vector<double>& q, const std::vector<double>& bounds) {
  double s = 0;
  for (std::size_t c = 0; c < q.size(); ++c) s += std::max(q[c] * bounds[c], q[c] * bounds[q.size() + c]);
  return s;
}

/// The `count` keys with the largest column mass of softmax(Q K^T / sqrt d) (ties: lower
/// position), concatenated in ascending position.
inline std::vector<double> representative_keys(const matrix& q, const matrix& k, int count) {
  const std::size_t w = k.size();
  std::vector<double> mass(w, 0.0);
  for (const auto& p : chunk_attention(q, k))
    for (std::size_t j = 0; j < w; ++j) mass[j] += p[j];
  std::vector<std::size_t> order(w);
  for (std::size_t j = 0; j < w; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return mass[a] > mass[b]; });
  order.resize(static_cast<std::size_t>(count));
  std::sort(order.begin(), order.end());
  std::vector<double> r;
  for (std::size_t j : order) r.insert(r.end(), k[j].begin(), k[j].end());
  return r;
}

/// max over the representative keys of q . k_j.
inline double max_key_score(const std::vector<double>& q, const std::vector<double>& keys) {
  const std::size_t d = q.size();
  double best = -std::numeric_limits<double>::infinity();
  for (std::size_t j = 0; j + d <= keys.size(); j += d) {
    double s = 0;
    for (std::size_t c = 0; c < d; ++c) s += q[c] * keys[j + c];
    best = std::max(best, s);
  }
  return best;
}

/// The paper's selection by a full sort: all of 0..i if it fits, else sinks + top by score
/// (ties: lower id) among sinks..i-locals + locals, ascending.
inline std::vector<std::int32_t> select_sink_local_topk(std::int64_t i, int budget, int sinks, int locals,
                                                        const std::vector<double>& scores) {
  std::vector<std::int32_t> out;
  if (i + 1 <= budget) {
    for (std::int64_t c = 0; c <= i; ++c) out.push_back(static_cast<std::int32_t>(c));
    return out;
  }
  for (int c = 0; c < sinks; ++c) out.push_back(c);
  std::vector<std::int32_t> candidates;
  for (std::int64_t c = sinks; c <= i - locals; ++c) candidates.push_back(static_cast<std::int32_t>(c));
  std::stable_sort(candidates.begin(), candidates.end(),
                   [&](std::int32_t a, std::int32_t b) { return scores[static_cast<std::size_t>(a)] > scores[static_cast<std::size_t>(b)]; });
  candidates.resize(static_cast<std::size_t>(budget - sinks - locals));
  out.insert(out.end(), candidates.begin(), candidates.end());
  for (std::int64_t c = i - locals + 1; c <= i; ++c) out.push_back(static_cast<std::int32_t>(c));
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace longheads::reference
