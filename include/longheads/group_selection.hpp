// SPDX-License-Identifier: MIT
// Group selection: whether the query heads that share a kv head (GQA) choose their chunks each
// on their own (the paper) or together, from one score per chunk combined over the group.
//
// Shared selection reads one set of chunks per group instead of up to group_size sets, and
// pools the group's evidence (a chunk any head of the group wants is wanted by all); its cost
// is that a head can no longer specialise within its group.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>

namespace longheads {

/// shared: whether the group selects together. combine(first, stride, heads) reduces the
/// scores first[0], first[stride], ... of the group's heads for one (query, chunk).
template <class G>
concept group_selection = requires(const G& g, const float* first, std::ptrdiff_t stride, int heads) {
  { G::shared } -> std::convertible_to<bool>;
  { g.combine(first, stride, heads) } noexcept -> std::convertible_to<float>;
};

/// The paper: every query head selects for itself.
struct per_head_selection {
  /// Whether the heads of a kv group select one set of chunks together.
  static constexpr bool shared = false;
  /// The group's score of one (query, chunk) from its heads' scores first[0], first[stride], ...
  float combine(const float* first, std::ptrdiff_t, int) const noexcept { return *first; }
};

/// The group selects the chunks its most interested head scores highest.
struct group_max_selection {
  /// Whether the heads of a kv group select one set of chunks together.
  static constexpr bool shared = true;
  /// The group's score of one (query, chunk) from its heads' scores first[0], first[stride], ...
  float combine(const float* first, std::ptrdiff_t stride, int heads) const noexcept {
    float best = first[0];
    for (int j = 1; j < heads; ++j) best = std::max(best, first[j * stride]);
    return best;
  }
};

/// The group selects by its heads' mean score.
struct group_mean_selection {
  /// Whether the heads of a kv group select one set of chunks together.
  static constexpr bool shared = true;
  /// The group's score of one (query, chunk) from its heads' scores first[0], first[stride], ...
  float combine(const float* first, std::ptrdiff_t stride, int heads) const noexcept {
    float sum = 0.0f;
    for (int j = 0; j < heads; ++j) sum += first[j * stride];
    return sum / static_cast<float>(heads);
  }
};

static_assert(group_selection<per_head_selection> && group_selection<group_max_selection> && group_selection<group_mean_selection>);

}  // namespace longheads
