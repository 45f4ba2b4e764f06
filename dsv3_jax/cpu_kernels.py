"""The project's CPU kernels (`kernels/*.cc`): XLA FFI handlers built on first use, registered
with XLA:CPU.

The handlers call OpenBLAS (the `scipy-openblas32` wheel) single-threaded and split their work
over XLA's own intra-op thread pool (`kernels/parallel.h`). All sources compile into one
library (~5 s with the system's C++ compiler, `$CXX` or `c++`, against jaxlib's FFI headers),
cached under `$DSV3_JAX_KERNEL_CACHE` (default `~/.cache/dsv3_jax`) by a hash of the sources
and the versions they build against. Without a compiler or the wheel `available()` is False
(one warning) and every caller keeps its pure-JAX path. Users:
  * `dsv3_jax.grouped_gemm`: the routed experts' grouped GEMMs (`ragged_dot`) and their SwiGLU,
    training too;
  * `dsv3_jax.latent_attention`: absorbed MLA decode attention over the latent cache;
  * `dsv3_jax.fused_attention`: causal attention for training and prefill, with its gradient.
Built for the machine that builds them (`-march=native`): the CPU's feature flags are part of
the cache key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform as platform_module
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import jax

from dsv3_jax.backends import platform

_KERNELS = Path(__file__).parent / "kernels"
# FFI target name → handler symbol
HANDLERS = {
    "dsv3_ragged_rows": "Dsv3RaggedRowsTimesKernels",
    "dsv3_ragged_grads": "Dsv3RaggedKernelGradients",
    "dsv3_swiglu_hidden": "Dsv3SwigluHidden",
    "dsv3_swiglu_hidden_grads": "Dsv3SwigluHiddenGrads",
    "dsv3_latent_attention": "Dsv3LatentAttention",
    "dsv3_causal_attention_fwd": "Dsv3CausalAttentionForward",
    "dsv3_causal_attention_bwd": "Dsv3CausalAttentionBackward",
}
_log = logging.getLogger(__name__)


def _openblas():
    import scipy_openblas32  # the `scipy-openblas32` wheel: header, library, its directory
    return (scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(),
            scipy_openblas32.get_library())


def _cpu_flags() -> bytes:
    """The instruction sets `-march=native` builds for (Linux: /proc/cpuinfo's flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform_module.machine().encode()
    return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))),
                platform_module.machine()).encode()


def _build() -> Path:
    """The compiled library, built once per (sources, jaxlib, OpenBLAS, Python ABI)."""
    include, libdir, library = _openblas()
    sources = sorted(_KERNELS.glob("*.cc"))
    parts = [p.read_bytes() for p in sorted(_KERNELS.glob("*.[ch]*"))]
    key = hashlib.sha256(b"\0".join([
        *parts, jax.__version__.encode(), jax.ffi.include_dir().encode(), libdir.encode(),
        str(sysconfig.get_config_var("SOABI")).encode(), _cpu_flags()])).hexdigest()[:16]
    cache = Path(os.environ.get("DSV3_JAX_KERNEL_CACHE",
                                Path.home() / ".cache" / "dsv3_jax"))
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved: atomic
        out = Path(tmp) / target.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{jax.ffi.include_dir()}", f"-I{include}", f"-I{_KERNELS}",
                   *map(str, sources), "-o", str(out),
                   f"-L{libdir}", f"-l{library}", f"-Wl,-rpath,{libdir}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered with XLA:CPU (built on the first call)."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
        return True
    except Exception as e:  # no compiler, no OpenBLAS wheel, a failed build
        _log.warning("the CPU kernels are unavailable (%s: %s); the pure-JAX paths run instead",
                     type(e).__name__, str(e).splitlines()[0])
        return False


def runs_here(*dtypes) -> bool:
    """Whether the kernels run where code is being traced, on operands of `dtypes`: all
    float32, for one CPU device (no multi-device mesh, not inside shard_map: an FFI call has
    no partitioning rule), the kernels available."""
    mesh = jax.sharding.get_abstract_mesh()
    return (all(jax.numpy.dtype(d) == jax.numpy.float32 for d in dtypes)
            and platform() == "cpu" and (mesh.empty or mesh.size == 1)
            and not mesh.manual_axes and available())
