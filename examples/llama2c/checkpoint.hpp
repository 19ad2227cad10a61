// SPDX-License-Identifier: MIT
// llama2.c legacy checkpoints: a 7-int32 header, then fp32 weights (see ../shared/README.md).
// The whole file is read into memory and every tensor is a view into it; the size is checked
// against the header first, so a truncated or foreign file fails before anything is read.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

struct model_config {
  int dim = 0;         // model width
  int hidden_dim = 0;  // feed-forward width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;     // the trained context
  bool shared_classifier = true;
  double norm_eps = 1e-5;  // RMSNorm epsilon (llama2.c's; GGUF files state theirs)

  int head_dim() const noexcept { return dim / n_heads; }
  int kv_dim() const noexcept { return n_kv_heads * head_dim(); }
};

struct layer_weights {
  const float* rms_attention;  // [dim]
  const float* wq;             // [dim, dim]
  const float* wk;             // [kv_dim, dim]
  const float* wv;             // [kv_dim, dim]
  const float* wo;             // [dim, dim]
  const float* rms_ffn;        // [dim]
  const float* w1;             // [hidden, dim]
  const float* w2;             // [dim, hidden]
  const float* w3;             // [hidden, dim]
  const float* bq = nullptr;   // [dim] q/k/v biases (Qwen2); none in llama2.c
  const float* bk = nullptr;   // [kv_dim]
  const float* bv = nullptr;   // [kv_dim]
};

class checkpoint {
 public:
  /// @throws std::runtime_error naming the file and what is wrong with it.
  explicit checkpoint(const std::filesystem::path& path) {
    const std::string name = path.string();
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(name + ": cannot open model file");
    std::int32_t header[7];
    if (!in.read(reinterpret_cast<char*>(header), sizeof header))
      throw std::runtime_error(name + ": too short for a llama2.c header (28 bytes)");
    config_ = {header[0], header[1], header[2], header[3], header[4], header[5] < 0 ? -header[5] : header[5], header[6],
               header[5] > 0};
    validate_header(name);
    const std::uintmax_t file_bytes = std::filesystem::file_size(path);
    const std::uintmax_t expected = sizeof header + expected_floats() * sizeof(float);
    if (file_bytes != expected)
      throw std::runtime_error(name + ": " + std::to_string(file_bytes) + " bytes, but its header (dim " + std::to_string(config_.dim) +
                               ", layers " + std::to_string(config_.n_layers) + ", vocab " + std::to_string(config_.vocab_size) +
                               ", seq_len " + std::to_string(config_.seq_len) + ") needs " + std::to_string(expected) +
                               (file_bytes < expected ? " (truncated?)" : " (not a llama2.c legacy checkpoint?)"));
    weights_.resize(expected_floats());
    if (!in.read(reinterpret_cast<char*>(weights_.data()), static_cast<std::streamsize>(weights_.size() * sizeof(float))))
      throw std::runtime_error(name + ": read failed");
    map_tensors();
  }

  /// Weights already in memory (a GGUF file's, dequantised): `storage` owns every tensor the
  /// pointers name (moving a vector keeps its buffer, so they stay valid).
  checkpoint(const model_config& config, std::vector<float> storage, std::vector<layer_weights> layers, const float* token_embedding,
             const float* rms_final, const float* classifier)
      : config_(config), weights_(std::move(storage)), layers_(std::move(layers)), token_embedding_(token_embedding),
        rms_final_(rms_final), classifier_(classifier) {}
  checkpoint(checkpoint&&) noexcept = default;

  const model_config& config() const noexcept { return config_; }
  const layer_weights& layer(int l) const { return layers_.at(static_cast<std::size_t>(l)); }
  const float* token_embedding() const noexcept { return token_embedding_; }  // [vocab, dim]
  const float* rms_final() const noexcept { return rms_final_; }              // [dim]
  const float* classifier() const noexcept { return classifier_; }            // [vocab, dim]

 private:
  void validate_header(const std::string& name) const {
    const model_config& c = config_;
    auto bad = [&](const std::string& what) { throw std::runtime_error(name + ": not a llama2.c checkpoint: " + what); };
    if (c.dim <= 0 || c.hidden_dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.vocab_size <= 0 || c.seq_len <= 0)
      bad("header has a non-positive size (dim " + std::to_string(c.dim) + ", hidden " + std::to_string(c.hidden_dim) + ", layers " +
          std::to_string(c.n_layers) + ", heads " + std::to_string(c.n_heads) + ", kv heads " + std::to_string(c.n_kv_heads) +
          ", vocab " + std::to_string(c.vocab_size) + ", seq_len " + std::to_string(c.seq_len) + ")");
    constexpr int sane = 1 << 20;
    if (c.dim > sane || c.hidden_dim > sane || c.n_layers > 4096 || c.vocab_size > sane || c.seq_len > (1 << 24))
      bad("header sizes are implausibly large");
    if (c.dim % c.n_heads != 0) bad("dim " + std::to_string(c.dim) + " is not a multiple of n_heads " + std::to_string(c.n_heads));
    if (c.n_heads % c.n_kv_heads != 0)
      bad("n_heads " + std::to_string(c.n_heads) + " is not a multiple of n_kv_heads " + std::to_string(c.n_kv_heads));
    if (c.head_dim() % 2 != 0) bad("head_dim " + std::to_string(c.head_dim()) + " is odd; RoPE needs pairs");
  }

  std::uintmax_t expected_floats() const noexcept {
    const model_config& c = config_;
    const std::uintmax_t dim = c.dim, hidden = c.hidden_dim, layers = c.n_layers, kv = c.kv_dim(), vocab = c.vocab_size;
    std::uintmax_t n = vocab * dim;                                         // token embedding
    n += layers * (dim + dim * dim + 2 * kv * dim + dim * dim + dim);       // attention + norms
    n += layers * 3 * hidden * dim;                                         // w1 w2 w3
    n += dim + std::uintmax_t(c.seq_len) * std::uintmax_t(c.head_dim());    // rms_final, freq_cis (real+imag)
    if (!c.shared_classifier) n += vocab * dim;
    return n;
  }

  void map_tensors() {
    const model_config& c = config_;
    const std::size_t dim = c.dim, hidden = c.hidden_dim, kv = c.kv_dim(), L = c.n_layers;
    const float* p = weights_.data();
    auto take = [&p](std::size_t n) {
      const float* t = p;
      p += n;
      return t;
    };
    token_embedding_ = take(std::size_t(c.vocab_size) * dim);
    const float* rms_att = take(L * dim);
    const float* wq = take(L * dim * dim);
    const float* wk = take(L * kv * dim);
    const float* wv = take(L * kv * dim);
    const float* wo = take(L * dim * dim);
    const float* rms_ffn = take(L * dim);
    const float* w1 = take(L * hidden * dim);
    const float* w2 = take(L * dim * hidden);
    const float* w3 = take(L * hidden * dim);
    rms_final_ = take(dim);
    take(std::size_t(c.seq_len) * std::size_t(c.head_dim()));  // freq_cis_real + imag: RoPE is computed instead
    classifier_ = c.shared_classifier ? token_embedding_ : take(std::size_t(c.vocab_size) * dim);
    for (std::size_t l = 0; l < L; ++l)
      layers_.push_back({rms_att + l * dim, wq + l * dim * dim, wk + l * kv * dim, wv + l * kv * dim, wo + l * dim * dim,
                         rms_ffn + l * dim, w1 + l * hidden * dim, w2 + l * dim * hidden, w3 + l * hidden * dim});
  }

  model_config config_;
  std::vector<float> weights_;
  std::vector<layer_weights> layers_;
  const float* token_embedding_ = nullptr;
  const float* rms_final_ = nullptr;
  const float* classifier_ = nullptr;
};

/// A checkpoint named `name`: as given if it exists, else that file name under $LONGHEADS_MODELS,
/// ../shared/models (from the working directory) and `checkout`/../shared/models.
inline std::optional<std::filesystem::path> find_model(const std::string& name, const std::filesystem::path& checkout) {
  namespace fs = std::filesystem;
  if (fs::exists(name)) return fs::path(name);
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("LONGHEADS_MODELS")) dirs.emplace_back(env);
  dirs.emplace_back("../shared/models");
  dirs.emplace_back(checkout / ".." / "shared" / "models");
  const fs::path file = fs::path(name).filename();
  for (const auto& d : dirs)
    if (fs::exists(d / file)) return d / file;
  return std::nullopt;
}

/// A file of little-endian int32 token ids, each checked against the vocabulary.
inline std::vector<std::int32_t> load_tokens(const std::filesystem::path& path, int vocab_size) {
  const std::string name = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(name + ": cannot open token file");
  const std::uintmax_t bytes = std::filesystem::file_size(path);
  if (bytes % 4 != 0) throw std::runtime_error(name + ": " + std::to_string(bytes) + " bytes is not a whole number of int32 tokens");
  if (bytes == 0) throw std::runtime_error(name + ": empty token file");
  std::vector<std::int32_t> tokens(bytes / 4);
  if (!in.read(reinterpret_cast<char*>(tokens.data()), static_cast<std::streamsize>(bytes)))
    throw std::runtime_error(name + ": read failed");
  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab_size)
      throw std::runtime_error(name + ": token " + std::to_string(i) + " is " + std::to_string(tokens[i]) +
                               ", outside the model's vocabulary [0, " + std::to_string(vocab_size) + ")");
  return tokens;
}

}  // namespace llama2c
