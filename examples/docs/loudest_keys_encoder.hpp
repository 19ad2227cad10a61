// A chunk encoder written outside the library: the program docs/custom-policy.md walks through.
#pragma once
// [snippet:encoder]
#include <longheads/longheads.hpp>

#include <algorithm>
#include <span>
#include <string>

/// A chunk is represented by the mean of its `count` loudest keys (largest L2 norm): one key
/// that stands out is not averaged away by the chunk's quiet ones. d floats per chunk, in the
/// key frame, so it pairs with rotated_query_scorer.
struct loudest_keys_encoder {
  int count = 1;

  std::size_t representation_floats(const longheads::attention_config& cfg) const noexcept { return cfg.head_dim; }
  std::size_t scratch_floats(const longheads::attention_config& cfg) const noexcept { return cfg.chunk_size; }

  void validate(const longheads::attention_config& cfg) const {
    if (count < 1 || count > cfg.chunk_size)
      throw longheads::config_error("loudest_keys_encoder: count must be in [1, chunk_size = " +
                                    std::to_string(cfg.chunk_size) + "], got " + std::to_string(count));
  }

  // Called once per full chunk and query head; must not allocate (scratch is the caller's).
  void encode(const longheads::chunk_inputs& in, std::span<float> representation, std::span<float> scratch) const noexcept {
    const std::ptrdiff_t w = in.keys.rows(), d = in.keys.cols();
    float* norms = scratch.data();
    for (std::ptrdiff_t j = 0; j < w; ++j) {
      float sum = 0.0f;  // a plain loop in a fixed order: the result must not depend on alignment
      for (std::ptrdiff_t i = 0; i < d; ++i) sum += in.keys(j, i) * in.keys(j, i);
      norms[j] = sum;
    }
    std::fill_n(representation.data(), d, 0.0f);
    for (int picked = 0; picked < count; ++picked) {
      const std::ptrdiff_t loudest = std::max_element(norms, norms + w) - norms;  // ties: the earliest
      for (std::ptrdiff_t i = 0; i < d; ++i) representation[static_cast<std::size_t>(i)] += in.keys(loudest, i) / static_cast<float>(count);
      norms[loudest] = -1.0f;
    }
  }
};
static_assert(longheads::chunk_encoder<loudest_keys_encoder>);

// Plugged in: every other policy keeps the paper's behaviour.
struct loudest_keys_policies : longheads::paper_policies {
  using encoder = loudest_keys_encoder;
  using scorer = longheads::rotated_query_scorer;
};
// [/snippet:encoder]
