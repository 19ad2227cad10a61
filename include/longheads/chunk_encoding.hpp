// SPDX-License-Identifier: MIT
// Encoding: the representation of a full chunk for each query head, written into the cache.
//
// A chunk is encoded once, from its queries (rotated at local positions), keys and values. A
// chunk that lies wholly inside one call takes its queries from the call (rotated into scratch,
// while its keys and values are hot); one begun by an earlier call takes them from the cache's
// open chunk. Either way the encoder sees the same floats, so representations do not depend on
// how the sequence was split into calls.
//
// When it is encoded: as its last token arrives, or (a piecewise_chunk_encoder, with
// attention_config::spread_encoding and two local chunks) in pieces spread over the tokens of the
// next chunk, whose queries read it as their previous chunk in full and score it only a chunk
// later. After t tokens, kv_cache::scheduled_pieces(t) pieces of the last full chunk have run, so
// no step encodes more than about pieces * heads / w of them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "attention_config.hpp"
#include "detail/grow.hpp"
#include "chunk_encoder.hpp"
#include "kv_cache.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// A lane's scratch for appending and encoding; each buffer sizes itself.
struct encoding_scratch {
  detail::scratch_vector<float> encoder;        ///< the encoder's own
  detail::scratch_vector<float> chunk_queries;  ///< [w, d]: a chunk's queries rotated for its encoder
  detail::scratch_vector<float> converted;      ///< [2, w, d]: a bf16 or int8 chunk's keys and values in fp32
  detail::scratch_vector<float> key_row;        ///< [d]: a key rotated before its bf16 conversion

  /// Room for calls of `tokens` tokens with an encoder needing `encoder_floats` of scratch.
  void reserve(const attention_config& config, bool encodes, std::int64_t tokens, std::size_t encoder_floats) {
    const auto d = static_cast<std::size_t>(config.head_dim), w = static_cast<std::size_t>(config.chunk_size);
    if (encodes) detail::grow(encoder, encoder_floats);
    if (encodes && tokens >= config.chunk_size) detail::grow(chunk_queries, w * d);
    if (config.kv_storage != kv_precision::fp32) detail::grow(converted, 2 * w * d);
    detail::grow(key_row, d);
  }
};

/// Heads with a representation of their own: every query head, or each kv head for an encoder
/// that reads keys only (its query heads would all get the same bits).
template <chunk_encoder Encoder>
int representation_heads(const attention_config& config) noexcept {
  return encodes_keys_only<Encoder> ? config.n_kv_heads : config.n_q_heads;
}
/// The query head whose queries representation head `head` is encoded from (the first of its
/// kv group for a keys-only encoder, which reads none).
template <chunk_encoder Encoder>
int query_head_of(const attention_config& config, int head) noexcept {
  return encodes_keys_only<Encoder> ? head * config.group_size() : head;
}

/// Encodes chunk `chunk` for representation head `head` (representation_heads()) from the
/// queries of query_head_of(head), `queries` ([w, d], rotated at local positions).
template <chunk_encoder Encoder>
void encode_chunk(const Encoder& encoder, const attention_config& config, kv_cache& cache, std::int64_t chunk, int head,
                  matrix_view<const float> queries, encoding_scratch& s) noexcept {
  const int w = config.chunk_size;
  const std::ptrdiff_t d = config.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int g = query_head_of<Encoder>(config, head) / config.group_size();
  const auto [keys, values] = cache.fp32_rows(cache.kv_offset(chunk, g), w, s.converted);
  const chunk_inputs in{queries, {keys, w, d}, {values, w, d}, scale};
  encoder.encode(in, cache.representation_slot(chunk, head), s.encoder);
}

/// Encodes chunk `chunk` for representation head `head` from the call's own queries, tokens
/// t0.. of q (rotated into scratch unless the encoder reads keys only).
template <chunk_encoder Encoder>
void encode_chunk_from_call(const Encoder& encoder, const attention_config& config, const rope& rotary, kv_cache& cache,
                            tensor_view<const float> q, std::int64_t t0, std::int64_t chunk, int head, encoding_scratch& s) noexcept {
  const int w = config.chunk_size;
  const std::ptrdiff_t d = config.head_dim;
  if constexpr (!encodes_keys_only<Encoder>)
    for (int offset = 0; offset < w; ++offset)
      rotary.rotate(q.at(t0 + offset, query_head_of<Encoder>(config, head)), s.chunk_queries.data() + offset * d, offset);
  encode_chunk(encoder, config, cache, chunk, head, {s.chunk_queries.data(), w, d}, s);
}

/// Runs the pieces in [from, to) that belong to representation head `head` (pieces head * P ..
/// head * P + P - 1, P = spread_pieces) of the spread encoding of chunk `chunk`, from the
/// queries the cache keeps, with the head's state in the cache.
template <chunk_encoder Encoder>
void encode_pieces(const Encoder& encoder, const attention_config& config, kv_cache& cache, std::int64_t chunk, int head,
                   std::int64_t from, std::int64_t to, encoding_scratch& s) noexcept {
  if constexpr (piecewise_chunk_encoder<Encoder>) {
    const std::int64_t per_head = cache.shape().spread_pieces, begin = std::max(from, head * per_head), end = std::min(to, (head + 1) * per_head);
    if (begin >= end) return;
    const int w = config.chunk_size;
    const std::ptrdiff_t d = config.head_dim;
    const int query_head = query_head_of<Encoder>(config, head);
    const auto [keys, values] = cache.fp32_rows(cache.kv_offset(chunk, query_head / config.group_size()), w, s.converted);
    const chunk_inputs in{cache.chunk_queries(chunk, query_head), {keys, w, d}, {values, w, d}, 1.0f / std::sqrt(static_cast<float>(d))};
    for (std::int64_t piece = begin; piece < end; ++piece)
      encoder.encode_piece(in, static_cast<std::size_t>(piece - head * per_head), cache.spread_state(head), cache.representation_slot(chunk, head),
                           s.encoder);
    // A finished head's state is spent: zeroed, so a cache's state depends only on the pieces
    // still under way (not on a chunk encoded before), whatever the calls and rollbacks were.
    if (end == (head + 1) * per_head) std::ranges::fill(cache.spread_state(head), 0.0f);
  }
}

/// The append and encode stages of one call: stores the call's keys, values and (to be encoded
/// later) queries, encodes the chunks it completes, runs the spread encoding's scheduled pieces,
/// and commits. `parallel(n, f)` runs f(item, lane) for items 0..n-1; `scratch(lane)` is a lane's.
template <chunk_encoder Encoder, class Parallel, class LaneScratch>
void append_and_encode(const Encoder& encoder, const attention_config& config, const rope& rotary, kv_cache& cache, bool encodes,
                       tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v, Parallel&& parallel,
                       LaneScratch&& scratch) noexcept {
  const int w = config.chunk_size;
  const std::int64_t first = cache.tokens(), end = first + q.tokens(), first_chunk = first / w, end_full = end / w;
  // The call's last full chunk, if it completes one and the encoding is spread: left for later.
  const std::int64_t spread_chunk = cache.shape().spreads_encoding() && end_full > first_chunk ? end_full - 1 : -1;
  // Keys and values; a chunk wholly inside the call is encoded from the call's queries.
  auto store_chunk = [&](std::size_t item, std::size_t lane) {
    const std::int64_t chunk = first_chunk + static_cast<std::int64_t>(item);
    const std::int64_t begin = std::max(first, chunk * w), stop = std::min(end, (chunk + 1) * w);
    for (std::int64_t p = begin; p < stop; ++p) cache.store_token(p, k, v, p - first, rotary, scratch(lane).key_row);
    if (encodes && begin == chunk * w && stop == (chunk + 1) * w && chunk != spread_chunk)
      for (int h = 0; h < representation_heads<Encoder>(config); ++h)
        encode_chunk_from_call(encoder, config, rotary, cache, q, begin - first, chunk, h, scratch(lane));
  };
  parallel(static_cast<std::size_t>((end - 1) / w - first_chunk + 1), store_chunk);
  if (!encodes) return cache.commit(end);

  // Heads [begin, end) of a run of the spread encoding's pieces (head after head).
  const std::int64_t per_head = std::max(1, cache.shape().spread_pieces);
  auto on_heads = [&](std::int64_t from, std::int64_t to, auto&& f) {
    if (from >= to) return;
    const std::int64_t h0 = from / per_head, h1 = (to - 1) / per_head + 1;
    auto item = [&](std::size_t i, std::size_t lane) { f(static_cast<int>(h0 + static_cast<std::int64_t>(i)), scratch(lane)); };
    parallel(static_cast<std::size_t>(h1 - h0), item);
  };
  // A chunk begun by an earlier call keeps its queries in the cache; if the call completes it,
  // it is encoded from there, with the rest of the spread encoding of the chunk before it.
  const std::int64_t carried_end = first % w == 0 ? first : std::min(end, (first_chunk + 1) * w);
  for (std::int64_t p = first; p < carried_end; ++p) cache.store_open_queries(p, q, p - first, rotary);
  const bool encode_carried = carried_end % w == 0 && carried_end > first && first_chunk != spread_chunk;
  const std::int64_t previous = cache.shape().spreads_encoding() && first_chunk > 0 ? first_chunk - 1 : -1;
  const std::int64_t done = cache.pending_pieces_done();
  const std::int64_t previous_to = previous < 0 ? done : end_full > first_chunk ? cache.spread_total() : std::max(done, cache.scheduled_pieces(end));
  on_heads(encode_carried ? 0 : done, encode_carried ? std::int64_t{representation_heads<Encoder>(config)} * per_head : previous_to,
           [&](int h, encoding_scratch& s) {
             if (previous >= 0) encode_pieces(encoder, config, cache, previous, h, done, previous_to, s);
             if (encode_carried)
               encode_chunk(encoder, config, cache, first_chunk, h, cache.chunk_queries(first_chunk, query_head_of<Encoder>(config, h)), s);
           });
  // Then (their buffers may be the ones just read) the queries of the chunk left open, of the
  // chunk left for spreading, which starts on its share of pieces, and of the full chunks
  // before them the cache keeps for rollback (cache_shape::query_chunks).
  const std::int64_t kept_from = (end_full - std::max(0, cache.shape().query_chunks() - 1)) * w;
  for (std::int64_t p = std::max(carried_end, kept_from); p < end; ++p) cache.store_open_queries(p, q, p - first, rotary);
  if (spread_chunk < 0) return cache.commit(end, previous_to);
  const std::int64_t scheduled = cache.scheduled_pieces(end);
  on_heads(0, scheduled, [&](int h, encoding_scratch& s) { encode_pieces(encoder, config, cache, spread_chunk, h, 0, scheduled, s); });
  cache.commit(end, scheduled);
}

}  // namespace longheads
