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
// DSV3_JAX_KERNEL_LINGER_US, default 1000; 0: never), and a call that finds one lingering
// hands it the job instead of scheduling a task. Long jobs (training, prefill) return their
// tasks to the pool at once. A lingering task polls with sched_yield, not a pause loop: XLA
// runs independent thunks on the same pool, so the caller, a thunk on another pool thread and
// a lingering task can be three runnable threads on two cores, and a task spinning on `pause`
// kept a core the other two needed for its whole time slice (batch-8 decode with the
// skinny-projection kernel's many short jobs: some processes 10-30% slower than without it);
// a yield gives the core to any thread that is waiting for it. Waiting on a condition
// variable instead (a futex) made each handover wait for a wake-up: bench decode steps 1.37 →
// 1.85 ms (batch 1), 3.3 → 4.9 ms (batch 8).
//
// At most `helpers` (Threads() but one, what one call asks for) tasks linger at a
// time: with two kernel calls running at once (XLA's concurrent thunks, batch-8 decode) both
// helpers lingered, and two yielding pool threads beside the calling thread kept three
// threads runnable on two cores. Capped, the linger can outlast the gap between two decode
// steps (Python's dispatch of the next call, ~0.2 ms), so the next step finds its helper
// awake: bench decode steps called one by one, warm, 50 µs uncapped → 1000 µs capped: batch 1
// 1.32-1.38 → 1.09-1.19 ms, batch 8 3.34-3.42 → 2.95-3.49 ms.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include <sched.h>

#include "xla/ffi/api/ffi.h"

namespace dsv3 {

using Clock = std::chrono::steady_clock;

// A job done within this long of its posting is short: its helpers linger after it.
constexpr std::chrono::microseconds kShortJob{150};

inline std::atomic<int64_t> linger_us{1000};

// The cores this process may run on (its affinity mask), read once.
inline int64_t UsableCores() {
  static const int64_t cores = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return int64_t{CPU_COUNT(&set)};
    return int64_t{std::thread::hardware_concurrency()};
  }();
  return std::max<int64_t>(1, cores);
}

// The threads a kernel call splits its work over: XLA's pool's, at most the usable cores. XLA
// sizes its pool by the emulated devices where there are more of them than cores (8 on a
// 2-core machine with --xla_force_host_platform_device_count=8), and more participants than
// cores only take turns.
inline int64_t Threads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), UsableCores()));
}

struct ParallelJob {
  std::function<void(int64_t)> work;
  int64_t units;
  int64_t helpers;  // pool tasks a call asks for: also the most that may linger
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
  std::atomic<int> most_lingering{0};  // the most that ever polled at once (diagnostics)
  std::atomic<int> threads{0};         // Threads() of the last call (diagnostics)
};
inline Mailbox& mailbox = *new Mailbox;

// A pool task: helps with `job`, then, after a short one, with jobs handed over while it
// lingers.
inline void Help(std::shared_ptr<ParallelJob> job) {
  while (job) {
    job->Drain();
    const bool short_job = Clock::now() - job->posted < kShortJob;
    const int64_t helpers = job->helpers;
    job.reset();
    const std::chrono::microseconds linger{linger_us.load(std::memory_order_relaxed)};
    if (!short_job || linger.count() <= 0) return;
    const uint64_t seen = mailbox.posted.load(std::memory_order_acquire);
    const int now = mailbox.lingering.fetch_add(1) + 1;
    if (now > helpers) {  // enough are lingering already
      mailbox.lingering.fetch_sub(1);
      return;
    }
    for (int most = mailbox.most_lingering.load(); now > most &&
         !mailbox.most_lingering.compare_exchange_weak(most, now);) {
    }
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
  const int64_t threads = Threads(pool);
  int64_t tasks = std::min<int64_t>(threads - 1, units - 1);
  job->helpers = threads - 1;
  mailbox.threads.store(threads, std::memory_order_relaxed);
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

// Waits until `count` reaches `target` (a unit waiting for units that running participants
// have taken, e.g. the few-token MoE's down units for their expert's gate/up units): a short
// pause loop where the CPU has one, for waits of a few microseconds, then yields the core as
// Parallel's own waits do.
inline void AwaitCount(const std::atomic<int64_t>& count, int64_t target) {
  for (int spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
    if (spins < 64) {
      __builtin_ia32_pause();
      continue;
    }
#endif
    std::this_thread::yield();
  }
}

}  // namespace dsv3
