// SPDX-License-Identifier: MIT
// What the benchmark's counters count, apart from the timing code so a test can check it
// against the keys the library really reads (tests/review_test.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include <longheads/attention_config.hpp>

namespace bench {

/// Keys (and values) the query at position p reads: every earlier token for dense attention;
/// for LongHeads the whole causal context while it fits the budget, else k - 1 full chunks and
/// its own chunk up to itself, (k - 1) w + p mod w + 1.
inline std::int64_t keys_read(longheads::attention_method method, std::int64_t p, int chunk_size, int budget_chunks) {
  if (method == longheads::attention_method::dense || p / chunk_size + 1 <= budget_chunks) return p + 1;
  return std::int64_t{budget_chunks - 1} * chunk_size + p % chunk_size + 1;
}

}  // namespace bench
