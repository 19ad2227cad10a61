// SPDX-License-Identifier: MIT
// The library's attention knobs as command-line flags, shared by the example tools.
#pragma once

#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <map>
#include <string>

namespace tools {

struct attention_flags {
  longheads::attention_config config;
  std::string method = "longheads";
  unsigned threads = 1;
};

inline longheads::attention_method parse_method(const std::string& name) {
  if (name == "dense") return longheads::attention_method::dense;
  if (name == "sink-window") return longheads::attention_method::sink_window;
  if (name == "longheads") return longheads::attention_method::longheads;
  throw CLI::ValidationError("--attention", "unknown attention '" + name + "' (dense | sink-window | longheads)");
}

inline const char* method_name(longheads::attention_method m) {
  switch (m) {
    case longheads::attention_method::dense: return "dense";
    case longheads::attention_method::sink_window: return "sink-window";
    case longheads::attention_method::longheads: return "longheads";
  }
  return "?";
}

/// --attention (when `with_method`), --chunk-size, --chunks, --sink-chunks, --local-chunks,
/// --sink-tokens, --kv-storage, --threads.
inline void add_attention_flags(CLI::App& app, attention_flags& f, bool with_method = true) {
  if (with_method)
    app.add_option("--attention", f.method, "which attention")
        ->check(CLI::IsMember({"longheads", "dense", "sink-window"}))
        ->capture_default_str();
  app.add_option("--chunk-size", f.config.chunk_size, "tokens per chunk (w)")->capture_default_str();
  app.add_option("--chunks", f.config.budget_chunks, "chunks each head reads per query (k); budget L = k*w")
      
      ->capture_default_str();
  app.add_option("--sink-chunks", f.config.sink_chunks, "always-read chunks at the start")->capture_default_str();
  app.add_option("--local-chunks", f.config.local_chunks, "always-read most recent chunks, current included")
      
      ->capture_default_str();
  app.add_option("--sink-tokens", f.config.sink_tokens, "sink tokens of sink-window")->capture_default_str();
  app.add_option("--kv-storage", f.config.kv_storage, "cached keys and values as fp32, bf16 (half the bytes) or int8 (0.53x bf16) [fp32]")
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, longheads::kv_precision>{{"fp32", longheads::kv_precision::fp32}, {"bf16", longheads::kv_precision::bf16}, {"int8", longheads::kv_precision::int8}}));
  app.add_option("--threads", f.threads, "threads (heads run in parallel; results identical for any count)")
      ->check(CLI::Range(1u, 1024u))
      ->capture_default_str();
}

}  // namespace tools
