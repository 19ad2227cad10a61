// SPDX-License-Identifier: MIT
// longheads_bench: decode and prefill of one attention layer at real model shapes, each
// component alone, and probes of this machine's memory bandwidth and FMA peak, so every report
// can state the fraction of the machine's limits reached in the same run.
//
//   longheads_bench                       # the full suite (minutes; ~9 GB peak with the 128k caches)
//   longheads_bench --smoke               # tiny sizes, one repetition (the ctest entry adds --rounds=2)
//   longheads_bench --small-pages         # caches, probe and prefill buffers on 4 KB pages (default: huge pages)
//   longheads_bench --rounds=3            # each group of compared benchmarks 3 times, interleaved (register_all)
//   longheads_bench --benchmark_filter=decode --benchmark_format=json
//
// Names: <phase>/<method>/<shape>/<context>/threads:<n>, e.g. decode/longheads/llama3_8b/131072/threads:2.
#include <benchmark/benchmark.h>

#include <longheads/longheads.hpp>

#include "counters.hpp"
#include "../examples/common/huge_pages.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory_resource>
#include <memory>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <typeinfo>
#include <vector>
#include <xsimd/xsimd.hpp>

namespace {

using namespace longheads;

struct model_shape {
  const char* name;
  int n_q_heads, n_kv_heads, head_dim;
};
constexpr model_shape llama2_7b{"llama2_7b", 32, 32, 128};
constexpr model_shape llama3_8b{"llama3_8b", 32, 8, 128};
constexpr model_shape prefill_shape{"h8_kv8_d128", 8, 8, 128};

bool smoke = false;  // --smoke: tiny sizes so the executable cannot rot (ctest runs it)
bool small_pages = false;  // --small-pages: caches, probe and prefill buffers from new/delete, on 4 KB pages
int group_rounds = 1;  // --rounds=N: each group's benchmarks N times, interleaved (register_all)

/// Where caches, probe buffers and prefill activations live: the same memory for all, so the
/// probes measure what the kernels read from.
std::pmr::memory_resource* bench_memory() {
  static tools::huge_page_resource huge_pages;
  return small_pages ? std::pmr::new_delete_resource() : &huge_pages;
}

struct threaded : paper_policies {
  using executor = thread_pool_executor;
};

/// A kv group's heads pick one set of chunks together (the largest score per chunk): the
/// decode step then reads budget_chunks chunks per kv head at any length, which separates what
/// the per-head picks cost in bytes from what the implementation costs (longheads-shared).
struct threaded_group_max : threaded {
  using group_selection = group_max_selection;
};

/// Quest's bounds scored for every full chunk (the flat scan), and the same found through the
/// cache's index by the beam search (bound_tree_beam): the scale rows compare the two.
struct threaded_quest : threaded {
  using encoder = key_bounds_encoder;
  using scorer = bound_scorer;
};
struct threaded_quest_beam : threaded_quest {
  using index = bound_tree_beam;
};
/// ... and through the cache's key-space clusters (key_cluster_index, its defaults).
struct threaded_quest_clusters : threaded_quest {
  using index = key_cluster_index;
};

/// A pool of random floats; blocks are windows into it at varying offsets (cheap "random" data).
const std::vector<float>& noise() {
  static const std::vector<float> pool = [] {
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> x(1 << 23);
    for (float& e : x) e = dist(rng);
    return x;
  }();
  return pool;
}
const float* noise_at(std::size_t offset, std::size_t count) {
  const auto& pool = noise();
  if (count >= pool.size() / 2) throw std::logic_error("noise_at: block too large for the noise pool");
  return pool.data() + (offset * 7919) % (pool.size() - count);
}

attention_config config_for(const model_shape& s, attention_method method, int chunk_size, int chunks,
                            kv_precision storage = kv_precision::fp32, bool spread_encoding = true) {
  attention_config c;
  c.spread_encoding = spread_encoding;
  c.kv_storage = storage;
  c.n_q_heads = s.n_q_heads;
  c.n_kv_heads = s.n_kv_heads;
  c.head_dim = s.head_dim;
  c.chunk_size = chunk_size;
  c.budget_chunks = chunks;
  c.method = method;
  c.reject_nonfinite = false;  // the benchmark's inputs are finite; measure the attention, not the scan
  return c;
}

/// Tokens of room past the context for the timed steps of one decode run, each of which
/// appends one (a run of 0.5 s takes under 1000 steps even at 8k; beyond the room the cache
/// grows, as an engine's would). Every run starts from the context again (kv_cache::truncate).
constexpr std::int64_t decode_room = 4096;

/// A cache holding `context` tokens, built with ingest() in blocks by an attention of policies P
/// (chunks of w, budget k), and kept while the benchmarks of its group (context, method,
/// storage, policies, chunking; every shape) run, which the registration keeps together (the
/// 128k fp32 caches of both shapes take ~7 GB; a 1M bf16 Llama-3 cache 4 GB).
template <class P = threaded>
kv_cache& filled_cache(const model_shape& s, attention_method method, std::int64_t context, kv_precision storage, int w = 256, int k = 16,
                       bool spread = true) {
  // The resource first: function-local statics are destroyed in reverse order of construction,
  // so the caches then give their blocks back before the resource goes (a filtered run that
  // reached no probe used to construct it second and crash at exit).
  std::pmr::memory_resource* memory = bench_memory();
  // context, method, storage, shape, policies, w, spread encoding (both kept: their rows compare)
  using key = std::tuple<std::int64_t, int, int, std::string, std::string, int, bool>;
  static std::map<key, std::unique_ptr<kv_cache>> caches;
  const key wanted{context, static_cast<int>(method), static_cast<int>(storage), s.name, typeid(P).name(), w, spread};
  std::erase_if(caches, [&](const auto& entry) {
    const key& e = entry.first;
    return std::get<0>(e) != context || std::get<1>(e) != std::get<1>(wanted) || std::get<2>(e) != std::get<2>(wanted) ||
           std::get<4>(e) != std::get<4>(wanted) || std::get<5>(e) != w;
  });
  auto& slot = caches[wanted];
  if (slot) return *slot;
  attention<P> a(config_for(s, method, w, k, storage, spread), rope(s.head_dim, 500000.0), {.executor = thread_pool_executor(0)});
  slot = std::make_unique<kv_cache>(a.make_cache(context + decode_room, memory));
  const std::int64_t block = 256;
  for (std::int64_t first = 0; first < context; first += block) {
    const std::int64_t n = std::min(block, context - first);
    const auto q_floats = static_cast<std::size_t>(n * s.n_q_heads * s.head_dim), kv_floats = static_cast<std::size_t>(n * s.n_kv_heads * s.head_dim);
    a.ingest(*slot, {noise_at(first, q_floats), n, s.n_q_heads, s.head_dim}, {noise_at(first + 1, kv_floats), n, s.n_kv_heads, s.head_dim},
             {noise_at(first + 2, kv_floats), n, s.n_kv_heads, s.head_dim});
  }
  return *slot;
}

/// The read probe's loop: a vectorised sum of n floats, four independent accumulators.
float read_sum(const float* p, std::size_t n) {
  using batch = xsimd::batch<float>;
  batch a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  for (std::size_t i = 0; i + 4 * batch::size <= n; i += 4 * batch::size) {
    a0 += batch::load_unaligned(p + i);
    a1 += batch::load_unaligned(p + i + batch::size);
    a2 += batch::load_unaligned(p + i + 2 * batch::size);
    a3 += batch::load_unaligned(p + i + 3 * batch::size);
  }
  return longheads::detail::reduce_add(a0 + a1 + a2 + a3);
}

/// The read probe over a cache's own K/V bytes (fp32, every full chunk of every kv head, in
/// address order, split between `threads` threads like the probe), GB/s over three passes. On
/// this VM the read rate depends on where a buffer lands: 512 MB pieces of one allocation read
/// at 16-31 GB/s, each piece at its own rate pass after pass, so a probe of a buffer elsewhere
/// can be luckier or unluckier than the cache.
double same_memory_read_rate(const kv_cache& cache, unsigned threads) {
  const cache_shape& shape = cache.shape();
  const auto floats = static_cast<std::size_t>(cache.full_chunks()) * static_cast<std::size_t>(shape.n_kv_heads) *
                      static_cast<std::size_t>(shape.chunk_size) * static_cast<std::size_t>(shape.head_dim);
  constexpr int passes = 3;
  auto read_part = [&](unsigned part) {
    const std::size_t begin = floats * part / threads, end = floats * (part + 1) / threads;
    for (int pass = 0; pass < passes; ++pass) {
      benchmark::DoNotOptimize(read_sum(cache.keys(0, 0) + begin, end - begin));  // chunk-major: one block from chunk 0
      benchmark::DoNotOptimize(read_sum(cache.values(0, 0) + begin, end - begin));
    }
  };
  const auto start = std::chrono::steady_clock::now();
  {
    std::vector<std::jthread> helpers;
    for (unsigned part = 1; part < threads; ++part) helpers.emplace_back(read_part, part);
    read_part(0);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return passes * 2.0 * static_cast<double>(floats) * sizeof(float) / seconds / 1e9;
}

// ------------------------------------------------------------------------------------ decode

/// What an index's choice lost against the flat scan's for the last step's query (pre-RoPE `q`,
/// every head's), over every fourth head (selection_fidelity.hpp): recall@k, attention-mass
/// recall and output difference, as counters. On these benchmark caches the keys are noise (iid).
template <class Policies>
void report_fidelity(benchmark::State& state, const attention<Policies>& a, const kv_cache& cache, const float* q) {
  const attention_config& c = a.config();
  const std::int64_t position = cache.tokens() - 1, own = position / c.chunk_size, first = c.sink_chunks, end = own - c.local_chunks + 1;
  if (end <= first) return;
  const auto wanted = static_cast<std::size_t>(c.budget_chunks - c.sink_chunks - c.local_chunks);
  std::vector<double> recall, mass, difference;
  std::vector<float> rotated(static_cast<std::size_t>(c.head_dim));
  std::vector<std::int32_t> flat;
  for (int h = 0; h < c.n_q_heads; h += 4) {
    const float* query = q + static_cast<std::ptrdiff_t>(h) * c.head_dim;
    a.rotary().rotate(query, rotated.data(), position % c.chunk_size + c.chunk_size);  // as bound_scorer places it
    // The flat scan: every candidate's bound score, best first, ties to the lower chunk, NaN last.
    const auto summaries = cache.representations(h);
    auto score = [&](std::int32_t chunk) {
      const float x = detail::bound_dot(rotated.data(), summaries.row(chunk), summaries.row(chunk) + c.head_dim, c.head_dim);
      return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
    };
    flat.resize(static_cast<std::size_t>(end - first));
    std::iota(flat.begin(), flat.end(), static_cast<std::int32_t>(first));
    std::stable_sort(flat.begin(), flat.end(), [&](std::int32_t x, std::int32_t y) { return score(x) > score(y); });
    const std::size_t n = std::min(wanted, flat.size());
    std::vector<std::int32_t> chosen;
    for (std::int32_t chunk : cache.last_selection(h))
      if (chunk >= first && chunk < end) chosen.push_back(chunk);
    const choice_fidelity f = measure_choice(cache, a.rotary(), c, {h, position, query, first, end, 1}, std::span<const std::int32_t>(flat).first(n), chosen);
    recall.push_back(f.recall);
    mass.push_back(f.mass_recall);
    difference.push_back(f.output_difference);
  }
  auto at = [](std::vector<double> x, double quantile) {
    std::sort(x.begin(), x.end());
    return x[std::min(x.size() - 1, static_cast<std::size_t>(quantile * static_cast<double>(x.size())))];
  };
  state.counters["fidelity_recall_med"] = at(recall, 0.5);
  state.counters["fidelity_mass_recall_med"] = at(mass, 0.5);
  state.counters["fidelity_mass_recall_p10"] = at(mass, 0.1);
  state.counters["fidelity_output_diff_med"] = at(difference, 0.5);
}

template <class Policies = threaded, int w = 256, int chunks = 16, bool spread = true>
void decode(benchmark::State& state, model_shape s, attention_method method, std::int64_t context, unsigned threads,
            kv_precision storage) {
  kv_cache& cache = filled_cache<Policies>(s, method, context, storage, w, chunks, spread);
  // The steps of earlier runs on this cache appended tokens: at 8k the rounds' steps would
  // otherwise grow the context by half before the last run.
  cache.truncate(context);
  attention<Policies> a(config_for(s, method, w, chunks, storage, spread), rope(s.head_dim, 500000.0), {.executor = thread_pool_executor(threads)});
  a.reserve(context + decode_room, 1);
  const auto hq = static_cast<std::size_t>(s.n_q_heads * s.head_dim), hkv = static_cast<std::size_t>(s.n_kv_heads * s.head_dim);
  std::vector<float> out(hq);
  // Each step's own time, for p50/p99/max, and the chunk-completion steps' (encoding at
  // completion, they encode the chunk for every head); a ring of the last steps, allocated
  // before timing. Going back to the context restarts the spread encoding of the chunk before
  // it (kv_cache::truncate), so every w steps carry one chunk's pieces, as decoding does.
  std::vector<double> step_us(1 << 16);
  std::vector<double> completion_us;
  completion_us.reserve(1 << 12);
  std::int64_t step = 0;
  auto one_step = [&] {
    // Back to the stated context every w steps: the steps cycle through one chunk, so the
    // context stays within w tokens of the stated one and every w steps hold one completion.
    if (cache.tokens() == context + w) cache.truncate(context);
    const bool completes = (cache.tokens() + 1) % w == 0;
    const auto start = std::chrono::steady_clock::now();
    a.decode(cache, {noise_at(step, hq), 1, s.n_q_heads, s.head_dim}, {noise_at(step + 1, hkv), 1, s.n_kv_heads, s.head_dim},
             {noise_at(step + 2, hkv), 1, s.n_kv_heads, s.head_dim}, {out.data(), 1, s.n_q_heads, s.head_dim});
    benchmark::DoNotOptimize(out.data());
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    step_us[static_cast<std::size_t>(step) % step_us.size()] = us;
    if (completes && completion_us.size() < completion_us.capacity()) completion_us.push_back(us);
    ++step;
  };
  // One step untimed: a run's attention object is new, and its first step touches its scratch
  // for the first time (page faults: 2-3x a step, once per object, not per token).
  one_step();
  step = 0;
  completion_us.clear();
  if (method == attention_method::longheads) {
    // LongHeads' timed steps cover whole chunks (iterations in batches of w), so the mean
    // weighs the completion step as decoding does: once every w tokens.
    while (state.KeepRunningBatch(w))
      for (int i = 0; i < w; ++i) one_step();
  } else {
    // Dense steps cost the same at a chunk's end (nothing is encoded); a whole chunk of 128k
    // dense steps would take 13 s a run.
    for (auto _ : state) one_step();
  }
  auto percentile = [](std::vector<double> x, double q) {
    if (x.empty()) return 0.0;
    const auto at = static_cast<std::ptrdiff_t>(q * static_cast<double>(x.size() - 1) + 0.5);
    std::nth_element(x.begin(), x.begin() + at, x.end());
    return x[static_cast<std::size_t>(at)];
  };
  step_us.resize(std::min<std::size_t>(step_us.size(), static_cast<std::size_t>(step)));
  state.counters["step_p50_us"] = percentile(step_us, 0.5);
  state.counters["step_p99_us"] = percentile(step_us, 0.99);
  state.counters["step_max_us"] = step_us.empty() ? 0.0 : *std::max_element(step_us.begin(), step_us.end());
  state.counters["completion_steps"] = static_cast<double>(completion_us.size());
  state.counters["completion_step_us"] = percentile(completion_us, 0.5);
  // K/V bytes the kernel reads per step, from the last step's choices: each chunk is read once
  // for all heads of its kv group that chose it (dense: every chunk once per group), the last
  // query's own chunk only up to the query, plus LongHeads' scoring pass over every head's
  // chunk representations.
  const double kv_row = 2.0 * static_cast<double>(storage == kv_precision::int8 ? int8_storage_bytes(static_cast<std::size_t>(s.head_dim), s.head_dim)
                                                                                 : static_cast<std::size_t>(s.head_dim) * kv_element_bytes(storage));
  const int group = s.n_q_heads / s.n_kv_heads;
  const std::int64_t query_chunk = (cache.tokens() - 1) / w;
  double rows_read = 0;
  for (int g = 0; g < s.n_kv_heads; ++g) {
    std::set<std::int32_t> chunks_of_group;
    for (int h = g * group; h < (g + 1) * group; ++h)
      for (std::int32_t c : cache.last_selection(h)) chunks_of_group.insert(c);
    for (std::int32_t c : chunks_of_group) rows_read += static_cast<double>(c == query_chunk ? cache.tokens() - c * std::int64_t{w} : w);
  }
  double bytes = rows_read * kv_row;
  if (method == attention_method::longheads && !policy_bundle<Policies>::index_type::indexed)  // an index reads a part (index_reads)
    bytes += static_cast<double>(cache.shape().summary_heads()) * static_cast<double>(cache.full_chunks()) *  // per kv head when
             static_cast<double>(cache.shape().representation_floats) * sizeof(float);  // shared: its heads score one after another
  // What the cache holds per token of its capacity, by kind (kv_cache::bytes_by_kind).
  const kv_cache::memory_use held = cache.bytes_by_kind();
  const auto per_token = [&](std::size_t b) { return static_cast<double>(b) / static_cast<double>(cache.capacity_tokens()); };
  state.counters["kv_bytes/token"] = per_token(held.keys + held.values);
  state.counters["summary_bytes/token"] = per_token(held.representations);
  state.counters["index_bytes/token"] = per_token(held.index);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(step), benchmark::Counter::kIsRate);
  state.counters["kv_bytes/step"] = bytes;
  state.counters["GB/s"] = benchmark::Counter(bytes * static_cast<double>(step) / 1e9, benchmark::Counter::kIsRate);
  if (method == attention_method::dense && storage == kv_precision::fp32) state.counters["same_memory_read_GB/s"] = same_memory_read_rate(cache, threads);
  if constexpr (policy_bundle<Policies>::index_type::indexed)
    if (method == attention_method::longheads && step > 0) report_fidelity(state, a, cache, noise_at(static_cast<std::size_t>(step - 1), hq));
}

/// Sorts `step_us` (each step's µs) and reports its p50, p99 and max as counters.
void report_step_latency(benchmark::State& state, std::vector<double>& step_us) {
  std::sort(step_us.begin(), step_us.end());
  auto at_quantile = [&](double q) { return step_us.empty() ? 0.0 : step_us[static_cast<std::size_t>(q * static_cast<double>(step_us.size() - 1) + 0.5)]; };
  state.counters["step_p50_us"] = at_quantile(0.5);
  state.counters["step_p99_us"] = at_quantile(0.99);
  state.counters["step_max_us"] = step_us.empty() ? 0.0 : step_us.back();
}

/// One kv head's key clusters at the default layout (S 2048, C 64, 8 iterations, d 128) fed
/// S + S / 8 chunks of random summaries, each append timed: `delay` 0 clusters the segment in
/// the append that completes it (the spike), -1 over the S / 8 appends after it (the default).
void component_key_clusters(benchmark::State& state, int delay) {
  constexpr int d = 128, segment = 2048, clusters = 64;
  const std::int64_t chunks = segment + segment / 8;
  std::vector<float> summaries(static_cast<std::size_t>(chunks * 2 * d));
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (std::int64_t c = 0; c < chunks; ++c)
    for (int i = 0; i < d; ++i) {
      const float a = normal(rng), b = normal(rng);
      summaries[static_cast<std::size_t>(c * 2 * d + i)] = std::min(a, b);
      summaries[static_cast<std::size_t>(c * 2 * d + d + i)] = std::max(a, b);
    }
  std::vector<double> append_us;
  for (auto _ : state) {
    key_clusters index(d, segment, clusters, 8, delay);
    index.reserve(chunks);
    for (std::int64_t c = 0; c < chunks; ++c) {
      const auto start = std::chrono::steady_clock::now();
      index.append({summaries.data(), c + 1, 2 * d});
      append_us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
    }
    benchmark::DoNotOptimize(index.segments());
    if (index.segments() != 1) state.SkipWithError("the segment was not clustered");
  }
  report_step_latency(state, append_us);
}

// ------------------------------------------------------------------------------ batch decode
/// The engine shape of the batch rows: a small model's layer, many sequences at once.
constexpr model_shape batch_shape{"h8_kv8_d64", 8, 8, 64};
constexpr int batch_w = 64, batch_chunks = 16;
constexpr int batch_max_sequences = 16;

/// Sequences of `context` tokens for the batch rows, built once with ingest() (each from its
/// own window of the noise), kept for every row of that context. Sequence i starts i * w / 16
/// tokens short of the context, so the sequences complete their chunks in different steps.
std::vector<kv_cache>& batch_caches(std::int64_t context) {
  std::pmr::memory_resource* memory = bench_memory();
  static std::map<std::int64_t, std::vector<kv_cache>> all;
  auto& caches = all[context];
  if (!caches.empty()) return caches;
  const model_shape& s = batch_shape;
  attention<threaded_quest_beam> a(config_for(s, attention_method::longheads, batch_w, batch_chunks, kv_precision::bf16), rope(s.head_dim, 500000.0),
                                   {.executor = thread_pool_executor(0)});
  for (int i = 0; i < batch_max_sequences; ++i) {
    caches.push_back(a.make_cache(context + batch_w, memory));
    const std::int64_t start = context - i * batch_w / batch_max_sequences;
    for (std::int64_t first = 0; first < start; first += 256) {
      const std::int64_t n = std::min<std::int64_t>(256, start - first);
      const auto q_floats = static_cast<std::size_t>(n * s.n_q_heads * s.head_dim), kv_floats = static_cast<std::size_t>(n * s.n_kv_heads * s.head_dim);
      const std::size_t at = static_cast<std::size_t>(first) + static_cast<std::size_t>(i) * 1000003;
      a.ingest(caches.back(), {noise_at(at, q_floats), n, s.n_q_heads, s.head_dim}, {noise_at(at + 1, kv_floats), n, s.n_kv_heads, s.head_dim},
               {noise_at(at + 2, kv_floats), n, s.n_kv_heads, s.head_dim});
    }
  }
  return caches;
}

/// decode/batch: each step decodes one token of each of `sequences` sequences in one batched
/// call (attention::decode over sequence_calls); decode/separate: the same steps as one call
/// per sequence. The recommended policies (Quest bounds through the beam index), bf16 K/V.
/// tokens/s counts every sequence's token; sequence_token_us is a step's time per sequence.
void decode_batch(benchmark::State& state, std::int64_t context, int sequences, unsigned threads, bool batched) {
  const model_shape& s = batch_shape;
  std::vector<kv_cache>& caches = batch_caches(context);
  std::vector<std::int64_t> start(static_cast<std::size_t>(sequences));
  for (int i = 0; i < sequences; ++i) {
    caches[static_cast<std::size_t>(i)].truncate(context - i * batch_w / batch_max_sequences);
    start[static_cast<std::size_t>(i)] = caches[static_cast<std::size_t>(i)].tokens();
  }
  attention<threaded_quest_beam> a(config_for(s, attention_method::longheads, batch_w, batch_chunks, kv_precision::bf16), rope(s.head_dim, 500000.0),
                                   {.executor = thread_pool_executor(threads)});
  a.reserve(context + batch_w, 1, static_cast<std::size_t>(sequences));
  const auto hq = static_cast<std::size_t>(s.n_q_heads * s.head_dim), hkv = static_cast<std::size_t>(s.n_kv_heads * s.head_dim);
  std::vector<float> out(hq * static_cast<std::size_t>(sequences));
  std::vector<sequence_call> batch(static_cast<std::size_t>(sequences));
  std::vector<double> step_us(1 << 16);
  std::int64_t step = 0;
  auto one_step = [&] {
    for (int i = 0; i < sequences; ++i) {
      kv_cache& cache = caches[static_cast<std::size_t>(i)];
      if (cache.tokens() == start[static_cast<std::size_t>(i)] + batch_w) cache.truncate(start[static_cast<std::size_t>(i)]);  // a chunk a cycle
      const std::size_t at = static_cast<std::size_t>(step) * 3 + static_cast<std::size_t>(i) * 7777;
      batch[static_cast<std::size_t>(i)] = {&cache, {noise_at(at, hq), 1, s.n_q_heads, s.head_dim}, {noise_at(at + 1, hkv), 1, s.n_kv_heads, s.head_dim},
                                            {noise_at(at + 2, hkv), 1, s.n_kv_heads, s.head_dim}, {out.data() + hq * static_cast<std::size_t>(i), 1, s.n_q_heads, s.head_dim}};
    }
    const auto begin = std::chrono::steady_clock::now();
    if (batched) a.decode(batch);
    else
      for (const sequence_call& c : batch) a.decode(*c.cache, c.q, c.k, c.v, c.out);
    benchmark::DoNotOptimize(out.data());
    step_us[static_cast<std::size_t>(step) % step_us.size()] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - begin).count();
    ++step;
  };
  one_step();  // untimed: the new attention object's scratch is touched for the first time
  step = 0;
  for (auto _ : state) one_step();
  step_us.resize(std::min<std::size_t>(step_us.size(), static_cast<std::size_t>(step)));
  report_step_latency(state, step_us);
  state.counters["sequences"] = sequences;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(step) * sequences, benchmark::Counter::kIsRate);
  state.counters["sequence_token_us"] = step_us.empty() ? 0.0 : std::accumulate(step_us.begin(), step_us.end(), 0.0) / static_cast<double>(step_us.size()) / sequences;
}

// ------------------------------------------------------------------------------ shard decode
/// shard/decode: a decode step through shard.hpp's block functions (ingest, offer_candidates,
/// choose_from_offers, attend_chosen, merge_attended) on one shard holding the whole context:
/// a rank's own work in a one-rank job, without the transport. Beside attention::decode over
/// the same cache (decode/longheads-quest-bf16-at-completion: shards encode chunks at
/// completion), it shows what the split path costs and how a rank's work scales with threads.
/// Quest bounds by the flat scan (exact at any number of shards), bf16 K/V, w 256, k 16.
void shard_decode(benchmark::State& state, model_shape s, std::int64_t context, unsigned threads) {
  constexpr int w = 256, chunks = 16;
  constexpr kv_precision storage = kv_precision::bf16;
  kv_cache& cache = filled_cache<threaded_quest>(s, attention_method::longheads, context, storage, w, chunks, false);
  cache.truncate(context);
  attention<threaded_quest> a(config_for(s, attention_method::longheads, w, chunks, storage, false), rope(s.head_dim, 500000.0),
                              {.executor = thread_pool_executor(threads)});
  const cache_shard shard = make_shard(cache, 0);
  const int hq = s.n_q_heads, d = s.head_dim;
  const std::size_t wanted = offered_per_head(a.config());
  shard_scratch scratch;
  scratch.reserve(a, (context + w) / w, 1);
  std::vector<chunk_candidate> offers(static_cast<std::size_t>(hq) * wanted), pool;
  pool.reserve(wanted);
  std::vector<std::int32_t> counts(static_cast<std::size_t>(hq)), chosen(static_cast<std::size_t>(hq * chunks));
  std::vector<softmax_state> states(static_cast<std::size_t>(hq));
  std::vector<float> partial(static_cast<std::size_t>(hq * d)), out(static_cast<std::size_t>(hq * d));
  const auto q_floats = static_cast<std::size_t>(hq * d), kv_floats = static_cast<std::size_t>(s.n_kv_heads * d);
  const std::span<const chunk_candidate> offer_views[1] = {offers};
  const std::span<const std::int32_t> count_views[1] = {counts};
  const std::span<const softmax_state> state_views[1] = {states};
  const tensor_view<const float> partial_views[1] = {{partial.data(), 1, hq, d}};
  std::vector<double> step_us(1 << 16);
  std::int64_t step = 0;
  auto one_step = [&] {
    if (cache.tokens() == context + w) cache.truncate(context);  // a chunk a cycle, as the decode rows
    const std::int64_t position = cache.tokens();
    const tensor_view<const float> q(noise_at(static_cast<std::size_t>(step), q_floats), 1, hq, d);
    const auto start = std::chrono::steady_clock::now();
    a.ingest(cache, q, {noise_at(static_cast<std::size_t>(step) + 1, kv_floats), 1, s.n_kv_heads, d},
             {noise_at(static_cast<std::size_t>(step) + 2, kv_floats), 1, s.n_kv_heads, d});
    offer_candidates(a, shard, q, position, offers, counts, scratch);
    choose_from_offers(a, position, 1, offer_views, count_views, chosen, pool);
    attend_chosen(a, shard, q, position, chosen, states, {partial.data(), 1, hq, d}, scratch);
    merge_attended(a, state_views, partial_views, {out.data(), 1, hq, d});
    benchmark::DoNotOptimize(out.data());
    step_us[static_cast<std::size_t>(step) % step_us.size()] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    ++step;
  };
  one_step();  // untimed: the scratch's first touch
  step = 0;
  while (state.KeepRunningBatch(w))
    for (int i = 0; i < w; ++i) one_step();
  step_us.resize(std::min<std::size_t>(step_us.size(), static_cast<std::size_t>(step)));
  report_step_latency(state, step_us);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(step), benchmark::Counter::kIsRate);
}

// ----------------------------------------------------------------------------------- prefill
void prefill(benchmark::State& state, model_shape s, attention_method method, std::int64_t tokens, unsigned threads) {
  const int w = 64, chunks = 8;
  attention<threaded> a(config_for(s, method, w, chunks), rope(s.head_dim, 500000.0), {.executor = thread_pool_executor(threads)});
  const auto hq = static_cast<std::size_t>(s.n_q_heads * s.head_dim), hkv = static_cast<std::size_t>(s.n_kv_heads * s.head_dim);
  // The host's activations come from the same memory as the caches: on this VM, plain vectors
  // (4 KB pages, 16 bytes off a line) under [T, H, d] rows, a block's rows of one head 4 KB
  // apart, made LongHeads prefill 16k 1.2-1.3x slower (1.20-1.30 vs 1.01 s; dense 6.9 vs 6.4 s).
  std::pmr::vector<float> q(static_cast<std::size_t>(tokens) * hq, bench_memory()), k(static_cast<std::size_t>(tokens) * hkv, bench_memory()),
      v(k.size(), bench_memory()), out(q.size(), bench_memory());
  for (std::size_t i = 0; i < q.size(); i += 4096) std::copy_n(noise_at(i, 4096), std::min<std::size_t>(4096, q.size() - i), q.begin() + static_cast<std::ptrdiff_t>(i));
  for (std::size_t i = 0; i < k.size(); i += 4096) {
    std::copy_n(noise_at(i + 3, 4096), std::min<std::size_t>(4096, k.size() - i), k.begin() + static_cast<std::ptrdiff_t>(i));
    std::copy_n(noise_at(i + 5, 4096), std::min<std::size_t>(4096, k.size() - i), v.begin() + static_cast<std::ptrdiff_t>(i));
  }
  a.reserve(tokens, tokens);
  for (auto _ : state) {
    state.PauseTiming();
    kv_cache cache = a.make_cache(tokens, bench_memory());
    state.ResumeTiming();
    a.prefill(cache, {q.data(), tokens, s.n_q_heads, s.head_dim}, {k.data(), tokens, s.n_kv_heads, s.head_dim},
              {v.data(), tokens, s.n_kv_heads, s.head_dim}, {out.data(), tokens, s.n_q_heads, s.head_dim});
    benchmark::DoNotOptimize(out.data());
  }
  // Attention flops (QK and PV, 2 flops per multiply-add) over the keys each query reads
  // (bench::keys_read), plus LongHeads' scoring and chunk encoding.
  double keys = 0;
  for (std::int64_t p = 0; p < tokens; ++p) keys += static_cast<double>(bench::keys_read(method, p, w, chunks));
  double flops = 4.0 * s.head_dim * keys * s.n_q_heads;
  if (method == attention_method::longheads) {
    const double full_chunks = static_cast<double>(tokens / w);
    flops += s.n_q_heads * (2.0 * s.head_dim * static_cast<double>(tokens) * full_chunks / 2  // scores
                            + full_chunks * 2.0 * w * w * s.head_dim);                        // encoder's Q K^T
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// -------------------------------------------------------------------------------- components
template <class Encoder>
void component_encode(benchmark::State& state, int w, int d) {
  attention_config cfg = config_for({"", 1, 1, d}, attention_method::longheads, w, 16);
  const Encoder encoder{};
  std::vector<float> rep(encoder.representation_floats(cfg)), scratch(encoder.scratch_floats(cfg));
  const std::size_t n = static_cast<std::size_t>(w) * d;
  const chunk_inputs in{{noise_at(0, n), w, d}, {noise_at(1, n), w, d}, {noise_at(2, n), w, d}, 0.1f};
  for (auto _ : state) {
    encoder.encode(in, rep, scratch);
    benchmark::DoNotOptimize(rep.data());
  }
  state.counters["chunks/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void component_score(benchmark::State& state, int queries, int chunks, int d) {
  std::vector<float> scores(static_cast<std::size_t>(queries) * chunks);
  const matrix_view<const float> q(noise_at(0, static_cast<std::size_t>(queries) * d), queries, d);
  const matrix_view<const float> reps(noise_at(1, static_cast<std::size_t>(chunks) * d), chunks, d);
  for (auto _ : state) {
    matmul_nt(q, reps, {scores.data(), queries, chunks});
    benchmark::DoNotOptimize(scores.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * queries * chunks * d * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void component_select(benchmark::State& state, int chunks, int budget) {
  std::vector<float> scores(noise_at(3, static_cast<std::size_t>(chunks)), noise_at(3, static_cast<std::size_t>(chunks)) + chunks);
  std::vector<std::int32_t> selected(static_cast<std::size_t>(budget)), scratch(static_cast<std::size_t>(chunks));
  const selection_request request{chunks, budget, 1, 2};
  for (auto _ : state) benchmark::DoNotOptimize(sink_local_topk_selector{}.select(request, scores, selected, scratch));
  state.counters["selections/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

template <class Kernel>
void component_kernel(benchmark::State& state, int segments, int w, int d) {
  // Chunks laid out as in the cache, read in place.
  std::vector<float> keys(static_cast<std::size_t>(segments) * w * d), values(keys.size()), out(static_cast<std::size_t>(d));
  std::copy_n(noise_at(0, keys.size()), keys.size(), keys.begin());
  std::copy_n(noise_at(9, keys.size()), keys.size(), values.begin());
  std::vector<kv_segment> segs;
  for (int s = 0; s < segments; ++s)
    segs.push_back({noise_at(static_cast<std::size_t>(s), static_cast<std::size_t>(d)), keys.data() + static_cast<std::ptrdiff_t>(s) * w * d,
                    values.data() + static_cast<std::ptrdiff_t>(s) * w * d, w});
  const Kernel kernel{};
  std::vector<float> scratch(kernel.scratch_floats(w, d));
  for (auto _ : state) {
    kernel.attend(segs, d, 0.088f, out.data(), scratch);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = 2.0 * segments * w * d * sizeof(float);
  state.counters["GB/s"] = benchmark::Counter(bytes * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// ------------------------------------------------------------------------------------ probes
/// Read bandwidth: a vectorised sum over a buffer far larger than the caches, per thread.
void probe_read_bandwidth(benchmark::State& state, std::size_t bytes_per_thread) {
  std::pmr::vector<float> data(bytes_per_thread / sizeof(float), 1.0f, bench_memory());
  for (auto _ : state) benchmark::DoNotOptimize(read_sum(data.data(), data.size()));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(bytes_per_thread) * static_cast<double>(state.iterations()) / 1e9,
                                              benchmark::Counter::kIsRate);
}

/// STREAM triad a = b + s c, per thread; counts the 3 arrays' bytes.
void probe_triad(benchmark::State& state, std::size_t bytes_per_array) {
  const std::size_t n = bytes_per_array / sizeof(float);
  std::pmr::vector<float> a(n, 0.0f, bench_memory()), b(n, 1.0f, bench_memory()), c(n, 2.0f, bench_memory());
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) a[i] = b[i] + 3.0f * c[i];
    benchmark::DoNotOptimize(a.data());
  }
  state.counters["GB/s"] =
      benchmark::Counter(3.0 * static_cast<double>(bytes_per_array) * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

/// FMA peak: independent FMA chains in registers, per thread.
void probe_fma_peak(benchmark::State& state) {
  using batch = xsimd::batch<float>;
  constexpr int chains = 12, rounds = 4096;
  for (auto _ : state) {
    batch acc[chains];
    for (int j = 0; j < chains; ++j) acc[j] = batch(static_cast<float>(j));
    const batch x(0.999f), y(0.001f);
    for (int r = 0; r < rounds; ++r)
      for (int j = 0; j < chains; ++j) acc[j] = xsimd::fma(acc[j], x, y);
    for (int j = 0; j < chains; ++j) benchmark::DoNotOptimize(acc[j]);
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * chains * rounds * batch::size * static_cast<double>(state.iterations()) / 1e9,
                                                 benchmark::Counter::kIsRate);
}

/// Registers the suite in groups whose benchmarks are compared with each other: decode by
/// context, storage and method (both shapes, so one group's caches are built once and kept),
/// prefill by length, the components. With --rounds=N each group runs N times over, its
/// benchmarks one after another in each round, so the two sides of a ratio are measured
/// seconds apart rather than minutes (this VM's memory rate drifts 10-30% over minutes; with
/// --benchmark_repetitions a benchmark's repetitions run back to back instead). The read and
/// triad probes run in the rounds of the group the read-rate target compares them with: dense
/// fp32 decode at the longest context.
void register_all() {
  const std::vector<std::int64_t> decode_contexts = smoke ? std::vector<std::int64_t>{2048} : std::vector<std::int64_t>{8192, 32768, 131072};
  const std::vector<std::int64_t> prefill_tokens = smoke ? std::vector<std::int64_t>{1024} : std::vector<std::int64_t>{4096, 16384, 32768};
  const std::vector<unsigned> thread_counts = {1, 2};
  const std::size_t probe_bytes = smoke ? (std::size_t{1} << 20) : (std::size_t{1} << 29);
  auto in_rounds = [](auto&& register_group) {
    for (int round = 0; round < group_rounds; ++round) register_group();
  };
  in_rounds([&] {
    for (unsigned t : thread_counts) benchmark::RegisterBenchmark("probe/fma_peak", probe_fma_peak)->Threads(static_cast<int>(t))->UseRealTime();
  });
  // Method names: dense, longheads, with bf16 K/V dense-bf16, longheads-bf16 (int8: -int8), for the GQA
  // shape longheads-shared (group_max_selection, which reads the longheads fp32 caches), and
  // longheads-bf16-at-completion (spread_encoding off) beside longheads-bf16 at the longest context.
  auto register_decode = [&](const std::string& method, const model_shape& s, std::int64_t ctx, unsigned t, auto run, attention_method m,
                             kv_precision storage) {
    benchmark::RegisterBenchmark(("decode/" + method + "/" + s.name + "/" + std::to_string(ctx) + "/threads:" + std::to_string(t)).c_str(),
                                 run, s, m, ctx, t, storage)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  for (std::int64_t ctx : decode_contexts)
    for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8})
      for (attention_method m : {attention_method::dense, attention_method::longheads})
        in_rounds([&] {
          if (ctx == decode_contexts.back() && storage == kv_precision::fp32 && m == attention_method::dense)
            for (unsigned t : thread_counts) {
              benchmark::RegisterBenchmark("probe/read_bandwidth", probe_read_bandwidth, probe_bytes / t)->Threads(static_cast<int>(t))->UseRealTime();
              benchmark::RegisterBenchmark("probe/triad", probe_triad, probe_bytes / 4 / t)->Threads(static_cast<int>(t))->UseRealTime();
            }
          const std::string method = std::string(to_string(m)) + (storage == kv_precision::fp32 ? "" : std::string("-") + to_string(storage));
          for (const model_shape& s : {llama2_7b, llama3_8b})
            for (unsigned t : thread_counts) register_decode(method, s, ctx, t, decode<threaded>, m, storage);
          if (storage == kv_precision::fp32 && m == attention_method::longheads)
            for (unsigned t : thread_counts)
              register_decode("longheads-shared", llama3_8b, ctx, t, decode<threaded_group_max>, attention_method::longheads, kv_precision::fp32);
          // The paper's encoder as it was before spreading: every head's encoding in the step
          // that completes a chunk (its p99 and max beside the spread rows' of the same run).
          if (storage == kv_precision::bf16 && m == attention_method::longheads && ctx == decode_contexts.back())
            for (const model_shape& s : {llama2_7b, llama3_8b})
              register_decode("longheads-bf16-at-completion", s, ctx, 1, decode<threaded, 256, 16, false>, m, storage);
        });
  // Scale: a decode step at 8k to 1M tokens, Llama-3 shape, bf16 K/V, Quest by flat scan and
  // by the beam index, at w 256 k 16 and at w 64 k 64 (small chunks: many summaries per token).
  const std::vector<std::int64_t> scale_contexts = smoke ? std::vector<std::int64_t>{2048} : std::vector<std::int64_t>{8192, 131072, 1048576};
  for (std::int64_t ctx : scale_contexts)
    in_rounds([&] {
      register_decode("longheads-quest-bf16", llama3_8b, ctx, 1, decode<threaded_quest>, attention_method::longheads, kv_precision::bf16);
      register_decode("longheads-quest-beam-bf16", llama3_8b, ctx, 1, decode<threaded_quest_beam>, attention_method::longheads, kv_precision::bf16);
      register_decode("longheads-quest-beam-int8", llama3_8b, ctx, 1, decode<threaded_quest_beam>, attention_method::longheads, kv_precision::int8);
      register_decode("longheads-quest-bf16-w64k64", llama3_8b, ctx, 1, decode<threaded_quest, 64, 64>, attention_method::longheads,
                      kv_precision::bf16);
      register_decode("longheads-quest-beam-bf16-w64k64", llama3_8b, ctx, 1, decode<threaded_quest_beam, 64, 64>, attention_method::longheads,
                      kv_precision::bf16);
      register_decode("longheads-quest-clusters-bf16", llama3_8b, ctx, 1, decode<threaded_quest_clusters>, attention_method::longheads,
                      kv_precision::bf16);
      register_decode("longheads-quest-clusters-bf16-w64k64", llama3_8b, ctx, 1, decode<threaded_quest_clusters, 64, 64>,
                      attention_method::longheads, kv_precision::bf16);
    });
  // A rank's step through the shard block functions beside attention::decode on the same cache.
  const std::int64_t shard_context = smoke ? 2048 : 131072;
  in_rounds([&] {
    for (unsigned t : thread_counts) {
      register_decode("longheads-quest-bf16-at-completion", llama3_8b, shard_context, t, decode<threaded_quest, 256, 16, false>,
                      attention_method::longheads, kv_precision::bf16);
      benchmark::RegisterBenchmark(("shard/decode/quest-bf16/" + std::string(llama3_8b.name) + "/" + std::to_string(shard_context) +
                                    "/threads:" + std::to_string(t)).c_str(),
                                   shard_decode, llama3_8b, shard_context, t)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  });
  // Batches: B sequences of a small model's layer decoded in one call, and 16 in separate calls.
  const std::int64_t batch_context = smoke ? 1024 : 4096;
  in_rounds([&] {
    for (unsigned t : thread_counts) {
      for (int b : {1, 4, batch_max_sequences})
        benchmark::RegisterBenchmark(("decode/batch/" + std::string(batch_shape.name) + "/" + std::to_string(batch_context) + "/sequences:" +
                                      std::to_string(b) + "/threads:" + std::to_string(t)).c_str(),
                                     decode_batch, batch_context, b, t, true)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("decode/separate/" + std::string(batch_shape.name) + "/" + std::to_string(batch_context) + "/sequences:" +
                                    std::to_string(batch_max_sequences) + "/threads:" + std::to_string(t)).c_str(),
                                   decode_batch, batch_context, batch_max_sequences, t, false)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  });
  for (std::int64_t n : prefill_tokens)
    in_rounds([&] {
      for (attention_method m : {attention_method::dense, attention_method::longheads})
        for (unsigned t : thread_counts)
          benchmark::RegisterBenchmark(("prefill/" + std::string(to_string(m)) + "/" + prefill_shape.name + "/" + std::to_string(n) + "/threads:" + std::to_string(t)).c_str(),
                                       prefill, prefill_shape, m, n, t)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond)
              ->Iterations(1);
    });
  in_rounds([&] {
    benchmark::RegisterBenchmark("component/encode/attention_pooled/w256_d128", component_encode<attention_pooled_encoder>, 256, 128);
    benchmark::RegisterBenchmark("component/encode/key_bounds/w256_d128", component_encode<key_bounds_encoder>, 256, 128);
    benchmark::RegisterBenchmark("component/score/q64_d128/512", component_score, 64, 512, 128);
    benchmark::RegisterBenchmark("component/select/k16/512", component_select, 512, 16);
    // A 2048-chunk segment's k-means at once (0) or spread over the next 256 chunks (-1): the
    // append's p50 / p99 / max (docs/performance.md).
    benchmark::RegisterBenchmark("component/key_clusters/at_once/S2048_C64_d128", component_key_clusters, 0)->Iterations(2)->UseRealTime();
    benchmark::RegisterBenchmark("component/key_clusters/spread/S2048_C64_d128", component_key_clusters, -1)->Iterations(2)->UseRealTime();
    benchmark::RegisterBenchmark("component/kernel/xsimd/k16_w256_d128", component_kernel<online_softmax_kernel>, 16, 256, 128);
    benchmark::RegisterBenchmark("component/kernel/scalar/k16_w256_d128", component_kernel<scalar_online_softmax_kernel>, 16, 256, 128);
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
      continue;
    }
    if (std::strcmp(argv[i], "--small-pages") == 0) {
      small_pages = true;
      continue;
    }
    if (std::strncmp(argv[i], "--rounds=", 9) == 0) {
      char* end = nullptr;
      const long n = std::strtol(argv[i] + 9, &end, 10);
      if (end == argv[i] + 9 || *end != '\0' || n < 1 || n > 100) {
        std::fprintf(stderr, "longheads_bench: --rounds wants a whole number from 1 to 100, got '%s'\n", argv[i] + 9);
        return 1;
      }
      group_rounds = static_cast<int>(n);
      continue;
    }
    args.push_back(argv[i]);
  }
  int n = static_cast<int>(args.size());
  std::string min_time = "--benchmark_min_time=0.01";
  if (smoke) {
    args.push_back(min_time.data());
    ++n;
  }
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
