// SPDX-License-Identifier: MIT
// The per-layer, per-sequence cache of LongHeads attention.
//
// Holds, chunk-major so that one chunk of one kv head is w*d contiguous floats the kernel
// streams through in place:
//   keys             [chunk][H_kv][w][d]   rotated once, at local positions t mod w
//   values           [chunk][H_kv][w][d]
//   representations  [H_r][chunk][r]      one per full chunk and representation head (the encoder's
//                                         output): per query head, or per kv head for encoders that
//                                         read keys only (H_r = representation_heads); head-major so
//                                         each head's scoring reads them in one run
//   open queries     [w][H_q][d]          queries of the open chunk, locally rotated, until it is encoded;
//                                         a second such buffer (chunk parity) when the encoding of a
//                                         full chunk is spread over the next chunk's tokens, with the
//                                         encoder's state per representation head
// plus what every head selected for the last query. The cache does its own appends (rotating
// keys, converting to the storage type, keeping the open chunk's queries) and bookkeeping; the
// attention's stages call those writers in the order the algorithm runs.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory_resource>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "chunk_index_state.hpp"
#include "errors.hpp"
#include "kv_storage.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// What a cache holds per token and chunk; a cache only serves an attention of the same shape.
struct cache_shape {
  int n_q_heads = 0;   ///< H_q
  int n_kv_heads = 0;  ///< H_kv
  int head_dim = 0;    ///< d
  int chunk_size = 0;  ///< w
  /// Floats per chunk representation; encoder and scorer must agree.
  std::size_t representation_floats = 0;
  kv_precision precision = kv_precision::fp32;  ///< how keys and values are stored
  /// Heads with representations of their own: n_q_heads (0 means that), or n_kv_heads when the
  /// encoder reads keys only, so every query head of a kv group has the same representation.
  int representation_heads = 0;
  /// Chunks per box of the selection index's tree kept per representation head (bound_tree), 0
  /// for none (index_layout::fanout; the index_* fields are the index policy's layout()).
  int index_fanout = 0;
  /// Whether the cache keeps the open chunk's rotated queries until the chunk is encoded: only
  /// an encoder that reads queries needs them (keys-only encoders and the baselines do not).
  bool keeps_open_queries = true;
  /// Pieces per representation head when a full chunk's encoding is spread over the tokens of
  /// the next chunk (piecewise_chunk_encoder, attention_config::spread_encoding), 0 when every
  /// chunk is encoded as it completes. Spreading keeps the last full chunk's queries too.
  int spread_pieces = 0;
  /// Floats of encoder state kept per representation head between pieces (spread_pieces > 0).
  std::size_t spread_state_floats = 0;
  /// Full chunks whose queries are kept beyond what encoding needs, so that truncate() can go
  /// back into them (attention_config::rollback_chunks; only with keeps_open_queries).
  int rollback_chunks = 0;
  ///@{
  /// The key-space clusters of the selection index (index_layout: key_cluster_index), 0 for none.
  int index_segment_chunks = 0;
  int index_clusters = 0;
  int index_cluster_iterations = 0;
  ///@}
  /// What the cache keeps per representation head for the selection index.
  index_layout indexing() const noexcept { return {index_fanout, index_segment_chunks, index_clusters, index_cluster_iterations}; }
  /// Sets the index_* fields from an index policy's layout.
  void set_index(const index_layout& layout) noexcept {
    index_fanout = layout.fanout;
    index_segment_chunks = layout.segment_chunks;
    index_clusters = layout.clusters;
    index_cluster_iterations = layout.iterations;
  }
  /// representation_heads, 0 resolved.
  int summary_heads() const noexcept { return representation_heads > 0 ? representation_heads : n_q_heads; }
  /// Whether the last full chunk's encoding is spread over the open chunk's tokens.
  bool spreads_encoding() const noexcept { return spread_pieces > 0; }
  /// Chunks whose queries a cache keeps: the open chunk's, the last full chunk's while its
  /// encoding is spread, and rollback_chunks more; none without keeps_open_queries.
  int query_chunks() const noexcept { return keeps_open_queries ? (spreads_encoding() ? 2 : 1) + rollback_chunks : 0; }
  /// Equal when every field is.
  friend bool operator==(const cache_shape&, const cache_shape&) = default;
};

inline std::string to_string(const cache_shape& s) {
  return "{q_heads " + std::to_string(s.n_q_heads) + ", kv_heads " + std::to_string(s.n_kv_heads) + ", head_dim " +
         std::to_string(s.head_dim) + ", chunk_size " + std::to_string(s.chunk_size) + ", representation " +
         std::to_string(s.representation_floats) + " x " + std::to_string(s.summary_heads()) + " heads, index fanout " +
         std::to_string(s.index_fanout) + ", index clusters " + std::to_string(s.index_clusters) + " per " +
         std::to_string(s.index_segment_chunks) + " chunks x " + std::to_string(s.index_cluster_iterations) + " iterations, open queries " + (s.keeps_open_queries ? "kept" : "none") + ", spread pieces " +
         std::to_string(s.spread_pieces) + " x " + std::to_string(s.spread_state_floats) + " floats, rollback chunks " +
         std::to_string(s.rollback_chunks) + ", kv " + to_string(s.precision) + "}";
}

/// The most full chunks whose queries a cache keeps for rollback (cache_shape::rollback_chunks).
inline constexpr int max_rollback_chunks = 256;

/// Positions are int32 throughout (selections, chunk ids): the longest sequence a cache holds.
inline constexpr std::int64_t max_sequence_tokens = std::numeric_limits<std::int32_t>::max();

namespace detail {
struct cache_file_access;  // cache_file.hpp: saves and loads every buffer
}  // namespace detail

/// One sequence of one layer: keys rotated once at their local positions, values, the open
/// chunk's queries and one representation per full chunk and query head (or kv head).
/// Made by attention::make_cache(); copyable; equal (==) when every stored bit is. Hosts read
/// it and call reserve(), clear() and truncate(); the writers below the readers are the
/// attention's stages' (calling them directly bypasses the attention's validation).
///
/// Its buffers (keys, values, representations, open queries, encoder state) come from a
/// std::pmr::memory_resource, so an engine can put them on huge pages, NUMA-local or pinned
/// memory; the resource must outlive the cache. Each buffer keeps the resource it was made
/// with, as std::pmr containers do: a copy-constructed cache allocates from the default
/// resource, a move-constructed one from the source's, and assignment keeps the target's.
class kv_cache {
 public:
  /// An empty cache whose buffers come from `memory`.
  /// @throws shape_error if a dimension is not positive; config_error if memory is null.
  explicit kv_cache(const cache_shape& shape, std::pmr::memory_resource* memory = std::pmr::get_default_resource())
      : shape_(shape),
        keys_(checked(memory)),
        values_(memory),
        representations_(memory),
        open_queries_(memory),
        spread_state_(memory),
        keys16_(memory),
        values16_(memory),
        keys8_(memory),
        values8_(memory),
        key_scales_(memory),
        value_scales_(memory) {
    if (shape.n_q_heads <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 || shape.chunk_size <= 0 || shape.n_q_heads % shape.n_kv_heads != 0)
      detail::fail<shape_error>("kv_cache: every dimension must be > 0 and n_kv_heads divide n_q_heads, got " + to_string(shape));
    if (shape.representation_heads != 0 && shape.representation_heads != shape.n_q_heads && shape.representation_heads != shape.n_kv_heads)
      detail::fail<shape_error>("kv_cache: representation_heads must be 0, n_q_heads or n_kv_heads, got " + to_string(shape));
    if (const std::string problem = shape.indexing().problem(shape.head_dim, shape.representation_floats); !problem.empty())
      detail::fail<shape_error>("kv_cache: " + problem + ", got " + to_string(shape));
    if (shape.spread_pieces < 0 || (shape.spread_pieces > 0 && (!shape.keeps_open_queries || shape.representation_floats == 0)))
      detail::fail<shape_error>("kv_cache: spreading the encoding needs spread_pieces >= 0, the open chunk's queries and representations, got " +
                                to_string(shape));
    if (shape.rollback_chunks < 0 || shape.rollback_chunks > max_rollback_chunks || (shape.rollback_chunks > 0 && !shape.keeps_open_queries))
      detail::fail<shape_error>("kv_cache: rollback_chunks must be in [0, " + std::to_string(max_rollback_chunks) +
                                "] and 0 unless the cache keeps queries, got " + to_string(shape));
    open_queries_.resize(static_cast<std::size_t>(shape.query_chunks()) * query_buffer_floats());
    held_.assign(static_cast<std::size_t>(shape.query_chunks()), held_rows{});
    spread_state_.resize(shape.spreads_encoding() ? static_cast<std::size_t>(shape.summary_heads()) * shape.spread_state_floats : 0);
    if (shape.indexing().any())
      indexes_.assign(static_cast<std::size_t>(shape.summary_heads()), chunk_index_state(shape.head_dim, shape.indexing()));
    selection_counts_.assign(static_cast<std::size_t>(shape.n_q_heads), 0);
  }

  /// The shape given at construction.
  const cache_shape& shape() const noexcept { return shape_; }
  /// Where the buffers come from.
  std::pmr::memory_resource* memory() const noexcept { return keys_.get_allocator().resource(); }
  /// Tokens in the sequence so far.
  std::int64_t tokens() const noexcept { return tokens_; }
  /// Chunks whose w tokens have all arrived.
  std::int64_t full_chunks() const noexcept { return tokens_ / shape_.chunk_size; }
  /// Full chunks whose representations are final and scored: all of them, or all but the last
  /// while its encoding is spread over the open chunk's tokens (cache_shape::spread_pieces).
  std::int64_t summarised_chunks() const noexcept { return full_chunks() - (shape_.spreads_encoding() && full_chunks() > 0 ? 1 : 0); }
  /// Tokens the cache holds without allocating.
  std::int64_t capacity_tokens() const noexcept { return capacity_chunks_ * shape_.chunk_size; }

  /// Allocates room for `tokens` tokens now, so later calls up to that length do not allocate.
  /// @throws limit_error beyond max_sequence_tokens or addressable memory; strong guarantee.
  void reserve(std::int64_t tokens) {
    if (tokens < 0 || tokens > max_sequence_tokens)
      detail::fail<limit_error>("kv_cache: " + std::to_string(tokens) + " tokens is beyond the limit of " +
                                std::to_string(max_sequence_tokens));
    const std::int64_t chunks = (tokens + shape_.chunk_size - 1) / shape_.chunk_size;
    if (chunks > capacity_chunks_) {
      const std::size_t per_chunk = std::max(kv_floats_per_chunk(), representation_floats_per_chunk());
      if (static_cast<std::size_t>(chunks) > std::numeric_limits<std::ptrdiff_t>::max() / sizeof(float) / 4 / per_chunk)
        detail::fail<limit_error>("kv_cache: " + std::to_string(tokens) + " tokens of shape " + to_string(shape_) +
                                  " do not fit in addressable memory");
      grow(std::max(chunks, capacity_chunks_ + capacity_chunks_ / 2));
    }
    for (chunk_index_state& index : indexes_) index.reserve(std::max(chunks, capacity_chunks_));
    // The last selection of every head: at most one entry per chunk (dense attention reads
    // them all), so a reserved cache never grows it while decoding. (Capacity, not content: a
    // failure here after the growth above leaves the cache equal to before.)
    reserve_selections(static_cast<std::size_t>(chunks));
  }

  /// Forgets the sequence, keeps the memory (zeroing what the sequence stored, as truncate() does: time linear in it).
  void clear() noexcept {
    rewind(0);
    pending_done_ = 0;
  }

  /// Forgets every token from position `tokens` on and keeps the memory: later calls then see
  /// the cache that held those `tokens` tokens, bit for bit in what they compute (no last
  /// selection is recorded, as after clear()). A chunk that is no longer full is encoded again
  /// when it fills. Goes back to a chunk boundary, or to any length from rewindable_from(): any
  /// length at all when the cache keeps no queries (keys-only encoders, the baselines), else
  /// within a chunk whose queries it still holds, which its encoding needs: the open chunk's,
  /// the last full chunk's while its encoding is spread (speculative decoding's rejected tokens
  /// across one chunk boundary), and rollback_chunks more (attention_config::rollback_chunks).
  /// A spread encoding (cache_shape::spread_pieces) of the new last full chunk starts again when
  /// the cache holds that chunk's queries, and is otherwise kept finished (it was, further on).
  /// What is forgotten leaves no trace: the removed tokens' keys, values and queries, and the
  /// summaries and encoder state made from them, are zeroed, so neither ==, a view nor a saved
  /// file shows them; the same tokens appended again give a cache == one that never held the
  /// removed ones (except a spread encoding kept finished: == then sees its summary where that
  /// cache still holds the chunk's queries; the outputs are the same).
  /// @throws limit_error if `tokens` is negative, past tokens(), or before rewindable_from()
  /// without being a chunk boundary; strong guarantee.
  void truncate(std::int64_t tokens) {
    if (tokens < 0 || tokens > tokens_ || (tokens < rewindable_from() && tokens % shape_.chunk_size != 0))
      detail::fail<limit_error>("kv_cache::truncate: " + std::to_string(tokens) + " tokens; the cache holds " + std::to_string(tokens_) +
                                " and can go back to a multiple of the chunk size " + std::to_string(shape_.chunk_size) +
                                " or to any length from " + std::to_string(rewindable_from()));
    const std::int64_t full_before = full_chunks();
    rewind(tokens);
    if (!shape_.spreads_encoding()) return;
    if (full_chunks() == 0) {  // nothing to encode: no progress, as in a cache that never had a full chunk
      pending_done_ = 0;
      return;
    }
    const bool held = holds_queries_of(full_chunks() - 1);
    if (full_chunks() != full_before) pending_done_ = held ? 0 : spread_total();
    // A spread encoding further on than the kept tokens schedule starts again (when its queries
    // are here), so the same tokens after it leave it where a cache that never got further has it.
    if (held && pending_done_ > scheduled_pieces(tokens)) pending_done_ = 0;
    if (pending_done_ == 0) {  // until it is encoded again the chunk's slot and the state are empty, as in such a cache
      for (int h = 0; h < shape_.summary_heads(); ++h) std::ranges::fill(representation_slot(full_chunks() - 1, h), 0.0f);
      std::ranges::fill(spread_state_, 0.0f);
    }
  }
  /// The earliest length truncate() goes back to that is not a chunk boundary: 0 when the cache
  /// keeps no queries, else the start of the earliest chunk whose queries it holds.
  std::int64_t rewindable_from() const noexcept {
    if (!shape_.keeps_open_queries) return 0;
    std::int64_t earliest = full_chunks();
    while (earliest > 0 && holds_queries_of(earliest - 1)) --earliest;
    return earliest * shape_.chunk_size;
  }

  /// [w, d] keys of one chunk of one kv head, rotated at local positions (fp32 caches).
  const float* keys(std::int64_t chunk, int kv_head) const noexcept { return keys_.data() + kv_offset(chunk, kv_head); }
  /// [w, d] values of one chunk of one kv head (fp32 caches).
  const float* values(std::int64_t chunk, int kv_head) const noexcept { return values_.data() + kv_offset(chunk, kv_head); }
  ///@{
  /// The same for bf16 caches.
  const bf16* keys_bf16(std::int64_t chunk, int kv_head) const noexcept { return keys16_.data() + kv_offset(chunk, kv_head); }
  const bf16* values_bf16(std::int64_t chunk, int kv_head) const noexcept { return values16_.data() + kv_offset(chunk, kv_head); }
  ///@}
  ///@{
  /// The same for int8 caches: the quantized rows with their block scales.
  int8_rows keys_int8(std::int64_t chunk, int kv_head) const noexcept { return keys_at<int8_rows>(kv_offset(chunk, kv_head)); }
  int8_rows values_int8(std::int64_t chunk, int kv_head) const noexcept { return values_at<int8_rows>(kv_offset(chunk, kv_head)); }
  ///@}
  /// Elements per scale of an int8 cache (int8_block_elements of the head dim).
  int int8_block() const noexcept { return int8_block_elements(shape_.head_dim); }
  /// The representations query head `q_head` scores chunks against, [summarised_chunks, r]
  /// (shared by the heads of a kv group when the encoder reads keys only).
  matrix_view<const float> representations(int q_head) const noexcept {
    const auto r = static_cast<std::ptrdiff_t>(shape_.representation_floats);
    return {representations_.data() + representation_offset(0, representation_head(q_head)), summarised_chunks(), r, r};
  }
  /// Chunk ids query head `q_head` read for the last query of the last call, ascending.
  std::span<const std::int32_t> last_selection(int q_head) const noexcept {
    return std::span<const std::int32_t>(selections_).subspan(static_cast<std::size_t>(q_head) * selection_stride_,
                                                              static_cast<std::size_t>(selection_counts_[static_cast<std::size_t>(q_head)]));
  }
  /// Bytes held (capacity), split by what they hold.
  struct memory_use {
    std::size_t keys = 0;            ///< cached keys
    std::size_t values = 0;          ///< cached values
    std::size_t representations = 0; ///< chunk summaries the scorer reads
    /// the open chunk's queries until it is encoded (and, while its encoding is spread, the last
    /// full chunk's, with the encoder's state)
    std::size_t open_chunk = 0;
    std::size_t selections = 0;      ///< the last selection of every head
    std::size_t index = 0;           ///< the selection index's boxes (cache_shape::index_fanout)
    /// All of it.
    std::size_t total() const noexcept { return keys + values + representations + open_chunk + selections + index; }
  };
  /// Bytes held (capacity) by kind; divide by capacity_tokens() for bytes per token.
  memory_use bytes_by_kind() const noexcept {
    return {keys_.capacity() * sizeof(float) + keys16_.capacity() * sizeof(bf16) + keys8_.capacity() + key_scales_.capacity() * sizeof(bf16),
            values_.capacity() * sizeof(float) + values16_.capacity() * sizeof(bf16) + values8_.capacity() +
                value_scales_.capacity() * sizeof(bf16),
            representations_.capacity() * sizeof(float),
            (open_queries_.capacity() + spread_state_.capacity()) * sizeof(float),
            (selections_.capacity() + selection_counts_.capacity()) * sizeof(std::int32_t), index_floats() * sizeof(float)};
  }
  /// Bytes held (capacity), all buffers included.
  std::size_t bytes() const noexcept { return bytes_by_kind().total(); }

  /// Same shape and same logical content, bit for bit (capacity is not content; a NaN equals
  /// the same NaN, so a copy of a cache holding non-finite values equals the original). Of a
  /// spread encoding (cache_shape::spread_pieces) the content is its inputs while it runs (the
  /// chunk's queries), its representations once done; how far it has got is not content: it is
  /// a function of those inputs, and the same bits come out of it whenever it ends.
  friend bool operator==(const kv_cache& a, const kv_cache& b) {
    if (a.shape_ != b.shape_ || a.tokens_ != b.tokens_ || a.selection_counts_ != b.selection_counts_) return false;
    const std::size_t chunks = static_cast<std::size_t>((a.tokens_ + a.shape_.chunk_size - 1) / a.shape_.chunk_size);
    const std::size_t kv = chunks * a.kv_floats_per_chunk();
    const std::int64_t pending = a.full_chunks() - a.summarised_chunks();  // 1 while a spread encoding runs
    const bool pending_done = pending > 0 && a.pending_done_ >= a.spread_total();
    if (pending > 0 && pending_done != (b.pending_done_ >= b.spread_total())) return false;
    const std::size_t reps = static_cast<std::size_t>(a.summarised_chunks() + (pending_done ? 1 : 0)) * a.shape_.representation_floats;  // per head
    const std::size_t open = !a.shape_.keeps_open_queries ? 0 : static_cast<std::size_t>(a.tokens_ % a.shape_.chunk_size) *
                             static_cast<std::size_t>(a.shape_.n_q_heads * a.shape_.head_dim);
    auto same = [](const auto* x, const auto* y, std::size_t n) { return n == 0 || std::memcmp(x, y, n * sizeof(*x)) == 0; };
    if (pending > 0 && !pending_done &&
        !same(a.query_buffer(a.full_chunks() - 1), b.query_buffer(a.full_chunks() - 1), a.query_buffer_floats()))
      return false;
    for (std::size_t h = 0; h < a.selection_counts_.size(); ++h) {
      auto sa = a.last_selection(static_cast<int>(h)), sb = b.last_selection(static_cast<int>(h));
      if (!std::equal(sa.begin(), sa.end(), sb.begin(), sb.end())) return false;
    }
    const std::size_t blocks = kv / static_cast<std::size_t>(a.int8_block());
    const bool kv_same = a.shape_.precision == kv_precision::bf16
                             ? same(a.keys16_.data(), b.keys16_.data(), kv) && same(a.values16_.data(), b.values16_.data(), kv)
                         : a.shape_.precision == kv_precision::int8
                             ? same(a.keys8_.data(), b.keys8_.data(), kv) && same(a.values8_.data(), b.values8_.data(), kv) &&
                                   same(a.key_scales_.data(), b.key_scales_.data(), blocks) &&
                                   same(a.value_scales_.data(), b.value_scales_.data(), blocks)
                             : same(a.keys_.data(), b.keys_.data(), kv) && same(a.values_.data(), b.values_.data(), kv);
    for (int h = 0; h < a.shape_.summary_heads(); ++h)
      if (!same(a.representations_.data() + a.representation_offset(0, h), b.representations_.data() + b.representation_offset(0, h), reps))
        return false;
    return kv_same && (open == 0 || same(a.query_buffer(a.full_chunks()), b.query_buffer(a.full_chunks()), open));
  }

  ///@{
  /// Where one chunk of one kv head starts in the key and value storage, in elements, and the
  /// elements of one chunk of every kv head: the attention plans reads as such offsets.
  std::size_t kv_offset(std::int64_t chunk, int kv_head) const noexcept {
    return (static_cast<std::size_t>(chunk) * static_cast<std::size_t>(shape_.n_kv_heads) + static_cast<std::size_t>(kv_head)) *
           static_cast<std::size_t>(shape_.chunk_size) * static_cast<std::size_t>(shape_.head_dim);
  }
  std::size_t kv_floats_per_chunk() const noexcept {
    return static_cast<std::size_t>(shape_.n_kv_heads) * static_cast<std::size_t>(shape_.chunk_size) *
           static_cast<std::size_t>(shape_.head_dim);
  }
  ///@}
  /// Keys, then values, from element `offset` of the storage, as the kernels read them: a
  /// `const float*` (fp32 caches), `const bf16*` (bf16) or int8_rows (int8).
  template <class Rows>
  Rows keys_at(std::size_t offset) const noexcept {
    return rows_at<Rows>(keys_, keys16_, keys8_, key_scales_, offset);
  }
  /// @copydoc keys_at
  template <class Rows>
  Rows values_at(std::size_t offset) const noexcept {
    return rows_at<Rows>(values_, values16_, values8_, value_scales_, offset);
  }

  /// `tokens` keys and values from element `offset` of the storage as fp32: in place in an
  /// fp32 cache, converted (exactly) into `scratch` ([2, w, d] floats) in a bf16 or int8 one.
  std::pair<const float*, const float*> fp32_rows(std::size_t offset, std::int64_t tokens, std::span<float> scratch) const noexcept {
    if (shape_.precision == kv_precision::fp32) return {keys_.data() + offset, values_.data() + offset};
    const std::ptrdiff_t n = tokens * shape_.head_dim;
    float* keys = scratch.data();
    float* values = keys + static_cast<std::ptrdiff_t>(shape_.chunk_size) * shape_.head_dim;
    if (shape_.precision == kv_precision::int8) {
      const int block = int8_block();
      dequantize_int8(keys8_.data() + offset, key_scales_.data() + offset / block, keys, n, block);
      dequantize_int8(values8_.data() + offset, value_scales_.data() + offset / block, values, n, block);
    } else {
      from_bf16(keys16_.data() + offset, keys, n);
      from_bf16(values16_.data() + offset, values, n);
    }
    return {keys, values};
  }

  // ----------------------------------------------------------------- the attention's writers
  /// Stores row t of k and v as the token at sequence position `position`: keys rotated at the
  /// local position position mod w, both converted to the storage type. `scratch` holds d floats
  /// (a bf16 or int8 cache rotates there first). The position must be allocated (reserve()).
  void store_token(std::int64_t position, tensor_view<const float> k, tensor_view<const float> v, std::ptrdiff_t t, const rope& rotary,
                   std::span<float> scratch) noexcept {
    const std::int64_t chunk = position / shape_.chunk_size, offset = position % shape_.chunk_size;
    const std::ptrdiff_t d = shape_.head_dim;
    const std::size_t row = static_cast<std::size_t>(offset * d);
    for (int g = 0; g < shape_.n_kv_heads; ++g) {
      const std::size_t at = kv_offset(chunk, g) + row;
      if (shape_.precision == kv_precision::bf16) {
        rotary.rotate(k.at(t, g), scratch.data(), offset);
        to_bf16(scratch.data(), keys16_.data() + at, d);
        to_bf16(v.at(t, g), values16_.data() + at, d);
      } else if (shape_.precision == kv_precision::int8) {
        const int block = int8_block();
        rotary.rotate(k.at(t, g), scratch.data(), offset);
        quantize_int8(scratch.data(), keys8_.data() + at, key_scales_.data() + at / block, d, block);
        quantize_int8(v.at(t, g), values8_.data() + at, value_scales_.data() + at / block, d, block);
      } else {
        rotary.rotate(k.at(t, g), keys_.data() + at, offset);
        std::copy_n(v.at(t, g), d, values_.data() + at);
      }
    }
  }
  /// Keeps row t of q, the token at `position`, rotated at its local position, until its chunk
  /// is encoded (nothing, unless shape().keeps_open_queries). Rows of a chunk come in order.
  void store_open_queries(std::int64_t position, tensor_view<const float> q, std::ptrdiff_t t, const rope& rotary) noexcept {
    if (!shape_.keeps_open_queries) return;
    const std::int64_t chunk = position / shape_.chunk_size, offset = position % shape_.chunk_size;
    float* row = query_buffer(chunk) + offset * shape_.n_q_heads * shape_.head_dim;
    // A buffer taken for a new chunk drops the rows of the chunk it held before: rows past the
    // ones held are zero (a cache that was truncated holds what one that never was holds).
    if (offset == 0) std::fill(row, query_buffer(chunk) + query_buffer_floats(), 0.0f);
    for (int h = 0; h < shape_.n_q_heads; ++h) rotary.rotate(q.at(t, h), row + h * shape_.head_dim, offset);
    held_rows& held = held_[buffer_of(chunk)];
    held = offset == 0 ? held_rows{chunk, 1} : held.chunk == chunk && held.rows == offset ? held_rows{chunk, offset + 1} : held_rows{};
  }
  /// The queries of one head of chunk `chunk`, [w, d], rotated at local positions 0..w-1, as
  /// kept for its encoding: the open chunk's, or (spread encoding) the last full chunk's. A
  /// null view when the cache keeps no queries (its encoder reads keys only).
  matrix_view<const float> chunk_queries(std::int64_t chunk, int q_head) const noexcept {
    if (!shape_.keeps_open_queries) return {nullptr, shape_.chunk_size, shape_.head_dim, static_cast<std::ptrdiff_t>(shape_.n_q_heads) * shape_.head_dim};
    return {query_buffer(chunk) + static_cast<std::size_t>(q_head) * static_cast<std::size_t>(shape_.head_dim), shape_.chunk_size,
            shape_.head_dim, static_cast<std::ptrdiff_t>(shape_.n_q_heads) * shape_.head_dim};
  }
  /// The representation head of query head `q_head` (itself, or its kv head).
  int representation_head(int q_head) const noexcept { return q_head / (shape_.n_q_heads / shape_.summary_heads()); }
  /// Where chunk `chunk`'s representation for representation head `head` (a query head, or a kv
  /// head: cache_shape::representation_heads) is written once the chunk is full.
  std::span<float> representation_slot(std::int64_t chunk, int head) noexcept {
    return {representations_.data() + representation_offset(chunk, head), shape_.representation_floats};
  }
  /// The selection index query head `q_head` searches (shape().indexing().any()): its
  /// representation head's, over the summarised chunks.
  const chunk_index_state& index(int q_head) const noexcept { return indexes_[static_cast<std::size_t>(representation_head(q_head))]; }
  /// Brings every head's index up to the full chunks (after their representations are written),
  /// in chunk order. No allocation within the reserved length.
  void index_full_chunks(std::int64_t full) noexcept {
    const auto r = static_cast<std::ptrdiff_t>(shape_.representation_floats);
    for (std::size_t h = 0; h < indexes_.size(); ++h)
      for (std::int64_t c = indexes_[h].chunks(); c < full; ++c)
        indexes_[h].append({representations_.data() + representation_offset(0, static_cast<int>(h)), c + 1, r, r});
  }
  /// Ends an append: the cache now holds `tokens` tokens, stored above, its index covers their
  /// summarised chunks, and no last selection until a computing call records one (ingest
  /// computes none). With a spread encoding, `pending_pieces_done` of the last full chunk's
  /// spread_total() pieces have run.
  void commit(std::int64_t tokens, std::int64_t pending_pieces_done = 0) noexcept {
    rewind(tokens);
    pending_done_ = pending_pieces_done;
    index_full_chunks(summarised_chunks());
  }

  ///@{
  /// A spread encoding's bookkeeping (cache_shape::spread_pieces): the last full chunk's pieces
  /// run head after head, spread_pieces per representation head, spread_total() in all; after
  /// `tokens` tokens, scheduled_pieces(tokens) of them have run (a share growing with the open
  /// chunk's tokens, all of them once it is full), or all when the chunk was encoded earlier
  /// and truncate() came back to it. The state of representation head `head` between pieces.
  std::int64_t spread_total() const noexcept { return std::int64_t{shape_.spread_pieces} * shape_.summary_heads(); }
  std::int64_t scheduled_pieces(std::int64_t tokens) const noexcept {
    return (tokens % shape_.chunk_size * spread_total() + shape_.chunk_size - 1) / shape_.chunk_size;
  }
  std::int64_t pending_pieces_done() const noexcept { return pending_done_; }
  std::span<float> spread_state(int head) noexcept {
    return std::span<float>(spread_state_).subspan(static_cast<std::size_t>(head) * shape_.spread_state_floats, shape_.spread_state_floats);
  }
  ///@}
  /// Records the chunks query head `q_head` read for the last query, ascending (at most one
  /// per chunk of the reserved length).
  void record_selection(int q_head, std::span<const std::int32_t> chunks) noexcept {
    std::copy(chunks.begin(), chunks.end(), selections_.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(q_head) * selection_stride_));
    selection_counts_[static_cast<std::size_t>(q_head)] = static_cast<std::int32_t>(chunks.size());
  }

 private:
  friend struct detail::cache_file_access;
  void rewind(std::int64_t tokens) noexcept {
    if (tokens < tokens_) erase_from(tokens);
    tokens_ = tokens;
    for (held_rows& held : held_)  // rows past the end are forgotten
      held.rows = std::clamp<std::int64_t>(tokens - held.chunk * shape_.chunk_size, 0, held.rows);
    std::fill(selection_counts_.begin(), selection_counts_.end(), 0);
    const auto r = static_cast<std::ptrdiff_t>(shape_.representation_floats);
    for (std::size_t h = 0; h < indexes_.size(); ++h)
      if (indexes_[h].chunks() > full_chunks())
        indexes_[h].truncate(full_chunks(), {representations_.data() + representation_offset(0, static_cast<int>(h)), full_chunks(), r, r});
  }
  // What a cache forgets leaves no trace: everything stored for positions from `tokens` on (key
  // and value rows, queries, summaries of chunks no longer full, a spread encoding's state) is
  // zeroed, as in a cache that never held them, so neither ==, a file nor a view can show it.
  void erase_from(std::int64_t tokens) noexcept {
    const std::int64_t w = shape_.chunk_size, d = shape_.head_dim;
    for (std::int64_t chunk = tokens / w; chunk * w < tokens_; ++chunk) {
      const std::int64_t first = std::max<std::int64_t>(tokens - chunk * w, 0), last = std::min<std::int64_t>(tokens_ - chunk * w, w);
      for (int g = 0; g < shape_.n_kv_heads; ++g) zero_kv(kv_offset(chunk, g) + static_cast<std::size_t>(first * d), static_cast<std::size_t>((last - first) * d));
    }
    const std::size_t row_floats = static_cast<std::size_t>(shape_.n_q_heads) * static_cast<std::size_t>(d);
    for (std::size_t i = 0; i < held_.size(); ++i) {
      held_rows& held = held_[i];
      const std::int64_t kept = std::clamp<std::int64_t>(tokens - held.chunk * w, 0, held.rows);
      std::fill_n(open_queries_.data() + i * query_buffer_floats() + static_cast<std::size_t>(kept) * row_floats,
                  static_cast<std::size_t>(held.rows - kept) * row_floats, 0.0f);
      if (kept == 0) held = held_rows{};  // holds no chunk: not even which one it held
    }
    const std::int64_t full = tokens / w;
    if (full < full_chunks()) {
      for (int h = 0; h < shape_.summary_heads(); ++h)
        std::fill_n(representations_.data() + representation_offset(full, h), static_cast<std::size_t>(full_chunks() - full) * shape_.representation_floats, 0.0f);
      std::fill(spread_state_.begin(), spread_state_.end(), 0.0f);
    }
  }
  // Zeroes n elements of the key and value storage from element `at` (and their int8 scales).
  void zero_kv(std::size_t at, std::size_t n) noexcept {
    if (shape_.precision == kv_precision::bf16) {
      std::fill_n(keys16_.data() + at, n, bf16{});
      std::fill_n(values16_.data() + at, n, bf16{});
    } else if (shape_.precision == kv_precision::int8) {
      const auto block = static_cast<std::size_t>(int8_block());
      std::fill_n(keys8_.data() + at, n, std::int8_t{0});
      std::fill_n(values8_.data() + at, n, std::int8_t{0});
      std::fill_n(key_scales_.data() + at / block, n / block, bf16{});
      std::fill_n(value_scales_.data() + at / block, n / block, bf16{});
    } else {
      std::fill_n(keys_.data() + at, n, 0.0f);
      std::fill_n(values_.data() + at, n, 0.0f);
    }
  }
  std::size_t index_floats() const noexcept {
    std::size_t n = 0;
    for (const chunk_index_state& index : indexes_) n += index.floats();
    return n;
  }
  std::size_t representation_floats_per_chunk() const noexcept {
    return static_cast<std::size_t>(shape_.summary_heads()) * shape_.representation_floats;
  }
  // Head-major: each representation head's chunks are one run of `capacity` chunks.
  std::size_t representation_offset(std::int64_t chunk, int head, std::int64_t capacity) const noexcept {
    return (static_cast<std::size_t>(head) * static_cast<std::size_t>(capacity) + static_cast<std::size_t>(chunk)) *
           shape_.representation_floats;
  }
  std::size_t representation_offset(std::int64_t chunk, int head) const noexcept { return representation_offset(chunk, head, capacity_chunks_); }
  // Chunk c's queries are in buffer c mod query_chunks(): a ring holding the open chunk's, the
  // last full chunk's (spread encoding) and rollback_chunks more.
  std::size_t query_buffer_floats() const noexcept {
    return static_cast<std::size_t>(shape_.chunk_size) * static_cast<std::size_t>(shape_.n_q_heads) * static_cast<std::size_t>(shape_.head_dim);
  }
  std::size_t buffer_of(std::int64_t chunk) const noexcept { return static_cast<std::size_t>(chunk % std::max(1, shape_.query_chunks())); }
  float* query_buffer(std::int64_t chunk) noexcept { return open_queries_.data() + buffer_of(chunk) * query_buffer_floats(); }
  const float* query_buffer(std::int64_t chunk) const noexcept { return open_queries_.data() + buffer_of(chunk) * query_buffer_floats(); }
  // Whether a query buffer holds all w rows of `chunk`.
  bool holds_queries_of(std::int64_t chunk) const noexcept {
    const held_rows& held = held_[buffer_of(chunk)];
    return held.chunk == chunk && held.rows == shape_.chunk_size;
  }
  // Geometric, like the buffers' growth: a cache that was not reserved grows it rarely.
  void reserve_selections(std::size_t per_head) {
    if (per_head <= selection_stride_) return;
    per_head = std::max(per_head, selection_stride_ + selection_stride_ / 2);
    std::vector<std::int32_t> grown(per_head * static_cast<std::size_t>(shape_.n_q_heads));
    for (std::size_t h = 0; h < selection_counts_.size(); ++h)
      std::copy_n(selections_.begin() + static_cast<std::ptrdiff_t>(h * selection_stride_), selection_counts_[h],
                  grown.begin() + static_cast<std::ptrdiff_t>(h * per_head));
    selections_ = std::move(grown);
    selection_stride_ = per_head;
  }

  // Geometric growth (see reserve) keeps appends amortised O(1). The copies leave *this
  // untouched until the final swaps, which cannot throw: a failed allocation changes nothing.
  void grow(std::int64_t chunks) {
    const std::size_t kv_floats = static_cast<std::size_t>(chunks) * kv_floats_per_chunk();
    const std::size_t rep_floats = static_cast<std::size_t>(chunks) * representation_floats_per_chunk();
    const kv_precision p = shape_.precision;
    const std::size_t fp32 = p == kv_precision::fp32 ? kv_floats : 0, half = p == kv_precision::bf16 ? kv_floats : 0,
                      int8 = p == kv_precision::int8 ? kv_floats : 0, scales = int8 / static_cast<std::size_t>(int8_block());
    // From the buffers' own resources (a copy's may differ from the constructor's), so the
    // swaps below exchange storage of equal allocators.
    std::pmr::vector<float> keys(fp32, keys_.get_allocator()), values(fp32, values_.get_allocator());
    std::pmr::vector<float> reps(rep_floats, representations_.get_allocator());
    std::pmr::vector<bf16> keys16(half, keys16_.get_allocator()), values16(half, values16_.get_allocator());
    std::pmr::vector<std::int8_t> keys8(int8, keys8_.get_allocator()), values8(int8, values8_.get_allocator());
    std::pmr::vector<bf16> key_scales(scales, key_scales_.get_allocator()), value_scales(scales, value_scales_.get_allocator());
    const auto used = static_cast<std::size_t>((tokens_ + shape_.chunk_size - 1) / shape_.chunk_size) * kv_floats_per_chunk();
    auto keep = [used](const auto& from, auto& to, std::size_t per = 1) {
      if (!to.empty()) std::copy_n(from.begin(), used / per, to.begin());
    };
    keep(keys_, keys);
    keep(values_, values);
    keep(keys16_, keys16);
    keep(values16_, values16);
    keep(keys8_, keys8);
    keep(values8_, values8);
    keep(key_scales_, key_scales, static_cast<std::size_t>(int8_block()));
    keep(value_scales_, value_scales, static_cast<std::size_t>(int8_block()));
    // Each head's run moves to its place in the larger capacity.
    const std::size_t rep_run = static_cast<std::size_t>(full_chunks()) * shape_.representation_floats;
    for (int h = 0; h < shape_.summary_heads(); ++h)
      std::copy_n(representations_.data() + representation_offset(0, h), rep_run, reps.data() + representation_offset(0, h, chunks));
    keys_.swap(keys);
    values_.swap(values);
    keys16_.swap(keys16);
    values16_.swap(values16);
    keys8_.swap(keys8);
    values8_.swap(values8);
    key_scales_.swap(key_scales);
    value_scales_.swap(value_scales);
    representations_.swap(reps);
    capacity_chunks_ = chunks;
  }

  cache_shape shape_;
  std::int64_t tokens_ = 0;
  std::int64_t capacity_chunks_ = 0;
  static std::pmr::memory_resource* checked(std::pmr::memory_resource* memory) {
    if (memory == nullptr) detail::fail<config_error>("kv_cache: the memory resource is null");
    return memory;
  }

  std::pmr::vector<float> keys_, values_, representations_, open_queries_;
  // The spread encoding: the encoder's state per representation head, the pieces run of the
  // last full chunk, and which chunk's rows each query buffer holds (the first `rows` of it).
  std::pmr::vector<float> spread_state_;
  std::int64_t pending_done_ = 0;
  struct held_rows {
    std::int64_t chunk = -1, rows = 0;
  };
  std::vector<held_rows> held_;  // per query buffer
  std::pmr::vector<bf16> keys16_, values16_;  // instead of keys_ and values_ when the precision is bf16
  // Instead of them when it is int8: elements, and a scale per int8_block() elements.
  std::pmr::vector<std::int8_t> keys8_, values8_;
  std::pmr::vector<bf16> key_scales_, value_scales_;
  template <class Rows, class Compact>
  Rows rows_at(const std::pmr::vector<float>& fp32, const Compact& half, const std::pmr::vector<std::int8_t>& int8,
               const std::pmr::vector<bf16>& scales, std::size_t offset) const noexcept {
    if constexpr (std::is_same_v<Rows, int8_rows>)
      return {int8.data(), scales.data(), static_cast<std::ptrdiff_t>(offset), std::countr_zero(static_cast<unsigned>(int8_block()))};
    else if constexpr (std::is_same_v<Rows, const bf16*>) return half.data() + offset;
    else return fp32.data() + offset;
  }
  std::vector<std::int32_t> selections_, selection_counts_;
  std::vector<chunk_index_state> indexes_;  // per representation head, when shape_.indexing().any()
  std::size_t selection_stride_ = 0;
};

}  // namespace longheads
