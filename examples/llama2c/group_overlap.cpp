// SPDX-License-Identifier: MIT
// group_overlap: do the query heads of one kv group (GQA) pick the same chunks?
//
// Feeds a token file through a llama2.c checkpoint with LongHeads attention in blocks and,
// after each block, compares the chunks every pair of heads of a layer chose by score for the
// block's last query (sinks and local chunks, which every head reads, left out): heads sharing
// a kv head against heads of different groups, and against what independent random picks would
// share. How much a group's picks overlap sets how many chunks a GQA decode step reads (each
// chunk once per group), so the benchmark's random heads are a worst case only if real heads
// overlap more.
//
//   group_overlap --model stories260K.bin --tokens ../shared/data/stories260K_corpus_16k.bin
//
// Exit code 77 when the model or token file is missing (ctest reports it as skipped).
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "transformer.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Overlap of the chunks query heads of one kv group select, on a real model"};
  std::string model_name = "stories260K.bin", tokens_path = "../shared/data/stories260K_corpus_16k.bin";
  longheads::attention_config knobs;
  knobs.chunk_size = 64;
  knobs.budget_chunks = 8;
  std::int64_t block = 64, max_tokens = 0;
  app.add_option("--model", model_name, "llama2.c checkpoint (also searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--tokens", tokens_path, "int32 token file to feed")->capture_default_str();
  app.add_option("--chunk-size", knobs.chunk_size, "tokens per chunk (w)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunks", knobs.budget_chunks, "chunks each head reads per query (k)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--block", block, "tokens per forward call; one sample per call")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-tokens", max_tokens, "feed at most this many tokens (0 = all)")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  const auto model_path = llama2c::find_model(model_name, LONGHEADS_SOURCE_DIR);
  if (!model_path || !std::filesystem::exists(tokens_path)) {
    const std::string missing = model_path ? "token file '" + tokens_path + "'" : "model '" + model_name + "'";
    std::fprintf(stderr, "group_overlap: skipped, %s not found (models are also looked for in $LONGHEADS_MODELS and ../shared/models)\n",
                 missing.c_str());
    return 77;
  }
  try {
    llama2c::checkpoint ckpt(*model_path);
    const auto& c = ckpt.config();
    std::vector<std::int32_t> ids = llama2c::load_tokens(tokens_path, c.vocab_size);
    if (max_tokens > 0 && static_cast<std::size_t>(max_tokens) < ids.size()) ids.resize(static_cast<std::size_t>(max_tokens));
    const int heads = c.n_heads, group = c.n_heads / c.n_kv_heads, layers = c.n_layers;
    if (group < 2) throw std::runtime_error("the model has one query head per kv head: no groups to compare");
    const int picks = knobs.budget_chunks - knobs.sink_chunks - knobs.local_chunks;
    if (picks <= 0) throw std::runtime_error("--chunks leaves no chunk to pick by score after sinks and locals");

    llama2c::transformer<> model(ckpt, knobs);
    model.reserve(static_cast<std::int64_t>(ids.size()), block);
    std::vector<double> same(static_cast<std::size_t>(layers)), other(static_cast<std::size_t>(layers));
    std::vector<long> same_pairs(static_cast<std::size_t>(layers)), other_pairs(static_cast<std::size_t>(layers));
    double random_sum = 0;
    long samples = 0;
    std::vector<std::set<std::int32_t>> by_score(static_cast<std::size_t>(heads));
    for (std::size_t first = 0; first + static_cast<std::size_t>(block) <= ids.size(); first += static_cast<std::size_t>(block)) {
      model.forward(std::span<const std::int32_t>(ids).subspan(first, static_cast<std::size_t>(block)), {});
      const std::int64_t chunks = (static_cast<std::int64_t>(first) + block + knobs.chunk_size - 1) / knobs.chunk_size;
      const std::int64_t candidates = chunks - knobs.sink_chunks - knobs.local_chunks;
      if (candidates <= 2 * picks) continue;  // the budget covers most of the context: overlap is forced
      ++samples;
      random_sum += static_cast<double>(picks) * picks / static_cast<double>(candidates);
      const std::int64_t local_first = chunks - knobs.local_chunks;
      for (int l = 0; l < layers; ++l) {
        for (int h = 0; h < heads; ++h) {
          by_score[static_cast<std::size_t>(h)].clear();
          for (std::int32_t chunk : model.cache(l).last_selection(h))
            if (chunk >= knobs.sink_chunks && chunk < local_first) by_score[static_cast<std::size_t>(h)].insert(chunk);
        }
        for (int a = 0; a < heads; ++a)
          for (int b = a + 1; b < heads; ++b) {
            long common = 0;
            for (std::int32_t chunk : by_score[static_cast<std::size_t>(a)]) common += static_cast<long>(by_score[static_cast<std::size_t>(b)].count(chunk));
            const bool grouped = a / group == b / group;  // llama2.c: query head h reads kv head h / group
            (grouped ? same : other)[static_cast<std::size_t>(l)] += static_cast<double>(common);
            ++(grouped ? same_pairs : other_pairs)[static_cast<std::size_t>(l)];
          }
      }
    }
    if (samples == 0) throw std::runtime_error("the token file is too short for the budget: no sample where heads could differ");
    double same_all = 0, other_all = 0;
    long same_n = 0, other_n = 0;
    for (int l = 0; l < layers; ++l) {
      same_all += same[static_cast<std::size_t>(l)];
      other_all += other[static_cast<std::size_t>(l)];
      same_n += same_pairs[static_cast<std::size_t>(l)];
      other_n += other_pairs[static_cast<std::size_t>(l)];
    }
    std::printf("%s: %d query heads, %d per kv head; w %d, k %d (%d picked by score); %zu tokens, %ld samples (last query of each %lld-token call)\n",
                model_path->filename().c_str(), heads, group, knobs.chunk_size, knobs.budget_chunks, picks, ids.size(), samples,
                static_cast<long long>(block));
    std::printf("chunks two heads both picked by score, of %d: same kv group %.2f, different groups %.2f, independent random picks %.2f\n",
                picks, same_all / static_cast<double>(same_n), other_all / static_cast<double>(other_n), random_sum / static_cast<double>(samples));
    for (int l = 0; l < layers; ++l)
      std::printf("  layer %d: same group %.2f, different groups %.2f\n", l,
                  same[static_cast<std::size_t>(l)] / static_cast<double>(same_pairs[static_cast<std::size_t>(l)]),
                  other[static_cast<std::size_t>(l)] / static_cast<double>(other_pairs[static_cast<std::size_t>(l)]));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "group_overlap: %s\n", e.what());
    return 1;
  }
  return 0;
}
