// SPDX-License-Identifier: MIT
// longheads_chat: a GGUF model (llama / qwen2 architecture; docs/gguf.md) answering text with
// LongHeads, dense or sink+window attention, on CPU.
//
//   longheads_chat --model model.gguf --prompt-file long.txt --attention longheads --steps 64
//   longheads_chat --model model.gguf --passkey 32768         # the paper's passkey prompt, right/wrong
//
// The weights are dequantised to float once at load (blocks.hpp), the projections run on them;
// the attention is the library's, through the llama2.c host's transformer. Tokens stream to
// stdout as they are generated; a progress line on stderr reports the prefill's tokens/s.
#include <CLI/CLI.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../common/attention_flags.hpp"
#include "../llama2c/checkpoint.hpp"
#include "../llama2c/policies.hpp"
#include "../llama2c/transformer.hpp"
#include "gguf_file.hpp"
#include "gguf_model.hpp"
#include "tokenizer.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

struct options {
  std::string model_path, prompt, prompt_file, prompt_ids, policy = "recommended";
  tools::attention_flags attention;
  int steps = 128;
  float temperature = 0.0f, top_p = 0.95f;
  std::uint64_t seed = 1;
  std::int64_t passkey_length = 0;
  double passkey_depth = 0.5;
  std::int64_t block = 512;
  bool quiet = false;
};

double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

double peak_gib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / (1 << 20);  // KiB on Linux
}

// Greedy at temperature 0; else a draw from the softmax of logits / temperature restricted to
// the smallest set of tokens whose probability reaches top_p.
std::int32_t sample(const std::vector<float>& logits, float temperature, float top_p, std::mt19937_64& rng) {
  if (temperature <= 0) return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<std::int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return logits[a] > logits[b]; });
  std::vector<double> p(order.size());
  const double top = logits[order[0]];
  double sum = 0;
  for (std::size_t i = 0; i < order.size(); ++i) sum += p[i] = std::exp((logits[order[i]] - top) / temperature);
  double kept = 0;
  std::size_t n = 0;
  while (n < order.size() && (n == 0 || kept < top_p * sum)) kept += p[n++];  // at least the top token (top_p 0: greedy)
  double u = std::uniform_real_distribution<double>(0, kept)(rng);
  for (std::size_t i = 0; i < n; ++i)
    if ((u -= p[i]) <= 0) return order[i];
  return order[n - 1];
}

// The passkey prompt of Mohtashami & Jaggi (2023) as LongHeads evaluates it, in the model's own
// vocabulary: instructions, the "grass is green" filler repeated to `length` tokens, the key at
// `depth`, the question. Returns the tokens and the key.
std::pair<std::vector<std::int32_t>, std::string> passkey_prompt(const gguf::tokenizer& tok, std::int64_t length, double depth, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::string key = std::to_string(std::uniform_int_distribution<int>(10000, 99999)(rng));
  const auto intro = tok.encode(
      "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important "
      "information there.");
  const auto filler = tok.encode("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.", false);
  const auto needle = tok.encode("The pass key is " + key + ". Remember it. " + key + " is the pass key.", false);
  const auto question = tok.encode("What is the pass key? The pass key is", false);
  const std::int64_t fixed = static_cast<std::int64_t>(intro.size() + needle.size() + question.size());
  const std::int64_t repeats = std::max<std::int64_t>(1, (length - fixed) / static_cast<std::int64_t>(filler.size()));
  const auto before = static_cast<std::int64_t>(std::llround(depth * static_cast<double>(repeats)));
  std::vector<std::int32_t> out = intro;
  for (std::int64_t r = 0; r < repeats; ++r) {
    if (r == before) out.insert(out.end(), needle.begin(), needle.end());
    out.insert(out.end(), filler.begin(), filler.end());
  }
  if (before >= repeats) out.insert(out.end(), needle.begin(), needle.end());
  out.insert(out.end(), question.begin(), question.end());
  return {out, key};
}

template <class Policies>
int run(const llama2c::checkpoint& weights, const gguf::model_description& description, const gguf::tokenizer& tok, const options& o,
        longheads::attention_method method) {
  llama2c::policies::knobs knobs;
  knobs.threads = o.attention.threads;
  longheads::attention_config config = o.attention.config;
  config.method = method;
  llama2c::transformer<Policies> model(weights, config, description.make_rope(), llama2c::policies::make_set<Policies>(knobs));

  std::vector<std::int32_t> prompt;
  std::string key;
  if (o.passkey_length > 0) {
    std::tie(prompt, key) = passkey_prompt(tok, o.passkey_length, o.passkey_depth, o.seed);
  } else if (!o.prompt_ids.empty()) {
    prompt = llama2c::load_tokens(o.prompt_ids, weights.config().vocab_size);
  } else {
    std::string text = o.prompt;
    if (!o.prompt_file.empty()) {
      std::ifstream in(o.prompt_file, std::ios::binary);
      if (!in) throw std::runtime_error(o.prompt_file + ": cannot open");
      text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    prompt = tok.encode(text);
    const auto unknown = std::count_if(prompt.begin(), prompt.end(), [&](std::int32_t t) { return tok.is_unknown(t); });
    if (unknown > 0)
      std::fprintf(stderr, "warning: %lld of the prompt's %zu tokens are unknown to the vocabulary (a word-level vocabulary cannot encode text: use --prompt-ids)\n",
                   static_cast<long long>(unknown), prompt.size());
  }
  if (prompt.empty()) throw std::runtime_error("the prompt is empty");
  const std::int64_t n = static_cast<std::int64_t>(prompt.size());
  model.reserve(n + o.steps, std::min(o.block, n));

  const int vocab = weights.config().vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(vocab));
  const auto start = clock_type::now();
  for (std::int64_t first = 0; first < n; first += o.block) {
    const std::int64_t count = std::min(o.block, n - first);
    const bool last = first + count == n;
    model.forward(std::span<const std::int32_t>(prompt).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(count)),
                  last ? std::span<float>(logits) : std::span<float>{});
    if (!o.quiet)
      std::fprintf(stderr, "\rprefill %lld / %lld tokens, %.1f tokens/s   ", static_cast<long long>(first + count), static_cast<long long>(n),
                   static_cast<double>(first + count) / seconds_since(start));
  }
  const double prefill_seconds = seconds_since(start);
  if (!o.quiet) std::fprintf(stderr, "\n");

  std::mt19937_64 rng(o.seed);
  std::vector<std::int32_t> generated;
  const auto decode_start = clock_type::now();
  bool first_piece = true;
  for (int step = 0; step < o.steps; ++step) {
    const std::int32_t token = sample(logits, o.temperature, o.top_p, rng);
    if (token == tok.eos()) break;
    generated.push_back(token);
    const std::string piece = tok.decode(token, first_piece && o.passkey_length == 0 && o.prompt_ids.empty() && prompt.size() <= 1);
    first_piece = false;
    std::fputs(piece.c_str(), stdout);
    std::fflush(stdout);
    if (step + 1 < o.steps) model.forward(std::span<const std::int32_t>(&generated.back(), 1), logits);
  }
  const double decode_seconds = seconds_since(decode_start);
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "%lld prompt tokens in %.2f s (%.1f tokens/s), %zu generated in %.2f s (%.2f tokens/s), peak memory %.2f GiB\n",
               static_cast<long long>(n), prefill_seconds, static_cast<double>(n) / prefill_seconds, generated.size(), decode_seconds,
               generated.empty() ? 0.0 : static_cast<double>(generated.size()) / decode_seconds, peak_gib());
  if (o.passkey_length > 0) {
    const std::string answer = tok.decode(generated);
    const bool right = answer.find(key) != std::string::npos;
    std::printf("passkey %s at %lld tokens (depth %.2f): %s (answer \"%s\")\n", key.c_str(), static_cast<long long>(n), o.passkey_depth,
                right ? "right" : "wrong", answer.c_str());
    return right ? 0 : 3;
  }
  return 0;
}

// The policies this tool compiles (each is a transformer instantiation: a subset keeps the build short).
template <class F>
int with_chat_policy(const std::string& name, F&& f) {
  namespace p = llama2c::policies;
  if (name == "paper") return f(std::type_identity<p::paper>{});
  if (name == "quest") return f(std::type_identity<p::quest>{});
  if (name == "recommended" || name == "quest-beam") return f(std::type_identity<p::recommended>{});
  if (name == "quest-certified") return f(std::type_identity<p::quest_certified>{});
  if (name == "quest-clusters") return f(std::type_identity<p::quest_clusters>{});
  throw CLI::ValidationError("--policy", "unknown policy '" + name + "' (paper | quest | recommended | quest-beam | quest-certified | quest-clusters)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"A GGUF model (llama / qwen2) with LongHeads, dense or sink+window attention: text in, text out.", "longheads_chat"};
  options o;
  o.attention.config.chunk_size = 0;  // 0: chosen from the model's trained context
  o.attention.config.budget_chunks = 0;
  app.add_option("--model", o.model_path, "a GGUF file")->required()->check(CLI::ExistingFile);
  auto* prompt = app.add_option("--prompt", o.prompt, "the prompt text");
  auto* file = app.add_option("--prompt-file", o.prompt_file, "a file whose text is the prompt")->check(CLI::ExistingFile);
  auto* ids = app.add_option("--prompt-ids", o.prompt_ids, "a file of little-endian int32 token ids as the prompt")->check(CLI::ExistingFile);
  auto* passkey = app.add_option("--passkey", o.passkey_length, "build the paper's passkey prompt of about this many tokens and report right/wrong");
  prompt->excludes(file)->excludes(ids)->excludes(passkey);
  file->excludes(ids)->excludes(passkey);
  ids->excludes(passkey);
  app.add_option("--depth", o.passkey_depth, "--passkey: where the key sits (0..1)")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  tools::add_attention_flags(app, o.attention);
  app.add_option("--policy", o.policy, "LongHeads' selection policy (paper | quest | recommended | quest-certified | quest-clusters)")->capture_default_str();
  app.add_option("--steps", o.steps, "tokens to generate at most (stops at EOS)")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--temperature", o.temperature, "0: greedy")->check(CLI::Range(0.0f, 100.0f))->capture_default_str();
  app.add_option("--top-p", o.top_p, "nucleus sampling mass")->check(CLI::Range(0.0f, 1.0f))->capture_default_str();
  app.add_option("--seed", o.seed, "sampling and passkey seed")->capture_default_str();
  app.add_option("--block", o.block, "prefill block (tokens per forward call)")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  app.add_flag("--quiet", o.quiet, "no progress line");
  CLI11_PARSE(app, argc, argv);
  try {
    const auto load_start = clock_type::now();
    const gguf::file file(o.model_path);
    const auto description = gguf::describe(file.get());
    const gguf::tokenizer tok(file.get(), description.config.vocab_size);
    const llama2c::checkpoint weights = gguf::load_weights(file.get(), description);
    const auto& c = description.config;
    auto& a = o.attention.config;
    if (a.chunk_size == 0) a.chunk_size = std::clamp(c.seq_len / 16, 16, 256);
    if (a.budget_chunks == 0) a.budget_chunks = std::max(a.sink_chunks + a.local_chunks + 1, c.seq_len / a.chunk_size);
    std::fprintf(stderr, "%s: %s, %d layers, dim %d, %d/%d heads, vocab %d, trained context %d; loaded in %.1f s; attention %s, w %d, k %d (budget %lld tokens)\n",
                 o.model_path.c_str(), description.architecture.c_str(), c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len,
                 seconds_since(load_start), o.attention.method.c_str(), a.chunk_size, a.budget_chunks,
                 static_cast<long long>(a.budget_tokens()));
    const auto method = tools::parse_method(o.attention.method);
    if (method != longheads::attention_method::longheads)
      return run<llama2c::policies::paper>(weights, description, tok, o, method);
    return with_chat_policy(o.policy, [&](auto tag) { return run<typename decltype(tag)::type>(weights, description, tok, o, method); });
  } catch (const CLI::Error& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longheads_chat: %s\n", e.what());
    return 2;
  }
}
