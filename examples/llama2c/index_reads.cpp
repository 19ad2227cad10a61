// SPDX-License-Identifier: MIT
// index_reads: how many summaries the exact chunk-index search reads on real caches.
//
// Feeds shared passkey prompts through a llama2.c checkpoint with Quest selection through the
// cache's bound-tree index (--policy quest-index), then, for the last query of every layer and
// head, repeats its search with bound_search::stats: boxes plus chunk summaries read, beside the
// chunks a flat scan scores. Sublinear selection needs the first to stay far below the second.
//
//   index_reads --lengths 4096,16384,65536 --prompts 3
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

int main(int argc, char** argv) {
  CLI::App app{"Summaries the exact chunk-index search reads on real passkey caches"};
  std::string model_name = "passkey-256.bin", prompt_set = "../shared/data/passkey";
  std::vector<int> lengths = {4096, 16384};
  std::size_t prompts_per_length = 3;
  longheads::attention_config knobs;
  knobs.chunk_size = 32;
  knobs.budget_chunks = 8;
  int fanout = 16;
  app.add_option("--model", model_name, "llama2.c checkpoint (also searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--prompt-set", prompt_set, "a shared passkey prompt set (manifest.jsonl + .bin)")->capture_default_str();
  app.add_option("--lengths", lengths, "prompt lengths, e.g. 4096,16384")->delimiter(',')->capture_default_str();
  app.add_option("--prompts", prompts_per_length, "prompts per length")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunk-size", knobs.chunk_size, "tokens per chunk (w)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunks", knobs.budget_chunks, "chunks each head reads per query (k)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--fanout", fanout, "chunks (or boxes) per box")->check(CLI::Range(2, 1024))->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto model_path = llama2c::find_model(model_name, LONGHEADS_SOURCE_DIR);
  if (!model_path || !std::filesystem::exists(std::filesystem::path(prompt_set) / "manifest.jsonl")) {
    const std::string missing = model_path ? "prompt set '" + prompt_set + "'" : "model '" + model_name + "'";
    std::fprintf(stderr, "index_reads: skipped, %s not found (models are also looked for in $LONGHEADS_MODELS and ../shared/models)\n",
                 missing.c_str());
    return 77;
  }
  const llama2c::checkpoint model(model_path->string());
  llama2c::transformer<llama2c::policies::quest_index> t(model, knobs, {.index = {.branching = fanout}});
  const int w = knobs.chunk_size, d = model.config().head_dim();
  const auto wanted = static_cast<std::size_t>(knobs.budget_chunks - knobs.sink_chunks - knobs.local_chunks);
  for (int length : lengths) {
    auto prompts = llama2c::load_prompt_set(prompt_set, {length}, model.config().vocab_size);
    prompts.resize(std::min(prompts.size(), prompts_per_length));
    std::vector<double> read;
    std::int64_t chunks = 0;
    for (const auto& p : prompts) {
      t.reset();
      std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));
      llama2c::feed(t, p.tokens, 512, logits);
      const std::int64_t position = t.position() - 1, i = position / w;
      chunks = t.cache(0).full_chunks();
      std::vector<float> query(static_cast<std::size_t>(d));
      std::vector<std::int32_t> found(wanted);
      longheads::bound_search_scratch scratch;
      scratch.reserve(chunks, fanout);
      for (int l = 0; l < model.config().n_layers; ++l)
        for (int h = 0; h < model.config().n_heads; ++h) {
          const longheads::kv_cache& cache = t.cache(l);
          // The query as bound_scorer rotates it (offset 1), the candidates as the selector takes them.
          t.attention().rotary().rotate(t.last_query(l).data() + static_cast<std::ptrdiff_t>(h) * d, query.data(), position % w + w);
          longheads::bound_search::stats stats;
          longheads::bound_search::top(cache.index(h), cache.representations(h), query.data(), knobs.sink_chunks,
                                       i - knobs.local_chunks + 1, wanted, found, scratch, &stats);
          read.push_back(static_cast<double>(stats.boxes + stats.chunks));
        }
    }
    if (read.empty()) continue;
    std::sort(read.begin(), read.end());
    std::printf("%d tokens, %lld chunks: summaries read per search (boxes + chunks) median %.0f, p90 %.0f, max %.0f over %zu searches\n",
                length, static_cast<long long>(chunks), read[read.size() / 2], read[read.size() * 9 / 10], read.back(), read.size());
  }
  return 0;
}
