"""Shared benchmark helpers: timing of jitted functions and one-JSON-line reporting."""

import json
import time

import jax


def seconds_per_call(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of fn(*args) after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)
