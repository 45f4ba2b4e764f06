"""Test setup: 8 emulated CPU devices and XLA's quicker back-end compiles (set before jax is
imported anywhere), and one persistent XLA compilation cache for the whole run.

The cache is a fresh directory per run, shared by pytest-xdist's workers (they inherit the
controller's environment) and every subprocess they start (train.py runs, notebooks, the
multi-process tests): a program that takes a second or more to compile is compiled once and
loaded from disk by the next process that builds it — the same executable, so bit-for-bit
comparisons between runs stay meaningful. Set JAX_COMPILATION_CACHE_DIR yourself to choose
(and keep) the directory; the benchmark smoke tests run without it (they time compiles).
"""

import contextlib
import os
import shutil
import tempfile

import pytest

# The suite is bound by compile time (hundreds of small programs, each run a few times): XLA's
# LLVM back end at optimization level 0 compiles them ~40% faster (tests/test_unstacked.py +
# test_model.py: 139 -> 85 s on 2 cores) and runs them slower (a 300-step training test 70 ->
# 91 s). HLO-level passes and float semantics are the same. Subprocesses inherit both flags;
# the benchmark smoke tests run with XLA's defaults (tests/test_benchmarks.py).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="dsv3_jax_test_xla_cache_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # the process that made it (xdist's controller, or the only one)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def reload_kernels():
    """`with reload_kernels(NAME=value, ...)`: the CPU kernels' settings read afresh from these
    environment variables on the next `cpu_kernels.available()` call; on leaving, the
    process's own environment and kernels settings again."""
    from dsv3_jax import cpu_kernels

    @contextlib.contextmanager
    def reload(**env: str):
        try:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                cpu_kernels.available.cache_clear()
                yield
        finally:
            cpu_kernels.available.cache_clear()
            cpu_kernels.available()

    return reload


@pytest.fixture(params=["openblas", "mkl"])
def each_blas(request, reload_kernels):
    """Runs a CPU-kernel test with each BLAS the kernels can call (`dsv3_jax.cpu_kernels`,
    chosen by DSV3_JAX_BLAS); MKL's run is skipped where the `mkl` wheel is not installed.
    The process's own choice is restored afterwards."""
    from dsv3_jax import cpu_kernels
    if request.param == "mkl" and cpu_kernels.mkl_runtime() is None:
        pytest.skip("the mkl wheel is not installed (pip install -e \".[mkl]\")")
    with reload_kernels(DSV3_JAX_BLAS=request.param):
        assert cpu_kernels.blas() == request.param
        yield request.param
