// SPDX-License-Identifier: MIT
// longheads_run: run LongHeads (or a baseline) on your own model's pre-RoPE q/k/v tensors.
//
//   longheads_run --q q.npy --k k.npy --v v.npy --chunk-size 256 --chunks 16 --out out.npy
//
// q.npy [T, H_q, d], k.npy and v.npy [T, H_kv, d], float32 C order. Writes the attention
// output [T, H_q, d] and, with --selections, the chunk ids each query read [T, H_q, chunks].
#include <longheads/longheads.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "common/attention_flags.hpp"
#include "common/npy.hpp"

namespace {

struct options {
  std::string q_path, k_path, v_path, out_path, selections_path;
  tools::attention_flags attention;
  double rope_theta = 10000.0;
  longheads::rope_layout layout = longheads::rope_layout::half;
  std::string rope_scaling = "none";
  double rope_factor = 1.0;
  double rope_original_context = 4096;
  long split = 0;
};

longheads::rope make_rope(const options& o, int head_dim) {
  if (o.rope_scaling == "linear") return longheads::rope(head_dim, o.rope_theta, o.layout, longheads::linear_scaling{o.rope_factor});
  if (o.rope_scaling == "ntk") return longheads::rope(head_dim, o.rope_theta, o.layout, longheads::ntk_scaling{o.rope_factor});
  if (o.rope_scaling == "yarn")
    return longheads::rope(head_dim, o.rope_theta, o.layout,
                           longheads::yarn_scaling{.factor = o.rope_factor, .original_context = o.rope_original_context});
  return longheads::rope(head_dim, o.rope_theta, o.layout);
}

struct threaded : longheads::paper_policies {
  using executor = longheads::thread_pool_executor;
};

template <class Policies>
void run(const options& o, const npy::array<float>& q, const npy::array<float>& k, const npy::array<float>& v,
         typename longheads::attention<Policies>::policy_set policies) {
  const auto T = q.shape[0], hq = q.shape[1], hkv = k.shape[1], d = q.shape[2];
  longheads::attention_config config = o.attention.config;
  config.n_q_heads = static_cast<int>(hq);
  config.n_kv_heads = static_cast<int>(hkv);
  config.head_dim = static_cast<int>(d);
  longheads::attention<Policies> attention(config, make_rope(o, config.head_dim), std::move(policies));
  auto cache = attention.make_cache(T);
  std::vector<float> out(static_cast<std::size_t>(T * hq * d));
  std::vector<std::int32_t> selections;
  const bool record = !o.selections_path.empty();
  if (record) selections.resize(static_cast<std::size_t>(T * hq * config.budget_chunks));
  const std::int64_t step = o.split > 0 ? o.split : T;
  for (std::int64_t first = 0; first < T; first += step) {
    const std::int64_t n = std::min(step, T - first);
    attention.prefill(cache, {q.data.data() + first * hq * d, n, hq, d}, {k.data.data() + first * hkv * d, n, hkv, d},
                      {v.data.data() + first * hkv * d, n, hkv, d}, {out.data() + first * hq * d, n, hq, d},
                      record ? std::span<std::int32_t>(selections).subspan(static_cast<std::size_t>(first * hq * config.budget_chunks),
                                                                           static_cast<std::size_t>(n * hq * config.budget_chunks))
                             : std::span<std::int32_t>{});
  }
  if (!o.out_path.empty()) npy::save(o.out_path, {T, hq, d}, out.data());
  if (record) npy::save(o.selections_path, {T, hq, std::int64_t{config.budget_chunks}}, selections.data());
}

void check_tensor(const npy::array<float>& a, const std::string& name, const std::string& path) {
  if (a.shape.size() != 3)
    throw std::runtime_error(path + ": " + name + " must have 3 dimensions [T, heads, head_dim], got " + std::to_string(a.shape.size()));
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"Run LongHeads attention (or a baseline) on pre-RoPE q/k/v tensors from .npy files.", "longheads_run"};
  app.add_option("--q", o.q_path, "queries [T, H_q, d], float32 .npy, before RoPE")->required()->check(CLI::ExistingFile);
  app.add_option("--k", o.k_path, "keys [T, H_kv, d], float32 .npy, before RoPE")->required()->check(CLI::ExistingFile);
  app.add_option("--v", o.v_path, "values [T, H_kv, d], float32 .npy")->required()->check(CLI::ExistingFile);
  app.add_option("--out", o.out_path, "attention output [T, H_q, d], float32 .npy");
  app.add_option("--selections", o.selections_path, "chunk ids read per query [T, H_q, chunks], int32 .npy, -1 padded (longheads)");
  std::string layout = "half";
  tools::add_attention_flags(app, o.attention);
  app.add_option("--rope-theta", o.rope_theta, "RoPE base")->capture_default_str();
  app.add_option("--rope-layout", layout, "RoPE pairs: half (HF/NeoX) or interleaved (Meta/llama2.c)")
      ->check(CLI::IsMember({"half", "interleaved"}))
      ->capture_default_str();
  app.add_option("--rope-scaling", o.rope_scaling, "none | linear | ntk | yarn")
      ->check(CLI::IsMember({"none", "linear", "ntk", "yarn"}))
      ->capture_default_str();
  app.add_option("--rope-factor", o.rope_factor, "scaling factor for linear/ntk/yarn")->capture_default_str();
  app.add_option("--rope-original-context", o.rope_original_context, "yarn: the model's trained context")->capture_default_str();
  app.add_option("--split", o.split, "feed the sequence as prefill blocks of N tokens (1 = decode token by token; 0 = all at once)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "longheads_run: error: %s (see --help)\n", e.what());
    return 2;
  }
  o.attention.config.method = tools::parse_method(o.attention.method);
  o.layout = layout == "interleaved" ? longheads::rope_layout::interleaved : longheads::rope_layout::half;
  try {
    const auto q = npy::load<float>(o.q_path), k = npy::load<float>(o.k_path), v = npy::load<float>(o.v_path);
    check_tensor(q, "q", o.q_path);
    check_tensor(k, "k", o.k_path);
    check_tensor(v, "v", o.v_path);
    if (k.shape != v.shape) throw std::runtime_error("k and v shapes differ");
    if (k.shape[0] != q.shape[0] || k.shape[2] != q.shape[2])
      throw std::runtime_error("q is [" + std::to_string(q.shape[0]) + ", " + std::to_string(q.shape[1]) + ", " +
                               std::to_string(q.shape[2]) + "] but k is [" + std::to_string(k.shape[0]) + ", " +
                               std::to_string(k.shape[1]) + ", " + std::to_string(k.shape[2]) + "]: T and head_dim must agree");
    if (o.attention.threads > 1)
      run<threaded>(o, q, k, v, {.executor = longheads::thread_pool_executor(o.attention.threads)});
    else
      run<longheads::paper_policies>(o, q, k, v, {});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longheads_run: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
