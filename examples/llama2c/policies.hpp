// SPDX-License-Identifier: MIT
// The selection policies the host can run by name (--policy), each a bundle of the library's
// policy types; all use a thread pool so --threads stays a runtime knob.
#pragma once

#include <longheads/longheads.hpp>

#include <concepts>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../docs/loudest_keys_encoder.hpp"
#include "transformer.hpp"

namespace llama2c::policies {

/// The paper: attention-pooled chunk key scored by the raw query.
struct paper : threaded_policies {};
/// The paper's chunk key, scored by the query rotated to a canonical chunk offset.
struct paper_rotated : threaded_policies {
  using scorer = longheads::rotated_query_scorer;
};
/// Mean of the chunk's keys, rotated query.
struct mean_key : threaded_policies {
  using encoder = longheads::mean_key_encoder;
  using scorer = longheads::rotated_query_scorer;
};
/// Quest: per-channel key bounds, upper-bound score with the rotated query.
struct quest : threaded_policies {
  using encoder = longheads::key_bounds_encoder;
  using scorer = longheads::bound_scorer;
};
/// InfLLM-style representative keys, best match with the rotated query.
struct representative_keys : threaded_policies {
  using encoder = longheads::representative_keys_encoder;
  using scorer = longheads::max_key_scorer;
};

/// The docs' worked example of a policy written outside the library: the mean of the chunk's
/// loudest keys (docs/custom-policy.md).
struct loudest_keys : threaded_policies {
  using encoder = loudest_keys_encoder;
  using scorer = longheads::rotated_query_scorer;
};

/// Quest with the query heads of a kv group selecting together: by their best score or their
/// mean score (one set of chunks per group).
struct quest_group_max : quest {
  using group_selection = longheads::group_max_selection;
};
struct quest_group_mean : quest {
  using group_selection = longheads::group_mean_selection;
};

/// Quest with its chunks found through the cache's bound-tree index instead of a flat scan of
/// every chunk's score: the same chunks, fewer summaries read (chunk_index.hpp).
struct quest_index : quest {
  using index = longheads::bound_tree_index;
};

/// Quest with its chunks found by a beam search of the same index: O(beam F log n) summaries
/// per query instead of every chunk's; the flat scan's chunks up to 1024 candidates, beyond
/// them what docs/results.md measures (attention-mass recall 0.99-1.00 median, 0.86-0.92 p10
/// at 262k-1M tokens on passkey-256).
struct quest_beam : quest {
  using index = longheads::bound_tree_beam;
};

/// Quest with its chunks found by the certified search of the same index: the beam's choice,
/// widened until a bound proves every chunk left out scores at most the k-th kept plus epsilon
/// (epsilon 0, the default: exactly the flat scan's chunks; chunk_index.hpp, docs/results.md).
struct quest_certified : quest {
  using index = longheads::bound_tree_certified;
};

/// Quest with its chunks found among key-space clusters (key_cluster_index): segments of 2048
/// chunks split by k-means into 64 clusters each, opened by box bound and centre score in turn until certified or
/// 2% of the candidates (at least 512 chunks) are read (docs/results.md measures reads and loss).
struct quest_clusters : quest {
  using index = longheads::key_cluster_index;
};

struct knobs {
  int offset_chunks = 1;        // canonical chunk offset of the rotated query
  int representative_keys = 2;  // keys per chunk for representative_keys
  unsigned threads = 1;
  int beam = longheads::bound_tree_beam{}.beam;  // quest-beam: boxes opened per level
  int branching = 0;                             // quest-index, quest-beam: chunks per box (0: the policy's default)
  float epsilon = 0.0f;                          // quest-certified: the certificate's slack
  longheads::key_cluster_index clusters{};       // quest-clusters: segments, clusters, probe
};

template <class P>
typename longheads::attention<P>::policy_set make_set(const knobs& k) {
  typename longheads::attention<P>::policy_set set;
  set.executor = longheads::thread_pool_executor(k.threads);
  if constexpr (requires { set.scorer.offset_chunks; }) set.scorer.offset_chunks = k.offset_chunks;
  if constexpr (requires { set.scorer.count; }) set.scorer.count = k.representative_keys;
  if constexpr (requires { set.encoder.count; }) set.encoder.count = k.representative_keys;
  if constexpr (requires { set.index.beam; }) set.index.beam = k.beam;
  if constexpr (requires { set.index.epsilon; }) set.index.epsilon = k.epsilon;
  if constexpr (std::same_as<decltype(set.index), longheads::key_cluster_index>) set.index = k.clusters;
  if constexpr (requires { set.index.branching; })
    if (k.branching > 0) set.index.branching = k.branching;
  return set;
}

inline const std::vector<std::string>& names() {
  static const std::vector<std::string> n = {"paper", "paper-rotated", "mean-key", "quest", "quest-index", "quest-beam", "quest-certified", "quest-clusters", "quest-group-max",
                                                   "quest-group-mean", "representative-keys", "loudest-keys", "recommended"};
  return n;
}

/// The policy the docs recommend (docs/results.md says why): Quest's bounds, found through the
/// beam index, so a token costs the same at any context length.
using recommended = quest_beam;

/// Calls f(std::type_identity<P>{}) for the policy bundle named `name`.
template <class F>
decltype(auto) with_policy(const std::string& name, F&& f) {
  if (name == "paper") return f(std::type_identity<paper>{});
  if (name == "paper-rotated") return f(std::type_identity<paper_rotated>{});
  if (name == "mean-key") return f(std::type_identity<mean_key>{});
  if (name == "quest") return f(std::type_identity<quest>{});
  if (name == "quest-index") return f(std::type_identity<quest_index>{});
  if (name == "quest-beam") return f(std::type_identity<quest_beam>{});
  if (name == "quest-certified") return f(std::type_identity<quest_certified>{});
  if (name == "quest-clusters") return f(std::type_identity<quest_clusters>{});
  if (name == "quest-group-max") return f(std::type_identity<quest_group_max>{});
  if (name == "quest-group-mean") return f(std::type_identity<quest_group_mean>{});
  if (name == "representative-keys") return f(std::type_identity<representative_keys>{});
  if (name == "loudest-keys") return f(std::type_identity<loudest_keys>{});
  if (name == "recommended") return f(std::type_identity<recommended>{});
  throw std::invalid_argument("unknown policy '" + name + "'");
}

}  // namespace llama2c::policies
