// SPDX-License-Identifier: MIT
// index_reads: what the chunk-index searches read on real caches, and how often the beam finds
// the flat scan's chunks.
//
// Feeds passkey prompts (the shared set, or generated ones past its longest) through a llama2.c
// checkpoint with the recommended selection (Quest bounds through the cache's index), then, for
// the last query of every layer and head, repeats the choice three ways: the flat scan (every
// candidate's bound), the exact best-first search (bound_search) and the beam (beam_search, as
// bound_tree_beam runs it past exact_below). Per length: summaries read per search (boxes +
// chunks; median, p90, max) beside the number of chunks, and the beam's hit rate: the share of
// the flat scan's chunks it also chose, and of searches where it chose all of them.
//
//   index_reads --lengths 16384,65536 --prompts 3
//   index_reads --lengths 262144,1048576 --prompts 2 --generate    # prompts made with the vocabulary
//
// Exit code 77 when the model or prompt set is missing (ctest reports it as skipped).
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "passkey.hpp"
#include "policies.hpp"
#include "transformer.hpp"

namespace {
struct reads {
  std::vector<double> summaries;
  void add(const longheads::bound_search::stats& s) { summaries.push_back(static_cast<double>(s.boxes + s.chunks)); }
  std::string summary() {
    if (summaries.empty()) return "-";
    std::sort(summaries.begin(), summaries.end());
    char text[96];
    std::snprintf(text, sizeof text, "%.0f / %.0f / %.0f", summaries[summaries.size() / 2], summaries[summaries.size() * 9 / 10], summaries.back());
    return text;
  }
};
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Summaries the chunk-index searches read on real passkey caches, and the beam's hit rate"};
  std::string model_name = "passkey-256.bin", prompt_set = "../shared/data/passkey";
  std::vector<std::int64_t> lengths = {4096, 16384};
  std::size_t prompts_per_length = 3;
  bool generate = false;
  longheads::attention_config knobs;
  knobs.chunk_size = 32;
  knobs.budget_chunks = 8;
  longheads::bound_tree_beam beam;
  app.add_option("--model", model_name, "llama2.c checkpoint (also searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--prompt-set", prompt_set, "a shared passkey prompt set (manifest.jsonl + .bin)")->capture_default_str();
  app.add_flag("--generate", generate, "generate the prompts (needle depths spread evenly) with <model>.vocab.txt instead");
  app.add_option("--lengths", lengths, "prompt lengths, e.g. 4096,16384")->delimiter(',')->capture_default_str();
  app.add_option("--prompts", prompts_per_length, "prompts per length")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunk-size", knobs.chunk_size, "tokens per chunk (w)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunks", knobs.budget_chunks, "chunks each head reads per query (k)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--fanout", beam.branching, "chunks (or boxes) per box")->check(CLI::Range(2, 1024))->capture_default_str();
  app.add_option("--beam", beam.beam, "boxes the beam opens per level")->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

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
  const int w = knobs.chunk_size, d = model.config().head_dim();
  const auto wanted = static_cast<std::size_t>(knobs.budget_chunks - knobs.sink_chunks - knobs.local_chunks);
  std::printf("fan-out %d, beam %d, %zu chunks wanted per search (k %d minus sink and local chunks)\n", beam.branching, beam.beam, wanted,
              knobs.budget_chunks);
  std::printf("%9s %8s | %-22s | %-22s | %-22s | %s\n", "tokens", "chunks", "flat: med / p90 / max", "exact index", "beam",
              "beam hit rate: chunks / whole searches");
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
    reads flat, exact, beamed;
    std::int64_t chunks = 0, hits = 0, of = 0, whole = 0, searches = 0;
    t.reserve(length, 512);
    for (const auto& p : prompts) {
      t.reset();
      std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));
      llama2c::feed(t, p.tokens, 512, logits);
      const std::int64_t position = t.position() - 1, i = position / w, first = knobs.sink_chunks, end = i - knobs.local_chunks + 1;
      chunks = t.cache(0).full_chunks();
      std::vector<float> query(static_cast<std::size_t>(d));
      std::vector<std::int32_t> exact_found(wanted), beam_found(wanted);
      longheads::bound_search_scratch scratch;
      scratch.reserve(chunks, beam.branching);
      scratch.reserve_beam(beam.beam, beam.branching);
      for (int l = 0; l < model.config().n_layers; ++l)
        for (int h = 0; h < model.config().n_heads; ++h) {
          const longheads::kv_cache& cache = t.cache(l);
          // The query as bound_scorer rotates it (offset 1), the candidates as the selector takes them.
          t.attention().rotary().rotate(t.last_query(l).data() + static_cast<std::ptrdiff_t>(h) * d, query.data(), position % w + w);
          longheads::bound_search::stats exact_stats, beam_stats;
          const std::size_t n = longheads::bound_search::top(cache.index(h), cache.representations(h), query.data(), first, end, wanted,
                                                             exact_found, scratch, &exact_stats);
          const std::size_t m = longheads::beam_search::top(cache.index(h), cache.representations(h), query.data(), first, end, wanted,
                                                            beam.beam, beam_found, scratch, &beam_stats);
          exact.add(exact_stats);
          beamed.add(beam_stats);
          flat.summaries.push_back(static_cast<double>(end - first));
          std::int64_t shared = 0;
          for (std::size_t a = 0; a < n; ++a) shared += std::find(beam_found.begin(), beam_found.begin() + static_cast<std::ptrdiff_t>(m), exact_found[a]) !=
                                                         beam_found.begin() + static_cast<std::ptrdiff_t>(m);
          hits += shared;
          of += static_cast<std::int64_t>(n);
          whole += shared == static_cast<std::int64_t>(n);
          ++searches;
        }
    }
    if (searches == 0) continue;
    std::printf("%9lld %8lld | %-22s | %-22s | %-22s | %5.1f%% / %5.1f%% of %lld\n", static_cast<long long>(length), static_cast<long long>(chunks),
                flat.summary().c_str(), exact.summary().c_str(), beamed.summary().c_str(), 100.0 * static_cast<double>(hits) / static_cast<double>(of),
                100.0 * static_cast<double>(whole) / static_cast<double>(searches), static_cast<long long>(searches));
  }
  return 0;
}
