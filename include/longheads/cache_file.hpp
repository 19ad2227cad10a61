// SPDX-License-Identifier: MIT
// Cache files: a layer's kv_cache saved to a stream or file and loaded back, so an engine can
// keep a prompt's caches (session files, prefix caching) and continue decoding later with the
// bits of a cache that was never saved.
//
// A file is a sequence of records, one per cache (a model saves its layers one after another).
// A record, every integer little-endian as the host writes it (the byte order is recorded and
// a file of the other order refused):
//
//   "LHKVCACH"  u32 format version (3)  u32 0  u64 byte-order mark
//   u64 n  meta[n]  u64 XXH64(meta)      shape, the layer's attention_config, its RoPE (head_dim,
//                                        base, layout, magnitude, inverse frequencies), the
//                                        policies' identities, and the cache's state (tokens,
//                                        spread-encoding progress, the query buffers' rows,
//                                        every head's last selection)
//   5 sections, each u64 n  bytes[n]  u64 XXH64(bytes):
//     keys, values       [ceil(tokens / w) chunks][H_kv][w][d] in the storage's element type (for
//                       int8: those bytes, then one bf16 scale per block, in the same order)
//     representations   [H_r][full chunks][r] fp32
//     query buffers     the open chunk's queries (and a spread encoding's last full chunk's, and
//                       rollback_chunks more)
//     encoder state     a spread encoding's state per representation head
//
// Loading checks everything before it hands out a cache: magic, version, byte order, every
// checksum, that the layer has the same shape, configuration, RoPE and policy types, that every
// field is in range and, when the layer rejects non-finite input, that every stored float is
// finite. Any failure is a file_error naming what is wrong, and no cache is made (the caller's
// caches are never touched: a load returns a new one). From a file the record is read through
// a memory mapping (POSIX), copied and checksummed a block at a time in one pass, which is what
// the checksums cost anyway; a kept mapping could not grow as the cache decodes on.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <memory>
#include <memory_resource>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#if __has_include(<sys/mman.h>) && __has_include(<unistd.h>)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LONGHEADS_HAS_MMAP 1
#else
#define LONGHEADS_HAS_MMAP 0
#endif

#include "attention.hpp"
#include "detail/xxh64.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"

namespace longheads {

/// The format version this library writes and reads.
inline constexpr std::uint32_t cache_file_version = 3;

/// The identity of a layer's policies as a cache file records it: the type of each policy that
/// shapes what a cache holds or how it is read (encoder, scorer, selector, remapper, kernel,
/// group selection, index; not the executor, which never changes a bit). Type names as the
/// compiler's ABI spells them (the Itanium ABI of GCC and Clang: the same in both).
template <class Policies>
std::string policy_identity() {
  using bundle = policy_bundle<Policies>;
  std::string id;
  auto add = [&](const char* role, const std::type_info& type) {
    id += role;
    id += '=';
    id += type.name();
    id += ';';
  };
  add("encoder", typeid(typename bundle::encoder_type));
  add("scorer", typeid(typename bundle::scorer_type));
  add("selector", typeid(typename bundle::selector_type));
  add("remapper", typeid(typename bundle::remapper_type));
  add("kernel", typeid(typename bundle::kernel_type));
  add("group_selection", typeid(typename bundle::group_selection_type));
  add("index", typeid(typename bundle::index_type));
  return id;
}

namespace detail {

inline constexpr char cache_file_magic[8] = {'L', 'H', 'K', 'V', 'C', 'A', 'C', 'H'};
inline constexpr std::uint64_t byte_order_mark = 0x0102030405060708ull;
inline constexpr std::size_t cache_file_block = std::size_t{1} << 20;  // bytes copied and hashed at a time

inline constexpr const char* section_names[5] = {"keys", "values", "representations", "query buffers", "encoder state"};
inline constexpr const char* section_titles[5] = {"the keys section", "the values section", "the representations section",
                                                  "the query buffers section", "the encoder state section"};

/// The fields of a record's meta block, written and read in one order by one function each.
class meta_writer {
 public:
  void i64(std::int64_t x) { bytes(&x, sizeof x); }
  void f64(double x) { bytes(&x, sizeof x); }
  void f32(float x) { bytes(&x, sizeof x); }
  void str(std::string_view s) {
    i64(static_cast<std::int64_t>(s.size()));
    bytes(s.data(), s.size());
  }
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const char*>(p);
    data_.insert(data_.end(), b, b + n);
  }
  const std::string& data() const noexcept { return data_; }

 private:
  std::string data_;
};

class meta_reader {
 public:
  explicit meta_reader(std::string_view data) : data_(data) {}
  std::int64_t i64() { return get<std::int64_t>(); }
  double f64() { return get<double>(); }
  float f32() { return get<float>(); }
  std::string str() {
    const std::int64_t n = i64();
    if (n < 0 || static_cast<std::uint64_t>(n) > data_.size() - at_) fail<file_error>("cache file: a string in the meta block runs past its end");
    std::string s(data_.substr(at_, static_cast<std::size_t>(n)));
    at_ += static_cast<std::size_t>(n);
    return s;
  }
  bool done() const noexcept { return at_ == data_.size(); }

 private:
  template <class T>
  T get() {
    if (data_.size() - at_ < sizeof(T)) fail<file_error>("cache file: the meta block ends early");
    T x;
    std::memcpy(&x, data_.data() + at_, sizeof x);
    at_ += sizeof x;
    return x;
  }
  std::string_view data_;
  std::size_t at_ = 0;
};

/// A layer's identity: the cache shape, configuration, RoPE and policies, in record order;
/// `ends`, when given, receives where each of the four parts ends.
inline void write_layer(meta_writer& m, const cache_shape& s, const attention_config& c, const rope& r, const std::string& policies,
                        std::size_t* ends = nullptr) {
  for (std::int64_t x : {std::int64_t{s.n_q_heads}, std::int64_t{s.n_kv_heads}, std::int64_t{s.head_dim}, std::int64_t{s.chunk_size},
                         static_cast<std::int64_t>(s.representation_floats), static_cast<std::int64_t>(s.precision),
                         std::int64_t{s.representation_heads}, std::int64_t{s.index_fanout}, std::int64_t{s.keeps_open_queries},
                         std::int64_t{s.spread_pieces}, static_cast<std::int64_t>(s.spread_state_floats), std::int64_t{s.rollback_chunks},
                         std::int64_t{s.index_segment_chunks}, std::int64_t{s.index_clusters}, std::int64_t{s.index_cluster_iterations}})
    m.i64(x);
  if (ends) ends[0] = m.data().size();
  for (std::int64_t x : {std::int64_t{c.n_q_heads}, std::int64_t{c.n_kv_heads}, std::int64_t{c.head_dim}, std::int64_t{c.chunk_size},
                         std::int64_t{c.budget_chunks}, std::int64_t{c.sink_chunks}, std::int64_t{c.local_chunks}, std::int64_t{c.sink_tokens},
                         static_cast<std::int64_t>(c.method), std::int64_t{c.reject_nonfinite}, static_cast<std::int64_t>(c.kv_storage),
                         std::int64_t{c.spread_encoding}, std::int64_t{c.rollback_chunks}})
    m.i64(x);
  m.f32(c.softmax_scale);
  if (ends) ends[1] = m.data().size();
  m.i64(r.head_dim());
  m.f64(r.base());
  m.i64(static_cast<std::int64_t>(r.layout()));
  m.f64(r.magnitude());
  for (double f : r.inverse_frequencies()) m.f64(f);
  if (ends) ends[2] = m.data().size();
  m.str(policies);
  if (ends) ends[3] = m.data().size();
}

/// The cache's buffers and state, for saving and loading (kv_cache's friend).
struct cache_file_access {
  /// Key (or value) elements of a cache of `tokens` tokens: every chunk begun, whole.
  static std::size_t kv_elements(const kv_cache& c, std::int64_t tokens) {
    const auto w = c.shape().chunk_size;
    return static_cast<std::size_t>((tokens + w - 1) / w) * c.kv_floats_per_chunk();
  }
  /// Byte counts of the five sections of a cache of `tokens` tokens.
  static std::array<std::size_t, 5> section_bytes(const kv_cache& c, std::int64_t tokens) {
    const cache_shape& s = c.shape();
    const std::size_t elements = kv_elements(c, tokens);
    const std::size_t kv = s.precision == kv_precision::int8 ? int8_storage_bytes(elements, s.head_dim) : elements * kv_element_bytes(s.precision);
    const std::size_t reps = static_cast<std::size_t>(s.summary_heads()) * static_cast<std::size_t>(tokens / s.chunk_size) *
                             s.representation_floats * sizeof(float);
    return {kv, kv, reps, c.open_queries_.size() * sizeof(float), c.spread_state_.size() * sizeof(float)};
  }
  static void write_state(meta_writer& m, const kv_cache& c) {
    m.i64(c.tokens_);
    m.i64(c.pending_done_);
    for (const auto& held : c.held_) {
      m.i64(held.chunk);
      m.i64(held.rows);
    }
    for (std::size_t h = 0; h < c.selection_counts_.size(); ++h) {
      const auto chosen = c.last_selection(static_cast<int>(h));
      m.i64(static_cast<std::int64_t>(chosen.size()));
      for (std::int32_t id : chosen) m.i64(id);
    }
  }
  /// A record's cache state, read and checked before anything is allocated for it.
  struct state {
    std::int64_t tokens = 0, pending_done = 0;
    std::vector<kv_cache::held_rows> held;
    std::vector<std::int32_t> counts, chosen;  // every head's last selection, one after another
  };
  /// Reads the state for the (empty) cache `c`, checking every field against its shape.
  static state read_state(meta_reader& m, const kv_cache& c) {
    const cache_shape& s = c.shape();
    auto need = [](bool ok, const std::string& what) {
      if (!ok) fail<file_error>("cache file: " + what);
    };
    state st;
    st.tokens = m.i64();
    st.pending_done = m.i64();
    const std::int64_t tokens = st.tokens;
    need(tokens >= 0 && tokens <= max_sequence_tokens, "tokens " + std::to_string(tokens) + " is out of range");
    need(st.pending_done >= 0 && st.pending_done <= c.spread_total(),
         "spread-encoding progress " + std::to_string(st.pending_done) + " is outside [0, " + std::to_string(c.spread_total()) + "]");
    for (std::size_t i = 0; i < static_cast<std::size_t>(s.query_chunks()); ++i) {
      const std::int64_t chunk = m.i64(), rows = m.i64();
      const bool none = chunk == -1 && rows == 0;
      need(none || (s.keeps_open_queries && chunk >= 0 && chunk <= tokens / s.chunk_size && c.buffer_of(chunk) == i && rows >= 0 &&
                    rows <= std::min<std::int64_t>(s.chunk_size, tokens - chunk * s.chunk_size)),
           "query buffer " + std::to_string(i) + " claims rows [0, " + std::to_string(rows) + ") of chunk " + std::to_string(chunk) +
               ", which a cache of " + std::to_string(tokens) + " tokens cannot hold there");
      st.held.push_back({chunk, rows});
    }
    const std::int64_t chunks = (tokens + s.chunk_size - 1) / s.chunk_size;
    for (int h = 0; h < s.n_q_heads; ++h) {
      const std::int64_t n = m.i64();
      need(n >= 0 && n <= chunks, "head " + std::to_string(h) + "'s last selection has " + std::to_string(n) + " chunks of " + std::to_string(chunks));
      st.counts.push_back(static_cast<std::int32_t>(n));
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t id = m.i64();
        need(id >= 0 && id < chunks && (i == 0 || id > st.chosen.back()),
             "head " + std::to_string(h) + "'s last selection is not ascending chunk ids below " + std::to_string(chunks));
        st.chosen.push_back(static_cast<std::int32_t>(id));
      }
    }
    return st;
  }
  /// Makes `c` (empty, reserved for the state's tokens) hold the state; its buffers follow.
  static void apply_state(kv_cache& c, const state& st) {
    c.tokens_ = st.tokens;
    c.pending_done_ = st.pending_done;
    c.held_ = st.held;
    std::size_t at = 0;
    for (std::size_t h = 0; h < st.counts.size(); ++h) {
      const auto n = static_cast<std::size_t>(st.counts[h]);
      c.record_selection(static_cast<int>(h), std::span<const std::int32_t>(st.chosen).subspan(at, n));
      at += n;
    }
  }
  /// One section's storage: one piece [data, bytes), or two (int8 elements, then their scales).
  using section_pieces = std::array<std::pair<char*, std::size_t>, 2>;
  /// The five sections' storage: where a save reads and a load writes.
  static std::array<section_pieces, 5> sections(kv_cache& c) {
    const auto bytes = section_bytes(c, c.tokens_);
    auto raw = [](auto& v) { return reinterpret_cast<char*>(v.data()); };
    auto one = [](char* p, std::size_t n) { return section_pieces{std::pair{p, n}, std::pair{p, std::size_t{0}}}; };
    section_pieces keys = one(raw(c.keys_), bytes[0]), values = one(raw(c.values_), bytes[1]);
    if (c.shape().precision == kv_precision::bf16) {
      keys = one(raw(c.keys16_), bytes[0]);
      values = one(raw(c.values16_), bytes[1]);
    } else if (c.shape().precision == kv_precision::int8) {
      const std::size_t elements = kv_elements(c, c.tokens_);
      keys = {std::pair{raw(c.keys8_), elements}, std::pair{raw(c.key_scales_), bytes[0] - elements}};
      values = {std::pair{raw(c.values8_), elements}, std::pair{raw(c.value_scales_), bytes[1] - elements}};
    }
    return {keys, values, one(raw(c.representations_), bytes[2]), one(raw(c.open_queries_), bytes[3]), one(raw(c.spread_state_), bytes[4])};
  }
  /// Representations are head-major with the capacity as stride: section 2 is each head's run
  /// of full chunks one after another, so it is copied head by head.
  static std::size_t representation_run_bytes(const kv_cache& c) {
    return static_cast<std::size_t>(c.full_chunks()) * c.shape().representation_floats * sizeof(float);
  }
  static char* representation_run(kv_cache& c, int head) {
    return reinterpret_cast<char*>(c.representations_.data() + c.representation_offset(0, head));
  }
  static void finish_load(kv_cache& c) { c.index_full_chunks(c.summarised_chunks()); }
  /// Whether every final summary is one the encoder can make from keys within `key_bound`.
  template <class Encoder>
  static bool summaries_within(const kv_cache& c, const attention_config& config, const Encoder& encoder, float key_bound) {
    if constexpr (checked_chunk_encoder<Encoder>) {
      for (int h = 0; h < c.shape().summary_heads(); ++h)  // a spread encoding's head has its summary once its last piece ran
        for (std::int64_t chunk = 0, final = c.summarised_chunks() + (c.full_chunks() > c.summarised_chunks() &&
                                                                       c.pending_done_ >= std::int64_t{c.shape().spread_pieces} * (h + 1));
             chunk < final; ++chunk)
          if (!encoder.representation_within(config, {c.representations_.data() + c.representation_offset(chunk, h), c.shape().representation_floats},
                                             key_bound))
            return false;
    }
    return true;
  }
  /// Whether a spread encoding's state is one the encoder makes.
  template <class Encoder>
  static bool spread_state_within(kv_cache& c, const attention_config& config, const Encoder& encoder) {
    if constexpr (checked_piecewise_encoder<Encoder>)
      for (int h = 0; h < c.shape().summary_heads() && c.shape().spreads_encoding(); ++h)
        if (!encoder.state_within(config, c.spread_state(h))) return false;
    return true;
  }
  /// The first section that holds something past the sequence's end (key or value rows past the
  /// last token, query rows past those a buffer holds, the summary of a chunk whose spread
  /// encoding has not finished), or null: a live cache holds zeros there (kv_cache::truncate).
  static const char* first_with_data_past_end(const kv_cache& c) {
    auto zeros = [](const auto* p, std::size_t n) { return std::all_of(p, p + n, [](auto x) { return x == decltype(x){0}; }); };
    const std::int64_t w = c.shape().chunk_size, d = c.shape().head_dim, used = c.tokens_ % w;
    if (used != 0)
      for (int g = 0; g < c.shape().n_kv_heads; ++g) {
        const std::size_t at = c.kv_offset(c.tokens_ / w, g) + static_cast<std::size_t>(used * d), n = static_cast<std::size_t>((w - used) * d);
        const auto block = static_cast<std::size_t>(c.int8_block());
        const bool keys = c.shape().precision == kv_precision::bf16   ? zeros(c.keys16_.data() + at, n)
                          : c.shape().precision == kv_precision::int8 ? zeros(c.keys8_.data() + at, n) && zeros(c.key_scales_.data() + at / block, n / block)
                                                                      : zeros(c.keys_.data() + at, n);
        if (!keys) return section_names[0];
        const bool values = c.shape().precision == kv_precision::bf16 ? zeros(c.values16_.data() + at, n)
                            : c.shape().precision == kv_precision::int8
                                ? zeros(c.values8_.data() + at, n) && zeros(c.value_scales_.data() + at / block, n / block)
                                : zeros(c.values_.data() + at, n);
        if (!values) return section_names[1];
      }
    if (c.full_chunks() > c.summarised_chunks())  // the pieces run head after head: a head's summary is there once its last one ran
      for (int h = 0; h < c.shape().summary_heads(); ++h)
        if (c.pending_done_ < std::int64_t{c.shape().spread_pieces} * (h + 1) &&
            !zeros(c.representations_.data() + c.representation_offset(c.full_chunks() - 1, h), c.shape().representation_floats))
          return section_names[2];
    const std::size_t row = static_cast<std::size_t>(c.shape().n_q_heads) * static_cast<std::size_t>(d);
    for (std::size_t i = 0; i < c.held_.size(); ++i) {
      const auto rows = static_cast<std::size_t>(c.held_[i].rows);
      if (!zeros(c.open_queries_.data() + i * c.query_buffer_floats() + rows * row, c.query_buffer_floats() - rows * row)) return section_names[3];
    }
    return nullptr;
  }
};

/// Whether every float (or bf16) of a block is finite and at most `bound` in magnitude.
inline bool all_within(const char* p, std::size_t bytes, bool bf16, float bound) noexcept {
  bool ok = true;
  if (bf16) {
    for (std::size_t i = 0; i + 2 <= bytes; i += 2) {
      std::uint16_t x;
      std::memcpy(&x, p + i, 2);
      ok &= std::abs(from_bf16(x)) <= bound;  // false for NaN
    }
    return ok;
  }
  for (std::size_t i = 0; i + 4 <= bytes; i += 4) {
    float x;
    std::memcpy(&x, p + i, 4);
    ok &= std::abs(x) <= bound;
  }
  return ok;
}

/// Whether every element of int8 storage (n elements in blocks of `block`, one scale each) is
/// finite and at most `bound` in magnitude.
inline bool int8_within(const std::int8_t* elements, const bf16* scales, std::size_t n, int block, float bound) noexcept {
  bool ok = true;
  for (std::size_t b = 0; b * static_cast<std::size_t>(block) < n; ++b) {
    int largest = 0;
    for (int i = 0; i < block; ++i) largest = std::max(largest, std::abs(int{elements[b * static_cast<std::size_t>(block) + static_cast<std::size_t>(i)]}));
    const float s = from_bf16(scales[b]);
    ok &= s >= 0.0f && static_cast<float>(largest) * s <= bound;  // false for NaN
  }
  return ok;
}

/// Where a record is read from: a stream, or a mapped file's bytes.
class stream_source {
 public:
  explicit stream_source(std::istream& in) : in_(in) {}
  /// Reads exactly n bytes into p. @throws file_error if the input ends first.
  void read(void* p, std::size_t n, const char* what) {
    if (n == 0) return;
    in_.read(static_cast<char*>(p), static_cast<std::streamsize>(n));
    if (static_cast<std::size_t>(in_.gcount()) != n)
      fail<file_error>(std::string("cache file: truncated in ") + what + " (" + std::to_string(in_.gcount()) + " of " + std::to_string(n) +
                       " bytes)");
  }
  /// Bytes left, if the source knows (a stream does not: the records say how long they are).
  bool knows_size() const noexcept { return false; }
  std::size_t left() const noexcept { return 0; }

 private:
  std::istream& in_;
};

class span_source {
 public:
  explicit span_source(std::span<const char> bytes) : bytes_(bytes) {}
  void read(void* p, std::size_t n, const char* what) {
    if (n > bytes_.size() - at_)
      fail<file_error>(std::string("cache file: truncated in ") + what + " (" + std::to_string(bytes_.size() - at_) + " of " + std::to_string(n) +
                       " bytes)");
    if (n > 0) std::memcpy(p, bytes_.data() + at_, n);  // p may be null when n is 0 (an empty buffer)
    at_ += n;
  }
  bool knows_size() const noexcept { return true; }
  std::size_t left() const noexcept { return bytes_.size() - at_; }
  std::size_t position() const noexcept { return at_; }

 private:
  std::span<const char> bytes_;
  std::size_t at_ = 0;
};

/// A stream's record held in memory once it has arrived: read a block at a time, so what is
/// allocated follows the bytes that came, never a length a record states.
class staged_source {
 public:
  /// Reads `bytes` bytes of `in` (the rest of a record, its length worked out from its state);
  /// `where(at)` names the section byte `at` falls in, for the error if the stream ends first.
  template <class Where>
  staged_source(stream_source& in, std::uint64_t bytes, Where&& where) {
    for (std::uint64_t at = 0; at < bytes; at += cache_file_block) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(cache_file_block, bytes - at));
      blocks_.push_back(std::make_unique_for_overwrite<char[]>(n));
      in.read(blocks_.back().get(), n, where(at));
    }
    size_ = static_cast<std::size_t>(bytes);
  }
  void read(void* p, std::size_t n, const char* what) {
    if (n > size_ - at_) fail<file_error>(std::string("cache file: truncated in ") + what);
    for (char* to = static_cast<char*>(p); n > 0;) {
      const std::size_t offset = at_ % cache_file_block, take = std::min(n, cache_file_block - offset);
      std::memcpy(to, blocks_[at_ / cache_file_block].get() + offset, take);
      to += take;
      at_ += take;
      n -= take;
    }
  }
  bool knows_size() const noexcept { return true; }
  std::size_t left() const noexcept { return size_ - at_; }

 private:
  std::vector<std::unique_ptr<char[]>> blocks_;
  std::size_t size_ = 0, at_ = 0;
};

inline void write_bytes(std::ostream& out, const void* p, std::size_t n) {
  if (n == 0) return;
  out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
  if (!out) fail<file_error>("cache file: writing failed (" + std::to_string(n) + " bytes)");
}
template <class T>
void write_value(std::ostream& out, T x) {
  write_bytes(out, &x, sizeof x);
}
template <class T, class Source>
T read_value(Source& in, const char* what) {
  T x;
  in.read(&x, sizeof x, what);
  return x;
}


/// Writes one record. The representations are written head by head (their stride is the capacity).
inline void save_record(std::ostream& out, const cache_shape& shape, const attention_config& config, const rope& rotary,
                        const std::string& policies, const kv_cache& cache) {
  meta_writer meta;
  write_layer(meta, shape, config, rotary, policies);
  cache_file_access::write_state(meta, cache);
  write_bytes(out, cache_file_magic, sizeof cache_file_magic);
  write_value(out, cache_file_version);
  write_value(out, std::uint32_t{0});
  write_value(out, byte_order_mark);
  write_value(out, static_cast<std::uint64_t>(meta.data().size()));
  write_bytes(out, meta.data().data(), meta.data().size());
  write_value(out, xxh64::of(meta.data().data(), meta.data().size()));
  auto& c = const_cast<kv_cache&>(cache);  // read only: sections() hands out the buffers for both ways
  const auto sections = cache_file_access::sections(c);
  for (std::size_t i = 0; i < sections.size(); ++i) {
    write_value(out, static_cast<std::uint64_t>(sections[i][0].second + sections[i][1].second));
    xxh64 hash;
    auto put = [&](const char* p, std::size_t n) {
      hash.update(p, n);
      write_bytes(out, p, n);
    };
    if (i == 2)
      for (int h = 0; h < shape.summary_heads(); ++h) put(cache_file_access::representation_run(c, h), cache_file_access::representation_run_bytes(c));
    else
      for (const auto& [p, n] : sections[i]) put(p, n);
    write_value(out, hash.digest());
  }
}

/// An encoder with no checks of its own (checked_chunk_encoder): a file's summaries need only be finite.
struct unchecked_encoder {};

/// The five sections of a record into `cache` (empty, of the record's shape), every one checked:
/// its stated size, its checksum, its values (with reject_nonfinite: what this layer's inputs
/// and encoder can make), and that nothing is stored past the sequence's end.
template <class Source, class Encoder>
void read_sections(Source& in, kv_cache& cache, const cache_file_access::state& st, const std::array<std::size_t, 5>& sizes,
                   const attention_config& config, const rope& rotary, std::int64_t reserve_tokens, const Encoder& encoder) {
  const cache_shape& shape = cache.shape();
  auto check_size = [&](std::size_t i, std::uint64_t bytes) {
    if (bytes != sizes[i])
      fail<file_error>(std::string("cache file: corrupted: the ") + section_names[i] + " section has " + std::to_string(bytes) + " bytes, " +
                       std::to_string(sizes[i]) + " expected for " + std::to_string(st.tokens) + " tokens");
  };
  check_size(0, read_value<std::uint64_t>(in, section_titles[0]));
  cache.reserve(std::max(reserve_tokens, st.tokens));
  cache_file_access::apply_state(cache, st);

  // With reject_nonfinite a live cache holds only what validated input gives: keys, values and
  // queries at most sqrt(2) m max_input_magnitude (a rotation's gain; 1% over it for bf16's or int8's
  // rounding), summaries and encoder state as the encoder makes them from such keys (finite,
  // for an encoder that does not say more). A file must hold no more, so a loaded cache keeps
  // the layer's promise of finite outputs and the scorer's of its summaries' form.
  const bool check_values = config.reject_nonfinite;
  const float row_bound = static_cast<float>(std::sqrt(2.0) * std::max(1.0, rotary.magnitude()) * max_input_magnitude(config, rotary) * 1.01);
  const auto sections = cache_file_access::sections(cache);
  for (std::size_t i = 0; i < sections.size(); ++i) {
    if (i > 0) check_size(i, read_value<std::uint64_t>(in, section_titles[i]));
    xxh64 hash;
    const bool halves = i < 2 && shape.precision == kv_precision::bf16, int8 = i < 2 && shape.precision == kv_precision::int8;
    auto refuse = [&] {
      fail<file_error>(std::string("cache file: the ") + section_names[i] +
                       " section holds a non-finite value, or one larger than this layer's inputs can make, or a summary or encoder state its "
                       "encoder cannot make from them (reject_nonfinite)");
    };
    auto get = [&](char* p, std::size_t n) {
      for (std::size_t at = 0; at < n; at += cache_file_block) {
        const std::size_t block = std::min(cache_file_block, n - at);
        in.read(p + at, block, section_titles[i]);
        hash.update(p + at, block);
        if (check_values && !int8 && !all_within(p + at, block, halves, i == 2 || i == 4 ? std::numeric_limits<float>::max() : row_bound))
          refuse();
      }
    };
    if (i == 2)
      for (int h = 0; h < shape.summary_heads(); ++h) get(cache_file_access::representation_run(cache, h), cache_file_access::representation_run_bytes(cache));
    else
      for (const auto& [p, n] : sections[i]) get(p, n);
    if (read_value<std::uint64_t>(in, section_titles[i]) != hash.digest())
      fail<file_error>(std::string("cache file: corrupted ") + section_names[i] + " section (checksum mismatch)");
    // An int8 block's values are its bytes times its scale: checked once both are in.
    if (check_values && int8 &&
        !int8_within(reinterpret_cast<const std::int8_t*>(sections[i][0].first), reinterpret_cast<const bf16*>(sections[i][1].first),
                     sections[i][0].second, cache.int8_block(), row_bound))
      refuse();
    if (check_values && i == 2 && !cache_file_access::summaries_within(cache, config, encoder, row_bound)) refuse();
    if (check_values && i == 4 && !cache_file_access::spread_state_within(cache, config, encoder)) refuse();
  }
  if (const char* section = cache_file_access::first_with_data_past_end(cache))
    fail<file_error>(std::string("cache file: the ") + section + " section holds data past the sequence's end (" + std::to_string(st.tokens) +
                     " tokens), where a cache holds zeros: a cache forgets what it no longer holds");
  cache_file_access::finish_load(cache);
}

/// Reads one record into a new cache for the layer described by the arguments; `encoder`, the
/// layer's, checks the summaries (checked_chunk_encoder) when the layer rejects non-finite input.
template <class Source, class Encoder>
kv_cache load_record(Source& in, const cache_shape& shape, const attention_config& config, const rope& rotary, const std::string& policies,
                     std::int64_t reserve_tokens, std::pmr::memory_resource* memory, const Encoder& encoder) {
  char magic[sizeof cache_file_magic];
  in.read(magic, sizeof magic, "the header");
  if (std::memcmp(magic, cache_file_magic, sizeof magic) != 0) fail<file_error>("cache file: not a longheads cache (no LHKVCACH magic)");
  const auto version = read_value<std::uint32_t>(in, "the header");
  if (version != cache_file_version)
    fail<file_error>("cache file: format version " + std::to_string(version) + ", this library reads version " + std::to_string(cache_file_version) +
                     (version == 1   ? " (version 1 files may hold rolled-back tokens' rows: save the cache again)"
                      : version == 2 ? " (version 2 files do not record a key-space index's layout: save the cache again)"
                                     : ""));
  if (read_value<std::uint32_t>(in, "the header") != 0) fail<file_error>("cache file: corrupted header (a reserved field is not 0)");
  const auto mark = read_value<std::uint64_t>(in, "the header");
  if (mark != byte_order_mark)
    fail<file_error>(mark == 0x0807060504030201ull ? "cache file: saved on a machine of the other byte order"
                                                            : "cache file: corrupted header (byte-order mark)");
  const auto meta_bytes = read_value<std::uint64_t>(in, "the header");
  if (meta_bytes > (std::uint64_t{1} << 32) || (in.knows_size() && meta_bytes > in.left()))
    fail<file_error>("cache file: truncated or corrupted: a meta block of " + std::to_string(meta_bytes) + " bytes");
  // A stream's stated size is not trusted with memory: its meta block is staged as it arrives.
  std::string meta;
  if constexpr (std::is_same_v<Source, stream_source>) {
    staged_source staged(in, meta_bytes, [](std::uint64_t) { return "the meta block"; });
    meta.resize(static_cast<std::size_t>(meta_bytes));
    staged.read(meta.data(), meta.size(), "the meta block");
  } else {
    meta.resize(static_cast<std::size_t>(meta_bytes));
    in.read(meta.data(), meta.size(), "the meta block");
  }
  if (read_value<std::uint64_t>(in, "the meta block") != xxh64::of(meta.data(), meta.size()))
    fail<file_error>("cache file: corrupted meta block (checksum mismatch)");

  // The layer: the file's must be this one's, byte for byte; the first part that differs is named.
  meta_writer expected;
  std::size_t ends[4];
  write_layer(expected, shape, config, rotary, policies, ends);
  const std::string_view layer = expected.data();
  const char* parts[] = {"another shape (this layer's: " , "another configuration", "another RoPE (base, layout or scaling)", "other policies"};
  for (std::size_t part = 0, begin = 0; part < 4; begin = ends[part++])
    if (meta.size() < ends[part] || std::string_view(meta).substr(begin, ends[part] - begin) != layer.substr(begin, ends[part] - begin))
      fail<file_error>(std::string("cache file: saved by a layer with ") + parts[part] +
                       (part == 0 ? to_string(shape) + ")" : part == 3 ? " (this layer's: " + policies + ")" : ""));
  meta_reader state_block(std::string_view(meta).substr(layer.size()));
  kv_cache cache(shape, memory);
  const cache_file_access::state st = cache_file_access::read_state(state_block, cache);
  if (!state_block.done()) fail<file_error>("cache file: corrupted meta block (bytes after the cache's state)");
  // The sections' sizes follow from the state, and so does the rest of the record: it must all
  // be there before the cache is allocated for its tokens. A file's length is known; a stream's
  // record is read into memory first, a block at a time, so nothing is allocated for bytes that
  // never come.
  const auto sizes = cache_file_access::section_bytes(cache, st.tokens);
  std::uint64_t rest = 0;
  for (std::size_t n : sizes) rest += 16 + std::uint64_t{n};
  auto where = [&](std::uint64_t at) {
    std::size_t i = 0;
    while (i + 1 < sizes.size() && at >= 16 + std::uint64_t{sizes[i]}) at -= 16 + std::uint64_t{sizes[i++]};
    return section_titles[i];
  };
  if constexpr (std::is_same_v<Source, stream_source>) {
    staged_source staged(in, rest, where);
    read_sections(staged, cache, st, sizes, config, rotary, reserve_tokens, encoder);
  } else {
    if (rest > in.left())
      fail<file_error>(std::string("cache file: truncated in ") + where(in.left()) + " (" + std::to_string(st.tokens) + " tokens need " +
                       std::to_string(rest) + " bytes of sections, " + std::to_string(in.left()) + " are left)");
    read_sections(in, cache, st, sizes, config, rotary, reserve_tokens, encoder);
  }
  return cache;
}

/// The load without a layer's encoder at hand: summaries and encoder state need only be finite.
template <class Source>
kv_cache load_record(Source& in, const cache_shape& shape, const attention_config& config, const rope& rotary, const std::string& policies,
                     std::int64_t reserve_tokens, std::pmr::memory_resource* memory) {
  return load_record(in, shape, config, rotary, policies, reserve_tokens, memory, unchecked_encoder{});
}

}  // namespace detail

/// Writes `cache`, a cache of `layer`, to `out` as one record. Several records may follow each
/// other in one stream (a model's layers); read them back in the same order.
/// @throws shape_error if the cache is not of this layer's shape; file_error if writing fails.
template <class Policies>
void save_cache(std::ostream& out, const attention<Policies>& layer, const kv_cache& cache) {
  if (cache.shape() != layer.shape())
    detail::fail<shape_error>("save_cache: the cache has shape " + to_string(cache.shape()) + ", this layer's is " + to_string(layer.shape()));
  detail::save_record(out, layer.shape(), layer.config(), layer.rotary(), policy_identity<Policies>(), cache);
}

/// Reads the next record of `in` as a new cache of `layer`, with room for `reserve_tokens`
/// tokens (at least the record's). Decoding on from it gives the bits of the saved cache.
/// @throws file_error naming what is wrong (nothing else is changed; the stream's position is
///         then unspecified).
template <class Policies>
kv_cache load_cache(std::istream& in, const attention<Policies>& layer, std::int64_t reserve_tokens = 0,
                    std::pmr::memory_resource* memory = std::pmr::get_default_resource()) {
  detail::stream_source source(in);
  return detail::load_record(source, layer.shape(), layer.config(), layer.rotary(), policy_identity<Policies>(), reserve_tokens, memory,
                             layer.policies().encoder);
}

/// A cache file being written: records go to `<path>.partial`, which commit() renames to
/// `path`, so `path` never holds half a file (a writer destroyed without commit() removes it).
class cache_file_writer {
 public:
  /// @throws file_error if the file cannot be created.
  explicit cache_file_writer(std::filesystem::path path) : path_(std::move(path)), partial_(path_) {
    partial_ += ".partial";
    out_.open(partial_, std::ios::binary | std::ios::trunc);
    if (!out_) detail::fail<file_error>("cache file: cannot create " + partial_.string());
  }
  cache_file_writer(const cache_file_writer&) = delete;
  cache_file_writer& operator=(const cache_file_writer&) = delete;
  ~cache_file_writer() {
    if (!committed_) {
      out_.close();
      std::error_code ignored;
      std::filesystem::remove(partial_, ignored);
    }
  }
  /// Appends `cache`, a cache of `layer`. @throws shape_error, file_error.
  template <class Policies>
  void save(const attention<Policies>& layer, const kv_cache& cache) {
    save_cache(out_, layer, cache);
  }
  /// Flushes and renames the file into place. @throws file_error.
  void commit() {
    out_.flush();
    out_.close();
    if (!out_) detail::fail<file_error>("cache file: writing " + partial_.string() + " failed");
    std::error_code error;
    std::filesystem::rename(partial_, path_, error);
    if (error) detail::fail<file_error>("cache file: cannot rename " + partial_.string() + " to " + path_.string() + ": " + error.message());
    committed_ = true;
  }

 private:
  std::filesystem::path path_, partial_;
  std::ofstream out_;
  bool committed_ = false;
};

/// A cache file opened for loading: mapped into memory where the system allows (else read into
/// memory); records are loaded in the order they were saved.
class cache_file_reader {
 public:
  /// @throws file_error if the file cannot be opened or mapped.
  explicit cache_file_reader(const std::filesystem::path& path) : name_(path.string()) {
#if LONGHEADS_HAS_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) detail::fail<file_error>("cache file: cannot open " + name_ + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      detail::fail<file_error>("cache file: cannot stat " + name_);
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
#ifdef MAP_POPULATE
      constexpr int populate = MAP_POPULATE;  // the whole file is read: map it in one go, not a page fault per 4 KB
#else
      constexpr int populate = 0;
#endif
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE | populate, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        detail::fail<file_error>("cache file: cannot map " + name_ + ": " + std::strerror(errno));
      }
      ::madvise(p, size_, MADV_SEQUENTIAL);
      mapping_ = static_cast<const char*>(p);
    }
    ::close(fd);
#else
    std::ifstream in(path, std::ios::binary);
    if (!in) detail::fail<file_error>("cache file: cannot open " + name_);
    contents_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    mapping_ = contents_.data();
    size_ = contents_.size();
#endif
  }
  cache_file_reader(const cache_file_reader&) = delete;
  cache_file_reader& operator=(const cache_file_reader&) = delete;
  ~cache_file_reader() {
#if LONGHEADS_HAS_MMAP
    if (mapping_ != nullptr) ::munmap(const_cast<char*>(mapping_), size_);
#endif
  }

  /// Loads the next record as a cache of `layer` with room for `reserve_tokens` tokens.
  /// @throws file_error naming the file and what is wrong; the reader then stays at that record.
  template <class Policies>
  kv_cache load(const attention<Policies>& layer, std::int64_t reserve_tokens = 0,
                std::pmr::memory_resource* memory = std::pmr::get_default_resource()) {
    detail::span_source source(std::span<const char>(mapping_, size_).subspan(position_));
    try {
      kv_cache cache = detail::load_record(source, layer.shape(), layer.config(), layer.rotary(), policy_identity<Policies>(), reserve_tokens,
                                           memory, layer.policies().encoder);
      position_ += source.position();
      return cache;
    } catch (const file_error& e) {
      detail::fail<file_error>(name_ + ": record at byte " + std::to_string(position_) + ": " + (e.what() + std::strlen("longheads: ")));
    }
  }
  /// Whether every record has been loaded.
  bool at_end() const noexcept { return position_ == size_; }
  /// @throws file_error if bytes follow the last record loaded (a file of more layers, or garbage).
  void expect_end() const {
    if (!at_end())
      detail::fail<file_error>(name_ + ": " + std::to_string(size_ - position_) + " bytes after the last record loaded (byte " +
                               std::to_string(position_) + ")");
  }
  /// The file's size in bytes.
  std::size_t size() const noexcept { return size_; }

 private:
  std::string name_;
  const char* mapping_ = nullptr;
  std::size_t size_ = 0;
  std::size_t position_ = 0;
#if !LONGHEADS_HAS_MMAP
  std::vector<char> contents_;
#endif
};

/// Saves one cache to `path` (a file of one record), replacing it whole. @throws shape_error, file_error.
template <class Policies>
void save_cache(const std::filesystem::path& path, const attention<Policies>& layer, const kv_cache& cache) {
  cache_file_writer file(path);
  file.save(layer, cache);
  file.commit();
}

/// Loads the one cache of the file at `path` (mapped) for `layer`. @throws file_error.
template <class Policies>
kv_cache load_cache(const std::filesystem::path& path, const attention<Policies>& layer, std::int64_t reserve_tokens = 0,
                    std::pmr::memory_resource* memory = std::pmr::get_default_resource()) {
  cache_file_reader file(path);
  kv_cache cache = file.load(layer, reserve_tokens, memory);
  file.expect_end();
  return cache;
}

}  // namespace longheads
