#include <doctest/doctest.h>

#include "test_support.hpp"

#include <longheads/reference/components.hpp>

using namespace longheads;

TEST_CASE_TEMPLATE("attention kernels equal a naive softmax over all segments", Kernel, online_softmax_kernel,
                   scalar_online_softmax_kernel) {
  static_assert(attention_kernel<Kernel>);
  const Kernel kernel{};
  std::uint32_t seed = 1;
  // Head dims and segment lengths around the SIMD width (8 or 16 floats) and beyond; 64 and 128
  // take dot_block's compile-time-length path.
  for (int d : {2, 6, 8, 14, 16, 18, 32, 64, 128, 130})
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

TEST_CASE("consume_shared streams one segment into several queries with the bits of consume") {
  const online_softmax_kernel kernel{};
  std::uint32_t seed = 100;
  for (int d : {6, 16, 18, 64, 128, 130})
    for (int length : {1, 7, 16, 33})
      for (std::size_t n : {1u, 2u, 3u, 4u, 5u, 7u, 9u}) {
        CAPTURE(d);
        CAPTURE(length);
        CAPTURE(n);
        // Two segments, so the second one rescales states the first one left.
        auto keys = test::random_floats(2 * static_cast<std::size_t>(length) * d, seed++, 1.5f);
        auto values = test::random_floats(2 * static_cast<std::size_t>(length) * d, seed++);
        auto queries = test::random_floats(n * d, seed++);
        std::vector<const float*> rows(n);
        std::vector<float*> shared_out(n), single_out(n);
        std::vector<float> shared_buf(n * d), single_buf(n * d), scratch(kernel.scratch_floats(length, d));
        std::vector<softmax_state> shared_states(n), single_states(n);
        std::vector<softmax_state*> shared_state_ptrs(n);
        for (std::size_t r = 0; r < n; ++r) {
          rows[r] = queries.data() + r * d;
          shared_out[r] = shared_buf.data() + r * d;
          single_out[r] = single_buf.data() + r * d;
          shared_state_ptrs[r] = &shared_states[r];
          kernel.begin(shared_states[r], shared_out[r], d);
          kernel.begin(single_states[r], single_out[r], d);
        }
        for (int segment = 0; segment < 2; ++segment) {
          const float* k = keys.data() + static_cast<std::ptrdiff_t>(segment) * length * d;
          const float* v = values.data() + static_cast<std::ptrdiff_t>(segment) * length * d;
          kernel.consume_shared(k, v, length, rows.data(), n, d, 0.3f, shared_state_ptrs.data(), shared_out.data(), scratch);
          for (std::size_t r = 0; r < n; ++r) kernel.consume({rows[r], k, v, length}, d, 0.3f, single_states[r], single_out[r], scratch);
        }
        for (std::size_t r = 0; r < n; ++r) {
          kernel.finish(shared_states[r], shared_out[r], d);
          kernel.finish(single_states[r], single_out[r], d);
        }
        CHECK(shared_buf == single_buf);
      }
}

TEST_CASE("the kernel reads bf16 rows in place with the bits of reading them converted to fp32") {
  static_assert(bf16_reading_kernel<online_softmax_kernel>);
  const online_softmax_kernel kernel{};
  std::uint32_t seed = 300;
  // Head dims around the vector width exercise the widening load and the scalar tail.
  for (int d : {6, 16, 18, 32, 64, 128, 130})
    for (int length : {1, 7, 16, 33})
      for (std::size_t n : {1u, 2u, 3u, 4u, 5u}) {
        CAPTURE(d);
        CAPTURE(length);
        CAPTURE(n);
        const auto elements = 2 * static_cast<std::size_t>(length) * d;
        const auto keys = test::random_floats(elements, seed++, 1.5f), values = test::random_floats(elements, seed++);
        std::vector<bf16> keys16(elements), values16(elements);
        to_bf16(keys.data(), keys16.data(), static_cast<std::ptrdiff_t>(elements));
        to_bf16(values.data(), values16.data(), static_cast<std::ptrdiff_t>(elements));
        std::vector<float> keys_wide(elements), values_wide(elements);
        from_bf16(keys16.data(), keys_wide.data(), static_cast<std::ptrdiff_t>(elements));
        from_bf16(values16.data(), values_wide.data(), static_cast<std::ptrdiff_t>(elements));
        const auto queries = test::random_floats(n * d, seed++);

        auto run = [&](const auto* k, const auto* v) {
          std::vector<const float*> rows(n);
          std::vector<float> buf(n * d), scratch(kernel.scratch_floats(length, d));
          std::vector<float*> outs(n);
          std::vector<softmax_state> states(n);
          std::vector<softmax_state*> state_ptrs(n);
          for (std::size_t r = 0; r < n; ++r) {
            rows[r] = queries.data() + r * d;
            outs[r] = buf.data() + r * d;
            state_ptrs[r] = &states[r];
            kernel.begin(states[r], outs[r], d);
          }
          for (int segment = 0; segment < 2; ++segment) {
            const std::ptrdiff_t at = static_cast<std::ptrdiff_t>(segment) * length * d;
            kernel.consume_shared(k + at, v + at, length, rows.data(), n, d, 0.3f, state_ptrs.data(), outs.data(), scratch);
          }
          for (std::size_t r = 0; r < n; ++r) kernel.finish(states[r], outs[r], d);
          return buf;
        };
        CHECK(run(keys16.data(), values16.data()) == run(keys_wide.data(), values_wide.data()));
      }
}
