// SPDX-License-Identifier: MIT
// GGUF, the file format of llama.cpp's models (versions 2 and 3): a header, metadata key/values,
// tensor infos, then tensor data at aligned offsets. Layout as ggml's gguf.cpp reads it:
//
//   "GGUF" u32 version  u64 n_tensors  u64 n_kv
//   n_kv x  { string key, u32 value_type, value }          string = u64 length + bytes
//   n_tensors x { string name, u32 n_dims (<= 4), u64 ne[n_dims], u32 ggml_type, u64 offset }
//   padding to general.alignment (u32, a power of two, default 32), then the data section;
//   each tensor at data + offset, offset a multiple of the alignment.
//
// Every count, length and offset comes from the file, so each is checked against the bytes
// that are left before anything is allocated or read: a malformed or hostile file is a
// gguf::format_error naming what is wrong (its kind() for tests), never a crash or a huge
// allocation. Tensor data is not copied: `file` memory-maps the file and tensors are views.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace gguf {

/// What is wrong with a file, for callers (and tests) that branch on it.
enum class error_kind {
  cannot_open,           // missing, unreadable, or not a regular file
  bad_magic,             // does not start with "GGUF"
  unsupported_version,   // not 2 or 3
  truncated,             // a count, string, value or tensor runs past the end of the file
  bad_value_type,        // a metadata value type outside 0..12
  too_deep,              // arrays nested more than max_array_depth
  duplicate_key,         // a metadata key twice
  bad_alignment,         // general.alignment not a u32 power of two
  bad_dimensions,        // more than 4 dimensions, a dimension < 1, or an element count that overflows
  unknown_tensor_type,   // a ggml type id this reader has no size for
  bad_row_size,          // a row (ne[0]) not a whole number of the type's blocks
  duplicate_tensor,      // a tensor name twice
  misaligned_offset,     // a tensor offset not a multiple of the alignment
  offset_out_of_file,    // a tensor's bytes not inside the data section
  missing_key,           // a metadata key the caller needs is absent
  wrong_value_type,      // a metadata value of another type than the caller needs
  missing_tensor,        // a tensor the caller needs is absent
  wrong_tensor_shape,    // a tensor of another shape than the model needs
  unsupported,           // well formed, but something this host does not run (architecture, type)
};

class format_error : public std::runtime_error {
 public:
  format_error(error_kind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  error_kind kind() const noexcept { return kind_; }

 private:
  error_kind kind_;
};

enum class value_type : std::uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12,
};

inline const char* name_of(value_type t) {
  static constexpr const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < std::size(names) ? names[i] : "?";
}

struct value;
/// A metadata array: its element type (one for all elements) and the elements.
struct array {
  value_type element = value_type::uint8;
  std::vector<value> items;
};

/// One metadata value: integers kept as read (signed or unsigned 64-bit), floats widened.
struct value {
  value_type type = value_type::uint8;
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string, array> data;

  bool is_integer() const noexcept { return std::holds_alternative<std::uint64_t>(data) || std::holds_alternative<std::int64_t>(data); }
  bool is_number() const noexcept { return is_integer() || std::holds_alternative<double>(data); }
};

/// ggml's tensor types (ggml.h). Only some are dequantised (blocks.hpp); the rest are known by
/// size so a file holding them still parses and its other tensors can be read.
enum class tensor_type : std::uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9, q2_k = 10, q3_k = 11, q4_k = 12,
  q5_k = 13, q6_k = 14, q8_k = 15, iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21,
  iq2_s = 22, iq4_xs = 23, i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30, tq1_0 = 34, tq2_0 = 35,
};

/// Elements per block and bytes per block of a type (ggml.c's type_traits).
struct type_layout {
  const char* name = nullptr;  // nullptr: not a type this reader knows
  std::uint64_t block_elements = 0;
  std::uint64_t block_bytes = 0;
};

inline type_layout layout_of(tensor_type type) {
  switch (type) {
    case tensor_type::f32: return {"F32", 1, 4};
    case tensor_type::f16: return {"F16", 1, 2};
    case tensor_type::q4_0: return {"Q4_0", 32, 18};
    case tensor_type::q4_1: return {"Q4_1", 32, 20};
    case tensor_type::q5_0: return {"Q5_0", 32, 22};
    case tensor_type::q5_1: return {"Q5_1", 32, 24};
    case tensor_type::q8_0: return {"Q8_0", 32, 34};
    case tensor_type::q8_1: return {"Q8_1", 32, 36};
    case tensor_type::q2_k: return {"Q2_K", 256, 84};
    case tensor_type::q3_k: return {"Q3_K", 256, 110};
    case tensor_type::q4_k: return {"Q4_K", 256, 144};
    case tensor_type::q5_k: return {"Q5_K", 256, 176};
    case tensor_type::q6_k: return {"Q6_K", 256, 210};
    case tensor_type::q8_k: return {"Q8_K", 256, 292};
    case tensor_type::iq2_xxs: return {"IQ2_XXS", 256, 66};
    case tensor_type::iq2_xs: return {"IQ2_XS", 256, 74};
    case tensor_type::iq3_xxs: return {"IQ3_XXS", 256, 98};
    case tensor_type::iq1_s: return {"IQ1_S", 256, 50};
    case tensor_type::iq4_nl: return {"IQ4_NL", 32, 18};
    case tensor_type::iq3_s: return {"IQ3_S", 256, 110};
    case tensor_type::iq2_s: return {"IQ2_S", 256, 82};
    case tensor_type::iq4_xs: return {"IQ4_XS", 256, 136};
    case tensor_type::i8: return {"I8", 1, 1};
    case tensor_type::i16: return {"I16", 1, 2};
    case tensor_type::i32: return {"I32", 1, 4};
    case tensor_type::i64: return {"I64", 1, 8};
    case tensor_type::f64: return {"F64", 1, 8};
    case tensor_type::iq1_m: return {"IQ1_M", 256, 56};
    case tensor_type::bf16: return {"BF16", 1, 2};
    case tensor_type::tq1_0: return {"TQ1_0", 256, 54};
    case tensor_type::tq2_0: return {"TQ2_0", 256, 66};
  }
  return {};
}

/// One tensor: its shape in ggml's order (ne[0] the row length, the innermost), type, and bytes.
struct tensor_info {
  std::string name;
  std::vector<std::uint64_t> shape;  // ne[0], ne[1], ...
  tensor_type type = tensor_type::f32;
  std::uint64_t offset = 0;          // from the start of the data section
  std::uint64_t elements = 0;
  std::uint64_t bytes = 0;
  std::span<const std::byte> data;   // inside the parsed buffer

  std::uint64_t row_length() const noexcept { return shape.empty() ? 1 : shape[0]; }
  std::uint64_t rows() const noexcept { return row_length() == 0 ? 0 : elements / row_length(); }
};

inline constexpr std::uint32_t default_alignment = 32;
inline constexpr int max_array_depth = 8;
inline constexpr std::size_t max_dimensions = 4;

/// The parsed structure of a GGUF image; tensors are views into the image it was parsed from.
class contents {
 public:
  std::uint32_t version = 0;
  std::uint32_t alignment = default_alignment;
  std::uint64_t data_offset = 0;  // where the data section starts in the image
  std::map<std::string, value, std::less<>> metadata;
  std::vector<tensor_info> tensors;

  const value* find(std::string_view key) const {
    const auto it = metadata.find(key);
    return it == metadata.end() ? nullptr : &it->second;
  }
  const tensor_info* find_tensor(std::string_view name) const {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
  const tensor_info& tensor(std::string_view name) const {
    if (const tensor_info* t = find_tensor(name)) return *t;
    throw format_error(error_kind::missing_tensor, "GGUF: tensor '" + std::string(name) + "' is missing");
  }

  /// An integer value of any integer type, checked to fit [lo, hi].
  std::int64_t integer(std::string_view key, std::int64_t lo = INT64_MIN, std::int64_t hi = INT64_MAX) const {
    const value& v = required(key);
    std::int64_t out = 0;
    if (const auto* u = std::get_if<std::uint64_t>(&v.data)) {
      if (*u > static_cast<std::uint64_t>(INT64_MAX)) out_of_range(key, std::to_string(*u), lo, hi);
      out = static_cast<std::int64_t>(*u);
    } else if (const auto* i = std::get_if<std::int64_t>(&v.data)) {
      out = *i;
    } else {
      wrong(key, v, "an integer");
    }
    if (out < lo || out > hi) out_of_range(key, std::to_string(out), lo, hi);
    return out;
  }
  std::int64_t integer_or(std::string_view key, std::int64_t fallback, std::int64_t lo = INT64_MIN, std::int64_t hi = INT64_MAX) const {
    return find(key) ? integer(key, lo, hi) : fallback;
  }
  /// A number of any numeric type.
  double number(std::string_view key) const {
    const value& v = required(key);
    if (const auto* d = std::get_if<double>(&v.data)) return *d;
    if (const auto* u = std::get_if<std::uint64_t>(&v.data)) return static_cast<double>(*u);
    if (const auto* i = std::get_if<std::int64_t>(&v.data)) return static_cast<double>(*i);
    wrong(key, v, "a number");
  }
  double number_or(std::string_view key, double fallback) const { return find(key) ? number(key) : fallback; }
  bool boolean_or(std::string_view key, bool fallback) const {
    const value* v = find(key);
    if (!v) return fallback;
    if (const auto* b = std::get_if<bool>(&v->data)) return *b;
    wrong(key, *v, "a bool");
  }
  const std::string& string(std::string_view key) const {
    const value& v = required(key);
    if (const auto* s = std::get_if<std::string>(&v.data)) return *s;
    wrong(key, v, "a string");
  }
  /// An array whose elements are of type `element`.
  const std::vector<value>& array_of(std::string_view key, value_type element) const {
    const value& v = required(key);
    const auto* a = std::get_if<gguf::array>(&v.data);
    if (!a) wrong(key, v, "an array");
    if (a->element != element)
      throw format_error(error_kind::wrong_value_type, "GGUF: metadata '" + std::string(key) + "' is an array of " + name_of(a->element) +
                                                           ", expected an array of " + name_of(element));
    return a->items;
  }

 private:
  const value& required(std::string_view key) const {
    if (const value* v = find(key)) return *v;
    throw format_error(error_kind::missing_key, "GGUF: metadata key '" + std::string(key) + "' is missing");
  }
  [[noreturn]] static void wrong(std::string_view key, const value& v, const char* expected) {
    throw format_error(error_kind::wrong_value_type,
                       "GGUF: metadata '" + std::string(key) + "' is of type " + name_of(v.type) + ", expected " + expected);
  }
  [[noreturn]] static void out_of_range(std::string_view key, const std::string& got, std::int64_t lo, std::int64_t hi) {
    throw format_error(error_kind::wrong_value_type, "GGUF: metadata '" + std::string(key) + "' is " + got + ", outside [" +
                                                         std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
};

namespace detail {

// Reads little-endian fields from the image, each read checked against what is left.
class cursor {
 public:
  explicit cursor(std::span<const std::byte> image) : image_(image) {}

  std::uint64_t position() const noexcept { return position_; }
  std::uint64_t left() const noexcept { return image_.size() - position_; }

  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T out;
    std::memcpy(&out, image_.data() + position_, sizeof(T));  // GGUF is little-endian, as are the hosts we build for
    position_ += sizeof(T);
    return out;
  }
  std::string read_string(const char* what) {
    const auto length = read<std::uint64_t>(what);
    need(length, what);
    std::string out(reinterpret_cast<const char*>(image_.data() + position_), static_cast<std::size_t>(length));
    position_ += length;
    return out;
  }
  void need(std::uint64_t bytes, const char* what) const {
    if (bytes > left())
      throw format_error(error_kind::truncated, std::string("GGUF: truncated: ") + what + " at byte " + std::to_string(position_) +
                                                    " needs " + std::to_string(bytes) + " bytes, " + std::to_string(left()) + " left");
  }

 private:
  std::span<const std::byte> image_;
  std::uint64_t position_ = 0;
};

// The smallest number of bytes one element of `type` takes in the file (for a count's sanity check).
inline std::uint64_t min_bytes(value_type type) {
  switch (type) {
    case value_type::uint8: case value_type::int8: case value_type::boolean: return 1;
    case value_type::uint16: case value_type::int16: return 2;
    case value_type::uint32: case value_type::int32: case value_type::float32: return 4;
    case value_type::uint64: case value_type::int64: case value_type::float64: case value_type::string: return 8;
    case value_type::array: return 12;  // element type + count
  }
  return 1;
}

inline value_type read_value_type(cursor& in, const std::string& key) {
  const auto raw = in.read<std::uint32_t>("a value type");
  if (raw > static_cast<std::uint32_t>(value_type::float64))
    throw format_error(error_kind::bad_value_type, "GGUF: metadata '" + key + "' has value type " + std::to_string(raw) + " (valid: 0..12)");
  return static_cast<value_type>(raw);
}

inline value read_value(cursor& in, value_type type, const std::string& key, int depth) {
  value v;
  v.type = type;
  switch (type) {
    case value_type::uint8: v.data = std::uint64_t{in.read<std::uint8_t>("a u8 value")}; break;
    case value_type::int8: v.data = std::int64_t{in.read<std::int8_t>("an i8 value")}; break;
    case value_type::uint16: v.data = std::uint64_t{in.read<std::uint16_t>("a u16 value")}; break;
    case value_type::int16: v.data = std::int64_t{in.read<std::int16_t>("an i16 value")}; break;
    case value_type::uint32: v.data = std::uint64_t{in.read<std::uint32_t>("a u32 value")}; break;
    case value_type::int32: v.data = std::int64_t{in.read<std::int32_t>("an i32 value")}; break;
    case value_type::uint64: v.data = in.read<std::uint64_t>("a u64 value"); break;
    case value_type::int64: v.data = in.read<std::int64_t>("an i64 value"); break;
    case value_type::float32: v.data = double{in.read<float>("an f32 value")}; break;
    case value_type::float64: v.data = in.read<double>("an f64 value"); break;
    case value_type::boolean: v.data = in.read<std::uint8_t>("a bool value") != 0; break;
    case value_type::string: v.data = in.read_string("a string value"); break;
    case value_type::array: {
      if (depth >= max_array_depth)
        throw format_error(error_kind::too_deep, "GGUF: metadata '" + key + "' nests arrays deeper than " + std::to_string(max_array_depth));
      gguf::array a;
      a.element = read_value_type(in, key);
      const auto count = in.read<std::uint64_t>("an array length");
      // Each element takes at least min_bytes: a count the rest of the file cannot hold is
      // refused before the vector is sized from it.
      if (count > in.left() / min_bytes(a.element))
        throw format_error(error_kind::truncated, "GGUF: metadata '" + key + "' claims " + std::to_string(count) + " elements of type " +
                                                      name_of(a.element) + ", more than the " + std::to_string(in.left()) +
                                                      " bytes left can hold");
      a.items.reserve(static_cast<std::size_t>(count));
      for (std::uint64_t i = 0; i < count; ++i) a.items.push_back(read_value(in, a.element, key, depth + 1));
      v.data = std::move(a);
      break;
    }
  }
  return v;
}

inline std::uint64_t checked_multiply(std::uint64_t a, std::uint64_t b, const std::string& what) {
  if (a != 0 && b > UINT64_MAX / a) throw format_error(error_kind::bad_dimensions, "GGUF: " + what + " overflows 64 bits");
  return a * b;
}

}  // namespace detail

/// Parses a whole GGUF image held in memory (the fuzzer's entry point; `file` maps one).
inline contents parse(std::span<const std::byte> image) {
  detail::cursor in(image);
  contents out;
  const auto magic = in.read<std::uint32_t>("the magic");
  if (magic != 0x46554747u)  // "GGUF" little-endian
    throw format_error(error_kind::bad_magic, "GGUF: not a GGUF file (it does not start with \"GGUF\")");
  out.version = in.read<std::uint32_t>("the version");
  if (out.version != 2 && out.version != 3)
    throw format_error(error_kind::unsupported_version, "GGUF: version " + std::to_string(out.version) + " (this reader reads 2 and 3)");
  const auto n_tensors = in.read<std::uint64_t>("the tensor count");
  const auto n_kv = in.read<std::uint64_t>("the metadata count");
  if (n_kv > in.left() / 12)  // a key takes >= 8 bytes, a type 4
    throw format_error(error_kind::truncated, "GGUF: claims " + std::to_string(n_kv) + " metadata entries, more than the file can hold");
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    std::string key = in.read_string("a metadata key");
    const value_type type = detail::read_value_type(in, key);
    value v = detail::read_value(in, type, key, 0);
    if (out.metadata.count(key)) throw format_error(error_kind::duplicate_key, "GGUF: metadata key '" + key + "' appears twice");
    out.metadata.emplace(std::move(key), std::move(v));
  }
  if (const value* a = out.find("general.alignment")) {
    const auto* u = std::get_if<std::uint64_t>(&a->data);
    if (a->type != value_type::uint32 || !u || *u == 0 || (*u & (*u - 1)) != 0)
      throw format_error(error_kind::bad_alignment, "GGUF: general.alignment must be a u32 power of two");
    out.alignment = static_cast<std::uint32_t>(*u);
  }

  if (n_tensors > in.left() / 24)  // name length 8, n_dims 4, type 4, offset 8
    throw format_error(error_kind::truncated, "GGUF: claims " + std::to_string(n_tensors) + " tensors, more than the file can hold");
  out.tensors.reserve(static_cast<std::size_t>(n_tensors));
  std::map<std::string, std::size_t, std::less<>> names;
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    tensor_info t;
    t.name = in.read_string("a tensor name");
    const auto n_dims = in.read<std::uint32_t>("a tensor's dimension count");
    if (n_dims == 0 || n_dims > max_dimensions)
      throw format_error(error_kind::bad_dimensions, "GGUF: tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions (1..4)");
    t.elements = 1;
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      const auto ne = in.read<std::uint64_t>("a tensor dimension");
      if (ne == 0 || ne > static_cast<std::uint64_t>(INT64_MAX))
        throw format_error(error_kind::bad_dimensions, "GGUF: tensor '" + t.name + "' dimension " + std::to_string(d) + " is " + std::to_string(ne));
      t.shape.push_back(ne);
      t.elements = detail::checked_multiply(t.elements, ne, "tensor '" + t.name + "''s element count");
    }
    const auto raw_type = in.read<std::uint32_t>("a tensor type");
    t.type = static_cast<tensor_type>(raw_type);
    const type_layout layout = layout_of(t.type);
    if (!layout.name)
      throw format_error(error_kind::unknown_tensor_type, "GGUF: tensor '" + t.name + "' has ggml type " + std::to_string(raw_type) + ", not one this reader knows");
    if (t.shape[0] % layout.block_elements != 0)
      throw format_error(error_kind::bad_row_size, "GGUF: tensor '" + t.name + "' rows of " + std::to_string(t.shape[0]) + " elements are not whole " +
                                                       layout.name + " blocks of " + std::to_string(layout.block_elements));
    t.bytes = detail::checked_multiply(t.elements / layout.block_elements, layout.block_bytes, "tensor '" + t.name + "''s byte size");
    t.offset = in.read<std::uint64_t>("a tensor offset");
    if (t.offset % out.alignment != 0)
      throw format_error(error_kind::misaligned_offset, "GGUF: tensor '" + t.name + "' offset " + std::to_string(t.offset) +
                                                            " is not a multiple of the alignment " + std::to_string(out.alignment));
    if (names.count(t.name)) throw format_error(error_kind::duplicate_tensor, "GGUF: tensor '" + t.name + "' appears twice");
    names.emplace(t.name, i);
    out.tensors.push_back(std::move(t));
  }

  const std::uint64_t padding = (out.alignment - in.position() % out.alignment) % out.alignment;
  out.data_offset = in.position() + padding;
  const std::uint64_t data_bytes = out.data_offset <= image.size() ? image.size() - out.data_offset : 0;
  for (auto& t : out.tensors) {
    if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
      throw format_error(error_kind::offset_out_of_file, "GGUF: tensor '" + t.name + "' (" + std::to_string(t.bytes) + " bytes at offset " +
                                                             std::to_string(t.offset) + ") lies outside the data section of " +
                                                             std::to_string(data_bytes) + " bytes");
    t.data = image.subspan(static_cast<std::size_t>(out.data_offset + t.offset), static_cast<std::size_t>(t.bytes));
  }
  return out;
}

/// A GGUF file mapped read-only; its tensors are views into the mapping, valid while it lives.
class file {
 public:
  /// @throws format_error naming the file and what is wrong with it.
  explicit file(const std::filesystem::path& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw format_error(error_kind::cannot_open, path.string() + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw format_error(error_kind::cannot_open, path.string() + ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw format_error(error_kind::cannot_open, path.string() + ": cannot map (" + std::strerror(errno) + ")");
      }
      map_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
    try {
      contents_ = parse(std::span<const std::byte>(map_, size_));
    } catch (const format_error& e) {
      unmap();
      throw format_error(e.kind(), path.string() + ": " + e.what());
    }
  }
  file(const file&) = delete;
  file& operator=(const file&) = delete;
  ~file() { unmap(); }

  const contents& get() const noexcept { return contents_; }
  const contents* operator->() const noexcept { return &contents_; }
  const std::filesystem::path& path() const noexcept { return path_; }
  std::size_t size() const noexcept { return size_; }

 private:
  void unmap() noexcept {
    if (map_) ::munmap(const_cast<std::byte*>(map_), size_);
    map_ = nullptr;
  }

  std::filesystem::path path_;
  const std::byte* map_ = nullptr;
  std::size_t size_ = 0;
  contents contents_;
};

}  // namespace gguf
