// SPDX-License-Identifier: MIT
// XXH64 (Yann Collet's xxHash, 64-bit; the published algorithm, seed 0 by default), fed in
// pieces of any length: the checksum of cache files (cache_file.hpp). Reads 32 bytes a round
// in four independent lanes, so it runs at memory speed beside the copy it checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace longheads::detail {

class xxh64 {
 public:
  explicit xxh64(std::uint64_t seed = 0) noexcept
      : seed_(seed), lanes_{seed + prime1 + prime2, seed + prime2, seed, seed - prime1} {}

  /// Adds n bytes.
  void update(const void* data, std::size_t n) noexcept {
    if (n == 0) return;  // data may be null then
    auto p = static_cast<const unsigned char*>(data);
    total_ += n;
    if (buffered_ + n < 32) {
      std::memcpy(buffer_ + buffered_, p, n);
      buffered_ += n;
      return;
    }
    if (buffered_ > 0) {
      const std::size_t fill = 32 - buffered_;
      std::memcpy(buffer_ + buffered_, p, fill);
      stripe(buffer_);
      p += fill;
      n -= fill;
      buffered_ = 0;
    }
    for (; n >= 32; p += 32, n -= 32) stripe(p);
    std::memcpy(buffer_, p, n);
    buffered_ = n;
  }

  /// The hash of every byte added so far.
  std::uint64_t digest() const noexcept {
    std::uint64_t h = total_ >= 32 ? rotl(lanes_[0], 1) + rotl(lanes_[1], 7) + rotl(lanes_[2], 12) + rotl(lanes_[3], 18) : seed_ + prime5;
    if (total_ >= 32)
      for (std::uint64_t lane : lanes_) h = (h ^ round(0, lane)) * prime1 + prime4;
    h += total_;
    const unsigned char* p = buffer_;
    std::size_t n = buffered_;
    for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ round(0, load64(p)), 27) * prime1 + prime4;
    if (n >= 4) {
      h = rotl(h ^ (std::uint64_t{load32(p)} * prime1), 23) * prime2 + prime3;
      p += 4;
      n -= 4;
    }
    for (; n > 0; ++p, --n) h = rotl(h ^ (*p * prime5), 11) * prime1;
    h ^= h >> 33;
    h *= prime2;
    h ^= h >> 29;
    h *= prime3;
    h ^= h >> 32;
    return h;
  }

  /// The hash of n bytes.
  static std::uint64_t of(const void* data, std::size_t n, std::uint64_t seed = 0) noexcept {
    xxh64 h(seed);
    h.update(data, n);
    return h.digest();
  }

 private:
  static constexpr std::uint64_t prime1 = 0x9E3779B185EBCA87ull, prime2 = 0xC2B2AE3D27D4EB4Full, prime3 = 0x165667B19E3779F9ull,
                                 prime4 = 0x85EBCA77C2B2AE63ull, prime5 = 0x27D4EB2F165667C5ull;
  static std::uint64_t rotl(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }
  static std::uint64_t round(std::uint64_t acc, std::uint64_t input) noexcept { return rotl(acc + input * prime2, 31) * prime1; }
  static std::uint64_t load64(const unsigned char* p) noexcept {
    std::uint64_t x;
    std::memcpy(&x, p, 8);
    return x;  // little-endian hosts (cache files record the byte order and refuse the other)
  }
  static std::uint32_t load32(const unsigned char* p) noexcept {
    std::uint32_t x;
    std::memcpy(&x, p, 4);
    return x;
  }
  void stripe(const unsigned char* p) noexcept {
    for (int i = 0; i < 4; ++i) lanes_[i] = round(lanes_[i], load64(p + 8 * i));
  }

  std::uint64_t seed_;
  std::uint64_t lanes_[4];
  unsigned char buffer_[32] = {};
  std::size_t buffered_ = 0;
  std::uint64_t total_ = 0;
};

}  // namespace longheads::detail
