#include <doctest/doctest.h>

#include "test_support.hpp"

#include <longheads/reference/components.hpp>

using namespace longheads;

TEST_CASE_TEMPLATE("attention kernels equal a naive softmax over all segments", Kernel, online_softmax_kernel,
                   scalar_online_softmax_kernel) {
  static_assert(attention_kernel<Kernel>);
  const Kernel kernel{};
  std::uint32_t seed = 1;
  // Head dims and segment lengths around the SIMD width (8 or 16 floats) and beyond.
  for (int d : {2, 6, 8, 14, 16, 18, 32, 64, 130})
    for (const std::vector<int>& lengths : std::vector<std::vector<int>>{{1}, {7}, {1, 1, 1}, {16, 3}, {17, 33, 5}, {64, 64, 1}}) {
      CAPTURE(d);
      int total = 0;
      for (int n : lengths) total += n;
      // Growing scale across segments makes later segments raise the running max.
      auto keys = test::random_floats(static_cast<std::size_t>(total) * d, seed++, 1.5f);
      auto values = test::random_floats(static_cast<std::size_t>(total) * d, seed++);
      auto queries = test::random_floats(lengths.size() * d, seed++);
      std::vector<kv_segment> segments;
      int offset = 0;
      for (std::size_t s = 0; s < lengths.size(); ++s) {
        segments.push_back({queries.data() + s * d, keys.data() + offset * d, values.data() + offset * d, lengths[s]});
        offset += lengths[s];
      }
      const float scale = 0.3f;
      std::vector<float> out(static_cast<std::size_t>(d)), scratch(kernel.scratch_floats(64, d));
      kernel.attend(segments, d, scale, out.data(), scratch);

      std::vector<double> logits;
      offset = 0;
      for (std::size_t s = 0; s < lengths.size(); ++s)
        for (int j = 0; j < lengths[s]; ++j, ++offset) {
          double l = 0;
          for (int i = 0; i < d; ++i) l += double{queries[s * d + i]} * keys[offset * d + i];
          logits.push_back(l * scale);
        }
      const auto p = reference::softmax(logits);
      std::vector<double> expected(static_cast<std::size_t>(d), 0.0);
      for (int j = 0; j < total; ++j)
        for (int i = 0; i < d; ++i) expected[i] += p[j] * values[j * d + i];
      // fp32 logits carry ~1e-7 relative error; with |logit| ~ 5 that moves weights by ~1e-6.
      CHECK(test::max_abs_diff(out, expected) <= 1e-5);
    }
}
