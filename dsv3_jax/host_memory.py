"""Host memory for CPU runs: freed buffers stay in the process for the next step to reuse.

On XLA:CPU every execution allocates its temporaries as one block (343 MB for the bench
config's train step) and frees it at the end. glibc's malloc serves a block that large with a
fresh `mmap` and returns it with `munmap`, so the next step touches every page of it anew:
~85,000 page faults, each a kernel entry and a zeroed 4 KiB page, ~13% of that step's time on
2 cores (the README has the figures).

`retain_freed_memory()` makes glibc keep freed memory instead: no `mmap`ped chunks and no
trimming (`mallopt` M_MMAP_MAX = 0, M_TRIM_THRESHOLD = ∞), and XLA:CPU runs a one-device
computation on the calling thread (`jax_cpu_enable_async_dispatch` off), whose malloc arena is
glibc's main one: a worker thread's arena is at most 64 MB and `mmap`s a larger block whatever
the settings, and one arena for every thread (M_ARENA_MAX = 1) slowed the decode step by a
third (1.4 → 1.8 ms at the bench config). Within a few steps the heap settles and the
temporaries come from pages already mapped. The costs: the process's resident memory stays
at its high-water mark (up to ~2x a step's needs while the heap settles), as with PyTorch's
CPU allocators; and a jitted call returns when its result is ready, so Python no longer
prepares the next call while one runs. On the CPU both cores compute a step anyway; a decode
step called in a Python loop went 1.21-1.24 → 1.25-1.32 ms at the bench config (and 1.40 →
1.27-1.35 ms when each call is waited for), and an argument made on the host for every call
is paid in line: carry such state on device, as `generate` (one jitted loop) does.
Multi-device computations are dispatched as before.

It only works before JAX starts its backend (the dispatch mode is read then), so `dsv3_jax`'s
import runs it when the process computes on the CPU (`retain_on_cpu`);
`DSV3_JAX_RETAIN_FREED_MEMORY=0` turns that off. Elsewhere (another libc, an accelerator, a
backend already started) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

import jax

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV = "DSV3_JAX_RETAIN_FREED_MEMORY"
_log = logging.getLogger(__name__)


def glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library itself: `platform.libc_ver`
    would scan the Python executable's file)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this platform
        return False


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory and XLA:CPU to run one-device computations on
    the calling thread (module docstring). Returns True when it did: False on another libc, or
    once JAX's backend has started (logged: too late to matter)."""
    if not glibc():
        return False
    if _backends_started():
        _log.warning("retain_freed_memory: JAX's backend has started with its dispatch mode; "
                     "call it before the first computation")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 is SIZE_MAX to glibc: never trim
    if not all(mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def retain_on_cpu() -> bool:
    """`retain_freed_memory()` when this process will compute on the CPU only (JAX limited to
    the CPU, by the user or by `backends.skip_absent_tpu`) and its backend has not started,
    unless DSV3_JAX_RETAIN_FREED_MEMORY=0. Returns True when it did."""
    if os.environ.get(ENV, "1") == "0" or jax.config.jax_platforms != "cpu":
        return False
    return not _backends_started() and retain_freed_memory()
