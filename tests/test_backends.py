"""No libtpu probe without a TPU (dsv3_jax.backends): silent CPU runs with the tpu-aot extra
installed, while a TPU/GPU host or an explicit JAX_PLATFORMS is left alone."""

import os
import subprocess
import sys

import pytest

from dsv3_jax import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = "import dsv3_jax, jax; print(jax.devices()[0].platform, float(jax.numpy.ones(3).sum()))"


def _run(program: str) -> subprocess.CompletedProcess:
    # A plain user's environment: no platform choice, and none of the TPU_* settings that
    # sharding.tpu puts into this (test) process when it describes a topology.
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "ALLOW_MULTIPLE_LIBTPU_LOAD")
           and not k.startswith("TPU_")}
    return subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(backends._accelerator_present(), reason="a TPU/GPU host probes its device")
def test_cpu_run_is_silent_with_libtpu_installed():
    pytest.importorskip("libtpu")
    quiet = _run(PROGRAM)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.split() == ["cpu", "3.0"]
    assert quiet.stderr == "", quiet.stderr
    # The control: JAX on its own (dsv3_jax imported after the backends started) still probes
    # libtpu and prints its errors on this machine, so the check above can fail.
    noisy = _run("import jax; jax.devices(); import dsv3_jax")
    assert "TPU" in noisy.stderr, noisy.stderr


def test_accelerator_hosts_and_explicit_platforms_are_left_alone():
    report = "import dsv3_jax, jax; print(repr(jax.config.jax_platforms))"
    # A TPU host: JAX's own PCI check finds chips, so nothing is restricted.
    tpu_host = _run("from jax._src import hardware_utils as h; "
                    "h.num_available_tpu_chips_and_device_id = lambda: (4, None); " + report)
    assert tpu_host.stdout.split() == ["None"], tpu_host.stderr
    explicit = _run("import os; os.environ['JAX_PLATFORMS'] = ''; " + report)
    assert explicit.stdout.split() == ["''"], explicit.stderr  # the user's choice, untouched
    assert _run(report).stdout.split() == ["'cpu'"]  # the control: here it is restricted
