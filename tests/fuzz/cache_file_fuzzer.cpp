// libFuzzer target: the cache-file loader (cache_file.hpp) on arbitrary bytes. Checks: no crash
// or sanitizer report; every refused record is a longheads::file_error; a record that loads is
// a usable cache: it decodes on (finite outputs with finite input), saves again to the same
// bytes, and loads again equal.
//
// The first input byte picks the layer (byte % 5: paper encoder with its spread encoding, Quest
// through the beam index, bf16 K/V, int8 K/V, the dense baseline) and how the rest is used
// (byte / 5 % 4), so the fuzzer gets past the checksums into the fields behind them:
//   0  the bytes are the record
//   1  edits (offset, byte) to a valid record of that layer
//   2  the same, then every checksum recomputed (the loader's field checks alone stand guard)
//   3  a valid record cut short
//
//   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DLONGHEADS_BUILD_FUZZERS=ON
//   cmake --build build-fuzz --target cache_file_fuzzer
//   build-fuzz/tests/fuzz/cache_file_fuzzer -max_total_time=60 -malloc_limit_mb=64
//
// -malloc_limit_mb=64: every fixture's record is of 150 tokens, so a load that allocates more at
// once trusted a size a record claims (the issue-34 finding). The same source with
// LONGHEADS_FUZZ_REPAIR_CHECKSUMS is cache_file_checksums_fuzzer (its mutator below).
#include <longheads/longheads.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace longheads;

struct quest_beam : paper_policies {
  using encoder = key_bounds_encoder;
  using scorer = bound_scorer;
  using index = bound_tree_beam;
};

constexpr int hq = 4, hkv = 2, d = 8;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "cache_file_fuzzer: %s\n", what);
  std::abort();
}

std::vector<float> noise(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (float& e : x) e = dist(rng);
  return x;
}

/// One layer and a valid record of a cache of it (150 tokens: mid-chunk, a spread encoding
/// under way, a last selection recorded).
template <class Policies>
struct fixture {
  attention<Policies> layer;
  std::string record;

  explicit fixture(const attention_config& config, typename attention<Policies>::policy_set policies = {})
      : layer(config, rope(d), policies) {
    kv_cache cache = layer.make_cache();
    const int n = 150;
    const auto q = noise(static_cast<std::size_t>(n) * hq * d, 1), k = noise(static_cast<std::size_t>(n) * hkv * d, 2),
               v = noise(static_cast<std::size_t>(n) * hkv * d, 3);
    std::vector<float> out(q.size());
    layer.prefill(cache, {q.data(), n, hq, d}, {k.data(), n, hkv, d}, {v.data(), n, hkv, d}, {out.data(), n, hq, d});
    std::ostringstream s(std::ios::binary);
    save_cache(s, layer, cache);
    record = s.str();
  }

  /// Loads `bytes` from a stream and as a mapped file does (a span), checks the outcome.
  void run(const std::string& bytes) {
    const auto& encoder = layer.policies().encoder;
    std::istringstream in(bytes, std::ios::binary);
    std::unique_ptr<kv_cache> from_stream, from_span;
    try {
      from_stream = std::make_unique<kv_cache>(load_cache(in, layer));
    } catch (const file_error&) {
    }
    try {
      detail::span_source source({bytes.data(), bytes.size()});
      from_span = std::make_unique<kv_cache>(detail::load_record(source, layer.shape(), layer.config(), layer.rotary(),
                                                                 policy_identity<Policies>(), 0, std::pmr::get_default_resource(), encoder));
    } catch (const file_error&) {
    }
    if (!from_stream != !from_span) fail("the stream and the span disagree on whether a record loads");
    if (!from_stream) return;
    if (!(*from_stream == *from_span)) fail("the stream and the span load different caches");
    // A loaded record saves to the bytes it came from (up to bytes after the record).
    std::ostringstream again(std::ios::binary);
    save_cache(again, layer, *from_stream);
    if (bytes.compare(0, again.str().size(), again.str()) != 0) fail("a loaded cache saves to other bytes");
    // It decodes on.
    const auto q = noise(hq * d, 4), k = noise(hkv * d, 5), v = noise(hkv * d, 6);
    std::vector<float> out(q.size());
    for (int t = 0; t < 40; ++t) {
      layer.decode(*from_stream, {q.data(), 1, hq, d}, {k.data(), 1, hkv, d}, {v.data(), 1, hkv, d}, {out.data(), 1, hq, d});
      for (float x : out)
        if (!std::isfinite(x)) fail("a loaded cache gave a non-finite output");
    }
  }
};

attention_config base_config() {
  attention_config c;
  c.n_q_heads = hq;
  c.n_kv_heads = hkv;
  c.head_dim = d;
  c.chunk_size = 16;
  c.budget_chunks = 4;
  return c;
}

/// Recomputes the meta block's and every section's checksum of a record, as far as its own
/// lengths allow.
void repair_checksums(std::string& b) {
  auto u64_at = [&](std::size_t at, std::uint64_t& x) {
    if (at + 8 > b.size()) return false;
    std::memcpy(&x, b.data() + at, 8);
    return true;
  };
  std::uint64_t n = 0;
  std::size_t at = 24;
  for (int part = 0; part < 6; ++part) {
    if (!u64_at(at, n) || n > b.size() - at - 8 || b.size() - at - 8 - n < 8) return;
    const std::uint64_t h = detail::xxh64::of(b.data() + at + 8, n);
    std::memcpy(b.data() + at + 8 + n, &h, 8);
    at += 16 + n;
  }
}

/// The five layers, made once.
struct layers {
  fixture<paper_policies> paper{base_config()};
  fixture<quest_beam> beam{base_config(), {.index = bound_tree_beam{.branching = 4, .beam = 2, .exact_below = 4, .scan_below = 0}}};
  fixture<paper_policies> bf16{[] {
    attention_config c = base_config();
    c.kv_storage = kv_precision::bf16;
    return c;
  }()};
  fixture<paper_policies> int8{[] {
    attention_config c = base_config();
    c.kv_storage = kv_precision::int8;
    return c;
  }()};
  fixture<paper_policies> dense{[] {
    attention_config c = base_config();
    c.method = attention_method::dense;
    return c;
  }()};
  /// Calls f with the layer byte `choice` picks.
  template <class F>
  void with(std::uint8_t choice, F&& f) {
    switch (choice % 5) {
      case 0: f(paper); break;
      case 1: f(beam); break;
      case 2: f(bf16); break;
      case 3: f(int8); break;
      default: f(dense); break;
    }
  }
};
layers& all_layers() {
  static layers l;
  return l;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t choice = data[0];
  const std::string input(reinterpret_cast<const char*>(data) + 1, size - 1);
  all_layers().with(choice, [&](auto& f) {
    std::string bytes;
    switch (choice / 5 % 4) {
      case 0: bytes = input; break;
      case 1:
      case 2:
        bytes = f.record;
        for (std::size_t i = 0; i + 3 <= input.size(); i += 3) {
          const std::size_t at = (static_cast<std::size_t>(static_cast<std::uint8_t>(input[i])) << 8 | static_cast<std::uint8_t>(input[i + 1])) %
                                 bytes.size();
          bytes[at] = input[i + 2];
        }
        if (choice / 5 % 4 == 2) repair_checksums(bytes);
        break;
      default: {
        std::size_t cut = 0;
        for (char c : input) cut = cut * 256 + static_cast<std::uint8_t>(c);
        bytes = f.record.substr(0, cut % (f.record.size() + 1));
      }
    }
    f.run(bytes);
  });
  return 0;
}

#ifdef LONGHEADS_FUZZ_REPAIR_CHECKSUMS
// cache_file_checksums_fuzzer: libFuzzer's own mutations of whole records (byte 0 picks the
// layer; the rest is the record), each followed by the checksums recomputed, so what the
// mutations change (sizes, counts, offsets, the state, the sections' values) reaches the field
// checks behind the checksums. An input that is not a record yet starts as the layer's valid one.
extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t max_size, unsigned int) {
  if (size < 1 + 8 || std::memcmp(data + 1, "LHKVCACH", 8) != 0) {
    const std::uint8_t choice = size > 0 ? data[0] : 0;
    all_layers().with(choice, [&](auto& f) {
      if (1 + f.record.size() > max_size) return;
      data[0] = static_cast<std::uint8_t>(choice % 5);
      std::memcpy(data + 1, f.record.data(), f.record.size());
      size = 1 + f.record.size();
    });
  }
  if (size < 1) return size;
  size = 1 + LLVMFuzzerMutate(data + 1, size - 1, max_size - 1);
  data[0] = static_cast<std::uint8_t>(data[0] % 5);  // the bytes are the record (mode 0)
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  repair_checksums(bytes);
  std::memcpy(data + 1, bytes.data(), bytes.size());
  return size;
}
#endif
