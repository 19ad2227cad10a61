// SPDX-License-Identifier: MIT
// Work items: how one call's queries split into independent items for the executor.
//
// An item is some query heads of some kv groups over one block of query positions. Items never
// share results, and each query's arithmetic is the same whatever item holds it, so outputs
// are bit-identical for any thread count and any split of a sequence into calls.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "attention_config.hpp"

namespace longheads {

/// The query heads of one work item: heads [first_in_group, end_in_group) of each of the kv
/// groups [group_begin, group_end).
struct heads_of_item {
  int group_begin;     ///< first kv group
  int group_end;       ///< one past the last kv group
  int first_in_group;  ///< first head within each group
  int end_in_group;    ///< one past the last head within each group
  /// Heads per group.
  int per_group() const noexcept { return end_in_group - first_in_group; }
  /// Heads in all.
  int count() const noexcept { return (group_end - group_begin) * per_group(); }
};

/// One work item: its heads and its queries [t0, t0 + count) of the call.
struct work_item {
  heads_of_item heads;  ///< its query heads
  std::int64_t t0;      ///< its first query, in the call
  std::int64_t count;   ///< its queries
};

/// The split of a call of `tokens` queries over `lanes` lanes.
class work_partition {
 public:
  /// Queries attended together by the tile streamer, so each chunk they read is fetched once
  /// for all of them: at least a kv group's heads.
  static std::size_t tile_queries(const attention_config& config) noexcept {
    return std::max<std::size_t>(16, static_cast<std::size_t>(config.group_size()));
  }
  /// Queries of a prefill call scored and planned together.
  static std::int64_t query_block(std::int64_t tokens) noexcept { return std::min<std::int64_t>(tokens, 64); }

  /// @param config the layer
  /// @param tokens queries of the call
  /// @param lanes the executor's lanes
  /// @param shared whether a kv group selects its chunks together (its heads stay in one item)
  /// @param tile_queries queries the tile streamer attends together
  work_partition(const attention_config& config, std::int64_t tokens, std::size_t lanes, bool shared, std::size_t tile_queries) noexcept
      : tokens_(tokens), block_(query_block(tokens)), blocks_((tokens + block_ - 1) / block_), group_(config.group_size()),
        n_kv_heads_(config.n_kv_heads) {
    // Split a group's heads across items only when there are fewer items than lanes (decode
    // with few kv heads); otherwise all heads of a group share each chunk read.
    const std::int64_t items_per_part = std::int64_t{n_kv_heads_} * blocks_;
    const auto n_lanes = static_cast<std::int64_t>(lanes);
    parts_ = shared || items_per_part >= n_lanes ? 1
                                                 : static_cast<int>(std::min<std::int64_t>(group_, (n_lanes + items_per_part - 1) / items_per_part));
    heads_per_part_ = (group_ + parts_ - 1) / parts_;
    // A decode item takes several kv groups (as many as fill a tile, while every lane still gets
    // one): the cache is chunk-major, so walking their chunks in address order reads the kv heads
    // of each chunk side by side instead of jumping a whole row of heads per chunk.
    span_ = tokens == 1 && parts_ == 1
                ? static_cast<int>(std::clamp<std::int64_t>(
                      std::min<std::int64_t>(static_cast<std::int64_t>(tile_queries) / group_, n_kv_heads_ / n_lanes), 1, n_kv_heads_))
                : 1;
    spans_ = (n_kv_heads_ + span_ - 1) / span_;
  }

  /// How many items.
  std::size_t items() const noexcept { return static_cast<std::size_t>(spans_ * parts_ * blocks_); }

  /// Item `index`; its heads may be empty (a part past the group's end), and then it has no work.
  work_item item(std::size_t index) const noexcept {
    const auto i = static_cast<std::int64_t>(index);
    const std::int64_t b = i % blocks_, part = i / blocks_ % parts_, g = i / blocks_ / parts_;
    const heads_of_item heads{static_cast<int>(g) * span_, std::min(n_kv_heads_, static_cast<int>(g + 1) * span_),
                              static_cast<int>(part) * heads_per_part_, std::min(group_, static_cast<int>(part + 1) * heads_per_part_)};
    const std::int64_t t0 = b * block_;
    return {heads, t0, std::min(block_, tokens_ - t0)};
  }

 private:
  std::int64_t tokens_, block_, blocks_;
  int group_, n_kv_heads_;
  int parts_ = 1, heads_per_part_ = 1, span_ = 1, spans_ = 1;
};

}  // namespace longheads
