// SPDX-License-Identifier: MIT
// Executor: how the attention runs independent work items (heads, chunks) in parallel.
//
// Each item is computed whole by one lane with that lane's scratch, and items never combine
// results, so outputs are bit-identical whatever the number of threads.
#pragma once

#include <atomic>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace longheads {

/// A non-owning reference to `void(std::size_t item, std::size_t lane)`; never allocates.
class index_task {
 public:
  /// Refers to f, which must outlive the task.
  template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, index_task>)
  index_task(F& f) noexcept  // NOLINT(google-explicit-constructor)
      : object_(&f), call_([](void* o, std::size_t item, std::size_t lane) { (*static_cast<F*>(o))(item, lane); }) {}
  /// Calls f(item, lane).
  void operator()(std::size_t item, std::size_t lane) const { call_(object_, item, lane); }

 private:
  void* object_;
  void (*call_)(void*, std::size_t, std::size_t);
};

/// lanes(): how many items may run at once (the caller sizes per-lane scratch by it);
/// parallel_for(n, task) runs task(item, lane) for every item in [0, n), lane < lanes().
template <class E>
concept executor = requires(const E& e, std::size_t n, index_task task) {
  { e.lanes() } -> std::convertible_to<std::size_t>;
  { e.parallel_for(n, task) } -> std::same_as<void>;
};

/// The default: everything on the calling thread.
struct serial_executor {
  /// How many items may run at once.
  std::size_t lanes() const noexcept { return 1; }
  /// Runs task(item, lane) for every item in [0, n).
  void parallel_for(std::size_t n, index_task task) const {
    for (std::size_t i = 0; i < n; ++i) task(i, 0);
  }
};

/// A fixed pool of threads; the calling thread works as lane 0. Copies share one pool, so the
/// handle can sit in a policy bundle. Calls from several threads take turns.
class thread_pool_executor {
 public:
  /// @param threads total lanes including the caller; 0 means std::thread::hardware_concurrency().
  explicit thread_pool_executor(std::size_t threads = 0)
      : pool_(std::make_shared<pool>(threads == 0 ? std::max<std::size_t>(1, std::thread::hardware_concurrency())
                                                  : threads)) {}
  /// How many items may run at once.
  std::size_t lanes() const noexcept { return pool_->workers.size() + 1; }
  /// Runs task(item, lane) for every item in [0, n).
  void parallel_for(std::size_t n, index_task task) const { pool_->run(n, task); }

 private:
  struct pool {
    explicit pool(std::size_t lanes) {
      for (std::size_t lane = 1; lane < lanes; ++lane) workers.emplace_back([this, lane] { work(lane); });
    }
    ~pool() {
      {
        std::lock_guard lock(mutex);
        stopping = true;
      }
      wake.notify_all();
      for (auto& t : workers) t.join();
    }
    void drain(std::size_t lane) {
      for (std::size_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) (*task)(i, lane);
    }
    void work(std::size_t lane) {
      std::uint64_t seen = 0;
      for (;;) {
        {
          std::unique_lock lock(mutex);
          wake.wait(lock, [&] { return stopping || generation != seen; });
          if (stopping) return;
          seen = generation;
        }
        drain(lane);
        std::lock_guard lock(mutex);
        if (--busy == 0) done.notify_one();
      }
    }
    void run(std::size_t n, index_task t) {
      if (workers.empty() || n <= 1) {
        for (std::size_t i = 0; i < n; ++i) t(i, 0);
        return;
      }
      std::lock_guard turn(caller);
      {
        std::lock_guard lock(mutex);
        task = &t;
        items = n;
        next.store(0);
        busy = workers.size();
        ++generation;
      }
      wake.notify_all();
      drain(0);
      std::unique_lock lock(mutex);
      done.wait(lock, [&] { return busy == 0; });
    }

    std::vector<std::thread> workers;
    std::mutex caller, mutex;
    std::condition_variable wake, done;
    std::uint64_t generation = 0;
    bool stopping = false;
    std::size_t busy = 0;
    std::size_t items = 0;
    std::atomic<std::size_t> next{0};
    const index_task* task = nullptr;
  };
  std::shared_ptr<pool> pool_;
};

static_assert(executor<serial_executor> && executor<thread_pool_executor>);

}  // namespace longheads
