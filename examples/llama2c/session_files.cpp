// SPDX-License-Identifier: MIT
// session_files: a long prompt's caches saved to a file and loaded back, against prefilling
// the prompt again, on a real model.
//
// Prefills one generated passkey prompt through passkey-256 with the recommended selection,
// saves every layer's cache to one file (longheads/cache_file.hpp), loads it into a second
// model through the file's memory mapping, and answers the passkey from both: the answers and
// every logit must be equal (bitwise). Prints the prefill, save and load times and their ratio.
//
//   session_files --length 1048576 --threads 2 --file /tmp/passkey-1m.lhkv
//
// Exit code 77 when the model or its vocabulary is missing (ctest reports it as skipped), 1
// when the loaded caches answer differently.
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "passkey.hpp"
#include "policies.hpp"
#include "transformer.hpp"

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Save a long prompt's caches, load them back, and compare with prefilling the prompt"};
  std::string model_name = "passkey-256.bin", file = (std::filesystem::temp_directory_path() / "longheads-session.lhkv").string();
  std::int64_t length = 65536;
  double depth = 0.5;
  bool keep = false;
  llama2c::policies::knobs policy_knobs;
  policy_knobs.threads = 2;
  longheads::attention_config knobs;
  knobs.chunk_size = 32;
  knobs.budget_chunks = 8;
  app.add_option("--model", model_name, "llama2.c checkpoint (also searched in $LONGHEADS_MODELS and ../shared/models)")->capture_default_str();
  app.add_option("--length", length, "prompt + answer tokens")->check(CLI::Range(std::int64_t{512}, longheads::max_sequence_tokens))->capture_default_str();
  app.add_option("--depth", depth, "where the needle sits, 0..1")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--file", file, "the cache file (removed at the end unless --keep)")->capture_default_str();
  app.add_flag("--keep", keep, "keep the cache file");
  app.add_option("--threads", policy_knobs.threads, "threads of the attention")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunk-size", knobs.chunk_size, "tokens per chunk (w)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunks", knobs.budget_chunks, "chunks each head reads per query (k)")->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto model_path = llama2c::find_model(model_name, LONGHEADS_SOURCE_DIR);
  auto vocab_path = model_path ? std::filesystem::path(*model_path) : std::filesystem::path();
  vocab_path.replace_extension(".vocab.txt");
  if (!model_path || !std::filesystem::exists(vocab_path)) {
    std::fprintf(stderr, "session_files: skipped, %s not found (models are also looked for in $LONGHEADS_MODELS and ../shared/models)\n",
                 !model_path ? ("model '" + model_name + "'").c_str() : vocab_path.string().c_str());
    return 77;
  }
  const llama2c::checkpoint model(model_path->string());
  const llama2c::vocabulary vocab(vocab_path);
  const llama2c::passkey_prompt prompt = llama2c::passkey_task(vocab).make(length, depth, 11);
  using policies = llama2c::policies::recommended;
  const auto set = llama2c::policies::make_set<policies>(policy_knobs);
  llama2c::transformer<policies> original(model, knobs, set), restored(model, knobs, set);
  const std::int64_t room = length + llama2c::passkey_task::answer_tokens;
  original.reserve(room, 512);
  restored.reserve(0, 512);
  std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));

  auto start = std::chrono::steady_clock::now();
  llama2c::feed(original, prompt.tokens, 512, logits);
  const double prefill_s = seconds_since(start);
  start = std::chrono::steady_clock::now();
  original.save_caches(file);
  const double save_s = seconds_since(start);
  const auto bytes = std::filesystem::file_size(file);
  start = std::chrono::steady_clock::now();
  restored.load_caches(file, room);
  const double load_s = seconds_since(start);

  if (!keep) std::filesystem::remove(file);

  // The answer from both, token by token from the prompt's last logits; every logit compared.
  std::vector<float> restored_logits = logits;
  std::vector<std::int32_t> answer;
  bool same = true;
  for (int i = 0; i < llama2c::passkey_task::answer_tokens; ++i) {
    same = same && std::memcmp(logits.data(), restored_logits.data(), logits.size() * sizeof(float)) == 0;
    answer.push_back(static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    original.forward(std::span<const std::int32_t>(&answer.back(), 1), logits);
    restored.forward(std::span<const std::int32_t>(&answer.back(), 1), restored_logits);
  }
  same = same && std::memcmp(logits.data(), restored_logits.data(), logits.size() * sizeof(float)) == 0;
  for (int l = 0; l < model.config().n_layers; ++l) same = same && original.cache(l) == restored.cache(l);

  std::printf("%lld tokens, w %d, k %d, %u threads; passkey %s, answered %s (%s)\n", static_cast<long long>(length), knobs.chunk_size,
              knobs.budget_chunks, policy_knobs.threads, vocab.decode(prompt.answer).c_str(), vocab.decode(answer).c_str(),
              answer == prompt.answer ? "right" : "wrong");
  std::printf("prefill %.2f s, save %.2f s (%.2f GB, %.2f GB/s), load %.2f s (%.2f GB/s): load is %.1fx faster than prefill\n", prefill_s,
              save_s, static_cast<double>(bytes) / 1e9, static_cast<double>(bytes) / 1e9 / save_s, load_s,
              static_cast<double>(bytes) / 1e9 / load_s, prefill_s / load_s);
  std::printf("loaded caches: answer and every logit %s the original's\n", same ? "bitwise equal to" : "DIFFERENT from");
  return same ? 0 : 1;
}
