"""A CPU process keeps its freed memory (dsv3_jax.host_memory): a jitted call whose temporaries
are far past glibc's mmap threshold and past a worker arena's 64 MB touches no new pages once
warm, while the same program with the setting off faults in every page again."""

import os
import subprocess
import sys

import pytest

from dsv3_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A training-like call with ~300 MB of temporaries (a two-layer MLP's gradient over [16384,
# 1024] activations; the weights are small, as a step's are); prints whether the process was
# set up, then the median of its warm calls' minor page faults. The median, not the mean: on a
# loaded machine (the suite's other worker) the heap can still grow by a few MB in an odd warm
# call, first touches of new pages rather than pages unmapped and mapped again.
PROGRAM = """
import resource, jax, jax.numpy as jnp
import dsv3_jax
from jax._src import xla_bridge
loss = lambda w, x: (jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]) ** 2).sum()
f = jax.jit(jax.grad(loss))
w = jnp.ones((2, 1024, 1024), jnp.float32) * 1e-3
x = jnp.ones((16384, 1024), jnp.float32)
for _ in range(6):  # the heap settles within a few calls
    jax.block_until_ready(f(w, x))
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(w, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(not xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value, sorted(faults)[2])
"""


def _run(retain: str) -> tuple[str, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", host_memory.ENV: retain,
           # one device: multi-device computations keep JAX's asynchronous dispatch
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    set_up, faults = done.stdout.split()
    return set_up, int(faults)


@pytest.mark.skipif(not host_memory.glibc(), reason="the setting is glibc's")
def test_warm_calls_touch_no_new_pages():
    set_up, faults = _run("1")
    off_set_up, off_faults = _run("0")
    assert (set_up, off_set_up) == ("True", "False")
    # 4 KiB pages: ~300 MB of temporaries is ~80,000 faults a call when they are unmapped
    # and mapped again; kept, a warm call faults in (almost) nothing
    assert off_faults > 20_000, off_faults
    assert faults < 1_000, faults


def test_late_call_is_refused_and_said(caplog):
    # this (test) process has started its backend: too late to change the dispatch mode
    import jax

    jax.devices()
    assert host_memory.retain_freed_memory() is False
    assert "before the first computation" in caplog.text
