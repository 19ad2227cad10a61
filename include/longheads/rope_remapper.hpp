// SPDX-License-Identifier: MIT
// RoPE remapper: the positions the attention gives the selected chunks and the query.
//
// Paper (contiguous_slot_remapper): the sorted selected chunks occupy slots 0..n-1; a key at
// slot s, offset j, is at position s*w + j; the query at slot(i)*w + p mod w = (n-1)*w + p mod w.
// While the context fits the budget, slots equal chunk ids and positions are the true ones.
//
// The attention then uses the exact query-rotation form: keys are stored once, rotated at their
// local offset j, and for slot s the query is rotated by (query_position - slot_start[s]), since
// R(a)q . R(b)k = q . R(b-a)k. That costs n rotations of a d-vector per query, not n*w.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "config.hpp"

namespace longheads {

/// Fills slot_starts[s] (the position of token 0 of selected chunk s) and returns the query's
/// position. `selected` is ascending and ends with the query's chunk.
template <class R>
concept rope_remapper = requires(const R& r, std::span<const std::int32_t> selected, std::int64_t query_position,
                                 int chunk_size, std::span<std::int64_t> slot_starts) {
  { r.remap(selected, query_position, chunk_size, slot_starts) } noexcept -> std::convertible_to<std::int64_t>;
};

/// The paper's contiguous slots.
struct contiguous_slot_remapper {
  /// Fills each selected chunk's start position and returns the query's position.
  std::int64_t remap(std::span<const std::int32_t> selected, std::int64_t query_position, int chunk_size,
                     std::span<std::int64_t> slot_starts) const noexcept {
    LONGHEADS_ASSERT(!selected.empty() && selected.back() == query_position / chunk_size,
                     "the query's chunk must be the last slot");
    for (std::size_t s = 0; s < selected.size(); ++s) slot_starts[s] = static_cast<std::int64_t>(s) * chunk_size;
    return static_cast<std::int64_t>(selected.size() - 1) * chunk_size + query_position % chunk_size;
  }
};

/// Ablation: keep every token at its true position (selection without remapping). Past the
/// trained length this shows the model distances it never saw, which is what remapping avoids.
struct original_position_remapper {
  /// Fills each selected chunk's start position and returns the query's position.
  std::int64_t remap(std::span<const std::int32_t> selected, std::int64_t query_position, int chunk_size,
                     std::span<std::int64_t> slot_starts) const noexcept {
    for (std::size_t s = 0; s < selected.size(); ++s) slot_starts[s] = std::int64_t{selected[s]} * chunk_size;
    return query_position;
  }
};

static_assert(rope_remapper<contiguous_slot_remapper> && rope_remapper<original_position_remapper>);

}  // namespace longheads
