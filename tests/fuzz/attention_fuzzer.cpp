// libFuzzer target: arbitrary bytes -> an attention configuration and a sequence of prefill,
// decode and ingest calls with random sizes and values (NaN, Inf, huge included). Checks:
// no crash or sanitizer report; every rejected call throws a longheads::error and leaves the
// cache exactly as it was; with reject_nonfinite, every accepted call's outputs and the cache's
// chunk representations are finite (inputs beyond max_input_magnitude() are rejected, so none
// overflows); accepted calls whose context fits the budget give exactly (bitwise) the outputs
// of dense attention run side by side.
//
//   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DLONGHEADS_BUILD_FUZZERS=ON
//   cmake --build build-fuzz --target attention_fuzzer
//   build-fuzz/tests/fuzz/attention_fuzzer -max_total_time=60 tests/fuzz/corpus
#include <longheads/longheads.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using namespace longheads;

class byte_reader {
 public:
  byte_reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  int in(int lo, int hi) { return lo + byte() % (hi - lo + 1); }
  bool empty() const { return pos_ >= size_; }
  float value() {
    switch (byte() % 16) {
      case 0: return std::numeric_limits<float>::quiet_NaN();
      case 1: return std::numeric_limits<float>::infinity();
      case 2: return -std::numeric_limits<float>::infinity();
      case 3: return 3.0e38f;
      case 4: return -1.0e30f;
      case 5: return 1.0e-40f;  // subnormal
      default: return static_cast<float>(static_cast<std::int8_t>(byte())) / 32.0f;
    }
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_, pos_ = 0;
};

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "attention_fuzzer: %s\n", what);
  std::abort();
}

std::optional<rope> make_rope(byte_reader& in, int d) {
  const rope_layout layout = in.byte() % 2 ? rope_layout::half : rope_layout::interleaved;
  const double base = in.byte() % 4 == 0 ? 1.0 + in.byte() : 10000.0;
  const double factor = 0.5 + in.byte() / 16.0;
  try {
    switch (in.byte() % 4) {
      case 0: return rope(d, base, layout);
      case 1: return rope(d, base, layout, linear_scaling{factor});
      case 2: return rope(d, base, layout, ntk_scaling{factor});
      default: return rope(d, base, layout, yarn_scaling{.factor = factor, .original_context = 16.0 + in.byte()});
    }
  } catch (const error&) {
    return std::nullopt;  // documented rejection of the RoPE settings
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  attention_config cfg;
  cfg.n_kv_heads = in.in(0, 4);
  cfg.n_q_heads = cfg.n_kv_heads * in.in(0, 3) + (in.byte() % 8 == 0 ? 1 : 0);
  cfg.head_dim = in.in(0, 20);
  cfg.chunk_size = in.in(0, 12);
  cfg.budget_chunks = in.in(0, 8);
  cfg.sink_chunks = in.in(0, 3);
  cfg.local_chunks = in.in(0, 3);
  cfg.sink_tokens = in.in(0, 6);
  cfg.method = static_cast<attention_method>(in.in(0, 2));
  cfg.reject_nonfinite = in.byte() % 4 != 0;
  cfg.kv_storage = std::array{kv_precision::fp32, kv_precision::fp32, kv_precision::bf16, kv_precision::int8}[in.byte() % 4];
  const int rope_dim = in.byte() % 8 == 0 ? cfg.head_dim + 2 : cfg.head_dim;
  if (rope_dim <= 0 || rope_dim % 2 != 0) return 0;
  const auto rotary = make_rope(in, rope_dim);
  if (!rotary) return 0;

  std::optional<attention<>> a;
  try {
    a.emplace(cfg, *rotary);
    if (std::getenv("LONGHEADS_FUZZ_VERBOSE"))
      std::fprintf(stderr, "config: %s H_q %d H_kv %d d %d w %d k %d sinks %d locals %d reject_nonfinite %d kv %s\n", to_string(cfg.method),
                   cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim, cfg.chunk_size, cfg.budget_chunks, cfg.sink_chunks, cfg.local_chunks,
                   cfg.reject_nonfinite, to_string(cfg.kv_storage));
  } catch (const error&) {
    return 0;  // an impossible configuration, rejected as documented
  }
  attention_config dense_cfg = cfg;
  dense_cfg.method = attention_method::dense;
  attention<> dense(dense_cfg, *rotary);
  kv_cache cache = a->make_cache(in.in(0, 64));
  kv_cache dense_cache = dense.make_cache();
  const int hq = cfg.n_q_heads, hkv = cfg.n_kv_heads, d = cfg.head_dim;
  bool comparable = cfg.method == attention_method::longheads;  // dense twin fed the same accepted calls

  for (int call = 0; call < 12 && !in.empty(); ++call) {
    const int kind = in.in(0, 2);  // prefill, decode, ingest
    const int T = kind == 1 ? 1 : in.in(0, 40);
    const int bad_heads = in.byte() % 16 == 0 ? 1 : 0;  // sometimes a wrong shape
    const std::size_t n_q = static_cast<std::size_t>(std::max(T, 1)) * hq * d, n_kv = static_cast<std::size_t>(std::max(T, 1)) * (hkv + bad_heads) * d;
    std::vector<float> q(n_q), k(n_kv), v(n_kv), out(n_q), dense_out(n_q);
    for (auto* buf : {&q, &k, &v})
      for (float& x : *buf) x = in.value();
    const kv_cache before = cache;
    try {
      const tensor_view<const float> qv{q.data(), T, hq, d}, kvv{k.data(), T, hkv + bad_heads, d}, vv{v.data(), T, hkv + bad_heads, d};
      if (kind == 2)
        a->ingest(cache, qv, kvv, vv);
      else if (kind == 1)
        a->decode(cache, qv, kvv, vv, {out.data(), T, hq, d});
      else
        a->prefill(cache, qv, kvv, vv, {out.data(), T, hq, d});
    } catch (const error& e) {
      if (std::getenv("LONGHEADS_FUZZ_VERBOSE"))
        std::fprintf(stderr, "call %d kind %d T %d (cache %lld tokens): %s\n", call, kind, T, static_cast<long long>(before.tokens()), e.what());
      if (!(cache == before)) finding("a rejected call changed the cache");
      continue;
    } catch (...) {
      finding("a call threw something other than longheads::error");
    }
    if (bad_heads) finding("a call with wrong kv heads was accepted");
    if (cfg.reject_nonfinite) {
      if (kind != 2)
        for (std::size_t i = 0; i < n_q; ++i)
          if (!std::isfinite(out[i])) finding("an accepted call of a layer rejecting non-finite input gave a non-finite output");
      for (int h = 0; h < hq; ++h) {
        const auto reps = cache.representations(h);
        for (std::ptrdiff_t row = 0; row < reps.rows(); ++row)
          for (std::ptrdiff_t i = 0; i < reps.cols(); ++i)
            if (!std::isfinite(reps(row, i))) finding("a layer rejecting non-finite input cached a non-finite representation");
      }
    }
    if (!comparable) continue;
    if (!cfg.reject_nonfinite) {
      comparable = false;  // the twin would diverge on non-finite values; stop comparing
      continue;
    }
    dense.prefill(dense_cache, {q.data(), T, hq, d}, {k.data(), T, hkv, d}, {v.data(), T, hkv, d}, {dense_out.data(), T, hq, d});
    if (kind == 2) continue;  // ingest has no outputs
    if (cache.tokens() > cfg.budget_tokens()) {
      comparable = false;  // past the budget LongHeads is not dense attention
      continue;
    }
    if (std::memcmp(out.data(), dense_out.data(), n_q * sizeof(float)) != 0) finding("within the budget, LongHeads differs from dense attention");
  }
  return 0;
}
