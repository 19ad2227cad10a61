#include <doctest/doctest.h>

#include "test_support.hpp"

#include <longheads/reference/rope.hpp>

#include <numbers>

using namespace longheads;

namespace {
std::vector<double> as_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

void check_matches_reference(const rope& r, std::int64_t position, const std::vector<double>& inverse_frequencies,
                             double magnitude) {
  auto x = test::random_floats(static_cast<std::size_t>(r.head_dim()), static_cast<std::uint32_t>(position + 7));
  std::vector<float> y(x.size());
  r.rotate(x.data(), y.data(), position);
  const auto expected = reference::rotate(as_double(x), static_cast<double>(position), inverse_frequencies, r.layout(), magnitude);
  CHECK(test::max_abs_diff(y, expected) <= 2e-5 * magnitude);
}
}  // namespace

TEST_CASE("rope rotates like the naive definition in both pair layouts") {
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved})
    for (int d : {2, 8, 32, 64, 128}) {
      rope r(d, 10000.0, layout);
      const auto f = reference::inverse_frequencies(d, 10000.0);
      for (std::int64_t p : {0, 1, 5, 255, 4096, 131071, -3, -1000}) check_matches_reference(r, p, f, 1.0);
    }
}

TEST_CASE("rope gives identical floats from its table and without it") {
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved}) {
    rope plain(64, 500000.0, layout), tabulated(64, 500000.0, layout);
    tabulated.tabulate(300);
    auto x = test::random_floats(64, 3);
    for (std::int64_t p : {0, 17, 299}) {
      std::vector<float> a(64), b(64);
      plain.rotate(x.data(), a.data(), p);
      tabulated.rotate(x.data(), b.data(), p);
      CHECK(a == b);
    }
  }
}

TEST_CASE("rope's relative property: R(a)q . R(b)k = q . R(b-a)k") {
  for (rope_layout layout : {rope_layout::half, rope_layout::interleaved}) {
    rope r(32, 10000.0, layout);
    auto q = test::random_floats(32, 1), k = test::random_floats(32, 2);
    for (auto [a, b] : {std::pair<std::int64_t, std::int64_t>{100, 37}, {5000, 4999}, {3, 700}}) {
      std::vector<float> qa(32), kb(32), k_rel(32);
      r.rotate(q.data(), qa.data(), a);
      r.rotate(k.data(), kb.data(), b);
      r.rotate(k.data(), k_rel.data(), b - a);
      double lhs = 0, rhs = 0;
      for (int i = 0; i < 32; ++i) {
        lhs += double{qa[i]} * kb[i];
        rhs += double{q[i]} * k_rel[i];
      }
      CHECK(lhs == doctest::Approx(rhs).epsilon(1e-4));
    }
  }
}

TEST_CASE("frequency scaling policies give the published frequencies") {
  const int d = 64;
  const double base = 10000.0;
  const auto f = reference::inverse_frequencies(d, base);

  SUBCASE("linear interpolation divides every frequency") {
    rope r(d, base, rope_layout::half, linear_scaling{4.0});
    for (int i = 0; i < d / 2; ++i) CHECK(r.inverse_frequencies()[i] == doctest::Approx(f[i] / 4.0));
    check_matches_reference(r, 1234, [&] { auto g = f; for (auto& e : g) e /= 4.0; return g; }(), 1.0);
  }
  SUBCASE("NTK-aware raises the base to base * factor^(d/(d-2))") {
    rope r(d, base, rope_layout::interleaved, ntk_scaling{8.0});
    const auto g = reference::inverse_frequencies(d, base * std::pow(8.0, d / (d - 2.0)));
    for (int i = 0; i < d / 2; ++i) CHECK(r.inverse_frequencies()[i] == doctest::Approx(g[i]).epsilon(1e-12));
    CHECK(r.inverse_frequencies()[0] == doctest::Approx(1.0));
    CHECK(r.inverse_frequencies()[d / 2 - 1] == doctest::Approx(f[d / 2 - 1] / 8.0).epsilon(1e-9));
    check_matches_reference(r, 999, g, 1.0);
  }
  SUBCASE("YaRN keeps fast dimensions, interpolates slow ones, and scales the magnitude") {
    const yarn_scaling yarn{.factor = 16.0, .original_context = 4096};
    rope r(d, base, rope_layout::half, yarn);
    // Written from the paper's definition: wavelength lambda_i = 2 pi / theta_i, r = L / lambda_i,
    // ramp over dimensions between the beta_fast and beta_slow rotation counts.
    auto dim_for = [&](double rotations) { return d * std::log(4096 / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base)); };
    const double low = std::max(0.0, std::floor(dim_for(32))), high = std::min(d - 1.0, std::ceil(dim_for(1)));
    std::vector<double> g(f.size());
    for (int i = 0; i < d / 2; ++i) {
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      g[i] = f[i] * (1 - ramp) + f[i] / 16.0 * ramp;
      CHECK(r.inverse_frequencies()[i] == doctest::Approx(g[i]).epsilon(1e-12));
    }
    CHECK(r.inverse_frequencies()[0] == doctest::Approx(f[0]));
    CHECK(r.inverse_frequencies()[d / 2 - 1] == doctest::Approx(f[d / 2 - 1] / 16.0));
    CHECK(r.magnitude() == doctest::Approx(0.1 * std::log(16.0) + 1.0));
    check_matches_reference(r, 20000, g, r.magnitude());
  }
}

TEST_CASE("rope rejects impossible settings with a message naming them") {
  CHECK_THROWS_WITH_AS(rope(7), doctest::Contains("head_dim must be a positive even number, got 7"), config_error);
  CHECK_THROWS_WITH_AS(rope(0), doctest::Contains("head_dim"), config_error);
  CHECK_THROWS_WITH_AS(rope(8, 1.0), doctest::Contains("base"), config_error);
  CHECK_THROWS_AS(rope(8, 10000.0, rope_layout::half, linear_scaling{0.0}), config_error);
  CHECK_THROWS_AS(rope(8, 10000.0, rope_layout::half, yarn_scaling{.factor = 0.5}), config_error);
}
