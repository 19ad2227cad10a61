#include <doctest/doctest.h>

// GCC 12 inlines xsimd's exp into this file's direct kernel calls differently and reports its
// own avx512fintrin.h (`__Y = __Y`, GCC bug 105593) as -Wuninitialized; system code, not ours.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "test_support.hpp"

#include <longheads/longheads.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <vector>

using namespace longheads;

namespace {
/// The same policies on a thread pool.
template <class P>
struct pooled_policies : P {
  using executor = thread_pool_executor;
};
/// Whether two arrays of plain structs hold the same bytes.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
}  // namespace

TEST_CASE("shards: the merged candidates of P shards are the single-process selection, chunk for chunk") {
  // Random contexts, budgets and contiguous splits into P = 1..4 shards (some empty, some
  // holding no candidate); scores with ties, NaN and infinities. The selector's scored chunks
  // (between the sinks and the locals) must come out identical.
  std::mt19937 rng(2300);
  const sink_local_topk_selector selector;
  int cases = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int sinks = static_cast<int>(rng() % 3), locals = 1 + static_cast<int>(rng() % 3);
    const int budget = sinks + locals + 1 + static_cast<int>(rng() % 12);
    const std::int64_t query_chunk = budget + static_cast<std::int64_t>(rng() % 300);  // more chunks than the budget
    std::vector<float> scores(static_cast<std::size_t>(query_chunk));
    for (float& s : scores) {
      const unsigned kind = rng() % 20;
      s = kind == 0 ? std::numeric_limits<float>::quiet_NaN()
          : kind == 1 ? -std::numeric_limits<float>::infinity()
          : kind == 2 ? std::numeric_limits<float>::infinity()
                      : static_cast<float>(static_cast<int>(rng() % 16) - 8) * 0.25f;  // many ties
    }
    const selection_request request{query_chunk, budget, sinks, locals};
    std::vector<std::int32_t> selected(static_cast<std::size_t>(budget)), scratch(static_cast<std::size_t>(query_chunk));
    const std::size_t count = selector.select(request, scores, selected, scratch);
    const std::vector<std::int32_t> expected(selected.begin() + sinks, selected.begin() + static_cast<std::ptrdiff_t>(count) - locals);
    const auto wanted = static_cast<std::size_t>(budget - sinks - locals);
    const auto begin = static_cast<std::int32_t>(sinks), end = static_cast<std::int32_t>(query_chunk - locals + 1);

    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(trial);
      CAPTURE(shards);
      // Contiguous ranges at random boundaries over the chunks [0, query_chunk].
      std::vector<std::int32_t> bounds{0};
      for (int s = 1; s < shards; ++s) bounds.push_back(static_cast<std::int32_t>(rng() % static_cast<unsigned>(query_chunk + 1)));
      bounds.push_back(static_cast<std::int32_t>(query_chunk + 1));
      std::sort(bounds.begin(), bounds.end());
      std::vector<chunk_candidate> sent;
      for (int s = 0; s < shards; ++s) {
        const std::int32_t first = bounds[static_cast<std::size_t>(s)], last = bounds[static_cast<std::size_t>(s) + 1];
        // A shard holds its chunks' scores only (the query's own chunk has none: it is local).
        const std::int32_t scored_end = std::min<std::int32_t>(last, static_cast<std::int32_t>(query_chunk));
        const std::span<const float> mine(scores.data() + first, static_cast<std::size_t>(std::max(0, scored_end - first)));
        std::vector<chunk_candidate> best(wanted);
        const std::size_t n = shard_candidates(mine, first, begin, end, wanted, best);
        CHECK(n <= wanted);
        for (std::size_t i = 0; i < n; ++i) CHECK((best[i].chunk >= std::max(first, begin) && best[i].chunk < std::min(scored_end, end)));
        sent.insert(sent.end(), best.begin(), best.begin() + static_cast<std::ptrdiff_t>(n));
      }
      std::vector<std::int32_t> chosen(wanted);
      const std::size_t n = merge_candidates(sent, wanted, chosen);
      CHECK(std::vector<std::int32_t>(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(n)) == expected);
      ++cases;
    }
  }
  MESSAGE(cases << " sharded selections compared");
}

TEST_CASE("shards: partial softmax states merged in log-sum-exp form give the attention over all the segments") {
  // Segments of one query split over P shards, each streamed with begin/consume (no finish),
  // merged in shard order, then finished: against double-precision attention over every
  // segment, and against the kernel streaming them all in one state. Logits up to ~40 apart,
  // so the shards' running maxima differ by far more than exp's range in a naive sum.
  const online_softmax_kernel kernel{};
  std::uint32_t seed = 2310;
  for (int d : {8, 32, 128})
    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(d);
      CAPTURE(shards);
      const int segments = 7, length = 24, total = segments * length;
      const auto query = test::random_floats(static_cast<std::size_t>(d), seed++, 3.0f);
      const auto keys = test::random_floats(static_cast<std::size_t>(total * d), seed++, 3.0f);
      const auto values = test::random_floats(static_cast<std::size_t>(total * d), seed++);
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      std::vector<float> scratch(kernel.scratch_floats(length, d));

      // Reference in double.
      std::vector<double> logits(static_cast<std::size_t>(total)), expected(static_cast<std::size_t>(d), 0.0);
      double top = -1e300, denominator = 0, largest = 0;
      for (int j = 0; j < total; ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += double{query[static_cast<std::size_t>(i)]} * keys[static_cast<std::size_t>(j * d + i)];
        top = std::max(top, logits[static_cast<std::size_t>(j)] = dot * scale);
      }
      for (int j = 0; j < total; ++j) {
        const double p = std::exp(logits[static_cast<std::size_t>(j)] - top);
        denominator += p;
        for (int i = 0; i < d; ++i) expected[static_cast<std::size_t>(i)] += p * values[static_cast<std::size_t>(j * d + i)];
      }
      for (double& e : expected) largest = std::max(largest, std::abs(e /= denominator));

      auto consume_range = [&](int s0, int s1, softmax_state& state, float* out) {
        kernel.begin(state, out, d);
        for (int s = s0; s < s1; ++s)
          kernel.consume({query.data(), keys.data() + s * length * d, values.data() + s * length * d, length}, d, scale, state, out, scratch);
      };
      // One state over everything.
      softmax_state whole_state;
      std::vector<float> whole(static_cast<std::size_t>(d));
      consume_range(0, segments, whole_state, whole.data());
      kernel.finish(whole_state, whole.data(), d);

      // P shards of consecutive segments (the first shards may hold none), merged in order.
      softmax_state merged_state;
      std::vector<float> merged(static_cast<std::size_t>(d)), part(static_cast<std::size_t>(d));
      kernel.begin(merged_state, merged.data(), d);
      for (int s = 0; s < shards; ++s) {
        const int s0 = segments * s / shards, s1 = segments * (s + 1) / shards;
        softmax_state state;
        consume_range(s0, s1, state, part.data());
        merge_partial(merged_state, merged.data(), state, part.data(), d);
      }
      // An empty shard's state changes nothing, bit for bit.
      const std::vector<float> before = merged;
      const softmax_state before_state = merged_state;
      softmax_state empty;
      std::vector<float> empty_out(static_cast<std::size_t>(d));
      kernel.begin(empty, empty_out.data(), d);
      merge_partial(merged_state, merged.data(), empty, empty_out.data(), d);
      CHECK(merged == before);
      CHECK((merged_state.running_max == before_state.running_max && merged_state.denominator == before_state.denominator));
      kernel.finish(merged_state, merged.data(), d);

      // Against double precision the kernel's own fp32 rounding counts too: a logit of size x
      // carries about x * 2^-24 absolute error into its exp (up to 2.7e-6 of the largest output
      // here at -O1, logits ~40). The merge itself adds no more than 1e-6 to one state's result.
      double logit_size = 0;
      for (double l : logits) logit_size = std::max(logit_size, std::abs(l));
      for (int i = 0; i < d; ++i) {
        CHECK(std::abs(merged[static_cast<std::size_t>(i)] - expected[static_cast<std::size_t>(i)]) <= 1e-7 * (10 + logit_size) * largest);
        CHECK(std::abs(merged[static_cast<std::size_t>(i)] - whole[static_cast<std::size_t>(i)]) <= 1e-6 * largest);
      }
      if (shards == 1) CHECK(merged == whole);  // one shard: merging into an empty state is a copy
    }
}

TEST_CASE("shards: caches of contiguous chunk ranges choose the single-process chunks bitwise and attend within 1e-6 of it") {
  // One sequence prefilled in one cache, and ingested into P = 1..4 caches of contiguous chunk
  // ranges (random boundaries). For queries all along it, every head: the shards' merged
  // candidates (plus sinks and locals) are the chunks the single process selected, ==; the
  // shards' partial states merged and finished are its output within 1e-6 of the largest.
  const int w = 8, budget = 6, d = 32, hq = 4, hkv = 2, T = 300;
  const rope r(d);
  std::mt19937 rng(2320);
  struct quest_flat : paper_policies {  // Quest bounds, every chunk scored (the recommended policy scans flat)
    using encoder = key_bounds_encoder;
    using scorer = bound_scorer;
  };
  auto check = [&]<class Policies>(const char* policy_name, kv_precision storage) {
    CAPTURE(std::string(policy_name));
    CAPTURE(std::string(to_string(storage)));
    attention_config config = test::make_config(hq, hkv, d, w, budget);
    config.spread_encoding = false;
    config.kv_storage = storage;
    attention<Policies> a(config, r);
    const test::sequence seq(T, hq, hkv, d, 2330);
    auto whole = a.make_cache();
    std::vector<float> expected(static_cast<std::size_t>(T) * hq * d);
    std::vector<std::int32_t> selections(static_cast<std::size_t>(T) * hq * budget);
    a.prefill(whole, seq.qv(0, T), seq.kv(0, T), seq.vv(0, T), {expected.data(), T, hq, d}, selections);
    double largest = 0;
    for (float x : expected) largest = std::max(largest, static_cast<double>(std::abs(x)));

    const auto& policies = a.policies();
    const int chunks = (T + w - 1) / w;
    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(shards);
      std::vector<int> bounds{0};
      for (int s = 1; s < shards; ++s) bounds.push_back(static_cast<int>(rng() % static_cast<unsigned>(chunks + 1)));
      bounds.push_back(chunks);
      std::sort(bounds.begin(), bounds.end());
      std::vector<kv_cache> caches;
      std::vector<cache_shard> parts;
      caches.reserve(static_cast<std::size_t>(shards));
      for (int s = 0; s < shards; ++s) {
        caches.push_back(a.make_cache());
        const int first = bounds[static_cast<std::size_t>(s)] * w, end = std::min(T, bounds[static_cast<std::size_t>(s) + 1] * w);
        if (end > first) a.ingest(caches.back(), seq.qv(first, end - first), seq.kv(first, end - first), seq.vv(first, end - first));
        parts.push_back(make_shard(caches.back(), bounds[static_cast<std::size_t>(s)]));
      }
      std::vector<float> score_room(score_shard_floats(policies.scorer, config, chunks)), attend_room(attend_shard_floats(policies.kernel, config));
      std::vector<chunk_candidate> sent, best(static_cast<std::size_t>(budget));
      std::vector<std::int32_t> chosen(static_cast<std::size_t>(budget));
      std::vector<std::int64_t> slot_starts(static_cast<std::size_t>(budget));
      std::vector<float> merged(static_cast<std::size_t>(d)), part(static_cast<std::size_t>(d));
      double worst = 0;
      int compared = 0;
      for (int p = 0; p < T; p += 1 + static_cast<int>(rng() % 5))
        for (int h = 0; h < hq; ++h) {
          const float* query = seq.q.data() + (static_cast<std::size_t>(p) * hq + static_cast<std::size_t>(h)) * d;
          const std::int64_t i = p / w;
          std::size_t count = 0;
          if (i + 1 <= budget) {
            for (std::int32_t c = 0; c <= i; ++c) chosen[count++] = c;
          } else {
            for (int c = 0; c < config.sink_chunks; ++c) chosen[count++] = c;
            sent.clear();
            for (const cache_shard& shard : parts) {
              const std::size_t n = score_shard(policies.scorer, config, r, shard, query, h, p, score_room, best);
              sent.insert(sent.end(), best.begin(), best.begin() + static_cast<std::ptrdiff_t>(n));
            }
            count += merge_candidates(sent, static_cast<std::size_t>(budget - config.sink_chunks - config.local_chunks),
                                      std::span<std::int32_t>(chosen).subspan(count));
            for (std::int64_t c = i - config.local_chunks + 1; c <= i; ++c) chosen[count++] = static_cast<std::int32_t>(c);
          }
          const std::int32_t* row = selections.data() + (static_cast<std::size_t>(p) * hq + static_cast<std::size_t>(h)) * budget;
          CHECK(std::equal(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(count), row));
          const std::span<const std::int32_t> ids(chosen.data(), count);
          const std::int64_t position = policies.remapper.remap(ids, p, w, slot_starts);
          const chunk_choice choice{ids, std::span<const std::int64_t>(slot_starts.data(), count), position};
          softmax_state merged_state;
          policies.kernel.begin(merged_state, merged.data(), d);
          for (const cache_shard& shard : parts) {
            softmax_state state;
            attend_shard(policies.kernel, config, r, shard, query, h, p, choice, state, part.data(), attend_room);
            merge_partial(merged_state, merged.data(), state, part.data(), d);
          }
          policies.kernel.finish(merged_state, merged.data(), d);
          for (int e = 0; e < d; ++e)
            worst = std::max(worst, std::abs(double(merged[static_cast<std::size_t>(e)]) -
                                             double(expected[(static_cast<std::size_t>(p) * hq + static_cast<std::size_t>(h)) * d + static_cast<std::size_t>(e)])));
          ++compared;
        }
      MESSAGE(std::string(policy_name) << ", " << std::string(to_string(storage)) << ", " << shards << " shards: " << compared
                          << " (query, head) pairs, largest |difference| / largest output " << worst / largest);
      CHECK(worst <= 1e-6 * largest);
      if (shards == 1) CHECK(worst == 0.0);  // one shard streams what the layer streams: the same bits
    }
  };
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    check.operator()<paper_policies>("paper", storage);
    check.operator()<quest_flat>("quest bounds", storage);
  }
  // A cache that spreads its encoding cannot be a shard: its last chunk's summary would wait
  // for tokens another shard holds.
  attention<> spreading(test::make_config(hq, hkv, d, w, budget), r);
  REQUIRE(spreading.config().spread_encoding);
  const kv_cache cache = spreading.make_cache();
  CHECK_THROWS_WITH_AS(make_shard(cache, 0), doctest::Contains("spread_encoding = false"), config_error);
  attention_config at_completion = test::make_config(hq, hkv, d, w, budget);
  at_completion.spread_encoding = false;
  const kv_cache fine = attention<>(at_completion, r).make_cache();
  CHECK_THROWS_WITH_AS(make_shard(fine, -1), doctest::Contains("first chunk must be >= 0"), config_error);
  CHECK(make_shard(fine, 3).first_chunk == 3);
}

TEST_CASE("shards: the block functions, fed as a host feeds them, choose the single-process chunks bitwise and attend within 1e-6") {
  // A sequence fed in random blocks; each block's tokens go to the shard whose chunk range holds
  // them (P = 1..4 contiguous ranges, random boundaries, the last open-ended), then every shard
  // offers, the offers are merged, every shard attends and the partial states are merged. The
  // selections must equal one attention's prefill of the whole sequence (==), the outputs be
  // within 1e-6 of its largest, and one shard give its bits; the same layer on a pool of three
  // threads must give the shards' offers and partial states bit for bit. Policies: the paper's, Quest
  // scanned flat, Quest through the exact index, Quest with group-max selection, Quest with a
  // kernel that reads fp32 only, the beam index and the key-cluster index. Indexed policies also choose through a
  // chunk_index_store fed the shards' new chunks (offer_from_store): the single-process choice on
  // every P, the beam's and the clusters' included (each shard's own beam matches it on one shard only); the
  // shards then attend that choice.
  const int w = 8, budget = 6, d = 32, hq = 4, hkv = 2, T = 300;
  const rope r(d);
  std::mt19937 rng(2350);
  struct quest_flat : paper_policies {
    using encoder = key_bounds_encoder;
    using scorer = bound_scorer;
  };
  struct quest_index : quest_flat {
    using index = bound_tree_index;
  };
  struct quest_group : quest_flat {
    using group_selection = group_max_selection;
  };
  struct quest_beam : quest_flat {
    using index = bound_tree_beam;
  };
  struct quest_clusters : quest_flat {
    using index = key_cluster_index;
  };
  struct quest_scalar_kernel : quest_flat {  // reads fp32 only: compact chunks are converted for it
    using kernel = scalar_online_softmax_kernel;
  };
    // shards_search_alike: up to this many shards, each searching its own index gives the single-process choice too.
  auto check = [&]<class Policies>(const char* policy_name, kv_precision storage, int shards_search_alike, typename attention<Policies>::policy_set set) {
    CAPTURE(std::string(policy_name));
    CAPTURE(std::string(to_string(storage)));
    attention_config config = test::make_config(hq, hkv, d, w, budget);
    config.spread_encoding = false;
    config.kv_storage = storage;
    attention<Policies> a(config, r, set);
    attention<pooled_policies<Policies>> pooled(
        config, r, {set.encoder, set.scorer, set.selector, set.remapper, set.kernel, thread_pool_executor(3), set.group_selection, set.index});
    const test::sequence seq(T, hq, hkv, d, 2360);
    auto whole = a.make_cache();
    std::vector<float> expected(static_cast<std::size_t>(T) * hq * d);
    std::vector<std::int32_t> selections(static_cast<std::size_t>(T) * hq * budget);
    a.prefill(whole, seq.qv(0, T), seq.kv(0, T), seq.vv(0, T), {expected.data(), T, hq, d}, selections);
    double largest = 0;
    for (float x : expected) largest = std::max(largest, static_cast<double>(std::abs(x)));
    const int chunks = (T + w - 1) / w;
    const std::size_t wanted = offered_per_head(config);
    for (int shards = 1; shards <= 4; ++shards) {
      CAPTURE(shards);
      std::vector<int> bounds{0};
      for (int s = 1; s < shards; ++s) bounds.push_back(static_cast<int>(rng() % static_cast<unsigned>(chunks + 1)));
      std::sort(bounds.begin(), bounds.end());
      bounds.push_back(std::numeric_limits<int>::max() / w);
      std::vector<kv_cache> caches;
      std::vector<shard_scratch> scratch(static_cast<std::size_t>(shards)), pooled_scratch(static_cast<std::size_t>(shards));
      for (int s = 0; s < shards; ++s) {
        caches.push_back(a.make_cache());
        if (s % 2 == 0) scratch[static_cast<std::size_t>(s)].reserve(a, chunks, 40);  // odd shards: the calls size it themselves
      }
      std::vector<float> got(expected.size());
      std::vector<std::int32_t> chosen(selections.size());
      std::vector<std::vector<chunk_candidate>> offers(static_cast<std::size_t>(shards));
      std::vector<std::vector<std::int32_t>> counts(static_cast<std::size_t>(shards));
      std::vector<std::vector<softmax_state>> states(static_cast<std::size_t>(shards));
      std::vector<std::vector<float>> partial(static_cast<std::size_t>(shards));
      std::vector<chunk_candidate> pool, pooled_offers;
      std::vector<std::int32_t> pooled_counts;
      std::vector<softmax_state> pooled_states;
      std::vector<float> pooled_partial;
      bool pooled_same = true;
      // Indexed policies also choose from the whole sequence's index, a store fed every shard's
      // new chunk representations in order: the single-process choice for every index policy.
      constexpr bool indexed = std::remove_cvref_t<decltype(a.policies().index)>::indexed;
      std::optional<chunk_index_store> store;
      if constexpr (indexed) store.emplace(a.shape());
      std::vector<std::int64_t> exported(static_cast<std::size_t>(shards), 0);
      std::vector<float> rows;
      std::vector<chunk_candidate> store_offers;
      std::vector<std::int32_t> store_counts, store_chosen(selections.size());
      shard_scratch store_scratch;
      for (int first = 0; first < T;) {
        const int n = std::min(T - first, 1 + static_cast<int>(rng() % 40));
        const auto q = seq.qv(first, n);
        for (int s = 0; s < shards; ++s) {  // the block's tokens to the shards that hold them
          const int lo = std::max(first, bounds[static_cast<std::size_t>(s)] * w), hi = std::min(first + n, bounds[static_cast<std::size_t>(s) + 1] * w);
          if (hi > lo) a.ingest(caches[static_cast<std::size_t>(s)], seq.qv(lo, hi - lo), seq.kv(lo, hi - lo), seq.vv(lo, hi - lo));
        }
        if constexpr (indexed) {  // the shards' new chunks to the store, in the sequence's order
          for (int s = 0; s < shards; ++s) {
            const auto u = static_cast<std::size_t>(s);
            const std::int64_t done = caches[u].summarised_chunks();
            rows.resize(static_cast<std::size_t>(done - exported[u]) * store->chunk_floats());
            export_representations(caches[u], exported[u], done, rows);
            if (done > exported[u]) REQUIRE(store->chunks() == bounds[u] + exported[u]);
            store->append(rows);
            exported[u] = done;
          }
          store_offers.assign(static_cast<std::size_t>(n * hq) * wanted, {});
          store_counts.assign(static_cast<std::size_t>(n * hq), -7);
          offer_from_store(a, *store, q, first, store_offers, store_counts, store_scratch);
          const std::span<const chunk_candidate> one_offer[] = {store_offers};
          const std::span<const std::int32_t> one_count[] = {store_counts};
          choose_from_offers(a, first, n, one_offer, one_count,
                             std::span(store_chosen).subspan(static_cast<std::size_t>(first) * hq * budget, static_cast<std::size_t>(n * hq * budget)), pool);
        }
        std::vector<std::span<const chunk_candidate>> offer_views;
        std::vector<std::span<const std::int32_t>> count_views;
        for (int s = 0; s < shards; ++s) {
          const auto u = static_cast<std::size_t>(s);
          offers[u].assign(static_cast<std::size_t>(n * hq) * wanted, {});
          counts[u].assign(static_cast<std::size_t>(n * hq), -7);
          offer_candidates(a, make_shard(caches[u], bounds[u]), q, first, offers[u], counts[u], scratch[u]);
          pooled_offers.assign(offers[u].size(), {});
          pooled_counts.assign(counts[u].size(), -7);
          offer_candidates(pooled, make_shard(caches[u], bounds[u]), q, first, pooled_offers, pooled_counts, pooled_scratch[u]);
          pooled_same = pooled_same && same_bits(pooled_offers, offers[u]) && pooled_counts == counts[u];
          offer_views.emplace_back(offers[u]);
          count_views.emplace_back(counts[u]);
        }
        std::span<std::int32_t> block_chosen(chosen.data() + static_cast<std::ptrdiff_t>(first) * hq * budget, static_cast<std::size_t>(n * hq * budget));
        choose_from_offers(a, first, n, offer_views, count_views, block_chosen, pool);
        // The shards attend the store's choice when there is one (the one that is the same on any P).
        if constexpr (indexed) block_chosen = std::span(store_chosen).subspan(static_cast<std::size_t>(first) * hq * budget, block_chosen.size());
        std::vector<std::span<const softmax_state>> state_views;
        std::vector<tensor_view<const float>> out_views;
        for (int s = 0; s < shards; ++s) {
          const auto u = static_cast<std::size_t>(s);
          states[u].assign(static_cast<std::size_t>(n * hq), {});
          partial[u].assign(static_cast<std::size_t>(n * hq * d), 0.0f);
          attend_chosen(a, make_shard(caches[u], bounds[u]), q, first, block_chosen, states[u], {partial[u].data(), n, hq, d}, scratch[u]);
          pooled_states.assign(states[u].size(), {});
          pooled_partial.assign(partial[u].size(), 0.0f);
          attend_chosen(pooled, make_shard(caches[u], bounds[u]), q, first, block_chosen, pooled_states, {pooled_partial.data(), n, hq, d},
                        pooled_scratch[u]);
          pooled_same = pooled_same && same_bits(pooled_states, states[u]) && same_bits(pooled_partial, partial[u]);
          state_views.emplace_back(states[u]);
          out_views.emplace_back(partial[u].data(), n, hq, d);
        }
        merge_attended(a, state_views, out_views, {got.data() + static_cast<std::ptrdiff_t>(first) * hq * d, n, hq, d});
        first += n;
      }
      if (shards <= shards_search_alike) CHECK(chosen == selections);  // the shards' own searches
      if constexpr (indexed) CHECK(store_chosen == selections);
      CHECK(pooled_same);
      // A chunk's summary has the same bits in whichever shard holds it (docs/sharding.md).
      for (int s = 0; s < shards; ++s) {
        const kv_cache& part = caches[static_cast<std::size_t>(s)];
        for (int h = 0; h < hq; ++h) {
          const auto mine = part.representations(h), all = whole.representations(h);
          for (std::int64_t c = 0; c < part.summarised_chunks(); ++c)
            CHECK(std::equal(mine.row(c), mine.row(c) + mine.cols(), all.row(bounds[static_cast<std::size_t>(s)] + c)));
        }
      }
      double worst = 0;
      for (std::size_t e = 0; e < got.size(); ++e) worst = std::max(worst, std::abs(double(got[e]) - double(expected[e])));
      MESSAGE(std::string(policy_name) << ", " << std::string(to_string(storage)) << ", " << shards << " shards: largest |difference| / largest output " << worst / largest);
      CHECK(worst <= 1e-6 * largest);
      if (shards == 1) CHECK(got == expected);
    }
  };
  for (kv_precision storage : {kv_precision::fp32, kv_precision::bf16, kv_precision::int8}) {
    check.operator()<paper_policies>("paper", storage, 4, {});
    check.operator()<quest_flat>("quest flat", storage, 4, {});
    check.operator()<quest_index>("quest index", storage, 4, {});
    check.operator()<quest_group>("quest group max", storage, 4, {});
    check.operator()<quest_scalar_kernel>("quest, scalar kernel", storage, 4, {});
    typename attention<quest_beam>::policy_set beam;
    beam.index = bound_tree_beam{2, 1, 4, 0};  // fan-out 2, one box a level, exact below 4 candidates: the beam misses chunks
    check.operator()<quest_beam>("quest beam", storage, 1, beam);
    typename attention<quest_clusters>::policy_set clusters;
    clusters.index = {.segment_chunks = 4, .clusters = 2, .iterations = 3, .probe_share = 0.0f, .probe_min = 2, .exact_below = 3};  // misses chunks
    check.operator()<quest_clusters>("quest key clusters", storage, 1, clusters);
  }
}

TEST_CASE("chunk_index_store: holds a cache's representations and trees bitwise, forgets what is truncated, and names what is wrong") {
  const int w = 4, budget = 6, d = 16, hq = 4, hkv = 2, T = 400;
  const rope r(d);
  struct quest_beam : paper_policies {
    using encoder = key_bounds_encoder;
    using scorer = bound_scorer;
    using index = bound_tree_beam;
  };
  attention_config config = test::make_config(hq, hkv, d, w, budget);
  config.spread_encoding = false;
  typename attention<quest_beam>::policy_set set;
  set.index = bound_tree_beam{4, 2, 8, 0};
  attention<quest_beam> a(config, r, set);
  const test::sequence seq(T, hq, hkv, d, 2380);
  kv_cache cache = a.make_cache();
  a.ingest(cache, seq.qv(0, T), seq.kv(0, T), seq.vv(0, T));
  chunk_index_store store(a.shape());
  std::vector<float> rows(static_cast<std::size_t>(cache.summarised_chunks()) * store.chunk_floats());
  export_representations(cache, 0, cache.summarised_chunks(), rows);
  store.reserve(cache.summarised_chunks());
  store.append(rows);
  auto same_index = [&](const kv_cache& c, const chunk_index_store& s) {
    bool same = s.chunks() == c.summarised_chunks();
    for (int h = 0; h < hq && same; ++h) {
      const auto mine = s.representations(h), theirs = c.representations(h);
      for (std::int64_t k = 0; k < s.chunks(); ++k) same = same && std::memcmp(mine.row(k), theirs.row(k), sizeof(float) * 2 * d) == 0;
      const bound_tree &t1 = s.index(h).tree(), &t2 = c.index(h).tree();
      same = same && t1.levels() == t2.levels() && t1.chunks() == t2.chunks();
      for (int l = 1; l <= t1.levels() && same; ++l)
        same = std::memcmp(t1.box(l, 0), t2.box(l, 0), sizeof(float) * 2 * d * static_cast<std::size_t>(t1.boxes(l))) == 0;
    }
    return same;
  };
  CHECK(same_index(cache, store));
  // Truncated back: the same as a store fed only the chunks kept.
  store.truncate(37);
  chunk_index_store fresh(a.shape());
  fresh.append(std::span(rows).first(37 * fresh.chunk_floats()));
  kv_cache shorter = a.make_cache();
  a.ingest(shorter, seq.qv(0, 37 * w), seq.kv(0, 37 * w), seq.vv(0, 37 * w));
  CHECK(same_index(shorter, store));
  CHECK(same_index(shorter, fresh));
  store.clear();
  CHECK(store.chunks() == 0);
  // What is wrong is named, and the store is left as it was.
  store.append(std::span(rows).first(5 * store.chunk_floats()));
  CHECK_THROWS_WITH_AS(store.append(std::span(rows).first(store.chunk_floats() - 1)), doctest::Contains("are not whole chunks"), shape_error);
  CHECK(store.chunks() == 5);
  CHECK_THROWS_WITH_AS(chunk_index_store(attention<>(config, r).shape()), doctest::Contains("keeps no index"), shape_error);
  std::vector<float> small(3);
  CHECK_THROWS_WITH_AS(export_representations(cache, 0, 2, small), doctest::Contains("out must hold"), shape_error);
  CHECK_THROWS_WITH_AS(export_representations(cache, 0, cache.summarised_chunks() + 1, rows), doctest::Contains("are not in the"), shape_error);
  std::vector<chunk_candidate> offers(static_cast<std::size_t>(hq) * offered_per_head(config));
  std::vector<std::int32_t> counts(static_cast<std::size_t>(hq));
  shard_scratch scratch;
  CHECK_THROWS_WITH_AS(offer_from_store(a, store, seq.qv(T - 1, 1), T - 1, offers, counts, scratch), doctest::Contains("the store holds 5 chunks"),
                       shape_error);
}

TEST_CASE("shards: the block functions name what is wrong with their inputs") {
  const int w = 8, budget = 6, d = 16, hq = 4, hkv = 2;
  const rope r(d);
  attention_config config = test::make_config(hq, hkv, d, w, budget);
  config.spread_encoding = false;
  attention<> a(config, r);
  kv_cache cache = a.make_cache();
  const test::sequence seq(64, hq, hkv, d, 2370);
  a.ingest(cache, seq.qv(0, 64), seq.kv(0, 64), seq.vv(0, 64));
  shard_scratch scratch;
  const std::size_t wanted = offered_per_head(config);
  std::vector<chunk_candidate> offers(4 * hq * wanted);
  std::vector<std::int32_t> counts(4 * hq);
  const cache_shard shard = make_shard(cache, 0);
  CHECK_THROWS_WITH_AS(offer_candidates(a, shard, seq.qv(60, 4), 60, std::span(offers).first(3), counts, scratch), doctest::Contains("offers must hold"),
                       shape_error);
  const tensor_view<const float> wrong_heads(seq.q.data(), 4, hkv, d);
  CHECK_THROWS_WITH_AS(offer_candidates(a, shard, wrong_heads, 60, offers, counts, scratch), doctest::Contains("q must be [T, 4, 16]"), shape_error);
  attention_config other = config;
  other.kv_storage = kv_precision::bf16;
  const kv_cache foreign = attention<>(other, r).make_cache();
  CHECK_THROWS_WITH_AS(offer_candidates(a, make_shard(foreign, 0), seq.qv(60, 4), 60, offers, counts, scratch),
                       doctest::Contains("not made by this layer"), shape_error);
  std::vector<std::int32_t> chosen(4 * hq * budget);
  std::vector<chunk_candidate> pool;
  std::vector<std::int32_t> bad_counts(4 * hq, static_cast<std::int32_t>(wanted) + 1);
  const std::span<const chunk_candidate> offer_views[1] = {offers};
  const std::span<const std::int32_t> count_views[1] = {bad_counts};
  CHECK_THROWS_WITH_AS(choose_from_offers(a, 60, 4, offer_views, count_views, chosen, pool), doctest::Contains("a count must be in [0, "),
                       shape_error);
  std::vector<softmax_state> states(4 * hq);
  std::vector<float> out(4 * hq * d);
  CHECK_THROWS_WITH_AS(attend_chosen(a, shard, seq.qv(60, 4), 60, std::span<const std::int32_t>(chosen).first(5), states, {out.data(), 4, hq, d}, scratch),
                       doctest::Contains("chosen must hold"), shape_error);
}
