// SPDX-License-Identifier: MIT
// A std::pmr::memory_resource for K/V caches (the benchmark's, with its probe buffers and
// prefill activations, and the llama2c host's): blocks of 2 MB and more are 2 MB aligned and, on Linux, advised as transparent
// huge pages before they are first touched (this machine runs THP in madvise mode, so nothing
// else gets them). Freed blocks are kept and handed out again, lowest address first, so the
// caches of one group of benchmarks land on the memory the previous group's used.
//
// Why huge pages: with 4 KB pages a 1 GB cache spans 262144 pages, every page boundary a TLB
// miss with a nested page walk in this VM and a stop for the hardware prefetcher. The
// four-query GQA path, whose arithmetic keeps fewer loads in flight, lost most to that (dense
// Llama-3 shape 128k, 1 thread: 60-66 -> 52-56 ms on huge pages). How an engine would do the
// same: docs/embedding.md.
//
// Why the reuse: on this VM each buffer reads at its own rate, pass after pass (of four 1 GB
// buffers allocated together, over five passes, the first read at 31-35 GB/s, the third at
// 34-39), so a ratio between benchmarks of different groups (LongHeads vs dense, 128k vs 8k,
// bf16 vs fp32) also compared two buffers' memory. Reusing the blocks puts both sides on the
// same memory.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <map>
#include <memory_resource>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tools {

class huge_page_resource final : public std::pmr::memory_resource {
 public:
  static constexpr std::size_t huge_page = std::size_t{2} << 20;

  huge_page_resource() = default;
  huge_page_resource(const huge_page_resource&) = delete;
  huge_page_resource& operator=(const huge_page_resource&) = delete;
  ~huge_page_resource() override {
    for (auto& [p, bytes] : free_) std::free(p);
  }

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    if (bytes < huge_page) return std::pmr::new_delete_resource()->allocate(bytes, alignment);
    const std::size_t wanted = rounded(bytes);
    const std::lock_guard lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->second >= wanted) {
        void* p = it->first;
        in_use_[p] = it->second;
        free_.erase(it);
        return p;
      }
    void* p = std::aligned_alloc(huge_page, wanted);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__)
    madvise(p, wanted, MADV_HUGEPAGE);  // advice only: on failure the block stays on small pages
#endif
    in_use_[p] = wanted;
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    if (bytes < huge_page) return std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
    const std::lock_guard lock(mutex_);
    const auto it = in_use_.find(p);
    free_[p] = it->second;
    in_use_.erase(it);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  static std::size_t rounded(std::size_t bytes) noexcept { return (bytes + huge_page - 1) / huge_page * huge_page; }

  std::mutex mutex_;
  std::map<void*, std::size_t> free_, in_use_;  // block -> its size, by address
};

/// One resource for the whole program (function-local static: it outlives every cache that
/// main's objects hold).
inline huge_page_resource& huge_pages() {
  static huge_page_resource resource;
  return resource;
}

}  // namespace tools
