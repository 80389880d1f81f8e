// kvtrim: persistent worker threads for per-head work on the CPU (CacheConfig::threads).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#if !defined(__CUDACC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define KVTRIM_PAUSE() _mm_pause()
#else
#define KVTRIM_PAUSE() ((void)0)
#endif

namespace kvtrim::detail {

// Persistent worker threads for per-head work. run(n, f) calls f(task, worker) for task = 0..n-1 spread
// over the calling thread (worker 0) and the pool's workers (1..threads-1); it returns when all are done.
// No allocation per run. Workers spin briefly between runs (decode calls come back to back), then sleep.
class HeadPool {
 public:
  explicit HeadPool(int threads) : n_threads_(threads) {
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  HeadPool(const HeadPool&) = delete;
  HeadPool& operator=(const HeadPool&) = delete;
  ~HeadPool() {
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return n_threads_; }

  template <class F>
  void run(int n_tasks, F& f) {
    call_ = [](void* ctx, int task, int worker) { (*static_cast<F*>(ctx))(task, worker); };
    ctx_ = &f;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    work(0);
    for (int spins = 0;; ++spins) {
      const int p = pending_.load(std::memory_order_acquire);
      if (p == 0) break;
      if (spins < kSpins) {
        pause();
      } else {
        pending_.wait(p, std::memory_order_acquire);
      }
    }
  }

 private:
  static constexpr int kSpins = 2000;  // ~50-100 us of pause instructions before sleeping
  static void pause() {
    KVTRIM_PAUSE();
  }
  void work(int worker) {
    for (int t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) call_(ctx_, t, worker);
  }
  void worker_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      for (int spins = 0;; ++spins) {
        const std::uint64_t g = generation_.load(std::memory_order_acquire);
        if (g != seen) {
          seen = g;
          break;
        }
        if (spins < kSpins) {
          pause();
        } else {
          generation_.wait(g, std::memory_order_acquire);
        }
      }
      if (stop_.load(std::memory_order_relaxed)) return;
      work(worker);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }

  int n_threads_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  void (*call_)(void*, int, int) = nullptr;
  void* ctx_ = nullptr;
  int n_tasks_ = 0;
};


}  // namespace kvtrim::detail
