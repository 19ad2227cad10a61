// SPDX-License-Identifier: MIT
// A llama2.c-architecture transformer (RMSNorm, SwiGLU, GQA, RoPE on interleaved pairs) whose
// attention is longheads::attention, called through the public API only: the host owns its
// projections and buffers, hands pre-RoPE q/k/v to the library as views, and keeps one
// longheads::kv_cache per layer.
#pragma once

#include <longheads/longheads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/huge_pages.hpp"
#include "checkpoint.hpp"

namespace llama2c {

using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// llama2.c (its PyTorch training code and run.c alike) computes RoPE frequencies in float32:
/// 1 / 10000^(2i / d) rounded to float. The model was trained with those, so the host uses them
/// rather than exact ones; the difference grows with the position.
struct llama2c_float_frequencies {
  void rescale(std::span<double> inverse_frequencies, int head_dim, double base) const noexcept {
    for (std::size_t i = 0; i < inverse_frequencies.size(); ++i)
      inverse_frequencies[i] = 1.0f / std::pow(static_cast<float>(base), static_cast<float>(2 * i) / static_cast<float>(head_dim));
  }
  double magnitude() const noexcept { return 1.0; }
};

/// The attention settings a host chooses; head counts and head_dim come from the model.
inline longheads::attention_config attention_config_for(const model_config& model, longheads::attention_config knobs) {
  knobs.n_q_heads = model.n_heads;
  knobs.n_kv_heads = model.n_kv_heads;
  knobs.head_dim = model.head_dim();
  return knobs;
}

/// The paper's policies with a thread pool (one lane by default), so --threads is a runtime knob.
struct threaded_policies : longheads::paper_policies {
  using executor = longheads::thread_pool_executor;
};

template <class Policies = longheads::paper_policies>
class transformer {
 public:
  using attention_type = longheads::attention<Policies>;

  transformer(const checkpoint& model, const longheads::attention_config& knobs,
              typename attention_type::policy_set policies = {})
      : transformer(model, knobs, longheads::rope(model.config().head_dim(), 10000.0, longheads::rope_layout::interleaved, llama2c_float_frequencies{}),
                    std::move(policies)) {}

  /// A model whose RoPE is not llama2.c's (a GGUF file's base, layout and scaling).
  transformer(const checkpoint& model, const longheads::attention_config& knobs, const longheads::rope& rope,
              typename attention_type::policy_set policies = {})
      : model_(model), config_(model.config()), attention_(attention_config_for(config_, knobs), rope, std::move(policies)) {
    // Caches on huge pages: a million-token context spans gigabytes, which on 4 KB pages is a
    // TLB miss at nearly every chunk a head reads (examples/common/huge_pages.hpp).
    for (int l = 0; l < config_.n_layers; ++l) caches_.push_back(attention_.make_cache(0, &tools::huge_pages()));
    last_queries_.resize(static_cast<std::size_t>(config_.n_layers) * static_cast<std::size_t>(config_.dim));
  }

  const model_config& config() const noexcept { return config_; }
  const attention_type& attention() const noexcept { return attention_; }
  const longheads::kv_cache& cache(int layer) const { return caches_.at(static_cast<std::size_t>(layer)); }
  std::int64_t position() const noexcept { return caches_.front().tokens(); }
  /// The pre-RoPE query [H_q, d] of the last token fed, at `layer` (for selection diagnostics).
  std::span<const float> last_query(int layer) const {
    return std::span<const float>(last_queries_).subspan(static_cast<std::size_t>(layer) * static_cast<std::size_t>(config_.dim),
                                                         static_cast<std::size_t>(config_.dim));
  }

  /// Saves every layer's cache to one file (a record per layer, longheads/cache_file.hpp).
  void save_caches(const std::filesystem::path& path) const {
    longheads::cache_file_writer file(path);
    for (const auto& c : caches_) file.save(attention_, c);
    file.commit();
  }
  /// Replaces every layer's cache with the file's (saved by save_caches() of this model and
  /// configuration), with room for `reserve_tokens` tokens. On error the caches are unchanged.
  void load_caches(const std::filesystem::path& path, std::int64_t reserve_tokens = 0) {
    longheads::cache_file_reader file(path);
    std::vector<longheads::kv_cache> loaded;
    for (std::size_t l = 0; l < caches_.size(); ++l) loaded.push_back(file.load(attention_, reserve_tokens, &tools::huge_pages()));
    file.expect_end();
    caches_ = std::move(loaded);
  }

  /// Starts a new sequence; keeps the memory.
  void reset() noexcept {
    for (auto& c : caches_) c.clear();
  }

  /// Sizes caches and scratch for sequences up to `context` tokens fed in blocks up to `block`.
  void reserve(std::int64_t context, std::int64_t block) {
    for (auto& c : caches_) c.reserve(context);
    attention_.reserve(context, block);
    resize_scratch(block);
  }

  /// Runs `tokens` at the next positions. Writes the logits of every token ([T, vocab]) when
  /// `logits.size() == T * vocab`, of the last token only when it is `vocab`, none when empty.
  void forward(std::span<const std::int32_t> tokens, std::span<float> logits) {
    forward_with(tokens, logits, [this](int layer, auto q, auto k, auto v, auto out) { attend_locally(layer, q, k, v, out); });
  }

  /// The attention of `layer` over this model's own cache (what forward() runs), with the
  /// block's selections ([T, H_q, k], -1 padded) if `selections` is not empty.
  void attend_locally(int layer, longheads::tensor_view<const float> q, longheads::tensor_view<const float> k,
                      longheads::tensor_view<const float> v, longheads::tensor_view<float> out, std::span<std::int32_t> selections = {}) {
    attention_.prefill(caches_.at(static_cast<std::size_t>(layer)), q, k, v, out, selections);
  }

  /// forward() with every layer's attention done by `attend(layer, q, k, v, out)` (pre-RoPE
  /// [T, heads, d] views of the block) instead of over this model's caches: for a host whose
  /// caches live elsewhere (the MPI host, examples/llama2c/sharded.cpp).
  template <class Attend>
  void forward_with(std::span<const std::int32_t> tokens, std::span<float> logits, Attend&& attend) {
    const auto T = static_cast<std::ptrdiff_t>(tokens.size());
    const std::ptrdiff_t vocab = config_.vocab_size;
    if (T == 0) throw std::invalid_argument("transformer::forward: no tokens");
    if (!logits.empty() && logits.size() != static_cast<std::size_t>(T * vocab) && logits.size() != static_cast<std::size_t>(vocab))
      throw std::invalid_argument("transformer::forward: logits must hold T*vocab, vocab or no floats");
    for (std::int32_t t : tokens)
      if (t < 0 || t >= vocab) throw std::invalid_argument("transformer::forward: token " + std::to_string(t) + " outside the vocabulary");
    resize_scratch(T);
    const std::ptrdiff_t dim = config_.dim, kv_dim = config_.kv_dim(), hidden = config_.hidden_dim, hd = config_.head_dim();
    auto x = x_.topRows(T);
    for (std::ptrdiff_t t = 0; t < T; ++t)
      x.row(t) = Eigen::Map<const Eigen::RowVectorXf>(model_.token_embedding() + tokens[t] * dim, dim);

    for (int l = 0; l < config_.n_layers; ++l) {
      const layer_weights& w = model_.layer(l);
      auto xn = xn_.topRows(T);
      auto q = q_.topRows(T), k = k_.topRows(T), v = v_.topRows(T), att = att_.topRows(T);
      rms_norm(x, w.rms_attention, config_.norm_eps, xn);
      project(xn, w.wq, dim, q);
      project(xn, w.wk, kv_dim, k);
      project(xn, w.wv, kv_dim, v);
      add_bias(q, w.bq);
      add_bias(k, w.bk);
      add_bias(v, w.bv);
      std::copy_n(q.row(T - 1).data(), dim, last_queries_.data() + l * dim);
      attend(l, longheads::tensor_view<const float>(q.data(), T, config_.n_heads, hd), longheads::tensor_view<const float>(k.data(), T, config_.n_kv_heads, hd),
             longheads::tensor_view<const float>(v.data(), T, config_.n_kv_heads, hd), longheads::tensor_view<float>(att.data(), T, config_.n_heads, hd));
      auto delta = delta_.topRows(T);
      project(att, w.wo, dim, delta);
      x += delta;

      rms_norm(x, w.rms_ffn, config_.norm_eps, xn);
      auto gate = gate_.topRows(T), up = up_.topRows(T);
      project(xn, w.w1, hidden, gate);
      project(xn, w.w3, hidden, up);
      swiglu(gate, up);
      project(gate, w.w2, dim, delta);
      x += delta;
    }

    if (logits.empty()) return;
    const bool all_rows = logits.size() == static_cast<std::size_t>(T * vocab);
    const std::ptrdiff_t first = all_rows ? 0 : T - 1, rows = T - first;
    auto xn = xn_.middleRows(first, rows);
    rms_norm(x.middleRows(first, rows), model_.rms_final(), config_.norm_eps, xn);
    Eigen::Map<row_matrix> out(logits.data(), rows, vocab);
    project(xn, model_.classifier(), vocab, out);
  }

 private:
  // out [T, n] = in [T, width] x W^T for a row-major weight W [n, width]. longheads::matmul_nt
  // gives every token the same bits whatever block it is fed in (an Eigen GEMM would not), so
  // prefill in blocks and token-by-token decode select the same chunks. Columns are split
  // over the attention's executor lanes.
  template <class In, class Out>
  void project(const In& in, const float* weight, std::ptrdiff_t n, Out&& out) {
    const longheads::matrix_view<const float> a(in.data(), in.rows(), in.cols(), in.outerStride());
    const longheads::matrix_view<const float> b(weight, n, in.cols(), in.cols());
    const longheads::matrix_view<float> c(out.data(), out.rows(), n, out.outerStride());
    // Below ~64k multiply-adds a thread hand-off costs more than it saves (decode of a tiny model).
    const std::size_t lanes = in.rows() * in.cols() * n < (1 << 16) ? 1 : attention_.policies().executor.lanes();
    const std::ptrdiff_t per_lane = (n + static_cast<std::ptrdiff_t>(lanes) - 1) / static_cast<std::ptrdiff_t>(lanes);
    auto part = [&](std::size_t i, std::size_t) {
      const std::ptrdiff_t begin = static_cast<std::ptrdiff_t>(i) * per_lane;
      longheads::matmul_nt(a, b, c, begin, std::min(n, begin + per_lane));
    };
    attention_.policies().executor.parallel_for(lanes, longheads::index_task(part));
  }

  // llama2.c's rmsnorm: w * x / sqrt(mean(x^2) + eps), eps 1e-5 there, per token. Plain loops, summed in
  // double: Eigen's vectorised reductions peel by address alignment, which would make a token's
  // bits depend on its row in the block.
  template <class In, class Out>
  static void rms_norm(const In& x, const float* weight, double eps, Out&& out) {
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      double squares = 0;
      for (Eigen::Index i = 0; i < x.cols(); ++i) squares += double(x(t, i)) * double(x(t, i));
      const double inv = 1.0 / std::sqrt(squares / static_cast<double>(x.cols()) + eps);
      for (Eigen::Index i = 0; i < x.cols(); ++i) out(t, i) = static_cast<float>(double(weight[i]) * double(x(t, i)) * inv);
    }
  }

  template <class Rows>
  static void add_bias(Rows& rows, const float* bias) {
    if (!bias) return;
    for (Eigen::Index t = 0; t < rows.rows(); ++t)
      for (Eigen::Index i = 0; i < rows.cols(); ++i) rows(t, i) += bias[i];
  }

  // gate = silu(gate) * up, element by element with std::exp (a vectorised exp would take a
  // scalar path for some elements depending on their address).
  template <class Gate, class Up>
  static void swiglu(Gate& gate, const Up& up) {
    for (Eigen::Index t = 0; t < gate.rows(); ++t)
      for (Eigen::Index i = 0; i < gate.cols(); ++i) gate(t, i) = gate(t, i) / (1.0f + std::exp(-gate(t, i))) * up(t, i);
  }

  void resize_scratch(std::ptrdiff_t block) {
    if (x_.rows() >= block) return;
    const std::ptrdiff_t dim = config_.dim, kv_dim = config_.kv_dim(), hidden = config_.hidden_dim;
    x_.resize(block, dim);
    delta_.resize(block, dim);
    xn_.resize(block, dim);
    q_.resize(block, dim);
    att_.resize(block, dim);
    k_.resize(block, kv_dim);
    v_.resize(block, kv_dim);
    gate_.resize(block, hidden);
    up_.resize(block, hidden);
  }

  const checkpoint& model_;
  model_config config_;
  attention_type attention_;
  std::vector<longheads::kv_cache> caches_;
  row_matrix x_, xn_, delta_, q_, k_, v_, att_, gate_, up_;
  std::vector<float> last_queries_;  // [layers, H_q * d]  // [block, width], token-major like the library's views
};

/// Feeds `tokens` in blocks of `split` tokens (0: one block; 1: token by token).
/// `logits` is [T, vocab] for all tokens, or [vocab] for the last one.
template <class Model>
void feed(Model& model, std::span<const std::int32_t> tokens, std::int64_t split, std::span<float> logits) {
  const auto T = static_cast<std::int64_t>(tokens.size());
  const std::int64_t vocab = model.config().vocab_size;
  const bool all_rows = logits.size() == static_cast<std::size_t>(T * vocab);
  const std::int64_t step = split > 0 ? split : T;
  for (std::int64_t first = 0; first < T; first += step) {
    const std::int64_t n = std::min(step, T - first);
    const bool last = first + n == T;
    auto block = tokens.subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(n));
    if (all_rows)
      model.forward(block, logits.subspan(static_cast<std::size_t>(first * vocab), static_cast<std::size_t>(n * vocab)));
    else
      model.forward(block, last ? logits : std::span<float>{});
  }
}

}  // namespace llama2c

namespace llama2c {

/// Feeds `prompt` (in blocks of `split`), then greedily decodes `n` tokens with the cache.
template <class Model>
std::vector<std::int32_t> greedy_continuation(Model& model, std::span<const std::int32_t> prompt, int n, std::int64_t split) {
  std::vector<float> logits(static_cast<std::size_t>(model.config().vocab_size));
  feed(model, prompt, split, logits);
  std::vector<std::int32_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    if (i + 1 < n) model.forward(std::span<const std::int32_t>(&out.back(), 1), logits);
  }
  return out;
}

}  // namespace llama2c
