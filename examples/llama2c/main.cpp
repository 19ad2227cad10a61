// SPDX-License-Identifier: MIT
// longheads_llama2c: llama2.c-format models with LongHeads (or a baseline) attention.
//
//   longheads_llama2c --model stories260K.bin --generate 200
//   longheads_llama2c --model stories260K.bin --eval corpus.bin --chunk-size 64 --chunks 8
//   longheads_llama2c --model passkey-256.bin --passkey --lengths 256,4096,16384 --chunk-size 32 --chunks 8
//
// Models are found by --model, then $LONGHEADS_MODELS, then ../shared/models.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <sys/resource.h>
#include <unistd.h>
#include <vector>

#include "../common/attention_flags.hpp"
#include "checkpoint.hpp"
#include "passkey.hpp"
#include "plots.hpp"
#include "policies.hpp"
#include "selection_diagnostics.hpp"
#include "transformer.hpp"

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

struct options {
  std::string model = "passkey-256.bin";
  std::string vocab;
  tools::attention_flags attention;
  std::int64_t split = 512;
  // --generate
  int generate = 0;
  std::string prompt;
  float temperature = 0.0f;
  std::uint64_t seed = 42;
  // --eval
  std::string eval;
  std::vector<std::int64_t> buckets;
  std::string dump_logits, dump_nll;
  // --passkey
  bool passkey = false;
  std::vector<std::int64_t> lengths;
  int depths = 5;
  int trials = 1;
  std::string prompt_set;
  std::string task;  // --prompt-set of a retrieval set: only this task's prompts
  int prompts_per_length = 0;
  std::vector<std::string> methods = {"dense", "sink-window", "longheads"};
  std::string csv, plot, heatmap;
  bool quiet = false;
  bool answers = false;  // --passkey: print each prompt's passkey and answer
  std::string policy = "paper";
  int offset_chunks = 1;
  int representative_keys = 2;
  int beam = llama2c::policies::knobs{}.beam;
  int branching = 0;

  float epsilon = 0.0f;
  longheads::key_cluster_index clusters{};
  llama2c::policies::knobs policy_knobs() const { return {offset_chunks, representative_keys, attention.threads, beam, branching, epsilon, clusters}; }
};

template <class Policies>
using model_type = llama2c::transformer<Policies>;

template <class Policies>
model_type<Policies> make_model(const llama2c::checkpoint& ckpt, const options& o, longheads::attention_method method) {
  longheads::attention_config knobs = o.attention.config;
  knobs.method = method;
  return model_type<Policies>(ckpt, knobs, llama2c::policies::make_set<Policies>(o.policy_knobs()));
}

std::int32_t argmax(std::span<const float> logits) {
  return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

std::int32_t sample(std::span<const float> logits, float temperature, std::mt19937_64& rng) {
  if (temperature <= 0.0f) return argmax(logits);
  const float top = *std::max_element(logits.begin(), logits.end());
  std::vector<double> weights(logits.size());
  for (std::size_t i = 0; i < logits.size(); ++i) weights[i] = std::exp((logits[i] - top) / temperature);
  return static_cast<std::int32_t>(std::discrete_distribution<std::int32_t>(weights.begin(), weights.end())(rng));
}

// ---------------------------------------------------------------------------------- generate
template <class Policies>
int run_generate(const llama2c::checkpoint& ckpt, const options& o) {
  auto model = make_model<Policies>(ckpt, o, tools::parse_method(o.attention.method));
  const int vocab = ckpt.config().vocab_size;
  std::vector<std::int32_t> context = o.prompt.empty() ? std::vector<std::int32_t>{1} : llama2c::load_tokens(o.prompt, vocab);
  model.reserve(static_cast<std::int64_t>(context.size()) + o.generate, std::max<std::int64_t>(1, o.split));
  std::vector<float> logits(static_cast<std::size_t>(vocab));
  std::mt19937_64 rng(o.seed);
  std::vector<std::int32_t> generated;
  llama2c::feed(model, context, o.split, logits);
  for (int n = 0; n < o.generate; ++n) {
    const std::int32_t next = sample(logits, o.temperature, rng);
    generated.push_back(next);
    if (n + 1 < o.generate) model.forward(std::span<const std::int32_t>(&generated.back(), 1), logits);
  }
  for (std::size_t i = 0; i < generated.size(); ++i) std::printf("%s%d", i ? " " : "", generated[i]);
  std::printf("\n");
  if (!o.vocab.empty()) std::printf("%s\n", llama2c::vocabulary(o.vocab).decode(generated).c_str());
  return 0;
}

// -------------------------------------------------------------------------------------- eval
template <class Policies>
int run_eval(const llama2c::checkpoint& ckpt, const options& o) {
  auto model = make_model<Policies>(ckpt, o, tools::parse_method(o.attention.method));
  const std::int64_t vocab = ckpt.config().vocab_size;
  const std::vector<std::int32_t> tokens = llama2c::load_tokens(o.eval, static_cast<int>(vocab));
  const auto T = static_cast<std::int64_t>(tokens.size());
  if (T < 2) throw std::runtime_error(o.eval + ": need at least 2 tokens to score");
  model.reserve(T, std::max<std::int64_t>(1, o.split));
  const auto start = clock_type::now();
  // Logits of one block at a time, so a 1M-token file does not need [T, vocab] in memory.
  const std::int64_t step = o.split > 0 ? o.split : T;
  std::vector<float> logits(static_cast<std::size_t>(std::min(step, T) * vocab));
  std::vector<float> nll(static_cast<std::size_t>(T - 1));
  std::ofstream dump;
  if (!o.dump_logits.empty()) {
    dump.open(o.dump_logits, std::ios::binary);
    if (!dump) throw std::runtime_error(o.dump_logits + ": cannot write");
  }
  for (std::int64_t first = 0; first < T; first += step) {
    const std::int64_t n = std::min(step, T - first);
    std::span<float> rows(logits.data(), static_cast<std::size_t>(n * vocab));
    model.forward(std::span<const std::int32_t>(tokens).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(n)), rows);
    if (dump) dump.write(reinterpret_cast<const char*>(rows.data()), static_cast<std::streamsize>(rows.size() * sizeof(float)));
    for (std::int64_t r = 0; r < n && first + r + 1 < T; ++r) {
      const float* row = rows.data() + r * vocab;
      const double top = *std::max_element(row, row + vocab);
      double sum = 0;
      for (std::int64_t i = 0; i < vocab; ++i) sum += std::exp(double(row[i]) - top);
      nll[static_cast<std::size_t>(first + r)] = static_cast<float>(top + std::log(sum) - row[tokens[static_cast<std::size_t>(first + r + 1)]]);
    }
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  if (!o.dump_nll.empty()) {
    std::ofstream f(o.dump_nll, std::ios::binary);
    f.write(reinterpret_cast<const char*>(nll.data()), static_cast<std::streamsize>(nll.size() * sizeof(float)));
    if (!f) throw std::runtime_error(o.dump_nll + ": cannot write");
  }
  // Bucket by the position of the predicting token: [from, to).
  std::vector<std::int64_t> edges = {0};
  for (std::int64_t b : o.buckets)
    if (b > edges.back() && b < T - 1) edges.push_back(b);
  edges.push_back(T - 1);
  for (std::size_t b = 0; b + 1 < edges.size(); ++b) {
    double sum = 0;
    for (std::int64_t p = edges[b]; p < edges[b + 1]; ++p) sum += nll[static_cast<std::size_t>(p)];
    const std::int64_t n = edges[b + 1] - edges[b];
    std::printf("bucket %lld %lld ppl %.4f tokens %lld\n", static_cast<long long>(edges[b]), static_cast<long long>(edges[b + 1]),
                std::exp(sum / static_cast<double>(n)), static_cast<long long>(n));
  }
  double total = 0;
  for (float x : nll) total += x;
  std::printf("total ppl %.4f tokens %lld seconds %.2f tokens/s %.0f\n", std::exp(total / static_cast<double>(nll.size())),
              static_cast<long long>(nll.size()), seconds, static_cast<double>(T) / seconds);
  return 0;
}

// ----------------------------------------------------------------------------------- passkey
class progress_bar {
 public:
  progress_bar(std::size_t total, bool enabled) : total_(total), enabled_(enabled && isatty(STDERR_FILENO)) {}
  void step(const std::string& label) {
    ++done_;
    if (!enabled_) return;
    const int width = 30;
    const auto filled = static_cast<int>(static_cast<double>(done_) / static_cast<double>(total_) * width);
    std::fprintf(stderr, "\r[%s%s] %zu/%zu %-40s", std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(), done_, total_, label.c_str());
    if (done_ == total_) std::fprintf(stderr, "\r%*s\r", 90, "");
    std::fflush(stderr);
  }

 private:
  std::size_t total_, done_ = 0;
  bool enabled_;
};

/// Per length, for one method.
struct length_stats {
  int correct = 0, total = 0;
  double seconds = 0;  // over its prompts, prefill and answer
  llama2c::selection_report selection;
  llama2c::selection_report alias, distractors;  // retrieval sets: the alias needle's, every distractor's (hits over layer-heads x needles)
};

struct method_result {
  std::string name;
  std::map<std::int64_t, length_stats> by_length;
  double seconds = 0;
  std::int64_t tokens = 0;
  std::size_t representation_floats = 0;  // per chunk and query head
  double score_flops_per_chunk = 0;       // per query and head
  bool indexed = false;                   // selection searches an index (reads fewer chunks than all)
};

template <class Policies>
double score_flops_per_chunk(const longheads::attention<Policies>& a) {
  const double d = a.config().head_dim;
  using scorer = typename Policies::scorer;
  if constexpr (std::is_same_v<scorer, longheads::bound_scorer>) return 4 * d;  // 2 multiplies, max, add per channel
  else if constexpr (std::is_same_v<scorer, longheads::max_key_scorer>) return 2 * d * a.policies().scorer.count;
  else return 2 * d;
}

/// Runs every prompt with one method: prefill, selection diagnostics for the first answer
/// token, then greedy decoding of the five answer tokens.
template <class Policies>
method_result evaluate(const llama2c::checkpoint& ckpt, const options& o, const std::vector<llama2c::passkey_prompt>& prompts,
                       const std::string& name, longheads::attention_method method, progress_bar& bar) {
  auto model = make_model<Policies>(ckpt, o, method);
  std::int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.length);
  model.reserve(longest, std::max<std::int64_t>(1, o.split));
  method_result result{name, {}, 0, 0, 0, 0};
  if (method == longheads::attention_method::longheads) {
    result.representation_floats = model.attention().shape().representation_floats;
    result.score_flops_per_chunk = score_flops_per_chunk(model.attention());
    result.indexed = longheads::policy_bundle<Policies>::index_type::indexed;
  }
  const int w = o.attention.config.chunk_size;
  std::vector<float> logits(static_cast<std::size_t>(ckpt.config().vocab_size)), scratch;
  std::optional<llama2c::vocabulary> vocab;
  if (o.answers && !o.vocab.empty()) vocab.emplace(o.vocab);
  for (const auto& p : prompts) {
    const llama2c::needle_chunks needle{p.needle_start / w, (p.needle_end - 1) / w};
    if constexpr (std::is_same_v<typename Policies::selector, llama2c::needle_oracle_selector>)
      *model.attention().policies().selector.needle = needle;
    const auto start = clock_type::now();
    model.reset();
    llama2c::feed(model, p.tokens, o.split, logits);
    length_stats& stats = result.by_length[p.length];
    if (method == longheads::attention_method::longheads) {
      const auto r = llama2c::inspect_selection(model, needle, scratch);
      stats.selection.heads += r.heads;
      stats.selection.hits += r.hits;
      stats.selection.ranks.insert(stats.selection.ranks.end(), r.ranks.begin(), r.ranks.end());
      auto add = [&](llama2c::selection_report& to, std::pair<std::int64_t, std::int64_t> span) {
        const auto o = llama2c::inspect_selection(model, llama2c::needle_chunks{span.first / w, (span.second - 1) / w}, scratch);
        to.heads += o.heads;
        to.hits += o.hits;
        to.ranks.insert(to.ranks.end(), o.ranks.begin(), o.ranks.end());
      };
      if (p.alias_span) add(stats.alias, *p.alias_span);
      for (const auto& span : p.distractor_spans) add(stats.distractors, span);
    }
    std::vector<std::int32_t> answer;
    for (int i = 0; i < llama2c::passkey_task::answer_tokens; ++i) {
      answer.push_back(argmax(logits));
      if (i + 1 < llama2c::passkey_task::answer_tokens) model.forward(std::span<const std::int32_t>(&answer.back(), 1), logits);
    }
    const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
    result.seconds += seconds;
    stats.seconds += seconds;
    result.tokens += static_cast<std::int64_t>(p.tokens.size()) + llama2c::passkey_task::answer_tokens - 1;
    stats.correct += answer == p.answer;
    ++stats.total;
    if (o.answers) {
      const auto words = [&](const std::vector<std::int32_t>& ids) {
        std::string text;
        for (std::int32_t id : ids) text += vocab ? vocab->word(id) : "<" + std::to_string(id) + ">";
        return text;
      };
      std::printf("%s %s (%lld tokens, needle at %.0f%%): pass key %s, answered %s, %s, %.1f s, %.0f tokens/s\n", name.c_str(), p.name.c_str(),
                  static_cast<long long>(p.length), 100.0 * p.depth, words(p.answer).c_str(), words(answer).c_str(),
                  answer == p.answer ? "right" : "wrong", seconds, static_cast<double>(p.length) / seconds);
    }
    bar.step(name + " " + p.name);
  }
  return result;
}

template <class Policies>
void draw_heatmap(const llama2c::checkpoint& ckpt, const options& o, const llama2c::passkey_prompt& p) {
  auto model = make_model<Policies>(ckpt, o, longheads::attention_method::longheads);
  model.reserve(p.length, std::max<std::int64_t>(1, o.split));
  std::vector<float> logits(static_cast<std::size_t>(ckpt.config().vocab_size));
  model.reset();
  llama2c::feed(model, p.tokens, o.split, logits);  // the last prompt token's query yields the first answer token
  const int w = o.attention.config.chunk_size;
  const std::int64_t chunks = (static_cast<std::int64_t>(p.tokens.size()) + w - 1) / w;
  std::vector<std::vector<int>> rows;
  std::vector<std::string> labels;
  std::vector<std::int64_t> needle_chunks;
  for (std::int64_t c = p.needle_start / w; c <= (p.needle_end - 1) / w; ++c) needle_chunks.push_back(c);
  int hits = 0, heads = 0;
  for (int l = 0; l < ckpt.config().n_layers; ++l)
    for (int h = 0; h < ckpt.config().n_heads; ++h) {
      std::vector<int> row(static_cast<std::size_t>(chunks), 0);
      bool hit = false;
      for (std::int32_t c : model.cache(l).last_selection(h)) {
        row[static_cast<std::size_t>(c)] = 1;
        hit |= std::find(needle_chunks.begin(), needle_chunks.end(), c) != needle_chunks.end();
      }
      hits += hit;
      ++heads;
      rows.push_back(std::move(row));
      labels.push_back(std::to_string(l) + "/" + std::to_string(h));  // layer/head
    }
  const std::string title = "chunks selected for the first answer token, " + p.name + " (" + std::to_string(p.length) +
                            " tokens, w " + std::to_string(w) + ", k " + std::to_string(o.attention.config.budget_chunks) +
                            "); red arrows: needle; " + std::to_string(hits) + "/" + std::to_string(heads) + " heads read it";
  llama2c::plot_selection_heatmap(rows, labels, needle_chunks, title, o.heatmap);
  std::printf("heatmap: %s (%d of %d heads selected a needle chunk)\n", o.heatmap.c_str(), hits, heads);
}

/// At most `n` prompts of each length, spread evenly over the set's order (its depths).
std::vector<llama2c::passkey_prompt> evenly_per_length(std::vector<llama2c::passkey_prompt> prompts, int n) {
  std::map<std::int64_t, std::vector<std::size_t>> by_length;
  for (std::size_t i = 0; i < prompts.size(); ++i) by_length[prompts[i].length].push_back(i);
  std::vector<llama2c::passkey_prompt> kept;
  for (const auto& [length, ids] : by_length) {
    const std::size_t keep = std::min<std::size_t>(ids.size(), static_cast<std::size_t>(n));
    for (std::size_t j = 0; j < keep; ++j) kept.push_back(std::move(prompts[ids[j * ids.size() / keep]]));
  }
  return kept;
}

/// dense | sink-window | longheads (the --policy) | a policy name | oracle.
method_result evaluate_method(const llama2c::checkpoint& ckpt, const options& o, const std::vector<llama2c::passkey_prompt>& prompts,
                              const std::string& name, progress_bar& bar) {
  if (name == "dense" || name == "sink-window")
    return evaluate<llama2c::policies::paper>(ckpt, o, prompts, name, tools::parse_method(name), bar);
  if (name == "oracle") return evaluate<llama2c::policies::oracle>(ckpt, o, prompts, name, longheads::attention_method::longheads, bar);
  const std::string policy = name == "longheads" ? o.policy : name;
  return llama2c::policies::with_policy(policy, [&]<class P>(std::type_identity<P>) {
    return evaluate<P>(ckpt, o, prompts, name == "longheads" ? "longheads:" + policy : name, longheads::attention_method::longheads, bar);
  });
}

template <class Policies>
int run_passkey(const llama2c::checkpoint& ckpt, const options& o) {
  std::vector<llama2c::passkey_prompt> prompts;
  if (!o.prompt_set.empty()) {
    prompts = llama2c::load_prompt_set(o.prompt_set, o.lengths, ckpt.config().vocab_size);
    if (!o.task.empty()) std::erase_if(prompts, [&](const llama2c::passkey_prompt& p) { return p.task != o.task; });
    if (prompts.empty()) throw std::runtime_error(o.prompt_set + ": no prompts of the requested lengths" + (o.task.empty() ? "" : " and task " + o.task));
    if (o.prompts_per_length > 0) prompts = evenly_per_length(std::move(prompts), o.prompts_per_length);
  } else {
    if (o.vocab.empty()) throw std::runtime_error("--passkey needs the model's vocabulary: --vocab V.txt (or a prompt set)");
    const llama2c::vocabulary vocab(o.vocab);
    if (vocab.size() != ckpt.config().vocab_size)
      throw std::runtime_error(o.vocab + ": " + std::to_string(vocab.size()) + " words, the model has " +
                               std::to_string(ckpt.config().vocab_size));
    const llama2c::passkey_task task(vocab);
    const std::vector<std::int64_t> lengths = o.lengths.empty() ? std::vector<std::int64_t>{256, 1024, 4096, 16384} : o.lengths;
    for (std::int64_t length : lengths)
      for (int d = 0; d < o.depths; ++d)
        for (int t = 0; t < o.trials; ++t) {
          const double depth = (d + 0.5) / o.depths;
          prompts.push_back(task.make(length, depth, static_cast<std::uint64_t>(o.seed + 1000 * t + d)));
        }
  }
  std::vector<std::int64_t> lengths;
  std::int64_t longest = 0;
  for (const auto& p : prompts) {
    if (std::find(lengths.begin(), lengths.end(), p.length) == lengths.end()) lengths.push_back(p.length);
    longest = std::max(longest, p.length);
  }
  std::sort(lengths.begin(), lengths.end());

  std::vector<method_result> results;
  progress_bar bar(prompts.size() * o.methods.size(), !o.quiet);
  for (const std::string& method : o.methods) results.push_back(evaluate_method(ckpt, o, prompts, method, bar));

  const auto& cfg = o.attention.config;
  const double attend_flops = 4.0 * ckpt.config().head_dim() * cfg.chunk_size * cfg.budget_chunks;  // per query and head: dot + axpy per key
  std::printf("passkey accuracy, %zu prompts (w %d, k %d: budget %d tokens; trained context %d)\n", prompts.size(), cfg.chunk_size,
              cfg.budget_chunks, cfg.chunk_size * cfg.budget_chunks, ckpt.config().seq_len);
  std::printf("%-20s", "method");
  for (std::int64_t L : lengths) std::printf(" %12lld", static_cast<long long>(L));
  std::printf(" %10s\n", "tokens/s");
  for (const auto& r : results) {
    std::printf("%-20s", r.name.c_str());
    for (std::int64_t L : lengths) {
      const length_stats& c = r.by_length.at(L);
      std::printf(" %5.0f%% %2d/%-2d", 100.0 * c.correct / c.total, c.correct, c.total);
    }
    std::printf(" %10.0f\n", static_cast<double>(r.tokens) / r.seconds);
  }
  std::printf("\nseconds per prompt (mean; prefill and answer)\n%-20s", "method");
  for (std::int64_t L : lengths) std::printf(" %12lld", static_cast<long long>(L));
  std::printf("\n");
  for (const auto& r : results) {
    std::printf("%-20s", r.name.c_str());
    for (std::int64_t L : lengths) std::printf(" %12.2f", r.by_length.at(L).seconds / r.by_length.at(L).total);
    std::printf("\n");
  }
  bool any_selection = false;
  for (const auto& r : results) any_selection |= r.representation_floats > 0;
  auto by_length_header = [&](const char* title) {  // a table's title, then "method" and the lengths
    std::printf("\n%s\n%-20s", title, "method");
    for (std::int64_t L : lengths) std::printf(" %12lld", static_cast<long long>(L));
    std::printf("\n");
  };
  if (any_selection) {
    by_length_header("needle-chunk hit rate for the first answer token (layer-heads that selected a needle chunk) / median rank of the needle chunk among the scored candidates");
    for (const auto& r : results) {
      if (r.representation_floats == 0) continue;
      std::printf("%-20s", r.name.c_str());
      for (std::int64_t L : lengths) {
        const auto& s = r.by_length.at(L).selection;
        if (!s.ranks.empty())
          std::printf(" %4.0f%% r%-5.0f", 100.0 * s.hits / s.heads, s.median_rank());
        else
          std::printf(" %4.0f%%       ", 100.0 * s.hits / s.heads);
      }
      std::printf("\n");
    }
    bool any_other = false;
    for (const auto& r : results)
      for (std::int64_t L : lengths) any_other |= r.by_length.at(L).distractors.heads > 0 || r.by_length.at(L).alias.heads > 0;
    if (any_other) {
      by_length_header("other needles (retrieval sets): alias-needle hit rate / distractor-needle hit rate (layer-heads that selected a chunk of it)");
      for (const auto& r : results) {
        if (r.representation_floats == 0) continue;
        std::printf("%-20s", r.name.c_str());
        for (std::int64_t L : lengths) {
          const auto& s = r.by_length.at(L);
          const auto rate = [](const llama2c::selection_report& x) { return x.heads > 0 ? 100.0 * x.hits / x.heads : 0.0; };
          if (s.alias.heads > 0) std::printf("  %3.0f%% / %3.0f%%", rate(s.alias), rate(s.distractors));
          else std::printf("    - / %3.0f%%", rate(s.distractors));
        }
        std::printf("\n");
      }
    }
    std::printf("\nselection cost per query and head (scoring all full chunks) vs attending to the %d selected tokens (%.0f flops)\n",
                cfg.chunk_size * cfg.budget_chunks, attend_flops);
    std::printf("%-20s %14s %16s", "method", "floats/chunk", "flops/chunk");
    for (std::int64_t L : lengths) std::printf(" %9lld", static_cast<long long>(L));
    std::printf("\n");
    for (const auto& r : results) {
      if (r.representation_floats == 0) continue;
      std::printf("%-20s %14zu %16.0f", r.name.c_str(), r.representation_floats, r.score_flops_per_chunk);
      for (std::int64_t L : lengths)
        if (r.indexed) std::printf(" %9s", "index");  // reads a part of the chunks: build/examples/index_reads counts it
        else std::printf(" %8.2fx", static_cast<double>(L / cfg.chunk_size) * r.score_flops_per_chunk / attend_flops);
      std::printf("\n");
    }
  }
  if (!o.csv.empty()) {
    std::ofstream f(o.csv);
    f << "method,length,correct,total,accuracy,needle_hit_rate,needle_median_rank,representation_floats,score_flops_per_token_head,"
         "attend_flops_per_token_head,tokens_per_s,seconds_per_prompt,alias_hit_rate,distractor_hit_rate\n";
    for (const auto& r : results)
      for (std::int64_t L : lengths) {
        const length_stats& c = r.by_length.at(L);
        f << r.name << ',' << L << ',' << c.correct << ',' << c.total << ',' << static_cast<double>(c.correct) / c.total << ',';
        if (c.selection.heads > 0) f << static_cast<double>(c.selection.hits) / c.selection.heads;
        f << ',';
        if (!c.selection.ranks.empty()) f << c.selection.median_rank();
        f << ',' << r.representation_floats << ',' << static_cast<double>(L / cfg.chunk_size) * r.score_flops_per_chunk << ','
          << (r.representation_floats ? attend_flops : 0.0) << ',' << static_cast<double>(r.tokens) / r.seconds << ',' << c.seconds / c.total << ',';
        if (c.alias.heads > 0) f << static_cast<double>(c.alias.hits) / c.alias.heads;
        f << ',';
        if (c.distractors.heads > 0) f << static_cast<double>(c.distractors.hits) / c.distractors.heads;
        f << '\n';
      }
    if (!f) throw std::runtime_error(o.csv + ": cannot write");
  }
  if (!o.plot.empty()) {
    std::vector<llama2c::accuracy_series> series;
    for (const auto& r : results) {
      llama2c::accuracy_series s{r.name, lengths, {}};
      for (std::int64_t L : lengths) s.accuracy.push_back(100.0 * r.by_length.at(L).correct / r.by_length.at(L).total);
      series.push_back(std::move(s));
    }
    llama2c::plot_accuracy(series, ckpt.config().seq_len,
                           "passkey retrieval, w " + std::to_string(cfg.chunk_size) + ", k " + std::to_string(cfg.budget_chunks), o.plot);
    std::printf("plot: %s\n", o.plot.c_str());
  }
  if (!o.heatmap.empty()) {
    const auto it = std::find_if(prompts.begin(), prompts.end(), [&](const auto& p) { return p.length == longest; });
    draw_heatmap<Policies>(ckpt, o, *it);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("peak memory: %.2f GiB\n", static_cast<double>(usage.ru_maxrss) / (1 << 20));  // ru_maxrss is in KiB on Linux
  return 0;
}

template <class Policies>
int run(const options& o) {
  const auto path = llama2c::find_model(o.model, LONGHEADS_SOURCE_DIR);
  if (!path)
    throw std::runtime_error("model '" + o.model +
                             "' not found (looked in the working directory, $LONGHEADS_MODELS and ../shared/models); "
                             "pass --model PATH to a llama2.c checkpoint");
  const llama2c::checkpoint ckpt(*path);
  options with_defaults = o;
  if (with_defaults.vocab.empty()) {
    fs::path v = *path;
    v.replace_extension(".vocab.txt");
    if (fs::exists(v) && o.passkey) with_defaults.vocab = v.string();
  }
  if (o.passkey) return run_passkey<Policies>(ckpt, with_defaults);
  if (!o.eval.empty()) return run_eval<Policies>(ckpt, with_defaults);
  return run_generate<Policies>(ckpt, with_defaults);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"llama2.c-format transformers with LongHeads, dense or sink+window attention.", "longheads_llama2c"};
  app.add_option("--model", o.model, "llama2.c checkpoint (searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--vocab", o.vocab, "vocabulary id<TAB>word (default: <model>.vocab.txt beside the model, for --passkey)");
  tools::add_attention_flags(app, o.attention);
  app.add_option("--split", o.split, "prefill blocks of N tokens (1 = token-by-token decode, 0 = one block)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  auto* generate = app.add_option("--generate", o.generate, "generate N tokens (from BOS, or after --prompt)")->check(CLI::PositiveNumber);
  app.add_option("--prompt", o.prompt, "int32 token file to start from")->check(CLI::ExistingFile);
  app.add_option("--temperature", o.temperature, "sampling temperature (0 = greedy)")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--seed", o.seed, "random seed (sampling; generated passkey prompts)")->capture_default_str();
  auto* eval = app.add_option("--eval", o.eval, "int32 token file: per-token negative log-likelihood")->check(CLI::ExistingFile);
  app.add_option("--buckets", o.buckets, "bucket edges (positions) for --eval, e.g. 512,1024,4096")->delimiter(',');
  app.add_option("--dump-logits", o.dump_logits, "--eval: write [T, vocab] float32 logits");
  app.add_option("--dump-nll", o.dump_nll, "--eval: write [T-1] float32 per-token NLL");
  auto* passkey = app.add_flag("--passkey", o.passkey, "passkey-retrieval benchmark");
  app.add_option("--lengths", o.lengths, "--passkey: prompt + answer lengths, e.g. 256,1024,4096")->delimiter(',');
  app.add_option("--depths", o.depths, "--passkey: needle depths per length, spread evenly")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--trials", o.trials, "--passkey: prompts per length and depth")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--task", o.task, "--prompt-set of a retrieval set (make_retrieval_prompts.py): only this task's prompts (mk, hop)");
  app.add_option("--prompt-set", o.prompt_set, "--passkey: a fixed prompt set (manifest.jsonl + .bin) instead of generated prompts")
      ->check(CLI::ExistingDirectory);
  app.add_option("--prompts-per-length", o.prompts_per_length, "--prompt-set: use at most N prompts per length, spread over the depths")
      ->check(CLI::NonNegativeNumber);
  std::vector<std::string> method_names = {"dense", "sink-window", "longheads", "oracle"};
  for (const auto& n : llama2c::policies::names()) method_names.push_back(n);
  app.add_option("--methods", o.methods,
                 "--passkey: what to compare: dense, sink-window, longheads (with --policy), a policy name, or oracle "
                 "(the paper's selection forced to include the needle chunk: a diagnostic upper bound)")
      ->delimiter(',')
      ->check(CLI::IsMember(method_names))
      ->capture_default_str();
  app.add_option("--csv", o.csv, "--passkey: write the accuracy table as CSV");
  app.add_option("--plot", o.plot, "--passkey: draw accuracy vs length (PNG, gnuplot)");
  app.add_option("--heatmap", o.heatmap, "--passkey: draw the chunks each head selected for one longest prompt (PNG)");
  app.add_flag("--quiet", o.quiet, "no progress bar");
  app.add_flag("--answers", o.answers, "--passkey: print each prompt's pass key, the answer, its time and tokens/s");
  app.add_option("--policy", o.policy, "chunk selection policy (recommended: see docs/results.md)")
      ->check(CLI::IsMember(llama2c::policies::names()))
      ->capture_default_str();
  app.add_option("--score-offset", o.offset_chunks, "rotated-query policies: chunk offset the query is rotated to")->capture_default_str();
  app.add_option("--beam", o.beam, "quest-beam policy: index boxes opened per level")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--epsilon", o.epsilon, "quest-certified policy: every chunk left out scores at most the k-th kept + epsilon (0: the flat scan's choice)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--segment-chunks", o.clusters.segment_chunks, "quest-clusters policy: chunks clustered together")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  app.add_option("--segment-clusters", o.clusters.clusters, "quest-clusters policy: k-means clusters per segment")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--probe-share", o.clusters.probe_share, "quest-clusters policy: share of the candidates a query may score in clusters")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--probe-min", o.clusters.probe_min, "quest-clusters policy: ... and at least this many chunks")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--probe-max", o.clusters.probe_max, "quest-clusters policy: ... and at most this many chunks (>= --probe-min)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--read-max", o.clusters.read_max,
                 "quest-clusters policy: a query's search opens nothing more after this many summaries read (boxes, centres, chunks)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--probe-order", o.clusters.probe_order, "quest-clusters policy: the order clusters are opened in: mixed (box bound and centre "
                                                      "score in turn) or box (box bound alone)")
      ->transform(CLI::CheckedTransformer(std::map<std::string, longheads::cluster_probe>{{"mixed", longheads::cluster_probe::box_and_centre},
                                                                                        {"box", longheads::cluster_probe::box_bound}}))
      ->default_str("mixed");
  app.add_option("--branching", o.branching, "quest-index, quest-beam policies: chunks per index box (default: the policy's)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--representative-keys", o.representative_keys, "representative-keys and loudest-keys policies: keys kept per chunk")->capture_default_str();
  generate->excludes(eval)->excludes(passkey);
  eval->excludes(passkey);
  try {
    app.parse(argc, argv);
    if (o.generate == 0 && o.eval.empty() && !o.passkey) throw CLI::ValidationError("choose one of --generate N, --eval FILE, --passkey");
    o.attention.config.method = tools::parse_method(o.attention.method);
    longheads::attention_config knobs = o.attention.config;  // the model fills in heads and head_dim later
    knobs.n_q_heads = knobs.n_kv_heads = 1;
    knobs.head_dim = 2;
    knobs.validate();
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "longheads_llama2c: error: %s (see --help)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longheads_llama2c: error: %s\n", e.what());
    return 2;
  }
  try {
    return llama2c::policies::with_policy(o.policy, [&]<class P>(std::type_identity<P>) { return run<P>(o); });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longheads_llama2c: error: %s\n", e.what());
    return 1;
  }
}
