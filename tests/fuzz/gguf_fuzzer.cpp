// libFuzzer target: the GGUF host's reader (examples/gguf) on arbitrary bytes. Checks: no crash
// or sanitizer report; every refusal is a gguf::format_error; a file that parses has every
// tensor inside the bytes given, and every tensor of a type the host reads dequantises; a file
// that describes a model loads it or refuses it with a format_error.
//
//   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DLONGHEADS_BUILD_FUZZERS=ON
//   cmake --build build-fuzz --target gguf_fuzzer
//   build-fuzz/tests/fuzz/gguf_fuzzer -max_total_time=60 -malloc_limit_mb=256 -max_len=65536 tests/fuzz/gguf_corpus
//
// The seeds (gguf_corpus/) are tiny models written by tools/gguf/llama2c_to_gguf.py
// (make_gguf_corpus.sh). -malloc_limit_mb: a load allocates at most ~8 floats per byte of
// tensor data it was given, so a bigger allocation trusted a size the file claims.
#include "../../examples/gguf/blocks.hpp"
#include "../../examples/gguf/gguf_file.hpp"
#include "../../examples/gguf/gguf_model.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto image = std::as_bytes(std::span(data, size));
  gguf::contents contents;
  try {
    contents = gguf::parse(image);
  } catch (const gguf::format_error&) {
    return 0;
  }
  for (const auto& t : contents.tensors) {
    const auto* begin = reinterpret_cast<const std::uint8_t*>(t.data.data());
    if (t.data.size() != t.bytes || (t.bytes > 0 && (begin < data || begin + t.bytes > data + size))) {
      std::fprintf(stderr, "gguf_fuzzer: tensor %s outside the input\n", t.name.c_str());
      std::abort();
    }
    if (gguf::dequantizable(t.type) && t.elements <= (1u << 22)) {
      std::vector<float> out(t.elements);
      gguf::dequantize(t.type, t.data, out);  // must not throw: the parser checked the sizes
    }
  }
  try {
    const auto description = gguf::describe(contents);
    const auto model = gguf::load_weights(contents, description);
    (void)model;
  } catch (const gguf::format_error&) {
  }
  return 0;
}
