// Shared by the CPU kernels: work split over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dsv3 {

// Runs work(0), ..., work(units - 1) on the calling thread and XLA's intra-op pool: every
// participant takes the next unstarted unit until none is left, so a pool task that starts
// late finds nothing to do and the call never waits for a task that has not started (no
// deadlock when every worker is inside such a call).
inline void Parallel(xla::ffi::ThreadPool& pool, int64_t units,
                     std::function<void(int64_t)> work) {
  struct State {
    std::function<void(int64_t)> work;
    int64_t units;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  state->work = std::move(work);
  state->units = units;
  auto drain = [](State& s) {
    for (int64_t u; (u = s.next.fetch_add(1)) < s.units;) {
      s.work(u);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace dsv3
