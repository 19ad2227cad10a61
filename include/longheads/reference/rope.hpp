// SPDX-License-Identifier: MIT
// Naive scalar reference of RoPE, in double, written from the definition (not from rope.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../rope.hpp"

namespace longheads::reference {

/// theta_i = base^(-2i/d), unscaled.
inline std::vector<double> inverse_frequencies(int head_dim, double base) {
  std::vector<double> f(static_cast<std::size_t>(head_dim / 2));
  for (int i = 0; i < head_dim / 2; ++i) f[static_cast<std::size_t>(i)] = 1.0 / std::pow(base, 2.0 * i / head_dim);
  return f;
}

/// x rotated by `position` with the given frequencies, pair layout and magnitude.
inline std::vector<double> rotate(const std::vector<double>& x, double position, const std::vector<double>& inverse_frequencies,
                                  rope_layout layout, double magnitude = 1.0) {
  const std::size_t d = x.size(), half = d / 2;
  std::vector<double> y(d);
  for (std::size_t i = 0; i < half; ++i) {
    const std::size_t a = layout == rope_layout::half ? i : 2 * i;
    const std::size_t b = layout == rope_layout::half ? i + half : 2 * i + 1;
    const double angle = position * inverse_frequencies[i];
    y[a] = magnitude * (x[a] * std::cos(angle) - x[b] * std::sin(angle));
    y[b] = magnitude * (x[a] * std::sin(angle) + x[b] * std::cos(angle));
  }
  return y;
}

}  // namespace longheads::reference
