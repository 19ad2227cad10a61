// SPDX-License-Identifier: MIT
// Validation: every check a layer and a call make before anything is touched, as free functions.
//
// A layer is checked once (configuration, RoPE, encoder and scorer agreeing); a call checks the
// cache's shape, every view's shape and stride, that `out` shares no element with q, k or v,
// the selections buffer, the sequence limit, and (config.reject_nonfinite) every input value:
// NaN, Inf, and finite magnitudes large enough to overflow once rotated, multiplied into a
// logit or a score, or converted to bf16 (max_input_magnitude()).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>

#include "attention_config.hpp"
#include "index_policies.hpp"
#include "errors.hpp"
#include "kv_cache.hpp"
#include "rope.hpp"
#include "views.hpp"

namespace longheads {

/// The largest |x| a layer accepts in q, k and v when it rejects non-finite input. Below it no
/// intermediate overflows: a rotated element is at most sqrt(2) m |x| (m: the RoPE's
/// magnitude), a dot product of two rotated rows at most 2 d m^2 x^2, times the softmax scale
/// (or the encoders' 1/sqrt(d), or 1 for scores); the limit keeps that below FLT_MAX / 4, so
/// differences of two logits and fp32 rounding stay finite too. Values enter outputs only
/// through convex combinations (and unnormalised sums of at most 2^31 rows, hence the cap at 2^64),
/// and bf16 holds anything below FLT_MAX (int8 too: its scale is the block's largest / 127). For d = 128 and plain RoPE: about 5.8e17.
inline float max_input_magnitude(const attention_config& config, const rope& rotary) noexcept {
  const double m = std::max(1.0, rotary.magnitude());
  const double scale = std::max(1.0, static_cast<double>(config.scale()));
  const double limit = std::sqrt(static_cast<double>(FLT_MAX) / 4.0 / (2.0 * config.head_dim * m * m * scale));
  return static_cast<float>(std::min(limit * 0.999, 0x1p64));  // 0.999: the float rounding of the cast stays below
}

namespace detail {

/// Whether views a and b share an element. Each is `tokens` rows of heads * head_dim floats,
/// token_stride apart (stride >= row, checked before), so rows are disjoint and ascending in
/// address: a row of a meets b only if the last row of b starting before its end reaches into
/// it. Exact for interleaved buffers ([q|k|v|out] per token), where bounding ranges overlap.
template <class A, class B>
bool views_overlap(const tensor_view<A>& a, const tensor_view<B>& b) noexcept {
  if (a.tokens() == 0 || b.tokens() == 0) return false;
  auto address = [](const float* p) { return reinterpret_cast<std::uintptr_t>(p); };
  const auto a_row = static_cast<std::uintptr_t>(a.heads() * a.head_dim()) * sizeof(float);
  const auto b_row = static_cast<std::uintptr_t>(b.heads() * b.head_dim()) * sizeof(float);
  const auto b_stride = static_cast<std::uintptr_t>(b.token_stride()) * sizeof(float);
  const std::uintptr_t b_first = address(b.data());
  const std::uintptr_t b_last = b_first + static_cast<std::uintptr_t>(b.tokens() - 1) * b_stride;
  for (std::ptrdiff_t t = 0; t < a.tokens(); ++t) {
    const std::uintptr_t begin = address(a.at(t, 0)), end = begin + a_row;
    if (end <= b_first || begin >= b_last + b_row) continue;
    // b's last row starting before `end`
    const std::uintptr_t row = std::min<std::uintptr_t>((end - 1 - b_first) / b_stride, static_cast<std::uintptr_t>(b.tokens() - 1));
    if (b_first + row * b_stride + b_row > begin) return true;
  }
  return false;
}

/// A call's name for its error messages; the string is made only when a message is (a batch's
/// names, "decode: sequence 12", would not fit std::string's small buffer).
struct call_name {
  const char* name;
  friend std::string operator+(call_name c, const char* rest) { return std::string(c.name) + rest; }
};

inline std::string shape_of(std::ptrdiff_t tokens, std::ptrdiff_t heads, std::ptrdiff_t head_dim) {
  // Appended piece by piece: GCC 12 warns -Wrestrict on "[" + std::to_string(...) (bug 105329).
  std::string s(1, '[');
  s += std::to_string(tokens);
  s += ", ";
  s += std::to_string(heads);
  s += ", ";
  s += std::to_string(head_dim);
  s += ']';
  return s;
}

}  // namespace detail

/// The layer's own consistency, checked when an attention is constructed.
/// @throws config_error naming the first impossible setting.
template <class Encoder, class Scorer, class Index = flat_scan>
void validate_layer(const attention_config& config, const rope& rotary, const Encoder& encoder, const Scorer& scorer,
                    const Index& index = {}) {
  config.validate();
  if (rotary.head_dim() != config.head_dim)
    detail::fail<config_error>("attention: rope head_dim " + std::to_string(rotary.head_dim()) + " does not match config head_dim " +
                               std::to_string(config.head_dim));
  encoder.validate(config);
  scorer.validate(config);
  if constexpr (requires { index.validate(); }) index.validate();
  if (scorer.representation_floats(config) != encoder.representation_floats(config))
    detail::fail<config_error>("attention: the scorer reads " + std::to_string(scorer.representation_floats(config)) +
                               " floats per chunk representation but the encoder writes " +
                               std::to_string(encoder.representation_floats(config)) +
                               " (pair key_bounds_encoder with bound_scorer, representative_keys_encoder{n} with max_key_scorer{n})");
}

/// Shapes, strides, the cache's shape and the sequence limit of a call's q, k, v (and out).
/// @throws shape_error, limit_error.
inline void validate_shapes(const char* call, const attention_config& config, const cache_shape& expected, const kv_cache& cache,
                            tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v,
                            const tensor_view<float>* out) {
  const auto where = detail::call_name{call};
  if (cache.shape() != expected)
    detail::fail<shape_error>(where + ": cache has shape " + to_string(cache.shape()) + ", this attention expects " + to_string(expected));
  const std::ptrdiff_t T = q.tokens();
  if (T <= 0) detail::fail<shape_error>(where + ": q has " + std::to_string(T) + " tokens, expected at least 1");
  auto check = [&](const char* name, auto t, std::ptrdiff_t heads) {
    if (t.data() == nullptr) detail::fail<shape_error>(where + ": " + name + " has no data (null pointer)");
    if (t.tokens() != T || t.heads() != heads || t.head_dim() != config.head_dim)
      detail::fail<shape_error>(where + ": " + name + " has shape " + detail::shape_of(t.tokens(), t.heads(), t.head_dim()) +
                                ", expected " + detail::shape_of(T, heads, config.head_dim));
    if (t.token_stride() < heads * config.head_dim)
      detail::fail<shape_error>(where + ": " + name + " token stride " + std::to_string(t.token_stride()) +
                                " is smaller than heads * head_dim = " + std::to_string(heads * config.head_dim));
  };
  check("q", q, config.n_q_heads);
  check("k", k, config.n_kv_heads);
  check("v", v, config.n_kv_heads);
  if (out != nullptr) check("out", *out, config.n_q_heads);
  if (cache.tokens() + T > max_sequence_tokens)
    detail::fail<limit_error>(where + ": " + std::to_string(cache.tokens()) + " cached + " + std::to_string(T) +
                              " new tokens exceed the limit of " + std::to_string(max_sequence_tokens) + " positions");
}

/// With config.reject_nonfinite: every element of q, k, v finite and within `limit`
/// (max_input_magnitude()). @throws value_error naming tensor, token, head and dimension.
inline void validate_values(const char* call, const attention_config& config, float limit, tensor_view<const float> q,
                            tensor_view<const float> k, tensor_view<const float> v) {
  if (!config.reject_nonfinite) return;
  for (auto [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}})
    for (std::ptrdiff_t token = 0; token < t.tokens(); ++token)
      for (std::ptrdiff_t h = 0; h < t.heads(); ++h) {
        const float* x = t.at(token, h);
        for (std::ptrdiff_t i = 0; i < t.head_dim(); ++i) {
          if (std::abs(x[i]) <= limit) continue;  // false for NaN too: one comparison per element
          const std::string what = std::string(call) + ": " + name + "[token " + std::to_string(token) + ", head " + std::to_string(h) +
                                   ", dim " + std::to_string(i) + "] is ";
          if (!std::isfinite(x[i]))
            detail::fail<value_error>(what + std::to_string(x[i]) + " (non-finite input is rejected; see attention_config::reject_nonfinite)");
          char value[32];
          std::snprintf(value, sizeof value, "%g", static_cast<double>(x[i]));
          char bound[32];
          std::snprintf(bound, sizeof bound, "%g", static_cast<double>(limit));
          detail::fail<value_error>(what + value + ", beyond the largest magnitude " + bound +
                                    " this layer takes without overflow (max_input_magnitude(); see attention_config::reject_nonfinite)");
        }
      }
}

/// Everything a computing call (prefill, decode) checks: shapes, `out` sharing no element with
/// q, k or v, the selections buffer, then the values. @throws shape_error, config_error,
/// value_error, limit_error.
inline void validate_call(const char* call, const attention_config& config, const cache_shape& expected, float limit, const kv_cache& cache,
                          tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v, tensor_view<float> out,
                          std::span<std::int32_t> selections) {
  validate_shapes(call, config, expected, cache, q, k, v, &out);
  const auto where = detail::call_name{call};
  for (auto [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}})
    if (detail::views_overlap(out, t)) detail::fail<shape_error>(where + ": out overlaps " + name + "; attention cannot run in place");
  if (!selections.empty()) {
    if (config.method != attention_method::longheads)
      detail::fail<config_error>(where + ": selections are only recorded by the longheads method, not " + to_string(config.method));
    const auto expected_size = static_cast<std::size_t>(q.tokens()) * static_cast<std::size_t>(config.n_q_heads) *
                               static_cast<std::size_t>(config.budget_chunks);
    if (selections.size() != expected_size)
      detail::fail<shape_error>(where + ": selections has " + std::to_string(selections.size()) +
                                " entries, expected T*H_q*budget_chunks = " + std::to_string(expected_size));
  }
  validate_values(call, config, limit, q, k, v);
}

}  // namespace longheads
