// SPDX-License-Identifier: MIT
// Minimal .npy reader/writer for C-order little-endian float32 and int32 arrays (format
// versions 1.0-3.0), enough to exchange tensors with NumPy/PyTorch. Errors throw
// std::runtime_error with a one-line message naming the file and the problem.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <numeric>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

template <class T>
struct array {
  std::vector<std::int64_t> shape;
  std::vector<T> data;
};

namespace detail {
template <class T>
constexpr const char* descr() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, std::int32_t>, "npy: float32 or int32 only");
  return std::is_same_v<T, float> ? "<f4" : "<i4";
}
[[noreturn]] inline void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}
}  // namespace detail

template <class T>
array<T> load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail(path, "cannot open file");
  char magic[8] = {};
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) detail::fail(path, "not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(magic[6]);
  std::uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  } else {
    detail::fail(path, "unsupported .npy version " + std::to_string(major));
  }
  if (!in || header_len > (1u << 20)) detail::fail(path, "truncated or corrupt header");
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) detail::fail(path, "truncated header");
  std::smatch m;
  if (!std::regex_search(header, m, std::regex(R"('descr'\s*:\s*'([^']*)')"))) detail::fail(path, "header has no 'descr'");
  if (m[1] != detail::descr<T>())
    detail::fail(path, "dtype " + m[1].str() + ", expected " + detail::descr<T>() + " (" +
                           (std::is_same_v<T, float> ? "float32" : "int32") + ", little-endian)");
  if (std::regex_search(header, std::regex(R"('fortran_order'\s*:\s*True)")))
    detail::fail(path, "Fortran order; save a C-order array (np.ascontiguousarray)");
  if (!std::regex_search(header, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))"))) detail::fail(path, "header has no 'shape'");
  array<T> a;
  const std::string dims = m[1];
  const std::regex number(R"(\d+)");
  for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it)
    a.shape.push_back(std::stoll(it->str()));
  const std::int64_t count = std::accumulate(a.shape.begin(), a.shape.end(), std::int64_t{1}, std::multiplies<>());
  const auto data_start = in.tellg();
  in.seekg(0, std::ios::end);
  const auto bytes = static_cast<std::int64_t>(in.tellg() - data_start);
  if (bytes != count * static_cast<std::int64_t>(sizeof(T)))
    detail::fail(path, "holds " + std::to_string(bytes) + " data bytes, its shape needs " + std::to_string(count * sizeof(T)));
  in.seekg(data_start);
  a.data.resize(static_cast<std::size_t>(count));
  in.read(reinterpret_cast<char*>(a.data.data()), bytes);
  return a;
}

template <class T>
void save(const std::string& path, const std::vector<std::int64_t>& shape, const T* data) {
  std::string dims;  // "(3,)" for 1-D, "(2, 3)" otherwise, as NumPy writes them
  for (std::size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header = std::string("{'descr': '") + detail::descr<T>() + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) detail::fail(path, "cannot create file");
  out.write("\x93NUMPY\x01\x00", 8);
  const auto len = static_cast<std::uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  const std::int64_t count = std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * static_cast<std::int64_t>(sizeof(T))));
  if (!out) detail::fail(path, "write failed");
}

}  // namespace npy
