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
/// handle can sit in a policy bundle (or in the policies of every layer of a model).
///
/// Every parallel_for is a job of its own: the pool's workers take items from any open job,
/// and each caller works through its own job's items too, so several threads calling at once
/// share the workers instead of queueing for the pool, and a parallel_for called from inside
/// an item (the same pool, nested) runs without deadlock: its caller never waits for an item
/// that nobody has started. Lane numbers are per job: the caller is lane 0, worker i is lane i.
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
  /// One parallel_for: lives on its caller's stack, linked into the pool's open jobs while it
  /// has unclaimed items. Items are claimed with one atomic counter.
  struct job {
    const index_task* task = nullptr;
    std::size_t items = 0;
    std::atomic<std::size_t> next{0};
    std::size_t finished = 0;  // items run to the end (guarded by the pool's mutex)
    std::size_t helpers = 0;   // workers holding this job (guarded by the pool's mutex)
    job* prev = nullptr;       // the open-jobs list, intrusive so that posting never allocates
    job* following = nullptr;
    bool open() const noexcept { return next.load(std::memory_order_relaxed) < items; }
    /// Runs items until none is left; returns how many this lane ran.
    std::size_t drain(std::size_t lane) {
      std::size_t ran = 0;
      for (std::size_t i = next.fetch_add(1); i < items; i = next.fetch_add(1), ++ran) (*task)(i, lane);
      return ran;
    }
  };

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
    job* first_open() const noexcept {
      for (job* j = open_jobs; j != nullptr; j = j->following)
        if (j->open()) return j;
      return nullptr;
    }
    void link(job& j) noexcept {
      j.following = open_jobs;
      if (open_jobs != nullptr) open_jobs->prev = &j;
      open_jobs = &j;
    }
    void unlink(job& j) noexcept {
      (j.prev != nullptr ? j.prev->following : open_jobs) = j.following;
      if (j.following != nullptr) j.following->prev = j.prev;
    }
    void work(std::size_t lane) {
      std::unique_lock lock(mutex);
      for (;;) {
        job* j = nullptr;
        wake.wait(lock, [&] { return stopping || (j = first_open()) != nullptr; });
        if (stopping) return;
        ++j->helpers;
        lock.unlock();
        const std::size_t ran = j->drain(lane);
        lock.lock();
        j->finished += ran;
        if (--j->helpers == 0 && j->finished == j->items) done.notify_all();
      }
    }
    void run(std::size_t n, index_task t) {
      if (workers.empty() || n <= 1) {
        for (std::size_t i = 0; i < n; ++i) t(i, 0);
        return;
      }
      job j;
      j.task = &t;
      j.items = n;
      {
        std::lock_guard lock(mutex);
        link(j);
      }
      wake.notify_all();
      const std::size_t ran = j.drain(0);
      std::unique_lock lock(mutex);
      unlink(j);  // every item is claimed: no worker takes it up any more
      j.finished += ran;
      done.wait(lock, [&] { return j.helpers == 0 && j.finished == j.items; });
    }

    std::vector<std::thread> workers;
    std::mutex mutex;
    std::condition_variable wake, done;
    bool stopping = false;
    job* open_jobs = nullptr;
  };
  std::shared_ptr<pool> pool_;
};

static_assert(executor<serial_executor> && executor<thread_pool_executor>);

}  // namespace longheads
