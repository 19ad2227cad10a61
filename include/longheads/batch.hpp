// SPDX-License-Identifier: MIT
// Batches: one call over several sequences, each with its own cache and position (continuous
// batching: sequences join and leave between calls).
//
// A batched call runs the stages of a single call for all its sequences at once: every
// sequence is validated before any cache is touched, then their appends run side by side, then
// the work items of all sequences (each sequence's work_partition, one after another) share the
// executor. Items never combine results, so every sequence gets the bits of a call of its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "attention_config.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"
#include "validation.hpp"
#include "views.hpp"
#include "work_items.hpp"

namespace longheads {

/// One sequence's part of a batched prefill or decode: its cache for the layer and its host
/// buffers, as the single-sequence call takes them (shapes in attention::prefill).
struct sequence_call {
  kv_cache* cache = nullptr;                ///< the sequence's cache for this layer
  tensor_view<const float> q;               ///< [T, H_q, d] pre-RoPE queries, read in place
  tensor_view<const float> k;               ///< [T, H_kv, d] pre-RoPE keys
  tensor_view<const float> v;               ///< [T, H_kv, d] values
  tensor_view<float> out;                   ///< [T, H_q, d]; shares no element with any buffer of the batch
  std::span<std::int32_t> selections = {};  ///< optional [T, H_q, budget_chunks] chunk ids (longheads only)
};

/// What a batch checks across its sequences (each sequence's own arguments, its cache not null
/// included, are checked like a single call's first): no cache twice (both would append to it), and no `out` sharing
/// an element with another sequence's q, k, v or out (the result would depend on the order).
/// @throws shape_error naming both sequences.
inline void validate_batch(const char* call, std::span<const sequence_call> batch) {
  auto fail = [&](std::size_t i, const std::string& what) {  // messages are built only on failure
    detail::fail<shape_error>(std::string(call) + ": sequence " + std::to_string(i) + what);
  };
  for (std::size_t i = 0; i < batch.size(); ++i)
    for (std::size_t j = 0; j < batch.size(); ++j) {
      if (i == j) continue;
      if (j > i && batch[i].cache == batch[j].cache)
        fail(i, "'s cache is also sequence " + std::to_string(j) + "'s; a cache holds one sequence");
      for (auto [name, t] : {std::pair{"q", batch[j].q}, std::pair{"k", batch[j].k}, std::pair{"v", batch[j].v},
                             std::pair{"out", tensor_view<const float>(batch[j].out)}})
        if (detail::views_overlap(batch[i].out, t)) fail(i, "'s out overlaps sequence " + std::to_string(j) + "'s " + name);
    }
}

/// The work items of a batched call: each sequence's work_partition, one after another. Its
/// storage is reserved for a number of sequences, so assigning a batch no larger never allocates.
class batch_partition {
 public:
  /// A sequence and one of its work items.
  struct sequence_item {
    std::size_t sequence;  ///< index in the batch
    work_item item;        ///< the item, as work_partition::item() gives it
  };

  /// Room for batches of `sequences`. @throws std::bad_alloc (nothing else changed).
  void reserve(std::size_t sequences) {
    parts_.reserve(sequences);
    first_items_.reserve(sequences);
  }
  /// The items of `batch` on `lanes` lanes: a sequence's partition is made for its share of the
  /// lanes (all of them for one sequence; one each once there are as many sequences as lanes).
  void assign(const attention_config& config, std::span<const sequence_call> batch, std::size_t lanes, bool shared) noexcept {
    parts_.clear();
    first_items_.clear();
    const std::size_t share = batch.empty() ? 1 : std::max<std::size_t>(1, (lanes + batch.size() - 1) / batch.size());
    std::size_t items = 0;
    for (const sequence_call& call : batch) {
      parts_.emplace_back(config, call.q.tokens(), share, shared, work_partition::tile_queries(config));
      first_items_.push_back(items);
      items += parts_.back().items();
    }
    items_ = items;
  }
  /// How many items in all.
  std::size_t items() const noexcept { return items_; }
  /// Item `index` of the batch: its sequence and the sequence's item.
  sequence_item item(std::size_t index) const noexcept {
    const auto next = std::upper_bound(first_items_.begin(), first_items_.end(), index);
    const auto sequence = static_cast<std::size_t>(next - first_items_.begin()) - 1;
    return {sequence, parts_[sequence].item(index - first_items_[sequence])};
  }

 private:
  std::vector<work_partition> parts_;
  std::vector<std::size_t> first_items_;
  std::size_t items_ = 0;
};

}  // namespace longheads
