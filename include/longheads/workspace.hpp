// SPDX-License-Identifier: MIT
// Workspace: each lane's scratch, made of the stages' own parts, each sizing itself.
//
// Reserved before a call commits (so a failed allocation leaves the cache untouched) and
// grown geometrically; after attention::reserve() for a context and a block size, calls up to
// those sizes never allocate.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention_config.hpp"
#include "chunk_encoding.hpp"
#include "chunk_selection.hpp"
#include "tile_streamer.hpp"
#include "work_items.hpp"

namespace longheads {

/// One lane's scratch, a part per stage.
struct lane_workspace {
  encoding_scratch encoding;    ///< append and encode
  selection_scratch selection;  ///< score and select
  tile_scratch tile;            ///< plan and attend
};

/// What the stages need for one call, from the layer's policies and the call's size.
struct workspace_needs {
  std::int64_t context = 0;          ///< tokens in the sequence after the call
  std::int64_t tokens = 0;           ///< tokens of the call
  std::size_t segments = 0;          ///< segments a query reads at most (the method's planner)
  std::size_t tile_queries = 0;      ///< queries a tile attends together
  bool selects = false;              ///< LongHeads: encode, score and select
  bool shared = false;               ///< a kv group selects together
  std::size_t encoder_floats = 0;    ///< the encoder's scratch
  std::size_t scorer_floats = 0;     ///< the scorer's scratch for a block
  std::size_t kernel_floats = 0;     ///< the kernel's scratch
  int index_fanout = 0;              ///< the selection index's fan-out (0: flat scan)
  int index_beam = 0;                ///< the index's beam width (0: an exact search)
  bool index_frontier = false;       ///< the index searches best-first (its frontier grows with the context)
  std::size_t flat_chunks = 0;       ///< chunks a flat scan scores at most (flat_scan_chunks)
  std::size_t index_marks = 0;       ///< marks the index's search keeps (key_cluster_index::marks)

  /// The needs of a call of `tokens` tokens ending at `context`, whose queries read at most
  /// `segments` segments, for a layer with these policy values.
  template <class PolicyValues>
  static workspace_needs of(const attention_config& config, const PolicyValues& policies, std::int64_t context, std::int64_t tokens,
                            std::int64_t segments, bool shared_selection) {
    const bool selects = config.method == attention_method::longheads;
    return {context, tokens, static_cast<std::size_t>(segments), work_partition::tile_queries(config), selects, selects && shared_selection,
            policies.encoder.scratch_floats(config),
            policies.scorer.scratch_floats(config, static_cast<std::ptrdiff_t>(work_partition::query_block(tokens))),
            policies.kernel.scratch_floats(config.chunk_size, config.head_dim), selects ? policies.index.layout().fanout : 0, beam_of(policies.index),
            searches_best_first<std::remove_cvref_t<decltype(policies.index)>>, flat_scan_chunks(policies.index, config),
            selects ? marks_of(policies.index, (context + config.chunk_size - 1) / config.chunk_size) : 0};
  }
  /// The marks an index policy's search keeps over `chunks` chunks (key_cluster_index), else 0.
  template <class Index>
  static std::size_t marks_of(const Index& index, std::int64_t chunks) {
    if constexpr (requires { index.marks(chunks); }) return index.marks(chunks);
    else return 0;
  }
  /// The widest beam of an index policy that has one (bound_tree_beam), else 0.
  template <class Index>
  static int beam_of(const Index& index) noexcept {
    if constexpr (requires { index.widest_beam(); }) return index.widest_beam();
    else return 0;
  }
};

/// The lanes' scratch of one attention object.
class workspace {
 public:
  /// Empty scratch for `lanes` lanes.
  explicit workspace(std::size_t lanes) : lanes_(lanes) {}
  /// Lane i's scratch.
  lane_workspace& lane(std::size_t i) noexcept { return lanes_[i]; }
  /// How many lanes.
  std::size_t lanes() const noexcept { return lanes_.size(); }

  /// Grows every lane's parts to what `needs` asks. @throws std::bad_alloc (nothing else changed).
  void reserve(const attention_config& config, const workspace_needs& needs) {
    const auto chunks = static_cast<std::size_t>((needs.context + config.chunk_size - 1) / config.chunk_size);
    const auto block = static_cast<std::size_t>(work_partition::query_block(needs.tokens));
    for (lane_workspace& lane : lanes_) {
      lane.encoding.reserve(config, needs.selects, needs.tokens, needs.encoder_floats);
      lane.selection.reserve(config, needs.selects, needs.shared, chunks, block, needs.tile_queries, needs.segments, needs.scorer_floats,
                             needs.index_fanout, needs.index_beam, needs.index_frontier, needs.flat_chunks, needs.index_marks);
      lane.tile.reserve(config, needs.tile_queries, needs.segments, needs.kernel_floats);
    }
  }

 private:
  std::vector<lane_workspace> lanes_;
};

}  // namespace longheads
