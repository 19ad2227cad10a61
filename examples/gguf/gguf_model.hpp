// SPDX-License-Identifier: MIT
// A Llama-family model from a GGUF file, for the llama2.c host's transformer (the library's
// attention, this repository's projections): hyper-parameters from the metadata of
// `general.architecture` (llama: Llama 2/3, Mistral, TinyLlama, SmolLM; qwen2: with q/k/v
// biases), every weight dequantised to float (blocks.hpp), RoPE from the file's base, layout and
// scaling.
//
// RoPE layout. llama.cpp rotates llama-architecture heads on adjacent pairs (x[2i], x[2i+1]),
// Meta's layout: its converter undoes the permutation Hugging Face applied to q/k rows, so
// GGUF holds them as Meta (and llama2.c) trained them, and they are read as they are, with
// rope_layout::interleaved. qwen2 keeps Hugging Face's layout and rotates halves (x[i],
// x[i + d/2]): rope_layout::half. tests/gguf_test.cpp checks the first against the llama2.c
// host (a llama2.c model written as GGUF answers bit for bit the same).
#pragma once

#include <longheads/rope.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../llama2c/checkpoint.hpp"
#include "blocks.hpp"
#include "gguf_file.hpp"

namespace gguf {

/// The RoPE a GGUF model was trained with: frequencies computed in float32 as Meta's,
/// Hugging Face's and llama2.c's training code compute them (1 / base^(2i/d) in float), then
/// the file's scaling: linear (`rope.scaling.type` linear: divided by the factor), per-frequency
/// factors (Llama 3.1's `rope_freqs.weight`: divided by each), or YaRN (longheads::yarn_scaling).
struct file_frequencies {
  std::string scaling = "none";  // none | linear | yarn
  double factor = 1.0;
  double original_context = 0;
  std::vector<float> frequency_factors;  // empty, or head_dim / 2 divisors

  void rescale(std::span<double> inverse_frequencies, int head_dim, double base) const {
    for (std::size_t i = 0; i < inverse_frequencies.size(); ++i)
      inverse_frequencies[i] = 1.0f / std::pow(static_cast<float>(base), static_cast<float>(2 * i) / static_cast<float>(head_dim));
    if (!frequency_factors.empty())
      for (std::size_t i = 0; i < inverse_frequencies.size(); ++i) inverse_frequencies[i] /= frequency_factors[i];
    if (scaling == "linear") longheads::linear_scaling{factor}.rescale(inverse_frequencies, head_dim, base);
    if (scaling == "yarn") yarn().rescale(inverse_frequencies, head_dim, base);
  }
  double magnitude() const { return scaling == "yarn" ? yarn().magnitude() : 1.0; }

 private:
  longheads::yarn_scaling yarn() const {
    longheads::yarn_scaling y;
    y.factor = factor;
    y.original_context = original_context;
    return y;
  }
};

/// The decimal a float32 metadata value was written from (1e-5, not 9.99999974738e-06): the
/// shortest decimal that reads back as the same float. GGUF stores epsilons as float32; the
/// models were configured (and llama2.c computes) with the decimal, so the host does too.
inline double decimal_of(double stored) {
  char text[64];
  const auto end = std::to_chars(text, text + sizeof text, static_cast<float>(stored)).ptr;
  double out = stored;
  std::from_chars(text, end, out);
  return out;
}

/// What a GGUF file's model is, as the host needs it.
struct model_description {
  std::string architecture;
  llama2c::model_config config;
  double rope_base = 10000.0;
  longheads::rope_layout rope_layout = longheads::rope_layout::interleaved;
  file_frequencies frequencies;

  longheads::rope make_rope() const { return longheads::rope(config.head_dim(), rope_base, rope_layout, frequencies); }
};

/// Reads the hyper-parameters of a llama or qwen2 model from the metadata and tensor shapes.
/// @throws format_error (unsupported / missing_key / wrong_value_type / wrong_tensor_shape).
inline model_description describe(const contents& file) {
  model_description m;
  m.architecture = file.string("general.architecture");
  const std::string& a = m.architecture;
  if (a != "llama" && a != "qwen2")
    throw format_error(error_kind::unsupported, "GGUF: architecture '" + a + "' is not read by this host (it reads llama and qwen2)");
  llama2c::model_config& c = m.config;
  constexpr std::int64_t sane = 1 << 20;
  c.dim = static_cast<int>(file.integer(a + ".embedding_length", 1, sane));
  c.n_layers = static_cast<int>(file.integer(a + ".block_count", 1, 4096));
  c.hidden_dim = static_cast<int>(file.integer(a + ".feed_forward_length", 1, sane));
  c.n_heads = static_cast<int>(file.integer(a + ".attention.head_count", 1, 4096));
  c.n_kv_heads = static_cast<int>(file.integer_or(a + ".attention.head_count_kv", c.n_heads, 1, 4096));
  c.seq_len = static_cast<int>(file.integer(a + ".context_length", 1, std::int64_t{1} << 30));
  c.norm_eps = decimal_of(file.number_or(a + ".attention.layer_norm_rms_epsilon", 1e-5));
  if (!(c.norm_eps > 0 && c.norm_eps < 1)) throw format_error(error_kind::wrong_value_type, "GGUF: RMSNorm epsilon " + std::to_string(c.norm_eps) + " is not in (0, 1)");
  if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.head_dim() % 2 != 0)
    throw format_error(error_kind::unsupported, "GGUF: dim " + std::to_string(c.dim) + ", " + std::to_string(c.n_heads) + " heads, " +
                                                    std::to_string(c.n_kv_heads) + " kv heads: need head_dim = dim / heads even and heads a multiple of kv heads");
  if (file.integer_or(a + ".attention.key_length", c.head_dim()) != c.head_dim() ||
      file.integer_or(a + ".attention.value_length", c.head_dim()) != c.head_dim())
    throw format_error(error_kind::unsupported, "GGUF: key/value length differs from dim / heads (not read by this host)");
  if (file.integer_or(a + ".rope.dimension_count", c.head_dim()) != c.head_dim())
    throw format_error(error_kind::unsupported, "GGUF: RoPE on part of the head (rope.dimension_count != head_dim) is not read by this host");
  const tensor_info& embedding = file.tensor("token_embd.weight");
  if (embedding.shape.size() != 2 || embedding.shape[0] != static_cast<std::uint64_t>(c.dim) || embedding.shape[1] > static_cast<std::uint64_t>(sane))
    throw format_error(error_kind::wrong_tensor_shape, "GGUF: token_embd.weight is not [vocab, " + std::to_string(c.dim) + "]");
  c.vocab_size = static_cast<int>(embedding.shape[1]);
  c.shared_classifier = file.find_tensor("output.weight") == nullptr;

  m.rope_base = decimal_of(file.number_or(a + ".rope.freq_base", 10000.0));
  m.rope_layout = a == "qwen2" ? longheads::rope_layout::half : longheads::rope_layout::interleaved;
  file_frequencies& f = m.frequencies;
  if (file.find(a + ".rope.scaling.type")) f.scaling = file.string(a + ".rope.scaling.type");
  if (f.scaling != "none" && f.scaling != "linear" && f.scaling != "yarn")
    throw format_error(error_kind::unsupported, "GGUF: rope scaling '" + f.scaling + "' is not read by this host (none, linear, yarn)");
  f.factor = file.number_or(a + ".rope.scaling.factor", 1.0);
  f.original_context = file.number_or(a + ".rope.scaling.original_context_length", c.seq_len);
  if (f.scaling != "none" && !(f.factor > 0)) throw format_error(error_kind::wrong_value_type, "GGUF: rope scaling factor must be > 0");
  if (const tensor_info* factors = file.find_tensor("rope_freqs.weight")) {
    if (factors->elements != static_cast<std::uint64_t>(c.head_dim() / 2))
      throw format_error(error_kind::wrong_tensor_shape, "GGUF: rope_freqs.weight holds " + std::to_string(factors->elements) + " factors, not head_dim / 2");
    f.frequency_factors.resize(factors->elements);
    dequantize(factors->type, factors->data, f.frequency_factors);
    for (float x : f.frequency_factors)
      if (!(x > 0) || !std::isfinite(x)) throw format_error(error_kind::wrong_value_type, "GGUF: rope_freqs.weight holds a factor <= 0 or not finite");
  }
  return m;
}

/// Every weight of the model, dequantised to float, as a llama2c::checkpoint.
inline llama2c::checkpoint load_weights(const contents& file, const model_description& m) {
  const llama2c::model_config& c = m.config;
  struct wanted {
    const tensor_info* tensor;
    std::uint64_t rows, cols;
  };
  std::vector<wanted> order;
  auto want = [&](const std::string& name, std::uint64_t rows, std::uint64_t cols) {
    const tensor_info& t = file.tensor(name);
    // ggml's shape lists the row length first: a [rows, cols] row-major matrix is ne = {cols, rows}.
    const bool vector = rows == 1;
    const bool fits = vector ? (t.shape.size() == 1 && t.shape[0] == cols) : (t.shape.size() == 2 && t.shape[0] == cols && t.shape[1] == rows);
    if (!fits)
      throw format_error(error_kind::wrong_tensor_shape, "GGUF: tensor '" + name + "' has shape [" + [&] {
        std::string s;
        for (auto d : t.shape) s += (s.empty() ? "" : ", ") + std::to_string(d);
        return s;
      }() + "], the model needs ne = [" + std::to_string(cols) + (vector ? "" : ", " + std::to_string(rows)) + "]");
    if (!dequantizable(t.type)) dequantize(t.type, {}, {});  // throws the named error
    order.push_back({&t, rows, cols});
  };
  const std::uint64_t dim = c.dim, kv = c.kv_dim(), hidden = c.hidden_dim, vocab = c.vocab_size;
  const bool biases = m.architecture == "qwen2";
  want("token_embd.weight", vocab, dim);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    want(p + "attn_norm.weight", 1, dim);
    want(p + "attn_q.weight", dim, dim);
    want(p + "attn_k.weight", kv, dim);
    want(p + "attn_v.weight", kv, dim);
    want(p + "attn_output.weight", dim, dim);
    want(p + "ffn_norm.weight", 1, dim);
    want(p + "ffn_gate.weight", hidden, dim);
    want(p + "ffn_down.weight", dim, hidden);
    want(p + "ffn_up.weight", hidden, dim);
    if (biases) {
      want(p + "attn_q.bias", 1, dim);
      want(p + "attn_k.bias", 1, kv);
      want(p + "attn_v.bias", 1, kv);
    }
  }
  want("output_norm.weight", 1, dim);
  if (!c.shared_classifier) want("output.weight", vocab, dim);

  std::uint64_t total = 0;
  for (const auto& w : order) total += w.rows * w.cols;
  std::vector<float> storage(static_cast<std::size_t>(total));
  std::vector<const float*> at;
  std::size_t next = 0;
  for (const auto& w : order) {
    std::span<float> out(storage.data() + next, static_cast<std::size_t>(w.rows * w.cols));
    dequantize(w.tensor->type, w.tensor->data, out);
    at.push_back(out.data());
    next += out.size();
  }
  std::size_t i = 0;
  const float* embedding = at[i++];
  std::vector<llama2c::layer_weights> layers;
  for (int l = 0; l < c.n_layers; ++l) {
    llama2c::layer_weights w{};
    w.rms_attention = at[i++];
    w.wq = at[i++];
    w.wk = at[i++];
    w.wv = at[i++];
    w.wo = at[i++];
    w.rms_ffn = at[i++];
    w.w1 = at[i++];
    w.w2 = at[i++];
    w.w3 = at[i++];
    if (biases) {
      w.bq = at[i++];
      w.bk = at[i++];
      w.bv = at[i++];
    }
    layers.push_back(w);
  }
  const float* rms_final = at[i++];
  const float* classifier = c.shared_classifier ? embedding : at[i++];
  return llama2c::checkpoint(c, std::move(storage), std::move(layers), embedding, rms_final, classifier);
}

}  // namespace gguf
