// SPDX-License-Identifier: MIT
// A std::pmr::memory_resource for the benchmark's K/V caches and probe buffers: blocks of 2 MB
// and more are 2 MB aligned and, on Linux, advised as transparent huge pages before they are
// first touched (this machine runs THP in madvise mode, so nothing else gets them).
//
// Why: with 4 KB pages a 1 GB cache spans 262144 pages, every page boundary a TLB miss with a
// nested page walk in this VM and a stop for the hardware prefetcher. The four-query GQA path,
// whose arithmetic keeps fewer loads in flight, lost most to that (dense Llama-3 shape 128k,
// 1 thread: 60-66 -> 52-56 ms on huge pages). How an engine would do the same: docs/embedding.md.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory_resource>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bench {

class huge_page_resource final : public std::pmr::memory_resource {
 public:
  static constexpr std::size_t huge_page = std::size_t{2} << 20;

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    if (bytes < huge_page) return std::pmr::new_delete_resource()->allocate(bytes, alignment);
    void* p = std::aligned_alloc(huge_page, rounded(bytes));
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__)
    madvise(p, rounded(bytes), MADV_HUGEPAGE);  // advice only: on failure the block stays on small pages
#endif
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    if (bytes < huge_page) return std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
    std::free(p);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  static std::size_t rounded(std::size_t bytes) noexcept { return (bytes + huge_page - 1) / huge_page * huge_page; }
};

}  // namespace bench
