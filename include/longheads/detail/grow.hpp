// SPDX-License-Identifier: MIT
// Scratch storage shared by the stages' scratch parts: cache-line-aligned vectors that grow.
#pragma once

#include <algorithm>
#include <cstddef>
#include <new>
#include <vector>

namespace longheads::detail {

/// Allocates on 64-byte boundaries: a kernel's full-width loads from scratch (logits, rotated
/// queries, converted rows) then never straddle two cache lines, whatever malloc returns.
template <class T>
struct cache_line_allocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  cache_line_allocator() = default;
  template <class U>
  cache_line_allocator(const cache_line_allocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  // The unsized form: clang declares the sized one only with -fsized-deallocation.
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
  template <class U>
  bool operator==(const cache_line_allocator<U>&) const noexcept { return true; }
};

/// A vector of scratch on cache-line boundaries.
template <class T>
using scratch_vector = std::vector<T, cache_line_allocator<T>>;

/// Grows v to at least n elements, geometrically, so a context that grows a token at a time
/// reallocates rarely; never shrinks.
template <class Vector>
void grow(Vector& v, std::size_t n) {
  if (v.size() < n) v.resize(std::max(n, v.size() + v.size() / 2));
}

}  // namespace longheads::detail
