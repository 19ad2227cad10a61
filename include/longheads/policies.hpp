// SPDX-License-Identifier: MIT
// Policy bundles: the paper's seven policies, and the checks any bundle passes before use.
#pragma once

#include <concepts>

#include "attention_kernel.hpp"
#include "chunk_encoder.hpp"
#include "index_policies.hpp"
#include "chunk_scorer.hpp"
#include "executor.hpp"
#include "group_selection.hpp"
#include "head_selector.hpp"
#include "rope_remapper.hpp"

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
  using index = flat_scan;                      ///< every full chunk scored for every query
};

namespace detail {
template <class Policies>
struct index_of {
  using type = flat_scan;  // bundles written before the index policy existed
};
template <class Policies>
  requires requires { typename Policies::index; }
struct index_of<Policies> {
  using type = typename Policies::index;
};
}  // namespace detail

/// A bundle's policy types, each checked against its concept, and a value of each.
template <class Policies>
struct policy_bundle {
  ///@{
  /// The policy types of the bundle.
  using encoder_type = typename Policies::encoder;
  using scorer_type = typename Policies::scorer;
  using selector_type = typename Policies::selector;
  using remapper_type = typename Policies::remapper;
  using kernel_type = typename Policies::kernel;
  using executor_type = typename Policies::executor;
  using group_selection_type = typename Policies::group_selection;
  using index_type = typename detail::index_of<Policies>::type;
  ///@}
  static_assert(chunk_encoder<encoder_type>, "Policies::encoder must model longheads::chunk_encoder (chunk_encoder.hpp)");
  static_assert(chunk_scorer<scorer_type>, "Policies::scorer must model longheads::chunk_scorer (chunk_scorer.hpp)");
  static_assert(head_selector<selector_type>, "Policies::selector must model longheads::head_selector (head_selector.hpp)");
  static_assert(rope_remapper<remapper_type>, "Policies::remapper must model longheads::rope_remapper (rope_remapper.hpp)");
  static_assert(attention_kernel<kernel_type>, "Policies::kernel must model longheads::attention_kernel (attention_kernel.hpp)");
  static_assert(executor<executor_type>, "Policies::executor must model longheads::executor (executor.hpp)");
  static_assert(group_selection<group_selection_type>,
                "Policies::group_selection must model longheads::group_selection (group_selection.hpp)");
  static_assert(selection_index<index_type>, "Policies::index must model longheads::selection_index (index_policies.hpp)");
  static_assert(!index_type::indexed || (std::same_as<scorer_type, bound_scorer> && std::derived_from<encoder_type, key_bounds_encoder> &&
                                         encodes_keys_only<encoder_type> && std::same_as<selector_type, sink_local_topk_selector> &&
                                         !group_selection_type::shared),
                "bound_tree_index finds exactly the flat scan's chunks only for key_bounds_encoder + bound_scorer with "
                "sink_local_topk_selector and per-head selection");

  /// Policy values, for policies with state (e.g. a thread pool, a scorer's offset).
  struct values {
    ///@{
    /// One value of each policy type, default-constructed unless given.
    encoder_type encoder{};
    scorer_type scorer{};
    selector_type selector{};
    remapper_type remapper{};
    kernel_type kernel{};
    executor_type executor{};
    group_selection_type group_selection{};
    index_type index{};
    ///@}
  };
};

}  // namespace longheads
