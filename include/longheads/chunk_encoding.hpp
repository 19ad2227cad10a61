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
#include "chunk_encoder.hpp"
#include "kv_cache.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// A lane's scratch for appending and encoding; each buffer sizes itself.
struct encoding_scratch {
  std::vector<float> encoder;        ///< the encoder's own
  std::vector<float> chunk_queries;  ///< [w, d]: a chunk's queries rotated for its encoder
  std::vector<float> converted;      ///< [2, w, d]: a bf16 chunk's keys and values in fp32
  std::vector<float> key_row;        ///< [d]: a key rotated before its bf16 conversion

  /// Room for calls of `tokens` tokens with an encoder needing `encoder_floats` of scratch.
  void reserve(const attention_config& config, bool encodes, std::int64_t tokens, std::size_t encoder_floats) {
    const auto d = static_cast<std::size_t>(config.head_dim), w = static_cast<std::size_t>(config.chunk_size);
    if (encodes) grow(encoder, encoder_floats);
    if (encodes && tokens >= config.chunk_size) grow(chunk_queries, w * d);
    if (config.kv_storage == kv_precision::bf16) grow(converted, 2 * w * d);
    grow(key_row, d);
  }
  /// Geometric growth, so a context that grows a token at a time reallocates rarely.
  template <class T>
  static void grow(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(std::max(n, v.size() + v.size() / 2));
  }
};

/// Encodes chunk `chunk` for query head h from `queries` ([w, d], rotated at local positions).
template <chunk_encoder Encoder>
void encode_chunk(const Encoder& encoder, const attention_config& config, kv_cache& cache, std::int64_t chunk, int h,
                  matrix_view<const float> queries, encoding_scratch& s) noexcept {
  const int w = config.chunk_size;
  const std::ptrdiff_t d = config.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int g = h / config.group_size();
  const auto [keys, values] = cache.fp32_rows(cache.kv_offset(chunk, g), w, s.converted);
  const chunk_inputs in{queries, {keys, w, d}, {values, w, d}, scale};
  encoder.encode(in, cache.representation_slot(chunk, h), s.encoder);
}

/// Encodes chunk `chunk` for query head h from the call's own queries, tokens t0.. of q.
template <chunk_encoder Encoder>
void encode_chunk_from_call(const Encoder& encoder, const attention_config& config, const rope& rotary, kv_cache& cache,
                            tensor_view<const float> q, std::int64_t t0, std::int64_t chunk, int h, encoding_scratch& s) noexcept {
  const int w = config.chunk_size;
  const std::ptrdiff_t d = config.head_dim;
  for (int offset = 0; offset < w; ++offset) rotary.rotate(q.at(t0 + offset, h), s.chunk_queries.data() + offset * d, offset);
  encode_chunk(encoder, config, cache, chunk, h, {s.chunk_queries.data(), w, d}, s);
}

}  // namespace longheads
