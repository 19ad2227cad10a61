// SPDX-License-Identifier: MIT
// Rotary position embedding: rotation of each pair of dimensions by angle pos * theta_i.
//
//   theta_i = base^(-2i/d), i in [0, d/2), optionally rescaled by a frequency_scaling policy.
//   pair layout "half":        (x_i, x_{i+d/2})   Hugging Face / GPT-NeoX
//   pair layout "interleaved": (x_{2i}, x_{2i+1}) Meta / llama2.c / GPT-J
//
// Rotations compose and are orthogonal (up to the scaling's magnitude m, applied on every
// rotation), so R(a)q . R(b)k = m^2 q . R(b-a)k: LongHeads relies on this to store every key
// once at its local position and rotate the query per slot instead.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <vector>

#include "errors.hpp"

namespace longheads {

enum class rope_layout { half, interleaved };

/// A frequency-scaling policy rewrites the inverse frequencies theta_i in place and may scale
/// the magnitude of rotated vectors (YaRN's attention factor). Every such policy is still a
/// rotation per pair, so the relative property and LongHeads' remapping hold unchanged.
template <class S>
concept frequency_scaling = requires(const S& s, std::span<double> inverse_frequencies, int head_dim,
                                     double base) {
  { s.rescale(inverse_frequencies, head_dim, base) } -> std::same_as<void>;
  { s.magnitude() } -> std::convertible_to<double>;
};

/// Plain RoPE.
struct no_scaling {
  /// Rewrites the inverse frequencies in place.
  void rescale(std::span<double>, int, double) const noexcept {}
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude() const noexcept { return 1.0; }
};

/// Position interpolation (Chen et al. 2023): every frequency divided by `factor`.
struct linear_scaling {
  /// Scaling factor.
  double factor = 1.0;
  /// Rewrites the inverse frequencies in place.
  void rescale(std::span<double> inverse_frequencies, int, double) const {
    if (!(factor > 0)) detail::fail<config_error>("linear_scaling: factor must be > 0, got " + std::to_string(factor));
    for (double& f : inverse_frequencies) f /= factor;
  }
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude() const noexcept { return 1.0; }
};

/// NTK-aware scaling: base raised to base * factor^(d/(d-2)), so the lowest frequency is
/// interpolated by `factor` while the highest is kept.
struct ntk_scaling {
  /// Scaling factor.
  double factor = 1.0;
  /// Rewrites the inverse frequencies in place.
  void rescale(std::span<double> inverse_frequencies, int head_dim, double) const {
    if (!(factor > 0)) detail::fail<config_error>("ntk_scaling: factor must be > 0, got " + std::to_string(factor));
    if (head_dim <= 2) return;
    for (std::size_t i = 0; i < inverse_frequencies.size(); ++i)
      inverse_frequencies[i] *= std::pow(factor, -2.0 * static_cast<double>(i) / (head_dim - 2));
  }
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude() const noexcept { return 1.0; }
};

/// YaRN (Peng et al. 2023), as Hugging Face computes it: frequencies whose wavelength fits
/// the original context many times are kept, long wavelengths are interpolated by `factor`,
/// with a linear ramp between beta_fast and beta_slow rotations; rotated vectors are scaled by
/// the attention factor 0.1 ln(factor) + 1 (so q.k gains its square).
struct yarn_scaling {
  /// Scaling factor.
  double factor = 1.0;
  double original_context = 4096;  ///< the context the model was trained at
  double beta_fast = 32;           ///< rotations above which a frequency is kept
  double beta_slow = 1;            ///< rotations below which a frequency is interpolated
  double attention_factor = 0;  ///< 0: the default 0.1 ln(factor) + 1

  /// Rewrites the inverse frequencies in place.
  void rescale(std::span<double> inverse_frequencies, int head_dim, double base) const {
    if (!(factor >= 1)) detail::fail<config_error>("yarn_scaling: factor must be >= 1, got " + std::to_string(factor));
    if (!(original_context > 0) || !(beta_fast > beta_slow) || !(beta_slow > 0))
      detail::fail<config_error>("yarn_scaling: need original_context > 0 and beta_fast > beta_slow > 0");
    const double d = head_dim;
    auto correction_dim = [&](double rotations) {
      return d * std::log(original_context / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
    };
    const double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(beta_slow)), d - 1);
    if (high == low) high += 0.001;
    for (std::size_t i = 0; i < inverse_frequencies.size(); ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation_weight = 1.0 - ramp;
      const double f = inverse_frequencies[i];
      inverse_frequencies[i] = (f / factor) * (1 - extrapolation_weight) + f * extrapolation_weight;
    }
  }
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude() const noexcept {
    if (attention_factor > 0) return attention_factor;
    return factor <= 1 ? 1.0 : 0.1 * std::log(factor) + 1.0;
  }
};

static_assert(frequency_scaling<no_scaling> && frequency_scaling<linear_scaling> &&
              frequency_scaling<ntk_scaling> && frequency_scaling<yarn_scaling>);

/// RoPE for one head dimension: frequencies, layout, and a cos/sin table for the positions
/// LongHeads uses every token (0 .. budget*chunk_size), so rotating a query per slot costs d
/// multiplies, not d/2 sin/cos evaluations.
class rope {
 public:
  /// @throws config_error if head_dim is not a positive even number or base <= 1.
  template <frequency_scaling Scaling = no_scaling>
  explicit rope(int head_dim, double base = 10000.0, rope_layout layout = rope_layout::half,
                const Scaling& scaling = {})
      : head_dim_(head_dim), base_(base), layout_(layout) {
    if (head_dim <= 0 || head_dim % 2 != 0)
      detail::fail<config_error>("rope: head_dim must be a positive even number, got " + std::to_string(head_dim));
    if (!(base > 1.0) || !std::isfinite(base))
      detail::fail<config_error>("rope: base (theta) must be a finite number > 1, got " + std::to_string(base));
    inverse_frequencies_.resize(static_cast<std::size_t>(head_dim / 2));
    for (int i = 0; i < head_dim / 2; ++i)
      inverse_frequencies_[static_cast<std::size_t>(i)] = std::pow(base, -2.0 * i / head_dim);
    scaling.rescale(inverse_frequencies_, head_dim, base);
    magnitude_ = scaling.magnitude();
  }

  ///@{
  /// As given at construction.
  int head_dim() const noexcept { return head_dim_; }
  double base() const noexcept { return base_; }
  rope_layout layout() const noexcept { return layout_; }
  ///@}
  /// Factor applied to the length of rotated vectors (1 except YaRN).
  double magnitude() const noexcept { return magnitude_; }
  /// theta_i for the d/2 pairs, after scaling.
  std::span<const double> inverse_frequencies() const noexcept { return inverse_frequencies_; }

  /// Tabulates cos/sin for positions [0, positions), unless the table already covers them.
  /// Rotations inside the table read it; others compute the same float values directly, so
  /// results do not depend on the table. The table is never changed in place: copies of a rope
  /// share it, so the layers of a model built from one tabulated rope hold one table.
  void tabulate(std::int64_t positions) {
    if (positions <= table_positions_) return;
    const auto half = static_cast<std::size_t>(head_dim_ / 2);
    auto table = std::make_shared<std::vector<float>>(static_cast<std::size_t>(positions) * half * 2);
    for (std::int64_t p = 0; p < positions; ++p)
      fill_cos_sin(p, table->data() + static_cast<std::size_t>(p) * half * 2);
    table_ = std::move(table);
    table_positions_ = positions;
  }
  /// Positions [0, n) the table covers.
  std::int64_t tabulated_positions() const noexcept { return table_positions_; }
  /// Floats the attention lets a table hold (64 MiB): past it, rotations are computed.
  static constexpr std::int64_t max_table_floats = std::int64_t{1} << 24;
  /// Positions a table of max_table_floats holds at this head_dim.
  std::int64_t max_table_positions() const noexcept { return max_table_floats / head_dim_; }
  /// Whether this rope and `other` read the same table (a copy, or built from one).
  bool shares_table_with(const rope& other) const noexcept { return table_ != nullptr && table_ == other.table_; }

  /// out = R(position) in (position may be negative: a rotation by a difference). in == out is fine.
  void rotate(const float* in, float* out, std::int64_t position) const noexcept {
    const int half = head_dim_ / 2;
    if (position >= 0 && position < table_positions_) {
      apply_pairs(table_->data() + static_cast<std::size_t>(position) * static_cast<std::size_t>(half) * 2, 0, half, in, out);
      return;
    }
    // Same arithmetic as the table path, on cos/sin computed block by block on the stack.
    constexpr int block = 32;
    float cs[2 * block];
    for (int first = 0; first < half; first += block) {
      const int count = std::min(block, half - first);
      for (int i = 0; i < count; ++i) cos_sin(position, first + i, cs + 2 * i);
      apply_pairs(cs, first, count, in, out);
    }
  }
  /// x = R(position) x, in place.
  void rotate(std::span<float> x, std::int64_t position) const noexcept { rotate(x.data(), x.data(), position); }

 private:
  void cos_sin(std::int64_t position, int i, float* cs) const noexcept {
    // Angles in double: at 1M positions a float angle would already be off by ~0.06 rad.
    const double angle = static_cast<double>(position) * inverse_frequencies_[static_cast<std::size_t>(i)];
    cs[0] = static_cast<float>(std::cos(angle) * magnitude_);
    cs[1] = static_cast<float>(std::sin(angle) * magnitude_);
  }
  void fill_cos_sin(std::int64_t position, float* cs) const noexcept {
    for (int i = 0; i < head_dim_ / 2; ++i) cos_sin(position, i, cs + 2 * i);
  }
  /// Rotates pairs [first, first + count); cs holds their (cos, sin), starting at pair `first`.
  void apply_pairs(const float* cs, int first, int count, const float* in, float* out) const noexcept {
    const int half = head_dim_ / 2;
    const int a_step = layout_ == rope_layout::half ? 1 : 2;
    const int b_offset = layout_ == rope_layout::half ? half : 1;
    for (int j = 0; j < count; ++j) {
      const int a = (first + j) * a_step, b = a + b_offset;
      const float xa = in[a], xb = in[b];
      out[a] = xa * cs[2 * j] - xb * cs[2 * j + 1];
      out[b] = xa * cs[2 * j + 1] + xb * cs[2 * j];
    }
  }

  int head_dim_;
  double base_;
  rope_layout layout_;
  double magnitude_ = 1.0;
  std::vector<double> inverse_frequencies_;
  std::shared_ptr<const std::vector<float>> table_;  // [positions][d/2][cos, sin], shared by copies
  std::int64_t table_positions_ = 0;
};

}  // namespace longheads
