"""How the CPU kernels split work over XLA's pool (`kernels/parallel.h`): after a short job a
pool task lingers (DSV3_JAX_KERNEL_LINGER_US) and the next kernel call hands it its job — the
results are the same whichever threads ran the units —, no more tasks linger at once than one
call asks for, and a bad setting is refused by name."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import cpu_kernels, grouped_gemm, latent_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not cpu_kernels.available() or (os.cpu_count() or 1) < 2,
                                reason="needs the CPU kernels and a pool of 2+ threads")


def _kernel_calls():
    """A jitted chain of short kernel calls, as a decode step makes them: absorbed attention
    over a 600-slot cache (its slots split in two) and grouped GEMMs of a few rows."""
    k = jax.random.split(jax.random.key(0), 6)
    c_kv, k_pe = jax.random.normal(k[0], (1, 600, 64)), jax.random.normal(k[1], (1, 600, 32))
    q, q_pe = jax.random.normal(k[2], (1, 8, 1, 64)), jax.random.normal(k[3], (1, 8, 1, 32))
    x, w = jax.random.normal(k[4], (8, 64)), jax.random.normal(k[5], (4, 64, 64)) * 0.1
    positions, sizes = jnp.full((1, 1), 590, jnp.int32), jnp.asarray([2, 3, 1, 2], jnp.int32)

    @jax.jit
    def chain(q, x):
        outs = []
        for _ in range(8):
            q = q + 0.01 * latent_attention.attend(c_kv, k_pe, q, q_pe, positions, 0.1)
            x = jnp.tanh(grouped_gemm.ragged_matmul(x, w, sizes))
            outs += [q, x]
        return outs

    def reference(q, x):
        outs = []
        for _ in range(8):
            q = q + 0.01 * latent_attention.reference(c_kv, k_pe, q, q_pe, positions, 0.1)
            x = jnp.tanh(jax.lax.ragged_dot(x, w, sizes))
            outs += [q, x]
        return outs

    return chain, reference, (q, x)


def test_lingering_tasks_take_the_next_jobs_and_change_no_result(reload_kernels):
    chain, reference, args = _kernel_calls()
    with reload_kernels(**{cpu_kernels.LINGER_ENV: "2000"}):
        assert cpu_kernels.available()
        before = cpu_kernels.jobs_handed_over()
        results = [jax.block_until_ready(chain(*args)) for _ in range(5)]
        assert cpu_kernels.jobs_handed_over() > before, "no call found a lingering pool task"
        for result in results[1:]:  # whichever threads ran which units: the same bits
            for a, b in zip(results[0], result):
                np.testing.assert_array_equal(a, b)
        for got, want in zip(results[0], reference(*args)):  # and the formulas' values
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        # with lingering off, nothing is handed over (tasks still lingering time out first)
        with reload_kernels(**{cpu_kernels.LINGER_ENV: "0"}):
            assert cpu_kernels.available()
            time.sleep(0.01)
            before = cpu_kernels.jobs_handed_over()
            again = jax.block_until_ready(chain(*args))
            assert cpu_kernels.jobs_handed_over() == before
            for a, b in zip(results[0], again):
                np.testing.assert_array_equal(a, b)


def test_no_more_tasks_linger_at_once_than_one_call_asks_for():
    # Threads calling kernels at once (as XLA runs independent thunks at batch-8 decode): each
    # call asks for `threads()` but one helpers, and uncapped the helpers of concurrent calls
    # all lingered (2 on a 2-core machine: this caught that in 6 of 6 runs), keeping three
    # threads runnable on two cores. In a one-device process of its own, as decode runs.
    program = (
        "import sys, threading, jax; sys.path.insert(0, 'tests')\n"
        "from test_parallel import _kernel_calls\n"
        "from dsv3_jax import cpu_kernels\n"
        "chain, _, args = _kernel_calls()\n"
        "calls = lambda: [jax.block_until_ready(chain(*args)) for _ in range(300)]\n"
        "calls()\n"
        "threads = [threading.Thread(target=calls) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(cpu_kernels.most_lingering(), cpu_kernels.threads())\n")
    env = {**os.environ, cpu_kernels.LINGER_ENV: "2000",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    most, threads = map(int, done.stdout.split())
    assert 1 <= most <= threads - 1, (most, threads)


@pytest.mark.parametrize("value", ["-5", "abc", "2000000"])
def test_a_bad_linger_is_refused_by_name(reload_kernels, value):
    with reload_kernels(**{cpu_kernels.LINGER_ENV: value}):
        with pytest.raises(ValueError, match=f"DSV3_JAX_KERNEL_LINGER_US='{value}': expected "
                                             "whole microseconds from 0"):
            cpu_kernels.available()


def test_a_bad_linger_fails_the_import_by_name():
    done = subprocess.run([sys.executable, "-c", "import dsv3_jax"], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               cpu_kernels.LINGER_ENV: "soon"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ValueError: DSV3_JAX_KERNEL_LINGER_US='soon': expected whole microseconds from 0 "
        "(never linger) to 1000000"), done.stderr
