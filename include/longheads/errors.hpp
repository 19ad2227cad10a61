// SPDX-License-Identifier: MIT
// The exceptions the library throws at its API boundary.
//
// Every public call validates all of its arguments before it touches a cache, so a call that
// throws one of these leaves the cache exactly as it was (strong guarantee). Messages are one
// line and name the argument, the expected and the actual value.
#pragma once

#include <stdexcept>
#include <string>

namespace longheads {

/// Base of every error the library reports about its inputs.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A tensor or buffer has the wrong shape, or a cache belongs to another configuration.
class shape_error : public error {
 public:
  using error::error;
};

/// An impossible configuration (odd head_dim, budget below sinks + locals, zero sizes, ...).
class config_error : public error {
 public:
  using error::error;
};

/// A non-finite value (NaN or Inf) in q, k or v, when the configuration rejects them.
class value_error : public error {
 public:
  using error::error;
};

/// A request beyond the library's stated limits (positions past int32, cache size overflow).
class limit_error : public error {
 public:
  using error::error;
};

/// A cache file that cannot be used: unreadable or unwritable, truncated, corrupted (a checksum
/// or a field out of range), not a longheads cache, of another format version or byte order, or
/// saved by a layer of another configuration, RoPE or policies (cache_file.hpp).
class file_error : public error {
 public:
  using error::error;
};

namespace detail {
template <class E>
[[noreturn]] inline void fail(const std::string& message) {
  throw E("longheads: " + message);
}
}  // namespace detail

}  // namespace longheads
