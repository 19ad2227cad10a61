// SPDX-License-Identifier: MIT
// Encoding: the representation of a full chunk for each query head, written into the cache.
//
// A chunk is encoded once, when its last token arrives, from its queries (rotated at local
// positions), keys and values. A chunk that lies wholly inside one call takes its queries from
// the call (rotated into scratch, while its keys and values are hot); one begun by an earlier
// call takes them from the cache's open chunk. Either way the encoder sees the same floats, so
// representations do not depend on how the sequence was split into calls.
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
  detail::scratch_vector<float> converted;      ///< [2, w, d]: a bf16 chunk's keys and values in fp32
  detail::scratch_vector<float> key_row;        ///< [d]: a key rotated before its bf16 conversion

  /// Room for calls of `tokens` tokens with an encoder needing `encoder_floats` of scratch.
  void reserve(const attention_config& config, bool encodes, std::int64_t tokens, std::size_t encoder_floats) {
    const auto d = static_cast<std::size_t>(config.head_dim), w = static_cast<std::size_t>(config.chunk_size);
    if (encodes) detail::grow(encoder, encoder_floats);
    if (encodes && tokens >= config.chunk_size) detail::grow(chunk_queries, w * d);
    if (config.kv_storage == kv_precision::bf16) detail::grow(converted, 2 * w * d);
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

}  // namespace longheads
