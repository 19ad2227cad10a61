// SPDX-License-Identifier: MIT
// LongHeads attention composed from its policies, with dense and sink+window baselines.
//
// A call (a prefill block of T tokens, or decode with T = 1; of one sequence, or of a batch of
// sequences each with its own cache: batch.hpp) runs the stages in the order of the algorithm,
// each in its own header:
//   validate  validation.hpp      every argument; throws with the cache untouched
//   reserve   workspace.hpp       cache capacity and each lane's scratch (strong guarantee)
//   append    kv_cache.hpp        keys rotated at local positions, values, open-chunk queries
//   encode    chunk_encoding.hpp  every chunk the call completes, per query head (or in pieces
//                                 over the next chunk's tokens: spread_encoding)
//   select    chunk_selection.hpp per work item (work_items.hpp): score the full chunks, then
//                                 per query pick chunks and slots
//   plan      planner.hpp         the segments each query reads, one planner per method
//   attend    tile_streamer.hpp   the kernel over the segments of a tile of queries in place
// Query p depends only on tokens <= p and chunks full before p's chunk, so any split of a
// sequence into calls gives the bits of token-by-token decode.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory_resource>
#include <span>
#include <string>
#include <utility>

#include "attention_config.hpp"
#include "batch.hpp"
#include "chunk_encoding.hpp"
#include "chunk_selection.hpp"
#include "errors.hpp"
#include "executor.hpp"
#include "kv_cache.hpp"
#include "planner.hpp"
#include "policies.hpp"
#include "rope.hpp"
#include "tile_streamer.hpp"
#include "validation.hpp"
#include "views.hpp"
#include "work_items.hpp"
#include "workspace.hpp"

namespace longheads {

/// One attention layer computing LongHeads (or a baseline) over a kv_cache: prefill, decode and
/// ingest of host buffers, with every argument validated before the cache is touched.
/// Holds the configuration, RoPE tables and per-lane scratch; one call at a time per object.
/// @tparam Policies a bundle like paper_policies naming the seven policy types (policies.hpp)
template <class Policies = paper_policies>
class attention {
 public:
  ///@{
  /// The policy types of the bundle (policies.hpp).
  using encoder_type = typename policy_bundle<Policies>::encoder_type;
  using scorer_type = typename policy_bundle<Policies>::scorer_type;
  using selector_type = typename policy_bundle<Policies>::selector_type;
  using remapper_type = typename policy_bundle<Policies>::remapper_type;
  using kernel_type = typename policy_bundle<Policies>::kernel_type;
  using executor_type = typename policy_bundle<Policies>::executor_type;
  using group_selection_type = typename policy_bundle<Policies>::group_selection_type;
  using index_type = typename policy_bundle<Policies>::index_type;
  ///@}
  /// Policy values, for policies with state (e.g. a thread pool, a scorer's offset).
  using policy_set = typename policy_bundle<Policies>::values;
  /// @throws config_error if the configuration, the RoPE or a policy rejects the setting.
  attention(const attention_config& config, const rope& rotary, policy_set policies = {})
      : config_(config), rope_(rotary), policies_(std::move(policies)), workspace_(policies_.executor.lanes()) {
    validate_layer(config_, rope_, policies_.encoder, policies_.scorer, policies_.index);
    // Every rotation LongHeads and sink+window make per token is by a delta in [0, L + w); the
    // table stops at 64 MiB (beyond it rotations compute the same floats directly).
    rope_.tabulate(std::min<std::int64_t>(config_.budget_tokens() + config_.chunk_size, rope_.max_table_positions()));
    input_limit_ = longheads::max_input_magnitude(config_, rope_);
    batch_.reserve(1);
  }

  ///@{
  /// The configuration, the RoPE (with its tables) and the policy values given at construction.
  const attention_config& config() const noexcept { return config_; }
  const rope& rotary() const noexcept { return rope_; }
  const policy_set& policies() const noexcept { return policies_; }
  ///@}
  /// The largest |x| accepted in q, k and v (validation.hpp; with reject_nonfinite).
  float max_input_magnitude() const noexcept { return input_limit_; }
  /// The shape of the caches this layer reads and writes.
  cache_shape shape() const noexcept {
    const bool s = selects();
    cache_shape shape{config_.n_q_heads, config_.n_kv_heads, config_.head_dim, config_.chunk_size, s ? policies_.encoder.representation_floats(config_) : 0,
                      config_.kv_storage, representation_heads<encoder_type>(config_), 0, s && !encodes_keys_only<encoder_type>};
    if (s) shape.set_index(policies_.index.layout());  // the index_* fields, fan-out included
    if (s && !encodes_keys_only<encoder_type>) shape.rollback_chunks = config_.rollback_chunks;
    if constexpr (piecewise_chunk_encoder<encoder_type>)
      if (s && config_.spread_encoding && config_.local_chunks >= 2) {
        shape.spread_pieces = static_cast<int>(policies_.encoder.pieces(config_));
        shape.spread_state_floats = policies_.encoder.state_floats(config_);
      }
    return shape;
  }

  /// A cache for one sequence of this layer, with room for `reserve_tokens` tokens: with
  /// reserve() for the scratch, calls up to that length never allocate (tests/allocation_test).
  /// Its buffers come from `memory` (see kv_cache), which must outlive it.
  kv_cache make_cache(std::int64_t reserve_tokens = 0, std::pmr::memory_resource* memory = std::pmr::get_default_resource()) const {
    kv_cache cache(shape(), memory);
    cache.reserve(reserve_tokens);
    return cache;
  }

  /// Sizes the scratch for contexts up to `context_tokens`, prefill blocks up to `block_tokens`
  /// and batches of up to `sequences`, so calls within those sizes never allocate.
  void reserve(std::int64_t context_tokens, std::int64_t block_tokens = 1, std::size_t sequences = 1) {
    if (context_tokens < 0 || context_tokens > max_sequence_tokens)
      detail::fail<limit_error>("attention::reserve: " + std::to_string(context_tokens) + " tokens is beyond the limit of " +
                                std::to_string(max_sequence_tokens));
    prepare(context_tokens, std::max<std::int64_t>(1, block_tokens));
    batch_.reserve(sequences);
  }
  /// Appends T tokens to the sequence and computes their attention.
  /// @param cache this sequence's cache for this layer (from make_cache())
  /// @param q   [T, H_q, d] pre-RoPE queries    (host buffer, read in place)
  /// @param k   [T, H_kv, d] pre-RoPE keys
  /// @param v   [T, H_kv, d] values
  /// @param out [T, H_q, d] attention output; shares no element with q, k or v
  /// @param selections optional [T, H_q, budget_chunks] chunk ids read by each query, ascending,
  ///        -1 padded (longheads only)
  /// @throws shape_error, config_error, value_error, limit_error; the cache is then unchanged.
  void prefill(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
               tensor_view<float> out, std::span<std::int32_t> selections = {}) {
    const sequence_call call{&cache, q, k, v, out, selections};
    run("prefill", {&call, 1}, false, false);
  }
  /// prefill() of exactly one token.
  void decode(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
              tensor_view<float> out, std::span<std::int32_t> selections = {}) {
    const sequence_call call{&cache, q, k, v, out, selections};
    run("decode", {&call, 1}, false, true);
  }
  /// prefill() of several sequences in one call (batch.hpp): each sequence (its own cache, its
  /// own T) gets the bits of a prefill() of its own, for any thread count, while their work
  /// shares the executor. Sequences may differ from call to call; an empty batch does nothing.
  /// With reserve(context, block, sequences), batches up to those sizes never allocate.
  /// @throws shape_error, config_error, value_error, limit_error naming the sequence (and a
  ///         cache given twice, or an `out` overlapping another sequence's buffers); every cache
  ///         is then unchanged.
  void prefill(std::span<const sequence_call> batch) { run("prefill", batch, true, false); }
  /// prefill() of a batch whose sequences each append exactly one token.
  void decode(std::span<const sequence_call> batch) { run("decode", batch, true, true); }

  /// Appends T tokens to the sequence without computing their attention: keys and values are
  /// cached and full chunks encoded exactly as prefill() would, so later calls see the same
  /// cache; no last selection is kept. For a host's last layer, whose prefix outputs nobody
  /// reads, and for building long caches quickly (benchmarks, restoring a sequence).
  /// @throws shape_error, value_error, limit_error; the cache is then unchanged.
  void ingest(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) {
    validate_shapes("ingest", config_, shape(), cache, q, k, v, nullptr);
    validate_values("ingest", config_, input_limit_, q, k, v);
    cache.reserve(cache.tokens() + q.tokens());
    prepare(cache.tokens() + q.tokens(), q.tokens());
    append(cache, q, k, v);
  }

 private:
  bool selects() const noexcept { return config_.method == attention_method::longheads; }

  /// A computing call over `batch` (named `call`; its errors name the sequence when `batched`;
  /// each sequence one token when `one_token`): validate every sequence, then the batch,
  /// reserve, append and encode, then select, plan and attend for the items of all sequences.
  void run(const char* call, std::span<const sequence_call> batch, bool batched, bool one_token) {
    std::int64_t context = 0, tokens = 1;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      char name[64];  // "<call>: sequence <i>" for a batch's errors, written only for a batch
      const char* where = batched ? (std::snprintf(name, sizeof name, "%s: sequence %zu", call, i), name) : call;
      if (batch[i].cache == nullptr) detail::fail<shape_error>(std::string(where) + ": no cache (null pointer)");
      validate_call(where, config_, shape(), input_limit_, *batch[i].cache, batch[i].q, batch[i].k, batch[i].v, batch[i].out,
                    batch[i].selections);
      if (one_token && batch[i].q.tokens() != 1)
        detail::fail<shape_error>(std::string(where) + ": q has " + std::to_string(batch[i].q.tokens()) + " tokens, expected 1");
      context = std::max(context, batch[i].cache->tokens() + batch[i].q.tokens());
      tokens = std::max<std::int64_t>(tokens, batch[i].q.tokens());
    }
    if (batched) validate_batch(call, batch);
    for (const sequence_call& s : batch) s.cache->reserve(s.cache->tokens() + s.q.tokens());
    prepare(context, tokens);
    batch_.reserve(batch.size());
    // Nothing from here on throws: the call commits.
    append(batch);
    with_planner(config_.method, [&](auto planner) { attend(planner, batch); });
  }

  void prepare(std::int64_t context, std::int64_t tokens) {
    // Dense rotates queries by deltas up to the whole context: tabulated up to the cap (past it a
    // rotation costs d/2 cos/sin per chunk and query; the same floats), so no table grows with n.
    if (config_.method == attention_method::dense && rope_.tabulated_positions() < std::min(context, rope_.max_table_positions()))
      rope_.tabulate(std::min(rope_.max_table_positions(), std::max<std::int64_t>(context, rope_.tabulated_positions() * 3 / 2)));
    const auto segments = with_planner(config_.method, [&](auto planner) { return planner.max_segments(config_, context); });
    workspace_.reserve(config_, workspace_needs::of(config_, policies_, context, tokens, segments, group_selection_type::shared));
  }

  /// Append and encode (chunk_encoding.hpp): the call's chunks are work items, then the heads.
  void append(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) noexcept {
    append_and_encode(policies_.encoder, config_, rope_, cache, selects(), q, k, v, [&](std::size_t n, auto& f) { run_parallel(n, f); },
                      [&](std::size_t lane) -> encoding_scratch& { return workspace_.lane(lane).encoding; });
  }
  /// A batch's appends: with at least as many sequences as lanes, a sequence is a work item
  /// (its chunks and heads then run on that item's lane); else one sequence after another, each
  /// over the lanes. The same arithmetic either way.
  void append(std::span<const sequence_call> batch) noexcept {
    if (batch.size() < 2 || batch.size() < workspace_.lanes()) {
      for (const sequence_call& s : batch) append(*s.cache, s.q, s.k, s.v);
      return;
    }
    auto sequence = [&](std::size_t i, std::size_t lane) {
      const sequence_call& s = batch[i];
      append_and_encode(
          policies_.encoder, config_, rope_, *s.cache, selects(), s.q, s.k, s.v,
          [lane](std::size_t n, auto& f) {
            for (std::size_t item = 0; item < n; ++item) f(item, lane);
          },
          [&](std::size_t l) -> encoding_scratch& { return workspace_.lane(l).encoding; });
    };
    run_parallel(batch.size(), sequence);
  }

  /// Select, plan and attend for the batch's queries, item by item (work_items.hpp, batch.hpp).
  template <class Planner>
  void attend(Planner planner, std::span<const sequence_call> batch) noexcept {
    batch_.assign(config_, batch, workspace_.lanes(), Planner::selects && group_selection_type::shared);
    auto item = [&](std::size_t index, std::size_t lane) {
      const auto [sequence, it] = batch_.item(index);
      const sequence_call& s = batch[sequence];
      if (it.heads.count() > 0) attend_item(planner, *s.cache, s.q, s.out, s.selections, it, workspace_.lane(lane));
    };
    run_parallel(batch_.items(), item);
  }
  template <class Planner>
  void attend_item(Planner planner, kv_cache& cache, tensor_view<const float> q, tensor_view<float> out, std::span<std::int32_t> selections,
                   const work_item& it, lane_workspace& s) noexcept {
    const std::int64_t first = cache.tokens() - q.tokens();
    const heads_of_item& heads = it.heads;
    constexpr bool shared = Planner::selects && group_selection_type::shared;
    // Scores of every chunk for the item's queries: without an index, or while the index's
    // search would give the flat scan's chunks anyway (bound_tree_beam's scan_below).
    const std::int64_t last = first + it.t0 + it.count - 1;
    const bool flat = Planner::selects && scans_flat(policies_.index, config_, last);
    const std::int64_t scored = flat ? chunks_to_score(config_, cache, last) : 0;
    if (scored > 0) score_block(policies_.scorer, policies_.group_selection, config_, rope_, cache, q, first, it, scored, s.selection);
    // Score rows: per head of the item (or group, shared), `count` queries of `scored` chunks.
    auto scores = [&](std::int64_t row_set, std::int64_t r) {
      return std::span<const float>(s.selection.scores.data() + (row_set * it.count + r) * scored, static_cast<std::size_t>(scored));
    };
    const std::int64_t tile_rows = std::max<std::int64_t>(1, static_cast<std::int64_t>(work_partition::tile_queries(config_)) / heads.count());
    for (std::int64_t r0 = 0; r0 < it.count; r0 += tile_rows) {
      s.tile.clear();
      for (std::int64_t r = r0; r < std::min(it.count, r0 + tile_rows); ++r) {
        const std::int64_t t = it.t0 + r, p = first + t;
        for (int g = heads.group_begin; g < heads.group_end; ++g) {
          auto choose = [&](std::int64_t row_set, int h) {  // by scores, or from the cache's index
            return choose_for_query(policies_, config_, rope_, cache, q.at(t, h), h, p, scores(row_set, r), flat, s.selection);
          };
          chunk_choice choice = shared ? choose(g - heads.group_begin, g * config_.group_size()) : chunk_choice{};
          for (int i = 0; i < heads.per_group(); ++i) {
            const int h = g * config_.group_size() + heads.first_in_group + i;
            planned_segment* plan = s.tile.next_plan();
            std::size_t n = 0;
            if constexpr (Planner::selects) {
              if (!shared) choice = choose((g - heads.group_begin) * heads.per_group() + i, h);
              n = planner.plan(config_, cache, p, g, choice, plan);
              record_selection(config_, cache, selections, t, q.tokens(), h, choice.chunks);
            } else {
              n = planner.plan(config_, cache, p, g, plan);
              if (t == q.tokens() - 1) cache.record_selection(h, distinct_chunks({plan, n}, s.selection.selected));
            }
            s.tile.add(q.at(t, h), out.at(t, h), n);
          }
        }
      }
      s.tile.stream(policies_.kernel, config_, rope_, cache);
    }
  }
  template <class F>
  void run_parallel(std::size_t n, F& f) noexcept {  // index_task never throws; the items are noexcept
    policies_.executor.parallel_for(n, index_task(f));
  }

  attention_config config_;
  rope rope_;
  policy_set policies_;
  workspace workspace_;
  batch_partition batch_;
  float input_limit_ = 0;
};

}  // namespace longheads
