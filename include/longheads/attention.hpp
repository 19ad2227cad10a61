// SPDX-License-Identifier: MIT
// LongHeads attention composed from its five policies, with dense and sink+window baselines.
//
// Per call (a prefill block of T tokens, or decode with T = 1):
//   1. validate every argument (throws; the cache is untouched)
//   2. allocate whatever the call needs (cache capacity, scratch; strong guarantee)
//   3. append: keys rotated at local positions t mod w, values, queries of the open chunk;
//      every chunk that fills is encoded into one representation per query head
//   4. per query head, per block of queries: score the full chunks (one GEMM), then per query
//      select chunks, remap positions, rotate the query per slot and run the kernel over the
//      selected chunks in place.
// Step 4 of query p depends only on tokens <= p and chunks that were full before p's chunk,
// so any split of a sequence into calls gives the same result as token-by-token decode.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "attention_config.hpp"
#include "attention_kernel.hpp"
#include "chunk_encoder.hpp"
#include "chunk_scorer.hpp"
#include "errors.hpp"
#include "executor.hpp"
#include "group_selection.hpp"
#include "head_selector.hpp"
#include "kv_cache.hpp"
#include "rope.hpp"
#include "rope_remapper.hpp"
#include "views.hpp"

namespace longheads {

/// The paper's policies. Swap one by inheriting:
///   struct my_policies : paper_policies { using scorer = rotated_query_scorer; };
struct paper_policies {
  using encoder = attention_pooled_encoder;     ///< chunk representation: keys pooled by the chunk's own attention
  using scorer = raw_query_scorer;              ///< score: q_raw . r_c
  using selector = sink_local_topk_selector;    ///< sink + local chunks + top-scoring others
  using remapper = contiguous_slot_remapper;    ///< selected chunks side by side at positions 0..L-1
  using kernel = online_softmax_kernel;         ///< online softmax over the chunks in place (xsimd)
  using executor = serial_executor;             ///< everything on the calling thread
  using group_selection = per_head_selection;   ///< every query head selects for itself
};

/// One attention layer computing LongHeads (or a baseline) over a kv_cache: prefill, decode and
/// ingest of host buffers, with every argument validated before the cache is touched.
/// Holds the configuration, RoPE tables and per-lane scratch; one call at a time per object.
/// @tparam Policies a bundle like paper_policies naming the seven policy types
template <class Policies = paper_policies>
class attention {
 public:
  ///@{
  /// The policy types of the bundle.
  using encoder_type = typename Policies::encoder;
  using scorer_type = typename Policies::scorer;
  using selector_type = typename Policies::selector;
  using remapper_type = typename Policies::remapper;
  using kernel_type = typename Policies::kernel;
  using executor_type = typename Policies::executor;
  using group_selection_type = typename Policies::group_selection;
  ///@}
  static_assert(chunk_encoder<encoder_type>, "Policies::encoder must model longheads::chunk_encoder (chunk_encoder.hpp)");
  static_assert(chunk_scorer<scorer_type>, "Policies::scorer must model longheads::chunk_scorer (chunk_scorer.hpp)");
  static_assert(head_selector<selector_type>, "Policies::selector must model longheads::head_selector (head_selector.hpp)");
  static_assert(rope_remapper<remapper_type>, "Policies::remapper must model longheads::rope_remapper (rope_remapper.hpp)");
  static_assert(attention_kernel<kernel_type>, "Policies::kernel must model longheads::attention_kernel (attention_kernel.hpp)");
  static_assert(executor<executor_type>, "Policies::executor must model longheads::executor (executor.hpp)");
  static_assert(group_selection<group_selection_type>,
                "Policies::group_selection must model longheads::group_selection (group_selection.hpp)");

  /// Policy values, for policies with state (e.g. a thread pool, a scorer's offset).
  struct policy_set {
    ///@{
    /// One value of each policy type, default-constructed unless given.
    encoder_type encoder{};
    scorer_type scorer{};
    selector_type selector{};
    remapper_type remapper{};
    kernel_type kernel{};
    executor_type executor{};
    group_selection_type group_selection{};
    ///@}
  };

  /// @throws config_error if the configuration, the RoPE or a policy rejects the setting.
  attention(const attention_config& config, const rope& rotary, policy_set policies = {})
      : config_(config), rope_(rotary), policies_(std::move(policies)) {
    config_.validate();
    if (rope_.head_dim() != config_.head_dim)
      detail::fail<config_error>("attention: rope head_dim " + std::to_string(rope_.head_dim()) +
                                 " does not match config head_dim " + std::to_string(config_.head_dim));
    policies_.encoder.validate(config_);
    policies_.scorer.validate(config_);
    if (policies_.scorer.representation_floats(config_) != policies_.encoder.representation_floats(config_))
      detail::fail<config_error>("attention: the scorer reads " + std::to_string(policies_.scorer.representation_floats(config_)) +
                                 " floats per chunk representation but the encoder writes " +
                                 std::to_string(policies_.encoder.representation_floats(config_)) +
                                 " (pair key_bounds_encoder with bound_scorer, representative_keys_encoder{n} with max_key_scorer{n})");
    // Every rotation LongHeads and sink+window make per token is by a delta in [0, L + w).
    rope_.tabulate(config_.budget_tokens() + config_.chunk_size);
    lanes_.resize(policies_.executor.lanes());
  }

  /// The configuration given at construction.
  const attention_config& config() const noexcept { return config_; }
  /// The RoPE, with its tables.
  const rope& rotary() const noexcept { return rope_; }
  /// The policy values.
  const policy_set& policies() const noexcept { return policies_; }

  /// The shape of the caches this layer reads and writes.
  cache_shape shape() const noexcept {
    return {config_.n_q_heads, config_.n_kv_heads, config_.head_dim, config_.chunk_size,
            config_.method == attention_method::longheads ? policies_.encoder.representation_floats(config_) : 0,
            config_.kv_storage};
  }

  /// A cache for one sequence of this layer, with room for `reserve_tokens` tokens: with
  /// reserve() for the scratch, calls up to that length never allocate (tests/allocation_test).
  /// Its buffers come from `memory` (see kv_cache), which must outlive it.
  kv_cache make_cache(std::int64_t reserve_tokens = 0, std::pmr::memory_resource* memory = std::pmr::get_default_resource()) const {
    kv_cache cache(shape(), memory);
    cache.reserve(reserve_tokens);
    cache.reserve_selections(static_cast<std::size_t>(max_segments(reserve_tokens)));  // dense records every chunk
    return cache;
  }

  /// Sizes the scratch for contexts up to `context_tokens` and prefill blocks up to
  /// `block_tokens`, so calls within those sizes never allocate.
  void reserve(std::int64_t context_tokens, std::int64_t block_tokens = 1) {
    if (context_tokens < 0 || context_tokens > max_sequence_tokens)
      detail::fail<limit_error>("attention::reserve: " + std::to_string(context_tokens) + " tokens is beyond the limit of " +
                                std::to_string(max_sequence_tokens));
    prepare_scratch(context_tokens, std::max<std::int64_t>(1, block_tokens));
  }

  /// Appends T tokens to the sequence and computes their attention.
  /// @param cache this sequence's cache for this layer (from make_cache())
  /// @param q   [T, H_q, d] pre-RoPE queries    (host buffer, read in place)
  /// @param k   [T, H_kv, d] pre-RoPE keys
  /// @param v   [T, H_kv, d] values
  /// @param out [T, H_q, d] attention output; must not overlap q, k or v
  /// @param selections optional [T, H_q, budget_chunks] chunk ids read by each query, ascending,
  ///        -1 padded (longheads only)
  /// @throws shape_error, config_error, value_error, limit_error; the cache is then unchanged.
  void prefill(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
               tensor_view<float> out, std::span<std::int32_t> selections = {}) {
    run("prefill", cache, q, k, v, out, selections);
  }

  /// Appends T tokens to the sequence without computing their attention: keys and values are
  /// cached and full chunks encoded exactly as prefill() would, so later calls see the same
  /// cache. For a host's last layer, whose prefix outputs nobody reads, and for building long
  /// caches quickly (benchmarks, restoring a sequence from stored k/v).
  /// @throws shape_error, value_error, limit_error; the cache is then unchanged.
  void ingest(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) {
    validate_inputs("ingest", cache, q, k, v);
    const std::int64_t end = cache.tokens() + q.tokens();
    cache.reserve(end);
    cache.reserve_selections(static_cast<std::size_t>(max_segments(end)));
    prepare_scratch(end, q.tokens());
    append(cache, q, k, v);
  }

  /// prefill() of exactly one token.
  void decode(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
              tensor_view<float> out, std::span<std::int32_t> selections = {}) {
    if (q.tokens() != 1) detail::fail<shape_error>("decode: q has " + std::to_string(q.tokens()) + " tokens, expected 1");
    run("decode", cache, q, k, v, out, selections);
  }

 private:
  void run(const char* call, kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
           tensor_view<float> out, std::span<std::int32_t> selections) {
    validate_call(call, cache, q, k, v, out, selections);
    const std::int64_t end = cache.tokens() + q.tokens();
    cache.reserve(end);
    cache.reserve_selections(static_cast<std::size_t>(max_segments(end)));
    prepare_scratch(end, q.tokens());
    // Nothing below throws: the call commits.
    append(cache, q, k, v);
    attend(cache, q, out, selections);
  }

  /// One segment a query will read: tokens of one chunk and the rotation its query needs.
  struct planned_segment {
    std::size_t offset;   // of its first key (and value) in the cache's storage, in elements
    std::int32_t length;  // tokens
    std::int64_t delta;   // rotation of the query
  };

  struct lane_scratch {
    std::vector<float> scores;                  // [heads of the item, block, chunks]
    std::vector<float> group_scores;            // [group_size, block, chunks] (shared group selection)
    std::vector<float> scorer;                  // scorer's own
    std::vector<float> encoder;                 // encoder's own
    std::vector<float> kernel;                  // kernel's own
    std::vector<float> rotated_query;           // [tile queries, d]
    std::vector<float> chunk_queries;           // [w, d]: a chunk's queries rotated for its encoder
    std::vector<float> converted;               // [2, w, d]: a bf16 chunk's keys and values in fp32
    std::vector<std::int32_t> selected;         // [segments]
    std::vector<std::int32_t> candidates;       // [chunks]
    std::vector<std::int64_t> slot_starts;      // [segments]
    std::vector<planned_segment> plan;          // [tile queries, segments]
    std::vector<std::size_t> plan_counts;       // [tile queries]
    std::vector<std::size_t> cursors;           // [tile queries]
    std::vector<softmax_state> states;          // [tile queries]
    std::vector<const float*> tile_queries;     // [tile queries]
    std::vector<float*> tile_outputs;           // [tile queries]
    std::vector<const float*> round_queries;    // [tile queries]: the queries reading one chunk together
    std::vector<float*> round_outputs;          // [tile queries]
    std::vector<softmax_state*> round_states;   // [tile queries]
    std::vector<std::int32_t> round_lengths;    // [tile queries]
  };

  std::int64_t max_segments(std::int64_t context) const noexcept {
    const std::int64_t chunks = (context + config_.chunk_size - 1) / config_.chunk_size;
    switch (config_.method) {
      case attention_method::longheads: return config_.budget_chunks;
      case attention_method::dense: return std::max<std::int64_t>(chunks, 1);
      case attention_method::sink_window: return std::max<std::int64_t>(chunks <= config_.budget_chunks ? chunks : config_.budget_chunks + 2, 1);
    }
    return chunks;
  }
  static std::int64_t query_block(std::int64_t tokens) noexcept { return std::min<std::int64_t>(tokens, 64); }
  // Queries attended together, so each chunk they read is fetched once for all of them.
  std::size_t max_tile_queries() const noexcept { return std::max<std::size_t>(16, static_cast<std::size_t>(config_.group_size())); }

  template <class T>
  static void grow(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(std::max(n, v.size() + v.size() / 2));
  }

  void prepare_scratch(std::int64_t context, std::int64_t tokens) {
    const auto d = static_cast<std::size_t>(config_.head_dim);
    const auto chunks = static_cast<std::size_t>((context + config_.chunk_size - 1) / config_.chunk_size);
    const auto block = static_cast<std::size_t>(query_block(tokens));
    const auto segments = static_cast<std::size_t>(max_segments(context));
    const bool selects = config_.method == attention_method::longheads;
    // Dense rotates queries by deltas up to the whole context; without a table each rotation
    // would cost d/2 cos/sin evaluations per chunk per query (the table path gives the same floats).
    if (config_.method == attention_method::dense && rope_.tabulated_positions() < context)
      rope_.tabulate(std::min(max_sequence_tokens, std::max<std::int64_t>(context, rope_.tabulated_positions() * 3 / 2)));
    for (lane_scratch& s : lanes_) {
      if (selects) {
        // a prefill block's group, or a decode item's groups (at most a tile of heads)
        grow(s.scores, std::max(static_cast<std::size_t>(config_.group_size()) * block, max_tile_queries()) * chunks);
        grow(s.scorer, policies_.scorer.scratch_floats(config_, static_cast<std::ptrdiff_t>(block)));
        grow(s.encoder, policies_.encoder.scratch_floats(config_));
        grow(s.candidates, chunks);
        if (group_selection_type::shared) grow(s.group_scores, static_cast<std::size_t>(config_.group_size()) * block * chunks);
      }
      grow(s.kernel, policies_.kernel.scratch_floats(config_.chunk_size, config_.head_dim));
      grow(s.rotated_query, max_tile_queries() * d);
      if (selects && tokens >= config_.chunk_size) grow(s.chunk_queries, static_cast<std::size_t>(config_.chunk_size) * d);
      if (config_.kv_storage == kv_precision::bf16) grow(s.converted, 2 * static_cast<std::size_t>(config_.chunk_size) * d);
      grow(s.selected, segments);
      grow(s.slot_starts, segments);
      grow(s.plan, max_tile_queries() * segments);
      grow(s.plan_counts, max_tile_queries());
      grow(s.cursors, max_tile_queries());
      grow(s.states, max_tile_queries());
      grow(s.tile_queries, max_tile_queries());
      grow(s.tile_outputs, max_tile_queries());
      grow(s.round_queries, max_tile_queries());
      grow(s.round_outputs, max_tile_queries());
      grow(s.round_states, max_tile_queries());
      grow(s.round_lengths, max_tile_queries());
    }
  }

  template <class T>
  static bool overlaps(const tensor_view<T>& a, const float* b_begin, const float* b_end) noexcept {
    if (a.tokens() == 0) return false;
    const float* a_begin = a.data();
    const float* a_end = a.at(a.tokens() - 1, a.heads() - 1) + a.head_dim();
    return std::less<const float*>{}(a_begin, b_end) && std::less<const float*>{}(b_begin, a_end);
  }

  void validate_call(const char* call, const kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k,
                     tensor_view<const float> v, tensor_view<float> out, std::span<std::int32_t> selections) const {
    validate_shapes(call, cache, q, k, v, &out);
    const std::string where = call;
    const std::ptrdiff_t T = q.tokens();
    for (auto [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}}) {
      const float* begin = t.data();
      const float* end = t.at(T - 1, t.heads() - 1) + t.head_dim();
      if (overlaps(out, begin, end)) detail::fail<shape_error>(where + ": out overlaps " + name + "; attention cannot run in place");
    }
    if (!selections.empty()) {
      if (config_.method != attention_method::longheads)
        detail::fail<config_error>(where + ": selections are only recorded by the longheads method, not " +
                                   to_string(config_.method));
      const auto expected = static_cast<std::size_t>(T) * static_cast<std::size_t>(config_.n_q_heads) *
                            static_cast<std::size_t>(config_.budget_chunks);
      if (selections.size() != expected)
        detail::fail<shape_error>(where + ": selections has " + std::to_string(selections.size()) + " entries, expected T*H_q*budget_chunks = " +
                                  std::to_string(expected));
    }
    validate_values(call, q, k, v);
  }

  void validate_inputs(const char* call, const kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k,
                       tensor_view<const float> v) const {
    validate_shapes(call, cache, q, k, v, nullptr);
    validate_values(call, q, k, v);
  }

  void validate_shapes(const char* call, const kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k,
                       tensor_view<const float> v, const tensor_view<float>* out) const {
    const std::string where = call;
    auto shape_of = [](auto t) {
      return "[" + std::to_string(t.tokens()) + ", " + std::to_string(t.heads()) + ", " + std::to_string(t.head_dim()) + "]";
    };
    if (cache.shape() != shape())
      detail::fail<shape_error>(where + ": cache has shape " + to_string(cache.shape()) + ", this attention expects " +
                                to_string(shape()));
    const std::ptrdiff_t T = q.tokens();
    if (T <= 0) detail::fail<shape_error>(where + ": q has " + std::to_string(T) + " tokens, expected at least 1");
    auto check = [&](const char* name, auto t, std::ptrdiff_t heads) {
      if (t.data() == nullptr) detail::fail<shape_error>(where + ": " + name + " has no data (null pointer)");
      if (t.tokens() != T || t.heads() != heads || t.head_dim() != config_.head_dim)
        detail::fail<shape_error>(where + ": " + name + " has shape " + shape_of(t) + ", expected [" + std::to_string(T) + ", " +
                                  std::to_string(heads) + ", " + std::to_string(config_.head_dim) + "]");
      if (t.token_stride() < heads * config_.head_dim)
        detail::fail<shape_error>(where + ": " + name + " token stride " + std::to_string(t.token_stride()) +
                                  " is smaller than heads * head_dim = " + std::to_string(heads * config_.head_dim));
    };
    check("q", q, config_.n_q_heads);
    check("k", k, config_.n_kv_heads);
    check("v", v, config_.n_kv_heads);
    if (out != nullptr) check("out", *out, config_.n_q_heads);
    if (cache.tokens() + T > max_sequence_tokens)
      detail::fail<limit_error>(where + ": " + std::to_string(cache.tokens()) + " cached + " + std::to_string(T) +
                                " new tokens exceed the limit of " + std::to_string(max_sequence_tokens) + " positions");
  }

  void validate_values(const char* call, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) const {
    if (!config_.reject_nonfinite) return;
    const std::string where = call;
    for (auto [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}})
      for (std::ptrdiff_t tok = 0; tok < t.tokens(); ++tok)
        for (std::ptrdiff_t h = 0; h < t.heads(); ++h) {
          const float* x = t.at(tok, h);
          for (std::ptrdiff_t i = 0; i < t.head_dim(); ++i)
            if (!std::isfinite(x[i]))
              detail::fail<value_error>(where + ": " + name + "[token " + std::to_string(tok) + ", head " + std::to_string(h) +
                                        ", dim " + std::to_string(i) + "] is " + std::to_string(x[i]) +
                                        " (non-finite input is rejected; see attention_config::reject_nonfinite)");
        }
  }

  /// Caches the call's keys and values and encodes every chunk the call completes. Chunks are
  /// work items: each stores its tokens and, when it lies wholly inside the call, is encoded
  /// right away from the call's own queries while its keys and values are hot (a prefill
  /// encodes all its chunks in one parallel pass). A chunk begun by an earlier call takes its
  /// queries from the cache's open chunk. Either way the encoder sees the same rotated queries,
  /// so the representations do not depend on how the sequence was split into calls.
  void append(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) noexcept {
    const int w = config_.chunk_size;
    const bool encodes = config_.method == attention_method::longheads;
    const std::int64_t first = cache.tokens_, end = first + q.tokens();
    const std::int64_t first_chunk = first / w, chunks_touched = (end - 1) / w - first_chunk + 1;
    auto store_chunk = [&](std::size_t item, std::size_t lane) {
      const std::int64_t chunk = first_chunk + static_cast<std::int64_t>(item);
      const std::int64_t begin = std::max(first, chunk * w), stop = std::min(end, (chunk + 1) * w);
      for (std::int64_t p = begin; p < stop; ++p) store_token(cache, k, v, p - first, p, lanes_[lane]);
      if (encodes && begin == chunk * w && stop == (chunk + 1) * w)
        for (int h = 0; h < config_.n_q_heads; ++h) encode_head_from_call(cache, q, begin - first, chunk, h, lanes_[lane]);
    };
    run_parallel(static_cast<std::size_t>(chunks_touched), store_chunk);
    if (encodes) {
      // Queries of chunks the call leaves unfinished, or finishes without having begun, wait in
      // the open chunk; a chunk an earlier call began is encoded from there once full.
      const std::int64_t carried_end = first % w == 0 ? first : std::min(end, (first_chunk + 1) * w);
      for (std::int64_t p = first; p < carried_end; ++p) open_query_rows(cache, q, p - first, p);
      if (carried_end % w == 0 && carried_end > first) encode_open_chunk(cache, first_chunk);
      for (std::int64_t p = std::max(carried_end, end / w * w); p < end; ++p) open_query_rows(cache, q, p - first, p);
    }
    cache.tokens_ = end;
  }

  /// Token t of the call, at sequence position p: its keys rotated at their chunk-local position.
  void store_token(kv_cache& cache, tensor_view<const float> k, tensor_view<const float> v, std::int64_t t, std::int64_t p,
                   lane_scratch& s) const noexcept {
    const int w = config_.chunk_size;
    const std::ptrdiff_t d = config_.head_dim;
    const std::int64_t chunk = p / w, offset = p % w;
    for (int g = 0; g < config_.n_kv_heads; ++g) {
      if (config_.kv_storage == kv_precision::bf16) {
        float* rotated = s.rotated_query.data();
        rope_.rotate(k.at(t, g), rotated, offset);
        to_bf16(rotated, cache.mutable_keys_bf16(chunk, g) + offset * d, d);
        to_bf16(v.at(t, g), cache.mutable_values_bf16(chunk, g) + offset * d, d);
      } else {
        rope_.rotate(k.at(t, g), cache.mutable_keys(chunk, g) + offset * d, offset);
        std::copy_n(v.at(t, g), d, cache.mutable_values(chunk, g) + offset * d);
      }
    }
  }

  void open_query_rows(kv_cache& cache, tensor_view<const float> q, std::int64_t t, std::int64_t p) const noexcept {
    const std::int64_t offset = p % config_.chunk_size;
    for (int h = 0; h < config_.n_q_heads; ++h) rope_.rotate(q.at(t, h), cache.open_query(offset, h), offset);
  }

  /// Encodes head h of a chunk whose w tokens start at token t0 of the call, rotating their
  /// queries into the lane's scratch.
  void encode_head_from_call(kv_cache& cache, tensor_view<const float> q, std::int64_t t0, std::int64_t chunk, int h,
                             lane_scratch& s) noexcept {
    const int w = config_.chunk_size;
    const std::ptrdiff_t d = config_.head_dim;
    for (int offset = 0; offset < w; ++offset) rope_.rotate(q.at(t0 + offset, h), s.chunk_queries.data() + offset * d, offset);
    encode_head(cache, chunk, h, {s.chunk_queries.data(), w, d}, s);
  }

  /// Encodes every head of a chunk from the cache's open chunk of queries.
  void encode_open_chunk(kv_cache& cache, std::int64_t chunk) noexcept {
    auto encode = [&](std::size_t h, std::size_t lane) {
      const auto head = static_cast<int>(h);
      encode_head(cache, chunk, head, {cache.open_query(0, head), config_.chunk_size, config_.head_dim, config_.n_q_heads * config_.head_dim},
                  lanes_[lane]);
    };
    run_parallel(static_cast<std::size_t>(config_.n_q_heads), encode);
  }

  void encode_head(kv_cache& cache, std::int64_t chunk, int h, matrix_view<const float> queries, lane_scratch& s) noexcept {
    const int w = config_.chunk_size;
    const std::ptrdiff_t d = config_.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const int g = h / config_.group_size();
    const auto [keys, values] = fp32_chunk(cache, cache.kv_offset(chunk, g), w, s);
    const chunk_inputs in{queries, {keys, w, d}, {values, w, d}, scale};
    policies_.encoder.encode(in, {cache.mutable_representation(chunk, h), cache.shape().representation_floats}, s.encoder);
  }

  template <class F>
  void run_parallel(std::size_t n, F& f) noexcept {
    // index_task never throws itself; the work items are noexcept.
    policies_.executor.parallel_for(n, index_task(f));
  }

  /// Work is split into items (kv groups, part of their heads, query block); items never share
  /// results, and each query's arithmetic is the same whatever item holds it, so the output is
  /// bit-identical for any thread count and any split of the sequence into calls.
  void attend(kv_cache& cache, tensor_view<const float> q, tensor_view<float> out, std::span<std::int32_t> selections) noexcept {
    const std::int64_t first = cache.tokens_ - q.tokens();
    const std::int64_t block = query_block(q.tokens());
    const std::int64_t blocks = (q.tokens() + block - 1) / block;
    const int group = config_.group_size();
    const bool shared = group_selection_type::shared && config_.method == attention_method::longheads;
    // Split a group's heads across items only when there are fewer items than lanes (decode
    // with few kv heads); otherwise all heads of a group share each chunk read.
    const std::int64_t items_per_part = config_.n_kv_heads * blocks;
    const auto lanes = static_cast<std::int64_t>(lanes_.size());
    const int parts = shared || items_per_part >= lanes
                          ? 1
                          : static_cast<int>(std::min<std::int64_t>(group, (lanes + items_per_part - 1) / items_per_part));
    const int heads_per_part = (group + parts - 1) / parts;
    // A decode item takes several kv groups (as many as fill a tile, while every lane still gets
    // one): the cache is chunk-major, so walking their chunks in address order reads the kv heads
    // of each chunk side by side instead of jumping a whole row of heads per chunk.
    const int span = q.tokens() == 1 && parts == 1
                         ? static_cast<int>(std::clamp<std::int64_t>(std::min<std::int64_t>(static_cast<std::int64_t>(max_tile_queries()) / group,
                                                                                             config_.n_kv_heads / lanes),
                                                                     1, config_.n_kv_heads))
                         : 1;
    const int spans = (config_.n_kv_heads + span - 1) / span;
    auto work = [&](std::size_t item, std::size_t lane) {
      const auto index = static_cast<std::int64_t>(item);
      const std::int64_t b = index % blocks, part = index / blocks % parts, g = index / blocks / parts;
      const heads_of_item heads{static_cast<int>(g) * span, std::min(config_.n_kv_heads, static_cast<int>(g + 1) * span),
                                static_cast<int>(part) * heads_per_part, std::min(group, static_cast<int>(part + 1) * heads_per_part)};
      if (heads.first_in_group >= heads.end_in_group) return;
      const std::int64_t t0 = b * block;
      attend_item(cache, q, out, selections, first, t0, std::min(block, q.tokens() - t0), heads, shared, lanes_[lane]);
    };
    run_parallel(static_cast<std::size_t>(spans * parts * blocks), work);
  }

  /// The query heads of one work item: heads [first_in_group, end_in_group) of each of the kv
  /// groups [group_begin, group_end).
  struct heads_of_item {
    int group_begin, group_end, first_in_group, end_in_group;
    int per_group() const noexcept { return end_in_group - first_in_group; }
    int count() const noexcept { return (group_end - group_begin) * per_group(); }
  };

  /// Queries [t0, t0 + count) of the item's heads.
  void attend_item(kv_cache& cache, tensor_view<const float> q, tensor_view<float> out, std::span<std::int32_t> selections,
                   std::int64_t first, std::int64_t t0, std::int64_t count, const heads_of_item& heads, bool shared,
                   lane_scratch& s) noexcept {
    const int w = config_.chunk_size;
    const int group = config_.group_size();
    const std::int64_t last_query_chunk = (first + t0 + count - 1) / w;
    // Score only when some query of the block has more context than the budget.
    const std::int64_t scored_chunks =
        config_.method == attention_method::longheads && last_query_chunk + 1 > config_.budget_chunks ? last_query_chunk : 0;
    // Scores of the item's i-th head (or, shared, of its i-th group) start at i * stride.
    const std::ptrdiff_t stride = count * scored_chunks;
    if (scored_chunks > 0) {
      for (int g = heads.group_begin; g < heads.group_end; ++g) {
        float* target = shared ? s.group_scores.data() : s.scores.data() + (g - heads.group_begin) * heads.per_group() * stride;
        for (int i = 0; i < heads.per_group(); ++i) {
          const int h = g * group + heads.first_in_group + i;
          const scoring_inputs in{q.head(h).slice_rows(t0, count), first + t0,
                                  cache.representations(h).first_rows(scored_chunks), &rope_, w};
          policies_.scorer.score(in, {target + i * stride, count, scored_chunks}, s.scorer);
        }
        if (shared)
          for (std::ptrdiff_t e = 0; e < stride; ++e)
            s.scores[static_cast<std::size_t>((g - heads.group_begin) * stride + e)] =
                policies_.group_selection.combine(s.group_scores.data() + e, stride, heads.per_group());
      }
    }
    const std::size_t max_plan = s.plan.size() / max_tile_queries();
    const std::int64_t tile_rows = std::max<std::int64_t>(1, static_cast<std::int64_t>(max_tile_queries()) / heads.count());
    for (std::int64_t r0 = 0; r0 < count; r0 += tile_rows) {
      std::size_t n_queries = 0;
      for (std::int64_t r = r0; r < std::min(count, r0 + tile_rows); ++r) {
        const std::int64_t t = t0 + r, p = first + t;
        for (int g = heads.group_begin; g < heads.group_end; ++g) {
          std::int64_t query_position = 0;
          std::size_t shared_count = 0;
          if (shared)
            shared_count = select_chunks(
                p, {s.scores.data() + (g - heads.group_begin) * stride + r * scored_chunks, static_cast<std::size_t>(scored_chunks)}, s,
                query_position);
          for (int i = 0; i < heads.per_group(); ++i, ++n_queries) {
            const int h = g * group + heads.first_in_group + i;
            planned_segment* plan = s.plan.data() + n_queries * max_plan;
            std::size_t n = 0;
            if (shared) {
              n = plan_selected(cache, p, g, shared_count, query_position, s, plan);
            } else {
              const float* row = s.scores.data() + ((g - heads.group_begin) * heads.per_group() + i) * stride + r * scored_chunks;
              n = plan_query(cache, p, g, {row, static_cast<std::size_t>(scored_chunks)}, s, plan);
            }
            if (config_.method == attention_method::longheads)
              record_selection(cache, selections, t, q.tokens(), h, s, n);
            else if (t == q.tokens() - 1)
              record_chunks(cache, h, {plan, n});
            s.plan_counts[n_queries] = n;
            s.tile_queries[n_queries] = q.at(t, h);
            s.tile_outputs[n_queries] = out.at(t, h);
          }
        }
      }
      run_plans(cache, n_queries, max_plan, s);
    }
  }

  /// Streams every planned segment of the tile's queries through the kernel, each query in its
  /// own order, taking at each step the lowest-addressed chunk any query reads next, so a
  /// chunk several queries read is fetched once while it is hot.
  void run_plans(const kv_cache& cache, std::size_t n_queries, std::size_t max_plan, lane_scratch& s) const noexcept {
    const int d = config_.head_dim;
    const float scale = config_.scale();
    for (std::size_t i = 0; i < n_queries; ++i) {
      policies_.kernel.begin(s.states[i], s.tile_outputs[i], d);
      s.cursors[i] = 0;
    }
    constexpr std::size_t none = std::numeric_limits<std::size_t>::max();
    for (;;) {
      std::size_t next = none;
      std::int32_t longest = 0;  // queries in their own chunk read different lengths of it
      for (std::size_t i = 0; i < n_queries; ++i)
        if (s.cursors[i] < s.plan_counts[i]) {
          const planned_segment& seg = s.plan[i * max_plan + s.cursors[i]];
          if (seg.offset < next) longest = 0;
          if (seg.offset <= next) {
            next = seg.offset;
            longest = std::max(longest, seg.length);
          }
        }
      if (next == none) break;
      // The round's queries, in order; runs of equal length go through the kernel together.
      std::size_t m = 0;
      for (std::size_t i = 0; i < n_queries; ++i) {
        if (s.cursors[i] >= s.plan_counts[i]) continue;
        const planned_segment& seg = s.plan[i * max_plan + s.cursors[i]];
        if (seg.offset != next) continue;
        float* rotated = s.rotated_query.data() + static_cast<std::ptrdiff_t>(m) * d;
        rope_.rotate(s.tile_queries[i], rotated, seg.delta);
        s.round_queries[m] = rotated;
        s.round_outputs[m] = s.tile_outputs[i];
        s.round_states[m] = &s.states[i];
        s.round_lengths[m] = seg.length;
        ++m;
        ++s.cursors[i];
      }
      auto consume_round = [&](const auto* keys, const auto* values) {
        for (std::size_t begin = 0; begin < m;) {
          std::size_t end = begin + 1;
          while (end < m && s.round_lengths[end] == s.round_lengths[begin]) ++end;
          consume_shared(policies_.kernel, keys, values, s.round_lengths[begin], s.round_queries.data() + begin, end - begin, d, scale,
                         s.round_states.data() + begin, s.round_outputs.data() + begin, s.kernel);
          begin = end;
        }
      };
      if constexpr (bf16_reading_kernel<kernel_type>) {
        if (config_.kv_storage == kv_precision::bf16) {
          consume_round(cache.keys16_.data() + next, cache.values16_.data() + next);
          continue;
        }
      }
      const auto [keys, values] = fp32_chunk(cache, next, longest, s);
      consume_round(keys, values);
    }
    for (std::size_t i = 0; i < n_queries; ++i) policies_.kernel.finish(s.states[i], s.tile_outputs[i], d);
  }

  void record_selection(kv_cache& cache, std::span<std::int32_t> selections, std::int64_t t, std::int64_t tokens, int h,
                        const lane_scratch& s, std::size_t n) noexcept {
    if (!selections.empty()) {
      std::int32_t* row = selections.data() + (t * config_.n_q_heads + h) * config_.budget_chunks;
      std::fill_n(std::copy_n(s.selected.begin(), n, row), config_.budget_chunks - static_cast<std::ptrdiff_t>(n), -1);
    }
    if (t == tokens - 1) {
      std::copy_n(s.selected.begin(), n, cache.selection_slot(h).begin());
      cache.selection_counts_[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(n);
    }
  }

  /// `tokens` keys and values from element `offset` of the cache's storage, as fp32: in place,
  /// or converted from bf16 into the lane's scratch.
  std::pair<const float*, const float*> fp32_chunk(const kv_cache& cache, std::size_t offset, std::int64_t tokens,
                                                   lane_scratch& s) const noexcept {
    if (config_.kv_storage == kv_precision::fp32) return {cache.keys_.data() + offset, cache.values_.data() + offset};
    const std::ptrdiff_t n = tokens * config_.head_dim;
    float* keys = s.converted.data();
    float* values = keys + static_cast<std::ptrdiff_t>(config_.chunk_size) * config_.head_dim;
    from_bf16(cache.keys16_.data() + offset, keys, n);
    from_bf16(cache.values16_.data() + offset, values, n);
    return {keys, values};
  }

  // Baselines record the chunks their segments come from, for the same read-back.
  void record_chunks(kv_cache& cache, int h, std::span<const planned_segment> plan) noexcept {
    auto slot = cache.selection_slot(h);
    std::int32_t count = 0;
    for (const planned_segment& seg : plan) {
      const auto chunk = static_cast<std::int32_t>(seg.offset / cache.kv_floats_per_chunk());
      if (count == 0 || slot[static_cast<std::size_t>(count - 1)] != chunk) slot[static_cast<std::size_t>(count++)] = chunk;
    }
    cache.selection_counts_[static_cast<std::size_t>(h)] = count;
  }

  /// Plans what query position p (kv group g) reads; returns how many segments.
  std::size_t plan_query(const kv_cache& cache, std::int64_t p, int g, std::span<const float> scores, lane_scratch& s,
                         planned_segment* plan) const noexcept {
    const int w = config_.chunk_size;
    const std::ptrdiff_t d = config_.head_dim;
    const std::int64_t i = p / w;
    std::size_t n = 0;
    // Tokens [begin, end) of chunk c, read with the query rotated by `delta`.
    auto add = [&](std::int64_t c, std::int64_t begin, std::int64_t end, std::int64_t delta) {
      plan[n++] = {cache.kv_offset(c, g) + static_cast<std::size_t>(begin * d), static_cast<std::int32_t>(end - begin), delta};
    };
    auto tokens_in = [&](std::int64_t c) { return c == i ? p % w + 1 : std::int64_t{w}; };
    const std::int64_t budget = config_.budget_tokens();
    if (config_.method == attention_method::dense || (config_.method == attention_method::sink_window && p < budget)) {
      for (std::int64_t c = 0; c <= i; ++c) add(c, 0, tokens_in(c), p - c * w);
    } else if (config_.method == attention_method::sink_window) {
      // Sinks at positions 0..S-1, the recent tokens at S..L-1, the query at L-1.
      const std::int64_t sinks = config_.sink_tokens, recent_first = p - (budget - sinks) + 1;
      for (std::int64_t c = 0; c * w < sinks; ++c) add(c, 0, std::min<std::int64_t>(w, sinks - c * w), budget - 1 - c * w);
      for (std::int64_t c = recent_first / w; c <= i; ++c)
        add(c, c == recent_first / w ? recent_first % w : 0, tokens_in(c), p - c * w);
    } else {
      std::int64_t query_position = 0;
      const std::size_t count = select_chunks(p, scores, s, query_position);
      return plan_selected(cache, p, g, count, query_position, s, plan);
    }
    return n;
  }

  /// LongHeads' choice for query position p: s.selected[0, count), their s.slot_starts and the
  /// query's remapped position.
  std::size_t select_chunks(std::int64_t p, std::span<const float> scores, lane_scratch& s, std::int64_t& query_position) const noexcept {
    const int w = config_.chunk_size;
    const selection_request request{p / w, config_.budget_chunks, config_.sink_chunks, config_.local_chunks};
    const std::size_t count = policies_.selector.select(request, scores, s.selected, s.candidates);
    query_position = policies_.remapper.remap(std::span<const std::int32_t>(s.selected.data(), count), p, w, s.slot_starts);
    return count;
  }

  /// Segments over the selected chunks, the query rotated per slot.
  std::size_t plan_selected(const kv_cache& cache, std::int64_t p, int g, std::size_t count, std::int64_t query_position,
                            const lane_scratch& s, planned_segment* plan) const noexcept {
    const int w = config_.chunk_size;
    const std::int64_t i = p / w;
    for (std::size_t slot = 0; slot < count; ++slot) {
      const std::int64_t c = s.selected[slot];
      const std::int64_t length = c == i ? p % w + 1 : std::int64_t{w};
      plan[slot] = {cache.kv_offset(c, g), static_cast<std::int32_t>(length), query_position - s.slot_starts[slot]};
    }
    return count;
  }

  attention_config config_;
  rope rope_;
  policy_set policies_;
  std::vector<lane_scratch> lanes_;
};

}  // namespace longheads
