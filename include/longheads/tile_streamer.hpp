// SPDX-License-Identifier: MIT
// Streaming: runs a tile of queries' planned segments through the kernel, each chunk once for all.
//
// A tile is up to a few dozen queries (a kv group's heads, neighbouring queries of a block)
// with their plans. The streamer walks every query's plan in its own order, taking at each step
// the lowest-addressed chunk any query reads next, so a chunk several queries read is fetched
// once while it is hot; queries reading the same tokens of it go through the kernel together.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "attention_config.hpp"
#include "attention_kernel.hpp"
#include "detail/grow.hpp"
#include "kv_cache.hpp"
#include "planner.hpp"
#include "rope.hpp"

namespace longheads {

/// A lane's tile: its queries, their plans and the kernel's scratch; each buffer sizes itself.
class tile_scratch {
 public:
  /// Room for `queries` queries of up to `segments` segments each, `kernel_floats` of kernel
  /// scratch and (bf16 or int8 caches read by a kernel that cannot) a converted chunk.
  void reserve(const attention_config& config, std::size_t queries, std::size_t segments, std::size_t kernel_floats) {
    const auto d = static_cast<std::size_t>(config.head_dim), w = static_cast<std::size_t>(config.chunk_size);
    max_plan_ = std::max(max_plan_, segments);
    capacity_ = std::max(capacity_, queries);
    detail::grow(plan_, capacity_ * max_plan_);
    for (auto* v : {&plan_counts_, &cursors_}) detail::grow(*v, capacity_);
    detail::grow(states_, capacity_);
    detail::grow(queries_, capacity_);
    detail::grow(round_queries_, capacity_);
    detail::grow(outputs_, capacity_);
    detail::grow(round_outputs_, capacity_);
    detail::grow(round_states_, capacity_);
    detail::grow(round_lengths_, capacity_);
    detail::grow(rotated_, capacity_ * d);
    detail::grow(kernel_, kernel_floats);
    if (config.kv_storage != kv_precision::fp32) detail::grow(converted_, 2 * w * d);
  }

  /// Empties the tile.
  void clear() noexcept { size_ = 0; }
  /// Where the next query's plan goes (max_plan() segments of room).
  planned_segment* next_plan() noexcept { return plan_.data() + size_ * max_plan_; }
  /// Adds the query whose plan next_plan() holds: `n` segments, rotated per segment from
  /// `query` (pre-RoPE), its output row `out`.
  void add(const float* query, float* out, std::size_t n) noexcept {
    plan_counts_[size_] = n;
    queries_[size_] = query;
    outputs_[size_] = out;
    ++size_;
  }
  /// The compact chunk conversion buffer ([2, w, d]).
  std::span<float> converted() noexcept { return converted_; }

  /// Streams every planned segment of the tile's queries through the kernel (see the file
  /// comment) and finishes each query's output.
  template <attention_kernel Kernel>
  void stream(const Kernel& kernel, const attention_config& config, const rope& rotary, const kv_cache& cache) noexcept {
    stream_unfinished(kernel, config, rotary, cache);
    for (std::size_t i = 0; i < size_; ++i) kernel.finish(states_[i], outputs_[i], config.head_dim);
  }
  /// stream() short of the kernel's finish: each query's output row is left unnormalised and
  /// its softmax state in state(i) (i in the order added), the partial result a shard sends.
  template <attention_kernel Kernel>
  void stream_unfinished(const Kernel& kernel, const attention_config& config, const rope& rotary, const kv_cache& cache) noexcept {
    const int d = config.head_dim;
    const float scale = config.scale();
    for (std::size_t i = 0; i < size_; ++i) {
      kernel.begin(states_[i], outputs_[i], d);
      cursors_[i] = 0;
    }
    constexpr std::size_t none = std::numeric_limits<std::size_t>::max();
    for (;;) {
      std::size_t next = none;
      std::int32_t longest = 0;  // queries in their own chunk read different lengths of it
      for (std::size_t i = 0; i < size_; ++i)
        if (cursors_[i] < plan_counts_[i]) {
          const planned_segment& seg = plan_[i * max_plan_ + cursors_[i]];
          if (seg.offset < next) longest = 0;
          if (seg.offset <= next) {
            next = seg.offset;
            longest = std::max(longest, seg.length);
          }
        }
      if (next == none) break;
      // The round's queries, in order; runs of equal length go through the kernel together.
      std::size_t m = 0;
      for (std::size_t i = 0; i < size_; ++i) {
        if (cursors_[i] >= plan_counts_[i]) continue;
        const planned_segment& seg = plan_[i * max_plan_ + cursors_[i]];
        if (seg.offset != next) continue;
        float* rotated = rotated_.data() + static_cast<std::ptrdiff_t>(m) * d;
        rotary.rotate(queries_[i], rotated, seg.delta);
        round_queries_[m] = rotated;
        round_outputs_[m] = outputs_[i];
        round_states_[m] = &states_[i];
        round_lengths_[m] = seg.length;
        ++m;
        ++cursors_[i];
      }
      auto consume_round = [&](auto keys, auto values) {
        for (std::size_t begin = 0; begin < m;) {
          std::size_t end = begin + 1;
          while (end < m && round_lengths_[end] == round_lengths_[begin]) ++end;
          consume_shared(kernel, keys, values, round_lengths_[begin], round_queries_.data() + begin, end - begin, d, scale,
                         round_states_.data() + begin, round_outputs_.data() + begin, kernel_);
          begin = end;
        }
      };
      if constexpr (bf16_reading_kernel<Kernel>) {
        if (config.kv_storage == kv_precision::bf16) {
          consume_round(cache.keys_at<const bf16*>(next), cache.values_at<const bf16*>(next));
          continue;
        }
      }
      if constexpr (int8_reading_kernel<Kernel>) {
        if (config.kv_storage == kv_precision::int8) {
          consume_round(cache.keys_at<int8_rows>(next), cache.values_at<int8_rows>(next));
          continue;
        }
      }
      const auto [keys, values] = cache.fp32_rows(next, longest, converted_);
      consume_round(keys, values);
    }
  }
  /// The softmax state of the i-th query added, after stream_unfinished().
  const softmax_state& state(std::size_t i) const noexcept { return states_[i]; }

 private:

  std::size_t size_ = 0, capacity_ = 0, max_plan_ = 0;
  std::vector<planned_segment> plan_;            // [capacity, max_plan]
  std::vector<std::size_t> plan_counts_, cursors_;
  std::vector<softmax_state> states_;
  std::vector<const float*> queries_, round_queries_;
  std::vector<float*> outputs_, round_outputs_;
  std::vector<softmax_state*> round_states_;
  std::vector<std::int32_t> round_lengths_;
  detail::scratch_vector<float> rotated_;    // [capacity, d]: the round's rotated queries
  detail::scratch_vector<float> kernel_;     // the kernel's own
  detail::scratch_vector<float> converted_;  // [2, w, d]: a bf16 or int8 chunk's keys and values in fp32
};

}  // namespace longheads
