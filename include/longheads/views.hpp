// SPDX-License-Identifier: MIT
// Non-owning views of host buffers: the way q/k/v enter the library without a copy.
//
// tensor_view  [tokens, heads, head_dim], token-major as inference engines lay out projections;
//              head_dim is contiguous and heads follow each other, while the token stride is free
//              so a fused QKV buffer can be viewed in place.
// matrix_view  [rows, cols] row-major with a row stride, for per-head slices of the above.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace longheads {

/// A non-owning [rows, cols] row-major view with a row stride; T is float or const float.
template <class T>
class matrix_view {
 public:
  constexpr matrix_view() = default;
  /// Views `rows` rows of `cols` elements, `row_stride` elements apart.
  constexpr matrix_view(T* data, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t row_stride)
      : data_(data), rows_(rows), cols_(cols), row_stride_(row_stride) {}
  /// Views a dense [rows, cols] block.
  constexpr matrix_view(T* data, std::ptrdiff_t rows, std::ptrdiff_t cols)
      : matrix_view(data, rows, cols, cols) {}
  /// A view of mutable data converts to a view of const data.
  template <class U>
    requires(std::is_same_v<T, const U>)
  constexpr matrix_view(const matrix_view<U>& other)  // NOLINT(google-explicit-constructor)
      : matrix_view(other.data(), other.rows(), other.cols(), other.row_stride()) {}

  ///@{
  /// The pointer, extents and stride given at construction.
  constexpr T* data() const noexcept { return data_; }
  constexpr std::ptrdiff_t rows() const noexcept { return rows_; }
  constexpr std::ptrdiff_t cols() const noexcept { return cols_; }
  constexpr std::ptrdiff_t row_stride() const noexcept { return row_stride_; }
  ///@}
  /// Row r: cols() contiguous elements.
  constexpr T* row(std::ptrdiff_t r) const noexcept { return data_ + r * row_stride_; }
  /// Element (r, c).
  constexpr T& operator()(std::ptrdiff_t r, std::ptrdiff_t c) const noexcept { return data_[r * row_stride_ + c]; }
  /// Rows [first, first + count).
  constexpr matrix_view slice_rows(std::ptrdiff_t first, std::ptrdiff_t count) const noexcept {
    return {data_ + first * row_stride_, count, cols_, row_stride_};
  }
  /// Rows [0, count).
  constexpr matrix_view first_rows(std::ptrdiff_t count) const noexcept { return slice_rows(0, count); }

 private:
  T* data_ = nullptr;
  std::ptrdiff_t rows_ = 0;
  std::ptrdiff_t cols_ = 0;
  std::ptrdiff_t row_stride_ = 0;
};

/// A non-owning [tokens, heads, head_dim] view of a host buffer, token-major: head_dim
/// contiguous, heads one after another, tokens `token_stride` elements apart (so a fused QKV
/// buffer can be viewed in place). T is float or const float.
template <class T>
class tensor_view {
 public:
  constexpr tensor_view() = default;
  /// @param data first element of token 0, head 0
  /// @param tokens T
  /// @param heads heads per token
  /// @param head_dim d
  /// @param token_stride elements between consecutive tokens; 0 means heads * head_dim (dense).
  constexpr tensor_view(T* data, std::ptrdiff_t tokens, std::ptrdiff_t heads, std::ptrdiff_t head_dim,
                        std::ptrdiff_t token_stride = 0)
      : data_(data),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride == 0 ? heads * head_dim : token_stride) {}
  /// A view of mutable data converts to a view of const data.
  template <class U>
    requires(std::is_same_v<T, const U>)
  constexpr tensor_view(const tensor_view<U>& other)  // NOLINT(google-explicit-constructor)
      : tensor_view(other.data(), other.tokens(), other.heads(), other.head_dim(), other.token_stride()) {}

  ///@{
  /// The pointer, extents and token stride given at construction.
  constexpr T* data() const noexcept { return data_; }
  constexpr std::ptrdiff_t tokens() const noexcept { return tokens_; }
  constexpr std::ptrdiff_t heads() const noexcept { return heads_; }
  constexpr std::ptrdiff_t head_dim() const noexcept { return head_dim_; }
  constexpr std::ptrdiff_t token_stride() const noexcept { return token_stride_; }
  ///@}

  /// The head_dim floats of one token of one head.
  constexpr T* at(std::ptrdiff_t token, std::ptrdiff_t head) const noexcept {
    return data_ + token * token_stride_ + head * head_dim_;
  }
  /// [tokens, head_dim] slice of one head.
  constexpr matrix_view<T> head(std::ptrdiff_t h) const noexcept {
    return {data_ + h * head_dim_, tokens_, head_dim_, token_stride_};
  }
  /// Tokens [first, first + count) of this view.
  constexpr tensor_view slice(std::ptrdiff_t first, std::ptrdiff_t count) const noexcept {
    return {data_ + first * token_stride_, count, heads_, head_dim_, token_stride_};
  }

 private:
  T* data_ = nullptr;
  std::ptrdiff_t tokens_ = 0;
  std::ptrdiff_t heads_ = 0;
  std::ptrdiff_t head_dim_ = 0;
  std::ptrdiff_t token_stride_ = 0;
};

}  // namespace longheads
