// SPDX-License-Identifier: MIT
// The shape and knobs of one attention layer, shared by every policy's validate().
#pragma once

#include <cstdint>
#include <string>

#include "errors.hpp"
#include "kv_storage.hpp"

namespace longheads {

/// Which attention the composed layer computes. The baselines share the cache, the kernel and
/// the budget, so they can be compared with LongHeads through one interface.
enum class attention_method {
  longheads,    ///< per-head chunk selection with contiguous RoPE remapping (the paper)
  dense,        ///< ordinary causal attention over the whole context at true positions
  sink_window,  ///< StreamingLLM: first sink_tokens + most recent (L - sink_tokens), re-indexed 0..L-1
};

inline const char* to_string(attention_method m) noexcept {
  switch (m) {
    case attention_method::longheads: return "longheads";
    case attention_method::dense: return "dense";
    case attention_method::sink_window: return "sink-window";
  }
  return "?";
}

/// The shape and knobs of one attention layer; docs/configuration.md gives every range.
struct attention_config {
  int n_q_heads = 0;      ///< H_q
  int n_kv_heads = 0;     ///< H_kv; must divide H_q (MHA, GQA, MQA)
  int head_dim = 0;       ///< d, even (RoPE rotates pairs)
  int chunk_size = 256;   ///< w, tokens per chunk
  int budget_chunks = 16; ///< k, chunks attended per head per query; L = k*w
  int sink_chunks = 1;    ///< always-selected chunks at the start (attention sink)
  int local_chunks = 2;   ///< always-selected most recent chunks, the current one included
  int sink_tokens = 4;    ///< sink_window method only
  attention_method method = attention_method::longheads;  ///< what the layer computes
  /// Softmax temperature; 0 means 1/sqrt(head_dim).
  float softmax_scale = 0.0f;
  /// Reject NaN/Inf in q/k/v with value_error (the cache stays clean); when false they are
  /// the caller's responsibility and propagate into outputs.
  bool reject_nonfinite = true;
  /// Element type of the cached keys and values: bf16 halves the cache and what decode reads,
  /// int8 with a bf16 scale per 32 elements takes 0.53x of bf16 (kv_storage.hpp); attention
  /// still computes in fp32.
  kv_precision kv_storage = kv_precision::fp32;
  /// Spread a chunk's encoding over the steps of the next chunk (a piecewise_chunk_encoder's
  /// pieces), so no step pays for a whole chunk; the same bits as encoding it when it completes.
  /// Only with local_chunks >= 2: the previous chunk is then always read in full, so its summary
  /// is first needed a chunk later. Otherwise, or when false, a chunk is encoded as it completes.
  bool spread_encoding = true;
  /// Full chunks whose queries a cache keeps beyond what encoding needs, so that
  /// kv_cache::truncate() can go back to any token of them (speculative decoding, rollback).
  /// Only encoders that read queries need it (keys-only encoders and the baselines go back
  /// anywhere without it); each costs chunk_size * n_q_heads * head_dim floats per cache.
  int rollback_chunks = 0;

  /// L = budget_chunks * chunk_size, the most tokens a head reads per query.
  std::int64_t budget_tokens() const noexcept { return std::int64_t{budget_chunks} * chunk_size; }
  /// The softmax temperature in use: softmax_scale, or 1/sqrt(head_dim) when it is 0.
  float scale() const noexcept;
  /// Query heads per kv head.
  int group_size() const noexcept { return n_kv_heads > 0 ? n_q_heads / n_kv_heads : 0; }

  /// @throws config_error naming the first impossible setting.
  void validate() const {
    auto need = [](bool ok, const std::string& what) {
      if (!ok) detail::fail<config_error>("attention_config: " + what);
    };
    need(n_q_heads > 0, "n_q_heads must be > 0, got " + std::to_string(n_q_heads));
    need(n_kv_heads > 0, "n_kv_heads must be > 0, got " + std::to_string(n_kv_heads));
    need(n_q_heads % n_kv_heads == 0, "n_q_heads (" + std::to_string(n_q_heads) +
                                          ") must be a multiple of n_kv_heads (" + std::to_string(n_kv_heads) + ")");
    need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be a positive even number, got " + std::to_string(head_dim));
    need(chunk_size > 0, "chunk_size must be > 0, got " + std::to_string(chunk_size));
    need(budget_chunks > 0, "budget_chunks must be > 0, got " + std::to_string(budget_chunks));
    need(budget_tokens() <= (std::int64_t{1} << 30),
         "budget_chunks * chunk_size must be <= 2^30 tokens, got " + std::to_string(budget_tokens()));
    // A cache holds the open chunk's queries of every head, a chunk's keys and values of every
    // kv head are one block, and a lane converts or rotates a chunk at a time: beyond this no
    // memory holds one chunk of a layer (in double, so the product cannot overflow).
    const double chunk_floats = double(chunk_size) * double(n_q_heads) * double(head_dim);
    need(chunk_floats <= double(std::int64_t{1} << 31),
         "chunk_size * n_q_heads * head_dim (one chunk's queries, which a cache keeps while the chunk is open) must be <= 2^31 floats, got " +
             std::to_string(chunk_floats));
    need(sink_chunks >= 0, "sink_chunks must be >= 0, got " + std::to_string(sink_chunks));
    need(local_chunks >= 1, "local_chunks must be >= 1 (the current chunk holds the query), got " +
                                std::to_string(local_chunks));
    need(sink_chunks + local_chunks <= budget_chunks,
         "budget_chunks (" + std::to_string(budget_chunks) + ") must be >= sink_chunks + local_chunks (" +
             std::to_string(sink_chunks) + " + " + std::to_string(local_chunks) + ")");
    need(sink_tokens >= 0 && sink_tokens < budget_tokens(),
         "sink_tokens must be in [0, budget_chunks*chunk_size = " + std::to_string(budget_tokens()) + "), got " +
             std::to_string(sink_tokens));
    need(rollback_chunks >= 0 && rollback_chunks <= 256, "rollback_chunks must be in [0, 256], got " + std::to_string(rollback_chunks));
    need(softmax_scale >= 0.0f && softmax_scale < 1e30f, "softmax_scale must be >= 0 and finite (0 = 1/sqrt(head_dim))");
    need(kv_storage == kv_precision::fp32 || kv_storage == kv_precision::bf16 || kv_storage == kv_precision::int8,
         "kv_storage must be fp32, bf16 or int8, got the value " + std::to_string(static_cast<int>(kv_storage)));
  }
};

}  // namespace longheads

#include <cmath>
inline float longheads::attention_config::scale() const noexcept {
  return softmax_scale > 0.0f ? softmax_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}
