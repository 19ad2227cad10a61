// Decode must not allocate once warmed up: counts every operator new while a window is open.
// A separate executable, because it replaces the global allocation functions.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <longheads/longheads.hpp>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <optional>
#include <vector>

#include "test_support.hpp"

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
std::atomic<std::size_t> allocated_bytes{0}, largest_allocation{0};  // while counting

void count(std::size_t n) {
  if (!counting.load(std::memory_order_relaxed)) return;
  allocations.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(n, std::memory_order_relaxed);
  for (std::size_t largest = largest_allocation.load(); n > largest && !largest_allocation.compare_exchange_weak(largest, n);) {
  }
}

void* counted(std::size_t n) {
  count(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted(n); }
void* operator new[](std::size_t n) { return counted(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
// Over-aligned allocations (std::pmr, aligned storage) are counted too.
void* operator new(std::size_t n, std::align_val_t a) {
  count(n);
  const auto alignment = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(alignment, (std::max<std::size_t>(n, 1) + alignment - 1) / alignment * alignment)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {
using namespace longheads;

struct pooled : paper_policies {
  using executor = thread_pool_executor;
};
struct quest_index : paper_policies {
  using encoder = key_bounds_encoder;
  using scorer = bound_scorer;
  using index = bound_tree_index;
};
struct quest_beam : quest_index {
  using index = bound_tree_beam;
};
struct quest_clusters : quest_index {
  using index = key_cluster_index;
};
/// Segments of 3 chunks in 2 clusters, searched from the first candidates on: the decodes below
/// seal segments (a k-means each) and a block of 8 of them (its sections, at chunk 24) and probe them.
const attention<quest_clusters>::policy_set small_clusters{.index = {.segment_chunks = 3, .clusters = 2, .iterations = 3, .probe_share = 0.0f,
                                                                      .probe_min = 3, .exact_below = 0}};
struct pooled_quest_group : pooled {
  using encoder = key_bounds_encoder;
  using scorer = bound_scorer;
  using group_selection = group_max_selection;
};

/// How the host prepares the cache and the scratch before decoding: every public way.
enum class preparation {
  make_cache_reserved,     // attention::make_cache(n) + attention::reserve(n, prompt)
  cache_reserve,           // kv_cache(shape) + kv_cache::reserve(n) + attention::reserve(n, prompt) (examples/llama2c)
  copy_of_reserved,        // a copy of a reserved cache
  truncated,               // a reserved cache that held more tokens, truncated back
};

/// Decodes `steps` tokens after a prefill and one warm-up step; returns the allocations made
/// while decoding.
template <class Policies>
long allocations_while_decoding(attention_method method, typename attention<Policies>::policy_set policies = {},
                                kv_precision storage = kv_precision::fp32, preparation how = preparation::make_cache_reserved) {
  const int hq = 8, hkv = 2, d = 32, w = 16, budget = 4, prompt = 300, steps = 200;
  const test::sequence seq(prompt + steps, hq, hkv, d, 77);
  attention_config config = test::make_config(hq, hkv, d, w, budget, method);
  config.kv_storage = storage;
  attention<Policies> a(config, rope(d), std::move(policies));
  a.reserve(prompt + steps, prompt);
  std::vector<float> out(static_cast<std::size_t>(prompt + steps) * hq * d);
  auto feed = [&](kv_cache& cache, int first, int count) {
    a.prefill(cache, seq.qv(first, count), seq.kv(first, count), seq.vv(first, count),
              {out.data() + static_cast<std::ptrdiff_t>(first) * hq * d, count, hq, d});
  };
  kv_cache cache(a.shape());
  switch (how) {
    case preparation::make_cache_reserved: cache = a.make_cache(prompt + steps); break;
    case preparation::cache_reserve: cache.reserve(prompt + steps); break;
    case preparation::copy_of_reserved: {
      const kv_cache reserved = a.make_cache(prompt + steps);
      cache = reserved;
      break;
    }
    case preparation::truncated:
      cache = a.make_cache(prompt + steps);
      feed(cache, 0, prompt + steps);
      cache.truncate(0);
      break;
  }
  feed(cache, 0, prompt - 1);
  feed(cache, prompt - 1, 1);  // warm-up decode
  allocations = 0;
  counting = true;
  for (int t = prompt; t < prompt + steps; ++t) feed(cache, t, 1);  // crosses 12 chunk boundaries (encoding)
  counting = false;
  return allocations.load();
}
}  // namespace

TEST_CASE("decode after reserve and one warm-up step allocates nothing") {
  CHECK(allocations_while_decoding<paper_policies>(attention_method::longheads) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::dense) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::sink_window) == 0);
  CHECK(allocations_while_decoding<pooled>(attention_method::longheads, {.executor = thread_pool_executor(2)}) == 0);
  CHECK(allocations_while_decoding<pooled_quest_group>(attention_method::longheads, {.executor = thread_pool_executor(2)}) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::longheads, {}, kv_precision::bf16) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::dense, {}, kv_precision::bf16) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::longheads, {}, kv_precision::int8) == 0);
  CHECK(allocations_while_decoding<paper_policies>(attention_method::dense, {}, kv_precision::int8) == 0);
}

TEST_CASE("every public way of preparing a cache gives allocation-free decode (review finding 3)") {
  for (preparation how : {preparation::cache_reserve, preparation::copy_of_reserved, preparation::truncated})
    for (attention_method method : {attention_method::longheads, attention_method::dense, attention_method::sink_window}) {
      CAPTURE(static_cast<int>(how));
      CAPTURE(to_string(method));
      CHECK(allocations_while_decoding<paper_policies>(method, {}, kv_precision::fp32, how) == 0);
      CHECK(allocations_while_decoding<pooled>(method, {.executor = thread_pool_executor(2)}, kv_precision::bf16, how) == 0);
      CHECK(allocations_while_decoding<pooled>(method, {.executor = thread_pool_executor(2)}, kv_precision::int8, how) == 0);
    }
  // The selection index grows its boxes as chunks complete: within the reserved length, in place.
  for (preparation how : {preparation::make_cache_reserved, preparation::cache_reserve, preparation::copy_of_reserved, preparation::truncated}) {
    CAPTURE(static_cast<int>(how));
    CHECK(allocations_while_decoding<quest_index>(attention_method::longheads, {}, kv_precision::fp32, how) == 0);
    CHECK(allocations_while_decoding<quest_beam>(attention_method::longheads, {}, kv_precision::fp32, how) == 0);
    CHECK(allocations_while_decoding<quest_clusters>(attention_method::longheads, small_clusters, kv_precision::fp32, how) == 0);
  }
}

/// Batched decode of `sequences` sequences at different lengths after attention::reserve(n,
/// prompt, sequences) and one warm-up batch; returns the allocations made while decoding.
template <class Policies>
long allocations_while_decoding_batches(attention_method method, typename attention<Policies>::policy_set policies, int sequences) {
  const int hq = 8, hkv = 2, d = 32, w = 16, budget = 4, prompt = 300, steps = 100;
  attention<Policies> a(test::make_config(hq, hkv, d, w, budget, method), rope(d), std::move(policies));
  a.reserve(prompt + steps + sequences, prompt, static_cast<std::size_t>(sequences));
  std::vector<test::sequence> seqs;
  std::vector<kv_cache> caches;
  std::vector<float> out(static_cast<std::size_t>(prompt) * hq * d * static_cast<std::size_t>(sequences));
  for (int i = 0; i < sequences; ++i) {
    seqs.emplace_back(prompt + steps + sequences, hq, hkv, d, 90 + static_cast<std::uint32_t>(i));
    caches.push_back(a.make_cache(prompt + steps + sequences));
    const int length = prompt - 1 + i;  // the sequences complete their chunks in different steps
    a.prefill(caches.back(), seqs.back().qv(0, length), seqs.back().kv(0, length), seqs.back().vv(0, length), {out.data(), length, hq, d});
  }
  std::vector<sequence_call> batch(static_cast<std::size_t>(sequences));
  auto step = [&] {
    for (int i = 0; i < sequences; ++i) {
      const auto t = static_cast<int>(caches[static_cast<std::size_t>(i)].tokens());
      batch[static_cast<std::size_t>(i)] = {&caches[static_cast<std::size_t>(i)], seqs[static_cast<std::size_t>(i)].qv(t, 1),
                                            seqs[static_cast<std::size_t>(i)].kv(t, 1), seqs[static_cast<std::size_t>(i)].vv(t, 1),
                                            {out.data() + static_cast<std::ptrdiff_t>(i) * hq * d, 1, hq, d}};
    }
    a.decode(batch);
  };
  step();  // warm-up
  allocations = 0;
  counting = true;
  for (int t = 0; t < steps; ++t) step();  // crosses 6 chunk boundaries per sequence (encoding)
  counting = false;
  return allocations.load();
}

TEST_CASE("batched decode after reserve(context, block, sequences) allocates nothing") {
  for (attention_method method : {attention_method::longheads, attention_method::dense, attention_method::sink_window}) {
    CAPTURE(to_string(method));
    CHECK(allocations_while_decoding_batches<paper_policies>(method, {}, 4) == 0);
    CHECK(allocations_while_decoding_batches<pooled>(method, {.executor = thread_pool_executor(2)}, 1) == 0);
    CHECK(allocations_while_decoding_batches<pooled>(method, {.executor = thread_pool_executor(2)}, 5) == 0);
  }
  CHECK(allocations_while_decoding_batches<quest_beam>(attention_method::longheads, {}, 3) == 0);
  CHECK(allocations_while_decoding_batches<quest_clusters>(attention_method::longheads, small_clusters, 3) == 0);
}

/// A sequence over two shards (chunks 0-9, and the rest, to which the decoded tokens go),
/// decoded step by step through shard.hpp's block functions as a host drives them, after
/// attention::reserve, kv_cache reserves, shard_scratch::reserve and one warm-up step; returns
/// the allocations made while decoding. `via_store`: an index policy chooses through a
/// chunk_index_store fed the shards' new chunks (offer_from_store), reserved for the sequence.
template <class Policies>
long allocations_while_decoding_shards(typename attention<Policies>::policy_set policies, kv_precision storage, bool via_store = false) {
  const int hq = 8, hkv = 2, d = 32, w = 16, budget = 4, prompt = 300, steps = 100, split = 10 * w;
  attention_config config = test::make_config(hq, hkv, d, w, budget, attention_method::longheads);
  config.spread_encoding = false;  // shards encode at completion (make_shard)
  config.kv_storage = storage;
  attention<Policies> a(config, rope(d), std::move(policies));
  a.reserve(prompt + steps, prompt);
  const test::sequence seq(prompt + steps, hq, hkv, d, 79);
  kv_cache head = a.make_cache(split), tail = a.make_cache(prompt + steps - split);
  a.ingest(head, seq.qv(0, split), seq.kv(0, split), seq.vv(0, split));
  a.ingest(tail, seq.qv(split, prompt - split), seq.kv(split, prompt - split), seq.vv(split, prompt - split));
  const cache_shard shards[2] = {make_shard(head, 0), make_shard(tail, split / w)};
  const std::size_t wanted = offered_per_head(config);
  shard_scratch scratch[2];
  std::vector<chunk_candidate> offers[2], pool;
  std::vector<std::int32_t> counts[2];
  std::vector<softmax_state> states[2];
  std::vector<float> partial[2];
  for (int s = 0; s < 2; ++s) {
    scratch[s].reserve(a, (prompt + steps) / w + 1, 1);
    offers[s].resize(static_cast<std::size_t>(hq) * wanted);
    counts[s].resize(static_cast<std::size_t>(hq));
    states[s].resize(static_cast<std::size_t>(hq));
    partial[s].resize(static_cast<std::size_t>(hq * d));
  }
  pool.reserve(2 * wanted);
  std::vector<std::int32_t> chosen(static_cast<std::size_t>(hq * budget));
  std::vector<float> out(static_cast<std::size_t>(hq * d));
  const std::span<const chunk_candidate> offer_views[2] = {offers[0], offers[1]};
  const std::span<const std::int32_t> count_views[2] = {counts[0], counts[1]};
  const std::span<const softmax_state> state_views[2] = {states[0], states[1]};
  const tensor_view<const float> partial_views[2] = {{partial[0].data(), 1, hq, d}, {partial[1].data(), 1, hq, d}};
  std::optional<chunk_index_store> store;
  std::vector<float> rows;
  std::int64_t exported = 0;  // the tail's chunks in the store
  if constexpr (std::remove_cvref_t<decltype(a.policies().index)>::indexed)
    if (via_store) {
      store.emplace(a.shape());
      store->reserve((prompt + steps) / w + 1);
      rows.resize(static_cast<std::size_t>(head.summarised_chunks()) * store->chunk_floats());
      export_representations(head, 0, head.summarised_chunks(), rows);
      store->append(rows);
      rows.resize(static_cast<std::size_t>(tail.summarised_chunks()) * store->chunk_floats());
      export_representations(tail, 0, tail.summarised_chunks(), rows);
      store->append(rows);
      exported = tail.summarised_chunks();
      rows.reserve(store->chunk_floats());
      scratch[0].reserve_search(a, (prompt + steps) / w + 1);
    }
  auto step = [&](int t) {
    a.ingest(tail, seq.qv(t, 1), seq.kv(t, 1), seq.vv(t, 1));
    if constexpr (std::remove_cvref_t<decltype(a.policies().index)>::indexed)
      if (store) {
        rows.resize(static_cast<std::size_t>(tail.summarised_chunks() - exported) * store->chunk_floats());
        export_representations(tail, exported, tail.summarised_chunks(), rows);
        store->append(rows);
        exported = tail.summarised_chunks();
        offer_from_store(a, *store, seq.qv(t, 1), t, offers[0], counts[0], scratch[0]);
        choose_from_offers(a, t, 1, std::span(offer_views).first(1), std::span(count_views).first(1), chosen, pool);
      }
    if (!store) {
      for (int s = 0; s < 2; ++s) offer_candidates(a, shards[s], seq.qv(t, 1), t, offers[s], counts[s], scratch[s]);
      choose_from_offers(a, t, 1, offer_views, count_views, chosen, pool);
    }
    for (int s = 0; s < 2; ++s) attend_chosen(a, shards[s], seq.qv(t, 1), t, chosen, states[s], {partial[s].data(), 1, hq, d}, scratch[s]);
    merge_attended(a, state_views, partial_views, {out.data(), 1, hq, d});
  };
  step(prompt);  // warm-up
  allocations = 0;
  counting = true;
  for (int t = prompt + 1; t < prompt + steps; ++t) step(t);  // crosses 6 chunk boundaries (encoding)
  counting = false;
  return allocations.load();
}

TEST_CASE("a shard's decode steps through the block functions allocate nothing after shard_scratch::reserve") {
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    CAPTURE(to_string(storage));
    CHECK(allocations_while_decoding_shards<paper_policies>({}, storage) == 0);
    CHECK(allocations_while_decoding_shards<pooled>({.executor = thread_pool_executor(2)}, storage) == 0);
  }
  CHECK(allocations_while_decoding_shards<pooled_quest_group>({.executor = thread_pool_executor(2)}, kv_precision::fp32) == 0);
  CHECK(allocations_while_decoding_shards<quest_index>({}, kv_precision::fp32) == 0);
  CHECK(allocations_while_decoding_shards<quest_beam>({}, kv_precision::fp32) == 0);
  CHECK(allocations_while_decoding_shards<quest_beam>({}, kv_precision::fp32, true) == 0);    // through a chunk_index_store
  CHECK(allocations_while_decoding_shards<quest_index>({}, kv_precision::fp32, true) == 0);
  CHECK(allocations_while_decoding_shards<quest_clusters>(small_clusters, kv_precision::fp32, true) == 0);
  CHECK(allocations_while_decoding_shards<quest_clusters>(small_clusters, kv_precision::fp32) == 0);
}

TEST_CASE("the counter sees allocations (the test above can fail)") {
  allocations = 0;
  counting = true;
  auto* p = new std::vector<float>(100);
  counting = false;
  delete p;
  CHECK(allocations.load() == 2);
}

TEST_CASE("a forged cache record is refused before anything larger than the bytes that came is allocated") {
  // A record's claims (tokens, section sizes, the meta block's size) with every checksum right:
  // from a stream and from a file, each a file_error, and the load never allocates more at once
  // than the record's own bytes plus a block of 1 MiB (a stream is staged as it arrives).
  const int hq = 4, hkv = 2, d = 16, prompt = 150;
  attention<quest_index> layer(test::make_config(hq, hkv, d, 16, 4), rope(d));
  const test::sequence seq(prompt, hq, hkv, d, 21);
  kv_cache cache = layer.make_cache();
  std::vector<float> out(static_cast<std::size_t>(prompt) * hq * d);
  layer.prefill(cache, seq.qv(0, prompt), seq.kv(0, prompt), seq.vv(0, prompt), {out.data(), prompt, hq, d});
  std::ostringstream saved(std::ios::binary);
  save_cache(saved, layer, cache);
  const std::string good = saved.str();
  std::uint64_t meta_bytes;
  std::memcpy(&meta_bytes, good.data() + 24, 8);
  detail::meta_writer layer_part;
  detail::write_layer(layer_part, layer.shape(), layer.config(), layer.rotary(), policy_identity<quest_index>());
  const std::size_t tokens_at = 32 + layer_part.data().size(), keys_size_at = 32 + meta_bytes + 8;
  auto forged = [&](std::int64_t tokens, std::uint64_t keys_claim) {
    std::string b = good;
    std::memcpy(b.data() + tokens_at, &tokens, 8);
    const std::uint64_t h = detail::xxh64::of(b.data() + 32, meta_bytes);
    std::memcpy(b.data() + 32 + meta_bytes, &h, 8);
    if (keys_claim != 0) std::memcpy(b.data() + keys_size_at, &keys_claim, 8);
    return b;
  };
  const std::uint64_t huge_meta = std::uint64_t{1} << 32;
  std::string meta_claim = good;
  std::memcpy(meta_claim.data() + 24, &huge_meta, 8);
  const std::vector<std::pair<std::string, std::string>> records = {
      {"2^31 - 1 tokens, a keys section of 512 GiB", forged(max_sequence_tokens, std::uint64_t{549755813888})},
      {"2^31 - 1 tokens", forged(max_sequence_tokens, 0)},
      {"2^20 tokens, the keys section's size as they need", forged(std::int64_t{1} << 20, (std::uint64_t{1} << 20) * hkv * d * 4)},
      {"a meta block of 4 GiB", meta_claim},
      {"2^31 - 1 tokens, cut in the keys", forged(max_sequence_tokens, 0).substr(0, keys_size_at + 4000)},
  };
  const auto path = std::filesystem::temp_directory_path() / "longheads_forged.lhkv";
  for (const auto& [what, bytes] : records) {
    CAPTURE(what);
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    for (bool from_stream : {true, false}) {
      CAPTURE(from_stream);
      std::istringstream in(bytes, std::ios::binary);
      allocated_bytes = 0;
      largest_allocation = 0;
      bool refused = false;
      counting = true;
      try {
        if (from_stream) (void)load_cache(in, layer);
        else (void)load_cache(path, layer);
      } catch (const file_error&) {
        refused = true;
      }
      counting = false;
      CHECK(refused);
      CHECK(largest_allocation.load() <= bytes.size() + (std::size_t{1} << 20));
      CHECK(allocated_bytes.load() <= 3 * bytes.size() + (std::size_t{4} << 20));
      MESSAGE(what << std::string(from_stream ? " (stream)" : " (file)") << ": " << allocated_bytes.load() << " bytes allocated, largest "
                   << largest_allocation.load() << ", for a record of " << bytes.size());
    }
  }
  std::filesystem::remove(path);
  // The counter sees a load that is allowed to allocate: the good record's cache.
  std::istringstream in(good, std::ios::binary);
  allocated_bytes = 0;
  counting = true;
  const kv_cache loaded = load_cache(in, layer);
  counting = false;
  CHECK(loaded == cache);
  CHECK(allocated_bytes.load() >= good.size());
}
