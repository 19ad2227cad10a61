// Cache files (cache_file.hpp): save -> load -> decode on gives the bits of a cache never saved,
// for every method, storage and policy set; every kind of bad file is a named file_error that
// leaves the caller's caches as they were.
#include <doctest/doctest.h>

#include <longheads/longheads.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace longheads;

namespace {

using test::quest_beam_policies;
using test::quest_cluster_policies;
using test::quest_policies;
using test::representative_policies;
using test::rotated_paper_policies;
using group_policies = test::quest_group_policies<group_max_selection>;

std::string saved(const auto& layer, const kv_cache& cache) {
  std::ostringstream out(std::ios::binary);
  save_cache(out, layer, cache);
  return out.str();
}
template <class Policies>
kv_cache loaded(const std::string& bytes, const attention<Policies>& layer) {
  std::istringstream in(bytes, std::ios::binary);
  return load_cache(in, layer);
}

/// Prefills `prompt` tokens, saves, loads (from a stream and from a file), then decodes 64 more
/// tokens on the original and on both loaded caches: outputs and caches must be equal.
template <class Policies>
void check_round_trip(attention_config config, typename attention<Policies>::policy_set policies, int prompt, std::uint32_t seed) {
  const int hq = config.n_q_heads, hkv = config.n_kv_heads, d = config.head_dim;
  attention<Policies> layer(config, rope(d, 10000.0), policies);
  const test::sequence seq(prompt + 64, hq, hkv, d, seed);
  kv_cache original = layer.make_cache();
  std::vector<float> out(static_cast<std::size_t>(prompt + 64) * hq * d);
  for (int first = 0; first < prompt; first += 50) {
    const int n = std::min(50, prompt - first);
    layer.prefill(original, seq.qv(first, n), seq.kv(first, n), seq.vv(first, n), {out.data() + first * hq * d, n, hq, d});
  }
  const std::string bytes = saved(layer, original);
  kv_cache from_stream = loaded(bytes, layer);
  CHECK(from_stream == original);
  const auto path = std::filesystem::temp_directory_path() / ("longheads_cache_test_" + std::to_string(seed) + ".lhkv");
  save_cache(path, layer, original);
  kv_cache from_file = load_cache(path, layer, prompt + 64);
  std::filesystem::remove(path);
  CHECK(from_file == original);
  CHECK(from_file.capacity_tokens() >= prompt + 64);
  // Decoding on: the same bits from all three.
  std::vector<float> a(static_cast<std::size_t>(hq) * d), b(a.size()), c(a.size());
  for (int t = prompt; t < prompt + 64; ++t) {
    layer.decode(original, seq.qv(t, 1), seq.kv(t, 1), seq.vv(t, 1), {a.data(), 1, hq, d});
    layer.decode(from_stream, seq.qv(t, 1), seq.kv(t, 1), seq.vv(t, 1), {b.data(), 1, hq, d});
    layer.decode(from_file, seq.qv(t, 1), seq.kv(t, 1), seq.vv(t, 1), {c.data(), 1, hq, d});
    REQUIRE(a == b);
    REQUIRE(a == c);
  }
  CHECK(from_stream == original);
  CHECK(from_file == original);
}

}  // namespace

TEST_CASE("XXH64 gives the published digests, fed whole or in pieces") {
  CHECK(detail::xxh64::of("", 0) == 0xEF46DB3751D8E999ull);
  CHECK(detail::xxh64::of("abc", 3) == 0x44BC2CF5AD770999ull);
  const std::vector<float> x = test::random_floats(300, 3);
  const auto* bytes = reinterpret_cast<const char*>(x.data());
  for (std::size_t n : {0u, 1u, 7u, 31u, 32u, 33u, 64u, 100u, 1200u}) {
    const std::uint64_t whole = detail::xxh64::of(bytes, n);
    for (std::size_t piece : {1u, 3u, 8u, 31u, 32u, 45u}) {
      detail::xxh64 h;
      for (std::size_t at = 0; at < n; at += piece) h.update(bytes + at, std::min(piece, n - at));
      CHECK(h.digest() == whole);
    }
  }
}

TEST_CASE("save -> load -> decode 64 more tokens == never saved, every method, storage and policy set") {
  std::uint32_t seed = 100;
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
    for (int prompt : {0, 1, 37, 96, 171}) {  // empty, inside the first chunk, on a boundary, past one (w 16 and 32)
      CAPTURE(to_string(storage));
      CAPTURE(prompt);
      for (auto [hq, hkv] : {std::pair{4, 4}, std::pair{8, 2}}) {
        attention_config config = test::make_config(hq, hkv, 16, 16, 4);
        config.kv_storage = storage;
        check_round_trip<paper_policies>(config, {}, prompt, ++seed);  // spread encoding mid-chunk
        attention_config at_completion = config;
        at_completion.spread_encoding = false;
        check_round_trip<paper_policies>(at_completion, {}, prompt, ++seed);
        attention_config rollback = config;
        rollback.rollback_chunks = 2;
        check_round_trip<paper_policies>(rollback, {}, prompt, ++seed);
        check_round_trip<quest_policies>(config, {}, prompt, ++seed);
        check_round_trip<quest_beam_policies>(config, {.index = bound_tree_beam{.branching = 4, .beam = 2, .exact_below = 4, .scan_below = 0}}, prompt,
                                              ++seed);
        check_round_trip<quest_cluster_policies>(
            config, {.index = key_cluster_index{.segment_chunks = 3, .clusters = 2, .iterations = 2, .probe_share = 0.0f, .probe_min = 2, .exact_below = 0}},
            prompt, ++seed);
        check_round_trip<representative_policies>(config, {.encoder = representative_keys_encoder{3}, .scorer = max_key_scorer{3}}, prompt, ++seed);
        if (hq != hkv) check_round_trip<group_policies>(config, {}, prompt, ++seed);
        for (attention_method m : {attention_method::dense, attention_method::sink_window}) {
          attention_config baseline = config;
          baseline.method = m;
          check_round_trip<paper_policies>(baseline, {}, prompt, ++seed);
        }
        attention_config wide = config;
        wide.chunk_size = 32;
        wide.budget_chunks = 3;
        check_round_trip<paper_policies>(wide, {}, prompt, ++seed);
      }
    }
}

TEST_CASE("a model's layers in one file: records load in order, and the file must end after the last") {
  const auto path = std::filesystem::temp_directory_path() / "longheads_cache_test_layers.lhkv";
  const attention_config c1 = test::make_config(4, 2, 16, 16, 4), c2 = test::make_config(4, 4, 32, 8, 6);
  attention<paper_policies> l1(c1, rope(16));
  attention<quest_policies> l2(c2, rope(32));
  const test::sequence s1(90, 4, 2, 16, 1), s2(90, 4, 4, 32, 2);
  kv_cache k1 = l1.make_cache(), k2 = l2.make_cache();
  std::vector<float> out(static_cast<std::size_t>(90) * 4 * 32);
  l1.prefill(k1, s1.qv(0, 90), s1.kv(0, 90), s1.vv(0, 90), {out.data(), 90, 4, 16});
  l2.prefill(k2, s2.qv(0, 90), s2.kv(0, 90), s2.vv(0, 90), {out.data(), 90, 4, 32});
  {
    cache_file_writer file(path);
    file.save(l1, k1);
    file.save(l2, k2);
    CHECK(!std::filesystem::exists(path));  // nothing at the path until commit()
    file.commit();
  }
  cache_file_reader file(path);
  CHECK(file.load(l1) == k1);
  CHECK(!file.at_end());
  CHECK_THROWS_WITH_AS(file.expect_end(), doctest::Contains("bytes after the last record loaded"), file_error);
  CHECK_THROWS_WITH_AS(file.load(l1), doctest::Contains("record at byte"), file_error);  // layer 2's record is not layer 1's
  CHECK(file.load(l2) == k2);
  CHECK(file.at_end());
  file.expect_end();
  std::filesystem::remove(path);
  {
    cache_file_writer abandoned(path);
    abandoned.save(l1, k1);
  }  // destroyed without commit(): no file, no partial file
  CHECK(!std::filesystem::exists(path));
  CHECK(!std::filesystem::exists(path.string() + ".partial"));
}

TEST_CASE("bad cache files are named file_errors, and the caller's cache stays as it was") {
  const int hq = 4, hkv = 2, d = 16, prompt = 150;
  attention_config config = test::make_config(hq, hkv, d, 16, 4);
  attention<paper_policies> layer(config, rope(d));
  const test::sequence seq(prompt, hq, hkv, d, 9);
  kv_cache cache = layer.make_cache();
  std::vector<float> out(static_cast<std::size_t>(prompt) * hq * d);
  layer.prefill(cache, seq.qv(0, prompt), seq.kv(0, prompt), seq.vv(0, prompt), {out.data(), prompt, hq, d});
  const std::string good = saved(layer, cache);
  REQUIRE(loaded(good, layer) == cache);

  // The record's layout: header 24 bytes, meta size, meta, its hash, then five sections.
  std::uint64_t meta_bytes;
  std::memcpy(&meta_bytes, good.data() + 24, 8);
  const std::size_t meta_at = 32, keys_size_at = meta_at + meta_bytes + 8, keys_at = keys_size_at + 8;
  std::uint64_t keys_bytes;
  std::memcpy(&keys_bytes, good.data() + keys_size_at, 8);
  const std::size_t values_size_at = keys_at + keys_bytes + 8;

  kv_cache target = layer.make_cache();  // a caller's cache, to be assigned from a load
  layer.prefill(target, seq.qv(0, 20), seq.kv(0, 20), seq.vv(0, 20), {out.data(), 20, hq, d});
  const kv_cache before = target;
  int cases = 0;
  // From a stream, and from a file through the mapping (a stream may hold more records after
  // this one, so bytes after it are an error of a file only).
  auto expect = [&](const std::string& bytes, const std::string& says, bool from_stream = true) {
    ++cases;
    CAPTURE(says);
    auto check = [&](auto&& load) {
      bool thrown = false;
      try {
        target = load();
      } catch (const file_error& e) {
        thrown = true;
        CHECK_MESSAGE(std::string(e.what()).find(says) != std::string::npos, e.what());
      }
      CHECK(thrown);
      CHECK(target == before);
    };
    if (from_stream) check([&] { return loaded(bytes, layer); });
    const auto path = std::filesystem::temp_directory_path() / "longheads_cache_test_bad.lhkv";
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    check([&] { return load_cache(path, layer); });
    std::filesystem::remove(path);
  };
  auto patched = [&](std::size_t at, const void* value, std::size_t n) {
    std::string b = good;
    std::memcpy(b.data() + at, value, n);
    return b;
  };
  auto flipped = [&](std::size_t at) {
    std::string b = good;
    b[at] = static_cast<char>(b[at] ^ 0x10);
    return b;
  };

  expect("", "truncated in the header");
  expect("GIF89a, certainly not a cache of anything at all", "not a longheads cache");
  for (std::size_t cut : {std::size_t{10}, std::size_t{30}, meta_at + 5, keys_at + 1000, good.size() - 3})
    expect(good.substr(0, cut), "truncated");
  const std::uint32_t version4 = 4, version1 = 1;
  expect(patched(8, &version4, 4), "format version 4");
  expect(patched(8, &version1, 4), "version 1 files may hold rolled-back tokens' rows");
  const std::uint64_t swapped = 0x0807060504030201ull;
  expect(patched(16, &swapped, 8), "other byte order");
  expect(flipped(meta_at + 40), "corrupted meta block (checksum mismatch)");
  expect(flipped(keys_at + 123), "corrupted keys section (checksum mismatch)");
  expect(flipped(values_size_at - 2), "corrupted keys section (checksum mismatch)");  // in the keys' own checksum
  const std::uint64_t wrong_length = keys_bytes - 4;
  expect(patched(keys_size_at, &wrong_length, 8), "the keys section has");
  expect(good + "trailing", "bytes after the last record", false);

  // Consistent files (every checksum right) of something this layer cannot take.
  auto rehashed_meta = [&](std::string b) {
    const std::uint64_t h = detail::xxh64::of(b.data() + meta_at, meta_bytes);
    std::memcpy(b.data() + meta_at + meta_bytes, &h, 8);
    return b;
  };
  {
    std::string b = good;  // tokens beyond what the sections hold
    detail::meta_writer layer_part;
    detail::write_layer(layer_part, layer.shape(), layer.config(), layer.rotary(), policy_identity<paper_policies>());
    const std::size_t tokens_at = meta_at + layer_part.data().size();
    std::int64_t tokens;
    std::memcpy(&tokens, b.data() + tokens_at, 8);
    REQUIRE(tokens == prompt);
    const std::int64_t more = std::int64_t{1} << 30;
    std::memcpy(b.data() + tokens_at, &more, 8);
    expect(rehashed_meta(b), "truncated in the keys section");  // the state's tokens need more bytes than come: nothing allocated for them
  }
  {
    std::string b = good;  // a NaN key, with the keys' checksum made to match
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(b.data() + keys_at + 64, &nan, 4);
    const std::uint64_t h = detail::xxh64::of(b.data() + keys_at, keys_bytes);
    std::memcpy(b.data() + keys_at + keys_bytes, &h, 8);
    expect(b, "non-finite value");
    const float huge = 1e30f;  // finite, but beyond any rotated input this layer accepts
    std::memcpy(b.data() + keys_at + 64, &huge, 4);
    const std::uint64_t h2 = detail::xxh64::of(b.data() + keys_at, keys_bytes);
    std::memcpy(b.data() + keys_at + keys_bytes, &h2, 8);
    expect(b, "larger than this layer's inputs can make");
  }
  // Sections every checksum of which is right, holding what no live cache holds.
  auto section_at = [&](const std::string& b, int section) {  // where section i's bytes start, and their count
    std::uint64_t n;
    std::memcpy(&n, b.data() + 24, 8);
    std::size_t at = 32 + n + 8;
    for (int i = 0;; ++i) {
      std::memcpy(&n, b.data() + at, 8);
      if (i == section) return std::pair{at + 8, static_cast<std::size_t>(n)};
      at += 16 + n;
    }
  };
  auto with_float = [&](const std::string& from, int section, std::size_t element, float x) {
    std::string b = from;
    const auto [at, n] = section_at(b, section);
    std::memcpy(b.data() + at + 4 * element, &x, 4);
    const std::uint64_t h = detail::xxh64::of(b.data() + at, n);
    std::memcpy(b.data() + at + n, &h, 8);
    return b;
  };
  // A key row past the 150th token (the last chunk holds 6 of its 16 rows): a rolled-back token's.
  expect(with_float(good, 0, (9 * hkv * 16 + 10) * d + 3, 0.5f), "the keys section holds data past the sequence's end");
  expect(with_float(good, 1, (9 * hkv * 16 + 15) * d, -0.25f), "the values section holds data past the sequence's end");
  // A query row the buffers do not hold: the open chunk 9 has 6 rows, in buffer 9 mod 2 (the
  // spread encoding keeps two chunks' queries, [w][H_q][d] each).
  expect(with_float(good, 3, (16 + 12) * hq * d + 1, 0.5f), "the query buffers section holds data past the sequence's end");
  // Summaries: the paper's encoder averages keys, so a summary larger than any key is forged.
  expect(with_float(good, 2, 5, 1e30f), "a summary or encoder state its encoder cannot make");
  // Its spread encoding's state: column sums of softmax rows, in [0, w].
  expect(with_float(good, 4, 2, -1.0f), "a summary or encoder state its encoder cannot make");
  expect(with_float(good, 4, 2, 17.0f), "a summary or encoder state its encoder cannot make");
  {
    // Key bounds whose lo is above their hi (the index's boxes and the scorer's bound assume lo <= hi).
    attention<quest_policies> quest(config, rope(d));
    kv_cache qc = quest.make_cache();
    quest.prefill(qc, seq.qv(0, prompt), seq.kv(0, prompt), seq.vv(0, prompt), {out.data(), prompt, hq, d});
    const std::string q_good = saved(quest, qc);
    const float hi0 = qc.representations(0).row(3)[d];
    CHECK_THROWS_WITH_AS(loaded(with_float(q_good, 2, 3 * 2 * d, hi0 + 0.5f), quest), doctest::Contains("a summary or encoder state its encoder cannot make"),
                         file_error);
    CHECK(loaded(with_float(q_good, 2, 3 * 2 * d, hi0 - 0.5f), quest).tokens() == prompt);  // a lower lo is a box some keys make
  }
  auto from_other = [&](auto&& other_layer) {
    kv_cache c = other_layer.make_cache();
    other_layer.prefill(c, seq.qv(0, 40), seq.kv(0, 40), seq.vv(0, 40), {out.data(), 40, hq, d});
    return saved(other_layer, c);
  };
  attention_config other_chunks = config;
  other_chunks.chunk_size = 8;
  expect(from_other(attention<paper_policies>(other_chunks, rope(d))), "another shape");
  attention_config other_budget = config;
  other_budget.budget_chunks = 5;
  expect(from_other(attention<paper_policies>(other_budget, rope(d))), "another configuration");
  expect(from_other(attention<paper_policies>(config, rope(d, 500000.0))), "another RoPE");
  expect(from_other(attention<rotated_paper_policies>(config, rope(d))), "other policies");
  attention_config bf16 = config;
  bf16.kv_storage = kv_precision::bf16;
  expect(from_other(attention<paper_policies>(bf16, rope(d))), "another shape");
  CHECK(cases >= 8);
  CHECK_THROWS_WITH_AS(load_cache(std::filesystem::path("/nonexistent/longheads.lhkv"), layer), doctest::Contains("cannot open"), file_error);
}

TEST_CASE("int8 cache files: a scale that makes a value non-finite or larger than the inputs allow is refused") {
  const int hq = 4, hkv = 2, d = 16, w = 16, prompt = 150;
  attention_config config = test::make_config(hq, hkv, d, w, 4);
  config.kv_storage = kv_precision::int8;
  attention<paper_policies> layer(config, rope(d));
  const test::sequence seq(prompt, hq, hkv, d, 19);
  kv_cache cache = layer.make_cache();
  std::vector<float> out(static_cast<std::size_t>(prompt) * hq * d);
  layer.prefill(cache, seq.qv(0, prompt), seq.kv(0, prompt), seq.vv(0, prompt), {out.data(), prompt, hq, d});
  const std::string good = saved(layer, cache);
  REQUIRE(loaded(good, layer) == cache);

  // Keys: ceil(150 / 16) chunks of [H_kv][w][d] bytes, then a bf16 scale per 16 of them.
  std::uint64_t meta_bytes, keys_bytes;
  std::memcpy(&meta_bytes, good.data() + 24, 8);
  const std::size_t keys_size_at = 32 + meta_bytes + 8, keys_at = keys_size_at + 8;
  std::memcpy(&keys_bytes, good.data() + keys_size_at, 8);
  const std::size_t elements = 10 * hkv * w * d;
  REQUIRE(keys_bytes == elements + elements / 16 * 2);
  auto with_scale = [&](std::size_t block, bf16 scale) {
    std::string b = good;
    std::memcpy(b.data() + keys_at + elements + 2 * block, &scale, 2);
    const std::uint64_t h = detail::xxh64::of(b.data() + keys_at, keys_bytes);
    std::memcpy(b.data() + keys_at + keys_bytes, &h, 8);
    return b;
  };
  auto refused = [&](const std::string& bytes, const char* says) {
    CAPTURE(says);
    CHECK_THROWS_WITH_AS(loaded(bytes, layer), doctest::Contains(says), file_error);
  };
  refused(with_scale(7, 0x7fc0), "non-finite value");                                  // NaN
  refused(with_scale(7, 0x7f80), "non-finite value");                                  // infinity
  refused(with_scale(7, to_bf16(1e30f)), "larger than this layer's inputs can make");  // 127 * 1e30
  refused(with_scale(7, to_bf16(-1.0f)), "non-finite value");                          // a negative scale
  // A scale the inputs could make loads.
  CHECK(loaded(with_scale(7, to_bf16(0.5f)), layer).tokens() == prompt);
  // An int8 file is not a bf16 or fp32 layer's.
  for (kv_precision other : {kv_precision::fp32, kv_precision::bf16}) {
    attention_config c = config;
    c.kv_storage = other;
    attention<paper_policies> other_layer(c, rope(d));
    CHECK_THROWS_WITH_AS(loaded(good, other_layer), doctest::Contains("another shape"), file_error);
  }
}

namespace {

/// Whether `bytes` hold a row of d values `marker` as `precision` stores it (fp32 or bf16
/// copies, or int8 elements of 127: a row of one value quantizes to its block's maximum).
bool holds_marker_row(const std::string& bytes, kv_precision precision, float marker, int d) {
  std::string row;
  for (int i = 0; i < d; ++i) {
    if (precision == kv_precision::fp32) row.append(reinterpret_cast<const char*>(&marker), 4);
    else if (precision == kv_precision::bf16) {
      const bf16 half = to_bf16(marker);
      row.append(reinterpret_cast<const char*>(&half), 2);
    } else row.push_back(static_cast<char>(127));
  }
  return bytes.find(row) != std::string::npos;
}

/// A record's parts: its meta block without the query buffers' rows (the held list), and its five sections.
struct record {
  std::string meta_without_held;
  std::array<std::string, 5> sections;
};
template <class Policies>
record record_parts(const std::string& b, const attention<Policies>& layer) {
  record r;
  std::uint64_t n;
  std::memcpy(&n, b.data() + 24, 8);
  const std::string meta = b.substr(32, n);
  detail::meta_writer layer_part;
  detail::write_layer(layer_part, layer.shape(), layer.config(), layer.rotary(), policy_identity<Policies>());
  const std::size_t held_at = layer_part.data().size() + 16, held_bytes = 16 * static_cast<std::size_t>(layer.shape().query_chunks());
  r.meta_without_held = meta.substr(0, held_at) + meta.substr(held_at + held_bytes);
  std::size_t at = 32 + n + 8;
  for (auto& section : r.sections) {
    std::memcpy(&n, b.data() + at, 8);
    section = b.substr(at + 8, n);
    at += 16 + n;
  }
  return r;
}

/// Random append / truncate / append sequences on one layer: tokens appended and then rolled
/// back carry a marker (every value row the constant 7); after each sequence the cache must be
/// == a fresh cache fed only the kept tokens (in other call sizes), its file must be byte for
/// byte the fresh cache's, and the marker must appear nowhere in it.
template <class Policies>
void check_rollback_leaves_no_trace(const std::string& name, const attention_config& config, typename attention<Policies>::policy_set policies,
                                    int trials, int& cases) {
  CAPTURE(name);
  const int hq = config.n_q_heads, hkv = config.n_kv_heads, d = config.head_dim, w = config.chunk_size, T = 112;
  const float marker = 7.0f;
  attention<Policies> layer(config, rope(d), policies);
  const test::sequence kept(T, hq, hkv, d, 5100), removed(T, hq, hkv, d, 5200);
  std::vector<float> marked_values(removed.v.size(), marker), marked_queries(removed.q.size(), marker + 1), marked_keys(removed.k.size(), marker + 2);
  std::mt19937 rng(static_cast<std::uint32_t>(std::hash<std::string>{}(name)));
  std::vector<float> out(static_cast<std::size_t>(T) * hq * d);
  auto feed = [&](kv_cache& cache, bool marked, int from, int to) {  // positions [from, to), random call sizes
    for (int t = from; t < to;) {
      const int n = std::min<int>(to - t, 1 + static_cast<int>(rng() % 11));
      const test::sequence& s = marked ? removed : kept;
      auto marked_rows = [&](const std::vector<float>& rows, int heads) {
        return tensor_view<const float>{rows.data() + static_cast<std::ptrdiff_t>(t) * heads * d, n, heads, d};
      };
      if (marked) layer.prefill(cache, marked_rows(marked_queries, hq), marked_rows(marked_keys, hkv), marked_rows(marked_values, hkv), {out.data(), n, hq, d});
      else layer.prefill(cache, s.qv(t, n), s.kv(t, n), s.vv(t, n), {out.data(), n, hq, d});
      t += n;
    }
  };
  int kept_finished = 0, same_ring = 0;
  for (int trial = 0; trial < trials; ++trial) {
    kv_cache cache = layer.make_cache();
    int tokens = 0;
    const int steps = 1 + static_cast<int>(rng() % 4);
    for (int step = 0; step < steps && tokens < T - 40; ++step) {
      const int more = static_cast<int>(rng() % 24);  // kept tokens, then marked ones that are rolled back
      feed(cache, false, tokens, tokens + more);
      tokens += more;
      const int marked = 1 + static_cast<int>(rng() % 30);
      feed(cache, true, tokens, tokens + marked);
      if (step == 0 && trial == 0) REQUIRE(holds_marker_row(saved(layer, cache), config.kv_storage, marker, d));  // the check can see it
      // Back to the last kept token where the cache allows it, else to the chunk boundary before.
      const int target = tokens >= cache.rewindable_from() ? tokens : tokens / w * w;
      cache.truncate(target);
      tokens = target;
      ++cases;
    }
    feed(cache, false, tokens, tokens + 1 + static_cast<int>(rng() % 24));
    tokens = static_cast<int>(cache.tokens());
    kv_cache fresh = layer.make_cache();
    feed(fresh, false, 0, tokens);
    const std::string file = saved(layer, cache), fresh_file = saved(layer, fresh);
    CHECK_FALSE(holds_marker_row(file, config.kv_storage, marker, d));
    for (int offset = 0; offset < w && config.kv_storage == kv_precision::fp32; ++offset)
      for (const auto& [rows, heads] : {std::pair{&marked_queries, hq}, std::pair{&marked_keys, hkv}}) {
        std::vector<float> rotated(static_cast<std::size_t>(d));
        layer.rotary().rotate(rows->data(), rotated.data(), offset);  // a marked query or key as the cache stores it
        CHECK(file.find(std::string(reinterpret_cast<const char*>(rotated.data()), rotated.size() * 4)) == std::string::npos);
      }
    // A spread encoding kept finished by a truncation (its queries were no longer held) where
    // the fresh cache is still encoding that chunk: the one difference == sees (kv_cache::truncate).
    const auto finished = [](const kv_cache& c) { return c.full_chunks() > c.summarised_chunks() && c.pending_pieces_done() >= c.spread_total(); };
    if (finished(cache) && !finished(fresh)) {  // then the keys and values are still the fresh cache's, byte for byte
      ++kept_finished;
      const record a = record_parts(file, layer), b = record_parts(fresh_file, layer);
      CHECK(a.sections[0] == b.sections[0]);
      CHECK(a.sections[1] == b.sections[1]);
      continue;
    }
    CHECK(cache == fresh);
    // The file: byte for byte the fresh cache's, but for the ring of kept query chunks (a
    // truncated cache holds fewer of the older ones: the removed tokens took their places).
    const record a = record_parts(file, layer), b = record_parts(fresh_file, layer);
    CHECK(a.meta_without_held == b.meta_without_held);
    for (int i : {0, 1, 2, 4}) CHECK(a.sections[static_cast<std::size_t>(i)] == b.sections[static_cast<std::size_t>(i)]);
    if (a.sections[3] == b.sections[3]) ++same_ring;
    CHECK(cache.rewindable_from() >= fresh.rewindable_from());  // holds no query chunk the fresh cache does not
    for (std::int64_t chunk = cache.rewindable_from() / w; chunk * w < tokens && config.method == attention_method::longheads; ++chunk)
      for (int h = 0; h < hq && cache.shape().keeps_open_queries; ++h)
        for (std::int64_t row = 0; row < std::min<std::int64_t>(w, tokens - chunk * w); ++row)
          CHECK(std::equal(cache.chunk_queries(chunk, h).row(row), cache.chunk_queries(chunk, h).row(row) + d, fresh.chunk_queries(chunk, h).row(row)));
    if (trial % 4 == 0) {  // clear() forgets everything: == a new cache, and the same file
      cache.clear();
      const kv_cache empty = layer.make_cache();
      CHECK(cache == empty);
      CHECK(saved(layer, cache) == saved(layer, empty));
    }
  }
  MESSAGE(name << ": " << trials << " sequences, " << kept_finished << " ending with a spread encoding kept finished, " << same_ring
               << " with the fresh cache's query ring");
  CHECK(trials - kept_finished >= trials / 2);  // most sequences compared whole
}

}  // namespace

TEST_CASE("rolled-back tokens leave no trace: == a fresh run and the fresh run's file bytes, every policy set and storage") {
  const int hq = 4, hkv = 2, d = 16, w = 16, trials = 16;
  int cases = 0;
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    attention_config c = test::make_config(hq, hkv, d, w, 4);
    c.kv_storage = storage;
    const std::string kv = std::string(" ") + to_string(storage);
    check_rollback_leaves_no_trace<paper_policies>("paper, spread" + kv, c, {}, trials, cases);
    attention_config eager = c;
    eager.spread_encoding = false;
    check_rollback_leaves_no_trace<paper_policies>("paper, at completion" + kv, eager, {}, trials, cases);
    attention_config keeping = c;
    keeping.rollback_chunks = 2;
    check_rollback_leaves_no_trace<paper_policies>("paper, rollback_chunks 2" + kv, keeping, {}, trials, cases);
    check_rollback_leaves_no_trace<quest_policies>("quest" + kv, c, {}, trials, cases);
    check_rollback_leaves_no_trace<quest_beam_policies>("quest, beam index" + kv, c, {.index = {.branching = 2, .scan_below = 0}}, trials, cases);
    check_rollback_leaves_no_trace<quest_cluster_policies>("quest, key clusters" + kv, c,
                                                           {.index = {.segment_chunks = 3, .clusters = 2, .probe_min = 2, .exact_below = 0}}, trials, cases);
    check_rollback_leaves_no_trace<group_policies>("quest, group max" + kv, c, {}, trials, cases);
    check_rollback_leaves_no_trace<representative_policies>("representative keys" + kv, c, {}, trials, cases);
    attention_config dense = c;
    dense.method = attention_method::dense;
    check_rollback_leaves_no_trace<paper_policies>("dense" + kv, dense, {}, trials, cases);
  }
  MESSAGE(cases << " rollbacks");
  CHECK(cases >= 500);
}
