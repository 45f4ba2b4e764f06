// How long the kernels' pool tasks linger for the next job after a short one (parallel.h):
// set by dsv3_jax/cpu_kernels.py from DSV3_JAX_KERNEL_LINGER_US after loading the library.
#include "parallel.h"

extern "C" void Dsv3SetLingerMicroseconds(int64_t microseconds) {
  dsv3::linger_us.store(microseconds < 0 ? 0 : microseconds);
}

// Jobs offered to lingering tasks so far (tests and diagnostics).
extern "C" uint64_t Dsv3JobsHandedOver() { return dsv3::mailbox.posted.load(); }

// The most pool tasks that lingered at once so far (tests and diagnostics).
extern "C" int Dsv3MostLingering() { return dsv3::mailbox.most_lingering.load(); }

// The threads the last kernel call split its work over (tests and diagnostics).
extern "C" int Dsv3Threads() { return dsv3::mailbox.threads.load(); }
