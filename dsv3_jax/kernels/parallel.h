// Shared by the CPU kernels: work split over XLA's intra-op thread pool.
//
// Parallel(pool, units, work) runs work(0), ..., work(units - 1) on the calling thread and
// pool tasks: every participant takes the next unstarted unit until none is left, so a task
// that starts late finds nothing to do and the call never waits for a task that has not
// started (no deadlock when every worker is inside such a call). Which thread runs a unit
// never changes its result.
//
// A decode step calls the kernels tens of microseconds apart, and a parked pool thread takes
// about that long to wake: a task that helped with a short job (done within kShortJob of its
// posting) lingers, polling for the next job for up to `linger_us` (parallel.cc sets it from
// DSV3_JAX_KERNEL_LINGER_US, default 50; 0: never), and a call that finds one lingering hands
// it the job instead of scheduling a task. Long jobs (training, prefill) return their tasks to
// the pool at once. A lingering task polls with sched_yield, not a pause loop: XLA runs
// independent thunks on the same pool, so the caller, a thunk on another pool thread and a
// lingering task can be three runnable threads on two cores, and a task spinning on `pause`
// kept a core the other two needed for its whole time slice (batch-8 decode with the
// skinny-projection kernel's many short jobs: some processes 10-30% slower than without it);
// a yield gives the core to any thread that is waiting for it and costs nothing otherwise.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dsv3 {

using Clock = std::chrono::steady_clock;

// A job done within this long of its posting is short: its helpers linger after it.
constexpr std::chrono::microseconds kShortJob{150};

inline std::atomic<int64_t> linger_us{50};

struct ParallelJob {
  std::function<void(int64_t)> work;
  int64_t units;
  std::atomic<int64_t> next{0}, done{0};
  Clock::time_point posted = Clock::now();

  void Drain() {
    for (int64_t u; (u = next.fetch_add(1)) < units;) {
      work(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Where a job is offered to lingering tasks. Never destroyed: pool threads may outlive exit.
struct Mailbox {
  std::mutex mutex;
  std::shared_ptr<ParallelJob> job;  // the newest job offered
  std::atomic<uint64_t> posted{0};   // jobs offered so far
  std::atomic<int> lingering{0};     // tasks polling now
};
inline Mailbox& mailbox = *new Mailbox;

// A pool task: helps with `job`, then, after a short one, with jobs handed over while it
// lingers.
inline void Help(std::shared_ptr<ParallelJob> job) {
  while (job) {
    job->Drain();
    const bool short_job = Clock::now() - job->posted < kShortJob;
    job.reset();
    const std::chrono::microseconds linger{linger_us.load(std::memory_order_relaxed)};
    if (!short_job || linger.count() <= 0) return;
    const uint64_t seen = mailbox.posted.load(std::memory_order_acquire);
    mailbox.lingering.fetch_add(1);
    const Clock::time_point until = Clock::now() + linger;
    bool handed = false;
    while (!(handed = mailbox.posted.load(std::memory_order_acquire) != seen) &&
           Clock::now() < until)
      std::this_thread::yield();  // the core to any runnable thread (header comment)
    mailbox.lingering.fetch_sub(1);
    if (!handed) return;
    std::lock_guard<std::mutex> lock(mailbox.mutex);
    job = mailbox.job;  // this or a newer job; one already finished has nothing left to take
  }
}

inline void Parallel(xla::ffi::ThreadPool& pool, int64_t units,
                     std::function<void(int64_t)> work) {
  auto job = std::make_shared<ParallelJob>();
  job->work = std::move(work);
  job->units = units;
  int64_t tasks = std::min<int64_t>(pool.num_threads() - 1, units - 1);
  const int64_t lingering = mailbox.lingering.load();
  if (tasks > 0 && lingering > 0) {
    {
      std::lock_guard<std::mutex> lock(mailbox.mutex);
      mailbox.job = job;
    }
    mailbox.posted.fetch_add(1, std::memory_order_release);
    tasks -= std::min<int64_t>(tasks, lingering);
  }
  for (int64_t i = 0; i < tasks; ++i) pool.Schedule([job] { Help(job); });
  job->Drain();
  while (job->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace dsv3
