// SPDX-License-Identifier: MIT
// longheads_llama2c_mpi: a llama2.c model whose KV cache is spread over the ranks of an MPI job.
//
//   mpirun -np 4 build/examples/longheads_llama2c_mpi --passkey --lengths 1048576 --policy recommended
//   mpirun -np 3 build/examples/longheads_llama2c_mpi --check --tokens 3000 --policies paper,quest,quest-index
//
// Rank 0 runs the model (embeddings, projections, feed-forward, logits); every rank, rank 0
// included, holds one shard of every layer's cache: a contiguous range of chunks (rank r chunks
// [r S, (r + 1) S), the last rank everything after), so rank 0 keeps the sinks and a growing
// sequence appends on the last rank. One layer's attention for a block of T tokens is:
//   1. broadcast the block's queries; scatter its keys and values to the ranks whose ranges
//      hold them (each ingests them into its cache);
//   2. every rank offers its best candidate chunks per query head (longheads::offer_candidates),
//      gathered at rank 0, which merges them into the global choice (choose_from_offers): the
//      single-process selection, chunk for chunk. An index policy (quest-index, recommended)
//      instead sends each new chunk's summary to rank 0, whose chunk_index_store is the whole
//      sequence's index; rank 0 searches it (offer_from_store): the single-process choice for
//      the approximate beam too (--index-at shards: each rank searches its own tree, which the
//      beam's choice depends on);
//   3. broadcast the choice; every rank attends its chosen chunks (attend_chosen);
//   4. gather the partial softmax states at rank 0, which merges them in rank order
//      (merge_attended).
// What crosses the network per token and layer is the query, the token's own key and value
// (to one rank), a few candidates (or 1/w of a chunk summary) and one partial state per head and rank: the same at 4k and
// 1M tokens (docs/sharding.md measures it). The library has no MPI in it; this file is the
// transport.
//
// --check compares every layer step with one process's attention over the same inputs
// (selections ==, outputs within 1e-6 of the largest, bitwise with one rank) and the greedy
// tokens with a one-process run; --compare answers every passkey prompt in one process too.
// Exit status: 0, 1 on a difference, 77 when the model is not found (tests skip).
#include <mpi.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <sys/resource.h>
#include <vector>

#include "../common/attention_flags.hpp"
#include "checkpoint.hpp"
#include "passkey.hpp"
#include "policies.hpp"
#include "transformer.hpp"

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

struct options {
  std::string model = "passkey-256.bin";
  std::string vocab;
  tools::attention_flags attention;
  std::int64_t split = 512;
  std::vector<std::string> policies = {"paper"};
  std::vector<std::string> storages = {"fp32"};
  std::string index_at = "root";  // where an index policy searches: rank 0's store of every chunk, or each rank's own tree
  // --check
  bool check = false;
  std::int64_t tokens = 3000;
  int decode = 16;
  // --passkey
  bool passkey = false;
  std::vector<std::int64_t> lengths;
  int depths = 1;
  std::uint64_t seed = 42;
  std::string prompt_set;
  bool compare = false;
  int latency = 0;  // decode steps timed after the answer
};

// ------------------------------------------------------------------------------------ traffic

/// Bytes that crossed between ranks (to or from a rank other than 0), and K/V bytes the
/// ranks' kernels read, over `token_layers` (token, layer) steps.
struct traffic {
  double queries = 0, keys_values = 0, summaries = 0, offers = 0, choices = 0, partials = 0;
  double kv_read = 0;                // all ranks
  std::vector<double> kv_read_rank;  // per rank
  double token_layers = 0;
  double sent() const noexcept { return queries + keys_values + summaries + offers + choices + partials; }
  void clear(int ranks) { *this = traffic{}, kv_read_rank.assign(static_cast<std::size_t>(ranks), 0.0); }
};

// ------------------------------------------------------------------------------------- shards

enum class op : std::int64_t { attend = 1, start = 2, stop = 3 };

/// Every rank's shards of every layer, and the step of one layer over them. Rank 0 drives
/// (start, attend, stop); the other ranks serve() until stop.
template <class Policies>
class shard_group {
 public:
  // `threads`: lanes of this rank's shard work (its heads run in parallel; the same bits on any count).
  // `index_at_root`: an index policy searches rank 0's chunk_index_store, fed every rank's new
  // chunk summaries (the single-process choice on any number of ranks), not each rank's own tree.
  shard_group(const llama2c::model_config& model, const longheads::attention_config& knobs, unsigned threads, bool index_at_root, MPI_Comm comm)
      : comm_(comm),
        layer_(llama2c::attention_config_for(model, knobs),
               longheads::rope(model.head_dim(), 10000.0, longheads::rope_layout::interleaved, llama2c::llama2c_float_frequencies{}),
               llama2c::policies::make_set<Policies>({1, 2, threads, llama2c::policies::knobs{}.beam, 0})) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &ranks_);
    for (int l = 0; l < model.n_layers; ++l) caches_.push_back(layer_.make_cache(0, &tools::huge_pages()));
    if constexpr (indexed) {
      index_at_root_ = index_at_root;
      if (index_at_root_ && rank_ == 0)
        for (int l = 0; l < model.n_layers; ++l) stores_.emplace_back(layer_.shape());
    }
    exported_.assign(caches_.size(), 0);
    stats_.clear(ranks_);
  }

  const longheads::attention<Policies>& layer() const noexcept { return layer_; }
  int ranks() const noexcept { return ranks_; }
  const traffic& stats() const noexcept { return stats_; }
  void clear_stats() { stats_.clear(ranks_); }

  /// Rank 0: a new sequence of up to `tokens` tokens (more go to the last rank): every rank
  /// clears its caches and takes chunks [r S, (r + 1) S) with S = ceil(chunks / ranks).
  void start(std::int64_t tokens) {
    std::int64_t header[4] = {static_cast<std::int64_t>(op::start), 0, tokens, 0};
    MPI_Bcast(header, 4, MPI_INT64_T, 0, comm_);
    on_start(tokens);
  }
  void stop() {
    std::int64_t header[4] = {static_cast<std::int64_t>(op::stop), 0, 0, 0};
    MPI_Bcast(header, 4, MPI_INT64_T, 0, comm_);
  }
  /// Ranks > 0: serves rank 0's steps until it stops. An error ends the job (MPI_Abort): the
  /// steps are collective, so one rank cannot go on without the others.
  void serve() {
    for (;;) {
      std::int64_t header[4];
      MPI_Bcast(header, 4, MPI_INT64_T, 0, comm_);
      try {
        switch (static_cast<op>(header[0])) {
          case op::start: on_start(header[2]); break;
          case op::attend: step(static_cast<int>(header[1]), header[2], header[3], {}, {}, {}, {}, nullptr); break;
          case op::stop: return;
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank_, e.what());
        MPI_Abort(comm_, 1);
      }
    }
  }

  /// Rank 0: the attention of `layer` for a block at positions first.. (what
  /// attention::prefill computes over one cache), with the block's selections if asked.
  void attend(int layer, std::int64_t first, longheads::tensor_view<const float> q, longheads::tensor_view<const float> k,
              longheads::tensor_view<const float> v, longheads::tensor_view<float> out, std::vector<std::int32_t>* selections) {
    std::int64_t header[4] = {static_cast<std::int64_t>(op::attend), layer, first, q.tokens()};
    MPI_Bcast(header, 4, MPI_INT64_T, 0, comm_);
    step(layer, first, q.tokens(), q, k, v, out, selections);
  }

 private:
  void on_start(std::int64_t tokens) {
    const std::int64_t w = layer_.config().chunk_size;
    const std::int64_t chunks = std::max<std::int64_t>(1, (tokens + w - 1) / w);
    chunks_per_rank_ = (chunks + ranks_ - 1) / ranks_;
    const std::int64_t mine = rank_ + 1 == ranks_ ? std::max<std::int64_t>(0, chunks - rank_ * chunks_per_rank_) : chunks_per_rank_;
    for (auto& c : caches_) {
      c.clear();
      c.reserve(mine * w);
    }
    for (auto& store : stores_) {
      store.clear();
      store.reserve(chunks);
    }
    if constexpr (indexed)
      if (!stores_.empty()) scratch_.reserve_search(layer_, chunks);
    std::fill(exported_.begin(), exported_.end(), 0);
    scratch_.reserve(layer_, mine, 512);
  }
  std::int64_t first_token(int r) const noexcept { return r * chunks_per_rank_ * layer_.config().chunk_size; }
  std::int64_t end_token(int r) const noexcept {
    return r + 1 == ranks_ ? std::numeric_limits<std::int64_t>::max() : first_token(r + 1);
  }
  int owner(std::int64_t chunk) const noexcept { return static_cast<int>(std::min<std::int64_t>(chunk / chunks_per_rank_, ranks_ - 1)); }

  // One layer's step on every rank; q, k, v, out and selections only on rank 0.
  void step(int layer, std::int64_t first, std::int64_t T, longheads::tensor_view<const float> q_in, longheads::tensor_view<const float> k_in,
            longheads::tensor_view<const float> v_in, longheads::tensor_view<float> out, std::vector<std::int32_t>* selections) {
    const longheads::attention_config& config = layer_.config();
    const int hq = config.n_q_heads, hkv = config.n_kv_heads, d = config.head_dim, k = config.budget_chunks;
    const std::size_t wanted = longheads::offered_per_head(config);
    const auto heads = static_cast<std::size_t>(T * hq);
    const bool root = rank_ == 0;
    const double others = ranks_ - 1;

    // 1. Queries to every rank, keys and values to their owners.
    q_.resize(heads * static_cast<std::size_t>(d));
    if (root)
      for (std::int64_t t = 0; t < T; ++t) std::copy_n(q_in.at(t, 0), hq * d, q_.data() + t * hq * d);
    MPI_Bcast(q_.data(), static_cast<int>(q_.size()), MPI_FLOAT, 0, comm_);
    const longheads::tensor_view<const float> q(q_.data(), T, hq, d);
    const int row = hkv * d;
    std::vector<int>& counts = counts_;  // floats of keys (and of values) each rank receives
    std::vector<int>& displs = displs_;
    counts.assign(static_cast<std::size_t>(ranks_), 0);
    displs.assign(static_cast<std::size_t>(ranks_), 0);
    for (int r = 0; r < ranks_; ++r) {
      const std::int64_t lo = std::clamp(first_token(r), first, first + T), hi = std::clamp(end_token(r), first, first + T);
      counts[static_cast<std::size_t>(r)] = static_cast<int>((hi - lo) * row);
      displs[static_cast<std::size_t>(r)] = static_cast<int>((lo - first) * row);
    }
    const int mine = counts[static_cast<std::size_t>(rank_)];
    const std::int64_t my_first = first + displs[static_cast<std::size_t>(rank_)] / row;
    if (root) {
      k_all_.resize(static_cast<std::size_t>(T * row));
      v_all_.resize(static_cast<std::size_t>(T * row));
      for (std::int64_t t = 0; t < T; ++t) {
        std::copy_n(k_in.at(t, 0), row, k_all_.data() + t * row);
        std::copy_n(v_in.at(t, 0), row, v_all_.data() + t * row);
      }
    }
    k_mine_.resize(static_cast<std::size_t>(mine));
    v_mine_.resize(static_cast<std::size_t>(mine));
    MPI_Scatterv(k_all_.data(), counts.data(), displs.data(), MPI_FLOAT, k_mine_.data(), mine, MPI_FLOAT, 0, comm_);
    MPI_Scatterv(v_all_.data(), counts.data(), displs.data(), MPI_FLOAT, v_mine_.data(), mine, MPI_FLOAT, 0, comm_);
    longheads::kv_cache& cache = caches_[static_cast<std::size_t>(layer)];
    if (mine > 0) {
      const std::int64_t n = mine / row;
      layer_.ingest(cache, q.slice(my_first - first, n), {k_mine_.data(), n, hkv, d}, {v_mine_.data(), n, hkv, d});
    }
    const longheads::cache_shard shard = longheads::make_shard(cache, static_cast<std::int32_t>(rank_ * chunks_per_rank_));

    // [snippet:step]
    // (Index policies: the chunks this rank completed go to rank 0's store of the sequence.)
    if (index_at_root_) send_summaries(layer, cache);
    // 2. Candidates from every rank, merged at rank 0 into the global choice.
    offers_.resize(heads * wanted);
    offer_counts_.resize(heads);
    if (index_at_root_) {
      // Rank 0 searches the whole sequence's index (its store): one offer, the single-process one.
      if constexpr (indexed)
        if (root) {
          longheads::offer_from_store(layer_, stores_[static_cast<std::size_t>(layer)], q, first, offers_, offer_counts_, scratch_);
          offer_views_.assign(1, offers_);
          count_views_.assign(1, offer_counts_);
        }
    } else {
      longheads::offer_candidates(layer_, shard, q, first, offers_, offer_counts_, scratch_);
      if (root) {
        all_offers_.resize(offers_.size() * static_cast<std::size_t>(ranks_));
        all_counts_.resize(heads * static_cast<std::size_t>(ranks_));
      }
      MPI_Gather(offers_.data(), static_cast<int>(offers_.size() * sizeof(longheads::chunk_candidate)), MPI_BYTE, all_offers_.data(),
                 static_cast<int>(offers_.size() * sizeof(longheads::chunk_candidate)), MPI_BYTE, 0, comm_);
      MPI_Gather(offer_counts_.data(), static_cast<int>(heads), MPI_INT32_T, all_counts_.data(), static_cast<int>(heads), MPI_INT32_T, 0, comm_);
      if (root) {
        offer_views_.clear();
        count_views_.clear();
        for (int r = 0; r < ranks_; ++r) {
          offer_views_.emplace_back(all_offers_.data() + static_cast<std::size_t>(r) * offers_.size(), offers_.size());
          count_views_.emplace_back(all_counts_.data() + static_cast<std::size_t>(r) * heads, heads);
        }
      }
    }
    chosen_.resize(heads * static_cast<std::size_t>(k));
    if (root) longheads::choose_from_offers(layer_, first, T, offer_views_, count_views_, chosen_, pool_);

    // 3. The choice to every rank; each attends the chosen chunks it holds.
    MPI_Bcast(chosen_.data(), static_cast<int>(chosen_.size()), MPI_INT32_T, 0, comm_);
    states_.assign(heads, {});
    partial_.assign(heads * static_cast<std::size_t>(d), 0.0f);
    longheads::attend_chosen(layer_, shard, q, first, chosen_, states_, {partial_.data(), T, hq, d}, scratch_);

    // 4. Partial states to rank 0, merged in rank order.
    if (root) {
      all_states_.resize(heads * static_cast<std::size_t>(ranks_));
      all_partials_.resize(partial_.size() * static_cast<std::size_t>(ranks_));
    }
    MPI_Gather(states_.data(), static_cast<int>(heads * sizeof(longheads::softmax_state)), MPI_BYTE, all_states_.data(),
               static_cast<int>(heads * sizeof(longheads::softmax_state)), MPI_BYTE, 0, comm_);
    MPI_Gather(partial_.data(), static_cast<int>(partial_.size()), MPI_FLOAT, all_partials_.data(), static_cast<int>(partial_.size()), MPI_FLOAT,
               0, comm_);
    if (!root) return;
    state_views_.clear();
    out_views_.clear();
    for (int r = 0; r < ranks_; ++r) {
      state_views_.emplace_back(all_states_.data() + static_cast<std::size_t>(r) * heads, heads);
      out_views_.emplace_back(all_partials_.data() + static_cast<std::size_t>(r) * partial_.size(), T, hq, d);
    }
    longheads::merge_attended(layer_, state_views_, out_views_, out);
    // [/snippet:step]
    if (selections) *selections = chosen_;

    // What crossed between ranks (rank 0's own parts stay in memory), and what the kernels read.
    stats_.queries += others * static_cast<double>(q_.size() * sizeof(float));
    stats_.keys_values += 2.0 * static_cast<double>(T * row - counts[0]) * sizeof(float);
    if (!index_at_root_) stats_.offers += others * static_cast<double>(offers_.size() * sizeof(longheads::chunk_candidate) + heads * sizeof(std::int32_t));
    stats_.choices += others * static_cast<double>(chosen_.size() * sizeof(std::int32_t));
    stats_.partials += others * static_cast<double>(heads * sizeof(longheads::softmax_state) + partial_.size() * sizeof(float));
    stats_.token_layers += static_cast<double>(T);
    const double row_bytes = config.kv_storage == longheads::kv_precision::int8
                                 ? 2.0 * static_cast<double>(longheads::int8_storage_bytes(static_cast<std::size_t>(d), d))
                                 : 2.0 * d * static_cast<double>(longheads::kv_element_bytes(config.kv_storage));
    const std::int64_t w = config.chunk_size;
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t p = first + t, i = p / w;
      for (int h = 0; h < hq; ++h)
        for (int j = 0; j < k; ++j) {
          const std::int32_t c = chosen_[static_cast<std::size_t>((t * hq + h) * k + j)];
          if (c < 0) break;
          const double bytes = static_cast<double>(c == i ? p % w + 1 : w) * row_bytes;
          stats_.kv_read += bytes;
          stats_.kv_read_rank[static_cast<std::size_t>(owner(c))] += bytes;
        }
    }
  }

  /// The chunks this rank summarised since the last step, to rank 0's store of `layer`, in rank
  /// order: ranks hold consecutive chunk ranges, and a rank's chunks are all summarised before
  /// the next rank takes a token, so rank order is the sequence's order.
  void send_summaries(int layer, const longheads::kv_cache& cache) {
    std::int64_t& done = exported_[static_cast<std::size_t>(layer)];
    const std::int64_t now = cache.summarised_chunks();
    const std::size_t per_chunk = static_cast<std::size_t>(layer_.shape().summary_heads()) * layer_.shape().representation_floats;
    summary_rows_.resize(static_cast<std::size_t>(now - done) * per_chunk);
    longheads::export_representations(cache, done, now, summary_rows_);
    // Per rank: how many floats it sends, and the sequence's id of their first chunk.
    const int mine = static_cast<int>(summary_rows_.size());
    const int header[2] = {mine, static_cast<int>(rank_ * chunks_per_rank_ + done)};
    summary_headers_.assign(2 * static_cast<std::size_t>(ranks_), 0);
    MPI_Gather(header, 2, MPI_INT, summary_headers_.data(), 2, MPI_INT, 0, comm_);
    summary_counts_.assign(static_cast<std::size_t>(ranks_), 0);
    summary_displs_.assign(static_cast<std::size_t>(ranks_), 0);
    int total = 0;
    for (int r = 0; r < ranks_; ++r) {
      summary_counts_[static_cast<std::size_t>(r)] = summary_headers_[2 * static_cast<std::size_t>(r)];
      summary_displs_[static_cast<std::size_t>(r)] = total;
      total += summary_counts_[static_cast<std::size_t>(r)];
    }
    all_summary_rows_.resize(rank_ == 0 ? static_cast<std::size_t>(total) : 0);
    MPI_Gatherv(summary_rows_.data(), mine, MPI_FLOAT, all_summary_rows_.data(), summary_counts_.data(), summary_displs_.data(), MPI_FLOAT, 0, comm_);
    if (rank_ == 0) {
      longheads::chunk_index_store& store = stores_[static_cast<std::size_t>(layer)];
      for (int r = 0; r < ranks_; ++r) {  // each rank's chunks must continue the store exactly where it stands
        const auto rows = std::span<const float>(all_summary_rows_).subspan(static_cast<std::size_t>(summary_displs_[static_cast<std::size_t>(r)]),
                                                                            static_cast<std::size_t>(summary_counts_[static_cast<std::size_t>(r)]));
        const int first = summary_headers_[2 * static_cast<std::size_t>(r) + 1];
        if (!rows.empty() && store.chunks() != first)
          throw std::logic_error("rank " + std::to_string(r) + " sent chunks from " + std::to_string(first) + " but rank 0's store holds " +
                                 std::to_string(store.chunks()));
        store.append(rows);
      }
      stats_.summaries += static_cast<double>(total - mine) * sizeof(float);
    }
    done = now;
  }

  static constexpr bool indexed = Policies::index::indexed;
  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  bool index_at_root_ = false;
  std::vector<longheads::chunk_index_store> stores_;  // rank 0, index_at_root_: every layer's index over the whole sequence
  std::vector<std::int64_t> exported_;                // per layer: chunks sent to rank 0's store
  std::vector<float> summary_rows_, all_summary_rows_;
  std::vector<int> summary_headers_, summary_counts_, summary_displs_;
  longheads::attention<Policies> layer_;
  std::vector<longheads::kv_cache> caches_;  // this rank's shard of every layer
  std::int64_t chunks_per_rank_ = 1;
  longheads::shard_scratch scratch_;
  std::vector<float> q_, k_all_, v_all_, k_mine_, v_mine_, partial_, all_partials_;
  std::vector<int> counts_, displs_;
  std::vector<longheads::chunk_candidate> offers_, all_offers_, pool_;
  std::vector<std::int32_t> offer_counts_, all_counts_, chosen_;
  std::vector<longheads::softmax_state> states_, all_states_;
  // Rank 0's views of the gathered parts, kept so a step allocates nothing once sizes settle.
  std::vector<std::span<const longheads::chunk_candidate>> offer_views_;
  std::vector<std::span<const std::int32_t>> count_views_;
  std::vector<std::span<const longheads::softmax_state>> state_views_;
  std::vector<longheads::tensor_view<const float>> out_views_;
  traffic stats_;
};

// --------------------------------------------------------------------------------- rank 0 side

/// How far the sharded layers are from one process's attention over the same inputs.
struct layer_check {
  std::int64_t steps = 0, selections = 0, differing_selections = 0, differing_bits = 0;
  double worst = 0;       // of a layer step: ||sharded - one process|| / ||one process|| over its [T, H_q, d] outputs
  double worst_element = 0;  // of a layer step: largest |difference| / largest |output|
};

/// Rank 0's model: the host's transformer for everything but attention, whose layers run on
/// the shards. With `check`, every layer step also runs over the transformer's own caches.
template <class Policies>
class sharded_model {
 public:
  // `threads`: lanes of rank 0's projections (and of its one-process attention for --check and --compare).
  sharded_model(const llama2c::checkpoint& ckpt, const longheads::attention_config& knobs, unsigned threads, shard_group<Policies>& shards,
                bool check)
      : model_(ckpt, knobs, llama2c::policies::make_set<Policies>({1, 2, threads, llama2c::policies::knobs{}.beam, 0})),
        shards_(shards),
        check_(check) {}

  llama2c::transformer<Policies>& local() noexcept { return model_; }
  const llama2c::model_config& config() const noexcept { return model_.config(); }
  const layer_check& checked() const noexcept { return checked_; }

  void start(std::int64_t tokens) {
    shards_.start(tokens);
    position_ = 0;
    if (check_) model_.reset();
  }

  void forward(std::span<const std::int32_t> tokens, std::span<float> logits) {
    model_.forward_with(tokens, logits, [&](int layer, auto q, auto k, auto v, auto out) {
      shards_.attend(layer, position_, q, k, v, out, check_ ? &selections_ : nullptr);
      if (check_) compare(layer, q, k, v, out);
    });
    position_ += static_cast<std::int64_t>(tokens.size());
  }

 private:
  void compare(int layer, longheads::tensor_view<const float> q, longheads::tensor_view<const float> k, longheads::tensor_view<const float> v,
               longheads::tensor_view<float> out) {
    const std::size_t n = static_cast<std::size_t>(out.tokens() * out.heads() * out.head_dim());
    reference_.resize(n);
    reference_selections_.resize(selections_.size());
    model_.attend_locally(layer, q, k, v, {reference_.data(), out.tokens(), out.heads(), out.head_dim()}, reference_selections_);
    const int kk = shards_.layer().config().budget_chunks;
    for (std::size_t s = 0; s < selections_.size(); s += static_cast<std::size_t>(kk)) {
      ++checked_.selections;
      checked_.differing_selections += !std::equal(selections_.begin() + static_cast<std::ptrdiff_t>(s),
                                                   selections_.begin() + static_cast<std::ptrdiff_t>(s) + kk, reference_selections_.begin() + static_cast<std::ptrdiff_t>(s));
    }
    double largest = 0, worst = 0, diff2 = 0, ref2 = 0;
    bool same = true;
    for (std::size_t e = 0; e < n; ++e) {
      const float got = out.data()[e], want = reference_[e];
      largest = std::max(largest, static_cast<double>(std::abs(want)));
      worst = std::max(worst, std::abs(static_cast<double>(got) - static_cast<double>(want)));
      diff2 += (double(got) - double(want)) * (double(got) - double(want));
      ref2 += double(want) * double(want);
      same = same && std::bit_cast<std::uint32_t>(got) == std::bit_cast<std::uint32_t>(want);
    }
    ++checked_.steps;
    checked_.differing_bits += !same;
    if (largest > 0) checked_.worst_element = std::max(checked_.worst_element, worst / largest);
    if (ref2 > 0) checked_.worst = std::max(checked_.worst, std::sqrt(diff2 / ref2));
  }

  llama2c::transformer<Policies> model_;
  shard_group<Policies>& shards_;
  bool check_;
  std::int64_t position_ = 0;
  std::vector<std::int32_t> selections_, reference_selections_;
  std::vector<float> reference_;
  layer_check checked_;
};

std::int32_t argmax(std::span<const float> v) { return static_cast<std::int32_t>(std::max_element(v.begin(), v.end()) - v.begin()); }

/// Feeds `prompt` in blocks of `split`, then `n` greedy tokens; returns them. The seconds of
/// each decode step (a token's forward) go to `step_seconds` if given.
template <class Model>
std::vector<std::int32_t> run_sequence(Model& model, std::span<const std::int32_t> prompt, int n, std::int64_t split,
                                       std::vector<double>* step_seconds = nullptr) {
  std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));
  llama2c::feed(model, prompt, split, logits);
  std::vector<std::int32_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(argmax(logits));
    if (i + 1 == n) break;
    const auto start = clock_type::now();
    model.forward(std::span<const std::int32_t>(&out.back(), 1), logits);
    if (step_seconds) step_seconds->push_back(std::chrono::duration<double>(clock_type::now() - start).count());
  }
  return out;
}

/// "p50 / p99 / max" of decode steps, in milliseconds.
std::string latency(std::vector<double> seconds) {
  if (seconds.empty()) return "no steps";
  std::sort(seconds.begin(), seconds.end());
  auto at = [&](double q) { return 1e3 * seconds[std::min(seconds.size() - 1, static_cast<std::size_t>(q * static_cast<double>(seconds.size())))]; };
  char text[96];
  std::snprintf(text, sizeof text, "%.2f / %.2f / %.2f ms (p50 / p99 / max of %zu steps)", at(0.5), at(0.99), 1e3 * seconds.back(), seconds.size());
  return text;
}

void print_traffic(const traffic& s, int layers) {
  const double per = s.token_layers > 0 ? 1.0 / s.token_layers : 0.0;
  std::printf("  between ranks per token and layer: %.0f bytes (queries %.0f, keys+values %.0f, chunk summaries %.0f, candidates %.0f, choice %.0f, "
              "partial states %.0f)\n",
              s.sent() * per, s.queries * per, s.keys_values * per, s.summaries * per, s.offers * per, s.choices * per, s.partials * per);
  double most = 0;
  for (double r : s.kv_read_rank) most = std::max(most, r);
  std::printf("  K/V read per token and layer: %.0f bytes over all ranks, %.0f on the busiest rank (%d layers)\n", s.kv_read * per, most * per,
              layers);
}

struct passkey_line {
  std::string name;
  std::int64_t length = 0;
  bool right = false, same_as_one_process = true;
  double seconds = 0;
};

template <class Policies>
int drive(const llama2c::checkpoint& ckpt, const options& o, const longheads::attention_config& knobs, shard_group<Policies>& shards,
          const std::string& label) {
  int failures = 0;
  sharded_model<Policies> model(ckpt, knobs, o.attention.threads, shards, o.check);
  const int layers = ckpt.config().n_layers;
  if (o.check) {
    const fs::path vocab_path = o.vocab;
    const llama2c::vocabulary vocab(vocab_path);
    const llama2c::passkey_task task(vocab);
    const llama2c::passkey_prompt prompt = task.make(o.tokens, 0.3, o.seed);
    shards.clear_stats();
    model.start(o.tokens + o.decode);
    const std::vector<std::int32_t> sharded = run_sequence(model, prompt.tokens, o.decode, o.split);
    auto& local = model.local();
    local.reset();
    const std::vector<std::int32_t> alone = run_sequence(local, prompt.tokens, o.decode, o.split);
    const layer_check& c = model.checked();
    // Every difference fails the check, whatever the policy (with --index-at shards a beam
    // searches each rank's own tree, which agrees with one process only while the search is
    // exact there: docs/sharding.md).
    const bool selections_ok = c.differing_selections == 0;
    // Relative as ||difference|| / ||output|| per layer step: element by element the gap reaches
    // ~2e-6 of the largest output, the size of fp32 softmax's own error at this model's logits
    // (docs/sharding.md), which no order of the same fp32 operations avoids.
    const bool outputs_ok = c.worst <= 1e-6 && c.worst_element <= 1e-5;
    const bool bits_ok = shards.ranks() > 1 || c.differing_bits == 0;
    const bool tokens_ok = sharded == alone;
    std::printf("%s, %d ranks, %lld prompt + %d decoded tokens: %lld layer steps, selections differing %lld / %lld, outputs' relative "
                "difference %.3g (largest |difference| / largest output %.3g), steps not bitwise %lld, greedy tokens %s\n",
                label.c_str(), shards.ranks(), static_cast<long long>(prompt.tokens.size()), o.decode, static_cast<long long>(c.steps),
                static_cast<long long>(c.differing_selections), static_cast<long long>(c.selections), c.worst, c.worst_element,
                static_cast<long long>(c.differing_bits), sharded == alone ? "the same" : "DIFFERENT");
    print_traffic(shards.stats(), layers);
    if (!(selections_ok && outputs_ok && bits_ok && tokens_ok)) {
      std::printf("  FAILED: the sharded layers are not the one-process layers%s\n", shards.ranks() == 1 ? " (one rank must be bitwise)" : "");
      ++failures;
    }
    return failures;
  }

  std::vector<llama2c::passkey_prompt> prompts;
  if (!o.prompt_set.empty()) {
    prompts = llama2c::load_prompt_set(o.prompt_set, o.lengths, ckpt.config().vocab_size);
    if (prompts.empty()) throw std::runtime_error(o.prompt_set + ": no prompts of the requested lengths");
  } else {
    const llama2c::vocabulary vocab(o.vocab);
    const llama2c::passkey_task task(vocab);
    const std::vector<std::int64_t> lengths = o.lengths.empty() ? std::vector<std::int64_t>{4096} : o.lengths;
    for (std::int64_t length : lengths)
      for (int d = 0; d < o.depths; ++d) prompts.push_back(task.make(length, (d + 0.5) / o.depths, o.seed + static_cast<std::uint64_t>(d)));
  }
  int right = 0, same = 0;
  for (const auto& p : prompts) {
    shards.clear_stats();
    const auto start = clock_type::now();
    const int decoded = llama2c::passkey_task::answer_tokens + o.latency;  // the answer, then --latency more steps
    model.start(p.length + o.latency);
    std::vector<double> steps, alone_steps;
    std::vector<std::int32_t> answer = run_sequence(model, p.tokens, decoded, o.split, &steps);
    const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
    const std::vector<std::int32_t> continuation = answer;
    answer.resize(llama2c::passkey_task::answer_tokens);
    right += answer == p.answer;
    std::string alone_note;
    if (o.compare) {
      auto& local = model.local();
      local.reset();
      local.reserve(p.length + o.latency, o.split);
      const auto alone_start = clock_type::now();
      const std::vector<std::int32_t> alone = run_sequence(local, p.tokens, decoded, o.split, &alone_steps);
      const double alone_seconds = std::chrono::duration<double>(clock_type::now() - alone_start).count();
      same += alone == continuation;
      failures += alone != continuation;
      alone_note = std::string(", one process: ") + (std::equal(p.answer.begin(), p.answer.end(), alone.begin()) ? "right" : "wrong") +
                   (alone == continuation ? " (the same tokens" : " (DIFFERENT tokens") +
                   ", " + std::to_string(alone_seconds).substr(0, 5) + " s)";
      local.reset();
    }
    std::printf("%s, %d ranks: %s (%lld tokens, needle at %.0f%%): %s in %.1f s, %.0f tokens/s%s\n", label.c_str(), shards.ranks(), p.name.c_str(),
                static_cast<long long>(p.length), 100.0 * p.depth, answer == p.answer ? "right" : "wrong", seconds,
                static_cast<double>(p.length) / seconds, alone_note.c_str());
    print_traffic(shards.stats(), layers);
    if (o.latency > 0) {
      std::printf("  decode step: %s", latency(steps).c_str());
      if (o.compare) std::printf("; one process: %s", latency(alone_steps).c_str());
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  std::printf("%s, %d ranks: %d/%zu answered", label.c_str(), shards.ranks(), right, prompts.size());
  if (o.compare) std::printf(", %d/%zu the same answer as one process", same, prompts.size());
  std::printf("\n");
  return failures;
}

template <class Policies>
int run(const llama2c::checkpoint& ckpt, const options& o, longheads::kv_precision storage, const std::string& policy, MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  longheads::attention_config knobs = o.attention.config;
  knobs.method = longheads::attention_method::longheads;
  knobs.kv_storage = storage;
  knobs.spread_encoding = false;  // a shard's chunk is encoded when it completes (longheads::make_shard)
  shard_group<Policies> shards(ckpt.config(), knobs, o.attention.threads, o.index_at == "root", comm);
  if (rank != 0) {
    shards.serve();
    return 0;
  }
  const std::string label = policy + ", " + longheads::to_string(storage);
  int failures = 0;
  try {
    failures = drive<Policies>(ckpt, o, knobs, shards, label);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    MPI_Abort(comm, 1);
  }
  shards.stop();
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);

  options o;
  o.attention.config.chunk_size = 32;
  o.attention.config.budget_chunks = 8;
  CLI::App app{"A llama2.c model with LongHeads attention over a KV cache spread across MPI ranks (docs/sharding.md)"};
  app.add_option("--model", o.model, "llama2.c checkpoint (found as the single-process host finds it)")->capture_default_str();
  app.add_option("--vocab", o.vocab, "vocabulary id<TAB>word (default: <model>.vocab.txt beside the model)");
  tools::add_attention_flags(app, o.attention, false);  // --threads: every rank's lanes (rank 0's projections too)
  app.add_option("--split", o.split, "prefill block size (tokens per step)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--policies", o.policies, "selection policies to run, comma separated (" + std::to_string(llama2c::policies::names().size()) +
                                               " names as longheads_llama2c --policy)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--policy", o.policies, "the same as --policies with one name")->delimiter(',');
  app.add_option("--storages", o.storages, "K/V storages to run, comma separated: fp32, bf16, int8")->delimiter(',')->capture_default_str();
  app.add_option("--index-at", o.index_at,
                 "where an index policy searches: root (rank 0's index of every rank's chunk summaries: the one-process choice on any number "
                 "of ranks) or shards (each rank its own tree, merged: the exact index agrees, the beam does not)")
      ->check(CLI::IsMember({"root", "shards"}))
      ->capture_default_str();
  auto* check = app.add_flag("--check", o.check, "compare every layer step and the greedy tokens with one process");
  app.add_option("--tokens", o.tokens, "--check: prompt tokens (a generated passkey prompt)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--decode", o.decode, "--check: tokens decoded after the prompt")->check(CLI::PositiveNumber)->capture_default_str();
  auto* passkey = app.add_flag("--passkey", o.passkey, "answer passkey prompts");
  app.add_option("--lengths", o.lengths, "--passkey: generated prompt lengths (prompt + answer)")->delimiter(',');
  app.add_option("--depths", o.depths, "--passkey: needle depths per length, spread evenly")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", o.seed, "generated prompts' seed")->capture_default_str();
  app.add_option("--prompt-set", o.prompt_set, "--passkey: a fixed prompt set (manifest.jsonl + .bin) instead of generated prompts");
  app.add_option("--latency", o.latency, "--passkey: greedy tokens decoded after the answer, each step timed (p50 / p99 / max)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--compare", o.compare, "--passkey: answer every prompt in one process too; exit 1 if an answer differs");
  check->excludes(passkey);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = rank == 0 ? app.exit(e) : (e.get_exit_code() != 0 ? 1 : 0);
    MPI_Finalize();
    return code;
  }
  if (!o.check && !o.passkey) o.check = true;

  int status = 0;
  try {
    const auto path = llama2c::find_model(o.model, LONGHEADS_SOURCE_DIR);
    if (!path) {
      if (rank == 0)
        std::printf("SKIP: model '%s' not found (looked in the working directory, $LONGHEADS_MODELS and ../shared/models)\n", o.model.c_str());
      MPI_Finalize();
      return 77;
    }
    if (o.vocab.empty()) {
      fs::path v = *path;
      v.replace_extension(".vocab.txt");
      o.vocab = v.string();
    }
    const llama2c::checkpoint ckpt(*path);
    if (rank == 0) {
      const auto& c = ckpt.config();
      std::printf("%s: %d layers, %d q / %d kv heads of %d; w %d, k %d; %d ranks, each holding a contiguous range of every layer's chunks\n",
                  path->filename().string().c_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim(), o.attention.config.chunk_size,
                  o.attention.config.budget_chunks, ranks);
      std::fflush(stdout);
    }
    for (const std::string& storage_name : o.storages) {
      const longheads::kv_precision storage = storage_name == "bf16"   ? longheads::kv_precision::bf16
                                              : storage_name == "int8" ? longheads::kv_precision::int8
                                              : storage_name == "fp32" ? longheads::kv_precision::fp32
                                                                       : throw std::invalid_argument("unknown storage '" + storage_name + "'");
      for (const std::string& policy : o.policies)
        status |= llama2c::policies::with_policy(policy, [&]<class P>(std::type_identity<P>) {
          return run<P>(ckpt, o, storage, policy, MPI_COMM_WORLD) != 0 ? 1 : 0;
        });
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: error: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (rank == 0) {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    std::printf("rank 0 peak memory: %.2f GiB\n", static_cast<double>(usage.ru_maxrss) / (1 << 20));
  }
  MPI_Finalize();
  return rank == 0 ? status : 0;
}
