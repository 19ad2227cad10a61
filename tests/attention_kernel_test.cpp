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

namespace {
/// A query quantized as the int8 kernel's contract says, computed from the words of the spec:
/// scale = (largest magnitude) / 127 in fp32, element = round-to-nearest-even(x / scale).
std::pair<std::vector<int>, float> quantized_by_spec(const float* x, int d) {
  float largest = 0.0f;
  for (int i = 0; i < d; ++i) largest = std::max(largest, std::abs(x[i]));
  const float scale = largest / 127.0f;
  std::vector<int> q(static_cast<std::size_t>(d));
  for (int i = 0; i < d; ++i) q[static_cast<std::size_t>(i)] = scale == 0.0f ? 0 : static_cast<int>(std::nearbyint(x[i] / scale));
  return {q, scale};
}
}  // namespace

TEST_CASE("int8 keys meet the query quantized: elements by the spec, logits against a double reference, values read exactly") {
  static_assert(int8_reading_kernel<online_softmax_kernel>);
  std::uint32_t seed = 700;
  // Head dims with blocks of 32 (the VNNI loop where the CPU has it: whole 64s and a last half)
  // and ones with smaller blocks (6, 18, 130: blocks of 2; 16, 48: 16).
  for (int d : {6, 16, 18, 32, 48, 64, 96, 128, 130, 256})
    for (int length : {1, 7, 16, 33})
      for (std::size_t n : {1u, 2u, 3u, 4u, 5u}) {
        CAPTURE(d);
        CAPTURE(length);
        CAPTURE(n);
        const int block = int8_block_elements(d);
        const auto elements = 2 * static_cast<std::size_t>(length) * d;
        auto keys = test::random_floats(elements, seed++, 1.5f);
        const auto values = test::random_floats(elements, seed++);
        keys[3] = 40.0f;  // an outlier: its block's scale is coarse, the other blocks' are not
        std::vector<std::int8_t> keys8(elements), values8(elements);
        std::vector<bf16> key_scales(elements / static_cast<std::size_t>(block)), value_scales(key_scales.size());
        quantize_int8(keys.data(), keys8.data(), key_scales.data(), static_cast<std::ptrdiff_t>(elements), block);
        quantize_int8(values.data(), values8.data(), value_scales.data(), static_cast<std::ptrdiff_t>(elements), block);
        std::vector<float> values_wide(elements);
        dequantize_int8(values8.data(), value_scales.data(), values_wide.data(), static_cast<std::ptrdiff_t>(elements), block);
        auto queries = test::random_floats(n * d, seed++);
        if (n > 1) std::fill(queries.begin() + d, queries.begin() + 2 * d, 0.0f);  // an all-zero query: scale 0
        const int shift = std::countr_zero(static_cast<unsigned>(block));
        const int8_rows k{keys8.data(), key_scales.data(), 0, shift}, v{values8.data(), value_scales.data(), 0, shift};

        // The quantized query: exactly the spec's elements and scale.
        std::vector<float> room(detail::quantized_query_floats(d));
        for (std::size_t r = 0; r < n; ++r) {
          const auto [q, scale] = quantized_by_spec(queries.data() + r * d, d);
          const detail::quantized_query got = detail::quantize_query(queries.data() + r * d, d, block, room.data());
          CHECK(got.scale == scale);
          CHECK(std::equal(q.begin(), q.end(), got.elements, [](int a, std::int8_t b) { return a == int{b}; }));
        }

        // The outputs against double-precision attention over the formula's logits (query scale
        // times the sum over key blocks of key scale times the exact integer dot product) and the
        // values dequantized; the kernel's own rounding is fp32's.
        const auto out = two_segments(queries, n, d, length, k, v);
        for (std::size_t r = 0; r < n; ++r) {
          const auto [q, scale] = quantized_by_spec(queries.data() + r * d, d);
          std::vector<double> logits(2 * static_cast<std::size_t>(length));
          double largest_logit = -1e300;
          for (std::size_t j = 0; j < logits.size(); ++j) {
            double sum = 0;
            for (int b0 = 0; b0 < d; b0 += block) {
              long long dot = 0;
              for (int i = b0; i < b0 + block; ++i) dot += static_cast<long long>(q[static_cast<std::size_t>(i)]) * keys8[j * d + static_cast<std::size_t>(i)];
              sum += static_cast<double>(from_bf16(key_scales[(j * d + static_cast<std::size_t>(b0)) / static_cast<std::size_t>(block)])) * static_cast<double>(dot);
            }
            logits[j] = 0.3 * scale * sum;
            largest_logit = std::max(largest_logit, logits[j]);
          }
          std::vector<double> expected(static_cast<std::size_t>(d));
          double denominator = 0, largest = 0;
          for (std::size_t j = 0; j < logits.size(); ++j) {
            const double p = std::exp(logits[j] - largest_logit);
            denominator += p;
            for (int i = 0; i < d; ++i) expected[static_cast<std::size_t>(i)] += p * values_wide[j * d + static_cast<std::size_t>(i)];
          }
          for (double& e : expected) largest = std::max(largest, std::abs(e /= denominator));
          for (int i = 0; i < d; ++i) CHECK(std::abs(out[r * d + static_cast<std::size_t>(i)] - expected[static_cast<std::size_t>(i)]) <= 1e-5 * largest + 1e-30);  // logits up to ~20: fp32 exp of them
        }

        // A query's bits do not depend on the others it shares the rows with.
        for (std::size_t r = 0; r < n; ++r) {
          const std::vector<float> alone(queries.begin() + static_cast<std::ptrdiff_t>(r * d), queries.begin() + static_cast<std::ptrdiff_t>((r + 1) * d));
          CHECK(two_segments(alone, 1, d, length, k, v) == std::vector<float>(out.begin() + static_cast<std::ptrdiff_t>(r * d), out.begin() + static_cast<std::ptrdiff_t>((r + 1) * d)));
        }
      }
}

TEST_CASE("int8 logits: within the query's and the key's rounding of the fp32 logits") {
  // What quantizing the query costs, per logit: at most the query's half step times the key's
  // magnitudes (|q - q'| <= s / 2 elementwise), beside the key's own rounding, which the
  // dequantized key already carries.
  std::uint32_t seed = 900;
  for (int d : {32, 64, 128}) {
    CAPTURE(d);
    const int rows = 16, block = int8_block_elements(d);
    const auto keys = test::random_floats(static_cast<std::size_t>(rows * d), seed++, 1.5f), query = test::random_floats(static_cast<std::size_t>(d), seed++);
    std::vector<std::int8_t> keys8(keys.size());
    std::vector<bf16> scales(keys.size() / static_cast<std::size_t>(block));
    quantize_int8(keys.data(), keys8.data(), scales.data(), static_cast<std::ptrdiff_t>(keys.size()), block);
    std::vector<float> room(detail::quantized_query_floats(d)), logits(static_cast<std::size_t>(rows));
    const detail::quantized_query quantized[1] = {detail::quantize_query(query.data(), d, block, room.data())};
    for (int j0 = 0; j0 < rows; j0 += static_cast<int>(detail::simd_width)) {  // a vector's worth of rows a call
      float* out[1] = {logits.data() + j0};
      detail::dot_block(quantized, int8_rows{keys8.data(), scales.data(), 0, std::countr_zero(static_cast<unsigned>(block))} + j0 * d,
                        detail::simd_width, d, out);
    }
    for (int j = 0; j < rows; ++j) {
      double exact = 0, key_norm1 = 0;
      for (int i = 0; i < d; ++i) {
        const double key = static_cast<double>(keys8[static_cast<std::size_t>(j * d + i)]) * from_bf16(scales[static_cast<std::size_t>((j * d + i) / block)]);
        exact += double{query[static_cast<std::size_t>(i)]} * key;
        key_norm1 += std::abs(key);
      }
      CHECK(std::abs(logits[static_cast<std::size_t>(j)] - exact) <= quantized[0].scale / 2 * key_norm1 * (1 + 1e-5) + 1e-5 * std::abs(exact));
    }
  }
}

TEST_CASE("int8 value rows widened in registers are exactly dequantize_int8's floats (the value pass's bits)") {
  // The docs' promise (kv_storage.hpp, performance.md): values are read in place with the bits
  // of the dequantized rows. accumulate_rows over int8_rows == over dequantize_int8's floats.
  std::uint32_t seed = 950;
  auto check = [&]<std::size_t R>(int d) {
    CAPTURE(d);
    CAPTURE(R);
    const int rows = 16, block = int8_block_elements(d);
    const auto n = static_cast<std::size_t>(rows * d);
    const auto values = test::random_floats(n, seed++, 2.0f), weights = test::random_floats(R * rows, seed++);
    std::vector<std::int8_t> values8(n);
    std::vector<bf16> scales(n / static_cast<std::size_t>(block));
    quantize_int8(values.data(), values8.data(), scales.data(), static_cast<std::ptrdiff_t>(n), block);
    std::vector<float> wide(n);
    dequantize_int8(values8.data(), scales.data(), wide.data(), static_cast<std::ptrdiff_t>(n), block);
    const int8_rows v{values8.data(), scales.data(), 0, std::countr_zero(static_cast<unsigned>(block))};
    for (std::ptrdiff_t e = 0; e < static_cast<std::ptrdiff_t>(n); e += 7) CHECK(v[e] == wide[static_cast<std::size_t>(e)]);
    std::vector<float> in_place(R * static_cast<std::size_t>(d), 0.5f), widened = in_place;
    const float* alpha[R];
    float* y_in_place[R];
    float* y_widened[R];
    for (std::size_t r = 0; r < R; ++r) {
      alpha[r] = weights.data() + r * rows;
      y_in_place[r] = in_place.data() + r * static_cast<std::size_t>(d);
      y_widened[r] = widened.data() + r * static_cast<std::size_t>(d);
    }
    detail::accumulate_rows(alpha, v, rows, y_in_place, d);
    detail::accumulate_rows(alpha, static_cast<const float*>(wide.data()), rows, y_widened, d);
    CHECK(in_place == widened);
  };
  for (int d : {6, 16, 18, 32, 64, 96, 128, 130}) {
    check.operator()<1>(d);
    check.operator()<2>(d);
    check.operator()<4>(d);
  }
}
