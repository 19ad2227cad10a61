// SPDX-License-Identifier: MIT
// A split-invariant matrix product: c = a x b^T where every element is one fixed-order dot
// product, so a row of c is bit-identical whether it is computed alone (decode) or with any
// other rows (prefill blocks of any size).
//
// Why it matters: LongHeads' chunk selection is a discrete function of scores. A GEMM's
// summation order changes with the number of rows (Eigen takes a GEMV, a coefficient-based or
// a blocked path by size), so the same query scored in a prefill block and in decode can differ
// in the last bit, and a near-tie then flips a selected chunk. The library scores with this
// product; a host that wants prefill == decode end to end computes its q/k/v projections with
// it too (examples/llama2c does; on stories260K Eigen's GEMM flipped selections in 106 of 16k
// tokens of a prefill-vs-decode comparison).
#pragma once

#include <algorithm>
#include <cstddef>

#include "config.hpp"
#include "detail/simd.hpp"
#include "views.hpp"

namespace longheads {

/// c [m, n] = a [m, k] x b [n, k]^T; only columns [col_begin, col_end) of c are written (lets a
/// caller split the columns over threads). a.cols() == b.cols(); c is [a.rows(), b.rows()].
inline void matmul_nt(matrix_view<const float> a, matrix_view<const float> b, matrix_view<float> c, std::ptrdiff_t col_begin,
                      std::ptrdiff_t col_end) noexcept {
  LONGHEADS_ASSERT(a.cols() <= b.cols() && c.rows() == a.rows() && c.cols() >= col_end, "matmul_nt: shapes do not match");
  const std::ptrdiff_t m = a.rows(), k = a.cols();
  // A tile of b's rows stays in L1 (16 KiB) while every row of a reads it; rows of a go four
  // at a time so each load of b feeds four dot products.
  const std::ptrdiff_t tile = std::max<std::ptrdiff_t>(8, static_cast<std::ptrdiff_t>(16 * 1024 / sizeof(float)) / std::max<std::ptrdiff_t>(k, 1));
  for (std::ptrdiff_t j0 = col_begin; j0 < col_end; j0 += tile) {
    const std::ptrdiff_t j1 = std::min(col_end, j0 + tile);
    std::ptrdiff_t r = 0;
    for (; r + 4 <= m; r += 4) {
      const float* rows[4] = {a.row(r), a.row(r + 1), a.row(r + 2), a.row(r + 3)};
      float out[4];
      for (std::ptrdiff_t j = j0; j < j1; ++j) {
        detail::dot_rows<4>(rows, b.row(j), k, out);
        for (std::ptrdiff_t i = 0; i < 4; ++i) c.row(r + i)[j] = out[i];
      }
    }
    for (; r < m; ++r)
      for (std::ptrdiff_t j = j0; j < j1; ++j) c.row(r)[j] = detail::dot(a.row(r), b.row(j), k);
  }
}

/// c [m, n] = a [m, k] x b [n, k]^T, all columns.
inline void matmul_nt(matrix_view<const float> a, matrix_view<const float> b, matrix_view<float> c) noexcept {
  matmul_nt(a, b, c, 0, b.rows());
}

}  // namespace longheads
