"""Which BLAS the CPU kernels call (`dsv3_jax.cpu_kernels`, DSV3_JAX_BLAS): the chosen one
really does their products (MKL's verbose log lists each of its sgemm calls), and a bad or
unavailable choice is refused by name. The kernels' numerics under each BLAS are checked by
their own tests (the `each_blas` fixture)."""

import os
import subprocess
import sys

import pytest

from dsv3_jax import cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one grouped GEMM of two groups through the kernel: two sgemm calls
PROGRAM = """
import jax.numpy as jnp
from dsv3_jax import cpu_kernels, grouped_gemm
y = grouped_gemm.ragged_matmul(jnp.ones((8, 4)), jnp.ones((2, 4, 3)),
                               jnp.asarray([5, 3], jnp.int32))
print("blas", cpu_kernels.blas(), float(y.sum()))
"""


def _python(program: str, **env: str) -> str:
    """stdout + stderr of `python -c program` from the repository, CPU only, with `env`."""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


NO_MKL = pytest.mark.skipif(cpu_kernels.mkl_runtime() is None,
                            reason="the mkl wheel is not installed")


# `auto`: MKL on an Intel CPU only (OpenBLAS was 1.4-1.5x faster at decode on an AMD EPYC)
AUTO = "mkl" if cpu_kernels.intel_cpu() else "openblas"


@NO_MKL
@pytest.mark.parametrize("choice, expected", [("auto", AUTO), ("mkl", "mkl"),
                                              ("openblas", "openblas")])
def test_the_chosen_blas_does_the_products(choice, expected):
    """With MKL_VERBOSE=1, MKL logs every sgemm it runs: the kernel's two (one per group) with
    MKL chosen (or by default, where it is installed and the CPU is Intel's), none with
    OpenBLAS; the result is the same (8 rows of 4 ones times 4×3 ones: 96)."""
    out = _python(PROGRAM, DSV3_JAX_BLAS=choice, MKL_VERBOSE="1",
                  XLA_FLAGS="--xla_force_host_platform_device_count=1")
    assert f"blas {expected} 96.0" in out, out
    assert out.count("MKL_VERBOSE SGEMM(") == (2 if expected == "mkl" else 0), out


# another library set MKL up first, with a threaded layer (GNU OpenMP) and ran a product
OTHER_FIRST = """
import ctypes, logging
import numpy as np
from dsv3_jax import cpu_kernels  # the kernels are not loaded before their first use
logging.basicConfig()
mkl = ctypes.CDLL(str(cpu_kernels.mkl_runtime()))
mkl.MKL_Set_Threading_Layer(3)
a, c = np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32)
p = lambda x: x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
mkl.cblas_sgemm(101, 111, 111, 4, 4, 4, ctypes.c_float(1), p(a), 4, p(a), 4, ctypes.c_float(0),
                p(c), 4)
print("blas", cpu_kernels.blas(), c[0, 0])
"""


@NO_MKL
def test_mkl_set_up_otherwise_leaves_the_kernels_on_openblas():
    """MKL already running with a threaded layer in the process: the kernels, which split
    their work over XLA's pool themselves, do not share it; on an Intel CPU a warning names
    why (elsewhere `auto` never tries MKL, and says nothing)."""
    out = _python(OTHER_FIRST, DSV3_JAX_BLAS="auto")
    assert "blas openblas 4.0" in out, out
    warned = "MKL is set up in this process with threading layer 3" in out
    assert warned == cpu_kernels.intel_cpu(), out


def test_cpuinfo_fields():
    """`intel_cpu` and the kernels' cache key read /proc/cpuinfo's fields: the first line of
    a name, its value stripped; Arm's lines have no vendor_id (not Intel)."""
    x86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f\n\n"
           "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
    assert cpu_kernels._cpuinfo_field("vendor_id", info=x86) == "GenuineIntel"
    assert cpu_kernels._cpuinfo_field("flags", "Features", info=x86) == "fpu avx512f"
    assert cpu_kernels._cpuinfo_field("flags", "Features", info=arm) == "fp asimd sve"
    assert cpu_kernels._cpuinfo_field("vendor_id", info=arm) is None


def test_a_bad_choice_fails_the_import_by_name():
    """Set before the process starts (the usual way), a bad DSV3_JAX_BLAS stops `import
    dsv3_jax` with the allowed values, before anything is traced."""
    done = subprocess.run([sys.executable, "-c", "import dsv3_jax"], cwd=ROOT,
                          env={**os.environ, "DSV3_JAX_BLAS": "atlas"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().endswith(
        "ValueError: DSV3_JAX_BLAS='atlas': expected one of auto, mkl, openblas"), done.stderr


def test_a_bad_choice_is_refused_by_name(monkeypatch):
    cpu_kernels.available.cache_clear()
    try:
        monkeypatch.setenv("DSV3_JAX_BLAS", "atlas")
        with pytest.raises(ValueError, match="DSV3_JAX_BLAS='atlas': expected one of auto, "
                                             "mkl, openblas"):
            cpu_kernels.available()
        # MKL asked for where it is unavailable (not installed, or set up otherwise)
        monkeypatch.setenv("DSV3_JAX_BLAS", "mkl")
        monkeypatch.setattr(cpu_kernels, "_mkl_sgemm", lambda: None)
        with pytest.raises(RuntimeError, match=r"DSV3_JAX_BLAS=mkl, but MKL is unavailable "
                                               r"here .*choose openblas"):
            cpu_kernels.available()
        # auto falls back to OpenBLAS
        monkeypatch.setenv("DSV3_JAX_BLAS", "auto")
        assert cpu_kernels.available() and cpu_kernels.blas() == "openblas"
    finally:
        monkeypatch.undo()
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()
