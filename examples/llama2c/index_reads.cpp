// SPDX-License-Identifier: MIT
// index_reads: what the chunk-index searches read, and what the beam loses against the flat scan,
// on real caches and on synthetic caches of stated structure.
//
// Real caches: passkey prompts (the shared set, or generated ones past its longest) fed through
// a llama2.c checkpoint with the recommended selection; then the last query of every layer and
// head chooses again three ways: the flat scan (its choice is bound_search's, exact), the exact
// best-first search and the recommended policy's beam (bound_tree_beam::search: exact up to
// exact_below candidates, the beam past them). Synthetic caches (--synthetic clustered|iid, one
// layer of 4 q / 2 kv heads, d 32; examples/common/synthetic_caches.hpp): 16 queries per head.
//
// Per length: summaries read per search (boxes + chunks; median / p90) by the three, the beam's
// reads as a share of the chunks, and the beam's fidelity against the flat scan
// (selection_fidelity.hpp), median and p10 over the searches: recall@k of the flat scan's
// chunks, attention-mass recall (the mass in the beam's chunks over the mass in the flat scan's,
// softmax over every candidate key in the scorer's frame), and the relative difference of the
// head's output between the two choices (median / p90).
//
//   index_reads --lengths 16384,65536 --prompts 3
//   index_reads --lengths 262144,1048576 --prompts 2 --generate    # prompts made with the vocabulary
//   index_reads --synthetic clustered --chunk-counts 4096,32768,131072
//
// Exit code 77 when the model or prompt set is missing (ctest reports it as skipped).
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <charconv>
#include <limits>
#include <numeric>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "../common/synthetic_caches.hpp"
#include "checkpoint.hpp"
#include "passkey.hpp"
#include "policies.hpp"
#include "transformer.hpp"

namespace {

/// Samples of one figure; quantiles on demand.
struct samples {
  std::vector<double> x;
  void add(double v) { x.push_back(v); }
  double at(double q) {
    if (x.empty()) return 0.0;
    std::sort(x.begin(), x.end());
    return x[std::min(x.size() - 1, static_cast<std::size_t>(q * static_cast<double>(x.size())))];
  }
};

/// An experiment, not a policy: boxes over k-means clusters of the chunks' summaries (in key
/// space, where the beam's boxes group chunks by time), searched exactly: every cluster's box
/// bound, then clusters best bound first, every member scored, until a box's bound falls below
/// the k-th score found (a certificate: no chunk skipped can beat it). Built offline over the
/// whole cache, per representation head; what it reads tells whether grouping by key space
/// makes an exact search sublinear on these caches.
struct cluster_boxes {
  int d = 0;
  std::vector<float> boxes;                      // [C][lo | hi]
  std::vector<std::vector<std::int32_t>> members;  // per cluster, ascending chunk ids
  std::vector<float> centres;                    // [C][lo | hi]: the members' mean summary

  cluster_boxes(longheads::matrix_view<const float> summaries, int clusters, int iterations) : d(static_cast<int>(summaries.cols() / 2)) {
    const std::int64_t n = summaries.rows();
    const int c_count = static_cast<int>(std::min<std::int64_t>(clusters, n));
    const std::ptrdiff_t r = summaries.cols();
    centres.assign(static_cast<std::size_t>(c_count) * r, 0.0f);
    for (int c = 0; c < c_count; ++c) std::copy_n(summaries.row(c * n / c_count), r, centres.data() + static_cast<std::ptrdiff_t>(c) * r);
    std::vector<int> owner(static_cast<std::size_t>(n), 0);
    for (int it = 0; it <= iterations; ++it) {
      for (std::int64_t i = 0; i < n; ++i) {
        double best = std::numeric_limits<double>::infinity();
        for (int c = 0; c < c_count; ++c) {
          double dist = 0;
          const float* x = summaries.row(i);
          const float* y = centres.data() + static_cast<std::ptrdiff_t>(c) * r;
          for (std::ptrdiff_t j = 0; j < r; ++j) dist += (static_cast<double>(x[j]) - y[j]) * (static_cast<double>(x[j]) - y[j]);
          if (dist < best) best = dist, owner[static_cast<std::size_t>(i)] = c;
        }
      }
      if (it == iterations) break;
      std::vector<double> sum(centres.size(), 0.0);
      std::vector<std::int64_t> count(static_cast<std::size_t>(c_count), 0);
      for (std::int64_t i = 0; i < n; ++i) {
        const int c = owner[static_cast<std::size_t>(i)];
        ++count[static_cast<std::size_t>(c)];
        for (std::ptrdiff_t j = 0; j < r; ++j) sum[static_cast<std::size_t>(c * r + j)] += summaries.row(i)[j];
      }
      for (int c = 0; c < c_count; ++c)
        if (count[static_cast<std::size_t>(c)] > 0)
          for (std::ptrdiff_t j = 0; j < r; ++j)
            centres[static_cast<std::size_t>(c * r + j)] = static_cast<float>(sum[static_cast<std::size_t>(c * r + j)] / static_cast<double>(count[static_cast<std::size_t>(c)]));
    }
    members.assign(static_cast<std::size_t>(c_count), {});
    boxes.assign(static_cast<std::size_t>(c_count) * 2 * d, 0.0f);
    for (int c = 0; c < c_count; ++c) {
      std::fill_n(boxes.data() + static_cast<std::ptrdiff_t>(c) * 2 * d, d, std::numeric_limits<float>::infinity());
      std::fill_n(boxes.data() + static_cast<std::ptrdiff_t>(c) * 2 * d + d, d, -std::numeric_limits<float>::infinity());
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const int c = owner[static_cast<std::size_t>(i)];
      members[static_cast<std::size_t>(c)].push_back(static_cast<std::int32_t>(i));
      float* box = boxes.data() + static_cast<std::ptrdiff_t>(c) * 2 * d;
      for (int j = 0; j < d; ++j) {
        box[j] = std::min(box[j], summaries.row(i)[j]);
        box[d + j] = std::max(box[d + j], summaries.row(i)[d + j]);
      }
    }
  }

  /// The `wanted` best chunks of [first, end) for the rotated query, exactly; `budget` > 0 stops
  /// once that many chunks' summaries have been read besides the clusters' boxes (then it is
  /// approximate). Returns the summaries read, boxes included.
  /// `by_centre`: clusters in the order of their centre's score (IVF's probe order: a chunk's
  /// score is linear in its summary for a fixed query, so the centre's score is the members'
  /// mean score) instead of their box bound; `interleave`: box order and centre order in turn
  /// (key_cluster_index's default); with either, only `budget` > 0 is meaningful (no certificate).
  std::int64_t search(longheads::matrix_view<const float> summaries, const float* q, std::int64_t first, std::int64_t end, std::size_t wanted,
                      std::int64_t budget, std::vector<std::int32_t>& out, bool by_centre = false, bool interleave = false) const {
    const auto c_count = static_cast<int>(members.size());
    std::vector<std::pair<float, int>> order, second;
    for (int c = 0; c < c_count; ++c) {
      if (members[static_cast<std::size_t>(c)].empty()) continue;
      const float* box = (by_centre ? centres.data() : boxes.data()) + static_cast<std::ptrdiff_t>(c) * 2 * d;
      order.push_back({longheads::detail::bound_dot(q, box, box + d, d), c});
      if (interleave) {
        const float* centre = centres.data() + static_cast<std::ptrdiff_t>(c) * 2 * d;
        second.push_back({longheads::detail::bound_dot(q, centre, centre + d, d), c});
      }
    }
    std::int64_t read = static_cast<std::int64_t>(order.size() + second.size());
    const auto by_score = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    std::sort(order.begin(), order.end(), by_score);
    if (interleave) {  // box order and centre order taken in turn, each cluster once (both list every cluster)
      std::sort(second.begin(), second.end(), by_score);
      std::vector<char> taken(static_cast<std::size_t>(c_count), 0);
      std::vector<std::pair<float, int>> merged;  // bounds +inf: no certificate in this order
      for (std::size_t a = 0, b = 0; merged.size() < order.size();) {
        const bool box_turn = merged.size() % 2 == 0;
        const auto& list = box_turn ? order : second;
        std::size_t& at = box_turn ? a : b;
        while (taken[static_cast<std::size_t>(list[at].second)]) ++at;  // something is left untaken in each list
        taken[static_cast<std::size_t>(list[at].second)] = 1;
        merged.push_back({std::numeric_limits<float>::infinity(), list[at].second});
      }
      order.swap(merged);
    }
    std::vector<std::pair<float, std::int32_t>> best;  // score desc, id asc
    auto better = [](const std::pair<float, std::int32_t>& a, const std::pair<float, std::int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    for (const auto& [bound, c] : order) {
      if (!by_centre && best.size() == wanted && bound < best.back().first) break;  // certified: nothing left can reach the k-th
      if (budget > 0 && read - static_cast<std::int64_t>(order.size() + second.size()) >= budget) break;
      for (std::int32_t id : members[static_cast<std::size_t>(c)]) {
        if (id < first || id >= end) continue;
        const float* row = summaries.row(id);
        const std::pair<float, std::int32_t> scored{longheads::detail::bound_dot(q, row, row + d, d), id};
        ++read;
        if (best.size() < wanted) best.insert(std::upper_bound(best.begin(), best.end(), scored, better), scored);
        else if (better(scored, best.back())) {
          best.pop_back();
          best.insert(std::upper_bound(best.begin(), best.end(), scored, better), scored);
        }
      }
    }
    out.clear();
    for (const auto& [score, id] : best) out.push_back(id);
    return read;
  }
};

/// One row of the table: every search of one length.
struct row {
  samples flat, exact, beam, recall, mass, difference;
  samples cluster_exact, cluster_probe, cluster_mass, cluster_recall_exact, cluster_recall, cluster_difference;
  samples centre_probe, centre_mass, centre_recall, centre_difference;
  samples mixed_probe, mixed_mass;  // clusters probed by their centre's score (IVF)
  samples certified, certified_loose, certified_loose_mass;  // the certified search at epsilon 0 and at `epsilon`
  float epsilon = 1.0f;
  std::int64_t chunks = 0;
  const std::vector<cluster_boxes>* clustered = nullptr;  // per representation head, with --cluster-boxes
  int cluster_count = 0;                                  // clusters per cache (for print), with --cluster-boxes
  double probe_share = 0.05;
  // --key-clusters: the key_cluster_index policy, over states built from this cache's summaries
  // (per representation head; the state is a function of the summaries, as in a cache of it).
  struct key_figures {
    samples reads, recall, mass, difference;
  };
  const std::vector<longheads::key_cluster_index>* key_indexes = nullptr;
  const std::vector<std::vector<longheads::chunk_index_state>>* key_states = nullptr;  // per index, per representation head
  std::vector<key_figures> key;

  /// Chooses again for one query of one head (candidates [first, end)) and records the figures.
  void measure(const longheads::kv_cache& cache, const longheads::rope& rotary, const longheads::attention_config& config,
               const longheads::bound_tree_beam& index, int head, std::int64_t position, const float* query, std::int64_t first,
               std::int64_t end, std::size_t wanted) {
    const int w = config.chunk_size, d = config.head_dim;
    std::vector<float> rotated(static_cast<std::size_t>(d));
    rotary.rotate(query, rotated.data(), position % w + w);  // as bound_scorer rotates it (offset 1)
    longheads::bound_search_scratch scratch;
    scratch.reserve(cache.full_chunks(), std::max(index.branching, 16));
    scratch.reserve_beam(index.widest_beam(), index.branching);
    std::vector<std::int32_t> flat_found(wanted), beam_found(wanted);
    longheads::bound_search::stats exact_stats, beam_stats;
    const std::size_t n = longheads::bound_search::top(cache.index(head).tree(), cache.representations(head), rotated.data(), first, end, wanted,
                                                       flat_found, scratch, &exact_stats);
    const std::size_t m = index.search(cache.index(head), cache.representations(head), rotated.data(), first, end, wanted, beam_found, scratch,
                                       &beam_stats);
    flat.add(static_cast<double>(end - first));
    exact.add(static_cast<double>(exact_stats.boxes + exact_stats.chunks));
    beam.add(static_cast<double>(beam_stats.boxes + beam_stats.chunks));
    const longheads::choice_fidelity f = longheads::measure_choice(
        cache, rotary, config, {head, position, query, first, end, 1}, std::span<const std::int32_t>(flat_found).first(n),
        std::span<const std::int32_t>(beam_found).first(m));
    recall.add(f.recall);
    mass.add(f.mass_recall);
    difference.add(f.output_difference);
    // The certified search: exactly the flat scan's chunks at epsilon 0 (checked), within epsilon beyond.
    std::vector<std::int32_t> certain(wanted);
    longheads::bound_search::stats certain_stats, loose_stats;
    const std::size_t c0 = longheads::certified_search::top(cache.index(head).tree(), cache.representations(head), rotated.data(), first, end, wanted,
                                                            index.beam, 0.0f, certain, scratch, &certain_stats);
    if (!std::equal(certain.begin(), certain.begin() + static_cast<std::ptrdiff_t>(c0), flat_found.begin(), flat_found.begin() + static_cast<std::ptrdiff_t>(n)))
      std::fprintf(stderr, "index_reads: the certified search at epsilon 0 differs from the flat scan (a bug)\n");
    certified.add(static_cast<double>(certain_stats.boxes + certain_stats.chunks));
    const std::size_t c1 = longheads::certified_search::top(cache.index(head).tree(), cache.representations(head), rotated.data(), first, end, wanted,
                                                            index.beam, epsilon, certain, scratch, &loose_stats);
    certified_loose.add(static_cast<double>(loose_stats.boxes + loose_stats.chunks));
    certified_loose_mass.add(longheads::measure_choice(cache, rotary, config, {head, position, query, first, end, 1},
                                                       std::span<const std::int32_t>(flat_found).first(n), std::span<const std::int32_t>(certain).first(c1))
                                 .mass_recall);
    for (std::size_t i = 0; key_indexes != nullptr && key_states != nullptr && i < key_indexes->size(); ++i) {
      const longheads::key_cluster_index& index = (*key_indexes)[i];
      key.resize(key_indexes->size());
      std::vector<std::int32_t> found(wanted);
      longheads::bound_search::stats key_stats;
      longheads::reserve_search_scratch(index, scratch, cache.full_chunks(), wanted);
      const std::size_t k = index.search((*key_states)[i][static_cast<std::size_t>(cache.representation_head(head))], cache.representations(head),
                                         rotated.data(), first, end, wanted, found, scratch, &key_stats);
      key[i].reads.add(static_cast<double>(key_stats.boxes + key_stats.chunks));
      const longheads::choice_fidelity f_key = longheads::measure_choice(cache, rotary, config, {head, position, query, first, end, 1},
                                                                         std::span<const std::int32_t>(flat_found).first(n),
                                                                         std::span<const std::int32_t>(found).first(k));
      key[i].recall.add(f_key.recall);
      key[i].mass.add(f_key.mass_recall);
      key[i].difference.add(f_key.output_difference);
    }
    if (clustered == nullptr) return;
    const cluster_boxes& boxes = (*clustered)[static_cast<std::size_t>(cache.representation_head(head))];
    std::vector<std::int32_t> found;
    cluster_exact.add(static_cast<double>(boxes.search(cache.representations(head), rotated.data(), first, end, wanted, 0, found)));
    cluster_recall_exact.add(found == std::vector<std::int32_t>(flat_found.begin(), flat_found.begin() + static_cast<std::ptrdiff_t>(n)) ? 1.0 : 0.0);
    const auto budget = static_cast<std::int64_t>(probe_share * static_cast<double>(cache.summarised_chunks()));
    cluster_probe.add(static_cast<double>(boxes.search(cache.representations(head), rotated.data(), first, end, wanted, budget, found)));
    const longheads::choice_fidelity by_box = longheads::measure_choice(cache, rotary, config, {head, position, query, first, end, 1},
                                                                        std::span<const std::int32_t>(flat_found).first(n), found);
    cluster_mass.add(by_box.mass_recall);
    cluster_recall.add(by_box.recall);
    cluster_difference.add(by_box.output_difference);
    centre_probe.add(static_cast<double>(boxes.search(cache.representations(head), rotated.data(), first, end, wanted, budget, found, true)));
    const longheads::choice_fidelity by_centre = longheads::measure_choice(cache, rotary, config, {head, position, query, first, end, 1},
                                                                           std::span<const std::int32_t>(flat_found).first(n), found);
    centre_mass.add(by_centre.mass_recall);
    mixed_probe.add(static_cast<double>(boxes.search(cache.representations(head), rotated.data(), first, end, wanted, budget, found, false, true)));
    mixed_mass.add(longheads::measure_choice(cache, rotary, config, {head, position, query, first, end, 1},
                                             std::span<const std::int32_t>(flat_found).first(n), found).mass_recall);
    centre_recall.add(by_centre.recall);
    centre_difference.add(by_centre.output_difference);
  }

  void print(const std::string& label) {
    if (flat.x.empty()) return;
    std::printf("%-12s %8lld | %6.0f / %6.0f | %6.0f / %6.0f | %5.0f / %5.0f  %6.2f%% | %5.3f / %5.3f | %5.3f / %5.3f | %7.2g / %7.2g | %zu\n",
                label.c_str(), static_cast<long long>(chunks), flat.at(0.5), flat.at(0.9), exact.at(0.5), exact.at(0.9), beam.at(0.5), beam.at(0.9),
                100.0 * beam.at(0.5) / static_cast<double>(chunks), recall.at(0.5), recall.at(0.1), mass.at(0.5), mass.at(0.1),
                difference.at(0.5), difference.at(0.9), flat.x.size());
    std::printf("%-12s certified search (beam-seeded): epsilon 0 reads %.0f / %.0f (med / p90, %.2f%% of the chunks: the flat scan's choice); "
                "epsilon %g reads %.0f / %.0f (%.2f%%), mass recall %.3f / %.3f (med / p10)\n",
                "", certified.at(0.5), certified.at(0.9), 100.0 * certified.at(0.5) / static_cast<double>(chunks), static_cast<double>(epsilon),
                certified_loose.at(0.5), certified_loose.at(0.9), 100.0 * certified_loose.at(0.5) / static_cast<double>(chunks),
                certified_loose_mass.at(0.5), certified_loose_mass.at(0.1));
    for (std::size_t i = 0; key_indexes != nullptr && i < key.size(); ++i) {
      const longheads::key_cluster_index* key_index = &(*key_indexes)[i];
      auto& key_reads = key[i].reads;
      auto& key_recall = key[i].recall;
      auto& key_mass = key[i].mass;
      auto& key_difference = key[i].difference;
      std::printf("%-12s key-cluster index (segments of %d chunks in %d clusters, probe %.1f%% in [%d, %d] chunks, %s order, read budget %d): reads %.0f / %.0f (med / p90, "
                  "%.2f%% / %.2f%% of the chunks), recall@k %.3f / %.3f, mass recall %.3f / %.3f (med / p10), output difference %.2g / %.2g "
                  "(med / p90)\n",
                  "", key_index->segment_chunks, key_index->clusters, 100.0 * key_index->probe_share, key_index->probe_min, key_index->probe_max,
                  key_index->probe_order == longheads::cluster_probe::box_bound ? "box" : "box-and-centre", key_index->read_max, key_reads.at(0.5),
                  key_reads.at(0.9), 100.0 * key_reads.at(0.5) / static_cast<double>(chunks), 100.0 * key_reads.at(0.9) / static_cast<double>(chunks),
                  key_recall.at(0.5), key_recall.at(0.1), key_mass.at(0.5), key_mass.at(0.1), key_difference.at(0.5), key_difference.at(0.9));
    }
    if (cluster_count > 0)
      std::printf("%-12s cluster boxes (%d clusters): exact search reads %.0f / %.0f (med / p90, %.2f%% of the chunks; the flat scan's choice "
                  "in %.0f%% of searches); probing %.0f%% of the chunks: %.0f read, recall@k %.3f / %.3f, mass recall %.3f / %.3f (med / p10), "
                  "output difference %.2g / %.2g (med / p90)\n",
                  "", cluster_count, cluster_exact.at(0.5), cluster_exact.at(0.9),
                  100.0 * cluster_exact.at(0.5) / static_cast<double>(chunks), 100.0 * std::accumulate(cluster_recall_exact.x.begin(), cluster_recall_exact.x.end(), 0.0) /
                      static_cast<double>(cluster_recall_exact.x.size()),
                  100.0 * probe_share, cluster_probe.at(0.5), cluster_recall.at(0.5), cluster_recall.at(0.1), cluster_mass.at(0.5),
                  cluster_mass.at(0.1), cluster_difference.at(0.5), cluster_difference.at(0.9));
    if (cluster_count > 0)
      std::printf("%-12s clusters probed by centre score (IVF), %.0f%% of the chunks: %.0f read, recall@k %.3f / %.3f, mass recall %.3f / %.3f "
                  "(med / p10), output difference %.2g / %.2g (med / p90)\n",
                  "", 100.0 * probe_share, centre_probe.at(0.5), centre_recall.at(0.5), centre_recall.at(0.1), centre_mass.at(0.5),
                  centre_mass.at(0.1), centre_difference.at(0.5), centre_difference.at(0.9));
    if (cluster_count > 0)
      std::printf("%-12s clusters probed by box bound and centre score in turn, %.0f%% of the chunks: %.0f read, mass recall %.3f / %.3f\n", "",
                  100.0 * probe_share, mixed_probe.at(0.5), mixed_mass.at(0.5), mixed_mass.at(0.1));
    std::fflush(stdout);
  }
};

void print_header() {
  std::printf("%-12s %8s | %-15s | %-15s | %-22s | %-13s | %-13s | %-17s | %s\n", "tokens", "chunks", "flat med / p90", "exact med / p90",
              "beam med / p90, share", "recall@k", "mass recall", "output diff.", "searches");
  std::printf("%-12s %8s | %-15s | %-15s | %-22s | %-13s | %-13s | %-17s |\n", "", "", "(summaries read)", "", "", "med / p10", "med / p10",
              "med / p90");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Summaries the chunk-index searches read, and the beam's fidelity to the flat scan, on real and synthetic caches"};
  std::string model_name = "passkey-256.bin", prompt_set = "../shared/data/passkey", synthetic_kind;
  std::vector<std::int64_t> lengths = {4096, 16384}, chunk_counts = {4096, 32768};
  std::size_t prompts_per_length = 3;
  int queries = 16;
  bool generate = false;
  longheads::attention_config knobs;
  knobs.chunk_size = 32;
  knobs.budget_chunks = 8;
  longheads::bound_tree_beam beam;
  synthetic::spec spec;
  app.add_option("--model", model_name, "llama2.c checkpoint (also searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--prompt-set", prompt_set, "a shared passkey prompt set (manifest.jsonl + .bin)")->capture_default_str();
  app.add_flag("--generate", generate, "generate the prompts (needle depths spread evenly) with <model>.vocab.txt instead");
  app.add_option("--lengths", lengths, "prompt lengths, e.g. 4096,16384")->delimiter(',')->capture_default_str();
  app.add_option("--prompts", prompts_per_length, "prompts per length")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--synthetic", synthetic_kind, "synthetic caches instead of a model's: clustered or iid")->check(CLI::IsMember({"clustered", "iid"}));
  app.add_option("--chunk-counts", chunk_counts, "--synthetic: full chunks per cache")->delimiter(',')->capture_default_str();
  app.add_option("--queries", queries, "--synthetic: queries per head")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--clusters", spec.clusters, "--synthetic clustered: key clusters")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", spec.seed, "--synthetic: seed")->capture_default_str();
  app.add_option("--chunk-size", knobs.chunk_size, "tokens per chunk (w)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunks", knobs.budget_chunks, "chunks each head reads per query (k)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--fanout", beam.branching, "chunks (or boxes) per box")->check(CLI::Range(2, 1024))->capture_default_str();
  app.add_option("--beam", beam.beam, "boxes the beam opens per level")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--exact-below", beam.exact_below, "candidates up to which the beam is widened to every box (the policy's 1024)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  int cluster_count = 0;
  float epsilon = 1.0f;
  app.add_option("--epsilon", epsilon, "the certified search's slack: every chunk it skips scores at most its k-th + epsilon")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--cluster-boxes", cluster_count, "also measure the experiment of boxes over this many k-means clusters of the summaries (0: off)")
      ->check(CLI::NonNegativeNumber);
  double probe_share = 0.05;
  app.add_option("--probe-share", probe_share, "--cluster-boxes: the share of the chunks an approximate probe reads")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  std::vector<std::string> key_specs;
  app.add_option("--key-clusters", key_specs,
                 "also measure key_cluster_index policies, each S:C:share:min[:max][:order] (segment chunks, clusters per segment, probe share, probe "
                 "minimum, probe maximum (default: none), probe order: mixed (box bound and centre score in turn, the default) or box), e.g. "
                 "2048:64:0.02:512:1024 (the default's); a suffix @R stops each query's search after R summaries read (boxes, centres, chunks)")
      ->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  std::vector<longheads::key_cluster_index> key_indexes;
  for (std::string spec_text : key_specs) {
    longheads::key_cluster_index index;
    if (const auto at = spec_text.find('@'); at != std::string::npos) {  // ...@R: a read budget
      const char* const budget_end = spec_text.data() + spec_text.size();
      if (const auto [rest, error] = std::from_chars(spec_text.data() + at + 1, budget_end, index.read_max);
          error != std::errc{} || rest != budget_end || index.read_max < 0) {
        std::fprintf(stderr, "index_reads: --key-clusters wants a read budget (a whole number >= 0) after '@', got '%s'\n", spec_text.c_str());
        return 2;
      }
      spec_text.resize(at);
    }
    char order[16] = "mixed";
    index.probe_max = std::numeric_limits<int>::max();
    int fields = std::sscanf(spec_text.c_str(), "%d:%d:%f:%d:%d:%15s", &index.segment_chunks, &index.clusters, &index.probe_share, &index.probe_min,
                             &index.probe_max, order);
    if (fields == 4) fields = std::sscanf(spec_text.c_str(), "%d:%d:%f:%d:%15s", &index.segment_chunks, &index.clusters, &index.probe_share, &index.probe_min, order);
    if (fields < 4 || (std::string(order) != "mixed" && std::string(order) != "box")) {
      std::fprintf(stderr, "index_reads: --key-clusters wants S:C:share:min[:max][:box|mixed], got '%s'\n", spec_text.c_str());
      return 2;
    }
    index.probe_order = std::string(order) == "box" ? longheads::cluster_probe::box_bound : longheads::cluster_probe::box_and_centre;
    index.validate();
    key_indexes.push_back(index);
  }
  // Each key-cluster index's state for each representation head of a cache, fed its summaries.
  auto key_states_of = [&](const longheads::kv_cache& cache) {
    std::vector<std::vector<longheads::chunk_index_state>> out;
    const int per_head = cache.shape().n_q_heads / cache.shape().summary_heads();
    for (const auto& index : key_indexes) {
      out.emplace_back();
      for (int h = 0; h < cache.shape().summary_heads(); ++h) {
        const auto rows = cache.representations(h * per_head);
        out.back().emplace_back(cache.shape().head_dim, index.layout()).reserve(rows.rows());
        for (std::int64_t c = 0; c < rows.rows(); ++c) out.back().back().append({rows.data(), c + 1, rows.cols(), rows.row_stride()});
      }
    }
    return out;
  };
  auto cluster = [&](const longheads::kv_cache& cache) {
    std::vector<cluster_boxes> out;
    for (int h = 0; h < cache.shape().summary_heads() && cluster_count > 0; ++h)
      out.emplace_back(longheads::matrix_view<const float>(cache.representations(h * (cache.shape().n_q_heads / cache.shape().summary_heads()))),
                       cluster_count, 4);
    return out;
  };
  const auto wanted = static_cast<std::size_t>(knobs.budget_chunks - knobs.sink_chunks - knobs.local_chunks);
  std::printf("fan-out %d, beam %d, exact below %d candidates; %zu chunks wanted per search (k %d minus sink and local chunks)\n", beam.branching,
              beam.beam, beam.exact_below, wanted, knobs.budget_chunks);

  if (!synthetic_kind.empty()) {
    spec.clustered = synthetic_kind == "clustered";
    longheads::attention_config config = knobs;
    config.n_q_heads = 4;
    config.n_kv_heads = 2;
    config.head_dim = 32;
    const longheads::rope rotary(config.head_dim);
    longheads::attention<llama2c::policies::quest_beam> layer(config, rotary, {.index = beam});
    std::printf("synthetic %s caches: 4 q / 2 kv heads, d 32, w %d, %d queries per head at the last position, seed %u\n", spec.name().c_str(),
                config.chunk_size, queries, spec.seed);
    print_header();
    for (const std::int64_t chunks : chunk_counts) {
      longheads::kv_cache cache = layer.make_cache(chunks * config.chunk_size + 1);
      const auto qs = synthetic::fill(layer, cache, chunks, queries, spec);
      row r;
      r.chunks = chunks;
      r.epsilon = epsilon;
      r.probe_share = probe_share;
      const std::vector<cluster_boxes> clusters = cluster(cache);
      if (cluster_count > 0) r.clustered = &clusters, r.cluster_count = cluster_count;
      const auto states = key_states_of(cache);
      r.key_indexes = &key_indexes, r.key_states = &states;
      // The queries stand at the first position of the next chunk: every full chunk before the
      // local ones is a candidate. A token there makes the position one of the cache's.
      std::vector<float> zeros(static_cast<std::size_t>(config.n_q_heads + 2 * config.n_kv_heads) * config.head_dim, 0.0f);
      layer.ingest(cache, {zeros.data(), 1, config.n_q_heads, config.head_dim}, {zeros.data(), 1, config.n_kv_heads, config.head_dim},
                   {zeros.data(), 1, config.n_kv_heads, config.head_dim});
      const std::int64_t position = chunks * config.chunk_size, own = chunks;
      for (int h = 0; h < config.n_q_heads; ++h)
        for (int j = 0; j < queries; ++j)
          r.measure(cache, rotary, config, beam, h, position, qs[static_cast<std::size_t>(h)].data() + static_cast<std::ptrdiff_t>(j) * config.head_dim,
                    config.sink_chunks, own - config.local_chunks + 1, wanted);
      r.print(std::to_string(chunks * config.chunk_size));
    }
    return 0;
  }

  const auto model_path = llama2c::find_model(model_name, LONGHEADS_SOURCE_DIR);
  auto vocab_path = model_path ? std::filesystem::path(*model_path) : std::filesystem::path();
  vocab_path.replace_extension(".vocab.txt");
  const bool have_prompts = generate ? std::filesystem::exists(vocab_path) : std::filesystem::exists(std::filesystem::path(prompt_set) / "manifest.jsonl");
  if (!model_path || !have_prompts) {
    const std::string missing = !model_path ? "model '" + model_name + "'" : generate ? "vocabulary " + vocab_path.string() : "prompt set '" + prompt_set + "'";
    std::fprintf(stderr, "index_reads: skipped, %s not found (models are also looked for in $LONGHEADS_MODELS and ../shared/models)\n",
                 missing.c_str());
    return 77;
  }
  const llama2c::checkpoint model(model_path->string());
  llama2c::transformer<llama2c::policies::quest_beam> t(model, knobs, {.index = beam});
  const int w = knobs.chunk_size;
  print_header();
  for (const std::int64_t length : lengths) {
    std::vector<llama2c::passkey_prompt> prompts;
    if (generate) {
      const llama2c::vocabulary vocab(vocab_path);
      const llama2c::passkey_task task(vocab);
      for (std::size_t i = 0; i < prompts_per_length; ++i)
        prompts.push_back(task.make(length, (static_cast<double>(i) + 0.5) / static_cast<double>(prompts_per_length), 7 + i));
    } else {
      prompts = llama2c::load_prompt_set(prompt_set, {length}, model.config().vocab_size);
      prompts.resize(std::min(prompts.size(), prompts_per_length));
    }
    row r;
    r.epsilon = epsilon;
    r.probe_share = probe_share;
    t.reserve(length, 512);
    for (const auto& p : prompts) {
      t.reset();
      std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));
      llama2c::feed(t, p.tokens, 512, logits);
      const std::int64_t position = t.position() - 1, own = position / w;
      r.chunks = t.cache(0).full_chunks();
      for (int l = 0; l < model.config().n_layers; ++l) {
        const std::vector<cluster_boxes> clusters = cluster(t.cache(l));  // this layer's cache's (none without --cluster-boxes)
        r.clustered = cluster_count > 0 ? &clusters : nullptr;
        const auto states = key_states_of(t.cache(l));
        r.key_indexes = &key_indexes, r.key_states = &states;
        for (int h = 0; h < model.config().n_heads; ++h)
          r.measure(t.cache(l), t.attention().rotary(), t.attention().config(), beam, h, position,
                    t.last_query(l).data() + static_cast<std::ptrdiff_t>(h) * model.config().head_dim(), knobs.sink_chunks,
                    own - knobs.local_chunks + 1, wanted);
      }
      r.clustered = nullptr;
      r.key_states = nullptr;
    }
    if (cluster_count > 0) r.cluster_count = cluster_count;
    r.print(std::to_string(length));
  }
  return 0;
}
