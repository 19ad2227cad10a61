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

namespace {
/// The outputs of n queries (rows of `queries`) after the default kernel's consume_shared over
/// two segments of `length` rows of keys and values (any row type), the second from row length.
template <class Rows>
std::vector<float> two_segments(const std::vector<float>& queries, std::size_t n, int d, int length, Rows keys, Rows values) {
  const online_softmax_kernel kernel{};
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
    kernel.consume_shared(keys + at, values + at, length, rows.data(), n, d, 0.3f, state_ptrs.data(), outs.data(), scratch);
  }
  for (std::size_t r = 0; r < n; ++r) kernel.finish(states[r], outs[r], d);
  return buf;
}
}  // namespace

TEST_CASE("the kernel reads bf16 rows in place with the bits of reading them converted to fp32") {
  static_assert(bf16_reading_kernel<online_softmax_kernel>);
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

        CHECK(two_segments(queries, n, d, length, keys16.data(), values16.data()) ==
              two_segments(queries, n, d, length, keys_wide.data(), values_wide.data()));
      }
}

TEST_CASE("int8 blocks: quantized within half a step of the block's scale, dequantized exactly, against a double reference") {
  std::uint32_t seed = 500;
  for (int d : {2, 6, 16, 18, 32, 96, 128, 130}) {
    CAPTURE(d);
    const int block = int8_block_elements(d);
    CHECK(block == std::min(32, d & -d));
    CHECK(d % block == 0);
    const int rows = 5;
    const auto n = static_cast<std::size_t>(rows * d);
    auto x = test::random_floats(n, seed++, 3.0f);
    x[1] = 1e-39f;  // a subnormal element
    if (block >= 4) x[static_cast<std::size_t>(block) + 2] = 1e30f;  // an outlier costs precision only in its own block
    for (int i = 0; i < block; ++i) x[static_cast<std::size_t>(2 * block + i)] = 0.0f;  // an all-zero block
    std::vector<std::int8_t> q(n);
    std::vector<bf16> scales(n / static_cast<std::size_t>(block));
    quantize_int8(x.data(), q.data(), scales.data(), static_cast<std::ptrdiff_t>(n), block);
    std::vector<float> back(n);
    dequantize_int8(q.data(), scales.data(), back.data(), static_cast<std::ptrdiff_t>(n), block);
    for (std::size_t b = 0; b < scales.size(); ++b) {
      double largest = 0;
      for (int i = 0; i < block; ++i) largest = std::max(largest, std::abs(double{x[b * block + i]}));
      const double s = from_bf16(scales[b]);
      // The scale: largest / 127 rounded up to a bf16 (within one bf16 step, 2^-7 relative).
      CHECK(s >= largest / 127.0);
      CHECK(s <= largest / 127.0 * (1.0 + 0x1p-7) + 1e-45);
      for (int i = 0; i < block; ++i) {
        const std::size_t e = b * static_cast<std::size_t>(block) + static_cast<std::size_t>(i);
        CHECK(std::abs(int{q[e]}) <= 127);
        CHECK(double{back[e]} == static_cast<double>(q[e]) * s);              // exact in fp32
        CHECK(std::abs(double{back[e]} - x[e]) <= s / 2 * (1 + 1e-6));  // round to nearest
      }
    }
    if (block >= 4) CHECK(from_bf16(scales[1]) > 1e27f);
    CHECK(from_bf16(scales[2]) == 0.0f);
    // A non-finite element makes its block NaN, and only its block.
    x[0] = std::numeric_limits<float>::infinity();
    quantize_int8(x.data(), q.data(), scales.data(), static_cast<std::ptrdiff_t>(n), block);
    dequantize_int8(q.data(), scales.data(), back.data(), static_cast<std::ptrdiff_t>(n), block);
    for (int i = 0; i < block; ++i) CHECK(std::isnan(back[static_cast<std::size_t>(i)]));
    CHECK(std::isfinite(back[static_cast<std::size_t>(block)]));
  }
}

TEST_CASE("the kernel reads int8 rows in place with the bits of reading them dequantized to fp32") {
  static_assert(int8_reading_kernel<online_softmax_kernel>);
  std::uint32_t seed = 700;
  // Head dims whose blocks hold a whole vector (16, 32, 64, 96, 128: one scale per load) and
  // ones whose blocks are smaller than a vector (6, 18, 130: blocks of 2, read lane by lane).
  for (int d : {6, 16, 18, 32, 64, 96, 128, 130})
    for (int length : {1, 7, 16, 33})
      for (std::size_t n : {1u, 2u, 3u, 4u, 5u}) {
        CAPTURE(d);
        CAPTURE(length);
        CAPTURE(n);
        const int block = int8_block_elements(d);
        const auto elements = 2 * static_cast<std::size_t>(length) * d;
        const auto keys = test::random_floats(elements, seed++, 1.5f), values = test::random_floats(elements, seed++);
        std::vector<std::int8_t> keys8(elements), values8(elements);
        std::vector<bf16> key_scales(elements / static_cast<std::size_t>(block)), value_scales(key_scales.size());
        quantize_int8(keys.data(), keys8.data(), key_scales.data(), static_cast<std::ptrdiff_t>(elements), block);
        quantize_int8(values.data(), values8.data(), value_scales.data(), static_cast<std::ptrdiff_t>(elements), block);
        std::vector<float> keys_wide(elements), values_wide(elements);
        dequantize_int8(keys8.data(), key_scales.data(), keys_wide.data(), static_cast<std::ptrdiff_t>(elements), block);
        dequantize_int8(values8.data(), value_scales.data(), values_wide.data(), static_cast<std::ptrdiff_t>(elements), block);
        const auto queries = test::random_floats(n * d, seed++);
        const int shift = std::countr_zero(static_cast<unsigned>(block));
        const int8_rows k{keys8.data(), key_scales.data(), 0, shift}, v{values8.data(), value_scales.data(), 0, shift};
        for (std::size_t e = 0; e < elements; e += 7) CHECK(k[static_cast<std::ptrdiff_t>(e)] == keys_wide[e]);

        CHECK(two_segments(queries, n, d, length, k, v) == two_segments(queries, n, d, length, keys_wide.data(), values_wide.data()));
      }
}
